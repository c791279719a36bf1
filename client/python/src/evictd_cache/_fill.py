"""One read through the cache, as steps without IO (docs/PROTOCOL.md, "A
fill, step by step"): a generator that yields what it needs done (a Redis
command, the load, a pause) and is sent the answer, so that the
synchronous and the asyncio caches run the same protocol code."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, List, Optional, Tuple, Union

from . import _protocol as protocol


class RedisFailure(Exception):
    """Thrown into the steps when Redis failed to answer one of them."""


@dataclass(frozen=True)
class Get:
    key: str


@dataclass(frozen=True)
class SetLease:
    """`SET key lease NX PX ms`: answered with whether it was set."""

    key: str
    lease: bytes
    ms: int


@dataclass(frozen=True)
class AddToTag:
    tag_set: str
    key: str


@dataclass(frozen=True)
class GetMany:
    """`MGET` on a standalone Redis: answered with the values."""

    keys: Tuple[str, ...]


@dataclass(frozen=True)
class Fill:
    """`fill.lua`: answered with 1 (stored) or 0 (fenced)."""

    key: str
    lease: bytes
    data: bytes
    ttl_ms: int


@dataclass(frozen=True)
class Release:
    """`release.lua`; its failures are ignored (the lease expires)."""

    key: str
    lease: bytes


@dataclass(frozen=True)
class Load:
    """Call the loader: answered with its value (or its exception)."""


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class Count:
    """Count one of `METRICS`; answered with nothing."""

    name: str


@dataclass(frozen=True)
class Version:
    """`version.lua`: answered with the namespace's version."""

    counter: str
    start: int


Step = Union[Get, GetMany, SetLease, AddToTag, Fill, Release, Load, Pause, Count, Version]

#: evictd's stamps of tag invalidations (docs/PROTOCOL.md, "Tags taken from
#: the row"), and how long each is kept.
TAG_STAMP_KEY = "evictd:tags:stamp"
TAG_AT = "evictd:tag-at:"
TAG_PATTERN_AT = "evictd:tags:pattern-at"
TAG_AT_SECONDS = 60.0
#: The apply stamp a recorded fill carries (measured consistency).
AUDIT_STAMP_KEY = "evictd:audit:stamp"

#: A namespace's counter lives under the prefix at `evictd:ns:` + its name.
NAMESPACE_KEY = "evictd:ns:"


def versioned_key(namespace: str, version: int, key: str) -> str:
    """`key` under `version` of `namespace`: `user:7@1733216400000001:orders`."""
    return f"{namespace}@{version}:{key}"


def version(settings: "Settings", namespace: str) -> Generator[Step, Any, int]:
    """The current version of `namespace`; a counter that does not exist is
    created at the clock (microseconds), above any version it held before
    it was deleted or evicted."""
    start = int(time.time() * 1_000_000)
    answer = yield Version(settings.prefix + NAMESPACE_KEY + namespace, start)
    return int(answer)


#: evictd's continuity record of a slot: `<system id> <applied position>`.
SLOT_RECORD_KEY = "evictd:slot:"


def wait_applied(
    settings: "Settings", slot: str, position: int, timeout: float
) -> Generator[Step, Any, None]:
    """Polls evictd's continuity record of `slot` until it is at or past
    `position`; `TimeoutError` after `timeout` seconds."""
    from ._position import format_lsn, parse_lsn

    key = settings.prefix + SLOT_RECORD_KEY + slot
    deadline = settings.clock() + timeout
    pause = 0.002
    applied: Optional[int] = None
    while True:
        raw = yield Get(key)
        if raw is not None:
            _system, _sep, text = raw.decode().partition(" ")
            applied = parse_lsn(text)
            if applied >= position:
                return None
        if settings.clock() >= deadline:
            seen = "nothing" if applied is None else format_lsn(applied)
            raise TimeoutError(
                f"evictd had applied {seen} of {format_lsn(position)} after {timeout} s "
                f"(the record {key}: is evictd running on slot {slot!r}?)"
            )
        yield Pause(pause)
        pause = min(pause * 2, 0.05)


def read_in(
    settings: "Settings", namespace: str, key: str, tags: List[str], ttl: Optional[float]
) -> Generator[Step, Any, Any]:
    """`read` of `key` under the current version of `namespace`; with Redis
    down, the loader answers and nothing is stored."""
    try:
        current = yield from version(settings, namespace)
    except RedisFailure:
        return (yield from _degraded()), False
    return (yield from read(settings, versioned_key(namespace, current, key), tags, ttl))


@dataclass(frozen=True)
class Settings:
    prefix: str
    lease_ms: int
    wait: float
    negative_ttl: Optional[float]
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]
    ttl_ms: Callable[[Optional[float]], int]
    clock: Callable[[], float]
    record_fills: bool = False


