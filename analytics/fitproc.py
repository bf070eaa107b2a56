"""The pool of model-fit processes, and what each runs first. Light on purpose: see :func:`fit_process_pool`."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor


def fit_process_pool(workers: int, niceness: int) -> ProcessPoolExecutor:
    """Fit processes at ``niceness`` above this process's priority, that leave when this process dies.

    Spawned, not forked: the crew has threads and an event loop that a fork would copy mid-flight. A spawned
    process imports what its first fit needs (numpy, scikit-learn, numba: seconds of CPU on a cold cache) after
    :func:`init_fit_worker` has lowered its priority: neither this module nor the crew's entry point (which a
    spawned process imports first) pulls them in. A crew that starts its pool under load must not run those imports
    at the priority of the crews that score readings.
    """
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_fit_worker,
        initargs=(niceness, os.getpid()),
    )


def init_fit_worker(niceness: int, parent: int) -> None:
    """Lower this process's priority by ``niceness`` and leave when ``parent`` dies."""
    if niceness > 0:
        with contextlib.suppress(OSError):
            os.nice(niceness)
    # A worker blocks on its task queue, whose write end it holds too: it would outlive a crew killed with
    # SIGKILL. It leaves as soon as it is orphaned (``parent`` is the crew's pid, passed in: the crew may have died
    # before this process got here).
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name="orphan-watch", daemon=True).start()


def _exit_when_orphaned(parent: int, every_s: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(0)
