"""Refresh before and after the TTL (docs/PROTOCOL.md): stale-while-
revalidate serves the old value at once while one reader reloads; early
refresh reloads before expiry; either reload is a fenced fill that an
invalidation wins; a value without a TTL is never reloaded."""

from __future__ import annotations

import threading
import time

from evictd_cache import Cache

from test_cache import read_user, upsert_user


def test_past_its_ttl_a_value_is_served_stale_while_one_reader_reloads_it(redis_client, prefix):
    reader = Cache(redis_client, prefix=prefix, ttl=0.3, stale_while_revalidate="10s")
    other = Cache(redis_client, prefix=prefix, ttl=0.3, stale_while_revalidate="10s")
    assert reader.get_or_load("report:1", lambda: {"v": 1}) == {"v": 1}
    # Stored for the TTL and the window.
    assert 10_000 < redis_client.pttl(prefix + "report:1") <= 10_300
    time.sleep(0.35)  # past the TTL proper, within the window
    reloading = threading.Event()
    release = threading.Event()

    def slow_load():
        reloading.set()
        release.wait(5)
        return {"v": 2}

    result = {}
    thread = threading.Thread(target=lambda: result.update(v=reader.get_or_load("report:1", slow_load)))
    thread.start()
    assert reloading.wait(5)
    # Meanwhile another process gets the old value at once, no load.
    started = time.monotonic()
    assert other.get_or_load("report:1", lambda: "not loaded") == {"v": 1}
    assert time.monotonic() - started < 0.2
    release.set()
    thread.join(5)
    assert result["v"] == {"v": 2}
    assert reader.metrics()["early_refreshes"] == 1 and reader.metrics()["fills"] == 2
    assert other.metrics()["stale_served"] == 1 and other.metrics()["loads"] == 0
    assert other.get_or_load("report:1", lambda: "not loaded") == {"v": 2}
    assert redis_client.pttl(prefix + "report:1") > 10_000


def test_early_refresh_reloads_before_expiry_and_never_without_a_ttl(evictd, redis_client, db, prefix):
    upsert_user(db, 71, "katherine")
    evictd.sync()
    # A beta this large reloads on every read of a value with a TTL.
    cache = Cache(redis_client, prefix=prefix, ttl=60, early_refresh=1e9)
    loads = []

    def load():
        loads.append(1)
        time.sleep(0.01)
        return read_user(db, 71)

    cache.get_or_load("user:71", load)
    cache.get_or_load("user:71", load)
    assert len(loads) == 2 and cache.metrics()["early_refreshes"] == 1
    assert redis_client.pttl(prefix + "user:71") > 59_000
    # Without a TTL (as evictd's write-through refresh stores): a hit.
    redis_client.persist(prefix + "user:71")
    cache.get_or_load("user:71", load)
    assert len(loads) == 2
    # A beta of 0 (the default) never reloads early.
    plain = Cache(redis_client, prefix=prefix, ttl=60)
    redis_client.delete(prefix + "user:71")
    plain.get_or_load("user:71", load)
    plain.get_or_load("user:71", load)
    assert len(loads) == 3 and plain.metrics()["early_refreshes"] == 0


def test_a_reload_overtaken_by_an_invalidation_is_fenced(evictd, redis_client, db, prefix):
    upsert_user(db, 72, "radia")
    evictd.sync()
    cache = Cache(redis_client, prefix=prefix, ttl=60, early_refresh=1e9)
    cache.get_or_load("user:72", lambda: (time.sleep(0.01), read_user(db, 72))[1])

    def load_then_commit():
        value = read_user(db, 72)
        upsert_user(db, 72, "radia perlman")
        evictd.sync()
        return value

    # The reload read the old row; evictd deleted the wrapped value.
    assert cache.get_or_load("user:72", load_then_commit) == {"id": 72, "name": "radia"}
    assert cache.metrics()["fenced"] == 1
    assert not redis_client.exists(prefix + "user:72")
    assert cache.get_or_load("user:72", lambda: read_user(db, 72)) == {"id": 72, "name": "radia perlman"}
