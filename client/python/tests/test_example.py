"""The README's example service (`examples/shop.py`) against a real evictd
running with the repository's mappings: what it caches is invalidated by
each change of the rows it read."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from test_cache import upsert_user


def load_example(database_url: str, prefix: str):
    os.environ["DATABASE_URL"] = database_url
    os.environ["EVICTD_PREFIX"] = prefix
    os.environ["REDIS_URL"] = os.environ["EVICTD_TEST_REDIS_URL"]
    path = Path(__file__).resolve().parents[1] / "examples" / "shop.py"
    spec = importlib.util.spec_from_file_location("shop_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_service_stays_exact(evictd, db, prefix, redis_client):
    shop = load_example(evictd.database_url, prefix)
    db.execute("delete from orders where user_id = 31")
    db.execute("delete from users where id = 31")
    upsert_user(db, 30, "margaret")
    db.execute(
        "insert into orders (id, user_id, status) values (300, 30, 'new')"
        " on conflict (id) do update set status = 'new', user_id = 30"
    )
    evictd.sync()
    assert shop.user(30) == {"id": 30, "name": "margaret"}
    assert shop.orders(30) == [{"id": 300, "status": "new"}]
    assert shop.order(300) == {"id": 300, "user_id": 30, "status": "new"}
    assert shop.cache.metrics()["fills"] == 3
    # Each write lands in the cache through evictd and the shop's mappings.
    db.execute("update orders set status = 'paid' where id = 300")
    upsert_user(db, 30, "margaret hamilton")
    evictd.sync()
    assert shop.orders(30) == [{"id": 300, "status": "paid"}]
    assert shop.order(300) == {"id": 300, "user_id": 30, "status": "paid"}
    assert shop.user(30) == {"id": 30, "name": "margaret hamilton"}
    assert shop.user(31) is None  # cached as absent for a minute
    upsert_user(db, 31, "annie")
    evictd.sync()
    assert shop.user(31) == {"id": 31, "name": "annie"}
    shop.db.close()
