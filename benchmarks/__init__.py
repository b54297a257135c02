"""pytest-benchmark suites (run by scripts/bench; a smoke in scripts/test) and their harness."""
