"""SMS senders: the :class:`SmsSender` protocol, Twilio through the official ``twilio`` package, and a dry run.

A sender makes exactly one attempt per :meth:`SmsSender.send` call and classifies what happened:

``accepted``   Twilio took the message (it has a ``SM...`` sid).
``retryable``  refused before sending: 429 (with ``Retry-After``), a connection that never opened, or 401 (bad
               credentials: retried slowly so alerts go out once an operator fixes them). Safe to try again.
``unknown``    5xx, a read timeout, or a connection lost after the request went out: Twilio may or may not have
               sent it. The caller records it and never resends.
``rejected``   any other 4xx (e.g. 21211 invalid number): will never succeed; recorded.
``dry_run``    printed instead of sent.

Retrying, ledger updates and rate bounds belong to :mod:`alerting.dispatcher`; a sender only talks to the provider.

Pointing the ``twilio`` client at another base URL: the generated code builds absolute ``https://api.twilio.com/...``
URLs, so :class:`RebasedHttpClient` (a ``twilio.http.AsyncHttpClient``) swaps scheme, host and port for those of
``WD_TWILIO_BASE_URL`` and keeps the path. It also tells "never sent" from "maybe sent" transport errors and hands
the response headers (``Retry-After``) back to :class:`TwilioSender`, which ``TwilioRestException`` does not carry.
"""

from __future__ import annotations

import contextvars
import enum
import itertools
import logging
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
from pydantic import SecretStr
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http import AsyncHttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.rest import Client

from alerting import metrics
from handoff.errors import ConfigError
from handoff.settings import Settings, mask_phone

logger = logging.getLogger(__name__)

__all__ = [
    "DryRunSender",
    "Outcome",
    "RebasedHttpClient",
    "SendResult",
    "SmsSender",
    "TwilioSender",
    "make_sender",
]


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"
    RETRYABLE = "retryable"
    UNKNOWN = "unknown"
    REJECTED = "rejected"
    DRY_RUN = "dry_run"


@dataclass(frozen=True, slots=True)
class SendResult:
    """What one send attempt came to. ``reason`` is short and free of secrets and phone numbers."""

    outcome: Outcome
    sid: str | None = None
    status: int | None = None
    code: int | None = None
    retry_after: float | None = None
    reason: str = ""


