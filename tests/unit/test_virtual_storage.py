"""StorageDevice: Bulk-Only Transport state machine and SCSI commands on an image file."""

from __future__ import annotations

import asyncio
import os
import random
import struct

import pytest

from usbip.protocol.constants import EPIPE, Speed
from usbip.usb.descriptors import endpoints, interface_classes
from usbip.virtual import StorageDevice
from usbip.virtual.testing import BotHost, bulk_in, bulk_out, clear_halt, control, result, set_configuration

MiB = 1024 * 1024


@pytest.fixture
def image(tmp_path):
    return str(tmp_path / "disk.img")


def make(path, size=4 * MiB, **kw):
    dev = StorageDevice(path, size=size, **kw)
    assert set_configuration(dev, 1) == 0
    return dev, BotHost(dev)


def read10(lba, count):
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, count, 0)


def write10(lba, count):
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, count, 0)


def read16(lba, count):
    return struct.pack(">BBQIBB", 0x88, 0, lba, count, 0, 0)


def write16(lba, count):
    return struct.pack(">BBQIBB", 0x8A, 0, lba, count, 0, 0)


def test_creates_sparse_image_and_descriptors(image):
    dev, _ = make(image, 8 * MiB)
    st = os.stat(image)
    assert st.st_size == 8 * MiB and st.st_blocks * 512 < MiB  # sparse
    cfg = dev.configuration_descriptor(0)
    assert interface_classes(cfg) == [(8, 6, 0x50)]
    assert {e["bEndpointAddress"] for e in endpoints(cfg)} == {0x81, 0x02}
    assert all(e["wMaxPacketSize"] == 512 for e in endpoints(cfg))
    assert dev.blocks == 8 * MiB // 512
    dev.release()
    ss = StorageDevice(image, speed=Speed.SUPER)  # existing image: its size is used
    assert ss.blocks == 8 * MiB // 512
    assert all(e["wMaxPacketSize"] == 1024 for e in endpoints(ss.configuration_descriptor(0)))
    ss.release()


def test_missing_image_without_size(tmp_path):
    with pytest.raises(ValueError):
        StorageDevice(str(tmp_path / "nope.img"))


def test_class_requests(image):
    dev, _ = make(image)
    assert control(dev, 0xA1, 0xFE, 0, 0, 1) == (0, b"\x00")  # Get Max LUN
    assert control(dev, 0x21, 0xFF, 0, 0, 0)[0] == 0  # Bulk-Only reset
    assert control(dev, 0xA1, 0xFE, 0, 1, 1)[0] == EPIPE  # no interface 1


def test_inquiry(image):
    dev, host = make(image, vendor="ACME", product="Disk 3000")
    st, res, data = host.command(bytes((0x12, 0, 0, 0, 36, 0)), 36)
    assert (st, res, len(data)) == (0, 0, 36)
    assert data[0] == 0 and data[1] & 0x80 and data[4] == 31
    assert data[8:16] == b"ACME    " and data[16:32] == b"Disk 3000       "
    # EVPD pages
    st, _, page0 = host.command(bytes((0x12, 1, 0x00, 0, 255, 0)), 255)
    assert st == 0 and page0[1] == 0 and 0x80 in page0[4:]
    st, _, page80 = host.command(bytes((0x12, 1, 0x80, 0, 255, 0)), 255)
    assert st == 0 and page80[4:].decode() == dev.unit_serial
    st, _, _ = host.command(bytes((0x12, 1, 0x42, 0, 255, 0)), 255)
    assert st == 1 and host.request_sense() == (0x05, 0x24, 0x00)
    # allocation length shorter than the data: truncated, status good
    st, res, data = host.command(bytes((0x12, 0, 0, 0, 5, 0)), 5)
    assert (st, res, len(data)) == (0, 0, 5)


def test_inquiry_host_expects_more_stalls_and_residue(image):
    _dev, host = make(image)
    st, res, data = host.command(bytes((0x12, 0, 0, 0, 36, 0)), 512)
    assert st == 0 and len(data) == 36 and res == 512 - 36
    # the data ended short and bulk IN halted: the CSW read stalled once and needed CLEAR_FEATURE
    assert host.stalls == [0x81]


