"""Reading your own writes: the writer's commit position, waited for in
evictd's continuity record."""

from __future__ import annotations

import time

import pytest

from evictd_cache import Cache, commit_position, format_lsn, parse_lsn
from evictd_cache._position import before_page_header
from test_cache import read_user, upsert_user


def test_a_write_is_invalidated_once_wait_applied_returns(evictd, redis_client, db, prefix):
    cache = Cache(redis_client, prefix=prefix, slot=evictd.slot)
    upsert_user(db, 50, "radia")
    evictd.sync()
    assert cache.get_or_load("user:50", lambda: read_user(db, 50)) == {"id": 50, "name": "radia"}
    for round in range(5):
        name = f"radia perlman {round}"
        upsert_user(db, 50, name)
        cache.wait_applied(commit_position(db), timeout="10s")
        # No sync, no sleep: the next read sees the write.
        assert cache.get_or_load("user:50", lambda: read_user(db, 50)) == {"id": 50, "name": name}


def test_after_wait_applied_a_read_through_a_warm_l1_sees_the_write(evictd, redis_client, db, prefix):
    cache = Cache(redis_client, prefix=prefix, slot=evictd.slot, l1_entries=100, l1_channel=prefix + "l1")
    try:
        assert cache.l1_wait_live("5s")
        upsert_user(db, 51, "ada")
        evictd.sync()
        for round in range(5):
            assert cache.get_or_load("user:51", lambda: read_user(db, 51))["name"] in ("ada", f"ada {round - 1}")
            assert "user:51" in cache.l1_keys()
            name = f"ada {round}"
            upsert_user(db, 51, name)
            cache.wait_applied(commit_position(db), timeout="10s")
            # The key left this process's L1, not only Redis.
            assert cache.get_or_load("user:51", lambda: read_user(db, 51)) == {"id": 51, "name": name}
    finally:
        cache.close()


def test_a_position_evictd_has_not_reached_times_out_naming_both(evictd, redis_client, prefix):
    cache = Cache(redis_client, prefix=prefix, slot=evictd.slot)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="of FF/0 after 0.3 s"):
        cache.wait_applied(parse_lsn("FF/0"), timeout="300ms")
    assert time.monotonic() - started < 2


def test_positions():
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    with pytest.raises(ValueError, match="not a WAL position"):
        parse_lsn("16B374D848")
    segment, block = 16 << 20, 8192
    assert before_page_header(segment * 3 + 40, block, segment) == segment * 3
    assert before_page_header(segment * 3 + block + 24, block, segment) == segment * 3 + block
    assert before_page_header(segment * 3 + block + 25, block, segment) == segment * 3 + block + 25
