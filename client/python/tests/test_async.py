"""The asyncio cache against a real evictd: the same protocol as the
synchronous one, awaited."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from evictd_cache import AsyncCache

from test_cache import read_user, upsert_user


def run(coroutine):
    return asyncio.run(coroutine)


def client():
    return redis.asyncio.Redis.from_url(__import__("os").environ["EVICTD_TEST_REDIS_URL"])


def test_an_async_fill_is_stored_and_one_that_read_before_a_commit_is_fenced(evictd, db, prefix, redis_client):
    upsert_user(db, 11, "barbara")
    evictd.sync()  # the setup's own invalidations land before the reads

    async def scenario():
        r = client()
        cache = AsyncCache(r, prefix=prefix)

        async def load():
            return read_user(db, 11)

        first = await cache.get_or_load("user:11", load, tags=["user:11"])
        again = await cache.get_or_load("user:11", load)

        async def load_then_commit():
            value = read_user(db, 11)
            upsert_user(db, 11, "barbara liskov")
            evictd.sync()
            return value

        await cache.invalidate("user:11")
        fenced = await cache.get_or_load("user:11", load_then_commit, tags=["user:11"])
        left = await cache.get("user:11")
        await r.aclose()
        return first, again, fenced, left, cache.metrics()

    first, again, fenced, left, counts = run(scenario())
    assert first == again == {"id": 11, "name": "barbara"}
    assert fenced == {"id": 11, "name": "barbara"}
    assert left is None
    assert (counts["fills"], counts["hits"], counts["fenced"]) == (1, 1, 1)


def test_the_async_decorator_and_one_load_per_key(evictd, db, prefix):
    upsert_user(db, 12, "frances")
    evictd.sync()
    calls = []

    async def scenario():
        r = client()
        cache = AsyncCache(r, prefix=prefix, ttl=60)

        @cache.cached(key="user:{user_id}", tags=["user:{user_id}"])
        async def profile(user_id):
            calls.append(user_id)
            await asyncio.sleep(0.1)
            return read_user(db, user_id)

        results = await asyncio.gather(*[profile(12) for _ in range(5)])
        upsert_user(db, 12, "frances allen")
        evictd.sync()
        after = await profile(user_id=12)
        await r.aclose()
        return results, after, cache.metrics()

    results, after, counts = run(scenario())
    assert results == [{"id": 12, "name": "frances"}] * 5
    assert after == {"id": 12, "name": "frances allen"}
    assert calls == [12, 12]
    assert counts["single_flight_waits"] == 4

    with pytest.raises(TypeError, match="is not async"):
        AsyncCache(redis.asyncio.Redis(), prefix=prefix).cached(key="k")(lambda: None)


def test_redis_down_reads_the_database_async(prefix):
    async def scenario():
        gone = redis.asyncio.Redis(
            host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=AsyncRetry(NoBackoff(), 0)
        )
        cache = AsyncCache(gone, prefix=prefix)
        value = await cache.get_or_load("k", lambda: "from the database")
        return value, cache.metrics()["degraded"]

    assert run(scenario()) == ("from the database", 1)


def test_async_l1_is_one_task_evicted_by_the_broadcast(evictd, db, prefix, redis_client):
    upsert_user(db, 13, "jean")
    evictd.sync()

    async def scenario():
        r = client()
        cache = AsyncCache(r, prefix=prefix, l1_entries=100, l1_channel=prefix + "l1")
        assert await cache.l1_wait_live("5s")
        first = await cache.get_or_load("user:13", lambda: read_user(db, 13), tags=["user:13"])
        redis_client.delete(prefix + "user:13")  # L1 answers without Redis
        hit = await cache.get_or_load("user:13", lambda: "not this")
        tasks = [t.get_name() for t in asyncio.all_tasks()]
        upsert_user(db, 13, "jean sammet")
        await asyncio.get_running_loop().run_in_executor(None, evictd.sync)
        assert await cache.l1_caught_up("5s")
        evicted = "user:13" not in cache.l1_keys()
        after = await cache.get_or_load("user:13", lambda: read_user(db, 13))
        # A gap the log cannot fill: flushed.
        await cache.get_or_load("user:14", lambda: "other")
        epoch, seq = redis_client.get(prefix + "evictd:l1:last").decode().rsplit(":", 1)
        redis_client.delete(prefix + "evictd:l1:log")
        redis_client.publish(prefix + "l1", json.dumps({"epoch": epoch, "seq": int(seq) + 5, "keys": []}))
        for _ in range(500):
            if cache.metrics()["l1_flushes"] >= 2:
                break
            await asyncio.sleep(0.01)
        flushed = cache.l1_keys()
        await cache.aclose()
        await r.aclose()
        return first, hit, tasks, evicted, after, flushed, cache.metrics()

    first, hit, tasks, evicted, after, flushed, counts = run(scenario())
    assert first == hit == {"id": 13, "name": "jean"}
    assert tasks.count("evictd-l1") == 1
    assert evicted
    assert after == {"id": 13, "name": "jean sammet"}
    assert flushed == [] and counts["l1_flushes"] == 2
    assert counts["l1_hits"] == 1
