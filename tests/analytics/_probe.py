"""Run inside a fit process by tests: what it has imported and its priority, without importing anything itself."""

from __future__ import annotations

import os
import sys

HEAVY = ("numpy", "scipy", "sklearn", "numba", "analytics.detector", "analytics.crew")


def heavy_modules_and_priority() -> tuple[list[str], int]:
    return [m for m in HEAVY if m in sys.modules], os.getpriority(os.PRIO_PROCESS, 0)
