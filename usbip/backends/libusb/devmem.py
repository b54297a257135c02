"""OUT data staged in usbfs' own memory (``libusb_dev_mem_alloc``), which usbfs does not copy.

usbfs copies an URB's data between user and kernel memory on every SUBMITURB (a ``kmalloc``'d
bounce buffer, ``copy_from_user`` for OUT, ``copy_to_user`` when an IN URB is reaped), unless the
user buffer lies in a region mmap()ed from the usbfs node: ``proc_do_submiturb`` then points the
URB at that memory (``find_memory_area``, drivers/usb/core/devio.c, Linux >= 4.6).
``libusb_dev_mem_alloc`` (libusb >= 1.0.21) is that mmap. Each OUT transfer kept for reuse gets
one region (sized for the largest payload it carried, up to :data:`REGION_MAX`); the payload is
copied into it (one ``memcpy`` in user space where usbfs did a kmalloc + ``copy_from_user``).

IN transfers keep the URB's own buffer: the data would still have to reach the URB's buffer (one
copy in user space instead of usbfs' ``copy_to_user``), and measured in the kernel-test guest the
SUBMITURB ioctl of a 16 KiB IN transfer cost the same with and without a region (README, "libusb
export vs usbip-host").

Bounded: regions of one device handle add up to at most :data:`BUDGET` (usbfs counts them in its
``usbfs_memory_mb`` limit, shared with every URB in flight on the machine); a transfer whose
payload does not fit its region, or that finds the budget spent, goes the copying way. When the
mmap fails once (no usbfs mmap, out of usbfs memory), the handle stops asking. Regions are freed
with their transfer or, at the latest, before the handle closes (:meth:`DevMem.close`): usbfs
keeps a region an URB still uses until that URB completes (``usbm->urb_use_count``), so freeing
under a transfer in flight is safe.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

#: the largest region one transfer gets (larger payloads are copied by usbfs as before)
REGION_MAX = 64 * 1024
#: regions of one device handle, in total
BUDGET = 1024 * 1024
#: regions are whole pages (mmap)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Region:
    """One mmap()ed usbfs region: its address, size, and a writable view of it."""

    __slots__ = ("address", "owner", "size", "view")

    def __init__(self, owner: DevMem, address: int, size: int) -> None:
        self.owner = owner
        self.address = address
        self.size = size
        self.view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")


class DevMem:
    """The usbfs regions of one open device handle (loop thread only)."""

    def __init__(self, lib: Any, raw_handle: Any, budget: int = BUDGET) -> None:
        self._alloc = lib.libusb_dev_mem_alloc
        self._alloc.restype = ctypes.c_void_p
        self._alloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._free = lib.libusb_dev_mem_free
        self._free.restype = ctypes.c_int
        self._free.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        self._handle = raw_handle
        self.budget = budget
        self.used = 0
        self.available = True
        self.regions: set[Region] = set()

    @classmethod
    def for_handle(cls, handle: Any) -> DevMem | None:
        """Regions for a python-libusb1 handle, or None (not python-libusb1's, or a libusb
        without ``libusb_dev_mem_alloc``)."""
        if os.environ.get("USBIP_LIBUSB_NO_DEVMEM"):
            return None
        raw = getattr(handle, "_USBDeviceHandle__handle", None)
        if raw is None:
            return None
        try:
            from usb1 import _libusb1

            lib = _libusb1.libusb
            lib.libusb_dev_mem_alloc  # noqa: B018  (AttributeError: libusb < 1.0.21)
            return cls(lib, raw)
        except (ImportError, AttributeError) as exc:
            log.debug("libusb_dev_mem_alloc unavailable: %s", exc)
            return None

    def alloc(self, n: int) -> Region | None:
        """A region for ``n`` bytes (0 < n <= REGION_MAX), or None (over budget, mmap refused)."""
        if not self.available or n > REGION_MAX:
            return None
        size = -(-n // PAGE) * PAGE
        if self.used + size > self.budget:
            return None
        address = self._alloc(self._handle, size)
        if not address:
            # libusb logs the mmap's errno; this handle will not get one later either
            log.info("usbfs memory (libusb_dev_mem_alloc) unavailable: OUT data is copied by usbfs")
            self.available = False
            return None
        region = Region(self, address, size)
        self.regions.add(region)
        self.used += size
        return region

    def free(self, region: Region) -> None:
        if region not in self.regions:
            return
        self.regions.discard(region)
        self.used -= region.size
        size, region.size = region.size, 0  # never written again (stage() reallocates)
        try:
            region.view.release()
        except (BufferError, ValueError):  # still viewed: munmap anyway, the view is ours alone
            pass
        self._free(self._handle, region.address, size)

    def close(self) -> None:
        """Free every region (before the handle closes); later allocations fail."""
        self.available = False
        for region in list(self.regions):
            self.free(region)


def stage(transfer: Any, devmem: DevMem | None, data: Any, n: int) -> bool:
    """Point a (not submitted) OUT transfer at its usbfs region holding ``data[:n]``; False when
    it has none and gets none (the caller hands usbfs the data to copy)."""
    if devmem is None or not n:
        return False
    try:
        raw = transfer._USBTransfer__transfer
    except AttributeError:  # the unit tests' fakes
        return False
    region: Region | None = getattr(transfer, "usbip_region", None)
    if region is None or region.size < n or region.owner is not devmem:
        if region is not None:
            release(transfer)
        region = devmem.alloc(n)
        if region is None:
            return False
        transfer.usbip_region = region
    region.view[:n] = data[:n] if len(data) != n else data
    c = raw.contents
    c.buffer = region.address
    c.length = n
    transfer.usbip_view = None
    return True


def release(transfer: Any) -> None:
    """Free the transfer's region, if it has one (the transfer is being closed, or outgrew it)."""
    region: Region | None = getattr(transfer, "usbip_region", None)
    if region is not None:
        transfer.usbip_region = None
        region.owner.free(region)
