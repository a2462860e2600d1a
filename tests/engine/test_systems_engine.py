"""Simulated systems through the engine (Ray actors): FedBuff equals FedAvg where it should,
asynchronous runs are bit-identical across actor counts, correlated availability lowers the
chosen group's participation, the clock changes no number when it changes nothing, and a
simulated run resumes to the uninterrupted result."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from test_methods_engine import TINY_SETTINGS

from helpers import BUILT_IN, make_driver, make_host

FEDAVG_AS_FEDBUFF = {"algorithm.name": "fedbuff", "system.simulate": True, "algorithm.buffer_size": 3, "algorithm.refill": "step", "algorithm.server_lr": 1.0, "algorithm.weighting": "examples", "algorithm.staleness": "none"}
QUIET = {"eval.every": 100, "resources.clients_per_actor": 3}  # evaluate the last round only, one actor


def weights_per_round(root: Path, run_dir: Path, rounds: int, **extra: object) -> list[dict[str, torch.Tensor]]:
    driver = make_driver(root, run_dir, **{**QUIET, "federation.rounds": rounds, **extra})
    out = []
    try:
        driver.start()
        for round_ in range(1, rounds + 1):
            driver.step(round_)
            out.append({k: v.clone() for k, v in driver.state["weights"].items()})
    finally:
        driver.shutdown()
    return out


def test_fedbuff_with_the_whole_cohort_buffered_is_fedavg_every_round(ray_session, oph_root: Path, tmp_path: Path) -> None:
    fedavg = weights_per_round(oph_root, tmp_path / "fedavg", 3)
    fedbuff = weights_per_round(oph_root, tmp_path / "fedbuff", 3, **FEDAVG_AS_FEDBUFF, **{"system.speed_spread": 0.8})
    for round_, (a, b) in enumerate(zip(fedavg, fedbuff), start=1):
        assert a.keys() == b.keys()
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        assert worst <= 1e-6, f"round {round_}: max |FedAvg - FedBuff| = {worst:g}"
    moved = max(float((fedavg[-1][k].double() - fedavg[0][k].double()).abs().max()) for k in fedavg[0])
    assert moved > 1e-3  # the rounds trained: the agreement is not of two untouched models


def metrics(root: Path, run_dir: Path, **extra: object) -> pd.DataFrame:
    make_driver(root, run_dir, **extra).run()
    return pd.read_parquet(run_dir / "metrics.parquet").sort_values(["round", "split", "client", "attribute", "group", "metric"]).reset_index(drop=True)


def test_fedbuff_is_bit_identical_across_actor_counts(ray_session, oph_root: Path, tmp_path: Path) -> None:
    settings = {"algorithm.name": "fedbuff", "system.simulate": True, "algorithm.buffer_size": 2, "system.speed_spread": 0.8, "federation.rounds": 3, "eval.every": 3}
    one = metrics(oph_root, tmp_path / "one", **settings, **{"resources.clients_per_actor": 3})
    three = metrics(oph_root, tmp_path / "three", **settings, **{"resources.clients_per_actor": 1})
    pd.testing.assert_frame_equal(one, three, check_exact=True)
    stale = one[one["metric"] == "staleness"]["value"]
    assert (stale > 0).any()  # some update arrived stale: the asynchronous path ran


def test_correlated_availability_lowers_the_chosen_groups_participation(ray_session, oph_root: Path, tmp_path: Path) -> None:
    base = {**QUIET, "system.simulate": True, "system.availability": "bernoulli", "system.p_offline": 0.4, "federation.rounds": 6}
    uniform = metrics(oph_root, tmp_path / "uniform", **base)
    correlated = metrics(oph_root, tmp_path / "correlated", **base, **{"system.correlate": "race=Black", "system.offline_ratio": 20.0})

    def cumulative(frame: pd.DataFrame, group: str) -> float:
        rows = frame[(frame["metric"] == "participation_rate_cum") & (frame["attribute"] == "race") & (frame["group"] == group)]
        return float(rows[rows["round"] == rows["round"].max()]["value"].iloc[0])

    assert cumulative(correlated, "Black") < cumulative(uniform, "Black")
    assert cumulative(correlated, "Black") < cumulative(correlated, "White")
    per_round = correlated[(correlated["metric"] == "participation_rate") & (correlated["group"] == "Black")]
    assert len(per_round) == 6 and per_round["value"].between(0, 1).all()
    # the report's "Who was served" and the comparison against simulated time read these rows
    from raysim.reports import compare, compare_plots, run_report

    page = run_report.write_report(tmp_path / "correlated").read_text()
    assert 'id="served"' in page and "participation" in page and "time to target" in page
    comp = compare.compare([tmp_path / "uniform", tmp_path / "correlated"], by=("system.correlate", "system.offline_ratio"))
    assert len(compare.simulated_curves(comp)) == 2  # one evaluated round (the last) per run
    html = compare_plots.write(comp, tmp_path / "cmp")[-1].read_text()
    assert 'id="simulated_time"' in html


def test_an_always_available_clock_without_deadlines_changes_no_number(ray_session, oph_root: Path, tmp_path: Path) -> None:
    plain = metrics(oph_root, tmp_path / "plain", **QUIET, **{"federation.rounds": 2})
    clocked = metrics(oph_root, tmp_path / "clocked", **QUIET, **{"federation.rounds": 2, "system.simulate": True})
    new = clocked["metric"].isin(["sim_time", "sim_round_s", "sim_available", "sim_dropped", "sim_empty", "participated", "participation_rate", "participation_rate_cum"])
    pd.testing.assert_frame_equal(plain, clocked[~new].reset_index(drop=True), check_exact=True)
    times = clocked[clocked["metric"] == "sim_time"].set_index("round")["value"]
    assert times.is_monotonic_increasing and times.iloc[0] > 0


def test_a_simulated_run_resumes_to_the_uninterrupted_result(ray_session, oph_root: Path, tmp_path: Path) -> None:
    settings = {**QUIET, "federation.rounds": 3, "system.simulate": True, "system.availability": "markov", "system.p_offline": 0.3, "system.speed_spread": 0.8, "system.round_deadline_s": 20.0}
    whole = metrics(oph_root, tmp_path / "whole", **settings)
    make_driver(oph_root, tmp_path / "parts", **settings).run(until=2)
    make_driver(oph_root, tmp_path / "parts", **settings).run(resume=True)
    parts = pd.read_parquet(tmp_path / "parts" / "metrics.parquet").sort_values(["round", "split", "client", "attribute", "group", "metric"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(whole, parts, check_exact=True)
    assert whole[whole["metric"] == "sim_time"]["value"].is_monotonic_increasing


def test_rounds_the_simulation_leaves_empty_are_recorded_and_are_no_failures(ray_session, oph_root: Path, tmp_path: Path) -> None:
    # every site offline in most rounds: many empty rounds in a row, and fault.max_empty_rounds=1 does not stop the run
    settings = {**QUIET, "federation.rounds": 6, "fault.max_empty_rounds": 1, "system.simulate": True, "system.availability": "bernoulli", "system.p_offline": 0.9, "system.empty_round_s": 30.0}
    frame = metrics(oph_root, tmp_path / "empty", **settings)
    empty = frame[frame["metric"] == "sim_empty"].set_index("round")["value"]
    assert len(empty) == 6 and empty.sum() >= 2
    round_s = frame[frame["metric"] == "sim_round_s"].set_index("round")["value"]
    assert (round_s[empty == 1] - 30.0).abs().max() < 1e-9  # an empty round lasts system.empty_round_s
    assert (frame[frame["metric"] == "participated"].groupby("round")["value"].sum()[empty == 1] == 0).all()


# pFL-ResFIM's packed masks depend on the Fisher scores a client computes while training.
MASKS_NOT_ESTIMATED = {"pfl_resfim"}


@pytest.mark.parametrize("name", BUILT_IN)
def test_update_bytes_known_before_training_are_the_bytes_the_update_carries(name: str, oph_root: Path) -> None:
    """The clock's upload time uses `Algorithm.update_bytes` before a client trains: it must be
    what the client's update then carries (PFA / DET sized last round's amplitude boxes, 8 bytes
    for 0.7 MB). Rounds 1 and 2 (PFA's box grows), in-process, no Ray."""
    host = make_host(oph_root, name, **TINY_SETTINGS.get(name, {}), **{"federation.rounds": 3})
    state = host.algorithm.init_state(host.clients["site1"].model)
    state = host.algorithm.setup_state(state, {cid: host.setup(cid) for cid in host.clients})
    for round_ in (1, 2):
        payload = dict(host.algorithm.payload(state, round_))
        host.set_payload(payload, host.algorithm.round_values(state, round_))
        expected = host.algorithm.update_bytes(payload, round_)
        updates = [host.fit(cid, payload, round_) for cid in host.clients]
        for update in updates:
            if name in MASKS_NOT_ESTIMATED:  # at most one bit per float32 more: 1/32, a byte per key rounding
                assert expected <= update.nbytes <= expected * 33 / 32 + len(update.tensors), (name, round_, update.nbytes, expected)
            else:
                assert update.nbytes == expected, (name, round_, update.nbytes, expected)
        statistics = {cid: host.statistics(cid, payload, round_) for cid in host.clients} if host.algorithm.round_statistics else {}
        if not host.algorithm.asynchronous:  # FedBuff / FedAsync fold versions the clock tracks: round 2 from round 1's state
            state = host.algorithm.aggregate(round_, updates, state, statistics)
