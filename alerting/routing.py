"""The routing file (CONTRACT.md section 5, plus quiet hours and escalation), validated once at start.

```toml
[[route]]
sites = ["plant-7", "reservoir-*"]        # glob patterns (fnmatch, case-sensitive)
phones = ["+15551230001", "+15551230002"] # E.164
min_severity = "warning"                  # optional: "warning" (default) or "critical"
quiet_hours = { start = "22:00", end = "06:00", tz = "Europe/London" }  # optional
escalation = { after_minutes = 15, phones = ["+15551239999"] }          # optional
```

An alert goes to every phone of every route whose ``sites`` match and whose ``min_severity`` it reaches. During a
route's quiet hours a warning waits until they end; a critical alert goes through. A phone named by two routes gets
one SMS, at the earliest time either route allows. Escalation: when the alert is not acknowledged ``after_minutes``
after it was sent, the escalation phones get it too (they are subject to the route's quiet hours as well).

Every problem is reported with the file, the line of the offending route and the field, e.g.
``routing.toml:9: route 2: phones[1]: '+1555' is not an E.164 number (+ then 8 to 15 digits)``.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from alerting.errors import RoutingError

E164: Final = re.compile(r"^\+[1-9]\d{7,14}$")
SEVERITY_RANK: Final[Mapping[str, int]] = {"warning": 1, "critical": 2}
#: Destination used when no routing file is configured: every alert goes to the dry-run printer.
CONSOLE: Final = "console"

_ROUTE_KEYS: Final = frozenset({"sites", "phones", "min_severity", "quiet_hours", "escalation"})
_QUIET_KEYS: Final = frozenset({"start", "end", "tz"})
_ESCALATION_KEYS: Final = frozenset({"after_minutes", "phones"})
_HHMM: Final = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True, slots=True)
class QuietHours:
    """A daily window in a time zone; ``end`` before ``start`` means it spans midnight."""

    start: time
    end: time
    tz: str

    def until(self, now: datetime) -> datetime | None:
        """When the quiet hours containing ``now`` end (aware, UTC), or None when ``now`` is not in them."""
        zone = ZoneInfo(self.tz)
        local = now.astimezone(zone)
        t = local.time().replace(tzinfo=None)
        if self.start < self.end:
            inside = self.start <= t < self.end
            end_day = local.date()
        else:  # spans midnight
            inside = t >= self.start or t < self.end
            end_day = local.date() + timedelta(days=1) if t >= self.start else local.date()
        if not inside:
            return None
        # Built from the wall clock of the zone, so the window ends at the named local time across DST changes.
        return datetime.combine(end_day, self.end, tzinfo=zone).astimezone(UTC)

    def to_json(self) -> dict[str, str]:
        return {"start": self.start.strftime("%H:%M"), "end": self.end.strftime("%H:%M"), "tz": self.tz}

    @classmethod
    def from_json(cls, d: Mapping[str, str]) -> QuietHours:
        return cls(time.fromisoformat(d["start"]), time.fromisoformat(d["end"]), d["tz"])


@dataclass(frozen=True, slots=True)
class Escalation:
    after_minutes: float
    phones: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Route:
    sites: tuple[str, ...]
    phones: tuple[str, ...]
    min_severity: str = "warning"
    quiet_hours: QuietHours | None = None
    escalation: Escalation | None = None
    #: 1-based position in the file and the line of its ``[[route]]`` header, for messages.
    index: int = 0
    line: int | None = None

    def matches(self, site: str, severity: str) -> bool:
        return SEVERITY_RANK.get(severity, 0) >= SEVERITY_RANK[self.min_severity] and any(
            fnmatch.fnmatchcase(site, pattern) for pattern in self.sites
        )

    def due(self, severity: str, now: datetime) -> datetime | None:
        """None to send now, else when (quiet hours hold warnings back; critical goes through)."""
        if self.quiet_hours is None or severity == "critical":
            return None
        return self.quiet_hours.until(now)


@dataclass(frozen=True, slots=True)
class PlannedEscalation:
    """Escalation of one route: at ``due`` (epoch s), unless acknowledged, send to ``phones``."""

    route: int
    due: float
    phones: tuple[str, ...]
    quiet_hours: QuietHours | None


@dataclass(frozen=True, slots=True)
class Plan:
    """Where and when an alert goes. ``phones`` maps each phone to None (now) or the epoch second it may go."""

    phones: dict[str, float | None] = field(default_factory=dict)
    escalations: tuple[PlannedEscalation, ...] = ()

    @property
    def routed(self) -> bool:
        return bool(self.phones)


@dataclass(frozen=True, slots=True)
class Routing:
    routes: tuple[Route, ...]
    source: str = "<default>"

    @classmethod
    def console(cls) -> Routing:
        """No routing file: every alert to the dry-run printer (CONTRACT.md section 1)."""
        return cls((Route(sites=("*",), phones=(CONSOLE,), index=1),), source="<no routing file>")

    def plan(self, site: str, severity: str, now: float) -> Plan:
        """Resolve the phones for an alert of ``site`` and ``severity`` at epoch second ``now``."""
        now_dt = datetime.fromtimestamp(now, UTC)
        phones: dict[str, float | None] = {}
        escalations: list[PlannedEscalation] = []
        for route in self.routes:
            if not route.matches(site, severity):
                continue
            due_dt = route.due(severity, now_dt)
            due = due_dt.timestamp() if due_dt is not None else None
            for phone in route.phones:
                if phone in phones:
                    prev = phones[phone]
                    phones[phone] = None if prev is None or due is None else min(prev, due)
                else:
                    phones[phone] = due
            if route.escalation is not None:
                start = due if due is not None else now
                escalations.append(
                    PlannedEscalation(
                        route=route.index,
                        due=start + route.escalation.after_minutes * 60.0,
                        phones=route.escalation.phones,
                        quiet_hours=route.quiet_hours,
                    )
                )
        return Plan(phones=phones, escalations=tuple(escalations))


# --------------------------------------------------------------------------------------------------------------------
# Loading and validation


def load_routing(path: Path | str | None) -> Routing:
    """Read and validate the routing file; None gives :meth:`Routing.console`. Raises :class:`RoutingError`."""
    if path is None:
        return Routing.console()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RoutingError(f"routing file {p}: cannot read it ({exc.strerror or exc})") from exc
    return parse_routing(text, source=str(p))


def parse_routing(text: str, *, source: str = "<routing>") -> Routing:
    """Validate routing TOML ``text``; ``source`` names it in error messages."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already carries "(at line N, column M)".
        raise RoutingError(f"{source}: not valid TOML: {exc}") from exc
    lines = _route_header_lines(text)
    errors: list[str] = []
    for key in doc:
        if key != "route":
            errors.append(f"{source}: unknown top-level key {key!r} (only [[route]] tables are allowed)")
    raw_routes = doc.get("route")
    if raw_routes is None:
        errors.append(f"{source}: no [[route]] tables: every alert would be unrouted")
        raw_routes = []
    elif not isinstance(raw_routes, list):
        errors.append(f"{source}: 'route' must be an array of tables, written [[route]]")
        raw_routes = []
    routes: list[Route] = []
    for i, raw in enumerate(raw_routes, start=1):
        line = lines[i - 1] if i - 1 < len(lines) else None
        where = f"{source}:{line}: route {i}" if line else f"{source}: route {i}"
        route, errs = _parse_route(raw, i, line, where, text)
        errors.extend(errs)
        if route is not None:
            routes.append(route)
    if errors:
        raise RoutingError("invalid routing file:\n  " + "\n  ".join(errors))
    return Routing(tuple(routes), source=source)


