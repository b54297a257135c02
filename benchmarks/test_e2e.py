"""End to end: the C load generator against the C ceiling server, our usbipd (compiled)
and our usbipd with USBIP_NO_EXTENSIONS=1, interleaved, medians of repeated short runs.

pytest-benchmark records one timing per case (the whole interleaved run); the figures
that matter come from the load generator's JSON and are stored in ``extra_info``,
printed at the end of the session and written to ``.benchmarks/latest.json``
(and ``$USBIP_BENCH_OUT``). Nothing here asserts a speed.

Environment: USBIP_BENCH_SECONDS (measured seconds per run, default 1.5),
USBIP_BENCH_REPEATS (rounds, default 3), USBIP_BENCH_WARMUP (default 0.3),
USBIP_BENCH_FULL=1 (the whole matrix). With ``--benchmark-disable`` every case runs
once for ~0.3 s against each server, just to prove it works.
"""

from __future__ import annotations

import pytest

from .harness import (
    CEILING,
    OURS,
    PURE,
    BuildError,
    Case,
    build,
    env_flag,
    interleaved,
    run_settings,
    started_servers,
)

BULK_SIZES_FULL = (512, 16384, 65536, 1 << 20)
INFLIGHT_FULL = (1, 8, 32)


def matrix() -> list[Case]:
    cases = [Case("control", 18, 1)]
    if env_flag("USBIP_BENCH_FULL"):
        cases += [Case(m, s, k) for m in ("bulk-in", "bulk-out") for s in BULK_SIZES_FULL for k in INFLIGHT_FULL]
    else:
        cases += [
            Case("bulk-in", 512, 1),
            Case("bulk-in", 512, 32),
            Case("bulk-in", 16384, 8),
            Case("bulk-in", 65536, 8),
            Case("bulk-in", 1 << 20, 8),
            Case("bulk-out", 512, 32),
            Case("bulk-out", 65536, 8),
            Case("bulk-out", 1 << 20, 8),
        ]
    cases.append(Case("iso-in", 0, 8))
    cases.append(Case("bulk-in", 512, 32, client="py"))
    return cases


@pytest.fixture(scope="session")
def tools():
    try:
        return {name: build(name) for name in ("ceiling", "loadgen")}
    except BuildError as exc:
        pytest.skip(f"cannot build the C tools: {exc}")


@pytest.fixture(scope="session")
def servers(tools):
    with started_servers((CEILING, OURS, PURE)) as started:
        yield started


@pytest.fixture(scope="session")
def settings(request, e2e_reporter):
    quick = bool(request.config.getoption("benchmark_disable"))
    s: dict[str, object] = {**run_settings(quick, warmup=0.3, quick_warmup=0.1), "full": env_flag("USBIP_BENCH_FULL")}
    e2e_reporter.settings.update(s)
    return s


@pytest.mark.parametrize("case", matrix(), ids=lambda c: c.name.replace(" ", "-"))
def test_e2e(benchmark, case, servers, settings, e2e_reporter):
    benchmark.group = "e2e"
    box = {}

    def run():
        box["r"] = interleaved(case, servers, settings["repeats"], settings["seconds"], settings["warmup"])

    benchmark.pedantic(run, rounds=1, iterations=1)
    doc = box["r"].to_json()
    e2e_reporter.add(doc)
    med = doc["medians"]
    benchmark.extra_info.update(
        {
            "case": doc["case"],
            "metric": doc["metric"],
            **{f"{srv}_{k}": v for srv, m in med.items() for k, v in m.items() if k != "runs"},
            **doc["ratios"],
        }
    )
    # the run must have worked (no wall-clock assertion): every server answered without errors
    for srv, runs in doc["runs"].items():
        for r in runs:
            assert r["rc"] == 0 and r["errors"] == 0 and r["urbs"] > 0, f"{srv}: {r}"
