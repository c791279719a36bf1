"""The asyncio cache, over `redis.asyncio.Redis`: the same steps as the
synchronous one (`_fill`), run with `await`."""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any, Awaitable, Callable, Dict, Generator, Iterable, Optional, TypeVar, Union

from . import _fill as fill
from ._core import REDIS_ERRORS, Core, Duration, Serializer, keys_of, seconds
from ._l1 import MISS, AsyncSubscriber
from ._publish import AsyncPublisher

T = TypeVar("T")
Loader = Callable[[], Union[Awaitable[T], T]]


def _no_loader() -> Any:
    raise AssertionError("these steps load nothing")


class AsyncCache(Core):
    """`Cache` for asyncio: the same settings and protocol over a
    `redis.asyncio.Redis` (or `redis.asyncio.cluster.RedisCluster`)
    client; loaders may be coroutine functions or plain ones. Concurrent
    reads of one key in this event loop share one load. With
    `l1_entries`, L1's subscriber is one task on the loop, started by the
    first read (or `l1_wait_live`) and stopped by `aclose`."""

    def __init__(
        self,
        client: Any,
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
        self._flights: Dict[str, "asyncio.Future[Any]"] = {}
        self._subscriber: Optional[AsyncSubscriber] = None
        if self._l1 is not None:
            self._subscriber = AsyncSubscriber(self._l1, client, prefix=prefix, channel=l1_channel)
        self._publisher: Optional[AsyncPublisher] = None
        every = seconds(publish_counters, "publish_counters")
        if every is not None:
            self._publisher = AsyncPublisher(
                client, prefix, publish_name, every, self.metrics, lambda: self._count("publish_failures")
            )

    async def get_or_load(
        self,
        key: str,
        loader: Loader[T],
        *,
        tags: Iterable[str] = (),
        ttl: Duration = None,
        row_tags: Optional[Callable[[T], Iterable[str]]] = None,
    ) -> T:
        """As `Cache.get_or_load`, awaited."""
        if self._publisher is not None:
            self._publisher.ensure_started()
        l1 = self._l1
        seen = 0
        if l1 is not None:
            self._subscriber.ensure_started()  # type: ignore[union-attr]
            value = l1.get(key)
            if value is not MISS:
                return value
            # Noted before Redis is read (see Cache.get_or_load).
            seen = l1.generation()
        tags = list(tags)
        steps = fill.read(self._settings, key, tags, self._read_ttl(ttl), row_tags)
        value, keep = await self._run(steps, loader)
        if keep and l1 is not None:
            l1.put(key, value, tags, seen)
        return value

    async def get_or_load_in(
        self,
        namespace: str,
        key: str,
        loader: Loader[T],
        *,
        tags: Iterable[str] = (),
        ttl: Duration = None,
    ) -> T:
        """As `Cache.get_or_load_in`, awaited."""
        try:
            current = await self.version(namespace)
        except fill.RedisFailure:
            return await self._run(fill.degraded(self._settings), loader)
        return await self.get_or_load(
            fill.versioned_key(namespace, current, key), loader, tags=tags, ttl=ttl
        )

    async def version(self, namespace: str) -> int:
        """As `Cache.version`, awaited."""
        l1 = self._l1
        if l1 is None:
            return await self._run(fill.version(self._settings, namespace), _no_loader)
        self._subscriber.ensure_started()  # type: ignore[union-attr]
        counter = fill.NAMESPACE_KEY + namespace
        current = l1.get(counter)
        if current is MISS:
            seen = l1.generation()
            current = await self._run(fill.version(self._settings, namespace), _no_loader)
            l1.put(counter, current, (), seen)
        return current

    async def versioned(self, namespace: str, key: str) -> str:
        """As `Cache.versioned`, awaited."""
        return fill.versioned_key(namespace, await self.version(namespace), key)

    async def wait_applied(self, position: int, timeout: Duration = "10s") -> None:
        """As `Cache.wait_applied`, awaited."""
        wait = seconds(timeout, "timeout") or 10.0
        await self._run(fill.wait_applied(self._settings, self.slot, position, wait, self._l1), _no_loader)

    async def l1_wait_live(self, timeout: Duration = "10s") -> bool:
        """As `Cache.l1_wait_live`, awaited (starts the subscriber)."""
        if self._l1 is None or self._subscriber is None:
            return False
        self._subscriber.ensure_started()
        return await self._l1.wait_until_async(None, seconds(timeout, "timeout") or 10.0)

    async def l1_caught_up(self, timeout: Duration = "10s") -> bool:
        """As `Cache.l1_caught_up`, awaited."""
        if self._l1 is None or self._subscriber is None:
            return False
        self._subscriber.ensure_started()
        last = await self._subscriber.last()
        return await self._l1.wait_until_async(last, seconds(timeout, "timeout") or 10.0)

    async def aclose(self) -> None:
        """Stops L1's subscriber task and the counters' publisher
        (publishing once more); the redis client stays the caller's."""
        if self._subscriber is not None:
            await self._subscriber.close()
        if self._publisher is not None:
            await self._publisher.close()

    async def get(self, key: str) -> Any:
        """As `Cache.get`, awaited."""
        return self._decode(await self._redis.get(self.prefix + key))

    async def invalidate(self, key: str) -> None:
        """Deletes `key` (evictd does this on every change of its rows)."""
        await self._redis.unlink(self.prefix + key)

    def cached(
        self, key: str, *, tags: Iterable[str] = (), ttl: Duration = None
    ) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
        """As `Cache.cached`, for `async def` functions."""
        seconds(ttl, "ttl")

        def decorate(function: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
            if not inspect.iscoroutinefunction(function):
                raise TypeError(
                    f"{function.__qualname__} is not async: decorate it with a Cache's cached"
                )
            rendered = keys_of(function, key, tags)

            @functools.wraps(function)
            async def wrapper(*args: Any, **kwargs: Any) -> T:
                full_key, full_tags = rendered(args, kwargs)
                return await self.get_or_load(
                    full_key, lambda: function(*args, **kwargs), tags=full_tags, ttl=ttl
                )

            return wrapper

        return decorate

    async def _run(self, steps: Generator[fill.Step, Any, T], loader: Loader[T]) -> T:
        """As `Cache._run`, awaited: a read of a key another task of this
        loop fills takes that fill's result."""
        answer: Any = None
        error: Optional[BaseException] = None
        flight: "Optional[asyncio.Future[Any]]" = None
        flight_key = ""
        try:
            while True:
                try:
                    step = steps.throw(error) if error is not None else steps.send(answer)
                except StopIteration as done:
                    if flight is not None:
                        flight.set_result(done.value)
                    return done.value
                answer, error = None, None
                kind = type(step)
                if kind is fill.Count:
                    self._count(step.name)
                elif kind is fill.Load:
                    try:
                        answer = loader()
                        if inspect.isawaitable(answer):
                            answer = await answer
                    except BaseException as raised:
                        error = raised
                elif kind is fill.Exclusive:
                    joined = self._flights.get(step.key)
                    if joined is not None:
                        steps.close()
                        self._count("single_flight_waits")
                        return await asyncio.shield(joined)
                    flight_key = step.key
                    flight = self._flights[flight_key] = asyncio.get_running_loop().create_future()
                elif kind is fill.Pause:
                    await asyncio.sleep(step.seconds)
                else:
                    try:
                        answer = self._answer(step, await self._issue(step))
                    except REDIS_ERRORS:
                        if kind is not fill.Release:
                            error = fill.RedisFailure()
        except BaseException as raised:
            if flight is not None and not flight.done():
                if isinstance(raised, asyncio.CancelledError):
                    flight.cancel()
                else:
                    flight.set_exception(raised)
                    # Retrieved here, so that a flight nobody waited for
                    # does not log "exception was never retrieved".
                    flight.exception()
            raise
        finally:
            if flight is not None:
                del self._flights[flight_key]
