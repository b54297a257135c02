"""A PyUSB program on the host against the *kernel's* USB/IP server in the guest.

In the guest: a configfs gadget on dummy_hcd with two functions, SourceSink (pattern 1, no iso:
dummy_hcd has none) and a HID boot keyboard (f_hid), exported by the kernel's ``usbip-host``
and Debian's ``usbipd`` on port 3240 (forwarded to the host). On the host, plain PyUSB with
``backend=usbip.pyusb.get_backend(...)``: enumeration with descriptors read from the device
(usbip-host exports it unconfigured), SET_CONFIGURATION, bulk IN/OUT with the gadget's pattern,
a stall and CLEAR_FEATURE(HALT) (which usbip-host carries out itself), an interrupt IN that
times out and is unlinked, then a report written to /dev/hidg0 (an interrupt URB needs a
non-zero interval, or usbip-host's usb_submit_urb refuses it and drops the connection), a port
reset (usbip-host's ``tweak_reset_device_cmd``).
"""

from __future__ import annotations

import errno

import pytest

from usbip.virtual.keyboard import BOOT_KEYBOARD_REPORT
from usbip.virtual.loopback import pattern_bytes

from . import gadgets

pytest.importorskip("usb")
import usb.core
import usb.util

import usbip.pyusb

VID, PID = 0x1D6B, 0x0104  # Linux Foundation multifunction composite gadget
PRODUCT = "cyusbip PyUSB test"


def _hidg_node(guest) -> str:
    sysfs = guest.run("ls -d /sys/class/hidg/hidg*", check=True).out.split()[0]
    name = sysfs.rstrip("/").rsplit("/", 1)[-1]
    r = guest.run(
        f'n=/dev/{name}; [ -c "$n" ] || {{ IFS=: read ma mi < {sysfs}/dev; mknod "$n" c "$ma" "$mi"; }}; echo $n',
        check=True,
    )
    return r.out.strip()


def _endpoint(intf, direction: int, kind: int) -> int:
    for ep in intf:
        if ep.bEndpointAddress & 0x80 == direction and ep.bmAttributes & 3 == kind:
            return ep.bEndpointAddress
    raise AssertionError(f"no endpoint ({direction:#x}, {kind}) in {intf}")


def test_pyusb_program_against_usbip_host(clean_guest):
    guest = clean_guest
    g = gadgets.create_gadget(
        guest,
        "pyusb",
        [
            ("SourceSink.0", {"pattern": 1, "isoc_maxpacket": 0}),
            ("hid.usb0", {"protocol": 1, "subclass": 1, "report_length": 8, "report_desc": BOOT_KEYBOARD_REPORT}),
        ],
        vid=VID,
        pid=PID,
        product=PRODUCT,
        modules=("usb_f_ss_lb", "usb_f_hid"),
    )
    gadgets.kernel_export(guest, g.busid)
    hidg = _hidg_node(guest)

    with usbip.pyusb.get_backend(("127.0.0.1", guest.host_port(gadgets.USBIP_PORT)), timeout=60) as be:
        dev = usb.core.find(backend=be, idVendor=VID, idProduct=PID)
        assert dev is not None
        assert usbip.pyusb.location(dev)[2] == g.busid
        assert dev.product == PRODUCT and dev.manufacturer == "cyusbip"
        cfg = dev[0]
        ss, hid = cfg[(0, 0)], cfg[(1, 0)]
        assert (hid.bInterfaceClass, hid.bInterfaceSubClass, hid.bInterfaceProtocol) == (3, 1, 1)
        bulk_in, bulk_out = _endpoint(ss, 0x80, 2), _endpoint(ss, 0x00, 2)
        int_in = _endpoint(hid, 0x80, 3)

        dev.set_configuration()  # usbip-host exported it unconfigured; the backend configured it already
        assert dev.get_active_configuration().bConfigurationValue == 1
        assert bytes(dev.read(bulk_in, 4096, timeout=30000)) == pattern_bytes(512, 4096)
        assert dev.write(bulk_out, pattern_bytes(512, 4096), timeout=30000) == 4096

        dev.ctrl_transfer(0x02, 3, 0, bulk_in)  # SET_FEATURE(ENDPOINT_HALT)
        with pytest.raises(usb.core.USBError) as info:
            dev.read(bulk_in, 512, timeout=30000)
        assert info.value.errno == errno.EPIPE and info.value.backend_error_code == -9
        dev.clear_halt(bulk_in)
        assert len(dev.read(bulk_in, 512, timeout=30000)) == 512

        # nothing typed: the interrupt IN times out and is unlinked; then a report comes through
        with pytest.raises(usb.core.USBTimeoutError):
            dev.read(int_in, 8, timeout=500)
        report = bytes([0, 0, 4, 0, 0, 0, 0, 0])
        guest.write_file(hidg, report)
        got = bytes(dev.read(int_in, 8, timeout=30000))
        if got == bytes(8):  # a release report f_hid still held from before: the next one is ours
            got = bytes(dev.read(int_in, 8, timeout=30000))
        assert got == report

        dev.reset()  # port reset by usbip-host; the next call imports the device again
        assert len(dev.read(bulk_in, 512, timeout=30000)) == 512
        usb.util.dispose_resources(dev)
    assert "general protection" not in guest.run("dmesg | tail -50").out
