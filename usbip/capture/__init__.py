"""URB capture: every submit, completion and unlink written as pcapng that Wireshark decodes as USB.

The file holds one pcapng section with one interface of link type
``LINKTYPE_USB_LINUX_MMAPPED`` (220): each packet is the 64-byte header of the kernel's usbmon
binary API (``struct mon_bin_hdr``, Documentation/usb/usbmon.rst), then for isochronous URBs
``ndesc`` 16-byte ``mon_bin_isodesc`` entries, then the data. Events are usbmon's:

* ``S`` submit: OUT data (IN: none, data flag ``<``); for control URBs the setup packet
  (setup flag 0), for iso URBs the descriptors with each packet's length.
* ``C`` complete: IN data (OUT: none, data flag ``>``), status 0 or a negative errno, the
  actual length; an URB cancelled by CMD_UNLINK completes with -ECONNRESET, as usbmon shows
  it; an URB still pending when the client connection ends, client side, with -ENODEV.
* ``E`` error: the server refused the URB without handing it to the device (no such
  endpoint, a control request whose wLength is not its length, ...), like usbmon's
  submit error after an ``S``.

Bus and device numbers are the exported device's busnum and devnum (devnum & 0xff: usbmon's
field is one byte), so server and client captures of one import agree. The URB id is
``connection id << 32 | seqnum``, connection ids counting from 1 per capture file.

Writing never blocks the event loop: records go into a buffer (one lock per record) that a
writer thread drains with ``os.write``. When the disk does not keep up and ``max_buffer``
bytes are waiting, new records are dropped and counted (a log line says how many); a failing
write (a full disk) is logged, its records are lost and counted, the file is cut back to its
last whole block, and writing resumes when the disk does. Nothing of this reaches the caller.

Size: with ``max_bytes`` a file never grows beyond it. With ``files=1`` capturing then stops
(a log line says so); with ``files=N`` the file is rotated: FILE becomes FILE.1, FILE.1
FILE.2, ... and FILE.(N-1) is removed, each file a complete pcapng of its own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .file import CaptureFile
    from .format import (
        EV_COMPLETE,
        EV_ERROR,
        EV_SUBMIT,
        FLAG_IN,
        FLAG_NONE,
        FLAG_OUT,
        LINKTYPE_USB_LINUX_MMAPPED,
        MON_BULK,
        MON_CONTROL,
        MON_INT,
        MON_ISO,
        file_header,
        interface_description,
        iso_descriptors,
        iso_info,
        packet_block,
        read_records,
        section_header,
        usbmon_header,
    )
    from .taps import ClientCapture, UrbCapture

__all__ = [
    "EV_COMPLETE",
    "EV_ERROR",
    "EV_SUBMIT",
    "FLAG_IN",
    "FLAG_NONE",
    "FLAG_OUT",
    "LINKTYPE_USB_LINUX_MMAPPED",
    "MON_BULK",
    "MON_CONTROL",
    "MON_INT",
    "MON_ISO",
    "CaptureFile",
    "ClientCapture",
    "UrbCapture",
    "file_header",
    "interface_description",
    "iso_descriptors",
    "iso_info",
    "packet_block",
    "read_records",
    "section_header",
    "usbmon_header",
]

#: where each name lives: loaded on first use, so that importing a light module of the package
#: (``defaults``, for the command-line options) does not load the capture machinery
_HOME = {
    "CaptureFile": "file",
    "ClientCapture": "taps",
    "UrbCapture": "taps",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME.get(name, 'format')}", __name__), name)
    globals()[name] = value
    return value
