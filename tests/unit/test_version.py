"""``usbip --version`` / ``usbipd --version`` say which codec the build runs: compiled or pure."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

import usbip
from usbip.cli import version

BUILT = all(importlib.util.find_spec(m) is not None for m in ("usbip.protocol._codec", "usbip.pool._buffers"))
TOOLS = [("usbip", ["--version"]), ("usbipd", ["--version"]), ("usbipd", ["-v"]), ("usbip", ["version"])]


def _run(tool: str, argv: list[str], prelude: str = "", **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("USBIP_NO_EXTENSIONS", "PYTHONWARNINGS")}
    environ.update(env)
    code = f"import sys\n{prelude}\nfrom usbip.cli.{tool}_main import main\nsys.exit(main(sys.argv[1:]))"
    res = subprocess.run(
        [sys.executable, "-W", "ignore::RuntimeWarning", "-c", code, *argv],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.mark.skipif(not BUILT, reason="the Cython extensions are not built")
@pytest.mark.parametrize(("tool", "argv"), TOOLS)
def test_compiled_build(tool: str, argv: list[str]) -> None:
    assert _run(tool, argv) == f"{tool} (cyusbip) {usbip.__version__}, compiled codec"


@pytest.mark.parametrize(("tool", "argv"), TOOLS)
def test_pure_build_forced(tool: str, argv: list[str]) -> None:
    out = _run(tool, argv, USBIP_NO_EXTENSIONS="1")
    assert out == f"{tool} (cyusbip) {usbip.__version__}, pure-Python codec (USBIP_NO_EXTENSIONS=1)"


def test_pure_build_without_extensions() -> None:
    # None in sys.modules makes importing the extensions fail, as in an install that lacks them
    prelude = "sys.modules['usbip.protocol._codec'] = None\nsys.modules['usbip.pool._buffers'] = None"
    out = _run("usbip", ["--version"], prelude)
    assert out == f"usbip (cyusbip) {usbip.__version__}, pure-Python codec (compiled extensions unavailable)"


@pytest.mark.skipif(not BUILT, reason="the Cython extensions are not built")
def test_mixed_build_names_both_halves() -> None:
    out = _run("usbipd", ["--version"], "sys.modules['usbip.pool._buffers'] = None")
    assert out == f"usbipd (cyusbip) {usbip.__version__}, compiled codec, pure-Python buffer pool"


def test_in_process_matches_the_running_codec() -> None:
    text = version.version_string("usbip")
    assert re.fullmatch(r"usbip \(cyusbip\) \S+, .+ codec.*", text)
    assert ("compiled codec" in text) == (usbip.IMPLEMENTATION == "cython")
