"""A local fake of Twilio's Messages API over real HTTP, with programmable faults.

Only the edge we do not own is faked: the real ``twilio`` package talks to this server exactly as it would talk to
``https://api.twilio.com`` (``POST /2010-04-01/Accounts/{sid}/Messages.json``, form-encoded, HTTP Basic auth).

Use it three ways:

- in-process from a test: ``async with TwilioFake(...) as fake: fake.base_url``;
- from a benchmark in a thread of its own: ``with TwilioFake(...).in_thread() as fake: ...``;
- as a subprocess: ``python -m simulators.twilio_fake --port 0 --record accepted.jsonl`` prints
  ``READY http://127.0.0.1:PORT`` on stdout once it listens; each accepted message is appended to the record file.
  :class:`TwilioFakeProcess` does that for you (load runs use it, so that acceptance times are taken in a process
  that does nothing else, not one whose GIL a publisher holds).

Faults (``Faults``): 429 with ``Retry-After``, 500, 503, a hang past the client's timeout that may still accept the
message (an "unknown outcome" where the SMS really went out), and a connection reset after accepting. They are drawn
per request from a seeded ``random.Random``; ``script([...])`` forces the next responses in order.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import re
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

FaultKind = Literal["ok", "429", "500", "503", "timeout", "reset"]

E164 = re.compile(r"^\+[1-9]\d{7,14}$")
#: How the fake finds the alert id in a body: WaterDoctor bodies carry ``id <alert_id>``.
ALERT_ID_IN_BODY = re.compile(r"(?:^|\s)id (\S+)")


@dataclass
class Faults:
    """Per-request fault probabilities (each in [0, 1], summing to at most 1) and their parameters."""

    p429: float = 0.0
    p500: float = 0.0
    p503: float = 0.0
    ptimeout: float = 0.0
    preset: float = 0.0
    seed: int = 0
    #: Value of the ``Retry-After`` header on 429 (seconds); None sends no header.
    retry_after: float | None = 0.05
    #: How long a "timeout" request hangs before answering (past the client's timeout).
    hang_s: float = 5.0
    #: A hanging or reset request still accepts (and records) the message: the SMS really went out.
    timeout_accepts: bool = True

    def draw(self, rng: random.Random) -> FaultKind:
        x = rng.random()
        for kind, p in (
            ("429", self.p429),
            ("500", self.p500),
            ("503", self.p503),
            ("timeout", self.ptimeout),
            ("reset", self.preset),
        ):
            if x < p:
                return kind  # type: ignore[return-value]
            x -= p
        return "ok"


@dataclass(frozen=True)
class Accepted:
    """One message the fake accepted (it would have been delivered)."""

    sid: str
    to: str
    from_: str
    body: str
    at: float
    #: ``ok`` normally; ``timeout``/``reset`` when accepted although the client saw no answer.
    via: str = "ok"

    @property
    def alert_id(self) -> str | None:
        m = ALERT_ID_IN_BODY.search(self.body)
        return m.group(1) if m else None


@dataclass
class TwilioFake:
    """The fake server. ``base_url`` is what ``WD_TWILIO_BASE_URL`` should point at."""

    account_sid: str = "AC" + "0" * 32
    auth_token: str = "fake-auth-token"
    faults: Faults = field(default_factory=Faults)
    host: str = "127.0.0.1"
    port: int = 0
    invalid_numbers: frozenset[str] = frozenset({"+15005550001"})
    record_file: Path | None = None

    accepted: list[Accepted] = field(default_factory=list, init=False)
    #: Status code (or fault name for hangs and resets) of every request, in arrival order.
    responses: list[str] = field(default_factory=list, init=False)
    #: (alert_id found in the body, To, status or fault) of every request that got past auth, in arrival order.
    log: list[tuple[str | None, str, str]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.faults.seed)
        self._script: list[FaultKind] = []
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()  # accepted/responses are read from other threads by benchmarks
        self._record_fh: Any = None
        self._hangs: set[asyncio.Task[Any]] = set()

    # ---- control -------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def script(self, kinds: list[FaultKind]) -> None:
        """Force the next responses, in order, before random faults apply again."""
        with self._lock:
            self._script.extend(kinds)

    def accepted_count(self, alert_id: str, phone: str) -> int:
        """How many accepted messages carry ``alert_id`` and went to ``phone``."""
        with self._lock:
            return sum(1 for a in self.accepted if a.to == phone and a.alert_id == alert_id)

    def accepted_by_key(self) -> Counter[tuple[str | None, str]]:
        """Accepted messages counted per (alert_id, phone)."""
        with self._lock:
            return Counter((a.alert_id, a.to) for a in self.accepted)

    def response_counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.responses)

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._create_message)
        return app

    async def start(self) -> TwilioFake:
        # Short keep-alive is not wanted here: the client must see the server's real behaviour.
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None)
        assert sockets
        self.port = sockets[0].getsockname()[1]
        if self.record_file is not None:
            self._record_fh = self.record_file.open("a", encoding="utf-8")
        return self

    async def stop(self) -> None:
        for task in list(self._hangs):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._record_fh is not None:
            self._record_fh.close()
            self._record_fh = None

    async def __aenter__(self) -> TwilioFake:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[TwilioFake]:
        """Run the fake on an event loop in a daemon thread (for benchmarks driving their own loop)."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def _run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()

        thread = threading.Thread(target=_run, name="twilio-fake", daemon=True)
        thread.start()
        ready.wait(10)
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    # ---- the Messages API ----------------------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return secrets.compare_digest(user, self.account_sid) and secrets.compare_digest(
            password, self.auth_token
        )

    def _next_fault(self) -> FaultKind:
        with self._lock:
            if self._script:
                return self._script.pop(0)
            return self.faults.draw(self._rng)

    def _note(self, what: str, to: str = "", body: str = "") -> None:
        m = ALERT_ID_IN_BODY.search(body)
        with self._lock:
            self.responses.append(what)
            if to:
                self.log.append((m.group(1) if m else None, to, what))

    def _accept(self, to: str, from_: str, body: str, via: str) -> Accepted:
        msg = Accepted(
            sid="SM" + secrets.token_hex(16), to=to, from_=from_, body=body, at=time.time(), via=via
        )
        with self._lock:
            self.accepted.append(msg)
        if self._record_fh is not None:
            self._record_fh.write(
                json.dumps({"sid": msg.sid, "to": to, "body": body, "at": msg.at, "via": via}) + "\n"
            )
            self._record_fh.flush()
        return msg

    async def _create_message(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["sid"]
        if not self._authorised(request) or sid != self.account_sid:
            self._note("401")
            return _error(401, 20003, "Authenticate")
        form = await request.post()
        to, from_, body = str(form.get("To", "")), str(form.get("From", "")), str(form.get("Body", ""))
        if not to:
            self._note("400")
            return _error(400, 21604, "A 'To' phone number is required.")
        if not body:
            self._note("400")
            return _error(400, 21602, "Message body is required.")
        if not E164.match(to) or to in self.invalid_numbers:
            self._note("400", to, body)
            return _error(400, 21211, f"The 'To' number {to} is not a valid phone number.")

        fault = self._next_fault()
        if fault == "429":
            self._note("429", to, body)
            headers = {}
            if self.faults.retry_after is not None:
                headers["Retry-After"] = _fmt_seconds(self.faults.retry_after)
            return _error(429, 20429, "Too Many Requests", headers)
        if fault in ("500", "503"):
            self._note(fault, to, body)
            return _error(int(fault), 20000 + int(fault), "Service Unavailable")
        if fault == "timeout":
            self._note("timeout", to, body)
            if self.faults.timeout_accepts:
                self._accept(to, from_, body, via="timeout")
            task = asyncio.current_task()
            assert task is not None
            self._hangs.add(task)
            try:
                await asyncio.sleep(self.faults.hang_s)
            finally:
                self._hangs.discard(task)
            return _error(504, 20504, "Gateway Timeout")
        if fault == "reset":
            self._note("reset", to, body)
            if self.faults.timeout_accepts:
                self._accept(to, from_, body, via="reset")
            if request.transport is not None:
                request.transport.abort()  # an RST after the request went through: the client sees no answer
            raise web.HTTPInternalServerError()  # never reaches the client; ends the handler

        msg = self._accept(to, from_, body, via="ok")
        self._note("201", to, body)
        now = formatdate(msg.at, usegmt=True)
        uri = f"/2010-04-01/Accounts/{sid}/Messages/{msg.sid}.json"
        payload = {
            "account_sid": sid,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": from_,
            "messaging_service_sid": None,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": msg.sid,
            "status": "queued",
            "subresource_uris": {"media": uri.replace(".json", "/Media.json")},
            "to": to,
            "uri": uri,
        }
        return web.json_response(payload, status=201)


class TwilioFakeProcess:
    """The fake as a child process (no faults), recording accepted messages to a JSON-lines file.

    ``with TwilioFakeProcess(folder) as fake:`` ... ``fake.base_url``, ``fake.accepted()``.
    """

    def __init__(
        self, folder: Path, account_sid: str = "AC" + "0" * 32, auth_token: str = "fake-auth-token"
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.record = Path(folder) / "twilio-accepted.jsonl"
        self.base_url = ""
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> TwilioFakeProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "simulators.twilio_fake", "--account-sid", self.account_sid,
             "--auth-token", self.auth_token, "--record", str(self.record)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line.startswith("READY "):
            self.close()
            raise RuntimeError(f"the Twilio fake did not start: {line!r}")
        self.base_url = line.split(" ", 1)[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()

    def accepted(self) -> list[Accepted]:
        """Messages accepted so far, in order (read back from the record file)."""
        out: list[Accepted] = []
        if not self.record.exists():
            return out
        with self.record.open() as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # a line being written
                m = json.loads(line)
                out.append(Accepted(m["sid"], m["to"], "", m["body"], m["at"], m["via"]))
        return out


def _fmt_seconds(s: float) -> str:
    # Twilio sends integer seconds; fractional values make fast tests possible and clients must parse floats.
    return str(int(s)) if float(s).is_integer() else f"{s:g}"


def _error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return web.json_response(body, status=status, headers=headers)


def main(argv: list[str] | None = None) -> int:
    """Run the fake as a process until SIGTERM/SIGINT; prints ``READY <base_url>`` once it listens."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--account-sid", default="AC" + "0" * 32)
    p.add_argument("--auth-token", default="fake-auth-token")
    p.add_argument("--record", type=Path, help="append accepted messages here as JSON lines")
    p.add_argument("--p429", type=float, default=0.0)
    p.add_argument("--p500", type=float, default=0.0)
    p.add_argument("--p503", type=float, default=0.0)
    p.add_argument("--ptimeout", type=float, default=0.0)
    p.add_argument("--preset", type=float, default=0.0)
    p.add_argument("--retry-after", type=float, default=0.05)
    p.add_argument("--hang", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    fake = TwilioFake(
        account_sid=args.account_sid,
        auth_token=args.auth_token,
        host=args.host,
        port=args.port,
        record_file=args.record,
        faults=Faults(
            p429=args.p429,
            p500=args.p500,
            p503=args.p503,
            ptimeout=args.ptimeout,
            preset=args.preset,
            retry_after=args.retry_after,
            hang_s=args.hang,
            seed=args.seed,
        ),
    )

    async def _serve() -> None:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with fake:
            print(f"READY {fake.base_url}", flush=True)
            await stop.wait()

    asyncio.run(_serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
