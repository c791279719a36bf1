"""A cache's counters published to Redis for `evictd report`: one hash
per instance, refreshed on an interval and once more on close, listed in
the sorted set `evictd:clients`."""

from __future__ import annotations

import asyncio
import os
import time

import redis
import redis.asyncio

from evictd_cache import AsyncCache, Cache


def published(redis_client, prefix):
    """Each listed instance's hash, decoded."""
    instances = redis_client.zrange(prefix + "evictd:clients", 0, -1)
    return {
        instance.decode(): {k.decode(): v.decode() for k, v in redis_client.hgetall(prefix + "evictd:clients:" + instance.decode()).items()}
        for instance in instances
    }


def test_counters_are_published_on_an_interval_and_on_close(redis_client, prefix):
    cache = Cache(redis_client, prefix=prefix, publish_counters=0.1, publish_name="profiles")
    assert published(redis_client, prefix) == {}
    cache.get_or_load("p:1", lambda: 1)
    cache.get_or_load("p:1", lambda: 1)
    time.sleep(0.35)
    (instance, fields), = published(redis_client, prefix).items()
    assert instance.count(":") == 2
    assert (fields["cache"], fields["client"]) == ("profiles", "evictd-cache (python)")
    assert (fields["hits"], fields["misses"], fields["fills"], fields["l1_hits"]) == ("1", "1", "1", "0")
    assert abs(int(fields["at"]) - time.time() * 1000) < 5_000
    assert 0 < redis_client.pttl(prefix + "evictd:clients:" + instance) <= 300
    cache.get_or_load("p:1", lambda: 1)
    cache.close()  # publishes once more
    assert published(redis_client, prefix)[instance]["hits"] == "2"


def test_the_async_cache_publishes_too(prefix):
    async def scenario():
        client = redis.asyncio.Redis.from_url(os.environ["EVICTD_TEST_REDIS_URL"])
        cache = AsyncCache(client, prefix=prefix, publish_counters="100ms", publish_name="orders")
        await cache.get_or_load("o:1", lambda: 1)
        await asyncio.sleep(0.3)
        names = [task.get_name() for task in asyncio.all_tasks()]
        await cache.aclose()
        await client.aclose()
        return names

    names = asyncio.run(scenario())
    assert names.count("evictd-counters") == 1
    fields = published(redis.Redis.from_url(os.environ["EVICTD_TEST_REDIS_URL"]), prefix)
    assert [f["cache"] for f in fields.values()] == ["orders"]
    assert [f["misses"] for f in fields.values()] == ["1"]


def test_a_failed_publication_is_counted(prefix):
    # Nothing listens there: every publication fails, and each is counted.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    cache = Cache(dead, prefix=prefix, publish_counters=0.1, publish_name="gone")
    deadline = time.monotonic() + 5
    while cache.metrics()["publish_failures"] < 2:
        assert time.monotonic() < deadline, cache.metrics()
        time.sleep(0.05)
    cache.close()
