"""Shared machinery of the end-to-end benchmarks (test_e2e.py, test_gigabit.py, test_tls.py, report.py),
one module per concern (settings, procs, runner, netlink, tables, reporter).

* :class:`ServerProc` starts a USB/IP server (the C ceiling, our usbipd compiled or pure)
  on a free port, learns the port from its banner and stops it cleanly.
* :func:`run_load` runs one load generator (the C ``loadgen`` or our client's
  ``python3 -m usbip.client.bench``) against one server and samples the server's CPU time
  (utime + stime of the server and its children, from /proc) over the measured window.
* :func:`interleaved` runs a case against several servers in turn (A, B, C, A, B, C, ...)
  and keeps the medians, so that the machine's background load hits every server alike.
* :func:`netns_link` builds the emulated gigabit link (two network namespaces, a shaped veth pair).
* :func:`tls_doc` / :func:`tls_rows`: our usbipd plain against the same usbipd serving TLS.

No wall-clock figure is ever asserted; only the medians' ratios are reported.
"""

from __future__ import annotations

from ..tools.build import BuildError, build
from .netlink import LinkUnavailable, netns_link
from .procs import ServerProc
from .reporter import E2EReporter
from .runner import Case, CaseResult, interleaved, started_servers
from .settings import CEILING, OURS, PURE, PYTHON, REPO, env_flag, env_float, env_int, run_settings
from .tables import (
    KERNEL,
    PLAIN,
    TLS,
    TLS_NOTE,
    format_table,
    gigabit_line,
    lvk_doc,
    machine_info,
    metric_label,
    table_rows,
    tls_doc,
    tls_line,
    tls_rows,
)

__all__ = [
    "CEILING",
    "KERNEL",
    "OURS",
    "PLAIN",
    "PURE",
    "PYTHON",
    "REPO",
    "TLS",
    "TLS_NOTE",
    "BuildError",
    "Case",
    "CaseResult",
    "E2EReporter",
    "LinkUnavailable",
    "ServerProc",
    "build",
    "env_flag",
    "env_float",
    "env_int",
    "format_table",
    "gigabit_line",
    "interleaved",
    "lvk_doc",
    "machine_info",
    "metric_label",
    "netns_link",
    "run_settings",
    "started_servers",
    "table_rows",
    "tls_doc",
    "tls_line",
    "tls_rows",
]
