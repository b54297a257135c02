"""usbipd --config: TOML keys are the long options; errors name the key and the line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from usbip.cli import config
from usbip.cli.usbipd_main import build_parser, limits_from_args


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "usbipd.toml"
    p.write_text(text)
    return str(p)


def test_keys_are_the_long_options_and_the_command_line_wins(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
# a comment
host = "127.0.0.1"
tcp-port = 4000
virtual = ["loopback", "keyboard:hi"]
no-libusb = true
allow = ["10.0.0.0/8"]
connection-budget = 16
dead-peer-timeout = 20
libusb-events = "thread"
""",
    )
    args = config.parse_args(build_parser(), ["--config", path, "-t", "5000", "--virtual", "serial"])
    assert args.host == "127.0.0.1" and args.tcp_port == 5000
    assert args.virtual == ["loopback", "keyboard:hi", "serial"]  # repeatable options add to the file's
    assert args.no_libusb is True and args.allow == ["10.0.0.0/8"] and args.libusb_events == "thread"
    limits = limits_from_args(args)
    assert limits.connection_budget == 16 * 1024 * 1024 and limits.dead_peer_timeout == 20
    plain = config.parse_args(build_parser(), ["-t", "5000"])
    assert plain.host is None and plain.virtual == []


@pytest.mark.parametrize(
    "text,message",
    [
        ('host = "x"\nbogus = 1\n', "line 2: bogus: unknown key"),
        ('tcp-port = "3240"\n', "line 1: tcp-port: expected an integer"),
        ("no-libusb = 1\n", "line 1: no-libusb: expected true or false"),
        ('libusb-events = "spin"\n', "libusb-events: 'spin' is not one of pollfd, thread"),
        ("virtual = [1]\n", "virtual: expected a string"),
        ("[server]\nhost = 'x'\n", "server: unknown key (tables are not used"),
        ("host = \n", "not valid TOML"),
        ("version = true\n", "version: unknown key"),
    ],
)
def test_bad_files_exit_2_naming_key_and_line(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as exc:
        config.parse_args(build_parser(), ["--config", path])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and path in err, err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        config.parse_args(build_parser(), ["--config", str(tmp_path / "nope.toml")])
    assert exc.value.code == 2 and "cannot read the configuration file" in capsys.readouterr().err


def test_loop_uvloop_without_uvloop_exits_2(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    from usbip.cli import exitcodes, usbipd_main

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert usbipd_main.main(["--loop", "uvloop", "--no-libusb", "--no-announce"]) == exitcodes.USAGE
    assert "cyusbip[uvloop]" in capfd.readouterr().err