class SmsSender(Protocol):
    """Anything that can make one attempt at sending an SMS."""

    async def send(self, to: str, body: str) -> SendResult:
        """Make exactly one attempt; never raise for provider or network errors, classify them."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


# --------------------------------------------------------------------------------------------------------------------
# Twilio


class _NotSent(Exception):
    """The request never reached the server (connect failed or timed out): safe to retry."""


class _MaybeSent(Exception):
    """The request went out but no answer came back (read timeout, reset): outcome unknown."""


@dataclass
class _Capture:
    status: int | None = None
    headers: Mapping[str, str] | None = None


# The generated twilio code raises TwilioRestException without the response headers; the http client stores them
# here for the task that is sending (a ContextVar, so concurrent sends on one client never mix them up).
_capture: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("wd_twilio_capture", default=None)


class RebasedHttpClient(AsyncHttpClient):  # type: ignore[misc]
    """aiohttp transport for ``twilio.rest.Client`` that sends every request to ``base_url`` instead of Twilio's host.

    One pooled session, created on first use inside the running loop. ``connect_timeout`` bounds getting a
    connection (nothing sent yet); ``read_timeout`` bounds waiting for the answer (the request may have been taken).
    """

    def __init__(
        self,
        base_url: str,
        *,
        read_timeout: float = 10.0,
        connect_timeout: float = 3.0,
        pool_size: int = 64,
    ) -> None:
        super().__init__(logger, True, read_timeout)
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"WD_TWILIO_BASE_URL must be an http(s) URL, got {base_url!r}")
        self._scheme, self._netloc, self._prefix = parts.scheme, parts.netloc, parts.path.rstrip("/")
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._auth_cache: tuple[tuple[str, str], str] | None = None

    def _basic(self, auth: tuple[str, str]) -> str:
        if self._auth_cache is None or self._auth_cache[0] != auth:
            self._auth_cache = (auth, aiohttp.encode_basic_auth(auth[0], auth[1]))
        return self._auth_cache[1]

    def rebase(self, url: str) -> str:
        parts = urlsplit(url)
        return urlunsplit((self._scheme, self._netloc, self._prefix + parts.path, parts.query, ""))

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size),
                # No total timeout: waiting for a pooled connection must not look like a lost answer.
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self._connect_timeout, sock_read=self._read_timeout
                ),
            )
        return self._session

    async def request(
        self,
        method: str,
        uri: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - twilio's interface; our session carries the timeouts
        allow_redirects: bool = False,
    ) -> TwilioResponse:
        session = self._get_session()
        if auth:
            headers = {**(headers or {}), "Authorization": self._basic(auth)}
        try:
            async with session.request(
                method.upper(),
                self.rebase(uri),
                params=params,  # type: ignore[arg-type]
                # Encoded here: twilio already set the form content type, and bytes skip aiohttp's FormData.
                data=urlencode(data, doseq=True).encode() if data else None,
                headers=headers,
                allow_redirects=allow_redirects,
            ) as resp:
                text = await resp.text()
                status, resp_headers = resp.status, resp.headers
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise _NotSent(type(exc).__name__) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _MaybeSent(type(exc).__name__) from exc
        cap = _capture.get()
        if cap is not None:
            cap.status, cap.headers = status, resp_headers
        return TwilioResponse(status, text, resp_headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date. None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class TwilioSender:
    """Sends through ``twilio.rest.Client(...).messages.create_async`` to ``base_url``.

    ``auth_token`` stays a :class:`~pydantic.SecretStr` until the request is built; nothing here logs it, the sid
    is logged only as its last four characters.
    """

    def __init__(
        self,
        account_sid: str,
        auth_token: SecretStr | str,
        from_number: str,
        *,
        base_url: str = "https://api.twilio.com",
        read_timeout: float = 10.0,
        connect_timeout: float = 3.0,
        pool_size: int = 64,
        auth_retry_after: float = 60.0,
    ) -> None:
        token = auth_token.get_secret_value() if isinstance(auth_token, SecretStr) else auth_token
        self.http_client = RebasedHttpClient(
            base_url, read_timeout=read_timeout, connect_timeout=connect_timeout, pool_size=pool_size
        )
        # Our own environment mapping keeps TWILIO_EDGE/TWILIO_REGION out (they would rewrite the host we already
        # rewrite); it must be non-empty, since the client falls back to os.environ for an empty one.
        self._client = Client(account_sid, token, http_client=self.http_client, environment={"WD": "1"})
        self._messages = self._client.messages
        self._from = from_number
        self._auth_retry_after = auth_retry_after
        self.read_timeout = read_timeout

    async def send(self, to: str, body: str) -> SendResult:
        cap = _Capture()
        token = _capture.set(cap)
        t0 = time.perf_counter()
        try:
            msg = await self._messages.create_async(to=to, from_=self._from, body=body)
            return SendResult(Outcome.ACCEPTED, sid=str(msg.sid), status=cap.status)
        except _NotSent as exc:
            return SendResult(Outcome.RETRYABLE, reason=f"connect:{exc}")
        except _MaybeSent as exc:
            return SendResult(Outcome.UNKNOWN, reason=f"transport:{exc}")
        except TwilioRestException as exc:
            return self._classify(int(exc.status), exc.code, cap)
        except TwilioException as exc:
            status = getattr(exc, "status", None)
            if isinstance(status, int):
                return self._classify(status, getattr(exc, "code", None), cap)
            # A 2xx with a body the client could not read: it was taken, but we have no sid.
            return SendResult(Outcome.UNKNOWN, status=cap.status, reason=f"client:{type(exc).__name__}")
        except Exception as exc:
            # Anything else after the request went out (e.g. an unreadable answer): we cannot tell, never resend.
            logger.warning("unexpected %s while sending; outcome unknown", type(exc).__name__)
            return SendResult(Outcome.UNKNOWN, status=cap.status, reason=f"client:{type(exc).__name__}")
        finally:
            _capture.reset(token)
            metrics.SMS_SEND_SECONDS.observe(time.perf_counter() - t0)

    def _classify(self, status: int, code: Any, cap: _Capture) -> SendResult:
        code_i = code if isinstance(code, int) else None
        if status == 429:
            retry_after = parse_retry_after((cap.headers or {}).get("Retry-After"))
            return SendResult(
                Outcome.RETRYABLE, status=429, code=code_i, retry_after=retry_after, reason="429"
            )
        if status == 401:
            logger.error(
                "Twilio refused the credentials (401, code %s): check TWILIO_ACCOUNT_SID/TOKEN", code_i
            )
            return SendResult(
                Outcome.RETRYABLE, status=401, code=code_i, retry_after=self._auth_retry_after, reason="auth"
            )
        if status >= 500:
            return SendResult(Outcome.UNKNOWN, status=status, code=code_i, reason=f"http:{status}")
        return SendResult(Outcome.REJECTED, status=status, code=code_i, reason=f"http:{status}")

    async def aclose(self) -> None:
        await self.http_client.close()


# --------------------------------------------------------------------------------------------------------------------
# Dry run


class DryRunSender:
    """Prints each SMS (phone masked) instead of sending it, and counts them per destination."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self.sent: Counter[str] = Counter()
        self._ids = itertools.count(1)

    async def send(self, to: str, body: str) -> SendResult:
        self.sent[to] += 1
        print(f"[dry-run SMS] to {mask_phone(to)}: {body}", file=self._stream or sys.stdout, flush=True)
        return SendResult(Outcome.DRY_RUN, sid=f"DRY{next(self._ids):08d}")

    async def aclose(self) -> None:
        return None


def make_sender(settings: Settings, *, read_timeout: float = 10.0) -> SmsSender:
    """The sender the settings call for: Twilio when credentials and a routing file are set, else the dry run.

    Without a routing file every alert goes to the dry-run printer (CONTRACT.md section 1), even with credentials.
    """
    if not settings.twilio_configured or settings.routing_file is None:
        logger.info("SMS dry run: alerts are printed, not sent")
        return DryRunSender()
    if not settings.sms_from:
        raise ConfigError("WD_SMS_FROM is required when TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN are set")
    assert settings.twilio_account_sid is not None and settings.twilio_auth_token is not None
    logger.info(
        "SMS via Twilio at %s (account ...%s, from %s)",
        urlsplit(settings.twilio_base_url).netloc,
        settings.twilio_account_sid[-4:],
        mask_phone(settings.sms_from),
    )
    return TwilioSender(
        settings.twilio_account_sid,
        settings.twilio_auth_token,
        settings.sms_from,
        base_url=settings.twilio_base_url,
        read_timeout=read_timeout,
    )
