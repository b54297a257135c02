"""The URB buffer pool, both twins: acquire/release/reuse, view safety, recv_into."""

from __future__ import annotations

import gc
import socket

import pytest


def test_acquire_exact_size_and_capacity_classes(pool_impl) -> None:
    pool = pool_impl.BufferPool()
    for size, cap in [(0, 512), (1, 512), (512, 512), (513, 1024), (4096, 4096), (70000, 131072)]:
        buf = pool.acquire(size)
        assert len(buf) == size
        assert len(memoryview(buf)) == size
        assert buf.capacity == cap
        assert buf.in_use
        pool.release(buf)
        assert not buf.in_use
    with pytest.raises(ValueError):
        pool.acquire(-1)


def test_buffers_are_writable_and_clear(pool_impl) -> None:
    pool = pool_impl.BufferPool()
    buf = pool.acquire(10)
    mv = memoryview(buf)
    assert not mv.readonly
    mv[:] = b"0123456789"
    assert bytes(buf) == b"0123456789"
    del mv
    buf.clear()
    assert bytes(buf) == bytes(10)


def test_clear_zeroes_whatever_a_view_wrote(pool_impl) -> None:
    """clear() may skip its memset only while no view was taken since the buffer was zeroed
    (the compiled pool's fast path): writes through a live view, or one since released, count."""
    pool = pool_impl.BufferPool()
    buf = pool.acquire(64)
    buf.clear()  # fresh: zeros either way
    assert bytes(buf) == bytes(64)
    mv = memoryview(buf)
    mv[:4] = b"abcd"
    buf.clear()
    assert bytes(buf) == bytes(64)
    mv[10:12] = b"xy"  # the view outlived the clear: the next one must still zero
    buf.clear()
    assert bytes(buf) == bytes(64)
    mv.release()
    pool.release(buf)
    again = pool.acquire(64)
    with memoryview(again) as view:
        view[:] = b"\xa5" * 64
    again.clear()
    assert bytes(again) == bytes(64)


def test_reply_view_sends_the_first_bytes_and_keeps_the_buffer(pool_impl) -> None:
    pool = pool_impl.BufferPool()
    buf = pool.acquire(1000)
    with memoryview(buf) as mv:
        mv[:3] = b"abc"
    view = pool.view(buf, 3)
    assert bytes(view) == b"abc" and len(pool.view(buf, 1000)) == 1000
    pool.release(buf)
    assert pool.cached == 0  # the reply still holds it
    del view
    gc.collect()
    again = pool.acquire(1000)  # the compiled pool takes it back once the reply is gone
    assert bytes(again) == bytes(1000) and (again is buf) == (pool_impl.IMPLEMENTATION == "cython")
    other = bytearray(b"xyz")
    assert bytes(pool.view(other, 2)) == b"xy"  # not the pool's: a plain view


def test_buffer_left_zero_is_not_written_by_its_reply(pool_impl) -> None:
    """A buffer sent as it came (zeros) and released comes back zeroed; one written comes back zeroed too."""
    pool = pool_impl.BufferPool()
    buf = pool.acquire(4096)
    buf.clear()
    reply = pool.view(buf, 4096)
    if pool_impl.IMPLEMENTATION == "cython":
        assert reply.readonly
    reply.release()
    pool.release(buf)
    again = pool.acquire(4096)
    assert again is buf and bytes(again) == bytes(4096)
    with memoryview(again) as mv:
        mv[4000:] = b"\x01" * 96
    pool.view(again, 4096).release()
    pool.release(again)
    third = pool.acquire(4096)
    assert third is buf and bytes(third) == bytes(4096)


def test_release_and_reuse(pool_impl) -> None:
    pool = pool_impl.BufferPool()
    a = pool.acquire(1000)
    assert pool.outstanding == 1 and pool.cached == 0
    pool.release(a)
    assert pool.outstanding == 0 and pool.cached == 1
    b = pool.acquire(600)  # same 1024 class: the released buffer comes back, resized
    assert b is a and len(b) == 600 and pool.cached == 0
    c = pool.acquire(600)
    assert c is not b and pool.outstanding == 2
    pool.release(b)
    pool.release(c)
    assert pool.cached == 2
    d = pool.acquire(100)  # a different class does not take them
    assert d is not b and d is not c and pool.cached == 2


