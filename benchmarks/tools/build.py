"""Build the C benchmark helpers (``ceiling``, ``loadgen``) on demand.

``build(name)`` compiles ``benchmarks/tools/<name>.c`` with the system C
compiler into ``benchmarks/tools/.build/<name>`` when the binary is missing
or older than its source, and returns the binary's path.

Run ``python3 benchmarks/tools/build.py [name ...]`` to build (default: all).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

TOOLS_DIR = pathlib.Path(__file__).resolve().parent
BUILD_DIR = TOOLS_DIR / ".build"
PROGRAMS = ("ceiling", "loadgen")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")


class BuildError(RuntimeError):
    """Raised when a tool cannot be compiled."""


def find_compiler() -> str:
    """Return the C compiler to use: $CC, else cc, gcc or clang on PATH."""
    env_cc = os.environ.get("CC")
    candidates = [env_cc] if env_cc else []
    candidates += ["cc", "gcc", "clang"]
    for cand in candidates:
        path = shutil.which(cand)
        if path:
            return path
    raise BuildError(
        "no C compiler found (tried $CC, cc, gcc, clang); install one, "
        "e.g. `apt-get install gcc`, to build the benchmark tools"
    )


def build(name: str, force: bool = False) -> pathlib.Path:
    """Compile ``<name>.c`` if needed and return the path of the binary."""
    src = TOOLS_DIR / f"{name}.c"
    if not src.is_file():
        raise BuildError(f"no such tool source: {src}")
    out = BUILD_DIR / name
    if not force and out.is_file() and os.access(out, os.X_OK) and out.stat().st_mtime >= src.stat().st_mtime:
        return out

    compiler = find_compiler()
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename atomically, so concurrent
    # builds never expose (or execute) a half-written binary.
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=BUILD_DIR)
    os.close(fd)
    cmd = [compiler, *CFLAGS, "-o", tmp, str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(
                f"compiling {src.name} failed (exit {proc.returncode}):\n$ {' '.join(cmd)}\n{proc.stderr.strip()}"
            )
        if proc.stderr.strip():
            sys.stderr.write(proc.stderr)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    force = "--force" in args
    names = [a for a in args if a != "--force"] or list(PROGRAMS)
    try:
        for name in names:
            print(build(name, force=force))
    except BuildError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
