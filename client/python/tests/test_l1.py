"""The in-process tier against a real evictd: evicted by each message,
caught up from the broadcast log across an evictd restart (a new epoch),
flushed when the log does not reach back; and its store fence."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import redis

from conftest import Evictd
from evictd_cache import Cache
from evictd_cache._l1 import L1, MISS, Message
from test_cache import read_user, upsert_user


def eventually(condition, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def l1_cache(redis_client, prefix, **options) -> Cache:
    cache = Cache(redis_client, prefix=prefix, l1_entries=100, l1_channel=prefix + "l1", **options)
    assert cache.l1_wait_live("5s")
    return cache


def test_l1_serves_hits_and_each_message_evicts(evictd, redis_client, db, prefix):
    upsert_user(db, 60, "joan")
    db.execute(
        "insert into orders (id, user_id, status) values (600, 60, 'new')"
        " on conflict (id) do update set user_id = 60, status = 'new'"
    )
    evictd.sync()
    cache = l1_cache(redis_client, prefix)
    try:
        assert cache.get_or_load("user:60", lambda: read_user(db, 60)) == {"id": 60, "name": "joan"}
        assert cache.get_or_load("user:60:dashboard", lambda: "board", tags=["user:60"]) == "board"
        assert set(cache.l1_keys()) == {"user:60", "user:60:dashboard"}
        redis_client.delete(prefix + "user:60")  # L1 answers without Redis
        assert cache.get_or_load("user:60", lambda: "not this") == {"id": 60, "name": "joan"}
        assert cache.metrics()["l1_hits"] == 1
        # An order of user 60 changes: tag user:60 goes, and the key under it.
        db.execute("update orders set status = 'paid' where id = 600")
        evictd.sync()
        eventually(lambda: "user:60:dashboard" not in cache.l1_keys(), "the tag's key left L1")
        # The user changes: the key goes.
        cache.get_or_load("user:60", lambda: read_user(db, 60))
        upsert_user(db, 60, "joan clarke")
        evictd.sync()
        eventually(lambda: "user:60" not in cache.l1_keys(), "the key left L1")
        assert cache.get_or_load("user:60", lambda: read_user(db, 60)) == {"id": 60, "name": "joan clarke"}
    finally:
        cache.close()


def test_l1_replays_a_new_epoch_from_the_log_and_flushes_when_it_cannot(
    tmp_path: Path, database_url, redis_client, db, prefix
):
    redis_url = os.environ["EVICTD_TEST_REDIS_URL"]
    first = tmp_path / "first"
    first.mkdir()
    evictd = Evictd(first, database_url, redis_url, prefix)
    upsert_user(db, 61, "ida")
    upsert_user(db, 62, "mary")
    evictd.sync()
    cache = l1_cache(redis_client, prefix)
    try:
        cache.get_or_load("user:61", lambda: read_user(db, 61))
        cache.get_or_load("user:62", lambda: read_user(db, 62))
        # evictd restarts (a new epoch) on the same slot; a change meanwhile.
        evictd.stop(drop_slot=False)
        upsert_user(db, 61, "ida rhodes")
        second = tmp_path / "second"
        second.mkdir()
        evictd = Evictd(second, database_url, redis_url, prefix, slot=evictd.slot)
        evictd.sync()
        eventually(lambda: "user:61" not in cache.l1_keys(), "the change reached L1")
        assert cache.metrics()["l1_replays"] >= 1
        assert "user:62" in cache.l1_keys()  # replayed, not flushed
        flushes = cache.metrics()["l1_flushes"]
        # A gap the log cannot fill (the log is gone): L1 is flushed.
        epoch, seq = redis_client.get(prefix + "evictd:l1:last").decode().rsplit(":", 1)
        redis_client.delete(prefix + "evictd:l1:log")
        redis_client.publish(prefix + "l1", json.dumps({"v": 1, "epoch": epoch, "seq": int(seq) + 5, "keys": []}))
        eventually(lambda: cache.metrics()["l1_flushes"] > flushes, "a flush")
        assert cache.l1_keys() == []
    finally:
        cache.close()
        evictd.stop()


class _Down:
    """A client the subscriber never reaches: the fence is tested alone."""

    def pubsub(self, **_options):
        raise redis.exceptions.ConnectionError("no server")


def test_a_read_overtaken_by_a_message_is_not_kept():
    counts = []
    l1 = L1(_Down(), prefix="", channel="c", entries=10, ttl=None, serve_disconnected=None, count=counts.append)
    try:
        with l1._lock:
            l1._live = True
            l1._position = ("e", 1)
        seen = l1.generation()
        with l1._lock:
            l1._apply(Message(epoch="e", seq=2, keys=["a"], tags=["t"]))
        assert not l1.put("a", 1, [], seen)  # the key itself
        assert not l1.put("b", 1, ["t"], seen)  # one of its tags
        assert l1.put("c", 1, ["u"], seen)  # something else
        with l1._lock:
            l1._apply(Message.parse(json.dumps({"epoch": "e", "seq": 3, "patterns": ["c*"]})))
        assert l1.keys() == []  # a pattern evicts
        assert not l1.put("cat", 1, [], seen)
        assert l1.put("dog", 1, [], l1.generation())
        with l1._lock:
            l1._live = False
        assert l1.get("dog") is MISS  # not served while disconnected
    finally:
        l1.close()
