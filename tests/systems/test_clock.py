"""The simulated clock (raysim.systems): round times on a hand-computed case, deadlines and
over-selection, availability that depends only on seed and round, correlation with a group's
share, and the asynchronous schedule. Plain Python: no Ray, no training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from raysim.algorithms import build as build_algorithm
from raysim.config import ConfigError
from raysim.datasets import ClientSpec
from raysim.datasets.base import SampleTable
from raysim.systems import AsyncClock, SyncClock, simulated_clock
from raysim.systems.availability import Markov
from raysim.systems.clock import LATE, OFFLINE, SURPLUS, local_steps

from helpers import load_config

GROUPS = {"race": {0: "Asian", 1: "Black", 2: "White"}}


def spec(cid: str, n: int, black: int = 0) -> ClientSpec:
    """A client of `n` training patients, `black` of them in group Black (1), the rest White (2)."""
    codes = np.array([1] * black + [2] * (n - black), dtype=np.int64)
    table = SampleTable(np.array([f"{cid}-{i}" for i in range(n)]), np.zeros(n, dtype=np.int64), {"race": codes})
    return ClientSpec(cid, {"train": table, "val": table, "test": table})


def config(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(None, ["data.name=synthetic", "system.simulate=true", *overrides])


def sync_clock(specs: list[ClientSpec], *overrides: str) -> SyncClock:
    cfg = config(*overrides)
    clock = simulated_clock(cfg, specs, GROUPS, build_algorithm(cfg))
    assert isinstance(clock, SyncClock)
    return clock


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_local_steps_count_the_batches_a_client_trains_on() -> None:
    assert local_steps(32, 16, 1) == 2
    assert local_steps(33, 16, 2) == 4  # a last batch of one sample is skipped (BatchNorm)
    assert local_steps(34, 16, 1) == 3
    assert local_steps(1, 16, 1) == 1  # unless it is the whole split
    assert local_steps(0, 16, 3) == 0


def test_a_round_time_is_compute_plus_download_plus_upload(tmp_path: Path) -> None:
    profiles = write(tmp_path / "p.csv", "client,speed,up_mbps,down_mbps\na,2,8,16\nb,0.5,4,80\n")
    clock = sync_clock([spec("a", 64), spec("b", 40)], "federation.batch_size=16", "federation.local_epochs=2", "system.step_seconds=3", f"system.profiles={profiles}")
    down, up = 2_000_000, 1_000_000  # bytes
    # a: 8 steps × 3 s / 2 + 16 Mb / 16 Mb/s + 8 Mb / 8 Mb/s; b: 6 steps × 3 s / 0.5 + 16 / 80 + 8 / 4
    assert clock.duration("a", down, up) == pytest.approx(12 + 1 + 1)
    assert clock.duration("b", down, up) == pytest.approx(36 + 0.2 + 2)
    plan = clock.plan(100.0, ["a", "b"], ["a", "b"], 2, down, up)
    assert plan.trained == ["a", "b"] and plan.dropped == {}
    assert plan.end == pytest.approx(100 + 38.2)  # a synchronous round waits for its slowest client


def test_late_clients_are_dropped_untrained_and_over_selection_keeps_the_first_to_finish(tmp_path: Path) -> None:
    profiles = write(tmp_path / "p.csv", "client,speed\na,1\nb,2\nc,4\nd,0.25\n")
    specs = [spec(c, 32) for c in "abcd"]  # 2 steps each at batch 16: 2 / speed seconds (step_seconds 1), no bytes
    clock = sync_clock(specs, "federation.batch_size=16", "system.step_seconds=1", f"system.profiles={profiles}", "system.round_deadline_s=3", "system.over_select=0.5")
    assert clock.target(2) == 3
    plan = clock.plan(0.0, list("abcd"), ["a", "b", "d"], 2, 0, 0)  # finish: a 2 s, b 1 s, d 8 s (late)
    assert plan.trained == ["a", "b"] and plan.dropped == {"d": LATE}
    assert plan.end == 3.0  # the server waited until the deadline for d
    plan = clock.plan(0.0, list("abcd"), ["a", "b", "c"], 2, 0, 0)  # c 0.5 s, b 1 s first: a is surplus
    assert plan.trained == ["b", "c"] and plan.dropped == {"a": SURPLUS} and plan.end == 1.0


def test_equal_finish_times_are_broken_by_client_id() -> None:
    clock = sync_clock([spec(c, 32) for c in "zyx"], "system.over_select=1.0")
    plan = clock.plan(0.0, list("xyz"), ["x", "y", "z"], 2, 0, 0)
    assert plan.trained == ["x", "y"] and plan.dropped == {"z": SURPLUS}


def test_an_empty_round_lasts_the_deadline_or_empty_round_s() -> None:
    assert sync_clock([spec("a", 8)], "system.empty_round_s=7").plan(5.0, [], [], 1, 0, 0).end == 12.0
    assert sync_clock([spec("a", 8)], "system.round_deadline_s=30").plan(5.0, [], [], 1, 0, 0).end == 35.0


def test_availability_draws_depend_only_on_seed_and_round() -> None:
    specs = [spec(f"s{i}", 10) for i in range(6)]
    for model in ("bernoulli", "markov", "window"):
        clock = sync_clock(specs, f"system.availability={model}", "system.p_offline=0.4", "system.period_s=100")
        alone = sync_clock(specs[:2], f"system.availability={model}", "system.p_offline=0.4", "system.period_s=100")
        seen = [tuple(clock.available(r, 37.0 * r, [s.id for s in specs])) for r in range(1, 30)]
        assert seen == [tuple(clock.available(r, 37.0 * r, [s.id for s in specs])) for r in range(1, 30)], model
        # another client's presence changes nothing about s0 and s1
        assert [tuple(c for c in s if c in ("s0", "s1")) for s in seen] == [tuple(alone.available(r, 37.0 * r, ["s0", "s1"])) for r in range(1, 30)], model
        assert 0 < sum(map(len, seen)) < 6 * 29, model  # some offline, some online
        other = sync_clock(specs, "seed=1", f"system.availability={model}", "system.p_offline=0.4", "system.period_s=100")
        assert seen != [tuple(other.available(r, 37.0 * r, [s.id for s in specs])) for r in range(1, 30)], model


def test_the_markov_chain_is_offline_its_share_of_rounds_in_spells_of_the_mean_length() -> None:
    clock = sync_clock([spec("a", 10)], "system.availability=markov", "system.p_offline=0.3", "system.mean_offline_rounds=4")
    model = clock.availability
    assert isinstance(model, Markov)
    online = np.array([model.online(r, 0.0, "a") for r in range(1, 20_001)])
    assert abs((~online).mean() - 0.3) < 0.02
    starts = np.flatnonzero(~online[1:] & online[:-1])  # online -> offline
    assert abs((~online).sum() / len(starts) - 4) < 0.3  # mean spell length
    fresh = sync_clock([spec("a", 10)], "system.availability=markov", "system.p_offline=0.3", "system.mean_offline_rounds=4").availability
    assert fresh.online(777, 0.0, "a") == online[776]  # a resumed run recomputes the same state


def test_a_window_is_offline_its_share_of_every_period_and_ends_spells() -> None:
    clock = sync_clock([spec("a", 10)], "system.availability=window", "system.p_offline=0.25", "system.period_s=100")
    times = np.arange(0, 1000, 0.5)
    online = np.array([clock.availability.online(1, t, "a") for t in times])
    assert abs((~online).mean() - 0.25) < 0.01
    t = float(times[np.argmax(online)])
    until = clock.availability.online_until(t, "a")
    assert clock.availability.online(1, until - 0.01, "a") and not clock.availability.online(1, until + 0.01, "a")


def test_a_trace_gives_online_intervals_and_a_client_that_leaves_mid_round_loses_its_update(tmp_path: Path) -> None:
    trace = write(tmp_path / "t.csv", "client,start,end\na,0,100\nb,0,5\nb,50,200\n")
    clock = sync_clock([spec("a", 32), spec("b", 32)], "federation.batch_size=16", "system.step_seconds=5", "system.availability=trace", f"system.availability_trace={trace}")
    assert clock.available(1, 0.0, ["a", "b"]) == ["a", "b"]
    assert clock.available(1, 20.0, ["a", "b"]) == ["a"]
    assert clock.available(1, 150.0, ["a", "b"]) == ["b"]
    plan = clock.plan(0.0, ["a", "b"], ["a", "b"], 2, 0, 0)  # each needs 10 s; b goes offline at 5
    assert plan.trained == ["a"] and plan.dropped == {"b": OFFLINE}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("client,start\na,0\n", "missing column(s) end"),
        ("client,start,end\na,0,10\n", "no interval for client(s) b"),
        ("client,start,end\na,0,10\nb,5,1\nzz,0,1\n", "unknown client(s) zz"),
        ("client,start,end\na,0,x\nb,0,1\n", "start and end must be finite numbers >= 0"),
        ("client,start,end\na,0,10\nb,5,1\n", "ending (1) before it starts (5)"),
    ],
)
def test_a_bad_trace_is_one_line_naming_the_file(tmp_path: Path, text: str, needle: str) -> None:
    trace = write(tmp_path / "t.csv", text)
    with pytest.raises(ConfigError, match="system.availability_trace=") as err:
        sync_clock([spec("a", 8), spec("b", 8)], "system.availability=trace", f"system.availability_trace={trace}")
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("client,speed\na,0\n", "client a speed must be a positive number"),
        ("client,speed,colour\na,1\n", "expected columns client and any of speed, up_mbps, down_mbps"),
        ("client,speed\nq,1\n", "unknown client(s) q"),
    ],
)
def test_bad_profiles_are_one_line(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path / "p.csv", text)
    with pytest.raises(ConfigError, match="system.profiles=") as err:
        sync_clock([spec("a", 8)], f"system.profiles={path}")
    assert needle in str(err.value)


def test_availability_follows_a_groups_share_as_configured() -> None:
    specs = [spec("a", 100, black=0), spec("b", 100, black=50), spec("c", 100, black=100)]
    clock = sync_clock(specs, "system.availability=bernoulli", "system.p_offline=0.3", "system.correlate=race=Black", "system.offline_ratio=2")
    p = {cid: clock.profiles[cid].p_offline for cid in "abc"}
    assert p["c"] == pytest.approx(2 * p["a"])  # the site with most Black patients is offline twice as often
    assert np.mean(list(p.values())) == pytest.approx(0.3)  # the mean offline share is kept
    assert p["a"] < p["b"] < p["c"]
    slow = sync_clock(specs, "system.correlate=race=black", "system.slowdown_ratio=4")  # group names match case-insensitively
    assert slow.profiles["a"].speed == pytest.approx(4 * slow.profiles["c"].speed)
    assert math.prod(slow.profiles[c].speed for c in "abc") == pytest.approx(1.0)  # the geometric mean kept
    by_size = sync_clock([spec("a", 10), spec("b", 40)], "system.correlate=size", "system.slowdown_ratio=2")
    assert by_size.profiles["b"].speed == pytest.approx(by_size.profiles["a"].speed / 2)


@pytest.mark.parametrize(
    ("correlate", "needle"),
    [("ethnicity=Hispanic", "has no attribute 'ethnicity'; its attributes: race"), ("race=Martian", r"race has no group 'Martian'; its groups: Asian \(0\), Black \(1\), White \(2\)")],
)
def test_an_unknown_correlation_is_one_line(correlate: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        sync_clock([spec("a", 8)], f"system.correlate={correlate}", "system.offline_ratio=2")


def async_clock(specs: list[ClientSpec], *overrides: str) -> AsyncClock:
    cfg = config("algorithm.name=fedbuff", *overrides)
    clock = simulated_clock(cfg, specs, GROUPS, build_algorithm(cfg))
    assert isinstance(clock, AsyncClock)
    return clock


def test_fedbuff_with_refill_at_the_step_is_fedavgs_schedule() -> None:
    specs = [spec(c, 16 * (i + 1)) for i, c in enumerate("abcde")]
    clock = async_clock(specs, "federation.clients_per_round=3", "algorithm.buffer_size=3", "algorithm.refill=step")
    fedavg = build_algorithm(config())
    state: dict = {"time": 0.0, "in_flight": []}
    for round_ in range(1, 6):
        arrived, lost, state = clock.step(round_, state, list("abcde"), 0, 0)
        assert sorted(a.client_id for a in arrived) == fedavg.sample_clients(round_, list("abcde"), 3, {})
        assert not lost and state["in_flight"] == [] and all(a.staleness == 0 for a in arrived)
        assert [a.finish for a in arrived] == sorted(a.finish for a in arrived)  # in arrival order


def test_fedbuff_refills_on_arrival_and_counts_staleness() -> None:
    # a trains 1 step, b 4 (step_seconds 1), two at once, one update per step: a comes back every second
    clock = async_clock([spec("a", 16), spec("b", 64)], "federation.batch_size=16", "system.step_seconds=1", "system.concurrency=2", "algorithm.buffer_size=1")
    state: dict = {"time": 0.0, "in_flight": []}
    seen = []
    for round_ in range(1, 6):
        arrived, _, state = clock.step(round_, state, ["a", "b"], 0, 0)
        seen.append((arrived[0].client_id, arrived[0].finish, arrived[0].base_version, arrived[0].staleness))
    # a ties with b at 4 s and goes first (client id); b's update, trained on version 0, arrives after four steps
    assert seen == [("a", 1.0, 0, 0), ("a", 2.0, 1, 0), ("a", 3.0, 2, 0), ("a", 4.0, 3, 0), ("b", 4.0, 0, 4)]
    assert state["time"] == 4.0 and state["in_flight"] == [[5.0, "a", 4, 4.0]]


def test_a_step_starts_clients_on_the_servers_version_when_an_empty_round_left_it_behind() -> None:
    clock = async_clock([spec("a", 16), spec("b", 16)], "federation.batch_size=16", "system.concurrency=2", "algorithm.buffer_size=2")
    arrived, _, _ = clock.step(5, {"time": 0.0, "in_flight": []}, ["a", "b"], 0, 0, version=3)
    assert [(a.base_version, a.staleness) for a in arrived] == [(3, 0), (3, 0)]  # not round 5 - 1 = 4, which the server never made


@pytest.mark.parametrize("override", ["system.availability=bernoulli", "system.over_select=0.5"])
def test_afl_refuses_a_clock_that_changes_its_cohort(override: str) -> None:
    extra = ["system.p_offline=0.2"] if "bernoulli" in override else []
    with pytest.raises(ConfigError, match="algorithm afl draws its cohort from λ over every client"):
        build_algorithm(config("algorithm.name=afl", override, *extra))
    build_algorithm(config("algorithm.name=afl", "system.round_deadline_s=10"))  # a deadline is fine
