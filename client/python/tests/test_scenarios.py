"""The shared scenarios (`client/scenarios/fills.json`), which the Rust
crate runs too: each kind of invalidation across a held fill, a reload
past the TTL and an L1 entry, as data, against a real evictd on a
database of their own."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import psycopg
import pytest

from conftest import REPO, Evictd, _env
from evictd_cache import Cache

SCENARIOS = json.loads((REPO / "client" / "scenarios" / "fills.json").read_text())


def _database(url: str, name: str) -> str:
    return urlunparse(urlparse(url)._replace(path="/" + name))


@pytest.fixture()
def scenario_db(tmp_path: Path, database_url: str, prefix: str):
    """A database with the scenarios' schema, and evictd on it with their
    mapping."""
    name = f"scenarios_{os.getpid()}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"drop database if exists {name}")
        admin.execute(f"create database {name}")
    url = _database(database_url, name)
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in SCENARIOS["schema"]:
            conn.execute(statement)
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    (mappings / "orders.toml").write_text(SCENARIOS["mapping"])
    run = tmp_path / "run"
    run.mkdir()
    evictd = Evictd(run, url, _env("EVICTD_TEST_REDIS_URL"), prefix, mappings)
    conn = psycopg.connect(url, autocommit=True)
    try:
        yield evictd, conn
    finally:
        conn.close()
        evictd.stop()
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(f"drop database if exists {name} with (force)")


def make_cache(redis_client, prefix: str, settings: dict) -> Cache:
    options = {}
    if "l1_entries" in settings:
        options.update(l1_entries=settings["l1_entries"], l1_channel=prefix + "l1")
    if "ttl_ms" in settings:
        options["ttl"] = settings["ttl_ms"] / 1000
    if "stale_while_revalidate_ms" in settings:
        options["stale_while_revalidate"] = settings["stale_while_revalidate_ms"] / 1000
    cache = Cache(redis_client, prefix=prefix, **options)
    if "l1_entries" in settings:
        assert cache.l1_wait_live("10s")
    return cache


def test_the_shared_scenarios_hold(scenario_db, redis_client, prefix):
    evictd, db = scenario_db
    caches = {name: make_cache(redis_client, prefix, settings) for name, settings in SCENARIOS["caches"].items()}
    plain = Cache(redis_client, prefix=prefix)

    def load_row():
        return {"status": db.execute(SCENARIOS["load"]).fetchone()[0]}

    try:
        for scenario in SCENARIOS["scenarios"]:
            name, key = scenario["name"], scenario["key"]
            cache = caches[scenario["cache"]]
            settings = SCENARIOS["caches"][scenario["cache"]]
            for statement in SCENARIOS["reset"]:
                db.execute(statement)
            evictd.sync()
            if "l1_entries" in settings:
                assert cache.l1_caught_up("10s"), name
            plain.invalidate(key)
            tags = scenario["tags"]
            row_tags = scenario.get("row_tags")
            expect = scenario["expect"]
            if scenario["kind"] == "held_fill":
                if scenario.get("reload"):
                    before = cache.metrics()
                    cache.get_or_load(key, load_row, tags=tags)
                    assert cache.metrics()["fills"] == before["fills"] + 1, f"{name}: the first fill"
                    time.sleep(settings["ttl_ms"] / 1000 + 0.1)

                def held():
                    value = load_row()
                    if scenario["write"] is not None:
                        db.execute(scenario["write"])
                        evictd.sync()
                    return value

                before = cache.metrics()
                loaded = cache.get_or_load(
                    key, held, tags=tags, row_tags=(lambda _v: row_tags) if row_tags is not None else None
                )
                after = cache.metrics()
                assert after["loads"] == before["loads"] + 1, f"{name}: the loader ran"
                outcome = (
                    "stored"
                    if after["fills"] > before["fills"]
                    else "fenced"
                    if after["fenced"] > before["fenced"]
                    else "skipped"
                )
                assert outcome == expect["fill"], f"{name}: the fill"
                if "loaded" in expect:
                    assert loaded == expect["loaded"], f"{name}: what the loader read"
            elif scenario["kind"] == "warm_l1":
                cache.get_or_load(key, load_row, tags=tags)
                assert key in cache.l1_keys(), f"{name}: in L1"
                db.execute(scenario["write"])
                evictd.sync()
            else:
                pytest.fail(f"{name}: unknown kind {scenario['kind']!r}")
            if "redis" in expect:
                assert plain.get(key) == expect["redis"], f"{name}: what Redis holds after"
            if "l1" in expect:
                assert cache.l1_caught_up("10s"), name
                assert (key in cache.l1_keys()) == expect["l1"], f"{name}: whether L1 holds {key}"
    finally:
        for cache in caches.values():
            cache.close()
