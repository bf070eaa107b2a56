"""How fast the host runs a fixed piece of work, sampled through a load run, in a process of its own.

``python -m simulators.hostspeed OUT_FILE`` appends ``epoch_s<TAB>cpu_ms`` every ``--every`` seconds until SIGTERM:
the CPU time (``time.process_time``) one fixed pure-Python loop took. On a virtual machine whose hypervisor does
not report steal time, a vCPU taken away while the loop runs is charged to the loop, so the figure rises when the
host is busy with other guests or runs at a lower clock, and not when this machine's own processes compete for the
cores (that is waiting, not CPU time). On the hosts of this project it varied by up to 1.8x within a minute on an
idle machine: a load run's latencies are read together with it (:func:`summarize`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from simulators._signals import stop_on_signals

#: Iterations of the fixed loop: ~3 ms of CPU on this project's hosts (0.6 % of a core at the default interval).
UNIT = 50_000


def unit_of_work(n: int = UNIT) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def sample() -> float:
    """CPU milliseconds one unit of work takes now."""
    started = time.process_time()
    unit_of_work()
    return (time.process_time() - started) * 1000


def read(path: Path) -> list[tuple[float, float]]:
    """``(epoch_s, cpu_ms)`` samples from a file the meter wrote (a torn last line is skipped)."""
    out: list[tuple[float, float]] = []
    if path.exists():
        for line in path.read_text().splitlines():
            at, _, ms = line.partition("\t")
            try:
                out.append((float(at), float(ms)))
            except ValueError:
                continue
    return out


def summarize(
    samples: Iterable[tuple[float, float]], since_s: float, until_s: float
) -> dict[str, Any] | None:
    """The unit's CPU ms in ``[since_s, until_s]`` (median, slowest) against the fastest of the whole file, and the
    median's slowdown over that fastest (1.0: the host ran as fast as it ever did in this run)."""
    every = list(samples)
    window = [ms for at, ms in every if since_s <= at <= until_s]
    if not window:
        return None
    best = min(ms for _at, ms in every)
    median = statistics.median(window)
    return {
        "unit_ms_p50": round(median, 2),
        "unit_ms_max": round(max(window), 2),
        "best_ms": round(best, 2),
        "slowdown": round(median / best, 2),
        "n": len(window),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulators.hostspeed", description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    args = parser.parse_args(argv)
    stop = stop_on_signals()
    with open(args.out, "a") as fh:
        print("READY", flush=True)
        while not stop.is_set():
            fh.write(f"{time.time():.3f}\t{sample():.3f}\n")
            fh.flush()
            stop.wait(args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
