"""What every fuzz target shares: import paths, the optional ASan build of the extensions, atheris setup.

Import this module first in a target, before anything from ``usbip``:

* the repository root is appended to ``sys.path`` (after PYTHONPATH), so ``tests`` helpers
  and ``fuzz`` modules import however the target was started;
* ``USBIP_FUZZ_NATIVE_DIR=DIR`` (set by ``scripts/fuzz --asan``) makes ``usbip.protocol._codec``
  and ``usbip.pool._buffers`` load from the ``_codec*.so`` / ``_buffers*.so`` in DIR (an
  AddressSanitizer build) instead of the in-place build, through a finder placed first on
  ``sys.meta_path``; the rest of the package is the work tree's.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.append(REPO)

NATIVE_ENV = "USBIP_FUZZ_NATIVE_DIR"
NATIVE_MODULES = {"usbip.protocol._codec": "_codec", "usbip.pool._buffers": "_buffers"}


class _NativeOverride(importlib.abc.MetaPathFinder):
    """Finds the compiled twins in one directory (the ASan build), nothing else."""

    def __init__(self, directory: str) -> None:
        self.paths: dict[str, str] = {}
        for fullname, stem in NATIVE_MODULES.items():
            found = sorted(glob.glob(os.path.join(directory, stem + ".*.so")))
            if not found:
                raise ImportError(f"{NATIVE_ENV}={directory}: no {stem}.*.so there (run scripts/fuzz --asan)")
            self.paths[fullname] = found[0]

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        so = self.paths.get(fullname)
        if so is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, so)
        return importlib.util.spec_from_file_location(fullname, so, loader=loader)


def install_native_override() -> str | None:
    """Honour USBIP_FUZZ_NATIVE_DIR (see the module docstring); return the directory or None."""
    directory = os.environ.get(NATIVE_ENV)
    if not directory:
        return None
    if any(name in sys.modules for name in NATIVE_MODULES):
        raise RuntimeError("install_native_override() must run before usbip's extensions are imported")
    sys.meta_path.insert(0, _NativeOverride(os.path.abspath(directory)))
    return directory


install_native_override()


def run_fuzzer(test_one_input: Callable[[bytes], None], argv: list[str] | None = None) -> None:
    """Hand ``test_one_input`` to atheris/libFuzzer with the command-line options (``-runs=`` ...)."""
    import atheris

    atheris.Setup(sys.argv if argv is None else argv, test_one_input)
    atheris.Fuzz()


def reproduce(test_one_input: Callable[[bytes], None], paths: list[str]) -> int:
    """Run ``test_one_input`` on files (or every file of directories) without atheris; return the count."""
    count = 0
    for p in paths:
        files = sorted(os.path.join(p, f) for f in os.listdir(p)) if os.path.isdir(p) else [p]
        for f in files:
            with open(f, "rb") as fh:
                test_one_input(fh.read())
            count += 1
    return count
