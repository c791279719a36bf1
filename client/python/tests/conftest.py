"""Fixtures: a real `evictd run` (the built binary) streaming from a real
Postgres into a real Redis. The servers come from the Rust suite's
testkit: `cargo test --test integration -- python::` starts them and runs
this suite with

- `EVICTD_BIN`: the evictd binary;
- `EVICTD_TEST_POSTGRES_URL`: a database of the suite's own on a server
  with `wal_level = logical`, as a superuser;
- `EVICTD_TEST_REDIS_URL`: the Redis evictd writes to;
- `EVICTD_TEST_REDIS_CLUSTER_URL`: a three-master Redis Cluster
  (`redis+cluster://host:port`, one of its nodes);
- `EVICTD_TEST_PREFIX`: a key prefix of the suite's own.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
import redis

REPO = Path(__file__).resolve().parents[3]
#: The demo shop (`migrations/0001_shop.sql`), with its publication `evictd`.
SCHEMA = (REPO / "migrations" / "0001_shop.sql").read_text()
#: The repository's mappings of the shop (`mappings/`): what the package's
#: README example fills is what these invalidate.
MAPPINGS = REPO / "mappings"

_SLOTS = itertools.count(1)


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: run this suite through `cargo test --test integration -- python::`, "
            "which starts Postgres, Redis and builds evictd"
        )
    return value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Evictd:
    """`evictd run` for one test: a slot, a key prefix and an admin port of
    its own, on the suite's database."""

    def __init__(
        self,
        tmp: Path,
        database_url: str,
        redis_url: str,
        prefix: str,
        mappings: Path = MAPPINGS,
        slot: str = "",
    ) -> None:
        self.prefix = prefix
        self.database_url = database_url
        slot = slot or f"py_{os.getpid()}_{next(_SLOTS)}"
        self.slot = slot
        self.admin = _free_port()
        config = tmp / "evictd.toml"
        config.write_text(
            f'[postgres]\nurl = "{database_url}"\nslot = "{slot}"\n'
            f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\nl1_channel = "{prefix}l1"\n'
            f'[mappings]\ndir = "{mappings}"\n[admin]\nlisten = "127.0.0.1:{self.admin}"\n'
        )
        self.log = open(tmp / "evictd.log", "wb")
        self.process = subprocess.Popen(
            [_env("EVICTD_BIN"), "run", "--config", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(tmp / "evictd.log")

    def _wait_ready(self, log: Path) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"evictd run exited:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"evictd run was not ready in 60 s:\n{log.read_text()}")

    def sync(self, timeout: float = 30.0) -> None:
        """Waits until evictd has applied everything committed so far."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            target = conn.execute("select pg_current_wal_insert_lsn()").fetchone()[0]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                row = conn.execute(
                    "select confirmed_flush_lsn >= %s::pg_lsn from pg_replication_slots where slot_name = %s",
                    (target, self.slot),
                ).fetchone()
                if row and row[0]:
                    return
                time.sleep(0.02)
        raise TimeoutError(f"evictd did not apply up to {target} in {timeout} s")

    def stop(self, drop_slot: bool = True) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        if not drop_slot:
            return
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = %s",
                (self.slot,),
            )


_PREFIXES = itertools.count(1)


@pytest.fixture(scope="session")
def database_url() -> str:
    url = _env("EVICTD_TEST_POSTGRES_URL")
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("select to_regclass('users')").fetchone()[0] is None:
            conn.execute(SCHEMA)
    return url


@pytest.fixture()
def prefix() -> str:
    return f"{_env('EVICTD_TEST_PREFIX')}{next(_PREFIXES)}:"


@pytest.fixture()
def evictd(tmp_path: Path, database_url: str, prefix: str) -> Iterator[Evictd]:
    running = Evictd(tmp_path, database_url, _env("EVICTD_TEST_REDIS_URL"), prefix)
    yield running
    running.stop()


@pytest.fixture()
def redis_client() -> Iterator["redis.Redis"]:
    client = redis.Redis.from_url(_env("EVICTD_TEST_REDIS_URL"))
    yield client
    client.close()


@pytest.fixture()
def db(database_url: str) -> Iterator["psycopg.Connection"]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn
