"""Model fits in child processes: lower CPU priority, survival of a killed fit process, no orphan after SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aredis

from analytics.crew import AnalyticsConfig, run_analytics
from analytics.fitproc import fit_process_pool
from handoff import keys
from tests.analytics._probe import heavy_modules_and_priority
from tests.analytics.test_crew import ROOT, drained, normal_series, push, small_config
from waterdoctor.embedded import free_port


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def fit_workers(pid: int) -> list[int]:
    """Children of ``pid`` that are spawned multiprocessing workers (the fit pool)."""
    found = []
    for c in children(pid):
        try:
            cmdline = Path(f"/proc/{c}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:  # not the resource tracker, also a child
            found.append(c)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_fits_run_in_a_child_process_at_lower_priority(r: aredis.Redis) -> None:
    await push(r, normal_series(300))
    config = small_config()
    stop = asyncio.Event()
    task = asyncio.create_task(run_analytics(r, config, stop, consumer="t1"))
    seen: dict[int, int] = {}
    try:
        async with asyncio.timeout(30):
            while not (await drained(r) and await r.hlen(keys.MODEL_GENERATIONS) == 1):
                await asyncio.sleep(0.02)
            # The model came back: the worker that fitted it has set its priority (it does so before any task).
            for pid in fit_workers(os.getpid()):
                seen[pid] = os.getpriority(os.PRIO_PROCESS, pid)
    finally:
        stop.set()
        handler = await asyncio.wait_for(task, 10)
    assert handler.bank.sensor("plant-1", "s-1").model is not None
    assert seen, "no fit process was started"
    assert set(seen.values()) == {os.getpriority(os.PRIO_PROCESS, 0) + config.refit_nice}


async def test_a_killed_fit_process_is_replaced_and_the_fit_retried(r: aredis.Redis) -> None:
    await push(r, normal_series(300))
    config = small_config()
    stop = asyncio.Event()
    task = asyncio.create_task(run_analytics(r, config, stop, consumer="t1"))
    killed: list[int] = []
    try:
        async with asyncio.timeout(60):
            while not killed:  # kill the first fit process as soon as it exists (before or during its fit)
                for pid in fit_workers(os.getpid()):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                await asyncio.sleep(0.005)
            while not (await drained(r) and await r.hlen(keys.MODEL_GENERATIONS) == 1):
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        handler = await asyncio.wait_for(task, 10)
    assert handler.bank.sensor("plant-1", "s-1").model is not None
    assert set(fit_workers(os.getpid())).isdisjoint(killed)


def start_crew(url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "waterdoctor.cli", "--log-level", "WARNING", "analytics", "--consumer", "a-0",
         "--metrics-port", str(free_port()), "--warmup", "100", "--fits-per-s", "1000"],
        cwd=ROOT, env={**os.environ, "WD_REDIS_URL": url}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.slow
async def test_a_crew_killed_with_sigkill_leaves_no_fit_process(redis_only_url: str) -> None:
    r = aredis.Redis.from_url(redis_only_url)
    # Many sensors: fits follow one another for a while, so a fit process is alive when the crew is killed.
    for s in range(40):
        await push(r, normal_series(150, seed=s, sensor=f"s-{s}"))
    proc = start_crew(redis_only_url)
    try:
        workers: list[int] = []
        deadline = time.monotonic() + 60
        while not workers and time.monotonic() < deadline:
            workers = fit_workers(proc.pid)
            await asyncio.sleep(0.05)
        assert workers, "the crew started no fit process"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not any(alive(w) for w in workers), "a fit process outlived its crew"
    await r.aclose()


def test_cli_refuses_invalid_refit_and_chunk_options(redis_only_url: str) -> None:
    for bad in (
        ["--refit-workers", "0"],
        ["--refit-nice", "25"],
        ["--chunk-kb", "-1"],
        ["--chunk-max-kb", "-1"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "waterdoctor.cli", "analytics", "--metrics-port", "0", *bad],
            cwd=ROOT, env={**os.environ, "WD_REDIS_URL": redis_only_url}, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert bad[0] in done.stderr


def test_refit_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="refit_workers"):
        from analytics.crew import AnalyticsHandler

        AnalyticsHandler(aredis.Redis(), AnalyticsConfig(refit_workers=0))


def test_a_fit_process_lowers_its_priority_before_it_imports_the_fitting_libraries() -> None:
    # Those imports cost seconds of CPU on a cold cache: a crew restarted under load must not run them at the
    # priority of the crews that are scoring readings.
    with fit_process_pool(1, 5) as pool:
        heavy, priority = pool.submit(heavy_modules_and_priority).result(timeout=60)
    assert heavy == []
    assert priority == os.getpriority(os.PRIO_PROCESS, 0) + 5
