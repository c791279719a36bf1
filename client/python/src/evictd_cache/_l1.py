"""The in-process tier (L1), kept exact by evictd's broadcast
(docs/PROTOCOL.md, "An in-process cache (L1) that stays exact"): a bounded
map evicted by each message, caught up from the broadcast log after a gap
or a reconnect, flushed when the log does not reach back, and fenced
against messages that overtook a read. `L1` is the state, without IO
and thread-safe; a daemon thread (`Subscriber`) or one asyncio task
(`AsyncSubscriber`) feeds it, running its catch-up steps on a sync or an
asyncio client."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Generator, Iterable, List, Optional, Set, Tuple, Union

from ._background import Background
from ._position import parse_lsn

LOG_KEY = "evictd:l1:log"
LAST_KEY = "evictd:l1:last"
LOG_FIELD = b"m"
#: Messages kept for the store fence; a read older than these is refused.
FENCE_MESSAGES = 4096
REPLAY_CHUNK = 1000

Position = Tuple[str, int]

#: What `L1.get` returns for a key it cannot serve.
MISS = object()


def glob(pattern: str) -> "re.Pattern[str]":
    """A broadcast pattern: `*` any run of characters, `\\` makes the next
    character literal, nothing else special."""
    out, chars = [], iter(pattern)
    for c in chars:
        if c == "\\":
            out.append(re.escape(next(chars, "\\")))
        elif c == "*":
            out.append(".*")
        else:
            out.append(re.escape(c))
    return re.compile("".join(out), re.DOTALL)


@dataclass
class Message:
    epoch: str
    seq: int
    keys: List[str] = field(default_factory=list)
    tags: List[str] = field(default_factory=list)
    patterns: List["re.Pattern[str]"] = field(default_factory=list)
    tag_patterns: List["re.Pattern[str]"] = field(default_factory=list)
    lsn: Optional[str] = None

    @staticmethod
    def parse(data: Any) -> "Message":
        """A message's JSON; `ValueError` when it is not one."""
        body = json.loads(data)
        if not isinstance(body, dict) or not isinstance(body.get("epoch"), str):
            raise ValueError("not a broadcast message")
        seq = body.get("seq")
        if not isinstance(seq, int):
            raise ValueError("a broadcast message without a seq")
        return Message(
            epoch=body["epoch"],
            seq=seq,
            keys=list(body.get("keys", [])),
            tags=list(body.get("tags", [])),
            patterns=[glob(p) for p in body.get("patterns", [])],
            tag_patterns=[glob(p) for p in body.get("tag_patterns", [])],
            lsn=body.get("lsn"),
        )

    def touches(self, key: str, tags: Iterable[str]) -> bool:
        if key in self.keys or any(p.fullmatch(key) for p in self.patterns):
            return True
        return any(
            tag in self.tags or any(p.fullmatch(tag) for p in self.tag_patterns) for tag in tags
        )


def contiguous(position: Position, newest_first: List[Message]) -> Optional[List[Message]]:
    """The messages oldest first, if they continue `position` without a
    gap: within an epoch each seq at most one past the one before, and a
    new epoch starting at 1."""
    messages = list(reversed(newest_first))
    epoch, seq = position
    for message in messages:
        follows = message.seq <= seq + 1 if message.epoch == epoch else message.seq == 1
        if not follows:
            return None
        if message.epoch != epoch or message.seq > seq:
            epoch, seq = message.epoch, message.seq
    return messages


@dataclass(frozen=True)
class ReadLast:
    """`GET P evictd:l1:last`: answered with its value."""


@dataclass(frozen=True)
class ReadLog:
    """`XREVRANGE P evictd:l1:log end - COUNT n`: answered with the entries."""

    end: str
    count: int


LogStep = Union[ReadLast, ReadLog]


def parse_last(raw: Optional[bytes]) -> Optional[Position]:
    """`evictd:l1:last` (`epoch:seq`) as a position."""
    if raw is None:
        return None
    epoch, _sep, seq = raw.decode().rpartition(":")
    return (epoch, int(seq)) if seq.isdigit() else None


