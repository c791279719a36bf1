"""The synchronous cache, over `redis.Redis`."""

from __future__ import annotations

import functools
import inspect
import threading
import time
from typing import Any, Callable, Dict, Generator, Iterable, Optional, TypeVar

import redis as redis_py

from . import _fill as fill
from ._l1 import MISS, Subscriber
from ._publish import Publisher
from ._core import REDIS_ERRORS, Core, Duration, Serializer, keys_of, seconds

T = TypeVar("T")


def _no_loader() -> Any:
    raise AssertionError("these steps load nothing")


class _Flight:
    """One fill of a key in this process, which other threads wait for: the
    leader holds `done` until the fill ends (a bare lock: much cheaper to
    make than an Event, and made on every read that goes to Redis)."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.value: Any = None
        self.error: Optional[BaseException] = None


class Cache(Core):
    """Cache-aside reads over a redis-py client with fenced fills: a reader that loaded a row before a commit can never
    store it after evictd's invalidation of the key.

    `prefix` is evictd's `redis.prefix`, `slot` its `postgres.slot` (for
    `wait_applied`). Values are stored with `ttl`
    (none by default: evictd keeps them exact), varied at random by up to
    `jitter` either way; "no row" (a loader returning `None`) is cached for
    `negative_ttl` when it is set. `lease` must outlast the slowest loader;
    `stampede_wait` is how long a reader waits for another process's fill
    before loading itself without storing. With `record_fills` each fill
    carries evictd's apply stamp, for its consistency checker.

    With a TTL, `early_refresh` (XFetch's beta; 1.0 is usual) lets one
    read reload a value before it expires, the likelier the nearer the
    expiry and the slower loads have been; `stale_while_revalidate` keeps
    values that long past their TTL, served at once while one reader
    reloads them. A reload is a fenced fill: an invalidation meanwhile
    wins. Values stored without a TTL are never reloaded early.

    `client` is a `redis.Redis` or a `redis.cluster.RedisCluster`. With
    `l1_entries`, an in-process tier of that many entries (each kept at
    most `l1_ttl`) follows evictd's broadcast on `l1_channel` (its
    `redis.l1_channel`); while its subscription is down it serves only for
    `l1_serve_disconnected` (not at all by default). Durations are seconds
    or text (`200ms`, `10s`, `5m`, `1h`). Thread-safe.
    """

    def __init__(
        self,
        client: "redis_py.Redis",
        *,
        prefix: str = "",
        slot: str = "evictd",
        ttl: Duration = None,
        jitter: float = 0.0,
        negative_ttl: Duration = None,
        lease: Duration = "10s",
        stampede_wait: Duration = "200ms",
        serializer: Optional[Serializer] = None,
        record_fills: bool = False,
        early_refresh: float = 0.0,
        stale_while_revalidate: Duration = None,
        l1_entries: Optional[int] = None,
        l1_ttl: Duration = None,
        l1_channel: str = "evictd:l1",
        l1_serve_disconnected: Duration = None,
        publish_counters: Duration = None,
        publish_name: str = "default",
    ) -> None:
        super().__init__(
            client,
            prefix=prefix,
            slot=slot,
            ttl=ttl,
            jitter=jitter,
            negative_ttl=negative_ttl,
            lease=lease,
            stampede_wait=stampede_wait,
            serializer=serializer,
            record_fills=record_fills,
            early_refresh=early_refresh,
            stale_while_revalidate=stale_while_revalidate,
            l1_entries=l1_entries,
            l1_ttl=l1_ttl,
            l1_serve_disconnected=l1_serve_disconnected,
        )
        self._flights: Dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()
        self._subscriber: Optional[Subscriber] = None
        if self._l1 is not None:
            self._subscriber = Subscriber(self._l1, client, prefix=prefix, channel=l1_channel)
        self._publisher: Optional[Publisher] = None
        every = seconds(publish_counters, "publish_counters")
        if every is not None:
            self._publisher = Publisher(
                client, prefix, publish_name, every, self.metrics, lambda: self._count("publish_failures")
            )

    def get_or_load(
        self,
        key: str,
        loader: Callable[[], T],
        *,
        tags: Iterable[str] = (),
        ttl: Duration = None,
        row_tags: Optional[Callable[[T], Iterable[str]]] = None,
    ) -> T:
        """The value of `key` (without the prefix): from Redis, or from
        `loader()` (the database read), stored unless evictd invalidated
        the key while it loaded. `tags` are registered before the load, so
        that an invalidation of any of them fences the fill; `row_tags`,
        a function of the loaded value, gives tags known only from it
        (`user:{user_id}` of an order), checked against evictd's tag
        stamps instead. `ttl` overrides the cache's. Concurrent calls for
        one key in this process share one load."""
        l1 = self._l1
        seen = 0
        if l1 is not None:
            value = l1.get(key)
            if value is not MISS:
                return value
            # Noted before Redis is read: a message from now on that
            # touches the key keeps what this read returns out of L1.
            seen = l1.generation()
        tags = list(tags)
        steps = fill.read(self._settings, key, tags, self._read_ttl(ttl), row_tags)
        value, keep = self._run(steps, loader)
        if keep and l1 is not None:
            l1.put(key, value, tags, seen)
        return value

    def get_or_load_in(
        self,
        namespace: str,
        key: str,
        loader: Callable[[], T],
        *,
        tags: Iterable[str] = (),
        ttl: Duration = None,
    ) -> T:
        """`get_or_load` of `key` under the current version of `namespace`
        (see `versioned`): a bump of the namespace by evictd (a mapping's
        `versions`) leaves every key cached under it behind at once. With
        L1, the version is kept there too (evicted by the bump's
        broadcast). With Redis down the loader answers and nothing is
        stored."""
        try:
            current = self.version(namespace)
        except fill.RedisFailure:
            return self._run(fill.degraded(self._settings), loader)
        return self.get_or_load(fill.versioned_key(namespace, current, key), loader, tags=tags, ttl=ttl)

    def version(self, namespace: str) -> int:
        """The current version of `namespace` (its counter
        `evictd:ns:<namespace>`, created at the clock when absent), from
        L1 when it holds it. `RedisFailure` when Redis does not answer."""
        l1 = self._l1
        if l1 is None:
            return self._run(fill.version(self._settings, namespace), _no_loader)
        counter = fill.NAMESPACE_KEY + namespace
        current = l1.get(counter)
        if current is MISS:
            seen = l1.generation()
            current = self._run(fill.version(self._settings, namespace), _no_loader)
            l1.put(counter, current, (), seen)
        return current

    def versioned(self, namespace: str, key: str) -> str:
        """`key` under the current version of `namespace`
        (`<namespace>@<version>:<key>`, e.g. `user:7@1733216400000001:orders`)."""
        return fill.versioned_key(namespace, self.version(namespace), key)

    def wait_applied(self, position: int, timeout: Duration = "10s") -> None:
        """Waits until evictd has applied everything up to `position` (from
        `commit_position` on the connection that wrote), so that the next
        read sees the write: read your own writes. With L1, until this
        process's L1 has applied it too, so that a read through a warm L1
        sees the write as well. `TimeoutError` past `timeout`;
        `RedisFailure` when Redis does not answer."""
        wait = seconds(timeout, "timeout") or 10.0
        self._run(fill.wait_applied(self._settings, self.slot, position, wait, self._l1), _no_loader)

    def l1_wait_live(self, timeout: Duration = "10s") -> bool:
        """Waits until L1 is subscribed and caught up; whether it is."""
        return self._l1 is not None and self._l1.wait_until(None, seconds(timeout, "timeout") or 10.0)

    def l1_caught_up(self, timeout: Duration = "10s") -> bool:
        """Waits until L1 has applied evictd's last broadcast (as
        `evictd:l1:last` says now); whether it has."""
        if self._l1 is None or self._subscriber is None:
            return False
        return self._l1.wait_until(self._subscriber.last(), seconds(timeout, "timeout") or 10.0)

    def close(self) -> None:
        """Stops L1's subscriber and the counters' publisher (publishing
        once more); the redis client stays the caller's."""
        if self._subscriber is not None:
            self._subscriber.close()
        if self._publisher is not None:
            self._publisher.close()

    def get(self, key: str) -> Any:
        """The value Redis holds for `key`, or `None` (nothing, a fill in
        progress, or a cached "no row")."""
        return self._decode(self._redis.get(self.prefix + key))

    def invalidate(self, key: str) -> None:
        """Deletes `key` (evictd does this on every change of its rows)."""
        self._redis.unlink(self.prefix + key)

    def cached(
        self, key: str, *, tags: Iterable[str] = (), ttl: Duration = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Caches a function's result under `key`, a template of its
        arguments in the mappings' syntax (`"user:{user_id}:profile"`),
        with `tags` rendered the same way: the key a function fills is the
        key evictd renders from the row. A template naming something that
        is not an argument is an error at decoration time."""
        seconds(ttl, "ttl")

        def decorate(function: Callable[..., T]) -> Callable[..., T]:
            if inspect.iscoroutinefunction(function):
                raise TypeError(
                    f"{function.__qualname__} is async: decorate it with an AsyncCache's cached"
                )
            rendered = keys_of(function, key, tags)

            @functools.wraps(function)
            def wrapper(*args: Any, **kwargs: Any) -> T:
                full_key, full_tags = rendered(args, kwargs)
                return self.get_or_load(
                    full_key, lambda: function(*args, **kwargs), tags=full_tags, ttl=ttl
                )

            return wrapper

        return decorate

    def _run(self, steps: Generator[fill.Step, Any, T], loader: Callable[[], T]) -> T:
        """Runs the steps of one read: each Redis command on the client,
        the load, the pauses; at a miss, the single flight (a read of a
        key another thread of this process fills takes that fill's
        result)."""
        answer: Any = None
        error: Optional[BaseException] = None
        flight: Optional[_Flight] = None
        flight_key = ""
        try:
            while True:
                try:
                    step = steps.throw(error) if error is not None else steps.send(answer)
                except StopIteration as done:
                    if flight is not None:
                        flight.value = done.value
                    return done.value
                answer, error = None, None
                kind = type(step)
                if kind is fill.Count:
                    self._count(step.name)
                elif kind is fill.Load:
                    try:
                        answer = loader()
                    except BaseException as raised:
                        error = raised
                elif kind is fill.Exclusive:
                    with self._flights_lock:
                        joined = self._flights.get(step.key)
                        if joined is None:
                            flight_key = step.key
                            flight = self._flights[flight_key] = _Flight()
                    if joined is not None:
                        steps.close()
                        self._count("single_flight_waits")
                        with joined.done:
                            pass
                        if joined.error is not None:
                            raise joined.error
                        return joined.value
                elif kind is fill.Pause:
                    time.sleep(step.seconds)
                else:
                    try:
                        answer = self._answer(step, self._issue(step))
                    except REDIS_ERRORS:
                        if kind is not fill.Release:
                            error = fill.RedisFailure()
        except BaseException as raised:
            if flight is not None:
                flight.error = raised
            raise
        finally:
            if flight is not None:
                with self._flights_lock:
                    del self._flights[flight_key]
                flight.done.release()
