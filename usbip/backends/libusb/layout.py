"""What a configuration descriptor says a client may reach: interfaces, alternate settings, endpoints.

The kernel stub checks every CMD_SUBMIT against ``udev->ep_in[]`` / ``ep_out[]``: the
endpoints of the *current* alternate setting of each interface of the *active*
configuration (``usb_submit_urb`` answers -ENOENT for anything else), and bounds each
iso packet by what the endpoint moves per service interval (-EMSGSIZE). An exported
libusb device must apply the same rules before libusb sees an URB, and one more:
only interfaces this server claimed are reachable (one it could not take from its
kernel driver still belongs to that driver).

Everything here is pure: parsed from the cached descriptors, no libusb needed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...protocol.constants import XFER_ISOC, Speed
from ...usb.descriptors import DT_ENDPOINT, DT_INTERFACE, walk

DT_SS_ENDPOINT_COMP = 0x30
DT_SSP_ISOC_ENDPOINT_COMP = 0x31


@dataclass(frozen=True)
class Endpoint:
    address: int  # bEndpointAddress (direction bit included)
    xfer: int  # XFER_*
    interface: int
    alt: int
    max_bytes: int  # iso: bytes per service interval (usb_submit_urb's bound on one packet); else maxpacket

    @property
    def key(self) -> tuple[int, int]:
        """(endpoint number, 1 for IN / 0 for OUT): how a CMD_SUBMIT names it."""
        return (self.address & 0x0F, 1 if self.address & 0x80 else 0)


def _max_bytes(xfer: int, maxp: int, speed: int, comp: bytes | None, ssp: bytes | None) -> int:
    """The per-interval payload usb_submit_urb allows an iso packet (drivers/usb/core/urb.c);
    wMaxPacketSize for the other endpoint types (0 makes usb_submit_urb refuse any URB)."""
    base = maxp & 0x7FF  # usb_endpoint_maxp
    if xfer != XFER_ISOC:
        return base
    high = base * (1 + ((maxp >> 11) & 3))  # usb_endpoint_maxp_mult
    burst = 1 + (comp[2] if comp is not None and len(comp) >= 3 else 0)
    mult = 1 + (comp[3] & 3 if comp is not None and len(comp) >= 4 else 0)  # USB_SS_MULT
    superspeed = base * burst * mult
    if ssp is not None and len(ssp) >= 8:
        superspeed = struct.unpack_from("<I", ssp, 4)[0]  # dwBytesPerInterval (SuperSpeedPlus)
    if speed in (Speed.LOW, Speed.FULL):
        return base
    if speed == Speed.HIGH:
        return high
    if speed == Speed.SUPER:
        return base * burst * mult
    if speed == Speed.SUPER_PLUS:
        return superspeed
    return max(high, superspeed)  # speed not known: the most any reading allows


class ConfigLayout:
    """Interfaces, alternate settings and endpoints of one configuration descriptor."""

    def __init__(self, config: bytes, speed: int = Speed.HIGH) -> None:
        self.value = config[5] if len(config) >= 6 else 0
        self.alts: dict[int, list[int]] = {}  # interface -> its alternate settings, in descriptor order
        self.endpoints: list[Endpoint] = []
        self._owner: dict[int, int] = {}  # endpoint address -> interface (any alt setting)
        iface = alt = None
        pending: tuple[int, int, int] | None = None  # the last endpoint, waiting for its companions
        comp = ssp = None

        def flush() -> None:
            nonlocal pending, comp, ssp
            if pending is not None and iface is not None and alt is not None:
                addr, attrs, maxp = pending
                ep = Endpoint(addr, attrs & 3, iface, alt, _max_bytes(attrs & 3, maxp, speed, comp, ssp))
                self.endpoints.append(ep)
                self._owner.setdefault(addr, iface)
            pending = comp = ssp = None

        for dtype, d in walk(config):
            if dtype == DT_INTERFACE and len(d) >= 4:
                flush()
                iface, alt = d[2], d[3]
                alts = self.alts.setdefault(iface, [])
                if alt not in alts:
                    alts.append(alt)
            elif dtype == DT_ENDPOINT and len(d) >= 7:
                flush()
                pending = (d[2], d[3], d[4] | d[5] << 8)
            elif dtype == DT_SS_ENDPOINT_COMP and pending is not None:
                comp = d
            elif dtype == DT_SSP_ISOC_ENDPOINT_COMP and pending is not None:
                ssp = d
        flush()

    def has_interface(self, iface: int) -> bool:
        return iface in self.alts

    def has_alt(self, iface: int, alt: int) -> bool:
        return alt in self.alts.get(iface, ())

    def owner(self, address: int) -> int | None:
        """The interface an endpoint address (direction bit included) belongs to, in any alt setting."""
        return self._owner.get(address)

    def reachable(self, claimed: object, alts: dict[int, int]) -> dict[tuple[int, int], Endpoint]:
        """The endpoints a client may submit to: those of the claimed interfaces, in their current
        alternate setting when it is known (``alts``); otherwise alt 0's, then any other alt's
        endpoint that alt 0 does not have (the current setting is not known: a device opened in a
        setting someone else chose - usbfs still refuses what is not in the current one)."""
        out: dict[tuple[int, int], Endpoint] = {}
        later: list[Endpoint] = []
        for ep in self.endpoints:
            if ep.interface not in claimed:  # type: ignore[operator]
                continue
            current = alts.get(ep.interface)
            if current is not None:
                if ep.alt == current:
                    out[ep.key] = ep
            elif ep.alt == 0:
                out[ep.key] = ep
            else:
                later.append(ep)
        for ep in later:
            out.setdefault(ep.key, ep)
        return out

    def endpoints_of(self, iface: int) -> set[int]:
        """Every endpoint address of an interface, over all its alternate settings."""
        return {ep.address for ep in self.endpoints if ep.interface == iface}
