"""A non-blocking socket pumped by the asyncio loop for the URB phase.

Reads go straight into the decoder's buffers (``recv_into``), every complete
message of a read is handed over in one call, and everything queued while
handling them leaves in one scatter-gather ``sendmsg`` (header and payload
buffers side by side, no joins). asyncio's own transports copy on
``writelines`` before Python 3.12 and cannot hand the socket to vhci-hcd, so
the server and the client share this small pump instead.

This file runs as it is (``usbip.net.pump``: the fallback when the extension is missing or
``USBIP_NO_EXTENSIONS=1``), and Cython compiles it, augmented by ``_pump.pxd``, into
``usbip.net._pump``; ``usbip.net.stream`` picks one at import.
"""

from __future__ import annotations

try:
    import cython
except ImportError:  # Cython is only needed to build: plain Python sees compiled == False
    from ..protocol import _cython_shim as cython  # type: ignore[no-redef,unused-ignore]


import asyncio
import logging
import os
import select
import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol

from ..protocol import ProtocolError

if cython.compiled:  # one sendmsg(2) of the queued buffers in C (socket.sendmsg parses each one)
    from cython.cimports.usbip.net._sock import send_buffers  # type: ignore[import-not-found,unused-ignore]

log = logging.getLogger("usbip.net.stream")  # the public module's name, whichever build runs

IMPLEMENTATION = "cython" if cython.compiled else "python"


class TlsSession(Protocol):
    """What the Stream needs of a TLS session set up in the op phase (``usbip.net.tls.TlsChannel``)."""

    tls: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO


IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
READS_PER_WAKEUP = 16
HANGUP_CHECK_INTERVAL = 0.5  # seconds between checks for a peer that closed while reading is paused
# a FIN is only seen by reading; while reading is paused, poll() tells it (POLLRDHUP: Linux)
_HANGUP_EVENTS = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR

# why reading is paused (a bit each; reading runs when none is set)
PAUSED_OUTPUT = 1  # more than high_water bytes queued for a peer that does not read
PAUSED_CONSUMER = 2  # the consumer asked (e.g. the server's per-connection memory budget is spent)
TLS_DIRECT_WRITE = 16 * 1024  # TLS: buffers this large are encrypted as they are, smaller ones joined
TLS_OUT_CHUNK = 64 * 1024  # TLS: records are taken out of the BIO in pieces of this size
PAUSED_ADMIT = 4  # the consumer has not admitted the large body the decoder waits for yet
ADMIT_THRESHOLD = 64 * 1024  # bodies this large are admitted (``admit``) before their buffer exists


