"""A CDC-ACM serial port bridged to a local pseudo-terminal.

Interface 0 (communications, class 2 subclass 2 protocol 1) with header, call
management, ACM and union functional descriptors and the notification endpoint
0x82 (interrupt IN, 16 bytes; no notifications are sent, URBs just wait).
Interface 1 (data, class 0x0a): bulk IN 0x81 and bulk OUT 0x01. Ids 0525:a4a7
(the Linux serial gadget in CDC-ACM mode).

Bytes the USB host sends on bulk OUT are written to the PTY master; bytes a local
program writes to the PTY slave (``device.pty_path``) are read from the master and
returned on bulk IN URBs. An IN URB waits (cancellable) until there is data; an
OUT URB waits while the PTY's input buffer is full, which gives flow control.
"""

from __future__ import annotations

import asyncio
import os
import struct
import tty

from ..protocol.constants import XFER_BULK, XFER_INT, Speed
from ..usb.ch9 import DIR_IN, RECIP_INTERFACE, TYPE_CLASS
from ..usb.device import Urb
from .descriptors import bulk_max_packet, configuration, endpoint, instance_serial, interface
from .framework import VirtualDevice
from .waiting import WaitQueue

SET_LINE_CODING = 0x20
GET_LINE_CODING = 0x21
SET_CONTROL_LINE_STATE = 0x22
SEND_BREAK = 0x23

CS_INTERFACE = 0x24


