"""The one map from errors to exit codes (usbip/cli/exitcodes.py), and what it logs."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import pytest

from usbip.cli import exitcodes
from usbip.client.errors import Disconnected, ImportRefused, Timeout, TlsFailed, UsbipError
from usbip.protocol.errors import ProtocolError
from usbip.vhci.driver import VhciError


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ImportRefused("1-1", 1), exitcodes.REFUSED),
        (TlsFailed("bad certificate"), exitcodes.REFUSED),
        (VhciError(errno.ENODEV, "vhci-hcd is not loaded"), exitcodes.NO_DRIVER),
        (VhciError(errno.EBUSY, "no free port"), exitcodes.NO_DRIVER),
        (VhciError(errno.EINVAL, "invalid port 9"), exitcodes.USAGE),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), exitcodes.UNREACHABLE),
        (socket.gaierror(socket.EAI_NONAME, "no such host"), exitcodes.UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "no route"), exitcodes.UNREACHABLE),
        (asyncio.TimeoutError(), exitcodes.UNREACHABLE),
        (Timeout("no answer"), exitcodes.UNREACHABLE),
        (Disconnected("hung up"), exitcodes.UNREACHABLE),
        (ProtocolError("bad reply"), exitcodes.FAILURE),
        (UsbipError("something"), exitcodes.FAILURE),
        (OSError(errno.EACCES, "permission denied"), exitcodes.FAILURE),
        (ValueError("bad spec"), exitcodes.USAGE),
    ],
)
def test_for_error(exc: BaseException, code: int) -> None:
    assert exitcodes.for_error(exc) == code


def test_report_logs_what_a_user_reads(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("usbip.test")
    with caplog.at_level(logging.ERROR, "usbip.test"):
        assert exitcodes.report(log, ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "h", 1) == 3
        assert exitcodes.report(log, VhciError(errno.ENODEV, "vhci-hcd is not loaded"), "h", 1) == 5
        assert exitcodes.report(log, ProtocolError("bad reply"), "h", 1) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "could not connect to h:1: [Errno 111] refused",
        "vhci-hcd is not loaded",
        "h:1: bad reply",
    ]
