"""Start and stop a whole pipeline on one machine: servers where no URL is set, then every crew as a process.

Used by ``waterdoctor up``, ``waterdoctor load --self-contained`` and the integration tests. Crews run as separate
processes (``waterdoctor <crew>``), exactly as they would in production, so a crash of one never takes the others
down and the work spreads over every core.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from waterdoctor.embedded import (
    MqttBroker,
    RedisServer,
    broker_kind,
    embedded_broker,
    free_port,
    mosquitto_binary,
)

logger = logging.getLogger(__name__)

CREWS = ("ingest", "analytics", "alerting", "retention")
DEFAULT_METRICS_PORTS = {"ingest": 9101, "analytics": 9102, "alerting": 9103, "retention": 9104}


@dataclass
class CrewProcess:
    name: str
    argv: list[str]
    metrics_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Pipeline:
    """Servers (embedded when no URL is given) and crew processes, with one ``env`` shared by all of them."""

    data_dir: Path
    redis_url: str | None = None
    mqtt_url: str | None = None
    crews: tuple[str, ...] = CREWS
    extra_env: dict[str, str] = field(default_factory=dict)
    crew_args: dict[str, list[str]] = field(default_factory=dict)
    metrics_ports: dict[str, int] | None = None
    redis_kind: str = "valkey"

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.redis_server: RedisServer | None = None
        self.broker: MqttBroker | None = None
        self.processes: dict[str, CrewProcess] = {}

    # -- servers ---------------------------------------------------------------------------------------------

    def start_servers(self) -> None:
        if self.redis_url is None:
            self.redis_server = RedisServer(
                "valkey" if self.redis_kind == "valkey" else "redis",
                data_dir=self.data_dir / self.redis_kind,
                appendonly=True,
            ).start()
            self.redis_url = self.redis_server.url
            logger.info("embedded %s at %s", self.redis_kind, self.redis_url)
        if self.mqtt_url is None:
            # mosquitto when installed, else the built-in broker; WD_EMBEDDED_BROKER forces one.
            kind = broker_kind()
            self.broker = embedded_broker(self.data_dir / kind, kind=kind).start()
            self.mqtt_url = self.broker.url
            if kind == "mosquitto":
                logger.info("embedded mosquitto at %s", self.mqtt_url)
            else:
                why = "WD_EMBEDDED_BROKER=builtin" if mosquitto_binary() else "mosquitto not installed"
                logger.info("built-in MQTT broker at %s (%s)", self.mqtt_url, why)

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        if self.redis_url:
            env["WD_REDIS_URL"] = self.redis_url
        if self.mqtt_url:
            env["WD_MQTT_URL"] = self.mqtt_url
        return env

    # -- crews -----------------------------------------------------------------------------------------------

    def crew_argv(self, name: str, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "waterdoctor.cli",
            name,
            "--metrics-port",
            str(port),
            *self.crew_args.get(name, []),
        ]

    def start_crew(self, name: str) -> CrewProcess:
        ports = self.metrics_ports if self.metrics_ports is not None else {}
        port = ports.get(name) or free_port()
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        crew = self.processes.get(name) or CrewProcess(
            name, self.crew_argv(name, port), port, logs / f"{name}.log"
        )
        with open(crew.log_path, "ab") as log:
            crew.proc = subprocess.Popen(crew.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = crew
        return crew

    def start(self) -> Self:
        self.start_servers()
        for name in self.crews:
            self.start_crew(name)
        return self

    def check(self) -> list[str]:
        """Names of crews that have exited."""
        return [c.name for c in self.processes.values() if not c.running]

    def stop_crew(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        crew = self.processes.get(name)
        if crew is None or crew.proc is None:
            return None
        if crew.proc.poll() is None:
            crew.proc.send_signal(sig)
            try:
                crew.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0fs; killing it", name, timeout)
                crew.proc.kill()
                crew.proc.wait()
        return crew.proc.returncode

    def stop(self) -> dict[str, int | None]:
        """Stop crews first (they drain into Redis), then the broker and Redis. Returns crew exit codes."""
        for crew in self.processes.values():
            if crew.running and crew.proc is not None:
                crew.proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + 20
        for name, crew in self.processes.items():
            if crew.proc is None:
                continue
            try:
                crew.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                crew.proc.kill()
                crew.proc.wait()
            codes[name] = crew.proc.returncode
        for server in (self.broker, self.redis_server):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        return codes

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
