"""OUR usbipd's UAC2 audio device (on the host) imported by the guest's vhci-hcd: the kernel's
snd-usb-audio makes a sound card of it, ``arecord`` captures the device's test signal and
``aplay`` plays a WAV file that the device counts and checksums.

This is real isochronous audio through USB/IP: dummy_hcd has no iso endpoints, so a configfs
UAC2 gadget cannot do it in the test kernel. The guest runs under TCG, slowly: capture URBs
(one 1 ms packet each, snd-usb-audio's endpoint.c keeps 12 in flight) may come back slower than
real time, which only stretches the recording (the device paces URBs to their packet slots and
counts frames when it delivers them, so the signal stays gap-free).
"""

from __future__ import annotations

import re

import pytest

from . import gadgets
from .audio import AUDIO_PID, AUDIO_VID, capture_and_playback
from .harness import Guest
from .ourserver import (
    HOST_FROM_GUEST,
    our_usbipd_fixture,  # noqa: F401  (the our_usbipd fixture)
)


@pytest.fixture
def g(clean_guest: Guest) -> Guest:
    clean_guest.run("modprobe vhci-hcd && modprobe snd-usb-audio", timeout=120, check=True)
    return clean_guest


def test_snd_usb_audio_capture_and_playback(g: Guest, our_usbipd) -> None:
    srv = our_usbipd("audio")
    mark = gadgets.dmesg_mark(g)
    imp = gadgets.vhci_attach(g, "100-1", HOST_FROM_GUEST, srv.port, vid=AUDIO_VID, pid=AUDIO_PID, timeout=60)
    assert imp.local_busid, imp
    capture_and_playback(g, srv, imp.local_busid)

    print("class requests:\n" + "\n".join(re.findall(r"class request .*", srv.log())))
    gadgets.vhci_detach(g, imp.port)
    gadgets.wait_gone(g, imp.local_busid, timeout=60)
    log = gadgets.dmesg_since(g, mark)
    print(log[-3000:])
    assert not re.search(r"Oops|BUG:|general protection|Kernel panic", log), log[-6000:]
