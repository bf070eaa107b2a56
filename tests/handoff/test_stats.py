"""handoff.stats on Redis 7.0 and Valkey 8: numbers equal what XINFO/XPENDING say, and lag is exact where the
server's own figure is nil or wrong."""

from __future__ import annotations

import pytest
import redis.asyncio as aredis

from handoff.errors import HandoffError
from handoff.stats import (
    ConsumerStats,
    GroupStats,
    count_entries,
    next_id,
    parse_id,
    safe_trim_bound,
    server_time_ms,
    stream_stats,
)

S = "t:stats"


async def fill(
    r: aredis.Redis, n: int, *, key: str = S, step_ms: int = 1000, base_ms: int = 1000
) -> list[str]:
    async with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(key, {"payload": f'{{"n":{i}}}'}, id=f"{base_ms + i * step_ms}-0")
        return [x.decode() for x in await pipe.execute()]


async def true_lag(r: aredis.Redis, group: str, key: str = S) -> int:
    groups = {g["name"].decode(): g for g in await r.xinfo_groups(key)}
    ld = groups[group]["last-delivered-id"].decode()
    return len(await r.xrange(key, "(" + ld, "+"))


async def test_missing_stream(r: aredis.Redis) -> None:
    st = await stream_stats(r, "t:nope")
    assert not st.exists
    assert st.length == 0 and st.groups == ()
    assert st.to_json()["exists"] is False


async def test_other_type_is_an_error(r: aredis.Redis) -> None:
    await r.set("t:str", "x")
    from handoff.errors import HandoffError

    with pytest.raises(HandoffError):
        await stream_stats(r, "t:str")


async def test_stream_numbers_match_xinfo_and_ages_use_server_clock(r: aredis.Redis) -> None:
    now = await server_time_ms(r)
    await r.xadd(S, {"payload": "a"}, id=f"{now - 60_000}-0")
    await r.xadd(S, {"payload": "b"}, id=f"{now - 5_000}-7")
    st = await stream_stats(r, S, memory_samples=0)
    info = await r.xinfo_stream(S)
    assert st.exists and st.length == info["length"] == 2
    assert st.first_entry_id == f"{now - 60_000}-0"
    assert st.last_entry_id == st.last_generated_id == f"{now - 5_000}-7"
    assert st.memory_bytes == await r.memory_usage(S, samples=0)
    assert st.entries_added == 2
    assert st.first_entry_age_ms is not None and 60_000 <= st.first_entry_age_ms < 62_000
    assert st.last_entry_age_ms is not None and 5_000 <= st.last_entry_age_ms < 7_000
    assert st.to_json()["length"] == 2


async def test_group_consumers_and_pending_match_xpending(r: aredis.Redis) -> None:
    now = await server_time_ms(r)
    await fill(r, 10, base_ms=now - 100_000)
    await r.xgroup_create(S, "g", id="0")
    await r.xreadgroup("g", "c1", {S: ">"}, count=3)
    await r.xreadgroup("g", "c2", {S: ">"}, count=2)
    await r.xack(S, "g", f"{now - 100_000}-0")  # c1's first: the oldest pending becomes entry 1
    # Deliver entry 1 again to c2 so its delivery count is 2.
    await r.xclaim(S, "g", "c2", 0, [f"{now - 99_000}-0"])
    st = await stream_stats(r, S)
    (g,) = st.groups
    summary = await r.xpending(S, "g")
    assert g.name == "g" and g.stream == S
    assert g.pending == summary["pending"] == 4
    assert g.oldest_pending_id == summary["min"].decode() == f"{now - 99_000}-0"
    assert g.oldest_pending_deliveries == 2
    assert g.oldest_pending_age_ms is not None and 99_000 <= g.oldest_pending_age_ms < 101_000
    assert g.oldest_pending_idle_ms is not None and g.oldest_pending_idle_ms < 2_000
    by_name = {c.name: c for c in g.consumers}
    raw = {c["name"].decode(): c for c in await r.xinfo_consumers(S, "g")}
    assert set(by_name) == set(raw) == {"c1", "c2"}
    assert by_name["c1"].pending == raw["c1"]["pending"] == 1
    assert by_name["c2"].pending == raw["c2"]["pending"] == 3
    assert g.last_delivered_id == f"{now - 96_000}-0"
    assert g.lag == 5 and g.lag_exact
    assert g.idle_ms is not None and g.idle_ms < 2_000
    assert st.group("g") is g and st.group("x") is None