def read(
    settings: Settings,
    key: str,
    tags: List[str],
    ttl: Optional[float],
    row_tags: Optional[Callable[[Any], Iterable[str]]] = None,
) -> Generator[Step, Any, Any]:
    """The steps of one read of `key`; returns the value and whether it
    is exact to keep in process (a hit in Redis, or a stored fill).
    `row_tags` gives the tags known only from the loaded value."""
    full = settings.prefix + key
    # 1. GET: a value, bare or wrapped in another reader's lease, is a hit.
    try:
        raw = yield Get(full)
    except RedisFailure:
        return (yield from _degraded()), False
    hit = yield from _hit(settings, raw)
    if hit is not None:
        return hit[0], True
    yield Count("misses")
    # 2. The fill right: a bare lease in the key, only if it is empty.
    lease = protocol.new_lease()
    try:
        taken = yield SetLease(full, lease, settings.lease_ms)
    except RedisFailure:
        return (yield from _degraded()), False
    if not taken:
        return (yield from _wait_for_fill(settings, full))
    # Recording the fill: the apply stamp, read after the lease.
    stamp: Optional[bytes] = None
    if settings.record_fills:
        try:
            stamp = yield Get(settings.prefix + AUDIT_STAMP_KEY)
        except RedisFailure:
            stamp = None
        if stamp is not None and not stamp.isdigit():
            stamp = None
    # 3. The tags, registered before the database is read; with tags from
    # the row, the tag stamp too (3b).
    tag_stamp = 0
    try:
        for tag in tags:
            yield AddToTag(settings.prefix + protocol.TAG_NAMESPACE + tag, full)
        if row_tags is not None:
            raw_stamp = yield Get(settings.prefix + TAG_STAMP_KEY)
            tag_stamp = int(raw_stamp) if raw_stamp is not None and raw_stamp.isdigit() else 0
            stamp_read = settings.clock()
    except RedisFailure:
        yield Release(full, lease)
        return (yield from _degraded()), False
    # 4. The database.
    try:
        value = yield from _load()
    except BaseException:
        yield Release(full, lease)
        raise
    # 4b. Tags from the row: registered, then refused when evictd stamped
    # one of them (or tags by pattern) after 3b, or 3b is too old.
    if row_tags is not None and value is not None:
        late = list(row_tags(value))
        try:
            for tag in late:
                yield AddToTag(settings.prefix + protocol.TAG_NAMESPACE + tag, full)
            stamps = yield GetMany(
                tuple(settings.prefix + TAG_AT + tag for tag in late)
                + (settings.prefix + TAG_PATTERN_AT,)
            )
        except RedisFailure:
            yield Release(full, lease)
            yield Count("degraded")
            return value, False
        in_time = settings.clock() - stamp_read < TAG_AT_SECONDS
        if not in_time or any(
            at is not None and at.isdigit() and int(at) > tag_stamp for at in stamps
        ):
            yield Release(full, lease)
            yield Count("fenced")
            return value, False
    # 5. Stored only while the key still holds the lease.
    if value is None:
        if settings.negative_ttl is None:
            yield Release(full, lease)
            return value, False
        data, store_ttl = protocol.ABSENT, settings.negative_ttl
    else:
        data, store_ttl = settings.dumps(value), ttl
    if stamp is not None:
        data = protocol.STAMPED + stamp + b"\0" + data
    try:
        stored = yield Fill(full, lease, data, settings.ttl_ms(store_ttl))
    except RedisFailure:
        yield Count("degraded")
        return value, False
    yield Count("fills" if stored == 1 else "fenced")
    return value, stored == 1


def _hit(settings: Settings, raw: Optional[bytes]) -> Generator[Step, Any, Optional[Tuple[Any]]]:
    """`(value,)` for a key holding a value; `None` for nothing or a bare
    lease."""
    if raw is None:
        return None
    kind, value = protocol.parse(raw)
    if kind == "loading" or value is None:
        return None
    yield Count("hits")
    if value == protocol.ABSENT:
        return (None,)
    return (settings.loads(value),)


def _wait_for_fill(settings: Settings, full: str) -> Generator[Step, Any, Tuple[Any, bool]]:
    """Another process fills: poll (2 ms, doubling up to 25 ms) for
    `settings.wait`, else load without storing."""
    yield Count("stampede_waits")
    deadline = settings.clock() + settings.wait
    pause = 0.002
    while settings.clock() < deadline:
        yield Pause(pause)
        pause = min(pause * 2, 0.025)
        try:
            raw = yield Get(full)
        except RedisFailure:
            return (yield from _degraded()), False
        hit = yield from _hit(settings, raw)
        if hit is not None:
            return hit[0], True
    return (yield from _load()), False


def _load() -> Generator[Step, Any, Any]:
    yield Count("loads")
    try:
        return (yield Load())
    except BaseException:
        yield Count("errors")
        raise


def _degraded() -> Generator[Step, Any, Any]:
    yield Count("degraded")
    return (yield from _load())
