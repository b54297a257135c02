"""Capture defaults the command-line tools need for their options (light: the capture machinery
itself is imported only when a capture is asked for)."""

DEFAULT_MAX_MB = 100.0  # size bound of a capture file (--capture-max-mb; 0: none)
