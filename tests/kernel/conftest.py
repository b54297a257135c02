"""pytest glue for the kernel tests (tests/kernel).

* every test collected under tests/kernel gets the ``kernel`` marker
  (select/deselect with ``-m kernel`` / ``-m "not kernel"``);
* they are skipped when :func:`harness.skip_reason` says the VM cannot run
  (not root, no qemu, no kernel with usbip modules) or when
  ``USBIP_SKIP_KERNEL_TESTS=1``;
* ``guest``: one VM per session, shared by all kernel tests.  The guest's TCP
  ports in ``FORWARDED_PORTS`` are reachable from the host at
  ``guest.host_port(guest_port)`` on 127.0.0.1;
* ``clean_guest``: the shared guest, reset (vhci ports detached, usbip-host
  unbound, usbipd stopped, gadgets removed) before and after the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import gadgets
from .harness import Guest, skip_reason

KERNEL_DIR = Path(__file__).resolve().parent
#: guest TCP ports forwarded from host 127.0.0.1:<free port> in the session guest
FORWARDED_PORTS = (3240, 3241, 3242, 3243)

_skip_cache: list[str | None] = []


def _skip() -> str | None:
    if not _skip_cache:
        if os.environ.get("USBIP_SKIP_KERNEL_TESTS", "") not in ("", "0"):
            _skip_cache.append("USBIP_SKIP_KERNEL_TESTS is set")
        else:
            _skip_cache.append(skip_reason())
    return _skip_cache[0]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kernel: runs inside a QEMU guest with a real Linux USB stack "
        "(tests/kernel; needs root + qemu-system-x86 + linux-image-amd64)",
    )


def _is_kernel_item(item: pytest.Item) -> bool:
    try:
        Path(str(item.path)).resolve().relative_to(KERNEL_DIR)
    except ValueError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    for item in items:
        if not _is_kernel_item(item):
            continue
        item.add_marker(pytest.mark.kernel)
        if reason is None:
            reason = _skip() or ""
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


_session_guest: list[Guest] = []


@pytest.fixture(scope="session")
def guest():
    """The shared kernel-test VM (booted once per session)."""
    reason = _skip()
    if reason:
        pytest.skip(reason)
    g = Guest(hostfwd=FORWARDED_PORTS)
    _session_guest.append(g)
    try:
        g.start()
        yield g
    finally:
        g.shutdown()
        _session_guest.remove(g)


@pytest.fixture
def clean_guest(guest):
    """The shared guest, reset to a clean USB/usbip state around the test."""
    gadgets.reset(guest)
    yield guest
    if guest.alive:
        gadgets.reset(guest)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _session_guest and _is_kernel_item(item):
        g = _session_guest[0]
        report.sections.append((f"guest console ({g.console_log})", g.console_tail(60)))
