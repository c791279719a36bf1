"""A service's reads of the demo shop (`migrations/0001_shop.sql`), cached
in Redis with evictd-cache and kept exact by evictd running with the
repository's mappings (`mappings/users.toml`, `mappings/orders.toml`):
each function's key is a key those mappings invalidate.

    DATABASE_URL=postgres://app@127.0.0.1/shop REDIS_URL=redis://127.0.0.1:6379 \\
        python examples/shop.py 1
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

import psycopg
import redis

from evictd_cache import Cache

db = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)
cache = Cache(
    redis.Redis.from_url(os.environ["REDIS_URL"]),
    prefix=os.environ.get("EVICTD_PREFIX", ""),  # evictd's redis.prefix
    ttl="1h",  # a bound, not the freshness: evictd invalidates on change
    jitter=0.1,
    negative_ttl="1m",  # "no such user" too, until the user is inserted
)


@cache.cached(key="user:{user_id}", tags=["user:{user_id}"])
def user(user_id: int) -> Optional[Dict[str, Any]]:
    row = db.execute("select id, name from users where id = %s", (user_id,)).fetchone()
    return None if row is None else {"id": row[0], "name": row[1]}


@cache.cached(key="user:{user_id}:orders", tags=["user:{user_id}"])
def orders(user_id: int) -> List[Dict[str, Any]]:
    rows = db.execute(
        "select id, status from orders where user_id = %s order by id", (user_id,)
    ).fetchall()
    return [{"id": order_id, "status": status} for order_id, status in rows]


@cache.cached(key="order:{order_id}", tags=[])
def order(order_id: int) -> Optional[Dict[str, Any]]:
    row = db.execute(
        "select id, user_id, status from orders where id = %s", (order_id,)
    ).fetchone()
    return None if row is None else {"id": row[0], "user_id": row[1], "status": row[2]}


if __name__ == "__main__":
    user_id = int(sys.argv[1])
    print("user", user(user_id))
    print("orders", orders(user_id))
    print("counters", cache.metrics())