class SerialDevice(VirtualDevice):
    def __init__(self, speed: Speed = Speed.HIGH, **kw) -> None:
        super().__init__(
            vendor_id=kw.pop("vendor_id", 0x0525),
            product_id=kw.pop("product_id", 0xA4A7),
            bcd_device=0x0100,
            device_class=0x02,
            manufacturer=kw.pop("manufacturer", "cyusbip"),
            product=kw.pop("product", "Virtual Serial Port"),
            serial=kw.pop("serial", None) or instance_serial("ACM"),
            speed=speed,
            **kw,
        )
        functional = (
            struct.pack("<BBBH", 5, CS_INTERFACE, 0x00, 0x0110)  # header, CDC 1.10
            + bytes((5, CS_INTERFACE, 0x01, 0x00, 1))  # call management: data interface 1
            + bytes((4, CS_INTERFACE, 0x02, 0x06))  # ACM: line coding/state + SEND_BREAK
            + bytes((5, CS_INTERFACE, 0x06, 0, 1))  # union: master 0, slave 1
        )
        mp = bulk_max_packet(self.speed)
        notify_interval = 9 if self.speed >= Speed.HIGH else 32
        self.setup_descriptors(
            [
                configuration(
                    [
                        interface(
                            0,
                            0,
                            0x02,
                            0x02,
                            0x01,
                            [endpoint(0x82, XFER_INT, 16, notify_interval)],
                            name="CDC ACM control",
                            extra=functional,
                        ),
                        interface(
                            1,
                            0,
                            0x0A,
                            0x00,
                            0x00,
                            [endpoint(0x81, XFER_BULK, mp), endpoint(0x01, XFER_BULK, mp)],
                            name="CDC ACM data",
                        ),
                    ],
                    value=1,
                    max_power_ma=100,
                )
            ]
        )
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.pty_path = os.ttyname(self.slave)
        self.line_coding = struct.pack("<IBBB", 115200, 0, 0, 8)  # 115200 8N1
        self.control_lines = 0  # bit 0 DTR, bit 1 RTS
        self.breaks = 0
        self._in_wait = WaitQueue(self)
        self._out_wait = WaitQueue(self)
        self._notify_wait = WaitQueue(self)
        self._reader: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.AbstractEventLoop | None = None
        self.on_endpoint(0x81, self._bulk_in)
        self.on_endpoint(0x01, self._bulk_out)
        self.on_endpoint(0x82, self._notify_wait.park)

    @property
    def dtr(self) -> bool:
        return bool(self.control_lines & 1)

    @property
    def baudrate(self) -> int:
        return struct.unpack_from("<I", self.line_coding)[0]

    # ------------------------------------------------------------ host -> pty
    def _bulk_out(self, urb: Urb) -> None:
        # How much of a parked OUT URB reached the PTY is kept on the URB itself (``urb.context``),
        # not in a table of the device: a cancelled URB then leaves nothing behind (a table entry
        # would keep the URB, its session and the session's receive buffer alive for good).
        if len(self._out_wait) == 0:
            n = urb.transfer_buffer_length
            done = self._write(urb, 0)
            if done >= n:
                urb.complete(0, n)
                return
            urb.context = done
        else:
            urb.context = 0
        self._out_wait.park(urb)
        if self._writer is None:
            self._writer = asyncio.get_running_loop()
            self._writer.add_writer(self.master, self._on_writable)

    def _write(self, urb: Urb, start: int) -> int:
        n = urb.transfer_buffer_length
        done = start
        with memoryview(urb.buffer) as mv:
            while done < n:
                try:
                    done += os.write(self.master, mv[done:n])
                except (BlockingIOError, InterruptedError):
                    break
        return done

    def _on_writable(self) -> None:
        while True:
            urb = self._out_wait.pop()
            if urb is None:
                break
            start = urb.context if isinstance(urb.context, int) else 0
            done = self._write(urb, start)
            if done < urb.transfer_buffer_length:
                urb.context = done
                self._out_wait.push_front(urb)
                return
            urb.context = None
            urb.complete(0, urb.transfer_buffer_length)
        if self._writer is not None:
            self._writer.remove_writer(self.master)
            self._writer = None

    # ------------------------------------------------------------ pty -> host
    def _read(self, urb: Urb) -> int | None:
        n = urb.transfer_buffer_length
        if n == 0:
            return 0
        try:
            with memoryview(urb.buffer) as mv:
                return os.readv(self.master, [mv[:n]])
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:  # EIO: no slave open (cannot happen while we hold one)
            return None

    def _bulk_in(self, urb: Urb) -> None:
        if len(self._in_wait) == 0:
            got = self._read(urb)
            if got is not None:
                urb.complete(0, got)
                return
        self._in_wait.park(urb)
        if self._reader is None:
            self._reader = asyncio.get_running_loop()
            self._reader.add_reader(self.master, self._on_readable)

    def _on_readable(self) -> None:
        while True:
            urb = self._in_wait.pop()
            if urb is None:
                break
            got = self._read(urb)
            if got is None:
                self._in_wait.push_front(urb)
                return
            urb.complete(0, got)
        if self._reader is not None:  # nobody waits: let the PTY buffer hold the data
            self._reader.remove_reader(self.master)
            self._reader = None

    # ------------------------------------------------------------ class requests
    def control_request(self, urb: Urb, request_type: int, request: int, value: int, index: int, length: int):
        if request_type & 0x7F != TYPE_CLASS | RECIP_INTERFACE or index != 0:
            return None
        if request_type & DIR_IN:
            return self.line_coding if request == GET_LINE_CODING else None
        if request == SET_LINE_CODING:
            if length < 7 or len(urb.buffer) < 7:
                return None
            self.line_coding = bytes(memoryview(urb.buffer)[:7])
            return True
        if request == SET_CONTROL_LINE_STATE:
            self.control_lines = value & 3
            return True
        if request == SEND_BREAK:
            self.breaks += 1
            return True
        return None

    # ------------------------------------------------------------ lifecycle
    def _unregister(self) -> None:
        if self._reader is not None:
            self._reader.remove_reader(self.master)
            self._reader = None
        if self._writer is not None:
            self._writer.remove_writer(self.master)
            self._writer = None

    async def close(self) -> None:
        self.abort_all()
        self._unregister()
        await super().close()

    def describe(self) -> str:
        return f"PTY {self.pty_path}"

    def release(self) -> None:
        """Close the PTY (the device cannot be used afterwards)."""
        self.abort_all()
        self._unregister()
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1
