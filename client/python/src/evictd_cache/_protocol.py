"""What evictd and a cache share in Redis (docs/PROTOCOL.md): the lease
kept in the key itself, recorded values, the absent marker and the
scripts."""

from __future__ import annotations

import secrets
from importlib import resources
from typing import Optional, Tuple

#: A key holding a fill right starts with these 14 bytes.
LEASE = b"\0evictd:lease:"
#: A recorded value starts with these 11 bytes, then the apply stamp.
STAMPED = b"\0evictd:at:"
#: "No such row", cached when negative caching is on (as the Rust crate).
ABSENT = b"\0evictd:absent"
#: Tag sets live under the prefix at `tag:` + the tag.
TAG_NAMESPACE = "tag:"


def new_lease() -> bytes:
    """`\\0evictd:lease:` and a random token of 16 hex digits."""
    return LEASE + secrets.token_hex(8).encode()


def unstamp(value: bytes) -> bytes:
    """The value without the apply stamp a fill may have recorded in it."""
    if value.startswith(STAMPED):
        stamp, sep, rest = value[len(STAMPED):].partition(b"\0")
        if sep and stamp.isdigit():
            return rest
    return value


def parse(raw: bytes) -> Tuple[str, Optional[bytes]]:
    """What a key holds: `("value", v)`, `("loading", None)` for a bare
    lease, or `("reloading", v)` for a value wrapped in another reader's
    lease (a hit on `v`)."""
    if not raw.startswith(LEASE):
        return "value", unstamp(raw)
    _token, sep, value = raw[len(LEASE):].partition(b"\0")
    if sep:
        return "reloading", unstamp(value)
    return "loading", None


def script(name: str) -> str:
    """The text of one of the protocol's Lua scripts (`fill`, `release`),
    the same files evictd and the Rust crate load (`client/lua/`)."""
    return resources.files(__package__).joinpath("lua", name + ".lua").read_text()
