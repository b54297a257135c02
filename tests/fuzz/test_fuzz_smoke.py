"""Smoke runs of the fuzz targets (fuzz/) and of the soak test, so CI keeps them working.

Each atheris target runs a few thousand executions starting from its checked-in seed corpus
(copied: libFuzzer adds new inputs to its first corpus directory); a reproducer written or a
non-zero exit fails the test. The long runs are ``scripts/fuzz`` and ``scripts/soak``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NO_EXTENSIONS = os.environ.get("USBIP_NO_EXTENSIONS", "") not in ("", "0")
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
needs_atheris = pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed (pip install atheris)")

# (target, executions): together well under 30 s on 2 cores
TARGETS = [("fuzz_decoder", 3000), ("fuzz_op_phase", 3000), ("fuzz_session", 2000)]


def run_target(tmp_path: Path, target: str, runs: int) -> str:
    corpus = tmp_path / "corpus"
    findings = tmp_path / "findings"
    shutil.copytree(REPO / "fuzz" / "corpus" / target, corpus)
    findings.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "USBIP_FUZZ_NATIVE_DIR"}
    cmd = [
        sys.executable,
        "-m",
        f"fuzz.{target}",
        f"-runs={runs}",
        f"-artifact_prefix={findings}/",
        "-print_final_stats=1",
        "-timeout=30",
        "-seed=1",
        str(corpus),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    log = proc.stdout + proc.stderr
    written = sorted(p.name for p in findings.iterdir())
    assert proc.returncode == 0 and not written, f"{target} found something ({written}):\n{log[-6000:]}"
    return log


@needs_atheris
@pytest.mark.parametrize(("target", "runs"), TARGETS, ids=[t for t, _ in TARGETS])
def test_fuzz_target_smoke(tmp_path: Path, target: str, runs: int) -> None:
    if target == "fuzz_decoder" and NO_EXTENSIONS:
        pytest.skip("the differential decoder target needs the compiled codec (USBIP_NO_EXTENSIONS=1)")
    log = run_target(tmp_path, target, runs)
    m = re.search(r"^stat::number_of_executed_units: *(\d+)", log, re.M)
    assert m and int(m.group(1)) >= runs, log[-3000:]


def test_seed_corpus_is_current(tmp_path: Path) -> None:
    """fuzz/corpus/ holds exactly what fuzz/make_corpus.py generates (regenerate and commit when it changes)."""
    if not HAVE_ATHERIS:
        pytest.skip("make_corpus imports the decoder target, which needs atheris")
    code = "import sys; from fuzz import make_corpus as m; m.CORPUS = sys.argv[1]; m.main()"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, check=True, capture_output=True, timeout=60)
    for target in ("fuzz_decoder", "fuzz_op_phase", "fuzz_session"):
        made = {p.name: p.read_bytes() for p in (tmp_path / target).iterdir()}
        checked_in = {p.name: p.read_bytes() for p in (REPO / "fuzz" / "corpus" / target).iterdir()}
        assert made == checked_in, f"fuzz/corpus/{target} is stale: run python -m fuzz.make_corpus"


@pytest.mark.slow
def test_soak_smoke() -> None:
    """Every device type, 8 clients x 32 URBs in flight, for 8 seconds: nothing lost, nothing wrong."""
    cmd = [sys.executable, "-m", "fuzz.soak", "--seconds", "8"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "soak: passed" in out, out[-6000:]
