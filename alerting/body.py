"""SMS text: what an alert says, kept GSM-7 and within one 160-character segment where possible.

The contract (section 6) requires the body to name the site, the sensor, the metric and its direction, the severity
and the ``alert_id``. A typical body::

    WD CRITICAL plant-7/s-0042: pH low (4.1), turbidity high (12.3) id plant-7:s-0042:1234 ACK 7KQ2XM

Space is given up in this order when the text would not fit one segment: the word ``Reply``, further metrics
(replaced by ``+N``), then the ``site/sensor`` prefix is shortened (the ``alert_id`` names both anyway). The ``alert_id``
and the acknowledgement code are never cut: an absurdly long id yields a two-segment SMS rather than a wrong one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

#: One SMS segment in GSM-7 septets.
SEGMENT: Final = 160

# GSM 03.38 basic character set (one septet each) and its extension table (two septets each: escape + char).
_GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXT: Final = frozenset("^{}\\[~]|€\f")

#: Friendlier names for the metrics of the reference fleet; anything else is shown as is.
METRIC_LABELS: Final[Mapping[str, str]] = {
    "ph": "pH",
    "turbidity_ntu": "turbidity",
    "chlorine_mg_l": "chlorine",
    "flow_m3_h": "flow",
}

_ACK_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U to misread


def gsm7_length(text: str) -> int | None:
    """Length in septets, or None when ``text`` needs UCS-2 (then a segment holds only 70 characters)."""
    n = 0
    for ch in text:
        if ch in _GSM7_BASIC:
            n += 1
        elif ch in _GSM7_EXT:
            n += 2
        else:
            return None
    return n


def gsm7_safe(text: str) -> str:
    """Replace every character outside the GSM-7 basic set by ``?`` so one odd character cannot force UCS-2."""
    return "".join(ch if ch in _GSM7_BASIC else "?" for ch in text)


def ack_code(alert_key: str) -> str:
    """A short, case-insensitive code for ``ACK <code>`` replies (6 Crockford base32 characters, 30 bits).

    Deterministic, so every process and every retry puts the same code in the SMS; the code-to-alert mapping is kept
    in Redis for the retention period and the acknowledger must be one of the alert's recipients, so a rare
    collision cannot acknowledge an alert for the wrong person.
    """
    digest = int.from_bytes(hashlib.sha256(alert_key.encode()).digest()[:8], "big")
    return "".join(_ACK_ALPHABET[(digest >> (5 * i)) & 31] for i in range(6))


def _fmt_value(v: Any) -> str:
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return "?"


def _findings(anomaly: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    explanation: Sequence[Mapping[str, Any]] = anomaly.get("explanation") or []
    for item in explanation:
        metric = str(item.get("metric", "?"))
        label = METRIC_LABELS.get(metric, metric)
        out.append(f"{label} {item.get('direction', '?')} ({_fmt_value(item.get('value'))})")
    if not out:
        # Nothing explained: say how far over the threshold the reading scored.
        out.append(f"score {_fmt_value(anomaly.get('score'))}>{_fmt_value(anomaly.get('threshold'))}")
    return out


def format_body(
    anomaly: Mapping[str, Any],
    *,
    code: str,
    alert_id: str | None = None,
    folded: int = 0,
    escalated: bool = False,
    resend: bool = False,
) -> str:
    """The SMS text for ``anomaly``: GSM-7 only, within :data:`SEGMENT` septets unless the alert id alone is too long.

    ``alert_id`` overrides the anomaly's own (a fold summary names its latest alert); ``folded`` > 0 marks a summary
    of that many further anomalies; ``escalated`` and ``resend`` add a marker so the reader knows why it came.
    """
    aid = alert_id or str(anomaly.get("alert_id", "?"))
    severity = str(anomaly.get("severity", "warning")).upper()
    tags = "ESCALATED " if escalated else ""
    tags += "RESENT " if resend else ""
    head = f"WD {tags}{severity}"
    where = f"{anomaly.get('site', '?')}/{anomaly.get('sensor_id', '?')}"
    findings = _findings(anomaly)
    count = f" +{folded} more" if folded else ""
    tail = f" id {aid}"

    def build(n_findings: int, reply: bool, where_len: int | None) -> str:
        shown = findings[:n_findings]
        rest = len(findings) - n_findings
        what = ", ".join(shown) + (f" +{rest}" if rest else "")
        w = where if where_len is None or len(where) <= where_len else where[: max(where_len - 2, 1)] + ".."
        ack = f" Reply ACK {code}" if reply else f" ACK {code}"
        return gsm7_safe(f"{head} {w}: {what}{count}{tail}{ack}")

    def fits(text: str) -> bool:
        n = gsm7_length(text)
        return n is not None and n <= SEGMENT

    # Give up the least useful parts first, in the order documented above.
    for n in range(len(findings), 0, -1):
        for reply in (True, False):
            text = build(n, reply, None)
            if fits(text):
                return text
    for where_len in (24, 12, 3):
        text = build(1, False, where_len)
        if fits(text):
            return text
    return build(1, False, 3)
