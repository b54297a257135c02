"""The bind state file: which local devices ``usbipd`` exports.

``usbip bind`` / ``usbip unbind`` edit it; a running ``usbipd`` re-reads it when
its mtime changes. JSON::

    {"version": 1, "rules": [{"busid": "1-1"}, {"vidpid": "0525:a4a0"}, {"serial": "ABC"}]}

A device is bound when any rule matches it: ``busid`` (Linux's name, e.g.
``1-1.2``), ``vidpid`` (lower-case hex ``vvvv:pppp``) or ``serial`` (the
iSerialNumber string, as sysfs shows it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_STATE_FILE = "/var/lib/cyusbip/exported.json"
ENV_STATE_FILE = "USBIP_STATE_FILE"
RULE_KEYS = ("busid", "vidpid", "serial")
_VIDPID = re.compile(r"^([0-9a-fA-F]{1,4}):([0-9a-fA-F]{1,4})$")


def state_file_path(path: str | None = None) -> str:
    return path or os.environ.get(ENV_STATE_FILE) or DEFAULT_STATE_FILE


def normalize_vidpid(text: str) -> str:
    """``"525:A4A0"`` -> ``"0525:a4a0"``; ValueError if malformed."""
    m = _VIDPID.match(text.strip())
    if not m:
        raise ValueError(f"not a VID:PID pair: {text!r}")
    return f"{int(m.group(1), 16):04x}:{int(m.group(2), 16):04x}"


def make_rule(busid: str | None = None, vidpid: str | None = None, serial: str | None = None) -> dict[str, str]:
    given = [(k, v) for k, v in (("busid", busid), ("vidpid", vidpid), ("serial", serial)) if v]
    if len(given) != 1:
        raise ValueError("a rule names exactly one of busid, vidpid, serial")
    key, value = given[0]
    if key == "vidpid":
        value = normalize_vidpid(value)
    return {key: value}


@dataclass(frozen=True)
class DeviceIdentity:
    """What rules match against."""

    busid: str
    vid: int = 0
    pid: int = 0
    serial: str = ""

    @property
    def vidpid(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}"


def rule_matches(rule: Mapping[str, str], dev: DeviceIdentity) -> bool:
    if "busid" in rule:
        return rule["busid"] == dev.busid
    if "vidpid" in rule:
        try:
            return normalize_vidpid(rule["vidpid"]) == dev.vidpid
        except ValueError:
            return False
    if "serial" in rule:
        return bool(dev.serial) and rule["serial"] == dev.serial
    return False


class BindState:
    """The rules of one state file, with mtime-based reloading."""

    def __init__(self, path: str | None = None) -> None:
        self.path = state_file_path(path)
        self.rules: list[dict[str, str]] = []
        self._stamp: tuple[int, int, int] | None = None
        self.error: str | None = None

    # ------------------------------------------------------------ reading
    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool:
        """Re-read the file when its mtime/size/inode changed; True if the rules changed."""
        stamp = self._stat()
        if stamp == self._stamp and self._stamp is not None:
            return False
        if stamp is None and self._stamp is None and not self.rules:
            self._stamp = None
            return False
        old = self.rules
        self.load()
        self._stamp = stamp
        return self.rules != old

    def load(self) -> None:
        self.error = None
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            self.rules = []
            return
        except (OSError, ValueError) as exc:
            self.error = f"{self.path}: {exc}"
            self.rules = []
            return
        self.rules = parse_rules(data)

    def matches(self, dev: DeviceIdentity) -> bool:
        return any(rule_matches(r, dev) for r in self.rules)

    # ------------------------------------------------------------ writing
    def add(self, rule: dict[str, str]) -> bool:
        """Add ``rule``; False if it was there already."""
        if rule in self.rules:
            return False
        self.rules.append(dict(rule))
        return True

    def remove_matching(self, dev: DeviceIdentity) -> list[dict[str, str]]:
        """Drop every rule matching ``dev``; returns the dropped rules."""
        gone = [r for r in self.rules if rule_matches(r, dev)]
        self.rules = [r for r in self.rules if r not in gone]
        return gone

    def remove(self, rule: dict[str, str]) -> bool:
        if rule not in self.rules:
            return False
        self.rules.remove(rule)
        return True

    def save(self) -> None:
        """Atomically replace the file (temp file + rename)."""
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".exported.", dir=d)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "rules": self.rules}, f, indent=2)
                f.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._stamp = self._stat()


def parse_rules(data: object) -> list[dict[str, str]]:
    """Rules from the decoded JSON (unknown keys and malformed entries are skipped)."""
    raw = data.get("rules", []) if isinstance(data, dict) else data if isinstance(data, list) else []
    rules: list[dict[str, str]] = []
    for r in raw:
        if not isinstance(r, dict):
            continue
        keys = [k for k in RULE_KEYS if isinstance(r.get(k), str) and r.get(k)]
        if len(keys) != 1:
            continue
        rules.append({keys[0]: r[keys[0]]})
    return rules
