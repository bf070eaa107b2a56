"""SIGKILL an alerting process mid-dispatch, restart: no duplicate sends, nothing unsent except recorded unknowns."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from alerting.ledger import phone_field
from alerting.routing import parse_routing
from alerting.sms import TwilioSender
from simulators.twilio_fake import Faults, TwilioFake
from tests.alerting.conftest import (
    BASIC_ROUTING,
    FROM,
    PHONE_A,
    PHONE_B,
    DispatcherFactory,
    FakeClock,
    anomaly,
)

ROOT = Path(__file__).resolve().parents[2]
N = 150


async def test_sigkill_mid_dispatch_then_restart(redis_url: str, make_dispatcher: DispatcherFactory) -> None:
    # A fifth of the requests hang (and are really sent): they are in flight when the process dies.
    faults = Faults(ptimeout=0.2, hang_s=60.0, timeout_accepts=True, seed=3)
    async with TwilioFake(faults=faults) as fake:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.alerting.crash_child",
            redis_url,
            fake.base_url,
            fake.account_sid,
            fake.auth_token,
            str(N),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert child.stdout is not None
            assert (await asyncio.wait_for(child.stdout.readline(), 30)).strip() == b"STARTED"
            deadline = time.monotonic() + 30
            while len(fake.responses) < N // 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            child.send_signal(signal.SIGKILL)
        finally:
            await child.wait()
        seen_by_child = list(fake.log)
        assert 0 < len(seen_by_child) < 2 * N  # killed mid-way
        fake.faults = Faults()  # the provider is healthy again

        # Restart: the stream hands every alert over again (pending entries plus the rest).
        clock = FakeClock(time.time() + 10)  # past the dead process's claims
        sender = TwilioSender(fake.account_sid, fake.auth_token, FROM, base_url=fake.base_url, read_timeout=2)
        d = make_dispatcher(sender, parse_routing(BASIC_ROUTING), clock=clock)
        sem = asyncio.Semaphore(32)  # a consumer handles a bounded number of entries at a time

        async def one(i: int) -> bool:
            async with sem:
                return await d.dispatch(anomaly(i))

        try:
            assert all(await asyncio.gather(*(one(i) for i in range(N))))
        finally:
            await sender.aclose()

        accepted = fake.accepted_by_key()
        assert max(accepted.values()) == 1, "an SMS went out twice"
        child_keys = {(aid, to) for aid, to, _ in seen_by_child}
        states: dict[str, int] = {}
        for i in range(N):
            aid = f"plant-7:s-0042:{i}"
            recs = await d.ledger.phone_records(aid)
            for phone in (PHONE_A, PHONE_B):
                rec = recs[phone_field("", phone)]
                states[rec["s"]] = states.get(rec["s"], 0) + 1
                assert rec["s"] in ("accepted", "unknown"), (aid, phone, rec)
                if rec["s"] == "accepted":
                    assert accepted[(aid, phone)] == 1
                else:
                    assert rec["why"] in ("stale_claim",), rec
                if accepted[(aid, phone)] == 0:
                    assert rec["s"] == "unknown"  # nothing unsent except recorded unknown outcomes
                if (aid, phone) in child_keys:
                    # Whatever reached Twilio from the dead process was never sent again.
                    assert [k for k in fake.log if k[:2] == (aid, phone)] == [
                        k for k in seen_by_child if k[:2] == (aid, phone)
                    ]
        assert states.get("unknown", 0) > 0 and states.get("accepted", 0) > N
