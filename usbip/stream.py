"""A non-blocking socket pumped by the asyncio loop for the URB phase.

Reads go straight into the decoder's buffers (``recv_into``), every complete
message of a read is handed over in one call, and everything queued while
handling them leaves in one scatter-gather ``sendmsg`` (header and payload
buffers side by side, no joins). asyncio's own transports copy on
``writelines`` before Python 3.12 and cannot hand the socket to vhci-hcd, so
the server and the client share this small pump instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from .protocol import ProtocolError

log = logging.getLogger(__name__)

IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
HIGH_WATER = 8 * 1024 * 1024  # queued output that pauses reading (a peer that does not read)
LOW_WATER = 1 * 1024 * 1024
READS_PER_WAKEUP = 16


class Stream:
    """Pumps ``sock``: bytes in through ``decoder``, buffers out through ``write``.

    ``on_messages(list)`` gets every complete message of each read;
    ``on_close(exc)`` is called once when the peer closes (exc None), the socket
    fails, or the decoder raises ProtocolError (exc is that error).
    """

    def __init__(
        self,
        sock: socket.socket,
        decoder: Any,
        on_messages: Callable[[list[Any]], None],
        on_close: Callable[[BaseException | None], None],
        loop: asyncio.AbstractEventLoop | None = None,
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
        self._flush_scheduled = False
        self._in_read = False
        self.closed = False
        self.bytes_in = 0
        self.bytes_out = 0
        sock.setblocking(False)

    # ------------------------------------------------------------ reading
    def start(self) -> None:
        if not self.closed and not self._reading:
            self._reading = True
            self.loop.add_reader(self._fd, self._on_readable)

    def _pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self._fd)

    def _on_readable(self) -> None:
        self._in_read = True
        try:
            for _ in range(READS_PER_WAKEUP):
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
                    self.on_messages(msgs)
                    # drop the payload views now, so the decoder can reuse its buffer next read
                    msgs = None
                if self.closed or n < want:
                    break
        finally:
            self._in_read = False
        if not self.closed:
            self.flush()

    # ------------------------------------------------------------ writing
    def write(self, buffers: list[Any], nbytes: int) -> None:
        """Queue buffers (bytes, bytearray, memoryview, pooled buffers) for one sendmsg."""
        if self.closed:
            return
        self._out.extend(buffers)
        self._out_bytes += nbytes
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

    def _send(self) -> None:
        out = self._out
        while self._out_pos < len(out):
            batch = out[self._out_pos : self._out_pos + IOV_MAX]
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.close(exc)
                return
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
            if not self._reading and not self.closed and self._out_bytes <= LOW_WATER:
                self.start()
            return
        if self._out_pos > 4096:
            del out[: self._out_pos]
            self._out_pos = 0
        if not self._writer:
            self._writer = True
            self.loop.add_writer(self._fd, self._send)
        if self._out_bytes > HIGH_WATER:
            self._pause_reading()

    @property
    def queued(self) -> int:
        return self._out_bytes

    # ------------------------------------------------------------ closing
    def detach(self) -> socket.socket:
        """Stop pumping and give the socket back (e.g. to hand it to vhci-hcd)."""
        self._pause_reading()
        if self._writer:
            self._writer = False
            self.loop.remove_writer(self._fd)
        self.closed = True
        return self.sock

    def close(self, exc: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self._pause_reading()
        if self._writer:
            self._writer = False
            self.loop.remove_writer(self._fd)
        self._out.clear()
        self._out_bytes = 0
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass
        self.on_close(exc)
