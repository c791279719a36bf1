"""What the synchronous and the asyncio caches share: settings, counters,
the decorator's templates."""

from __future__ import annotations

import inspect
import json
import random
import re
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Tuple, Union

import redis as redis_py

from . import _fill as fill
from . import _protocol as protocol
from ._l1 import L1
from ._templates import TemplateError, placeholders, render, render_all

Duration = Union[int, float, str, None]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

#: What Redis raises when it cannot answer.
REDIS_ERRORS = (redis_py.exceptions.RedisError, OSError)


def seconds(duration: Duration, what: str) -> Optional[float]:
    """`duration` in seconds: a number of seconds, or text such as `200ms`,
    `10s`, `5m`, `1h`, `1d`; `None` stays `None`."""
    if duration is None:
        return None
    if isinstance(duration, bool):
        raise ValueError(f"{what}: {duration!r} is not a duration")
    if isinstance(duration, (int, float)):
        value = float(duration)
    else:
        match = _DURATION.match(str(duration))
        if not match:
            raise ValueError(
                f"{what}: {duration!r} is not a duration (seconds, or text such as 200ms, 10s, 5m, 1h)"
            )
        value = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if value <= 0:
        raise ValueError(f"{what}: {duration!r} must be more than zero")
    return value


class Serializer(Protocol):
    """Turns values into the bytes stored in Redis and back."""

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JsonSerializer:
    """JSON (UTF-8), the default. Pickle is not offered by default: loading
    a pickle runs code chosen by whoever could write to Redis."""

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


#: The counters of `metrics()`, each with what it counts.
METRICS = {
    "hits": "reads served by Redis",
    "misses": "reads that found nothing in Redis",
    "loads": "loader calls",
    "fills": "fills stored",
    "fenced": "fills refused because evictd invalidated the key meanwhile",
    "stampede_waits": "reads that waited for another process's fill",
    "single_flight_waits": "reads that waited for this process's own fill of the key",
    "degraded": "reads or fills that found Redis failing (the loader answered)",
    "errors": "loader calls that raised",
    "early_refreshes": "values reloaded before their TTL ran out (early refresh) or past it within the stale window",
    "stale_served": "reads served a value past its TTL while another reader reloads it",
    "l1_hits": "reads served by the in-process tier",
    "l1_evictions_size": "L1 entries dropped to stay within l1_entries",
    "l1_evictions_expired": "L1 entries dropped past l1_ttl",
    "l1_evictions_invalidated": "L1 entries dropped by evictd's broadcast (a key, tag or pattern)",
    "l1_evictions_flushed": "L1 entries dropped by a flush",
    "l1_flushes": "times the whole L1 tier was emptied (first subscription, a log that did not reach back, a bad message)",
    "l1_replays": "times L1 caught up from evictd's broadcast log instead of flushing",
    "publish_failures": "publications of these counters to Redis that failed (publish_counters; the next interval tries again)",
}


_EVICTIONS = "l1_evictions_"


