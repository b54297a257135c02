"""Socket options of usbip.net.netio, read back with getsockopt (Linux option numbers: man 7 tcp)."""

from __future__ import annotations

import contextlib
import math
import socket
import sys
from collections.abc import Iterator

import pytest

from usbip.net import netio
from usbip.server.limits import ServerLimits

LINUX = sys.platform.startswith("linux")
needs_tcp_options = pytest.mark.skipif(
    not all(hasattr(socket, n) for n in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT")),
    reason="this platform's socket module lacks TCP_KEEPIDLE/TCP_KEEPINTVL/TCP_KEEPCNT/TCP_USER_TIMEOUT",
)


def tcp_opt(sock: socket.socket, name: str) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))


def keepalive_on(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))


@contextlib.contextmanager
def connected_pair(family: int = socket.AF_INET) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(accepted, connecting) TCP sockets over loopback: the options must hold on a live connection."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_STREAM) as lsock:
        lsock.bind((host, 0))
        lsock.listen(1)
        cli = socket.create_connection(lsock.getsockname()[:2], timeout=5)
        srv, _ = lsock.accept()
        try:
            yield srv, cli
        finally:
            srv.close()
            cli.close()


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# ---------------------------------------------------------------- the formula
@pytest.mark.parametrize(
    ("timeout", "expected"),
    [
        (45, (22, 7, 3)),
        (45.9, (22, 7, 3)),
        (60, (30, 10, 3)),
        (6, (3, 1, 3)),
        (10, (5, 1, 3)),
        (3, (1, 1, 3)),
        (0.5, (1, 1, 3)),
        (7200, (3600, 1200, 3)),
    ],
)
def test_keepalive_params(timeout: float, expected: tuple[int, int, int]) -> None:
    assert netio.keepalive_params(timeout) == expected
    assert ServerLimits(dead_peer_timeout=timeout).keepalive() == expected  # one formula


@pytest.mark.parametrize("timeout", [5, 6, 7.5, 9, 13, 30, 45, 59, 60, 61, 300, 86400])
def test_keepalive_params_never_exceed_the_timeout(timeout: float) -> None:
    idle, interval, count = netio.keepalive_params(timeout)
    assert idle >= 1 and interval >= 1 and count >= 1
    assert idle + interval * count <= timeout


@pytest.mark.parametrize("timeout", [1e9, math.inf])
def test_keepalive_params_clamped_to_kernel_maxima(timeout: float) -> None:
    idle, interval, count = netio.keepalive_params(timeout)
    assert idle <= netio.MAX_KEEPIDLE and interval <= netio.MAX_KEEPINTVL and count <= netio.MAX_KEEPCNT


@pytest.mark.parametrize("timeout", [0, -1, math.nan])
def test_keepalive_params_rejects_non_positive(timeout: float) -> None:
    with pytest.raises(ValueError):
        netio.keepalive_params(timeout)


def test_linux_option_numbers() -> None:
    """The values man 7 tcp / <netinet/tcp.h> give, as Python's socket module exposes them."""
    if not LINUX:
        pytest.skip("Linux option numbers")
    assert (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT) == (4, 5, 6)
    assert socket.TCP_USER_TIMEOUT == 18


