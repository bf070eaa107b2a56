"""The source story's quoting pipeline, as proof that :mod:`handoff` is general.

A Sales crew validates a project scope, offloads the transcript to object storage (the message carries only its
``context_url``) and pushes the scope to ``quoting:scope:v1``. A Finance crew, in consumer group ``finance``, prices
each scope, writes the quote to SQLite (idempotently, keyed by ``scope_id``) and only then acknowledges. A finance
process killed at any point loses nothing: its entries stay pending and are re-read on restart or claimed by a
surviving consumer, and the unique key makes the retried write a no-op.

Run: ``python -m examples.quoting sales --redis URL --count 100`` and
``python -m examples.quoting finance --redis URL --db quotes.sqlite``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from handoff.connection import connect
from handoff.offload import store_blob
from handoff.producer import StreamProducer
from handoff.runloop import run_until_stopped
from handoff.worker import ConsumerGroupWorker, Entry, Fail, Outcome, WorkerConfig

SCOPE_STREAM = "quoting:scope:v1"
FINANCE_GROUP = "finance"

logger = logging.getLogger(__name__)


class StructuredScope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope_items: int = Field(ge=1, le=10_000)
    est_hours: float = Field(gt=0, le=100_000)


class Scope(BaseModel):
    """The validated scope a Sales crew hands over: strict JSON, never raw LLM text."""

    model_config = ConfigDict(extra="forbid")

    scope_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    crew_id: str
    status: str = Field(pattern="^finalized$")
    context_url: str
    structured_data: StructuredScope


async def push_scopes(redis_url: str, count: int, blob_url: str, start: int = 0) -> list[str]:
    """The Sales crew: validate, offload the transcript, push. Returns the stream IDs."""
    r = await connect(redis_url, name="sales")
    producer = StreamProducer(r, SCOPE_STREAM)
    scopes = []
    for i in range(start, start + count):
        transcript = f"Client call {i}: wants {i % 12 + 1} items, about {(i % 40) + 5} hours.\n".encode() * 50
        scope = Scope(
            scope_id=f"q-{i}",
            crew_id="sales_01",
            status="finalized",
            context_url=store_blob(transcript, blob_url, ".txt"),
            structured_data=StructuredScope(scope_items=i % 12 + 1, est_hours=(i % 40) + 5),
        )
        scopes.append(scope.model_dump(mode="json"))
    ids = await producer.add_many(scopes)
    await r.aclose()
    return ids


def price(scope: Scope) -> float:
    """Finance rules: hours at a rate, plus a per-item overhead, plus margin."""
    base = scope.structured_data.est_hours * 120.0 + scope.structured_data.scope_items * 250.0
    return round(base * 1.18, 2)


class QuoteStore:
    """SQLite quotes, one per scope (the UNIQUE key makes a redelivered scope a no-op); attempts are counted."""

    def __init__(self, path: Path) -> None:
        # One batch at a time, handed to a worker thread: access is serialised, so sharing across threads is safe.
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS quotes (scope_id TEXT PRIMARY KEY, total REAL, entry_id TEXT, at REAL)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS attempts (scope_id TEXT, consumer TEXT)")

    def record_attempts(self, scope_ids: Sequence[str], consumer: str) -> None:
        """Log each delivery taken into work (so redeliveries after a crash can be seen)."""
        self.db.executemany("INSERT INTO attempts VALUES (?, ?)", [(s, consumer) for s in scope_ids])

    def write(self, rows: Sequence[tuple[str, float, str]], consumer: str) -> None:
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany(
            "INSERT OR IGNORE INTO quotes VALUES (?, ?, ?, ?)", [(s, t, e, now) for s, t, e in rows]
        )
        self.db.execute("COMMIT")


class FinanceHandler:
    def __init__(self, store: QuoteStore, consumer: str, delay_s: float = 0.0) -> None:
        self.store = store
        self.consumer = consumer
        self.delay_s = delay_s

    async def __call__(self, entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        out: dict[str, Outcome] = {}
        rows = []
        for e in entries:
            try:
                scope = Scope.model_validate(orjson.loads(e.payload))
            except (ValidationError, orjson.JSONDecodeError) as exc:
                out[e.id] = Fail(f"invalid scope: {exc}", permanent=True)
                continue
            rows.append((scope.scope_id, price(scope), e.id))
        await asyncio.to_thread(self.store.record_attempts, [row[0] for row in rows], self.consumer)
        if self.delay_s:
            await asyncio.sleep(self.delay_s * len(entries))  # stands in for LLM work: gives crashes a window
        # The quote is durable before the acknowledgement: the worker acks only after this returns.
        await asyncio.to_thread(self.store.write, rows, self.consumer)
        return out


async def run_finance(
    redis_url: str, db: Path, consumer: str, stop: asyncio.Event, claim_idle_ms: int, delay_s: float
) -> None:
    r = await connect(redis_url, name=f"finance:{consumer}")
    worker = ConsumerGroupWorker(
        r,
        SCOPE_STREAM,
        FINANCE_GROUP,
        FinanceHandler(QuoteStore(db), consumer, delay_s),
        consumer=consumer,
        config=WorkerConfig(batch_size=20, block_ms=50, claim_idle_ms=claim_idle_ms, claim_interval_s=0.2),
        stop_event=stop,
    )
    try:
        await worker.run()
    finally:
        await r.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="crew", required=True)
    sales = sub.add_parser("sales")
    sales.add_argument("--redis", required=True)
    sales.add_argument("--count", type=int, default=100)
    sales.add_argument("--blobs", default="file://./.wd-data/blobs")
    fin = sub.add_parser("finance")
    fin.add_argument("--redis", required=True)
    fin.add_argument("--db", type=Path, required=True)
    fin.add_argument("--consumer", default="finance-1")
    fin.add_argument("--claim-idle-ms", type=int, default=30_000)
    fin.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.crew == "sales":
        ids = asyncio.run(push_scopes(args.redis, args.count, args.blobs))
        print(f"pushed {len(ids)} scopes")
        return 0

    async def crew(stop: asyncio.Event) -> None:
        await run_finance(args.redis, args.db, args.consumer, stop, args.claim_idle_ms, args.delay_ms / 1000)

    asyncio.run(run_until_stopped(crew))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