async def test_lag_exact_after_xdel_where_server_says_nil(r: aredis.Redis) -> None:
    await fill(r, 10)
    await r.xgroup_create(S, "g", id="0")
    await r.xreadgroup("g", "c", {S: ">"}, count=4)
    await r.xdel(S, "8000-0")  # a tombstone after the group's position: the server cannot tell the lag
    (g,) = (await stream_stats(r, S)).groups
    assert g.server_lag is None
    assert g.lag == await true_lag(r, "g") == 5
    assert g.lag_source == "exact"
    # The same with the count capped below the lag: the figure is flagged as not exact.
    (g,) = (await stream_stats(r, S, lag_count_cap=2)).groups
    assert g.lag_source == "estimated" and not g.lag_exact
    assert 0 <= g.lag <= 10


async def test_lag_exact_after_trim_past_the_group(r: aredis.Redis) -> None:
    await fill(r, 10)
    await r.xgroup_create(S, "g", id="0")
    await r.xreadgroup("g", "c", {S: ">"}, count=4)
    await r.xtrim(S, minid="7000-0", approximate=False)  # removes 5000..6000, never delivered to g
    (g,) = (await stream_stats(r, S)).groups
    assert g.lag == await true_lag(r, "g") == 4
    await r.xreadgroup("g", "c", {S: ">"}, count=1)
    (g,) = (await stream_stats(r, S)).groups
    # Redis 7.0 reports 5 here (it still counts the trimmed entries as owed); the stream holds 3.
    assert g.lag == await true_lag(r, "g") == 3
    assert g.lag_source == "exact"


async def test_lag_for_group_created_at_dollar_and_setid(r: aredis.Redis) -> None:
    await fill(r, 10)
    await r.xgroup_create(S, "g", id="$")
    await fill(r, 4, base_ms=20_000)
    (g,) = (await stream_stats(r, S)).groups
    assert g.lag == await true_lag(r, "g") == 4
    await r.xgroup_setid(S, "g", "5500-0")
    (g,) = (await stream_stats(r, S)).groups
    assert g.lag == await true_lag(r, "g") == 9


async def test_lag_counts_the_smaller_side_on_a_long_backlog(r: aredis.Redis) -> None:
    await fill(r, 12_000, step_ms=1)
    await r.xgroup_create(S, "g", id="0")
    await r.xreadgroup("g", "c", {S: ">"}, count=1_000)
    await r.xdel(S, "12500-0")  # make the server give up (nil)
    (g,) = (await stream_stats(r, S, lag_count_cap=2_000)).groups
    # 10,999 entries follow the position but only 1,000 precede it: counting those is within the cap.
    assert g.server_lag is None
    assert g.lag == await true_lag(r, "g") == 10_999
    assert g.lag_source == "exact"


async def test_empty_and_caught_up_groups_have_zero_lag(r: aredis.Redis) -> None:
    await r.xgroup_create(S, "empty", id="$", mkstream=True)
    (g,) = (await stream_stats(r, S)).groups
    assert g.lag == 0 and g.consumers == () and g.oldest_pending_id is None and g.idle_ms is None
    await fill(r, 3)
    await r.xreadgroup("empty", "c", {S: ">"})
    (g,) = (await stream_stats(r, S)).groups
    assert g.lag == 0 and g.pending == 3


async def test_count_entries_chunks_and_cap(r: aredis.Redis) -> None:
    await fill(r, 12_001, step_ms=1)
    assert await count_entries(r, S, "-", "+", 12_001) == (12_001, True, 12_001)
    n, complete, _ = await count_entries(r, S, "-", "+", 12_000)
    assert (n, complete) == (12_001, False)
    assert (await count_entries(r, S, "(1000-0", "1010-0", 100))[:2] == (10, True)