# ---------------------------------------------------------------- set_keepalive
def test_set_keepalive_alone_leaves_the_system_defaults() -> None:
    with connected_pair() as (srv, _cli):
        before = {n: tcp_opt(srv, n) for n in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")} if LINUX else {}
        user_before = tcp_opt(srv, "TCP_USER_TIMEOUT") if LINUX else 0
        netio.set_keepalive(srv)
        assert keepalive_on(srv)
        for name, value in before.items():
            assert tcp_opt(srv, name) == value
        if LINUX:
            assert tcp_opt(srv, "TCP_USER_TIMEOUT") == user_before == 0


@needs_tcp_options
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_set_keepalive_options_read_back(family: int) -> None:
    if family == socket.AF_INET6 and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    with connected_pair(family) as (srv, _cli):
        netio.set_keepalive(srv, idle=11, interval=4, count=5, user_timeout=2.5)
        assert keepalive_on(srv)
        assert tcp_opt(srv, "TCP_KEEPIDLE") == 11
        assert tcp_opt(srv, "TCP_KEEPINTVL") == 4
        assert tcp_opt(srv, "TCP_KEEPCNT") == 5
        assert tcp_opt(srv, "TCP_USER_TIMEOUT") == 2500


@needs_tcp_options
def test_set_keepalive_only_given_options() -> None:
    with connected_pair() as (srv, _cli):
        default_idle = tcp_opt(srv, "TCP_KEEPIDLE")
        netio.set_keepalive(srv, interval=2)
        assert tcp_opt(srv, "TCP_KEEPINTVL") == 2
        assert tcp_opt(srv, "TCP_KEEPIDLE") == default_idle
        assert tcp_opt(srv, "TCP_USER_TIMEOUT") == 0


@needs_tcp_options
def test_set_keepalive_on_an_unconnected_socket() -> None:
    """Options set before connect() (a client may do that) hold too."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        netio.set_keepalive(s, 7, 2, 3, user_timeout=0.001)
        assert (tcp_opt(s, "TCP_KEEPIDLE"), tcp_opt(s, "TCP_KEEPINTVL"), tcp_opt(s, "TCP_KEEPCNT")) == (7, 2, 3)
        assert tcp_opt(s, "TCP_USER_TIMEOUT") == 1


@needs_tcp_options
def test_user_timeout_zero_and_huge() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        netio.set_keepalive(s, user_timeout=5)
        netio.set_keepalive(s, user_timeout=0)  # 0: back to the system default
        assert tcp_opt(s, "TCP_USER_TIMEOUT") == 0
        netio.set_keepalive(s, user_timeout=1e12)
        assert tcp_opt(s, "TCP_USER_TIMEOUT") == netio.MAX_USER_TIMEOUT_MS


@pytest.mark.parametrize(
    "kwargs",
    [{"idle": 0}, {"interval": 0}, {"count": 0}, {"count": 128}, {"idle": 40000}, {"user_timeout": -1}],
)
def test_set_keepalive_rejects_out_of_range(kwargs: dict[str, float]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(ValueError):
        netio.set_keepalive(s, **kwargs)  # type: ignore[arg-type]


def test_set_keepalive_ignores_non_inet_sockets() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        netio.set_keepalive(a, 3, 1, 3, user_timeout=6)
        netio.apply_dead_peer_timeout(b, 6)
        assert not keepalive_on(a) and not keepalive_on(b)


def test_platform_without_the_tcp_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket module without TCP_KEEPIDLE & co: SO_KEEPALIVE still set, no error."""
    for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT"):
        monkeypatch.delattr(socket, name, raising=False)
    with connected_pair() as (srv, _cli):
        netio.set_keepalive(srv, 3, 1, 3, user_timeout=6)
        netio.apply_dead_peer_timeout(srv, 6)
        assert keepalive_on(srv)
        if LINUX:  # nothing else was set: the raw Linux numbers still read the defaults
            assert srv.getsockopt(socket.IPPROTO_TCP, 18) == 0  # TCP_USER_TIMEOUT
            assert srv.getsockopt(socket.IPPROTO_TCP, 5) != 1  # TCP_KEEPINTVL (default 75)


# ---------------------------------------------------------------- apply_dead_peer_timeout
@needs_tcp_options
@pytest.mark.parametrize(
    ("timeout", "keepalive", "user_ms"),
    [(6, (3, 1, 3), 6000), (45, (22, 7, 3), 45000), (60, (30, 10, 3), 60000), (0.25, (1, 1, 3), 250)],
)
def test_apply_dead_peer_timeout(timeout: float, keepalive: tuple[int, int, int], user_ms: int) -> None:
    with connected_pair() as (srv, _cli):
        netio.apply_dead_peer_timeout(srv, timeout)
        assert keepalive_on(srv)
        got = (tcp_opt(srv, "TCP_KEEPIDLE"), tcp_opt(srv, "TCP_KEEPINTVL"), tcp_opt(srv, "TCP_KEEPCNT"))
        assert got == keepalive == ServerLimits(dead_peer_timeout=timeout).keepalive()
        assert tcp_opt(srv, "TCP_USER_TIMEOUT") == user_ms


@needs_tcp_options
def test_server_limits_default_is_within_a_minute() -> None:
    timeout = ServerLimits().dead_peer_timeout
    with connected_pair() as (srv, _cli):
        netio.apply_dead_peer_timeout(srv, timeout)
        idle, interval, count = (tcp_opt(srv, n) for n in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"))
        assert idle + interval * count <= 60
        assert 0 < tcp_opt(srv, "TCP_USER_TIMEOUT") <= 60_000
