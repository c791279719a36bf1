"""evictd-cache against the same operations done bare, in one run:

- an L1 hit (`Cache.get_or_load` served in process) against a bare
  `cachetools.TTLCache` lookup;
- an L2 hit (`get_or_load` served by Redis, JSON decoded) against a bare
  redis-py `GET`;
- a cold fenced fill (`GET`, `SET NX PX`, `fill.lua`) against a bare `GET`
  + `SET`.

It starts a throwaway `redis-server` on a free port (no evictd: none of
these paths waits for it). Targets: L1 >= 0.8x, L2 >= 0.8x, cold fill >=
0.5x. Each pair is measured in rounds, each alternating the two in ten
slices; the median ratio of the rounds counts.

    .tools/python/bin/python client/python/bench/bench_cache.py
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

import cachetools
import redis

from evictd_cache import Cache

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Each round alternates the two in this many slices, so that a drift of
#: the machine's speed (another process, the CPU's clock) within a round
#: weighs on both alike.
SLICES = 10


def timed(operation, count: int) -> float:
    started = time.perf_counter()
    operation(count)
    return time.perf_counter() - started


def compare(name: str, ours, bare, count: int, target: float) -> bool:
    ratios, ours_rates, bare_rates = [], [], []
    for _ in range(ROUNDS):
        bare_time = ours_time = 0.0
        for _ in range(SLICES):
            bare_time += timed(bare, count // SLICES)
            ours_time += timed(ours, count // SLICES)
        b, o = count / bare_time, count / ours_time
        ratios.append(o / b)
        ours_rates.append(o)
        bare_rates.append(b)
    ratio = statistics.median(ratios)
    met = ratio >= target
    print(
        f"{name:10} evictd-cache {statistics.median(ours_rates):>10,.0f}/s  bare {statistics.median(bare_rates):>10,.0f}/s"
        f"  ratio {ratio:.2f}x (rounds {' '.join(f'{r:.2f}' for r in ratios)})  target {target}x: {'met' if met else 'NOT MET'}"
    )
    return met


def main() -> int:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="evictd-bench-")
    server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        with open("/proc/loadavg") as f:
            print("load average before:", f.read().strip())
        value = {"id": 7, "name": "ada", "email": "ada@example.com"}

        # L1 hits.
        l1 = Cache(client, prefix="l1:", l1_entries=1000, l1_channel="bench:l1")
        assert l1.l1_wait_live("5s")
        l1.get_or_load("user:7", lambda: value)
        ttl_cache = cachetools.TTLCache(maxsize=1000, ttl=60)
        ttl_cache["user:7"] = value

        def l1_hits(n):
            for _ in range(n):
                l1.get_or_load("user:7", _never)

        def ttl_hits(n):
            for _ in range(n):
                ttl_cache["user:7"]

        results = [compare("L1 hit", l1_hits, ttl_hits, 200_000, 0.8)]
        l1.close()

        # L2 hits.
        l2 = Cache(client, prefix="l2:")
        l2.get_or_load("user:7", lambda: value)

        def l2_hits(n):
            for _ in range(n):
                l2.get_or_load("user:7", _never)

        def bare_gets(n):
            for _ in range(n):
                client.get("l2:user:7")

        results.append(compare("L2 hit", l2_hits, bare_gets, 20_000, 0.8))

        # Cold fills: a new key each time.
        counter = iter(range(10**9))
        fills = Cache(client, prefix="fill:")

        def cold_fills(n):
            for _ in range(n):
                fills.get_or_load(f"user:{next(counter)}", lambda: value)

        def bare_get_set(n):
            for _ in range(n):
                key = f"bare:user:{next(counter)}"
                if client.get(key) is None:
                    client.set(key, b'{"id":7,"name":"ada","email":"ada@example.com"}')

        results.append(compare("cold fill", cold_fills, bare_get_set, 10_000, 0.5))
        assert fills.metrics()["fenced"] == 0
        with open("/proc/loadavg") as f:
            print("load average after:", f.read().strip())
        return 0 if all(results) else 1
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _never():
    raise AssertionError("a hit was expected")


if __name__ == "__main__":
    raise SystemExit(main())