def test_double_release_is_harmless(pool_impl) -> None:
    pool = pool_impl.BufferPool()
    a = pool.acquire(10)
    pool.release(a)
    pool.release(a)
    assert pool.outstanding == 0 and pool.cached == 1
    b, c = pool.acquire(10), pool.acquire(10)
    assert b is a and c is not a  # handed out once only


def test_foreign_buffer_is_ignored(pool_impl) -> None:
    p1, p2 = pool_impl.BufferPool(), pool_impl.BufferPool()
    a = p1.acquire(10)
    p2.release(a)  # not p2's: ignored
    assert p2.cached == 0 and p2.outstanding == 0 and a.in_use
    p1.release(a)
    assert p1.cached == 1


def test_limits(pool_impl) -> None:
    pool = pool_impl.BufferPool(max_pooled=1024, max_free=2)
    big = pool.acquire(2048)
    pool.release(big)
    assert pool.cached == 0  # over max_pooled: dropped
    bufs = [pool.acquire(100) for _ in range(4)]
    for b in bufs:
        pool.release(b)
    assert pool.cached == 2  # max_free per class
    assert pool.outstanding == 0


def test_buffer_with_live_view_is_not_handed_out(pool_impl) -> None:
    pool = pool_impl.BufferPool()
    a = pool.acquire(100)
    view = memoryview(a)
    view[:4] = b"live"
    pool.release(a)
    # while the view is alive the memory must not be reused
    others = [pool.acquire(100) for _ in range(3)]
    assert all(o is not a for o in others)
    for o in others:
        memoryview(o)[:4] = b"XXXX"
    assert bytes(view[:4]) == b"live"
    for o in others:
        pool.release(o)
    cached_before = pool.cached
    view.release()
    del view
    gc.collect()
    if pool_impl.IMPLEMENTATION == "cython":
        # the last view going away returns the buffer to the pool
        assert pool.cached == cached_before + 1
        got = [pool.acquire(100) for _ in range(4)]
        assert any(g is a for g in got)
    else:
        # the pure pool cannot learn when the view dies: the buffer is simply not reused
        assert pool.cached == cached_before
        got = [pool.acquire(100) for _ in range(4)]
        assert all(g is not a for g in got)


def test_slices_of_views_also_pin_the_buffer(pool_impl) -> None:
    pool = pool_impl.BufferPool()
    a = pool.acquire(64)
    part = memoryview(a)[10:20]
    pool.release(a)
    assert pool.acquire(64) is not a
    del part


def test_socketpair_recv_into_pooled_buffer(pool_impl) -> None:
    pool = pool_impl.BufferPool()
    left, right = socket.socketpair()
    with left, right:
        payload = bytes(range(256)) * 40  # 10240 bytes
        left.sendall(payload)
        buf = pool.acquire(len(payload))
        got = 0
        view = memoryview(buf)
        while got < len(payload):
            n = right.recv_into(view[got:])
            assert n > 0
            got += n
        assert bytes(buf) == payload
        # and send straight from a pooled buffer
        right.sendall(view[:100])
        out = pool.acquire(100)
        assert left.recv_into(out) == 100
        assert bytes(out) == payload[:100]
        del view
        pool.release(buf)
        pool.release(out)
        assert pool.outstanding == 0


def test_pool_module_selects_a_twin() -> None:
    from usbip import pool

    assert pool.IMPLEMENTATION in ("python", "cython")
    buf = pool.BufferPool().acquire(8)
    assert isinstance(buf, pool.PoolBuffer) and len(buf) == 8


def test_view_released_after_the_pool_is_dropped(pool_impl) -> None:
    # The last reference to a pool can be a released buffer's link back to it: recycling
    # that buffer when its last view goes must not touch a freed pool.
    for _ in range(500):
        pool = pool_impl.BufferPool()
        buf = pool.acquire(1000)
        view = memoryview(buf)
        pool.release(buf)
        del pool, buf
        view[:3] = b"abc"
        del view
    gc.collect()
