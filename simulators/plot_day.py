"""Plot one simulated day of one site, one panel per metric, with the injected anomalies marked.

    .venv/bin/python -m simulators.plot_day            # writes docs/fleet-day.png

Lines are the site's stations (treated water, network, intake); coloured markers are labelled readings by anomaly
class; out-of-range values (off any sensible scale) are drawn as triangles on the panel's edge; dashed lines mark
rain events. Everything comes from :class:`simulators.fleet.Fleet` with a fixed seed, so the picture is reproducible.
"""

from __future__ import annotations

import argparse
import logging
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display needed, and no GUI backend import

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from simulators.fleet import ANOMALY_CLASSES, METRICS, PHYSICAL_LIMITS, AnomalyClass, Fleet

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "fleet-day.png"

_UNITS = {
    "ph": "pH",
    "turbidity_ntu": "turbidity (NTU)",
    "chlorine_mg_l": "free chlorine (mg/L)",
    "flow_m3_h": "flow (m³/h)",
    "pressure_bar": "pressure (bar)",
    "temperature_c": "temperature (°C)",
    "conductivity_us_cm": "conductivity (µS/cm)",
}
_CLASS_STYLE = {
    "spike": ("tab:red", "x", 40),
    "drift": ("tab:orange", ".", 14),
    "stuck": ("tab:purple", ".", 14),
    "out_of_range": ("black", "^", 40),
    "level_shift": ("tab:green", ".", 14),
}
PLOT_MIX: dict[AnomalyClass, float] = {
    "spike": 12.0,
    "out_of_range": 8.0,
    "stuck": 100.0,
    "level_shift": 100.0,
    "drift": 300.0,
}
_STAGE_COLOUR = {"treated": "tab:blue", "network": "tab:cyan", "intake": "tab:brown"}


def plot_day(
    out: Path = DEFAULT_OUT, seed: int = 0, interval_s: float = 60.0, anomaly_rate: float = 0.1, dpi: int = 64
) -> Path:
    """Simulate a day of ``plant-1`` (three stations) and write the figure to ``out``.

    The anomaly mix is weighted towards long episodes so that one day of three stations shows every class.
    """
    fleet = Fleet(
        sites=1,
        sensors_per_site=3,
        interval_s=interval_s,
        anomaly_rate=anomaly_rate,
        seed=seed,
        anomaly_mix=PLOT_MIX,
    )
    day = fleet.simulate_arrays(86_400)
    originals = ~day.repeat
    hours = (day.ts_ms - fleet.start_ms) / 3_600_000
    fig, axes = plt.subplots(len(METRICS), 1, figsize=(11, 14), sharex=True)
    rain = fleet.rain_events("plant-1", fleet.start_ms, fleet.start_ms + 86_400_000)
    for m, (ax, metric) in enumerate(zip(axes, METRICS, strict=True)):
        col = day.column(metric)
        impossible = (day.label == ANOMALY_CLASSES.index("out_of_range")) & (day.anomaly_metric == m)
        normal = ~impossible
        lo, hi = col[normal].min(), col[normal].max()
        pad = 0.06 * (hi - lo) or 1.0
        log_scale = metric == "turbidity_ntu"
        for s in fleet.sensors:
            rows = (day.sensor == s.index) & originals
            order = np.argsort(day.seq[rows])
            x, y = hours[rows][order], col[rows][order]
            y = np.where(impossible[rows][order], np.nan, y)
            ax.plot(x, y, lw=0.8, color=_STAGE_COLOUR[s.stage], label=s.stage)
        if log_scale:
            ax.set_yscale("log")
            ymin, ymax = max(col[normal & (col > 0)].min() * 0.7, 0.01), hi * 1.5
        else:
            ymin, ymax = lo - pad, hi + pad
        ax.set_ylim(ymin, ymax)
        for code, cls in enumerate(ANOMALY_CLASSES):
            rows = (day.label == code) & (day.anomaly_metric == m) & originals
            if not rows.any():
                continue
            colour, marker, size = _CLASS_STYLE[cls]
            y = col[rows]
            if cls == "out_of_range":
                # Impossible values would crush the scale: pin them to the edge they fell past.
                lo_lim, hi_lim = PHYSICAL_LIMITS[metric]
                out_rows = (y < lo_lim) | (y > hi_lim)
                x = hours[rows][out_rows]
                up = y[out_rows] > hi_lim
                if x.size:
                    ax.scatter(
                        x[up], np.full(up.sum(), ymax), marker="^", color=colour, s=size, clip_on=False
                    )
                    ax.scatter(
                        x[~up], np.full((~up).sum(), ymin), marker="v", color=colour, s=size, clip_on=False
                    )
                continue
            ax.scatter(
                hours[rows], y, marker=marker, color=colour, s=size, zorder=3, label=cls.replace("_", " ")
            )
        for t, _amp in rain:
            ax.axvline((t - fleet.start_ms) / 3_600_000, color="grey", ls="--", lw=0.8)
        ax.set_ylabel(_UNITS[metric])
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(f"hour of {datetime.fromtimestamp(fleet.start_ms / 1000, UTC):%Y-%m-%d} (UTC)")
    axes[-1].set_xlim(0, 24)
    axes[-1].set_xticks(range(0, 25, 3))
    handles = [Line2D([], [], color=c, lw=1.5, label=stage) for stage, c in _STAGE_COLOUR.items()]
    handles += [
        Line2D([], [], color=c, marker=m, ls="", label=cls.replace("_", " "))
        for cls, (c, m, _) in _CLASS_STYLE.items()
    ]
    handles.append(Line2D([], [], color="grey", ls="--", label="rain"))
    fig.suptitle(
        f"plant-1, one simulated day (seed {seed}, one reading per {interval_s:.0f}s per station, "
        f"anomaly rate {anomaly_rate:g})",
        y=0.995,
    )
    fig.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.98), ncol=9, frameon=False, fontsize=9
    )
    fig.tight_layout(rect=(0, 0, 1, 0.955))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between readings of a station")
    parser.add_argument("--anomaly-rate", type=float, default=0.1)
    parser.add_argument("--dpi", type=int, default=64)
    args = parser.parse_args(argv)
    path = plot_day(args.out, args.seed, args.interval, args.anomaly_rate, args.dpi)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
