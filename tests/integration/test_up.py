"""`waterdoctor up`: the whole pipeline on embedded defaults, alerts within a minute, nothing left after Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("broker", "broker_process"),
    [("auto", "mosquitto"), ("builtin", "waterdoctor.broker")],
    ids=["default-broker", "builtin-broker"],
)
def test_up_runs_everything_shows_alerts_and_ctrl_c_leaves_no_process(
    tmp_path: Path, broker: str, broker_process: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WD_", "TWILIO_"))}  # embedded defaults
    env["WD_EMBEDDED_BROKER"] = broker
    data = tmp_path / "wd"
    proc = subprocess.Popen(
        [sys.executable, "-m", "waterdoctor.cli", "up", "--data-dir", str(data), "--no-view"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    me = psutil.Process(proc.pid)
    sms_log = data / "logs" / "alerting.log"
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            children = me.children(recursive=True) or children
            if sms_log.exists() and "[dry-run SMS]" in sms_log.read_text(errors="replace"):
                break
            assert proc.poll() is None, "up exited early"
            time.sleep(0.5)
        else:
            raise AssertionError("no SMS within a minute of `waterdoctor up`")
        children = me.children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        for part in (
            "valkey-server",
            broker_process,
            "ingest",
            "analytics",
            "alerting",
            "retention",
            "simulate",
        ):
            assert part in names, f"{part} is not running under up"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    assert b"stopped cleanly" in out
    time.sleep(0.5)
    left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left after Ctrl-C: {[c.cmdline() for c in left]}"
    if broker == "builtin":
        log = (data / "builtin" / "wd-broker.log").read_text()
        assert "Traceback" not in log, log[-3000:]
    # The embedded Valkey kept its data and AOF under the data folder.
    assert any((data / "valkey").rglob("*.aof*")) or any((data / "valkey").rglob("appendonly*"))


def test_up_live_view_in_a_terminal_shows_stages_and_sms(tmp_path: Path) -> None:
    """What `make demo` shows: the rich live view in a real (pseudo) terminal, with the pipeline table and SMS."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    env = {k: v for k, v in os.environ.items() if not k.startswith(("WD_", "TWILIO_"))}
    env.update(TERM="xterm-256color", COLUMNS="160", LINES="60")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "waterdoctor.cli", "up", "--data-dir", str(tmp_path / "wd")],
        cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    screen = b""
    try:
        deadline = time.monotonic() + 60
        seen_sms = False
        while time.monotonic() < deadline and not seen_sms:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    break
            # The SMS panel starts as "(none yet)" and fills with the alerting crew's dry-run SMS lines.
            tail = screen[-20000:]
            seen_sms = b"WaterDoctor pipeline" in tail and b"[dry-run SMS]" in tail
            assert proc.poll() is None, screen.decode(errors="replace")[-3000:]
        assert seen_sms, (
            "no live view with an SMS within a minute: " + screen.decode(errors="replace")[-3000:]
        )
        text = screen.decode(errors="replace")
        for part in ("wd:readings:v1", "wd:anomalies:v1", "latest anomalies", "Ctrl-C to stop"):
            assert part in text, part
    finally:
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    break
        proc.wait(timeout=5)
        os.close(master)
    assert proc.returncode == 0, screen.decode(errors="replace")[-3000:]
