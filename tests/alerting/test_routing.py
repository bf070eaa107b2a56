"""Routing file validation (clear errors with line and field) and route resolution."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from alerting.errors import RoutingError
from alerting.routing import CONSOLE, QuietHours, load_routing, parse_routing
from handoff.errors import ConfigError


def _err(text: str) -> str:
    with pytest.raises(RoutingError) as exc:
        parse_routing(text, source="routing.toml")
    return str(exc.value)


def test_contract_example_loads(tmp_path: Path) -> None:
    p = tmp_path / "routing.toml"
    p.write_text(
        '[[route]]\nsites = ["plant-7", "reservoir-*"]\nphones = ["+15551230001", "+15551230002"]\n'
        'min_severity = "warning"\n'
    )
    routing = load_routing(p)
    assert routing.plan("reservoir-3", "warning", 0).phones == {"+15551230001": None, "+15551230002": None}
    assert routing.plan("plant-8", "critical", 0).phones == {}


def test_no_file_means_console() -> None:
    assert load_routing(None).plan("anything", "warning", 0).phones == {CONSOLE: None}


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_routing(tmp_path / "nope.toml")


def test_syntax_error_names_the_line() -> None:
    msg = _err('[[route]]\nsites = ["a"\nphones = ["+15551230001"]\n')
    assert "routing.toml: not valid TOML" in msg and "line 3" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "no [[route]] tables"),
        ('route = "x"', "'route' must be an array of tables"),
        (
            '[[route]]\nsites = ["*"]\nphones = ["+15551230001"]\n[other]\nx = 1\n',
            "unknown top-level key 'other'",
        ),
        ('[[route]]\nphones = ["+15551230001"]\n', "routing.toml:1: route 1: sites: is required"),
        (
            '[[route]]\nsites = []\nphones = ["+15551230001"]\n',
            "routing.toml:2: route 1: sites: must be a non-empty",
        ),
        (
            '[[route]]\nsites = ["*"]\nphones = ["+15551230001", "5551230002"]\n',
            "routing.toml:3: route 1: phones[1]",
        ),
        ('[[route]]\nsites = ["*"]\nphones = ["+15551230001", "+15551230001"]\n', "listed twice"),
        ('[[route]]\nsites = ["*"]\nphones = ["+1555123"]\n', "not an E.164 number"),
        (
            '[[route]]\nsites = ["*"]\nphones = ["+15551230001"]\nmin_severity = "info"\n',
            "min_severity: 'info'",
        ),
        (
            '[[route]]\nsites = ["*"]\nphones = ["+15551230001"]\nphone = "x"\n',
            "routing.toml:4: route 1: phone: unknown key",
        ),
        (
            '[[route]]\nsites = ["*"]\nphones = ["+15551230001"]\n'
            'quiet_hours = { start = "22:00", end = "25:00", tz = "Europe/London" }\n',
            "quiet_hours.end: '25:00' is not a time HH:MM",
        ),
        (
            '[[route]]\nsites = ["*"]\nphones = ["+15551230001"]\n'
            'quiet_hours = { start = "22:00", end = "06:00", tz = "Mars/Olympus" }\n',
            "quiet_hours.tz: 'Mars/Olympus' is not a known IANA time zone",
        ),
        (
            '[[route]]\nsites = ["*"]\nphones = ["+15551230001"]\n'
            'quiet_hours = { start = "06:00", end = "06:00", tz = "UTC" }\n',
            "start and end are equal",
        ),
        (
            '[[route]]\nsites = ["*"]\nphones = ["+15551230001"]\nescalation = { after_minutes = -1, phones = [] }\n',
            "escalation.after_minutes: -1",
        ),
        (
            '[[route]]\nsites = ["*"]\nphones = ["+15551230001"]\n'
            'escalation = { after_minutes = 5, phones = ["nope"] }\n',
            "routing.toml:4: route 1: escalation.phones[0]: 'nope'",
        ),
    ],
)
def test_validation_errors_name_line_and_field(text: str, expected: str) -> None:
    assert expected in _err(text)


def test_all_errors_of_all_routes_are_reported_at_once() -> None:
    msg = _err(
        '[[route]]\nsites = ["*"]\nphones = ["+15551230001"]\n\n'
        '[[route]]\nsites = ["x"]\nphones = ["bad"]\nmin_severity = "loud"\n'
    )
    assert "routing.toml:7: route 2: phones[0]" in msg
    assert "routing.toml:8: route 2: min_severity" in msg


ROUTES = """
[[route]]
sites = ["plant-*"]
phones = ["+15551230001", "+15551230002"]
quiet_hours = { start = "22:00", end = "06:00", tz = "Europe/London" }
escalation = { after_minutes = 15, phones = ["+15551239999"] }

[[route]]
sites = ["plant-7"]
phones = ["+15551230002", "+15551230003"]
min_severity = "critical"
"""


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_plan_merges_routes_and_applies_quiet_hours() -> None:
    routing = parse_routing(ROUTES)
    night = _ts("2026-01-02T00:30:00+00:00")
    plan = routing.plan("plant-7", "warning", night)
    end = _ts("2026-01-02T06:00:00+00:00")
    assert plan.phones == {"+15551230001": end, "+15551230002": end}
    assert [(e.route, e.due, e.phones) for e in plan.escalations] == [(1, end + 900, ("+15551239999",))]
    # Critical: through the quiet hours, and the second route's phones too (a phone named twice gets one SMS).
    plan = routing.plan("plant-7", "critical", night)
    assert plan.phones == {"+15551230001": None, "+15551230002": None, "+15551230003": None}
    assert plan.escalations[0].due == night + 900
    # Daytime warnings go now.
    assert routing.plan("plant-9", "warning", _ts("2026-01-02T12:00:00+00:00")).phones == {
        "+15551230001": None,
        "+15551230002": None,
    }


@pytest.mark.parametrize(
    ("now", "until"),
    [
        ("2026-07-01T21:59:00+01:00", None),
        ("2026-07-01T22:00:00+01:00", "2026-07-02T06:00:00+01:00"),
        ("2026-07-02T05:59:00+01:00", "2026-07-02T06:00:00+01:00"),
        ("2026-07-02T06:00:00+01:00", None),
        # The night the clocks go back (2026-10-25): the window still ends at 06:00 local, now GMT.
        ("2026-10-24T23:00:00+01:00", "2026-10-25T06:00:00+00:00"),
        # Spring forward (2026-03-29).
        ("2026-03-29T00:30:00+00:00", "2026-03-29T06:00:00+01:00"),
    ],
)
def test_quiet_hours_across_midnight_and_dst(now: str, until: str | None) -> None:
    q = QuietHours.from_json({"start": "22:00", "end": "06:00", "tz": "Europe/London"})
    got = q.until(datetime.fromisoformat(now))
    assert got == (datetime.fromisoformat(until).astimezone(UTC) if until else None)


def test_daytime_quiet_window() -> None:
    q = QuietHours.from_json({"start": "12:00", "end": "14:00", "tz": "America/New_York"})
    assert q.until(datetime.fromisoformat("2026-01-05T13:00:00-05:00")) == datetime.fromisoformat(
        "2026-01-05T19:00:00+00:00"
    )
    assert q.until(datetime.fromisoformat("2026-01-05T14:00:00-05:00")) is None
