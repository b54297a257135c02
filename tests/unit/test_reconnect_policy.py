"""ReconnectPolicy / Backoff: the delays between re-imports (usbip/client/reconnect.py)."""

from __future__ import annotations

import math

import pytest

from usbip.client import ReconnectPolicy
from usbip.client.reconnect import Backoff


def test_defaults_double_from_one_second_to_thirty() -> None:
    p = ReconnectPolicy(jitter=0.0)
    assert [p.delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert p.delay(10_000) == 30  # no overflow however long the outage


def test_jitter_stays_within_its_share_of_the_delay() -> None:
    p = ReconnectPolicy()  # jitter 0.5
    assert p.delay(3, rand=lambda: 0.0) == 8
    assert p.delay(3, rand=lambda: 0.999999) == pytest.approx(4, rel=1e-5)
    assert p.delay(9, rand=lambda: 1.0) == 15


def test_backoff_counts_attempts_stops_and_resets() -> None:
    b = Backoff(ReconnectPolicy(initial_delay=0.5, max_delay=1.0, jitter=0.0, max_attempts=3))
    assert [b.next_delay() for _ in range(4)] == [0.5, 1.0, 1.0, None]
    assert b.exhausted and b.attempt == 3
    b.reset()
    assert not b.exhausted and b.next_delay() == 0.5
    unbounded = Backoff(ReconnectPolicy(jitter=0.0))
    assert all(unbounded.next_delay() is not None for _ in range(1000))


@pytest.mark.parametrize(
    "kw",
    [
        {"initial_delay": -1},
        {"max_delay": math.inf},
        {"initial_delay": 5, "max_delay": 1},
        {"factor": 0.5},
        {"jitter": 1.5},
        {"max_attempts": 0},
        {"wait_timeout": math.nan},
    ],
)
def test_nonsense_is_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ReconnectPolicy(**kw)  # type: ignore[arg-type]
