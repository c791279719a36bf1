"""WAL positions, for reading your own writes (docs/PROTOCOL.md, "Reading
your own writes")."""

from __future__ import annotations

from typing import Any, Union

#: WAL page headers: 24 bytes, 40 on the first page of a segment.
_SHORT_HEADER = 24
_LONG_HEADER = 40


def parse_lsn(text: Union[str, bytes]) -> int:
    """`16/B374D848` as a number; a `ValueError` names what is wrong."""
    if isinstance(text, bytes):
        text = text.decode()
    high, sep, low = text.strip().partition("/")
    if not sep:
        raise ValueError(f"{text!r} is not a WAL position (`high/low` in hexadecimal)")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def before_page_header(lsn: int, block: int, segment: int) -> int:
    """`lsn` moved back over a WAL page header it sits just past: when the
    last record ends exactly at a page boundary, the insert position is
    after the next page's header, but the commit's end (what evictd reports
    applied) is the boundary itself, and no further WAL may come to carry
    evictd past the header."""
    if segment > 0 and lsn % segment == _LONG_HEADER:
        return lsn - _LONG_HEADER
    if block > 0 and lsn % block == _SHORT_HEADER and (segment == 0 or lsn % segment != _SHORT_HEADER):
        return lsn - _SHORT_HEADER
    return lsn


def commit_position(connection: Any) -> int:
    """The WAL position after everything `connection` (a DB-API connection
    to the primary: psycopg, psycopg2) committed so far; `wait_applied` it
    to read your own writes through the cache."""
    cursor = connection.cursor()
    try:
        cursor.execute(
            "select pg_current_wal_insert_lsn()::text, current_setting('wal_block_size')::int8,"
            " (select setting::int8 from pg_settings where name = 'wal_segment_size')"
        )
        text, block, segment = cursor.fetchone()
    finally:
        cursor.close()
    return before_page_header(parse_lsn(text), int(block or 0), int(segment or 0))
