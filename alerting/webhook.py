"""Twilio inbound-message webhook: operators acknowledge an alert by replying ``ACK <code>``.

Every request must carry a valid ``X-Twilio-Signature`` (HMAC of the URL Twilio called and the POST parameters,
checked with ``twilio.request_validator.RequestValidator``); anything else gets 403, including a genuine request
whose parameters were altered on the way. Behind a proxy, pass ``public_url``: the URL Twilio is configured to call,
since that is what it signs.

A valid ``ACK <code>`` (the short code in the SMS, or the full ``alert_id``) from one of the alert's recipients
records who acknowledged and when, and stops the alert's escalation. The reply is TwiML, so the operator gets a
confirmation SMS (``reply=False`` answers with an empty TwiML document instead).
"""

from __future__ import annotations

import logging
import re
from typing import Final

from aiohttp import web
from pydantic import SecretStr
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from twilio.twiml.messaging_response import MessagingResponse

from alerting import metrics
from alerting.dispatcher import AckResult, Dispatcher
from handoff.settings import mask_phone

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PATH", "make_webhook_app", "start_webhook"]

DEFAULT_PATH: Final = "/twilio/inbound"
_ACK = re.compile(r"^\s*ACK(?:\s+([A-Za-z0-9:_#-]{1,200}))?\s*[.!]?\s*$", re.IGNORECASE)
_MAX_BODY: Final = 64 * 1024

_REPLIES: Final = {
    AckResult.ACKED: "Acknowledged {id}. Escalation stopped.",
    AckResult.ALREADY: "{id} was already acknowledged.",
    AckResult.UNKNOWN_CODE: "No alert matches that code.",
    AckResult.NOT_RECIPIENT: "This number did not receive that alert.",
}


def make_webhook_app(
    dispatcher: Dispatcher,
    auth_token: SecretStr | str,
    *,
    public_url: str | None = None,
    path: str = DEFAULT_PATH,
    reply: bool = True,
) -> web.Application:
    """An aiohttp application serving ``POST {path}`` for Twilio's inbound messages."""
    token = auth_token.get_secret_value() if isinstance(auth_token, SecretStr) else auth_token
    validator = RequestValidator(token)

    async def inbound(request: web.Request) -> web.Response:
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            metrics.WEBHOOK_REJECTED.labels("missing_signature").inc()
            logger.warning("inbound webhook without %s from %s: 403", SIGNATURE_HEADER, request.remote)
            return web.Response(status=403, text="forbidden")
        params = await request.post()
        url = public_url if public_url is not None else str(request.url)
        if public_url is not None and request.query_string:
            url = f"{public_url}?{request.query_string}"
        algorithm = get_signature_algorithm(request.headers.get(SIGNATURE_SETTINGS_HEADER))
        if not validator.validate(url, params, signature, algorithm):
            metrics.WEBHOOK_REJECTED.labels("bad_signature").inc()
            logger.warning("inbound webhook with an invalid signature from %s: 403", request.remote)
            return web.Response(status=403, text="forbidden")

        sender = str(params.get("From", ""))
        match = _ACK.match(str(params.get("Body", "")))
        if match is None or not match.group(1):
            return _twiml("Reply ACK <code> to acknowledge an alert." if reply else None)
        result, alert_id = await dispatcher.acknowledge(match.group(1), sender)
        if result is not AckResult.ACKED:
            logger.info("ACK from %s not applied: %s", mask_phone(sender), result.value)
        return _twiml(_REPLIES[result].format(id=alert_id or "") if reply else None)

    app = web.Application(client_max_size=_MAX_BODY)
    app.router.add_post(path, inbound)
    return app


def _twiml(message: str | None) -> web.Response:
    resp = MessagingResponse()
    if message:
        resp.message(message)
    return web.Response(text=str(resp), content_type="application/xml")


async def start_webhook(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port``; stop it with ``await runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
