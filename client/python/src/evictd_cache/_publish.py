"""A cache's counters published to Redis on an interval, opt-in, for
`evictd report`'s hit rates per tier (docs/PROTOCOL.md, "Client
counters"): a hash per cache instance, and a sorted set of the instances
by the time each last wrote."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import time
from typing import Any, Callable, Dict, Tuple

from ._background import Background

#: The sorted set of instances (score: the time of their last write, ms);
#: each instance's hash is at `evictd:clients:<instance>`.
CLIENTS_KEY = "evictd:clients"
#: The counters published, as both clients name them.
PUBLISHED = (
    "l1_hits",
    "hits",
    "misses",
    "loads",
    "fills",
    "fenced",
    "degraded",
    "stale_served",
    "early_refreshes",
)
#: Instances that have not written for this long leave the set.
KEEP_MS = 86_400_000
CLIENT = "evictd-cache (python)"


def instance_id() -> str:
    """`<host>:<pid>:<4 hex digits>`: apart for each cache in a process."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


def payload(
    prefix: str, instance: str, name: str, counts: Dict[str, int], every: float
) -> Tuple[str, Dict[str, Any], int, int]:
    """The hash key, its fields, its expiry (ms) and the time (ms)."""
    now = int(time.time() * 1000)
    fields: Dict[str, Any] = {counter: counts.get(counter, 0) for counter in PUBLISHED}
    fields.update(cache=name, client=CLIENT, at=now)
    return f"{prefix}{CLIENTS_KEY}:{instance}", fields, max(1, int(every * 3000)), now


def commands(pipe: Any, prefix: str, instance: str, name: str, counts: Dict[str, int], every: float) -> Any:
    """Queues the writes on `pipe` (a non-transactional pipeline)."""
    key, fields, expiry, now = payload(prefix, instance, name, counts, every)
    pipe.hset(key, mapping=fields)
    pipe.pexpire(key, expiry)
    pipe.zadd(prefix + CLIENTS_KEY, {instance: now})
    pipe.zremrangebyscore(prefix + CLIENTS_KEY, "-inf", now - KEEP_MS)
    return pipe


class Publisher:
    """Publishes `counts()` every `every` seconds on a daemon thread (and
    once more on `close`); a failed write calls `failed()` (the cache counts
    it) and is left for the next."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        name: str,
        every: float,
        counts: Callable[[], Dict[str, int]],
        failed: Callable[[], None],
    ) -> None:
        self._client, self._prefix, self._name, self._every, self._counts = client, prefix, name, every, counts
        self._failed = failed
        self.instance = instance_id()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evictd-counters", daemon=True)
        self._thread.start()

    def publish(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        commands(pipe, self._prefix, self.instance, self._name, self._counts(), self._every).execute()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.publish()
        except Exception:  # noqa: BLE001 - Redis gone: nothing to publish to
            pass

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self.publish()
            except Exception:  # noqa: BLE001 - counted; the next interval tries again
                self._failed()


class AsyncPublisher(Background):
    """`Publisher` as one task on the running loop, started by
    `ensure_started`."""

    name = "evictd-counters"

    def __init__(
        self,
        client: Any,
        prefix: str,
        name: str,
        every: float,
        counts: Callable[[], Dict[str, int]],
        failed: Callable[[], None],
    ) -> None:
        super().__init__()
        self._client, self._prefix, self._name, self._every, self._counts = client, prefix, name, every, counts
        self._failed = failed
        self.instance = instance_id()

    async def publish(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        await commands(pipe, self._prefix, self.instance, self._name, self._counts(), self._every).execute()

    async def close(self) -> None:
        await self.stop()
        try:
            await self.publish()
        except Exception:  # noqa: BLE001
            pass

    async def _main(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            try:
                await self.publish()
            except Exception:  # noqa: BLE001 - counted; the next interval tries again
                self._failed()