async def test_count_entries_without_scripting_permission(redis_url: str, r: aredis.Redis) -> None:
    await fill(r, 30)
    await r.acl_setuser(
        "noscript", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-@scripting"]
    )
    limited = aredis.Redis.from_url(redis_url, username="noscript", password="pw")
    try:
        assert await count_entries(limited, S, "(5000-0", "+", 100) == (25, True, 30)
        await r.xgroup_create(S, "g", id="3000-0")
        await r.xdel(S, "29000-0")
        (g,) = (await stream_stats(limited, S)).groups
        assert g.lag == await true_lag(r, "g") == 26
    finally:
        await limited.aclose()
        await r.acl_deluser("noscript")


# --- safe_trim_bound (pure) ------------------------------------------------------------------------------------


def group(
    name: str,
    last_delivered: str,
    oldest_pending: str | None = None,
    idle: tuple[int, ...] = (0,),
) -> GroupStats:
    return GroupStats(
        stream=S,
        name=name,
        consumers=tuple(ConsumerStats(f"c{i}", 0, ms) for i, ms in enumerate(idle)),
        pending=0 if oldest_pending is None else 1,
        last_delivered_id=last_delivered,
        entries_read=None,
        lag=0,
        lag_source="exact",
        server_lag=None,
        oldest_pending_id=oldest_pending,
    )


def test_id_helpers() -> None:
    assert parse_id("12-3") == (12, 3) and parse_id(b"12") == (12, 0)
    assert next_id("12-3") == "12-4"
    assert next_id(f"12-{2**64 - 1}") == "13-0"


def test_bound_is_policy_when_groups_are_ahead() -> None:
    b = safe_trim_bound("1000-0", [group("g", "5000-0")], idle_cap_ms=1000)
    assert b.minid == "1000-0" and not b.held_back and b.ignored == ()


def test_bound_stops_at_undelivered_and_pending_work() -> None:
    b = safe_trim_bound("9000-0", [group("a", "5000-0"), group("b", "7000-0", "3000-2")], idle_cap_ms=1000)
    assert b.minid == "3000-2"
    assert b.held_back_by == ("a", "b")
    assert b.group_bounds == {"a": "5000-1", "b": "3000-2"}
    b = safe_trim_bound("9000-0", [group("a", "5000-0")], idle_cap_ms=1000)
    assert b.minid == "5000-1"  # the delivered entry 5000-0 itself may go


def test_bound_ignores_groups_idle_past_the_cap() -> None:
    slow = group("slow", "2000-0", idle=(5000, 7000))
    b = safe_trim_bound("9000-0", [slow, group("live", "8000-0", idle=(5000, 10))], idle_cap_ms=1000)
    assert b.minid == "8000-1" and b.ignored == ("slow",) and b.held_back_by == ("live",)
    assert safe_trim_bound("9000-0", [slow], idle_cap_ms=None).minid == "2000-1"


def test_group_without_consumers_holds_back_until_watched_past_the_cap() -> None:
    orphan = group("orphan", "2000-0", idle=())
    assert safe_trim_bound("9000-0", [orphan], idle_cap_ms=1000).minid == "2000-1"
    b = safe_trim_bound("9000-0", [orphan], idle_cap_ms=1000, idle_overrides={"orphan": 1500})
    assert b.minid == "9000-0" and b.ignored == ("orphan",)


async def test_a_refused_time_is_a_clear_error_not_a_crash(r: aredis.Redis, redis_url: str) -> None:
    await r.xadd("s", {"payload": b"x"})
    await r.execute_command("ACL", "SETUSER", "notime", "reset", "on", ">pw", "~*", "+@all", "-time")
    limited = aredis.Redis.from_url(redis_url, username="notime", password="pw")
    try:
        with pytest.raises(HandoffError, match="TIME"):
            await stream_stats(limited, "s")
    finally:
        await limited.aclose()
        await r.execute_command("ACL", "DELUSER", "notime")