def since(position: Position) -> Generator[LogStep, Any, Optional[List[Message]]]:
    """The messages after `position` from the log, oldest first, or `None`
    when the log does not reach back or has a gap."""
    epoch, seq = position
    missed: List[Message] = []
    end = "+"
    while True:
        entries = yield ReadLog(end, REPLAY_CHUNK)
        for entry_id, fields in entries:
            end = "(" + (entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
            try:
                message = Message.parse(fields[LOG_FIELD])
            except (KeyError, ValueError, TypeError):
                return None
            if message.epoch == epoch and message.seq <= seq:
                return contiguous(position, missed)
            missed.append(message)
        if len(entries) < REPLAY_CHUNK:
            oldest = missed[-1] if missed else None
            if oldest is not None and oldest.epoch == epoch and oldest.seq == seq + 1:
                return contiguous(position, missed)
            return None


class L1:
    """The in-process tier's state: what it holds, where in evictd's
    broadcast it is, and whether it may serve. No IO: a subscriber feeds
    it (`catch_up` after each subscription, `receive` for each message,
    `disconnected` when the subscription fails)."""

    def __init__(
        self,
        *,
        entries: int,
        ttl: Optional[float],
        serve_disconnected: Optional[float],
        count: Callable[..., None],
    ) -> None:
        self._max_entries = entries
        self._ttl = ttl
        self._serve_disconnected = serve_disconnected
        self._count = count
        self._lock = threading.Lock()
        # `next` on a count is one atomic step: no lock on the hot path.
        self._hits = itertools.count()
        self._hits_counter = functools.partial(next, self._hits)
        self._entries: "OrderedDict[str, Tuple[Any, Tuple[str, ...], Optional[float]]]" = OrderedDict()
        self._by_tag: Dict[str, Set[str]] = {}
        self._generation = 0
        self._flushed_at = 0
        self._recent: Deque[Tuple[int, Message]] = deque(maxlen=FENCE_MESSAGES)
        self._position: Optional[Position] = None
        # The highest `lsn` of an applied message (read your writes).
        self._applied_lsn = 0
        self._live = False
        self._down_since = time.monotonic()
        self._changed = threading.Condition(self._lock)

    # -- serving -----------------------------------------------------------

    def generation(self) -> int:
        """Note it before reading Redis or the database; give it to `put`."""
        with self._lock:
            return self._generation

    def get(self, key: str) -> Any:
        """The value when L1 holds `key` and may serve it, else `MISS`.

        The hot path takes no lock: each step is one atomic operation on
        the map (a lookup, a move to the end), so a concurrent eviction
        either comes first (a miss) or after (the read came before the
        message was applied, as if it had arrived a moment later)."""
        entry = self._entries.get(key)
        if entry is None or not (self._live or self._serving()):
            return MISS
        expires = entry[2]
        if expires is not None and time.monotonic() >= expires:
            with self._lock:
                if self._entries.get(key) is entry:
                    self._drop(key)
            self._count("l1_evictions_expired")
            return MISS
        try:
            self._entries.move_to_end(key)
        except KeyError:
            return MISS  # evicted meanwhile
        self._hits_counter()
        return entry[0]

    def put(self, key: str, value: Any, tags: Iterable[str], seen: int) -> bool:
        """Keeps `value` unless a flush or a message touching it came after
        `seen` (or L1 is not live)."""
        tags = tuple(tags)
        with self._lock:
            if not self._live or self._flushed_at > seen:
                return False
            if seen < self._generation:
                oldest = self._recent[0][0] if self._recent else self._generation + 1
                if seen + 1 < oldest:
                    return False  # older than the messages kept
                for generation, message in self._recent:
                    if generation > seen and message.touches(key, tags):
                        return False
            self._drop(key)
            expires = time.monotonic() + self._ttl if self._ttl is not None else None
            self._entries[key] = (value, tags, expires)
            for tag in tags:
                self._by_tag.setdefault(tag, set()).add(key)
            while len(self._entries) > self._max_entries:
                oldest_key = next(iter(self._entries))
                self._drop(oldest_key)
                self._count("l1_evictions_size")
            return True

    def hits(self) -> int:
        """Reads served so far."""
        # A count's repr is `count(N)`: reading it does not advance it.
        return int(repr(self._hits)[6:-1])

    def live(self) -> bool:
        with self._lock:
            return self._live

    def position(self) -> Optional[Position]:
        with self._lock:
            return self._position

    def items(self) -> Dict[str, Any]:
        with self._lock:
            return {key: entry[0] for key, entry in self._entries.items()}

    def keys(self) -> List[str]:
        with self._lock:
            return list(self._entries)

    def applied_lsn(self) -> int:
        """The highest commit position a message applied while live
        carried: every batch up to it is applied here."""
        with self._lock:
            return self._applied_lsn if self._live else 0

    def reached(self, position: Optional[Position]) -> bool:
        """Whether L1 is live and has applied `position` (same epoch, seq
        at or past; `None`: live is enough)."""
        with self._lock:
            return self._live and self._reached(position)

    def wait_until(self, position: Optional[Position], timeout: float) -> bool:
        """Blocks until `reached(position)`; whether it was in `timeout`."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._live and self._reached(position), timeout
            )

    async def wait_until_async(self, position: Optional[Position], timeout: float) -> bool:
        """`wait_until` for asyncio: polls, without blocking the loop."""
        deadline = time.monotonic() + timeout
        while not self.reached(position):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def _serving(self) -> bool:
        if self._live:
            return True
        bound = self._serve_disconnected
        return bound is not None and time.monotonic() - self._down_since <= bound

    # -- fed by the subscriber ------------------------------------------------

    def disconnected(self) -> None:
        """The subscription failed: stop serving (beyond the bound)."""
        with self._lock:
            if self._live:
                self._live = False
                self._down_since = time.monotonic()

    def catch_up(self) -> Generator[LogStep, Any, None]:
        """After (re)subscribing: replay what was missed, else flush; then
        live. The log is read without the lock held."""
        last = parse_last((yield ReadLast()))
        with self._lock:
            position = self._position
            if position is None or last is None or last == position:
                if position is None:
                    self._flush()
                    self._position = last
                self._go_live()
                return
        missed = yield from since(position)
        with self._lock:
            if missed is None:
                self._flush()
                self._position = last
            else:
                for message in missed:
                    self._apply(message)
                self._count("l1_replays")
                if not self._reached(last):
                    self._flush()
                    self._position = last
            self._go_live()

    def receive(self, data: Any) -> Generator[LogStep, Any, None]:
        """One message from the channel: applied when it follows; after a
        gap or in a new epoch, what was missed is replayed first (or L1
        flushed when the log does not reach back)."""
        try:
            message = Message.parse(data)
        except (ValueError, TypeError):
            with self._lock:
                self._flush()
            return
        with self._lock:
            if self._follows(message):
                self._apply(message)
                return
            # A gap or a new epoch: stop serving, replay from the log.
            self._live = False
            self._down_since = time.monotonic()
            position = self._position
        missed = (yield from since(position)) if position is not None else None
        with self._lock:
            if missed is None:
                self._flush()
                self._position = None
            else:
                for replayed in missed:
                    self._apply(replayed)
                self._count("l1_replays")
                if not self._follows(message):
                    self._flush()
                    self._position = None
            self._apply(message)
            self._go_live()

    # -- under the lock --------------------------------------------------------

    def _go_live(self) -> None:
        self._live = True
        self._changed.notify_all()

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for tag in entry[1]:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[tag]

    def _flush(self) -> None:
        if self._entries:
            self._count("l1_evictions_flushed", len(self._entries))
        self._entries.clear()
        self._by_tag.clear()
        self._generation += 1
        self._flushed_at = self._generation
        self._count("l1_flushes")

    def _apply(self, message: Message) -> None:
        self._generation += 1
        self._recent.append((self._generation, message))
        doomed: Set[str] = set()
        doomed.update(key for key in message.keys if key in self._entries)
        for pattern in message.patterns:
            doomed.update(key for key in self._entries if pattern.fullmatch(key))
        for tag in message.tags:
            doomed.update(self._by_tag.get(tag, ()))
        for pattern in message.tag_patterns:
            for tag, keys in self._by_tag.items():
                if pattern.fullmatch(tag):
                    doomed.update(keys)
        for key in doomed:
            self._drop(key)
        if doomed:
            self._count("l1_evictions_invalidated", len(doomed))
        if message.lsn:
            try:
                self._applied_lsn = max(self._applied_lsn, parse_lsn(message.lsn))
            except ValueError:
                pass
        if self._position is None or message.epoch != self._position[0] or message.seq > self._position[1]:
            self._position = (message.epoch, message.seq)
        self._changed.notify_all()

    def _follows(self, message: Message) -> bool:
        return (
            self._position is not None
            and message.epoch == self._position[0]
            and message.seq <= self._position[1] + 1
        )

    def _reached(self, last: Optional[Position]) -> bool:
        if last is None or self._position is None:
            return True
        return self._position[0] == last[0] and self._position[1] >= last[1]


class Subscriber:
    """Feeds an `L1` from evictd's broadcast on a daemon thread, over a
    sync client (`redis.Redis` or `redis.cluster.RedisCluster`):
    resubscribes with backoff after any failure."""

    def __init__(self, l1: L1, client: Any, *, prefix: str, channel: str) -> None:
        self._l1 = l1
        self._client = client
        self._prefix = prefix
        self._channel = channel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._subscribe, name="evictd-l1", daemon=True)
        self._thread.start()

    def last(self) -> Optional[Position]:
        """evictd's last broadcast, as Redis says now."""
        return parse_last(self._client.get(self._prefix + LAST_KEY))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self, steps: Generator[LogStep, Any, None]) -> None:
        answer: Any = None
        while True:
            try:
                step = steps.send(answer)
            except StopIteration:
                return
            if isinstance(step, ReadLast):
                answer = self._client.get(self._prefix + LAST_KEY)
            else:
                answer = self._client.xrevrange(
                    self._prefix + LOG_KEY, step.end, "-", count=step.count
                )

    def _subscribe(self) -> None:
        pause = 0.05
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self._channel)
                self._run(self._l1.catch_up())
                pause = 0.05
                while not self._stop.is_set():
                    raw = pubsub.get_message(timeout=0.2)
                    if raw is not None and raw.get("type") == "message":
                        self._run(self._l1.receive(raw["data"]))
            except Exception:  # noqa: BLE001 - any failure: disconnected
                self._l1.disconnected()
                self._stop.wait(pause)
                pause = min(pause * 2, 2.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001
                        pass


class AsyncSubscriber(Background):
    """`Subscriber` for asyncio: one task on the running loop, over a
    `redis.asyncio` client. Started by `ensure_started` from inside the
    loop (the first read does it), stopped by `close`."""

    name = "evictd-l1"

    def __init__(self, l1: L1, client: Any, *, prefix: str, channel: str) -> None:
        super().__init__()
        self._l1 = l1
        self._client = client
        self._prefix = prefix
        self._channel = channel

    async def last(self) -> Optional[Position]:
        return parse_last(await self._client.get(self._prefix + LAST_KEY))

    async def close(self) -> None:
        await self.stop()

    async def _run(self, steps: Generator[LogStep, Any, None]) -> None:
        answer: Any = None
        while True:
            try:
                step = steps.send(answer)
            except StopIteration:
                return
            if isinstance(step, ReadLast):
                answer = await self._client.get(self._prefix + LAST_KEY)
            else:
                answer = await self._client.xrevrange(
                    self._prefix + LOG_KEY, step.end, "-", count=step.count
                )

    async def _main(self) -> None:
        pause = 0.05
        while True:
            pubsub = None
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self._channel)
                await self._run(self._l1.catch_up())
                pause = 0.05
                while True:
                    raw = await pubsub.get_message(timeout=0.2)
                    if raw is not None and raw.get("type") == "message":
                        await self._run(self._l1.receive(raw["data"]))
            except asyncio.CancelledError:
                self._l1.disconnected()
                raise
            except Exception:  # noqa: BLE001 - any failure: disconnected
                self._l1.disconnected()
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
            finally:
                if pubsub is not None:
                    try:
                        await pubsub.aclose()
                    except Exception:  # noqa: BLE001
                        pass
