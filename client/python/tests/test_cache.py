"""The package against a real evictd: fills fenced by each kind of
invalidation, the decorator's keys, negative caching, single flight,
degraded reads, and the counters."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from evictd_cache import Cache, TemplateError, seconds
from evictd_cache import _protocol as protocol


def upsert_user(db, user_id: int, name: str) -> None:
    db.execute(
        "insert into users (id, email, name) values (%s, %s, %s)"
        " on conflict (id) do update set name = excluded.name",
        (user_id, f"user{user_id}@example.com", name),
    )


def read_user(db, user_id: int):
    row = db.execute("select name from users where id = %s", (user_id,)).fetchone()
    return None if row is None else {"id": user_id, "name": row[0]}


def exists(redis_client, key: str) -> bool:
    return bool(redis_client.exists(key))


def test_a_fill_is_stored_and_then_hit(evictd, redis_client, db, prefix):
    cache = Cache(redis_client, prefix=prefix)
    upsert_user(db, 1, "ada")
    evictd.sync()  # the setup's own invalidations land before the reads
    loads = []

    def load():
        loads.append(1)
        return read_user(db, 1)

    assert cache.get_or_load("user:1", load) == {"id": 1, "name": "ada"}
    assert cache.get_or_load("user:1", load) == {"id": 1, "name": "ada"}
    assert len(loads) == 1
    counts = cache.metrics()
    assert (counts["misses"], counts["hits"], counts["fills"], counts["loads"]) == (1, 1, 1, 1)
    # evictd deletes the key on the next change of the row.
    upsert_user(db, 1, "ada lovelace")
    evictd.sync()
    assert not exists(redis_client, prefix + "user:1")
    assert cache.get_or_load("user:1", load) == {"id": 1, "name": "ada lovelace"}


@pytest.mark.parametrize("how", ["key", "tag"])
def test_a_fill_that_read_before_a_commit_is_fenced(evictd, redis_client, db, prefix, how):
    """The loader reads the old row, then the row changes and evictd
    invalidates (the key itself, or a tag the fill registered) before the
    fill stores: the old value is returned but never cached."""
    cache = Cache(redis_client, prefix=prefix)
    upsert_user(db, 2, "old")
    db.execute(
        "insert into orders (id, user_id, status) values (20, 2, 'new')"
        " on conflict (id) do update set status = 'new'"
    )
    evictd.sync()

    def load():
        value = read_user(db, 2)
        if how == "key":
            upsert_user(db, 2, "new")
        else:
            # An order of user 2 changes: its mapping invalidates tag user:2.
            db.execute("update orders set status = 'paid' where id = 20")
        evictd.sync()
        return value

    key = "user:2" if how == "key" else "user:2:dashboard"
    value = cache.get_or_load(key, load, tags=["user:2"])
    assert value == {"id": 2, "name": "old"}
    assert cache.metrics()["fenced"] == 1
    assert cache.metrics()["fills"] == 0
    assert not exists(redis_client, prefix + key)


def test_the_decorator_fills_the_key_evictd_invalidates(evictd, redis_client, db, prefix):
    cache = Cache(redis_client, prefix=prefix, ttl="5m")
    upsert_user(db, 3, "grace")
    evictd.sync()
    calls = []

    @cache.cached(key="user:{user_id}", tags=["user:{user_id}"])
    def profile(user_id: int, verbose: bool = False):
        calls.append(user_id)
        return read_user(db, user_id)

    assert profile(3) == {"id": 3, "name": "grace"}
    assert profile(user_id=3) == {"id": 3, "name": "grace"}
    assert calls == [3]
    full = prefix + "user:3"
    assert 0 < redis_client.pttl(full) <= 300_000
    assert redis_client.sismember(prefix + "tag:user:3", full)
    upsert_user(db, 3, "grace hopper")
    evictd.sync()
    assert not exists(redis_client, full)
    assert profile(3) == {"id": 3, "name": "grace hopper"}

    with pytest.raises(TemplateError, match="names `id`, which is not one of its arguments"):

        @cache.cached(key="user:{id}")
        def wrong(user_id: int):
            return None


def test_no_row_is_cached_only_when_asked_and_an_insert_invalidates_it(evictd, redis_client, db, prefix):
    db.execute("delete from orders where user_id = 4")
    db.execute("delete from users where id = 4")
    evictd.sync()
    plain = Cache(redis_client, prefix=prefix)
    assert plain.get_or_load("user:4", lambda: read_user(db, 4)) is None
    assert not exists(redis_client, prefix + "user:4")
    negative = Cache(redis_client, prefix=prefix, negative_ttl="30s")
    assert negative.get_or_load("user:4", lambda: read_user(db, 4)) is None
    assert redis_client.get(prefix + "user:4") == protocol.ABSENT
    assert negative.get_or_load("user:4", lambda: pytest.fail("a hit")) is None
    upsert_user(db, 4, "katherine")
    evictd.sync()
    assert negative.get_or_load("user:4", lambda: read_user(db, 4)) == {
        "id": 4,
        "name": "katherine",
    }


def test_one_load_per_key_in_a_process(evictd, redis_client, db, prefix):
    cache = Cache(redis_client, prefix=prefix)
    upsert_user(db, 5, "edsger")
    evictd.sync()
    loads = []
    started = threading.Event()

    def load():
        loads.append(1)
        started.set()
        time.sleep(0.2)
        return read_user(db, 5)

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_load("user:5", load)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == [1]
    assert results == [{"id": 5, "name": "edsger"}] * 8
    assert cache.metrics()["single_flight_waits"] == 7


def test_another_processs_fill_is_waited_for(evictd, redis_client, db, prefix):
    """A key holding another reader's bare lease: the read polls, and
    takes the value once that reader stores it."""
    cache = Cache(redis_client, prefix=prefix, stampede_wait="1s")
    full = prefix + "user:6"
    redis_client.set(full, protocol.new_lease(), px=10_000)
    threading.Timer(0.1, lambda: redis_client.set(full, b'{"id":6,"name":"other"}')).start()
    assert cache.get_or_load("user:6", lambda: pytest.fail("loaded")) == {
        "id": 6,
        "name": "other",
    }
    assert cache.metrics()["stampede_waits"] == 1
    # Past the wait it loads itself and stores nothing.
    redis_client.set(full, protocol.new_lease(), px=10_000)
    quick = Cache(redis_client, prefix=prefix, stampede_wait="50ms")
    assert quick.get_or_load("user:6", lambda: "loaded") == "loaded"
    assert redis_client.get(full).startswith(protocol.LEASE)


def test_redis_down_reads_the_database(prefix):
    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    cache = Cache(gone, prefix=prefix)
    assert cache.get_or_load("user:7", lambda: {"id": 7}) == {"id": 7}
    assert cache.metrics()["degraded"] == 1


def test_values_from_other_writers_are_read_as_the_protocol_says(redis_client, prefix):
    cache = Cache(redis_client, prefix=prefix)
    # A recorded value, and one wrapped in another reader's reload lease.
    redis_client.set(prefix + "a", b"\0evictd:at:1733216400000001\0" + b'"recorded"')
    redis_client.set(prefix + "b", protocol.new_lease() + b"\0" + b'"reloading"')
    assert cache.get_or_load("a", lambda: pytest.fail("a hit")) == "recorded"
    assert cache.get_or_load("b", lambda: pytest.fail("a hit")) == "reloading"
    assert cache.get("b") == "reloading"
    cache.invalidate("b")
    assert cache.get("b") is None


def test_bad_settings_are_named():
    client = redis.Redis()
    with pytest.raises(ValueError, match="decode_responses=False"):
        Cache(redis.Redis(decode_responses=True))
    with pytest.raises(ValueError, match="ttl: '5 minutes' is not a duration"):
        Cache(client, ttl="5 minutes")
    with pytest.raises(ValueError, match="jitter"):
        Cache(client, jitter=2)
    assert seconds("200ms", "x") == 0.2
    assert seconds("5m", "x") == 300
    assert seconds(1.5, "x") == 1.5


def test_the_installed_scripts_are_the_protocols():
    """The package ships `client/lua/` (its `lua` is a link there)."""
    repo_lua = Path(__file__).resolve().parents[2] / "lua"
    for name in ["fill", "release", "version"]:
        assert protocol.script(name) == (repo_lua / f"{name}.lua").read_text(), name


def test_the_counters_are_exported_to_prometheus(redis_client, prefix):
    from prometheus_client import CollectorRegistry, generate_latest

    cache = Cache(redis_client, prefix=prefix)
    registry = CollectorRegistry()
    cache.register_prometheus(registry, name="profiles")
    cache.get_or_load("p", lambda: 1)
    cache.get_or_load("p", lambda: 1)
    text = generate_latest(registry).decode()
    assert 'evictd_cache_hits_total{cache="profiles"} 1.0' in text, text
    assert 'evictd_cache_fills_total{cache="profiles"} 1.0' in text, text
    assert 'evictd_cache_fenced_total{cache="profiles"} 0.0' in text, text
    assert 'evictd_cache_l1_evictions_total{cache="profiles",reason="invalidated"} 0.0' in text, text


def test_a_tag_from_the_row_fences_a_fill_its_invalidation_overtook(evictd, redis_client, db, prefix):
    """`order:{id}` carries `user:{user_id}`, known only from the row: the
    user changes (its mapping invalidates tag user:8) after the order was
    read, so the fill is refused; without that change it is stored."""
    cache = Cache(redis_client, prefix=prefix)
    upsert_user(db, 8, "hedy")
    db.execute(
        "insert into orders (id, user_id, status) values (80, 8, 'new')"
        " on conflict (id) do update set user_id = 8, status = 'new'"
    )
    evictd.sync()

    def read_order():
        row = db.execute("select id, user_id, status from orders where id = 80").fetchone()
        return {"id": row[0], "user_id": row[1], "status": row[2]}

    def read_then_user_changes():
        value = read_order()
        upsert_user(db, 8, "hedy lamarr")
        evictd.sync()
        return value

    by_user = lambda order: [f"user:{order['user_id']}"]  # noqa: E731
    cache.get_or_load("order:80:view", read_then_user_changes, row_tags=by_user)
    assert cache.metrics()["fenced"] == 1
    assert not exists(redis_client, prefix + "order:80:view")
    cache.get_or_load("order:80:view", read_order, row_tags=by_user)
    assert cache.metrics()["fills"] == 1
    assert redis_client.sismember(prefix + "tag:user:8", prefix + "order:80:view")


def test_a_recorded_fill_carries_the_apply_stamp(redis_client, prefix):
    cache = Cache(redis_client, prefix=prefix, record_fills=True)
    redis_client.set(prefix + "evictd:audit:stamp", b"1733216400000042")
    cache.get_or_load("recorded", lambda: {"v": 1})
    assert redis_client.get(prefix + "recorded") == b'\0evictd:at:1733216400000042\0{"v":1}'
    assert cache.get("recorded") == {"v": 1}
    redis_client.delete(prefix + "evictd:audit:stamp")
    cache.get_or_load("plain", lambda: {"v": 2})
    assert redis_client.get(prefix + "plain") == b'{"v":2}'
