"""The in-process tier against a real evictd: evicted by each message,
caught up from the broadcast log across an evictd restart (a new epoch),
flushed when the log does not reach back; and its store fence."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import Evictd
from evictd_cache import Cache
from evictd_cache._l1 import L1, MISS, ReadLast
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
        assert cache.metrics()["l1_evictions_invalidated"] >= 2
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_while_its_subscription_is_down_l1_serves_only_within_the_bound(tmp_path, prefix):
    """A Redis of the test's own, stopped under the subscriber: L1 serves
    nothing (by default), or for at most `l1_serve_disconnected`."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        # No retries: a command to the stopped server fails at once.
        client = redis.Redis(port=port, socket_connect_timeout=0.2, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
        eventually(lambda: _pings(client), "the test's Redis answers")
        strict = Cache(client, prefix=prefix, l1_entries=10, l1_channel=prefix + "l1")
        lenient = Cache(
            client, prefix=prefix, l1_entries=10, l1_channel=prefix + "l1", l1_serve_disconnected="1s"
        )
        for cache in (strict, lenient):
            assert cache.l1_wait_live("5s")
            assert cache.get_or_load("k", lambda: "v") == "v"
            assert cache.l1_keys() == ["k"]
        server.terminate()
        server.wait(10)
        # Each subscriber notices on its own; the bound runs from then.
        eventually(lambda: not lenient.l1_live(), "the lenient subscriber saw it")
        down = time.monotonic()
        assert lenient.get_or_load("k", lambda: "from the database") == "v"
        eventually(lambda: not strict.l1_live(), "the strict subscriber saw it")
        assert strict.get_or_load("k", lambda: "from the database") == "from the database"
        time.sleep(max(0.0, down + 1.2 - time.monotonic()))
        assert lenient.get_or_load("k", lambda: "from the database") == "from the database"
        assert strict.metrics()["l1_hits"] == 0 and lenient.metrics()["l1_hits"] == 1
        strict.close()
        lenient.close()
    finally:
        server.kill()
        server.wait()


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def feed(steps, last=None, log=()):
    """Runs an L1's catch-up or receive steps against a log held here:
    `last` (`epoch:seq`) and the log's messages, oldest first."""
    entries = [(f"{i}-0".encode(), {b"m": json.dumps(m).encode()}) for i, m in enumerate(log, 1)]
    answer = None
    while True:
        try:
            step = steps.send(answer)
        except StopIteration:
            return
        if isinstance(step, ReadLast):
            answer = last.encode() if last else None
        else:
            newest_first = list(reversed(entries))
            if step.end != "+":
                bound = step.end.lstrip("(").encode()
                newest_first = [e for e in newest_first if int(e[0].split(b"-")[0]) < int(bound.split(b"-")[0])]
            answer = newest_first[: step.count]


class Counts(dict):
    def __call__(self, name: str, n: int = 1) -> None:
        self[name] = self.get(name, 0) + n


def test_a_read_overtaken_by_a_message_is_not_kept():
    counts = Counts()
    l1 = L1(entries=10, ttl=None, serve_disconnected=None, count=counts)
    feed(l1.catch_up(), last="e:1")
    assert l1.live() and l1.position() == ("e", 1)
    seen = l1.generation()
    feed(l1.receive(json.dumps({"epoch": "e", "seq": 2, "keys": ["a"], "tags": ["t"]})))
    assert not l1.put("a", 1, [], seen)  # the key itself
    assert not l1.put("b", 1, ["t"], seen)  # one of its tags
    assert l1.put("c", 1, ["u"], seen)  # something else
    feed(l1.receive(json.dumps({"epoch": "e", "seq": 3, "patterns": ["c*"]})))
    assert l1.keys() == []  # a pattern evicts
    assert not l1.put("cat", 1, [], seen)
    assert l1.put("dog", 1, [], l1.generation())
    l1.disconnected()
    assert l1.get("dog") is MISS  # not served while disconnected
    assert counts.get("l1_evictions_invalidated") == 1  # "c", by the pattern


def test_entries_are_dropped_for_size_and_age_and_counted_by_reason():
    counts = Counts()
    l1 = L1(entries=3, ttl=0.05, serve_disconnected=None, count=counts)
    feed(l1.catch_up(), last="e:1")
    for key in "abcd":
        assert l1.put(key, key, [], l1.generation())
    assert l1.keys() == ["b", "c", "d"] and counts["l1_evictions_size"] == 1
    time.sleep(0.06)
    assert l1.get("b") is MISS and counts["l1_evictions_expired"] == 1
    feed(l1.receive("not json"))
    assert l1.keys() == [] and counts["l1_evictions_flushed"] == 2


def test_a_gap_is_replayed_from_the_log_and_flushed_when_the_log_does_not_reach_back():
    l1 = L1(entries=10, ttl=None, serve_disconnected=None, count=Counts())
    feed(l1.catch_up(), last="e:1")
    assert l1.put("a", 1, [], l1.generation()) and l1.put("b", 2, [], l1.generation())
    log = [
        {"epoch": "e", "seq": 1, "keys": []},
        {"epoch": "e", "seq": 2, "keys": ["a"]},
        {"epoch": "e", "seq": 3, "keys": []},
    ]
    # seq 2 was missed; 3 arrives: 2 is replayed from the log.
    feed(l1.receive(json.dumps(log[2])), log=log)
    assert l1.live() and l1.position() == ("e", 3) and l1.keys() == ["b"]
    # seq 4 and 5 missed, and the log holds only up to 3: flushed.
    feed(l1.receive(json.dumps({"epoch": "e", "seq": 6, "keys": []})), log=log)
    assert l1.live() and l1.position() == ("e", 6) and l1.keys() == []
    # A new epoch whose first message the log holds: replayed, not flushed.
    assert l1.put("c", 3, [], l1.generation())
    l1.disconnected()
    newer = log + [{"epoch": "e", "seq": 6, "keys": []}, {"epoch": "f", "seq": 1, "keys": ["x"]}]
    feed(l1.catch_up(), last="f:1", log=newer)
    assert l1.live() and l1.position() == ("f", 1) and l1.keys() == ["c"]