class Stream:
    """Pumps ``sock``: bytes in through ``decoder``, buffers out through ``write``.

    ``on_messages(list)`` gets every complete message of each read;
    ``on_close(exc)`` is called once when the peer closes (exc None), the socket
    fails, or the decoder raises ProtocolError (exc is that error).

    Flow control, for a server facing peers it does not trust: with ``high_water``
    set, reading pauses while more than that many bytes wait for the peer and
    resumes below ``high_water // 8``; the consumer can pause reading too
    (:meth:`pause_reading` / :meth:`resume_reading`) and hears through
    ``on_drain`` whenever queued output shrinks. With ``admit`` set, a message
    body of ADMIT_THRESHOLD bytes or more is read only once ``admit(size)``
    returns True (before the decoder allocates its buffer); until then reading
    waits, and the consumer calls :meth:`readmit` when it has room again.
    With ``stall_timeout`` set, a peer that leaves queued output unsent (no
    byte accepted by the socket) for that many seconds is dropped with
    :class:`TimeoutError`. A client leaves both unset: pausing its reads
    because its own writes block could deadlock with a server doing the same.
    """

    def __init__(
        self,
        sock: socket.socket,
        decoder: Any,
        on_messages: Callable[[list[Any]], None],
        on_close: Callable[[BaseException | None], None],
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        high_water: int | None = None,
        stall_timeout: float | None = None,
        on_drain: Callable[[], None] | None = None,
        admit: Callable[[int], bool] | None = None,
        tls: TlsSession | None = None,
    ) -> None:
        self.sock = sock
        self.decoder = decoder
        self.on_messages = on_messages
        self.on_close = on_close
        self.loop = loop or asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._out: list[Any] = []
        self._out_pos = 0
        self._out_bytes = 0
        self._writer = False
        self._reading = False
        self._started = False
        self._paused = 0
        self.high_water = high_water
        self.low_water = 0 if high_water is None else high_water // 8
        self.stall_timeout = stall_timeout
        self.on_drain = on_drain
        self.admit = admit
        self._admitted = False  # the body the decoder waits for was admitted
        self.tls = tls
        self._plain: list[Any] = []  # TLS: replies not encrypted yet (one TLS write per batch)
        self._plain_bytes = 0
        self._raw = bytearray(256 * 1024) if tls is not None else bytearray()
        self._stall_timer: asyncio.TimerHandle | None = None
        self._hangup_timer: asyncio.TimerHandle | None = None
        self._last_progress = 0.0
        self._flush_scheduled = False
        self._in_read = False
        self.closed = False
        self.bytes_in = 0
        self.bytes_out = 0
        sock.setblocking(False)

    # ------------------------------------------------------------ reading
    def start(self) -> None:
        self._started = True
        self._update_reading()

    def pause_reading(self) -> None:
        """Stop reading until :meth:`resume_reading` (the consumer's own backpressure)."""
        self._paused |= PAUSED_CONSUMER
        self._update_reading()

    def resume_reading(self) -> None:
        self._paused &= ~PAUSED_CONSUMER
        self._update_reading()

    @property
    def reading(self) -> bool:
        return self._reading

    def _update_reading(self) -> None:
        want = self._started and not self.closed and not self._paused
        if want and not self._reading:
            self._reading = True
            self.loop.add_reader(self._fd, self._on_readable)
            if self.tls is not None and (self.tls.incoming.pending or self.tls.tls.pending()):
                # bytes already read from the socket wait inside TLS: the fd will not wake us for them
                self.loop.call_soon(self._on_readable)
        elif not want and self._reading:
            self._reading = False
            self.loop.remove_reader(self._fd)
        if self._paused and not self.closed and self._hangup_timer is None:
            self._hangup_timer = self.loop.call_later(HANGUP_CHECK_INTERVAL, self._check_hangup)
        elif (not self._paused or self.closed) and self._hangup_timer is not None:
            self._hangup_timer.cancel()
            self._hangup_timer = None

    def _check_hangup(self) -> None:
        """While reading is paused, notice a peer that closed or reset (it would never be read)."""
        self._hangup_timer = None
        if self.closed or not self._paused:
            return
        poller = select.poll()
        poller.register(self._fd, _HANGUP_EVENTS)
        events = poller.poll(0)
        if events and events[0][1] & _HANGUP_EVENTS:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.close(OSError(err, os.strerror(err)) if err else None)
            return
        self._hangup_timer = self.loop.call_later(HANGUP_CHECK_INTERVAL, self._check_hangup)

    def _on_readable(self) -> None:
        if self.tls is not None:
            self._on_readable_tls()
            return
        self._in_read = True
        try:
            for _ in range(READS_PER_WAKEUP):
                if self.admit is not None and not self._admit_body():
                    break
                buf = self.decoder.get_buffer(-1)
                want = len(buf)
                try:
                    n = self.sock.recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self.close(exc)
                    return
                finally:
                    del buf
                if n == 0:
                    self.close(None)
                    return
                self.bytes_in += n
                try:
                    msgs = self.decoder.buffer_updated(n)
                except ProtocolError as exc:
                    self.close(exc)
                    return
                if msgs:
                    self._admitted = False  # the message waiting for its body was the first of these
                    self.on_messages(msgs)
                    # drop the payload views now, so the decoder can reuse its buffer next read
                    msgs = None
                if self.closed or n < want or not self._reading:
                    break
        finally:
            self._in_read = False
        if not self.closed:
            self.flush()

    def _on_readable_tls(self) -> None:
        """TLS: ciphertext off the socket into the incoming BIO, plaintext into the decoder's buffers."""
        if self.closed or not self._reading:
            return
        assert self.tls is not None
        incoming = self.tls.incoming
        raw = memoryview(self._raw)
        self._in_read = True
        try:
            # bytes read earlier (the op phase, or before a pause) wait inside TLS
            if (incoming.pending or self.tls.tls.pending()) and (not self._decrypt() or not self._reading):
                return
            for _ in range(READS_PER_WAKEUP):
                try:
                    n = self.sock.recv_into(raw)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self.close(exc)
                    return
                if n == 0:
                    incoming.write_eof()
                    self._decrypt()
                    self.close(None)
                    return
                self.bytes_in += n
                incoming.write(raw[:n])
                # decrypt every read at once: nothing stays in the BIO for a wakeup that never comes
                if not self._decrypt() or not self._reading or n < len(raw):
                    break
        finally:
            self._in_read = False
        if not self.closed:
            self.flush()

    def _decrypt(self) -> bool:
        """Hand every whole message TLS holds to the consumer; False once the stream closed."""
        assert self.tls is not None
        tls = self.tls.tls
        while not self.closed and self._reading:
            if self.admit is not None and not self._admit_body():
                return True
            buf = self.decoder.get_buffer(-1)
            try:
                n = tls.read(len(buf), buf)
            except ssl.SSLWantReadError:
                return True
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.close(None)
                return False
            except ssl.SSLError as exc:
                self.close(ConnectionError(f"TLS stream broken: {exc.reason or exc}"))
                return False
            finally:
                del buf
            if n == 0:
                self.close(None)
                return False
            try:
                msgs = self.decoder.buffer_updated(n)
            except ProtocolError as exc:
                self.close(exc)
                return False
            if msgs:
                self._admitted = False
                self.on_messages(msgs)
                msgs = None
        return not self.closed

    def _admit_body(self) -> bool:
        if self._admitted:
            return True
        need = self.decoder.pending_body
        if need < ADMIT_THRESHOLD:
            return True
        assert self.admit is not None
        if self.admit(need):
            self._admitted = True
            return True
        self._paused |= PAUSED_ADMIT
        self._update_reading()
        return False

    def readmit(self) -> None:
        """The consumer has room again: ask ``admit`` once more for the waiting body."""
        if self._paused & PAUSED_ADMIT and not self.closed:
            assert self.admit is not None
            if self.admit(self.decoder.pending_body):
                self._admitted = True
                self._paused &= ~PAUSED_ADMIT
                self._update_reading()

    # ------------------------------------------------------------ writing
    def write(self, buffers: list[Any], nbytes: int) -> None:
        """Queue buffers (bytes, bytearray, memoryview, pooled buffers) for one sendmsg."""
        if self.closed:
            return
        if self.tls is not None:
            self._plain.extend(buffers)
            self._plain_bytes += nbytes
        else:
            self._out.extend(buffers)
        self._out_bytes += nbytes
        if self.high_water is not None and self._out_bytes > self.high_water and not self._paused & PAUSED_OUTPUT:
            self._paused |= PAUSED_OUTPUT
            self._update_reading()
        if not self._in_read and not self._flush_scheduled and not self._writer:
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        if self.closed or self._writer:
            return
        self._send()

    def _encrypt(self) -> None:
        """TLS: the queued replies as TLS records appended to the ciphertext to send.

        Large buffers go to TLS as they are and small ones are joined in runs, and the records
        are taken out in TLS_OUT_CHUNK pieces: no half-megabyte join or read per batch, whose
        allocations (mmap/munmap, page faults) cost more than the encryption itself.
        """
        assert self.tls is not None
        nbytes = 0
        if self._plain:
            plain = self._plain
            self._plain = []
            nbytes = self._plain_bytes
            self._plain_bytes = 0
            write = self.tls.tls.write
            run: list[Any] = []
            try:
                for item in plain:
                    if (item.nbytes if isinstance(item, memoryview) else len(item)) >= TLS_DIRECT_WRITE:
                        if run:
                            write(run[0] if len(run) == 1 else b"".join(run))
                            run = []
                        write(item)
                    else:
                        run.append(item)
                if run:
                    write(run[0] if len(run) == 1 else b"".join(run))
            except ssl.SSLError as exc:
                self.close(ConnectionError(f"TLS stream broken: {exc.reason or exc}"))
                return
        outgoing = self.tls.outgoing
        produced = 0
        while outgoing.pending:
            records = outgoing.read(TLS_OUT_CHUNK)
            self._out.append(records)
            produced += len(records)
        self._out_bytes += produced - nbytes

    def _send(self) -> None:
        if self.tls is not None:
            self._encrypt()
            if self.closed:
                return
        out = self._out
        progress = False
        while self._out_pos < len(out):
            end = min(len(out), self._out_pos + IOV_MAX)
            try:
                if cython.compiled:
                    sent = send_buffers(self._fd, out, self._out_pos, end)
                    if sent < 0:  # would block, or interrupted
                        break
                else:
                    sent = self.sock.sendmsg(out[self._out_pos : end])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.close(exc)
                return
            progress = True
            self.bytes_out += sent
            self._out_bytes -= sent
            pos = self._out_pos
            while sent:
                item = out[pos]
                size = item.nbytes if isinstance(item, memoryview) else len(item)
                if sent >= size:
                    sent -= size
                    out[pos] = None
                    pos += 1
                else:
                    out[pos] = memoryview(item).cast("B")[sent:]
                    sent = 0
            self._out_pos = pos
        if self._out_pos >= len(out):
            out.clear()
            self._out_pos = 0
            if self._writer:
                self._writer = False
                self.loop.remove_writer(self._fd)
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
        else:
            if self._out_pos > 4096:
                del out[: self._out_pos]
                self._out_pos = 0
            if not self._writer:
                self._writer = True
                self.loop.add_writer(self._fd, self._send)
            if self.stall_timeout is not None:
                if progress or self._stall_timer is None:
                    self._last_progress = self.loop.time()
                if self._stall_timer is None:
                    self._stall_timer = self.loop.call_later(self.stall_timeout, self._check_stall)
        if self._paused & PAUSED_OUTPUT and self._out_bytes <= self.low_water:
            self._paused &= ~PAUSED_OUTPUT
            self._update_reading()
        if progress and self.on_drain is not None:
            self.on_drain()

    def _check_stall(self) -> None:
        self._stall_timer = None
        if self.closed or not self._writer:
            return
        assert self.stall_timeout is not None
        idle = self.loop.time() - self._last_progress
        if idle >= self.stall_timeout:
            self.close(TimeoutError(f"peer left {self._out_bytes} bytes of replies unread for {idle:.0f} s"))
        else:
            self._stall_timer = self.loop.call_later(self.stall_timeout - idle, self._check_stall)

    @property
    def queued(self) -> int:
        return self._out_bytes

    def queued_bytes(self) -> int:
        """:attr:`queued` as a method: the server session's ``queued`` callback (one call per URB)."""
        return self._out_bytes

    # ------------------------------------------------------------ closing
    def detach(self) -> socket.socket:
        """Stop pumping and give the socket back (e.g. to hand it to vhci-hcd)."""
        self._stop()
        return self.sock

    def _stop(self) -> None:
        self.closed = True
        self._update_reading()
        if self._writer:
            self._writer = False
            self.loop.remove_writer(self._fd)
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def close(self, exc: BaseException | None = None) -> None:
        if self.closed:
            return
        self._stop()
        self._out.clear()
        self._plain.clear()
        self._out_bytes = 0
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass
        self.on_close(exc)
