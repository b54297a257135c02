"""What the command-line tools import before they do anything: in the kernel-test guest every
``usbip`` command is a fresh Python under emulation, and each module imported costs a file read
over 9p and its code run slowly. Commands that do not need TLS, the capture file, shutil (argparse's
terminal width) or the buffer pool (the version text) must not load them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

NOT_NEEDED = ("shutil", "ssl", "asyncio", "usbip.capture.file", "usbip.pool", "usbip.client")


def _modules_after(argv: list[str]) -> set[str]:
    code = (
        "import json, sys\n"
        "from usbip.cli import usbip_main\n"
        f"usbip_main.build_parser().parse_args({argv!r})\n"
        "import usbip.cli.vhci\n"  # what port, detach and attach run
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return set(json.loads(res.stdout))


@pytest.mark.parametrize("argv", [["port"], ["--json", "port"], ["detach", "-p", "0"]])
def test_vhci_commands_start_without_what_they_do_not_use(argv: list[str]) -> None:
    loaded = _modules_after(argv)
    assert loaded.isdisjoint(NOT_NEEDED), sorted(loaded & set(NOT_NEEDED))
