"""The README's fleet plot is made by a script in the repo; keep the script working."""

from __future__ import annotations

from pathlib import Path

from simulators.plot_day import DEFAULT_OUT, main


def test_plot_day_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "day.png"
    assert main(["--out", str(out), "--dpi", "30"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_plot_is_small() -> None:
    assert DEFAULT_OUT.exists()
    assert DEFAULT_OUT.stat().st_size < 300 * 1024
