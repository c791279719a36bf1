"""One reader process of the randomized oracle (test_oracle.py): fenced
reads with L1 of random users until told to stop on stdin, then, once L1
has applied evictd's last broadcast, what it holds as JSON on stdout."""

from __future__ import annotations

import json
import random
import sys
import threading
import time

import psycopg
import redis

from evictd_cache import Cache


def main() -> None:
    redis_url, prefix, database_url, first, count = sys.argv[1:6]
    ids = range(int(first), int(first) + int(count))
    db = psycopg.connect(database_url, autocommit=True)
    cache = Cache(redis.Redis.from_url(redis_url), prefix=prefix, l1_entries=1000, l1_channel=prefix + "l1")
    assert cache.l1_wait_live("10s")
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()

    def load(user_id: int):
        row = db.execute("select name from users where id = %s", (user_id,)).fetchone()
        # A slow loader: the row read, then time before the fill stores,
        # which a commit and its invalidation can fall into.
        time.sleep(random.uniform(0, 0.01))
        return None if row is None else row[0]

    print("ready", flush=True)
    while not stop.is_set():
        user_id = random.choice(ids)
        cache.get_or_load(f"user:{user_id}", lambda: load(user_id), tags=[f"user:{user_id}"])
    assert cache.l1_caught_up("10s"), "L1 did not catch up with the last broadcast"
    print(json.dumps({"l1": cache.l1_items(), "metrics": cache.metrics()}), flush=True)
    cache.close()


if __name__ == "__main__":
    main()
