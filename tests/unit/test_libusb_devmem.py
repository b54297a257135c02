"""OUT data staged in usbfs regions (devmem.py), against a faked libusb_dev_mem_alloc/free."""

from __future__ import annotations

import ctypes

import pytest

from usbip.backends.libusb import devmem as dm
from usbip.backends.libusb import transfers as tp


class FakeFn:
    def __init__(self, fn):
        self.fn = fn
        self.restype = None
        self.argtypes = None

    def __call__(self, *args):
        return self.fn(*args)


class FakeLib:
    """libusb_dev_mem_alloc / _free over ctypes arrays; ``fail`` makes the next alloc return NULL."""

    def __init__(self):
        self.live: dict[int, ctypes.Array] = {}
        self.freed: list[tuple[int, int]] = []
        self.fail = False
        self.libusb_dev_mem_alloc = FakeFn(self._alloc)
        self.libusb_dev_mem_free = FakeFn(self._free)

    def _alloc(self, handle, size):
        assert handle == "raw"
        if self.fail:
            return None
        arr = (ctypes.c_char * size)()
        self.live[ctypes.addressof(arr)] = arr
        return ctypes.addressof(arr)

    def _free(self, handle, address, size):
        assert handle == "raw" and len(self.live.pop(address)) == size
        self.freed.append((address, size))
        return 0


@pytest.fixture
def usb_transfer():
    usb1 = pytest.importorskip("usb1")
    ctx = usb1.USBContext()
    ctx.open()
    fin = usb1._LibUSB1Finalizer()
    made = []

    def make():
        t = usb1.USBTransfer(ctx, None, 0, lambda t: None, lambda t: None, fin._getFinalizer, False, False)
        t.setBulk(0x02, tp.SETUP_BUFFER)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()
    ctx.close()


def test_out_data_goes_to_the_transfers_region_and_the_region_is_reused(usb_transfer):
    lib = FakeLib()
    mem = dm.DevMem(lib, "raw")
    t = usb_transfer()
    assert dm.stage(t, mem, memoryview(b"abcdefgh"), 5)
    c = t._USBTransfer__transfer.contents
    region = t.usbip_region
    assert c.buffer == region.address and c.length == 5 and region.size == dm.PAGE
    assert ctypes.string_at(region.address, 5) == b"abcde" and t.usbip_view is None
    assert dm.stage(t, mem, b"xyz", 3)  # same region
    assert t.usbip_region is region and ctypes.string_at(c.buffer, 3) == b"xyz" and c.length == 3
    assert len(lib.live) == 1 and mem.used == dm.PAGE
    big = bytes(range(256)) * (dm.PAGE // 128)  # two pages: a new region, the old one freed
    assert dm.stage(t, mem, big, len(big))
    assert t.usbip_region is not region and lib.freed == [(region.address, dm.PAGE)]
    assert ctypes.string_at(c.buffer, len(big)) == big and mem.used == 2 * dm.PAGE
    tp.close_transfer(t)
    assert not lib.live and mem.used == 0 and t.usbip_region is None


def test_bounded_per_region_and_per_handle(usb_transfer):
    lib = FakeLib()
    mem = dm.DevMem(lib, "raw", budget=2 * dm.PAGE)
    a, b, c = usb_transfer(), usb_transfer(), usb_transfer()
    assert not dm.stage(a, mem, bytes(dm.REGION_MAX + 1), dm.REGION_MAX + 1)  # larger than a region
    assert dm.stage(a, mem, b"1", 1) and dm.stage(b, mem, b"2", 1)
    assert not dm.stage(c, mem, b"3", 1)  # the budget is spent: usbfs copies this one
    assert mem.used == 2 * dm.PAGE and len(lib.live) == 2
    assert not dm.stage(a, mem, b"", 0)  # nothing to stage


def test_a_refused_mmap_stops_the_handle_asking(usb_transfer):
    lib = FakeLib()
    lib.fail = True
    mem = dm.DevMem(lib, "raw")
    t = usb_transfer()
    assert not dm.stage(t, mem, b"data", 4) and not mem.available
    lib.fail = False
    assert not dm.stage(t, mem, b"data", 4) and not lib.live


def test_close_frees_every_region_and_a_freed_region_is_never_written(usb_transfer):
    lib = FakeLib()
    mem = dm.DevMem(lib, "raw")
    t = usb_transfer()
    assert dm.stage(t, mem, b"data", 4)
    mem.close()
    assert not lib.live and mem.used == 0
    assert not dm.stage(t, mem, b"data", 4)  # the transfer's region is gone: not touched again
    tp.close_transfer(t)
    assert len(lib.freed) == 1


def test_transfer_pool_frees_the_regions_of_the_transfers_it_closes(usb_transfer):
    lib = FakeLib()
    mem = dm.DevMem(lib, "raw")
    pool = tp.TransferPool()
    t = usb_transfer()
    assert dm.stage(t, mem, b"data", 4)
    pool.put(1, t)
    assert lib.live  # kept with its region for the next URB
    pool.close()
    assert not lib.live


def test_no_regions_without_python_libusb1_handles_or_when_disabled(monkeypatch):
    class Fake:
        pass

    assert dm.DevMem.for_handle(Fake()) is None
    assert not dm.stage(Fake(), None, b"data", 4)
    assert not dm.stage(Fake(), dm.DevMem(FakeLib(), "raw"), b"data", 4)  # the unit tests' fake transfers
    monkeypatch.setenv("USBIP_LIBUSB_NO_DEVMEM", "1")
    h = Fake()
    h._USBDeviceHandle__handle = "raw"
    assert dm.DevMem.for_handle(h) is None
