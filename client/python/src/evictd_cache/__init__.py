"""evictd-cache: cache-aside reads with fenced fills that evictd keeps
exact. See this package's README.md and docs/PROTOCOL.md."""

from ._async import AsyncCache
from ._cache import Cache
from ._core import METRICS, JsonSerializer, Serializer, seconds
from ._fill import RedisFailure
from ._position import commit_position, format_lsn, parse_lsn
from ._templates import TemplateError, render

__all__ = [
    "AsyncCache",
    "Cache",
    "JsonSerializer",
    "METRICS",
    "RedisFailure",
    "Serializer",
    "commit_position",
    "format_lsn",
    "parse_lsn",
    "TemplateError",
    "render",
    "seconds",
]
__version__ = "0.1.0"
