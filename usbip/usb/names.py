"""Vendor, product and class names from the system's usb.ids, as usbip's names.c prints them."""

from __future__ import annotations

import functools
import os

USB_IDS_PATHS = (
    "/usr/share/hwdata/usb.ids",
    "/usr/share/misc/usb.ids",
    "/usr/share/usb.ids",
    "/var/lib/usbutils/usb.ids",
)


class UsbIds:
    def __init__(self) -> None:
        self.vendors: dict[int, str] = {}
        self.products: dict[tuple[int, int], str] = {}
        self.classes: dict[int, str] = {}
        self.subclasses: dict[tuple[int, int], str] = {}
        self.protocols: dict[tuple[int, int, int], str] = {}

    @classmethod
    def load(cls, path: str | None = None) -> UsbIds:
        ids = cls()
        for p in (path,) if path else USB_IDS_PATHS:
            if p and os.path.exists(p):
                with open(p, encoding="utf-8", errors="replace") as f:
                    ids._parse(f)
                break
        return ids

    def _parse(self, lines: object) -> None:
        vendor = cls_ = sub = None
        section = "vendor"
        for raw in lines:  # type: ignore[attr-defined]
            line = raw.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            try:
                if line.startswith("C "):
                    section = "class"
                    code, name = line[2:].split(None, 1)
                    cls_ = int(code, 16)
                    self.classes[cls_] = name
                elif not line.startswith("\t"):
                    if len(line) > 4 and line[4] == " " and all(c in "0123456789abcdef" for c in line[:4]):
                        section = "vendor"
                        vendor = int(line[:4], 16)
                        self.vendors[vendor] = line[4:].strip()
                    else:
                        section = "other"
                elif line.startswith("\t\t"):
                    if section == "class" and cls_ is not None and sub is not None:
                        code, name = line[2:].split(None, 1)
                        self.protocols[(cls_, sub, int(code, 16))] = name
                elif section == "vendor" and vendor is not None:
                    code, name = line[1:].split(None, 1)
                    self.products[(vendor, int(code, 16))] = name
                elif section == "class" and cls_ is not None:
                    code, name = line[1:].split(None, 1)
                    sub = int(code, 16)
                    self.subclasses[(cls_, sub)] = name
            except ValueError:
                continue

    def product(self, vendor: int, product: int) -> str:
        """'vendor : product (vvvv:pppp)' (usbip_names_get_product)."""
        v = self.vendors.get(vendor, "unknown vendor")
        p = self.products.get((vendor, product), "unknown product")
        return f"{v} : {p} ({vendor:04x}:{product:04x})"

    def klass(self, c: int, s: int, p: int) -> str:
        """'class / subclass / protocol (cc/ss/pp)' (usbip_names_get_class)."""
        if c == 0 and s == 0 and p == 0:
            return f"(Defined at Interface level) ({c:02x}/{s:02x}/{p:02x})"
        cn = self.classes.get(c, "unknown class")
        sn = self.subclasses.get((c, s), "unknown subclass")
        pn = self.protocols.get((c, s, p), "unknown protocol")
        return f"{cn} / {sn} / {pn} ({c:02x}/{s:02x}/{p:02x})"


@functools.lru_cache(maxsize=1)
def usb_ids() -> UsbIds:
    return UsbIds.load(os.environ.get("USBIP_USB_IDS"))
