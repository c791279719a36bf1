"""One read through the cache, as steps without IO (docs/PROTOCOL.md, "A
fill, step by step"): a generator that yields what it needs done (a Redis
command, the load, a pause) and is sent the answer, so that the
synchronous and the asyncio caches run the same protocol code."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
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
class GetWithTtl:
    """`GET` and `PTTL` of one key: answered with `(value, pttl_ms)`."""

    key: str


@dataclass(frozen=True)
class Reload:
    """`reload.lua`: wraps the value in `lease`; answered with 1 (the
    reload right is ours) or 0."""

    key: str
    lease: bytes


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
class Exclusive:
    """The read missed and goes on to fill `key`: the driver lets one read
    of a key in this process go on and ends the others with its result
    (single flight). Answered with nothing."""

    key: str


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


Step = Union[
    Get,
    GetWithTtl,
    GetMany,
    SetLease,
    Reload,
    AddToTag,
    Fill,
    Release,
    Load,
    Exclusive,
    Pause,
    Count,
    Version,
]

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
    settings: "Settings", slot: str, position: int, timeout: float, l1: Any = None
) -> Generator[Step, Any, None]:
    """Polls evictd's continuity record of `slot` until it is at or past
    `position`; with `l1` (an `L1`), until that tier has applied it too:
    a broadcast it applied with an `lsn` at or past `position` settles it,
    else the `evictd:l1:last` read once the record is there.
    `TimeoutError` after `timeout` seconds."""
    from ._l1 import LAST_KEY, parse_last
    from ._position import format_lsn, parse_lsn

    key = settings.prefix + SLOT_RECORD_KEY + slot
    deadline = settings.clock() + timeout
    pause = 0.002
    applied: Optional[int] = None
    target: Any = None  # the broadcast L1 must reach, once Redis has it
    while True:
        if l1 is not None and l1.applied_lsn() >= position:
            return None
        if target is None:
            raw = yield Get(key)
            if raw is not None:
                _system, _sep, text = raw.decode().partition(" ")
                applied = parse_lsn(text)
            if applied is not None and applied >= position:
                if l1 is None:
                    return None
                # Read after the record: evictd sets it after publishing
                # the batch's broadcast.
                target = parse_last((yield Get(settings.prefix + LAST_KEY))) or "none"
        if target is not None and l1.reached(None if target == "none" else target):
            return None
        if settings.clock() >= deadline:
            seen = "nothing" if applied is None else format_lsn(applied)
            if target is not None:
                raise TimeoutError(
                    f"evictd had applied {format_lsn(position)} in Redis, but this process's L1 "
                    f"had not applied its broadcast {target} after {timeout} s (is it subscribed?)"
                )
            raise TimeoutError(
                f"evictd had applied {seen} of {format_lsn(position)} after {timeout} s "
                f"(the record {key}: is evictd running on slot {slot!r}?)"
            )
        yield Pause(pause)
        pause = min(pause * 2, 0.05)


class LoadTime:
    """A moving average of how long loads take (weight 1/8), for early
    refresh. Updated without a lock: a lost update only nudges it."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def observe(self, took: float) -> None:
        before = self.seconds
        self.seconds = took if before == 0.0 else before + (took - before) / 8


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
    #: XFetch's beta (0: no early refresh).
    early_refresh: float = 0.0
    #: The stale-while-revalidate window, in seconds (0: none).
    stale: float = 0.0
    load_time: LoadTime = field(default_factory=LoadTime)


def _refresh(settings: Settings, left_ms: int) -> Optional[bool]:
    """Whether a value with `left_ms` of PTTL is reloaded by this read:
    `None` no; `True` past its TTL proper (within the stale window);
    `False` early (XFetch)."""
    if left_ms < 0:
        return None  # no expiry: an evictd refresh, say
    fresh_ms = left_ms - settings.stale * 1000
    if fresh_ms <= 0:
        return True
    if settings.early_refresh > 0:
        draw = 1.0 - random.random()  # (0, 1]
        load_ms = settings.load_time.seconds * 1000
        if load_ms * settings.early_refresh * -math.log(draw) >= fresh_ms:
            return False
    return None


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
    refreshing = ttl is not None and (settings.early_refresh > 0 or settings.stale > 0)
    # 1. GET: a value, bare or wrapped in another reader's lease, is a hit
    # (with refresh on, unless this read is to reload it).
    try:
        if refreshing:
            raw, left_ms = yield GetWithTtl(full)
        else:
            raw, left_ms = (yield Get(full)), -1
    except RedisFailure:
        return (yield from degraded(settings)), False
    kind, found = protocol.parse(raw) if raw is not None else ("none", None)
    stale: Optional[bool] = None
    if kind == "value" and refreshing:
        stale = _refresh(settings, left_ms)
    if found is not None and stale is None:
        if kind == "reloading" and refreshing and _refresh(settings, left_ms) is True:
            yield Count("stale_served")
        return (yield from _hit(settings, found)), True
    lease = protocol.new_lease()
    if found is not None:
        # 2'. The reload right: the value wrapped in a lease, which the
        # other readers keep getting meanwhile.
        try:
            taken = yield Reload(full, lease)
        except RedisFailure:
            taken = 0
        if taken != 1:
            if stale:
                yield Count("stale_served")
            return (yield from _hit(settings, found)), True
        yield Count("early_refreshes")
    else:
        # One read per key in this process goes on from here.
        yield Exclusive(key)
        yield Count("misses")
        # 2. The fill right: a bare lease in the key, only if it is empty.
        try:
            taken = yield SetLease(full, lease, settings.lease_ms)
        except RedisFailure:
            return (yield from degraded(settings)), False
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
        return (yield from degraded(settings)), False
    # 4. The database.
    try:
        value = yield from _load(settings)
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


def _hit(settings: Settings, value: bytes) -> Generator[Step, Any, Any]:
    """A hit on what a key holds (unwrapped): its value, or `None` for a
    cached "no row"."""
    yield Count("hits")
    if value == protocol.ABSENT:
        return None
    return settings.loads(value)


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
            return (yield from degraded(settings)), False
        if raw is not None:
            _kind, found = protocol.parse(raw)
            if found is not None:
                return (yield from _hit(settings, found)), True
    return (yield from _load(settings)), False


def _load(settings: Settings) -> Generator[Step, Any, Any]:
    """Calls the loader, timing it for early refresh."""
    yield Count("loads")
    started = settings.clock()
    try:
        value = yield Load()
    except BaseException:
        yield Count("errors")
        raise
    settings.load_time.observe(settings.clock() - started)
    return value


def degraded(settings: Settings) -> Generator[Step, Any, Any]:
    """Redis failed: the loader answers, nothing is stored."""
    yield Count("degraded")
    return (yield from _load(settings))
