"""``usbipd --config FILE``: the command line's long options, as TOML.

Every key is a long option without its dashes, with the value the option takes::

    host = "0.0.0.0"
    tcp-port = 3240
    virtual = ["loopback", "keyboard:hello"]   # repeatable options take lists
    no-libusb = true                            # flags take booleans
    allow = ["192.0.2.0/24"]
    tls-cert = "/etc/cyusbip/server.pem"

The keys come from the parser itself, so the file and the command line can never disagree
about what exists. The command line wins over the file (a repeatable option adds to the
file's list). An unknown key or a value of the wrong kind is a :class:`ConfigError` naming
the key and its line.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from ..errors import CyusbipError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: keys that make no sense in a file (they act at once, or name the file itself)
NOT_IN_FILE = {"help", "version", "config"}


class ConfigError(CyusbipError, ValueError):
    """The configuration file cannot be used: the message names the file, line and key."""


def _line_of(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*(\"{re.escape(key)}\"|'{re.escape(key)}'|{re.escape(key)})\s*=", re.MULTILINE)
    m = pattern.search(text)
    return None if m is None else text.count("\n", 0, m.start()) + 1


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public accessor for its actions
        for opt in action.option_strings:
            if opt.startswith("--") and opt[2:] not in NOT_IN_FILE:
                out[opt[2:]] = action
    return out


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    kind = type(action).__name__
    if kind in ("_StoreTrueAction", "_StoreFalseAction"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, not {value!r}")
        return value if kind == "_StoreTrueAction" else not value
    if kind == "_AppendAction":
        items = value if isinstance(value, list) else [value]
        return [_one(action, item, where) for item in items]
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: expected a single value, not {value!r}")
    return _one(action, value, where)


def _one(action: argparse.Action, value: Any, where: str) -> Any:
    convert = action.type or str
    names: dict[object, str] = {str: "a string", int: "an integer", float: "a number"}
    expected = names.get(convert, "a string")
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: expected {expected}, not {value!r}")
    if convert is int and not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, not {value!r}")
    if convert is float and not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, not {value!r}")
    if convert is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, not {value!r}")
    try:
        out = convert(value)  # type: ignore[operator]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if action.choices is not None and out not in action.choices:
        raise ConfigError(f"{where}: {out!r} is not one of {', '.join(map(str, action.choices))}")
    return out


def load(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The parser defaults ``path`` sets ({dest: value}); ConfigError when it cannot be used."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc.strerror or exc}") from None
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    options = _options(parser)
    out: dict[str, Any] = {}
    for key, value in data.items():
        line = _line_of(text, key)
        where = f"{path}" + (f", line {line}" if line else "") + f": {key}"
        action = options.get(key)
        if action is None:
            hint = " (tables are not used: every key is a long option)" if isinstance(value, dict) else ""
            raise ConfigError(f"{where}: unknown key{hint}")
        out[action.dest] = _convert(action, value, where)
    return out


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, with the values of ``--config FILE`` (if given) as the defaults.

    A bad file exits like a bad command line: the parser prints the error, exit code 2.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _rest = pre.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**load(known.config, parser))
        except ConfigError as exc:
            parser.error(str(exc))
    return parser.parse_args(argv)


__all__ = ["ConfigError", "load", "parse_args"]
