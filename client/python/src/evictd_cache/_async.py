"""The asyncio cache, over `redis.asyncio.Redis`: the same steps as the
synchronous one (`_fill`), run with `await`."""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any, Awaitable, Callable, Dict, Generator, Iterable, Optional, TypeVar, Union

from . import _fill as fill
from ._core import REDIS_ERRORS, Core, Duration, Serializer, keys_of, seconds

T = TypeVar("T")
Loader = Callable[[], Union[Awaitable[T], T]]


def _no_loader() -> Any:
    raise AssertionError("these steps load nothing")


class AsyncCache(Core):
    """`Cache` for asyncio: the same settings and protocol over a
    `redis.asyncio.Redis` client; loaders may be coroutine functions or
    plain ones. Concurrent reads of one key in this event loop share one
    load."""

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
        )
        self._flights: Dict[str, "asyncio.Future[Any]"] = {}

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
        steps = fill.read(self._settings, key, list(tags), self._read_ttl(ttl), row_tags)
        value, _keep = await self._once(key, steps, loader)
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
        steps = fill.read_in(self._settings, namespace, key, list(tags), self._read_ttl(ttl))
        value, _keep = await self._once(namespace + "\0" + key, steps, loader)
        return value

    async def version(self, namespace: str) -> int:
        """As `Cache.version`, awaited."""
        return await self._run(fill.version(self._settings, namespace), _no_loader)

    async def versioned(self, namespace: str, key: str) -> str:
        """As `Cache.versioned`, awaited."""
        return fill.versioned_key(namespace, await self.version(namespace), key)

    async def wait_applied(self, position: int, timeout: Duration = "10s") -> None:
        """As `Cache.wait_applied`, awaited."""
        wait = seconds(timeout, "timeout") or 10.0
        await self._run(fill.wait_applied(self._settings, self.slot, position, wait), _no_loader)

    async def _once(self, key: str, steps: Generator[fill.Step, Any, T], loader: Loader[T]) -> T:
        flight = self._flights.get(key)
        if flight is not None:
            steps.close()
            self._count("single_flight_waits")
            return await asyncio.shield(flight)
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            value = await self._run(steps, loader)
            flight.set_result(value)
            return value
        except BaseException as error:
            flight.set_exception(error)
            # Retrieved here, so that a flight nobody waited for does not
            # log "exception was never retrieved".
            flight.exception()
            raise
        finally:
            del self._flights[key]

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
        answer: Any = None
        error: Optional[BaseException] = None
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(answer)
            except StopIteration as done:
                return done.value
            answer, error = None, None
            if isinstance(step, fill.Count):
                self._count(step.name)
            elif isinstance(step, fill.Load):
                try:
                    answer = loader()
                    if inspect.isawaitable(answer):
                        answer = await answer
                except BaseException as raised:
                    error = raised
            elif isinstance(step, fill.Pause):
                await asyncio.sleep(step.seconds)
            else:
                try:
                    answer = await self._command(step)
                except REDIS_ERRORS:
                    if not isinstance(step, fill.Release):
                        error = fill.RedisFailure()

    async def _command(self, step: fill.Step) -> Any:
        redis = self._redis
        if isinstance(step, fill.Get):
            return await redis.get(step.key)
        if isinstance(step, fill.GetMany):
            return await redis.mget(list(step.keys))
        if isinstance(step, fill.SetLease):
            return bool(await redis.set(step.key, step.lease, nx=True, px=step.ms))
        if isinstance(step, fill.AddToTag):
            return await redis.sadd(step.tag_set, step.key)
        if isinstance(step, fill.Fill):
            return await self._fill_script(keys=[step.key], args=[step.lease, step.data, step.ttl_ms])
        if isinstance(step, fill.Release):
            return await self._release_script(keys=[step.key], args=[step.lease])
        if isinstance(step, fill.Version):
            return await self._version_script(keys=[step.counter], args=[step.start])
        raise AssertionError(f"not a Redis step: {step!r}")
