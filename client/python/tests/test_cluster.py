"""Against a Redis Cluster (three masters, from the Rust suite's testkit,
`EVICTD_TEST_REDIS_CLUSTER_URL`): evictd writes to it, and the sync and
asyncio caches over redis-py's Cluster clients fill, are fenced by a key
and by a tag whose set lives in another slot, and keep L1 exact through
the broadcast (subscribed on one node)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pytest
import redis.asyncio.cluster
import redis.cluster

from conftest import Evictd, _env
from evictd_cache import AsyncCache, Cache

from test_cache import read_user, upsert_user


def seed():
    url = urlparse(_env("EVICTD_TEST_REDIS_CLUSTER_URL"))
    return url.hostname, url.port


@pytest.fixture()
def on_cluster(tmp_path: Path, database_url: str, prefix: str) -> Iterator[Evictd]:
    running = Evictd(tmp_path, database_url, _env("EVICTD_TEST_REDIS_CLUSTER_URL"), prefix)
    yield running
    running.stop()


def test_fills_fences_and_l1_on_a_cluster(on_cluster, db, prefix):
    evictd = on_cluster
    host, port = seed()
    client = redis.cluster.RedisCluster(host=host, port=port)
    upsert_user(db, 80, "edsger")
    db.execute(
        "insert into orders (id, user_id, status) values (800, 80, 'new')"
        " on conflict (id) do update set user_id = 80, status = 'new'"
    )
    evictd.sync()
    cache = Cache(client, prefix=prefix)
    warm = Cache(client, prefix=prefix, l1_entries=100, l1_channel=prefix + "l1")
    try:
        assert warm.l1_wait_live("5s")
        assert cache.get_or_load("user:80", lambda: read_user(db, 80), tags=["user:80"]) == {
            "id": 80,
            "name": "edsger",
        }
        assert client.get(prefix + "user:80") == b'{"id":80,"name":"edsger"}'
        assert client.sismember(prefix + "tag:user:80", prefix + "user:80")

        def load_then(change):
            def load():
                value = read_user(db, 80)
                db.execute(change)
                evictd.sync()
                return value

            return load

        # Fenced by the key itself, then by the tag (its set in another slot).
        client.delete(prefix + "user:80")
        fenced = cache.get_or_load(
            "user:80", load_then("update users set name = 'edsger w' where id = 80"), tags=["user:80"]
        )
        assert fenced == {"id": 80, "name": "edsger"}
        cache.get_or_load(
            "user:80:dashboard",
            load_then("update orders set status = 'paid' where id = 800"),
            tags=["user:80"],
        )
        assert cache.metrics()["fenced"] == 2
        assert not client.exists(prefix + "user:80") and not client.exists(prefix + "user:80:dashboard")
        # L1 through the Cluster's broadcast.
        assert warm.l1_caught_up("5s")
        warm.get_or_load("user:80", lambda: read_user(db, 80))
        assert "user:80" in warm.l1_keys()
        db.execute("update users set name = 'edsger dijkstra' where id = 80")
        evictd.sync()
        assert warm.l1_caught_up("5s")
        assert "user:80" not in warm.l1_keys()
        assert warm.get_or_load("user:80", lambda: read_user(db, 80)) == {"id": 80, "name": "edsger dijkstra"}
        # Tags from the row: their stamps read across slots.
        assert cache.get_or_load(
            "order:800", lambda: {"id": 800}, row_tags=lambda order: ["user:80"]
        ) == {"id": 800}
        assert cache.metrics()["fills"] >= 2
    finally:
        warm.close()
        client.close()


def test_the_async_cache_on_a_cluster(on_cluster, db, prefix):
    evictd = on_cluster
    host, port = seed()
    upsert_user(db, 81, "tony")
    evictd.sync()

    async def scenario():
        client = redis.asyncio.cluster.RedisCluster(host=host, port=port)
        cache = AsyncCache(client, prefix=prefix, l1_entries=100, l1_channel=prefix + "l1")
        assert await cache.l1_wait_live("5s")
        assert await cache.l1_caught_up("5s")
        first = await cache.get_or_load("user:81", lambda: read_user(db, 81), tags=["user:81"])
        stored = await client.get(prefix + "user:81")

        async def load_then_commit():
            value = read_user(db, 81)
            db.execute("update users set name = 'tony hoare' where id = 81")
            await asyncio.get_running_loop().run_in_executor(None, evictd.sync)
            return value

        # A key L1 does not hold, under the user's tag.
        fenced = await cache.get_or_load("user:81:page", load_then_commit, tags=["user:81"])
        left = await client.exists(prefix + "user:81:page")
        await cache.get_or_load("user:81", lambda: read_user(db, 81))
        in_l1 = "user:81" in cache.l1_keys()
        db.execute("update users set name = 'c a r hoare' where id = 81")
        await asyncio.get_running_loop().run_in_executor(None, evictd.sync)
        caught_up = await cache.l1_caught_up("5s")
        evicted = "user:81" not in cache.l1_keys()
        await cache.aclose()
        await client.aclose()
        return first, stored, fenced, left, in_l1, caught_up, evicted, cache.metrics()

    first, stored, fenced, left, in_l1, caught_up, evicted, counts = asyncio.run(scenario())
    assert first == fenced == {"id": 81, "name": "tony"}
    assert stored == b'{"id":81,"name":"tony"}'
    assert left == 0 and counts["fenced"] == 1
    assert in_l1 and caught_up and evicted
