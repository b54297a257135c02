"""Benchmark fixtures: every codec benchmark runs against both twins in the same session,
and the session ends with the pure/compiled ratio per group (also stored in extra_info)."""

from __future__ import annotations

import importlib
import os
from collections import defaultdict

import pytest

NO_EXTENSIONS = os.environ.get("USBIP_NO_EXTENSIONS", "") not in ("", "0")
CODEC_MODULES = {"python": "usbip.protocol.codec", "cython": "usbip.protocol._codec"}
# targets from the design: compiled >= 5x pure on headers, >= 10x on iso work
TARGETS = {
    "cmd_submit header": 5.0,
    "ret_submit header": 5.0,
    "iso 32 descriptors": 10.0,
    "iso 32x1024 unpad/pad": 10.0,
}


@pytest.fixture(scope="session", params=list(CODEC_MODULES), ids=list(CODEC_MODULES))
def codec(request):
    try:
        return importlib.import_module(CODEC_MODULES[request.param])
    except ImportError as exc:
        if NO_EXTENSIONS:
            pytest.skip(f"compiled codec unavailable: {exc}")
        pytest.fail(f"compiled codec cannot be imported: {exc}", pytrace=False)


def _ratios(benchmarks) -> dict[str, dict[str, float]]:
    """{group: {"python": min_s, "cython": min_s, "ratio": python/cython}} from benchmark metadata."""
    times: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in benchmarks:
        stats = getattr(bench, "stats", None)
        if stats is None or not getattr(stats, "rounds", 0):
            continue
        impl = (bench.params or {}).get("codec")
        if impl is None:
            impl = "cython" if "cython" in bench.name else "python" if "python" in bench.name else None
        if impl and bench.group:
            times[bench.group][impl] = stats.min
    out = {}
    for group, t in times.items():
        if "python" in t and "cython" in t and t["cython"] > 0:
            out[group] = {**t, "ratio": t["python"] / t["cython"]}
    return out


def _session_benchmarks(config):
    bs = getattr(config, "_benchmarksession", None)
    return list(getattr(bs, "benchmarks", []) or []) if bs is not None else []


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # before pytest-benchmark saves its JSON: store the ratio in each benchmark's extra_info
    benchmarks = _session_benchmarks(session.config)
    ratios = _ratios(benchmarks)
    for bench in benchmarks:
        r = ratios.get(bench.group)
        if r is not None:
            bench.extra_info["pure_over_compiled"] = round(r["ratio"], 2)
            if bench.group in TARGETS:
                bench.extra_info["target"] = TARGETS[bench.group]
    session.config._codec_ratios = ratios
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    ratios = getattr(config, "_codec_ratios", {})
    output_json["codec_ratios"] = {g: round(r["ratio"], 2) for g, r in ratios.items()}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ratios = getattr(config, "_codec_ratios", None)
    if not ratios:
        return
    tr = terminalreporter
    tr.section("pure / compiled speed ratio (min times)")
    for group in sorted(ratios):
        r = ratios[group]
        target = TARGETS.get(group)
        verdict = ""
        if target is not None:
            verdict = f"  target >= {target:.0f}x: {'met' if r['ratio'] >= target else 'MISSED'}"
        tr.write_line(
            f"{group:28s} python {r['python'] * 1e6:10.2f} us   cython {r['cython'] * 1e6:10.2f} us"
            f"   ratio {r['ratio']:6.1f}x{verdict}"
        )


# ---------------------------------------------------------------- end-to-end benchmarks
def pytest_configure(config):
    # test_e2e.py / test_gigabit.py results: table at the end, JSON in .benchmarks/latest.json
    from .harness import E2EReporter

    if not config.pluginmanager.has_plugin(E2EReporter.name):
        config.pluginmanager.register(E2EReporter(config), E2EReporter.name)


@pytest.fixture(scope="session")
def e2e_reporter(request):
    from .harness import E2EReporter

    return request.config.pluginmanager.get_plugin(E2EReporter.name)


@pytest.fixture(scope="module")
def link():
    """The emulated gigabit link between two network namespaces (skips without root/iproute2)."""
    from .harness import LinkUnavailable, netns_link

    try:
        with netns_link() as built:
            yield built
    except LinkUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def guest():
    """A kernel-test guest for a benchmark module: the kernel tests' session guest when they booted
    one in this session (``pytest tests benchmarks``: one boot, not one per module), cleaned
    around the module, else a guest of the module's own."""
    import sys

    from tests.kernel import gadgets
    from tests.kernel.harness import Guest, skip_reason

    mod = sys.modules.get("tests.kernel.conftest")
    shared = next((g for g in getattr(mod, "_session_guest", None) or () if g.alive), None)
    if shared is not None:
        gadgets.reset(shared)
        yield shared
        if shared.alive:
            gadgets.reset(shared)
        return
    if os.environ.get("USBIP_SKIP_KERNEL_TESTS", "") not in ("", "0"):
        pytest.skip("USBIP_SKIP_KERNEL_TESTS is set")
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    g = Guest()
    try:
        g.start()
        yield g
    finally:
        g.shutdown()
