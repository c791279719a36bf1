"""A cache-aside reader with fenced fills, written from docs/PROTOCOL.md
alone: the keys, the fill right (a lease kept in the key itself), tag
registration and the fill script. Standard library only (it speaks RESP itself), standalone Redis.

Used as a library:

    cache = Cache("127.0.0.1", 6379, prefix="app:")
    value, outcome = cache.get_or_load("order:7", ["user:1"], load_order)

`load_order()` returns the row's value as a string, or None for "no row".
`outcome` is None on a hit, else "stored", "fenced" or "skipped".
Tags taken from the row being loaded go in `row_tags`, a function of the
loaded value returning them: they are registered after the read, and the
fill is refused when evictd invalidated one of them meanwhile
(docs/PROTOCOL.md, "Tags taken from the row").

Run as a program it is the test driver of tests/integration/client.rs:

    python3 protocol_reader.py PORT PREFIX KEY TAGS LUA_DIR [ROW_TAGS] -- LOADER...

(ROW_TAGS: tags handled as taken from the row, comma-separated.)

It reads KEY through the cache; LOADER (a command printing the row) is the
database read. After the read it prints `read <value>` and waits for a line
on stdin before its fill, then prints `fill <outcome>`.
"""

import os
import secrets
import socket
import subprocess
import sys
import time

LEASE = "\0evictd:lease:"
STAMPED = "\0evictd:at:"
TAG_NAMESPACE = "tag:"
TAG_STAMP_KEY = "evictd:tags:stamp"
TAG_AT = "evictd:tag-at:"
TAG_PATTERN_AT = "evictd:tags:pattern-at"
TAG_AT_MS = 60_000


class RedisError(Exception):
    pass


class Redis:
    """A minimal RESP2 connection: one command, one reply."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port))
        self.reader = self.sock.makefile("rb")

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            if isinstance(arg, int):
                arg = str(arg)
            if isinstance(arg, str):
                arg = arg.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def _reply(self):
        line = self.reader.readline()
        if not line:
            raise RedisError("connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self.reader.read(size + 2)[:-2]
            return data.decode()
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [self._reply() for _ in range(count)]
        raise RedisError("unexpected reply %r" % line)


def unstamp(value):
    """The value without the apply stamp a fill may have recorded in it."""
    if value.startswith(STAMPED):
        stamp, sep, rest = value[len(STAMPED):].partition("\0")
        if sep and stamp.isdigit():
            return rest
    return value


def parse(raw):
    """What a key holds: ("value", v), ("loading", None) for a bare lease,
    or ("reloading", v) for a value wrapped in a lease."""
    if not raw.startswith(LEASE):
        return "value", unstamp(raw)
    _token, sep, value = raw[len(LEASE):].partition("\0")
    if sep:
        return "reloading", unstamp(value)
    return "loading", None


class Cache:
    def __init__(self, host, port, prefix="", ttl_ms=0, lease_ms=10_000,
                 wait_ms=200, lua_dir=None):
        self.redis = Redis(host, port)
        self.prefix = prefix
        self.ttl_ms = ttl_ms
        self.lease_ms = lease_ms
        self.wait_ms = wait_ms
        lua_dir = lua_dir or os.path.join(os.path.dirname(__file__), "..", "lua")
        with open(os.path.join(lua_dir, "fill.lua")) as f:
            self.fill_script = f.read()
        with open(os.path.join(lua_dir, "release.lua")) as f:
            self.release_script = f.read()

    def _script(self, script, keys, args):
        sha = self.redis.call("SCRIPT", "LOAD", script)
        try:
            return self.redis.call("EVALSHA", sha, len(keys), *keys, *args)
        except RedisError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
            return self.redis.call("EVAL", script, len(keys), *keys, *args)

    def get_or_load(self, key, tags, loader, before_fill=None, row_tags=None):
        full = self.prefix + key
        # 1. GET: a value (bare, or wrapped in another reader's lease) is a
        # hit.
        try:
            raw = self.redis.call("GET", full)
        except (RedisError, OSError):
            return loader(), "skipped"  # degraded: read, cache nothing
        if raw is not None:
            kind, value = parse(raw)
            if kind != "loading":
                return value, None
        # 2. Take the fill right: a bare lease in the key, only if empty.
        lease = LEASE + secrets.token_hex(8)
        if self.redis.call("SET", full, lease, "NX", "PX", self.lease_ms) is None:
            # Another reader fills: poll briefly, else read without storing.
            deadline = time.monotonic() + self.wait_ms / 1000
            pause = 0.002
            while time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 0.025)
                raw = self.redis.call("GET", full)
                if raw is not None:
                    kind, value = parse(raw)
                    if kind != "loading":
                        return value, "skipped"
            return loader(), "skipped"
        # 3. Register the tags before reading the database.
        for tag in tags:
            self.redis.call("SADD", self.prefix + TAG_NAMESPACE + tag, full)
        # With tags from the row: the tag stamp, read before the database.
        if row_tags is not None:
            stamp = int(self.redis.call("GET", self.prefix + TAG_STAMP_KEY) or 0)
            stamp_read = time.monotonic()
        # 4. Read the database.
        value = loader()
        if before_fill is not None:
            before_fill(value)
        if value is None:
            self._script(self.release_script, [full], [lease])
            return None, "skipped"
        if row_tags is not None:
            late = row_tags(value)
            # Registered first: an invalidation the stamps below miss comes
            # later and finds the key in the set.
            for tag in late:
                self.redis.call("SADD", self.prefix + TAG_NAMESPACE + tag, full)
            keys = [self.prefix + TAG_AT + tag for tag in late]
            keys.append(self.prefix + TAG_PATTERN_AT)
            stamps = self.redis.call("MGET", *keys)
            in_time = time.monotonic() - stamp_read < TAG_AT_MS / 1000
            if not in_time or any(int(at) > stamp for at in stamps if at is not None):
                self._script(self.release_script, [full], [lease])
                return value, "fenced"
        # 5. Store, fenced.
        stored = self._script(self.fill_script, [full], [lease, value, self.ttl_ms])
        return value, "stored" if stored == 1 else "fenced"


def main(argv):
    split = argv.index("--")
    port, prefix, key, tags, lua_dir, *rest = argv[1:split]
    loader_command = argv[split + 1:]
    tags = [tag for tag in tags.split(",") if tag]
    row_tags = None
    if rest:
        from_row = [tag for tag in rest[0].split(",") if tag]
        row_tags = lambda _value: from_row  # noqa: E731
    cache = Cache("127.0.0.1", int(port), prefix=prefix, lua_dir=lua_dir)

    def loader():
        out = subprocess.run(loader_command, check=True, capture_output=True, text=True)
        row = out.stdout.strip()
        return row or None

    def hold(value):
        print("read", value, flush=True)
        sys.stdin.readline()

    value, outcome = cache.get_or_load(key, tags, loader, before_fill=hold, row_tags=row_tags)
    print("fill", outcome or "hit", flush=True)


if __name__ == "__main__":
    main(sys.argv)