def _route_header_lines(text: str) -> list[int]:
    return [n for n, line in enumerate(text.splitlines(), start=1) if line.strip().startswith("[[route]]")]


def _field_line(text: str, route_line: int | None, name: str) -> int | None:
    """Line of ``name = ...`` inside the route starting at ``route_line`` (best effort, for messages)."""
    if route_line is None:
        return None
    pattern = re.compile(rf"^\s*{re.escape(name)}\s*=")
    for n, line in enumerate(text.splitlines()[route_line:], start=route_line + 1):
        if line.strip().startswith("["):
            break
        if pattern.match(line):
            return n
    return None


class _Reporter:
    """Collects ``file:line: route N: field: problem`` messages; ``count`` tells a caller whether any were added."""

    def __init__(self, errors: list[str], where: str, line: int | None, text: str) -> None:
        self._errors, self._where, self._line, self._text = errors, where, line, text
        self.count = 0

    def __call__(self, fld: str, msg: str) -> None:
        self.count += 1
        fl = _field_line(self._text, self._line, fld.split("[", 1)[0].split(".", 1)[0])
        prefix = self._where if fl is None else self._where.replace(f":{self._line}:", f":{fl}:", 1)
        self._errors.append(f"{prefix}: {fld}: {msg}")


def _parse_route(
    raw: Any, index: int, line: int | None, where: str, text: str
) -> tuple[Route | None, list[str]]:
    errors: list[str] = []
    err = _Reporter(errors, where, line, text)

    if not isinstance(raw, dict):
        return None, [f"{where}: must be a table"]
    for key in raw:
        if key not in _ROUTE_KEYS:
            err(key, f"unknown key (allowed: {', '.join(sorted(_ROUTE_KEYS))})")

    sites = _string_list(raw.get("sites"), "sites", err, required=True)
    phones = _phone_list(raw.get("phones"), "phones", err)
    min_severity = raw.get("min_severity", "warning")
    if min_severity not in SEVERITY_RANK:
        err("min_severity", f"{min_severity!r} is not 'warning' or 'critical'")
        min_severity = "warning"

    quiet: QuietHours | None = None
    if "quiet_hours" in raw:
        quiet = _parse_quiet(raw["quiet_hours"], err)

    escalation: Escalation | None = None
    if "escalation" in raw:
        escalation = _parse_escalation(raw["escalation"], err)

    if errors:
        return None, errors
    return (
        Route(
            sites=tuple(sites),
            phones=tuple(phones),
            min_severity=min_severity,
            quiet_hours=quiet,
            escalation=escalation,
            index=index,
            line=line,
        ),
        errors,
    )