class Core:
    """Settings and counters; the IO is the subclass's."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str,
        slot: str,
        ttl: Duration,
        jitter: float,
        negative_ttl: Duration,
        lease: Duration,
        stampede_wait: Duration,
        serializer: Optional[Serializer],
        record_fills: bool,
        early_refresh: float,
        stale_while_revalidate: Duration,
        l1_entries: Optional[int],
        l1_ttl: Duration,
        l1_serve_disconnected: Duration,
    ) -> None:
        if _decodes_responses(client):
            raise ValueError(
                "the redis client decodes responses: create it with decode_responses=False, "
                "values and leases are bytes"
            )
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter: {jitter!r} is not a share between 0 and 1")
        if isinstance(early_refresh, bool) or not early_refresh >= 0.0:
            raise ValueError(f"early_refresh: {early_refresh!r} is not a beta of 0 or more (1.0 is usual)")
        self._redis = client
        self._cluster = _is_cluster(client)
        self._stale = seconds(stale_while_revalidate, "stale_while_revalidate") or 0.0
        self.prefix = prefix
        self.slot = slot
        self._ttl = seconds(ttl, "ttl")
        self._jitter = jitter
        lease_seconds = seconds(lease, "lease") or 10.0
        serializer = serializer or JsonSerializer()
        self._serializer = serializer
        self._settings = fill.Settings(
            prefix=prefix,
            lease_ms=max(1, int(lease_seconds * 1000)),
            wait=seconds(stampede_wait, "stampede_wait") or 0.2,
            negative_ttl=seconds(negative_ttl, "negative_ttl"),
            dumps=serializer.dumps,
            loads=serializer.loads,
            ttl_ms=self._ttl_ms,
            clock=time.monotonic,
            record_fills=record_fills,
            early_refresh=float(early_refresh),
            stale=self._stale,
        )
        # The protocol's scripts (EVALSHA, loaded again after NOSCRIPT).
        self._fill_script = client.register_script(protocol.script("fill"))
        self._release_script = client.register_script(protocol.script("release"))
        self._version_script = client.register_script(protocol.script("version"))
        self._reload_script = client.register_script(protocol.script("reload"))
        self._counts_lock = threading.Lock()
        self._counts = {name: 0 for name in METRICS}
        self._l1: Optional[L1] = None
        if l1_entries is not None:
            if isinstance(l1_entries, bool) or l1_entries < 1:
                raise ValueError(f"l1_entries: {l1_entries!r} must be at least 1")
            self._l1 = L1(
                entries=l1_entries,
                ttl=seconds(l1_ttl, "l1_ttl"),
                serve_disconnected=seconds(l1_serve_disconnected, "l1_serve_disconnected"),
                count=self._count,
            )

    def metrics(self) -> Dict[str, int]:
        """The counters so far (`METRICS` says what each counts)."""
        with self._counts_lock:
            counts = dict(self._counts)
        if self._l1 is not None:
            counts["l1_hits"] = self._l1.hits()
        return counts

    def l1_live(self) -> bool:
        """Whether L1 is subscribed and caught up (False without L1)."""
        return self._l1 is not None and self._l1.live()

    def l1_keys(self) -> List[str]:
        """The keys L1 holds now."""
        return self._l1.keys() if self._l1 is not None else []

    def l1_items(self) -> Dict[str, Any]:
        """What L1 holds now, by key."""
        return self._l1.items() if self._l1 is not None else {}

    def register_prometheus(self, registry: Any = None, *, name: str = "default") -> None:
        """Exports the counters through `prometheus_client` (which must be
        installed) as `evictd_cache_<counter>_total`, labelled
        `cache=<name>`, in `registry` (the default registry when `None`)."""
        try:
            from prometheus_client import REGISTRY
            from prometheus_client.core import CounterMetricFamily
        except ImportError as error:
            raise ImportError(
                "register_prometheus needs prometheus_client: pip install prometheus-client"
            ) from error
        cache = self

        class Collector:
            def collect(self) -> Iterable[Any]:
                counts = cache.metrics()
                evictions = CounterMetricFamily(
                    "evictd_cache_l1_evictions",
                    "L1 entries dropped, by reason (size, expired, invalidated, flushed)",
                    labels=["cache", "reason"],
                )
                for counter, meaning in METRICS.items():
                    if counter.startswith(_EVICTIONS):
                        evictions.add_metric([name, counter[len(_EVICTIONS):]], counts[counter])
                        continue
                    family = CounterMetricFamily(
                        f"evictd_cache_{counter}", meaning, labels=["cache"]
                    )
                    family.add_metric([name], counts[counter])
                    yield family
                yield evictions

        (registry if registry is not None else REGISTRY).register(Collector())

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += n

    def _ttl_ms(self, ttl: Optional[float]) -> int:
        """What a fill stores with: `ttl` varied by the jitter, plus the
        stale window; 0 (no expiry) without a TTL."""
        if ttl is None:
            return 0
        if self._jitter > 0:
            ttl *= random.uniform(1.0 - self._jitter, 1.0 + self._jitter)
        return max(1, int((ttl + self._stale) * 1000))

    def _issue(self, step: fill.Step) -> Any:
        """Sends the Redis command of `step`: its reply, or (on an asyncio
        client) the awaitable of it; `_answer` turns that into the
        step's answer."""
        redis = self._redis
        if isinstance(step, fill.Get):
            return redis.get(step.key)
        if isinstance(step, fill.GetWithTtl):
            pipe = redis.pipeline(transaction=False)
            pipe.get(step.key)
            pipe.pttl(step.key)
            return pipe.execute()
        if isinstance(step, fill.GetMany):
            # A Cluster's keys live in other slots: one GET each (as
            # mget_nonatomic does, per slot).
            if self._cluster:
                return redis.mget_nonatomic(list(step.keys))
            return redis.mget(list(step.keys))
        if isinstance(step, fill.SetLease):
            return redis.set(step.key, step.lease, nx=True, px=step.ms)
        if isinstance(step, fill.Reload):
            return self._reload_script(keys=[step.key], args=[step.lease, protocol.LEASE])
        if isinstance(step, fill.AddToTag):
            return redis.sadd(step.tag_set, step.key)
        if isinstance(step, fill.Fill):
            return self._fill_script(keys=[step.key], args=[step.lease, step.data, step.ttl_ms])
        if isinstance(step, fill.Release):
            return self._release_script(keys=[step.key], args=[step.lease])
        if isinstance(step, fill.Version):
            return self._version_script(keys=[step.counter], args=[step.start])
        raise AssertionError(f"not a Redis step: {step!r}")

    @staticmethod
    def _answer(step: fill.Step, reply: Any) -> Any:
        if type(step) is fill.Get:  # the hot path: a reply as it is
            return reply
        if isinstance(step, fill.SetLease):
            return bool(reply)
        if isinstance(step, fill.GetWithTtl):
            return reply[0], int(reply[1])
        if isinstance(step, (fill.Reload, fill.Fill)):
            return int(reply)
        return reply

    def _read_ttl(self, ttl: Duration) -> Optional[float]:
        return seconds(ttl, "ttl") if ttl is not None else self._ttl

    def _decode(self, raw: Optional[bytes]) -> Any:
        """What `get` returns for what a key holds."""
        if raw is None:
            return None
        kind, value = protocol.parse(raw)
        if kind == "loading" or value is None or value == protocol.ABSENT:
            return None
        return self._serializer.loads(value)


def _decodes_responses(client: Any) -> bool:
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        return bool(getattr(pool, "connection_kwargs", {}).get("decode_responses"))
    # A Cluster client keeps its connection options itself.
    kwargs = getattr(client, "connection_kwargs", None) or getattr(
        getattr(client, "nodes_manager", None), "connection_kwargs", {}
    )
    return bool(kwargs.get("decode_responses"))


def _is_cluster(client: Any) -> bool:
    """Whether `client` is a `redis.cluster.RedisCluster` (sync or asyncio)."""
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def keys_of(
    function: Callable[..., Any], key: str, tags: Iterable[str]
) -> Callable[[Tuple[Any, ...], Dict[str, Any]], Tuple[str, List[str]]]:
    """For a decorated function: checks that `key` and `tags` name only
    its arguments, and returns what renders them from a call's arguments."""
    tags = list(tags)
    signature = inspect.signature(function)
    for template in [key, *tags]:
        for name in placeholders(template):
            if name not in signature.parameters:
                raise TemplateError(
                    f"{function.__qualname__}: template `{template}` names `{name}`, "
                    f"which is not one of its arguments ({', '.join(signature.parameters)})"
                )

    def rendered(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[str, List[str]]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        return render(key, values), render_all(tags, values)

    return rendered
