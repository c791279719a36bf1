"""Namespace versions against a real evictd: a mapping's `versions` bump
leaves every key cached under the namespace behind at once."""

from __future__ import annotations

import os

import pytest

from conftest import Evictd
from evictd_cache import Cache
from test_cache import upsert_user

USERS = """
[[table]]
name = "public.users"
keys = ["user:{id}"]
versions = ["user:{id}"]
"""


def test_a_namespace_bump_leaves_every_key_under_it_behind(tmp_path, database_url, prefix, redis_client, db):
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    (mappings / "users.toml").write_text(USERS)
    run = tmp_path / "run"
    run.mkdir()
    evictd = Evictd(run, database_url, os.environ["EVICTD_TEST_REDIS_URL"], prefix, mappings)
    try:
        cache = Cache(redis_client, prefix=prefix)
        upsert_user(db, 40, "alan")
        evictd.sync()
        before = cache.version("user:40")
        assert cache.get_or_load_in("user:40", "orders", lambda: ["o1"]) == ["o1"]
        assert cache.get_or_load_in("user:40", "orders", lambda: pytest.fail("a hit")) == ["o1"]
        assert redis_client.exists(prefix + f"user:40@{before}:orders")
        upsert_user(db, 40, "alan turing")
        evictd.sync()
        after = cache.version("user:40")
        assert after > before
        assert cache.versioned("user:40", "orders") == f"user:40@{after}:orders"
        assert cache.get_or_load_in("user:40", "orders", lambda: ["o2"]) == ["o2"]

        # With L1: the version and the value are both kept in process, and
        # the bump's broadcast evicts the version.
        warm = Cache(redis_client, prefix=prefix, l1_entries=100, l1_channel=prefix + "l1")
        assert warm.l1_wait_live("5s")
        assert warm.get_or_load_in("user:40", "orders", lambda: pytest.fail("in Redis")) == ["o2"]
        assert set(warm.l1_keys()) == {"evictd:ns:user:40", f"user:40@{after}:orders"}
        redis_client.delete(prefix + "evictd:ns:user:40", prefix + f"user:40@{after}:orders")
        assert warm.get_or_load_in("user:40", "orders", lambda: pytest.fail("in L1")) == ["o2"]
        upsert_user(db, 40, "alan m turing")
        evictd.sync()
        assert warm.l1_caught_up("5s")
        assert "evictd:ns:user:40" not in warm.l1_keys()
        assert warm.version("user:40") > after
        assert warm.get_or_load_in("user:40", "orders", lambda: ["o3"]) == ["o3"]
        warm.close()
    finally:
        evictd.stop()
