"""The quoting pipeline under SIGKILL: every scope gets exactly one quote, none is lost, the PEL ends empty."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from examples.quoting import FINANCE_GROUP, SCOPE_STREAM, push_scopes

ROOT = Path(__file__).resolve().parents[2]


def start_finance(url: str, db: Path, consumer: str, claim_idle_ms: int = 60_000) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "examples.quoting", "finance", "--redis", url, "--db", str(db),
            "--consumer", consumer, "--claim-idle-ms", str(claim_idle_ms), "--delay-ms", "1.5",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def quotes(db: Path) -> tuple[int, int, int]:
    if not db.exists():
        return 0, 0, 0
    with sqlite3.connect(db, timeout=30) as c:
        n = c.execute("SELECT count(*) FROM quotes").fetchone()[0]
        distinct = c.execute("SELECT count(DISTINCT scope_id) FROM quotes").fetchone()[0]
        attempts = c.execute("SELECT count(*) FROM attempts").fetchone()[0]
    return n, distinct, attempts


@pytest.mark.slow
def test_thousand_scopes_survive_sigkills_and_a_dead_consumer(redis_only_url: str, tmp_path: Path) -> None:
    rng = random.Random(7)
    db = tmp_path / "quotes.sqlite"
    r = redis.Redis.from_url(redis_only_url)
    r.xgroup_create(SCOPE_STREAM, FINANCE_GROUP, id="0", mkstream=True)
    asyncio.run(push_scopes(redis_only_url, 1000, f"file://{tmp_path}/blobs"))

    # finance-2 takes a share of the work and dies for good, holding pending entries.
    doomed = start_finance(redis_only_url, db, "finance-2")
    deadline = time.monotonic() + 20
    while not r.xpending(SCOPE_STREAM, FINANCE_GROUP)["pending"] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    held_by_dead = r.xpending(SCOPE_STREAM, FINANCE_GROUP)["pending"]
    assert held_by_dead > 0

    # finance-1 is killed at random points several times and restarted under the same name.
    kills = 0
    proc = start_finance(redis_only_url, db, "finance-1", claim_idle_ms=1000)
    while kills < 4:
        time.sleep(rng.uniform(0.3, 0.9))
        if quotes(db)[1] >= 1000:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        proc = start_finance(redis_only_url, db, "finance-1", claim_idle_ms=1000)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if quotes(db)[1] == 1000 and r.xpending(SCOPE_STREAM, FINANCE_GROUP)["pending"] == 0:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0  # a clean stop exits 0

    n, distinct, attempts = quotes(db)
    assert kills >= 3
    assert (n, distinct) == (1000, 1000)  # exactly one quote per scope
    assert attempts > 1000  # redeliveries happened and were absorbed by the unique key
    assert r.xlen("wd:dead:v1") == 0
    assert r.xpending(SCOPE_STREAM, FINANCE_GROUP)["pending"] == 0
    consumers = {c["name"].decode(): c for c in r.xinfo_consumers(SCOPE_STREAM, FINANCE_GROUP)}
    assert consumers["finance-2"]["pending"] == 0  # the dead consumer's entries were claimed
    r.close()
