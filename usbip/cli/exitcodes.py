"""Exit codes of the ``usbip`` and ``usbipd`` commands (README: Command exit codes), and the one
map from the errors a command stops on to them."""

from __future__ import annotations

import errno
import logging

OK = 0
FAILURE = 1  # the operation failed (see the message)
USAGE = 2  # bad command line
UNREACHABLE = 3  # cannot connect to the server
REFUSED = 4  # the server refused (status from OP_REP_*)
NO_DRIVER = 5  # vhci-hcd / usbip-host not loaded, no free port, or no permission

# connect(2) and name lookup failures: the server is not there
_UNREACHABLE_ERRNOS = {
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EHOSTDOWN,
    errno.ENETDOWN,
    errno.ETIMEDOUT,
}


def for_error(exc: BaseException) -> int:
    """The exit code of a command that stopped on ``exc``."""
    import socket

    from ..client.errors import Disconnected, ImportRefused, Timeout, TlsFailed
    from ..protocol.errors import ProtocolError
    from ..vhci.driver import VhciError

    if isinstance(exc, (ImportRefused, TlsFailed)):
        return REFUSED
    if isinstance(exc, VhciError):
        return USAGE if exc.errno == errno.EINVAL else NO_DRIVER
    if isinstance(exc, (Timeout, Disconnected, TimeoutError, ConnectionError, socket.gaierror)):
        return UNREACHABLE  # no answer, hung up, refused: as unreachable as a failed connect
    if isinstance(exc, ProtocolError):
        return FAILURE
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS:
        return UNREACHABLE
    if isinstance(exc, ValueError):
        return USAGE
    return FAILURE


def report(log: logging.Logger, exc: BaseException, host: str | None = None, port: int | None = None) -> int:
    """Log why a command stopped (``host``:``port``: the server it talked to) and return its exit code."""
    code = for_error(exc)
    where = f"{host}:{port}" if host is not None else ""
    if code == UNREACHABLE and where:
        log.error("could not connect to %s: %s", where, exc or "timed out")
    elif isinstance(exc, OSError) and exc.strerror:  # vhci-hcd's, the state file's: no "[Errno N]"
        log.error("%s", exc.strerror)
    elif where and code == FAILURE:
        log.error("%s: %s", where, exc)
    else:
        log.error("%s", exc)
    return code
