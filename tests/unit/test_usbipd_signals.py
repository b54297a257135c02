"""usbipd's SIGTERM/SIGINT handling: the first signal stops cleanly, a second one exits at once."""

from __future__ import annotations

import asyncio
import signal

from usbip.cli import exitcodes
from usbip.cli.usbipd_main import stop_on_signal


def test_first_signal_stops_second_exits_now(caplog):
    stop = asyncio.Event()
    exits: list[int] = []
    on_signal = stop_on_signal(stop, exits.append)
    on_signal(signal.SIGTERM)
    assert stop.is_set() and exits == []  # a clean shutdown starts, nothing exits yet
    on_signal(signal.SIGINT)
    assert exits == [exitcodes.FAILURE]
    assert "SIGINT again while shutting down" in caplog.text