def _string_list(value: Any, name: str, err: _Reporter, *, required: bool) -> list[str]:
    if value is None:
        if required:
            err(name, "is required (a list of strings)")
        return []
    if not isinstance(value, list) or not value:
        err(name, "must be a non-empty list of strings")
        return []
    out: list[str] = []
    for j, item in enumerate(value):
        if not isinstance(item, str) or not item:
            err(f"{name}[{j}]", f"{item!r} is not a non-empty string")
        else:
            out.append(item)
    return out


def _phone_list(value: Any, name: str, err: _Reporter) -> list[str]:
    phones = _string_list(value, name, err, required=True)
    out: list[str] = []
    for j, phone in enumerate(phones):
        if not E164.match(phone):
            err(f"{name}[{j}]", f"{phone!r} is not an E.164 number (+ then 8 to 15 digits)")
        elif phone in out:
            err(f"{name}[{j}]", f"{phone!r} is listed twice")
        else:
            out.append(phone)
    return out


def _parse_quiet(value: Any, err: _Reporter) -> QuietHours | None:
    if not isinstance(value, dict):
        err("quiet_hours", 'must be a table: { start = "22:00", end = "06:00", tz = "Europe/London" }')
        return None
    ok = True
    for key in value:
        if key not in _QUIET_KEYS:
            err(f"quiet_hours.{key}", "unknown key (allowed: start, end, tz)")
            ok = False
    parsed: dict[str, time] = {}
    for key in ("start", "end"):
        v = value.get(key)
        m = _HHMM.match(v) if isinstance(v, str) else None
        if m is None:
            err(f"quiet_hours.{key}", f"{v!r} is not a time HH:MM (00:00 to 23:59)")
            ok = False
        else:
            parsed[key] = time(int(m.group(1)), int(m.group(2)))
    tz = value.get("tz")
    if not isinstance(tz, str) or not tz:
        err("quiet_hours.tz", f"{tz!r} is not an IANA time zone name such as 'Europe/London'")
        ok = False
    else:
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            err("quiet_hours.tz", f"{tz!r} is not a known IANA time zone")
            ok = False
    if ok and parsed["start"] == parsed["end"]:
        err("quiet_hours", "start and end are equal (an empty or all-day window): remove it or widen it")
        ok = False
    if not ok:
        return None
    assert isinstance(tz, str)
    return QuietHours(parsed["start"], parsed["end"], tz)


def _parse_escalation(value: Any, err: _Reporter) -> Escalation | None:
    if not isinstance(value, dict):
        err("escalation", 'must be a table: { after_minutes = 15, phones = ["+15551239999"] }')
        return None
    ok = True
    for key in value:
        if key not in _ESCALATION_KEYS:
            err(f"escalation.{key}", "unknown key (allowed: after_minutes, phones)")
            ok = False
    after = value.get("after_minutes")
    if isinstance(after, bool) or not isinstance(after, int | float) or not 0 < after <= 7 * 24 * 60:
        err("escalation.after_minutes", f"{after!r} is not a number of minutes in (0, 10080]")
        ok = False
    reported = err.count
    phones = _phone_list(value.get("phones"), "escalation.phones", err)
    if err.count > reported:
        ok = False
    if not ok or not isinstance(after, int | float):
        return None
    return Escalation(float(after), tuple(phones))


def describe(routing: Routing, mask: Any) -> Sequence[str]:
    """One line per route for the start-up log, phones masked with ``mask``."""
    out = []
    for r in routing.routes:
        extra = ""
        if r.quiet_hours:
            q = r.quiet_hours
            extra += f" quiet {q.start:%H:%M}-{q.end:%H:%M} {q.tz}"
        if r.escalation:
            extra += (
                f" escalate after {r.escalation.after_minutes:g} min to {len(r.escalation.phones)} phone(s)"
            )
        out.append(
            f"route {r.index}: sites {list(r.sites)} -> {[mask(p) for p in r.phones]} (>= {r.min_severity}){extra}"
        )
    return out