def test_read_capacity(image):
    _dev, host = make(image, 4 * MiB)
    st, res, data = host.command(bytes((0x25,)) + bytes(9), 8)
    assert st == 0 and res == 0
    assert struct.unpack(">II", data) == (4 * MiB // 512 - 1, 512)
    cdb16 = bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + bytes(2)
    st, res, data = host.command(cdb16, 32)
    assert st == 0 and len(data) == 32 and struct.unpack_from(">QI", data) == (4 * MiB // 512 - 1, 512)
    st, _, _ = host.command(bytes((0x9E, 0x11)) + bytes(14), 32)
    assert st == 1 and host.request_sense() == (0x05, 0x24, 0x00)


def test_test_unit_ready_and_unknown_command(image):
    _dev, host = make(image)
    assert host.command(bytes(6))[:2] == (0, 0)
    st, res, _ = host.command(bytes((0xEE,)) + bytes(9))
    assert (st, res) == (1, 0)
    assert host.request_sense() == (0x05, 0x20, 0x00)
    assert host.request_sense() == (0, 0, 0)  # sense is cleared once read


def test_write_then_read_random_blocks(image):
    rng = random.Random(1234)
    dev, host = make(image, 4 * MiB)
    blocks = dev.blocks
    written = {}
    for _ in range(20):
        count = rng.randint(1, 300)
        lba = rng.randrange(0, blocks - count)
        data = rng.randbytes(count * 512)
        cmd = write10 if rng.random() < 0.5 else write16
        chunk = rng.choice([512, 4096, 31 * 512, 120 * 1024, 240 * 1024])
        st, res, _ = host.command(cmd(lba, count), data_out=data, chunk=chunk)
        assert (st, res) == (0, 0)
        for i in range(count):
            written[lba + i] = data[i * 512 : (i + 1) * 512]
    with open(image, "rb") as f:  # on disk right away
        for lba, blk in written.items():
            f.seek(lba * 512)
            assert f.read(512) == blk
    for lba in rng.sample(sorted(written), 30):
        count = 1
        while lba + count in written and count < 64:
            count += 1
        cmd = read10 if rng.random() < 0.5 else read16
        st, res, data = host.command(cmd(lba, count), count * 512, chunk=rng.choice([512, 3000, 65536]))
        assert (st, res) == (0, 0)
        assert data == b"".join(written[lba + i] for i in range(count))
    # never written: zeros
    untouched = next(b for b in range(blocks) if b not in written)
    assert host.command(read10(untouched, 1), 512)[2] == bytes(512)


def test_large_transfer_in_host_sized_urbs(image):
    _dev, host = make(image, 8 * MiB)
    data = os.urandom(2 * MiB)
    st, res, _ = host.command(write10(100, 4096), data_out=data, chunk=240 * 1024)
    assert (st, res) == (0, 0)
    st, res, back = host.command(read10(100, 4096), 2 * MiB, chunk=120 * 1024)
    assert (st, res) == (0, 0) and back == data


def test_out_of_range(image):
    dev, host = make(image, 1 * MiB)
    last = dev.blocks - 1
    assert host.command(read10(last, 1), 512)[0] == 0
    st, res, data = host.command(read10(last, 2), 1024)
    assert (st, res, data) == (1, 1024, b"")
    assert host.stalls == [0x81]  # the IN endpoint stalled instead of sending data
    assert host.request_sense() == (0x05, 0x21, 0x00)
    st, res, _ = host.command(write10(dev.blocks, 1), data_out=bytes(512))
    assert (st, res) == (1, 512) and host.stalls[-1] == 0x02
    assert host.request_sense() == (0x05, 0x21, 0x00)
    st, _, _ = host.command(read16(2**40, 1), 512)
    assert st == 1 and host.request_sense() == (0x05, 0x21, 0x00)


def test_readonly_write_protect(image):
    with open(image, "wb") as f:
        f.write(b"\x5a" * (1 * MiB))
    _dev, host = make(image, None, readonly=True)
    st, res, _ = host.command(write10(0, 1), data_out=bytes(512))
    assert (st, res) == (1, 512)
    assert host.request_sense() == (0x07, 0x27, 0x00)
    with open(image, "rb") as f:
        assert f.read(512) == b"\x5a" * 512
    st, _, data = host.command(read10(0, 1), 512)
    assert st == 0 and data == b"\x5a" * 512
    # MODE SENSE(6) and (10): write-protect bit
    st, _, ms6 = host.command(bytes((0x1A, 0, 0x3F, 0, 192, 0)), 192)
    assert st == 0 and ms6[2] & 0x80 and ms6[0] + 1 == len(ms6)
    st, _, ms10 = host.command(bytes((0x5A, 0, 0x3F, 0, 0, 0, 0, 0, 255, 0)), 255)
    assert st == 0 and ms10[3] & 0x80 and int.from_bytes(ms10[:2], "big") + 2 == len(ms10)


def test_mode_sense_pages(image):
    _dev, host = make(image)
    st, _, ms = host.command(bytes((0x1A, 0, 0x08, 0, 255, 0)), 255)
    assert st == 0 and not ms[2] & 0x80 and ms[4] == 0x08 and ms[5] == 0x12 and ms[6] & 0x04
    st, _, hdr = host.command(bytes((0x1A, 0, 0x3F, 0, 4, 0)), 4)
    assert st == 0 and len(hdr) == 4
    st, _, _ = host.command(bytes((0x1A, 0, 0x1C, 0, 255, 0)), 255)
    assert st == 1 and host.request_sense() == (0x05, 0x24, 0x00)


def test_misc_commands(image):
    dev, host = make(image, 2 * MiB)
    st, _, fc = host.command(bytes((0x23, 0, 0, 0, 0, 0, 0, 0, 252, 0)), 252)
    assert st == 0 and fc[3] == 8 and struct.unpack_from(">I", fc, 4)[0] == dev.blocks and fc[8] == 2
    assert host.command(bytes((0x1E, 0, 0, 0, 1, 0)))[0] == 0  # prevent removal
    assert host.command(bytes((0x1B, 0, 0, 0, 0x02, 0)))[0] == 1  # eject refused
    assert host.request_sense() == (0x05, 0x53, 0x02)
    assert host.command(bytes((0x1E,)) + bytes(5))[0] == 0  # allow
    assert host.command(bytes((0x1B, 0, 0, 0, 0x02, 0)))[0] == 0  # eject
    assert host.command(bytes(6))[0] == 1 and host.request_sense() == (0x02, 0x3A, 0x00)
    assert host.command(bytes((0x1B, 0, 0, 0, 0x03, 0)))[0] == 0  # load
    assert host.command(bytes(6))[0] == 0
    assert host.command(bytes((0x35,)) + bytes(9))[0] == 0  # SYNCHRONIZE CACHE(10)
    assert host.command(bytes((0x2F, 0, 0, 0, 0, 1, 0, 0, 8, 0)))[0] == 0  # VERIFY(10)
    assert host.command(bytes((0x2F, 0, 0, 0x10, 0, 0, 0, 0, 8, 0)))[0] == 1  # VERIFY beyond the end


def test_request_sense_after_error_and_fixed_format(image):
    dev, host = make(image)
    host.command(read10(dev.blocks + 5, 1), 512)
    st, res, data = host.command(bytes((0x03, 0, 0, 0, 252, 0)), 252)
    assert st == 0 and len(data) == 18 and res == 252 - 18
    assert data[0] == 0x70 and data[2] == 0x05 and data[7] == 10 and data[12:14] == b"\x21\x00"


def test_invalid_cbw_then_reset_recovery(image):
    dev, host = make(image)
    assert bulk_out(dev, 2, b"USBC" + bytes(20)).status == 0  # wrong length
    assert bulk_in(dev, 1, 13).status == EPIPE
    assert bulk_out(dev, 2, host.cbw(bytes(6), 0, False)).status == EPIPE
    # clearing the halts alone does not help: still stalled until the class reset
    assert clear_halt(dev, 0x81) == 0
    assert bulk_in(dev, 1, 13).status == EPIPE
    assert control(dev, 0x21, 0xFF, 0, 0, 0)[0] == 0  # Bulk-Only Mass Storage Reset
    assert clear_halt(dev, 0x81) == 0 and clear_halt(dev, 0x02) == 0
    assert host.command(bytes(6))[:2] == (0, 0)  # works again
    # bad signature
    bad = bytearray(host.cbw(bytes(6), 0, False))
    bad[0] = 0
    assert bulk_out(dev, 2, bytes(bad)).status == 0
    assert bulk_in(dev, 1, 13).status == EPIPE


def test_phase_error_cases(image):
    _dev, host = make(image)
    # Hn < Di: READ of one block with no data stage
    st, res, _ = host.command(read10(0, 1), 0)
    assert (st, res) == (2, 0)
    # Hi < Di: READ of 2 blocks but the host expects one
    st, _, data = host.command(read10(0, 2), 512)
    assert st == 2 and len(data) == 512
    # Hi <> Do: WRITE with an IN data stage
    st, _, _ = host.command(write10(0, 1), 512)
    assert st == 2
    assert host.command(bytes(6))[:2] == (0, 0)


def test_out_data_larger_than_command(image):
    _dev, host = make(image)
    data = os.urandom(512) + b"\xee" * 512
    st, res, _ = host.command(write10(3, 1), data_out=data)
    assert (st, res) == (0, 512)
    with open(image, "rb") as f:
        f.seek(3 * 512)
        assert f.read(1024) == data[:512] + bytes(512)


def test_in_urb_before_cbw_waits(image):
    dev, host = make(image)
    early = bulk_in(dev, 1, 13)
    assert not early.done
    bulk_out(dev, 2, host.cbw(bytes(6), 0, False))
    assert early.done
    sig, tag, residue, status = struct.unpack("<IIIB", result(early)[1])
    assert sig == 0x53425355 and tag == host.tag and (residue, status) == (0, 0)


def test_lun_not_supported(image):
    dev, host = make(image)
    bulk_out(dev, 2, host.cbw(bytes(6), 0, False, lun=1))
    assert host.csw() == (1, 0)
    assert host.request_sense() == (0x05, 0x25, 0x00)


def test_close_fsyncs_and_reopen(image):
    dev, host = make(image)
    data = os.urandom(4096)
    host.command(write10(10, 8), data_out=data)
    asyncio.run(dev.close())
    dev.release()
    dev2, host2 = make(image, None)
    assert host2.command(read10(10, 8), 4096)[2] == data
    dev2.release()
