"""The randomized oracle: a writer and fenced readers with L1 in several
processes, then evictd catches up: no entry in Redis and none in any
reader's L1 differs from the database."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from test_cache import upsert_user

FIRST, COUNT, READERS, SECONDS = 100, 20, 3, 3.0


def test_writers_and_fenced_readers_with_l1_leave_nothing_stale(evictd, redis_client, db, prefix):
    for user_id in range(FIRST, FIRST + COUNT):
        upsert_user(db, user_id, "v0")
    evictd.sync()
    reader = Path(__file__).with_name("oracle_reader.py")
    readers = [
        subprocess.Popen(
            [sys.executable, str(reader), os.environ["EVICTD_TEST_REDIS_URL"], prefix,
             evictd.database_url, str(FIRST), str(COUNT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for _ in range(READERS)
    ]
    for process in readers:
        assert process.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + SECONDS
    writes = 0
    while time.monotonic() < deadline:
        upsert_user(db, random.randrange(FIRST, FIRST + COUNT), f"v{writes + 1}")
        writes += 1
        time.sleep(0.002)
    # A last update of every row as the writer stops.
    for user_id in range(FIRST, FIRST + COUNT):
        upsert_user(db, user_id, f"last{user_id}")
    evictd.sync()
    results = []
    for process in readers:
        out, _ = process.communicate("stop\n", timeout=60)
        assert process.returncode == 0, out
        results.append(json.loads(out.strip().splitlines()[-1]))
    truth = {
        f"user:{user_id}": name
        for user_id, name in db.execute(
            "select id, name from users where id between %s and %s", (FIRST, FIRST + COUNT - 1)
        ).fetchall()
    }
    stale = []
    for key, name in truth.items():
        raw = redis_client.get(prefix + key)
        if raw is not None and not raw.startswith(b"\0evictd:lease:") and json.loads(raw) != name:
            stale.append(("redis", key, raw, name))
    for index, result in enumerate(results):
        for key, value in result["l1"].items():
            if value != truth[key]:
                stale.append((f"L1 of reader {index}", key, value, truth[key]))
    assert stale == [], stale
    # The round exercised what it checks: writes, fills, fences or not, L1 hits.
    assert writes > 100, writes
    assert sum(r["metrics"]["fills"] for r in results) > COUNT
    assert sum(r["metrics"]["l1_hits"] for r in results) > 100
