"""Encrypted vhci imports: a relay process between vhci-hcd and a TLS connection.

vhci-hcd sends and receives on the socket it is given with the kernel's own
``kernel_sendmsg``/``kernel_recvmsg`` (drivers/usb/usbip/vhci_tx.c, usbip_common.c:
usbip_recv). We give it one end of a local stream socket pair (vhci_sysfs.c only asks
for SOCK_STREAM) and a process of ours pumps the other end through the TLS session that
did the import: plaintext to vhci, TLS records to the server.

Why not kernel TLS (TCP_ULP "tls" with TLS_TX/TLS_RX): Python's ``ssl`` does not hand
out the traffic keys (only through a key log file), and on a kTLS receive socket a
record that is not application data (TLS 1.3 NewSessionTicket, KeyUpdate) makes a plain
``recvmsg`` without a control buffer fail with -EIO (net/tls/tls_sw.c), which vhci's
receive loop takes as a broken connection: the device would be detached at the first
session ticket. The relay costs a copy through a local socket and a process; it works
with any TLS peer (our usbipd, stunnel in front of the kernel's usbipd).

The relay lives exactly as long as the attachment: ``usbip detach`` makes vhci shut its
end down, the relay sees EOF, sends close_notify and exits; when the TLS connection
drops, the relay shuts vhci's end down and vhci detaches the port, as on a network loss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..net.tls import TlsChannel

# ssl is imported by the relay's methods (a TLS import has it loaded already): `usbip port`,
# `detach` and a plain `attach` import this module without needing it

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
PROCESS_NAME = "usbip-relay"  # what relays call themselves (prctl PR_SET_NAME, at most 15 bytes)
HIGH_WATER = 4 * 1024 * 1024  # bytes waiting for one side before the relay stops reading the other


class Relay:
    """Pumps plaintext between ``local`` (vhci's peer) and the TLS session ``channel``."""

    def __init__(self, local: socket.socket, channel: TlsChannel) -> None:
        self.local = local
        self.remote = channel.sock
        self.tls = channel.tls
        self.incoming = channel.incoming
        self.outgoing = channel.outgoing
        self.to_local = bytearray()
        self.to_remote = bytearray()
        self.local_eof = False
        self.bytes_up = 0  # vhci -> server (plaintext)
        self.bytes_down = 0

    def _pull_records(self) -> None:
        if self.outgoing.pending:
            self.to_remote += self.outgoing.read()

    def _decrypt(self) -> bool:
        """Move every plaintext byte TLS holds towards vhci; False when the server closed."""
        import ssl

        while True:
            try:
                data = self.tls.read(CHUNK)
            except ssl.SSLWantReadError:
                self._pull_records()
                return True
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return False
            if not data:
                return False
            self.to_local += data
            self.bytes_down += len(data)

    def run(self) -> str:
        """Pump until one side ends; returns why."""
        import ssl

        self.local.setblocking(False)
        self.remote.setblocking(False)
        sel = selectors.DefaultSelector()
        try:
            if not self._decrypt():  # plaintext that came with the import reply
                return "server closed the TLS stream"
            while True:
                if self.local_eof and not self.to_remote:
                    return "vhci closed its end (detached)"
                want_local = 0
                if not self.local_eof and len(self.to_remote) < HIGH_WATER:
                    want_local |= selectors.EVENT_READ
                if self.to_local:
                    want_local |= selectors.EVENT_WRITE
                want_remote = selectors.EVENT_READ if len(self.to_local) < HIGH_WATER else 0
                if self.to_remote:
                    want_remote |= selectors.EVENT_WRITE
                _watch(sel, self.local, want_local)
                _watch(sel, self.remote, want_remote)
                for key, events in sel.select():
                    why = self._ready(key.fileobj, events)  # type: ignore[arg-type]
                    if why:
                        return why
        except ssl.SSLError as exc:
            return f"TLS error: {exc.reason or exc}"
        except OSError as exc:
            return f"connection error: {exc}"
        finally:
            sel.close()

    def _ready(self, sock: socket.socket, events: int) -> str | None:
        import ssl

        try:
            if sock is self.remote and events & selectors.EVENT_READ:
                data = self.remote.recv(CHUNK)
                if not data:
                    return "server closed the connection"
                self.incoming.write(data)
                if not self._decrypt():
                    return "server closed the TLS stream"
            if sock is self.local and events & selectors.EVENT_READ:
                data = self.local.recv(CHUNK)
                if not data:
                    self.local_eof = True
                    with contextlib.suppress(ssl.SSLError):
                        self.tls.unwrap()  # close_notify
                else:
                    self.bytes_up += len(data)
                    self.tls.write(data)
                self._pull_records()
            if sock is self.local and events & selectors.EVENT_WRITE and self.to_local:
                del self.to_local[: self.local.send(self.to_local)]
            if sock is self.remote and events & selectors.EVENT_WRITE and self.to_remote:
                del self.to_remote[: self.remote.send(self.to_remote)]
        except (BlockingIOError, InterruptedError):
            pass
        return None


def _watch(sel: selectors.BaseSelector, sock: socket.socket, events: int) -> None:
    """Watch ``sock`` for ``events`` (none: not at all)."""
    try:
        key = sel.get_key(sock)
    except KeyError:
        if events:
            sel.register(sock, events)
        return
    if not events:
        sel.unregister(sock)
    elif key.events != events:
        sel.modify(sock, events)


def start(channel: TlsChannel, log_path: str | None = None) -> tuple[socket.socket, int]:
    """Fork the relay for ``channel``; return (the socket to give vhci-hcd, the relay's pid).

    The child owns the TLS session from here on (the parent must not use ``channel``
    again); it detaches from the terminal and outlives the ``usbip attach`` command.
    """
    vhci_end, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child (exercised by the tests through the process)
        code = 1
        try:
            os.close(r)
            vhci_end.close()
            _close_fds_except({0, 1, 2, w, relay_end.fileno(), channel.sock.fileno()})
            os.setsid()
            if os.fork() > 0:
                os._exit(0)
            _name_process()
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            _redirect_output(log_path)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            relay = Relay(relay_end, channel)
            why = relay.run()
            _say(f"{why} ({relay.bytes_up} bytes up, {relay.bytes_down} down)")
            with contextlib.suppress(OSError):
                relay_end.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                channel.sock.close()
            code = 0
        except BaseException:
            _say(traceback.format_exc())
        finally:
            os._exit(code)
    os.close(w)
    relay_end.close()
    channel.sock.close()
    os.waitpid(pid, 0)  # the intermediate child exits at once; the relay is reparented
    with os.fdopen(r) as f:
        text = f.read().strip()
    if not text:
        vhci_end.close()
        raise OSError("the TLS relay process did not start")
    return vhci_end, int(text)


def _close_fds_except(keep: set[int]) -> None:  # pragma: no cover - in the child
    """Drop every descriptor inherited from the attaching process but ours (its other sockets
    must not be held open by a process that outlives it)."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _say(text: str) -> None:  # pragma: no cover - in the child
    """One line to the relay's log (fd 2 itself: sys.stderr may be someone else's object after a fork)."""
    with contextlib.suppress(OSError):
        os.write(2, f"usbip relay[{os.getpid()}]: {text}\n".encode())


def _redirect_output(log_path: str | None) -> None:  # pragma: no cover - in the child
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log_path else null
    os.dup2(out, 1)
    os.dup2(out, 2)


def _name_process() -> None:  # pragma: no cover - in the child
    """Call the process PROCESS_NAME (``ps``, /proc/PID/comm): :func:`stop` checks it."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(PROCESS_NAME.encode()), 0, 0, 0)  # PR_SET_NAME


def is_relay(pid: int) -> bool | None:
    """Whether ``pid`` is a relay (its name is PROCESS_NAME); None when that cannot be told."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == PROCESS_NAME
    except FileNotFoundError:
        return False if os.path.isdir("/proc/self") else None
    except OSError:
        return None


def stop(pid: int) -> None:
    """End a relay (after the detach, when it did not notice by itself).

    The pid comes from a port record that may be stale (vhci drops a port by itself when
    the server goes away) and the number reused since: only a process named PROCESS_NAME
    is signalled."""
    if is_relay(pid) is False:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)


__all__ = ["PROCESS_NAME", "Relay", "is_relay", "start", "stop"]
