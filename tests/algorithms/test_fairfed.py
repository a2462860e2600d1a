"""FairFed's gap (the paper's signed EOP / SPD for a two-group attribute, max − min beyond) and its
fold over the round's statistics (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from raysim.algorithms import params as algorithm_params
from raysim.algorithms.aggregation import AggregationError
from raysim.algorithms.fairfed import STATS_KEY, FairFed, FairFedParams, fairfed_weights, fairness_deltas, group_confusion, resolve_metric, signed_gaps
from raysim.config import ConfigError
from raysim.datasets import DATASETS
from raysim.engine.client_actor import ClientHost
from raysim.metrics.classification import predictions
from raysim.types import Update

from helpers import load_config, tiny_overrides


def counts(tp: int, fn: int, fp: int, tn: int) -> np.ndarray:
    """A binary confusion [label, prediction]."""
    return np.array([[tn, fp], [fn, tp]])


# A: TPR 5/10 (group 0) vs 9/10 (group 1), FPR 2/10 both: biased towards group 1, EOP −0.4, EOD 0.4.
# B: TPR 27/30 vs 9/30, FPR 6/30 both: biased towards group 0, EOP +0.6, EOD 0.6.
# Cohort: TPR 32/40 vs 18/40, FPR 8/40 both: biased towards group 0, EOP +0.35, EOD 0.35.
A = {0: counts(5, 5, 2, 8), 1: counts(9, 1, 2, 8)}
B = {0: counts(27, 3, 6, 24), 1: counts(9, 21, 6, 24)}


def test_a_client_biased_the_opposite_way_is_far_from_the_global_gap_when_signed() -> None:
    # unsigned: Δ_A = |0.35 − 0.4| = 0.05, Δ_B = |0.35 − 0.6| = 0.25: A looks closest to the cohort
    assert fairness_deltas([A, B], "eod") == pytest.approx([0.05, 0.25], abs=1e-12)
    # signed (the paper): Δ_A = |0.35 − (−0.4)| = 0.75, Δ_B = 0.25: A is the one biased the other way
    assert fairness_deltas([A, B], "eop", [0, 1]) == pytest.approx([0.75, 0.25], abs=1e-12)
    # SPD: P(ŷ=1) A 7/20 − 11/20 = −0.2, B 33/60 − 15/60 = 0.3, cohort 40/80 − 26/80 = 0.175
    assert fairness_deltas([A, B], "spd", [0, 1]) == pytest.approx([0.375, 0.125], abs=1e-12)
    assert fairness_deltas([A, B], "spd", [0, 1, 2]) == pytest.approx([abs(0.175 - 0.2), abs(0.175 - 0.3)], abs=1e-12)  # 3 groups: max − min
    # ω = (40, 120), N = 160, β = 0.1: eod moves A up (40 + 16·0.1 = 41.6), eop moves it down (40 − 16·0.25 = 36)
    assert fairfed_weights([40, 120], fairness_deltas([A, B], "eod"), beta=0.1, floor=1e-3) == pytest.approx([41.6, 118.4], rel=1e-12)
    assert fairfed_weights([40, 120], fairness_deltas([A, B], "eop", [0, 1]), beta=0.1, floor=1e-3) == pytest.approx([36.0, 124.0], rel=1e-12)


def update(cid: str, w: float, n: int) -> Update:
    return Update(cid, {"w": torch.tensor([w])}, n, {"loss": 0.0})


def stats(n: int, confusion: dict[int, np.ndarray]) -> dict[str, object]:
    """What `FairFed.client_statistics` returns for a client of `n` examples."""
    return {STATS_KEY: confusion, "num_examples": n}


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.0]))


def test_default_aggregation_on_two_groups_uses_the_signed_gap() -> None:
    algorithm = FairFed(FairFedParams(beta=0.1), SimpleNamespace())
    statistics = {"A": stats(40, A), "B": stats(120, B)}
    out = algorithm.aggregate(1, [update("A", 1.0, 40), update("B", 2.0, 120)], {**algorithm.init_state(One())}, statistics)
    assert out["fair_weights"] == pytest.approx({"A": 36.0, "B": 124.0}, rel=1e-12)  # unsigned EOD: A 41.6, B 118.4
    assert algorithm.params.metric == "auto"
    assert out["weights"]["w"].item() == pytest.approx((36.0 * 1.0 + 124.0 * 2.0) / 160, rel=1e-6)


def test_unknown_group_and_a_one_group_client_fall_back_as_before() -> None:
    # C holds group 0 only: its signed gap is undefined, Δ_C = |Acc_cohort − Acc_C|; group -1 counts only in accuracy
    c = {0: counts(4, 0, 0, 4), -1: counts(1, 1, 1, 1)}
    deltas = fairness_deltas([A, B, c], "eop", [0, 1])
    # correct: A 13 + 17 of 40, B 51 + 33 of 120, C 8 + 2 of 12
    assert deltas[2] == pytest.approx(abs((30 + 84 + 10) / 172 - 10 / 12), abs=1e-12)
    cohort = (5 + 27 + 4) / 44 - 18 / 40  # C's positives join group 0's TPR
    assert deltas[:2] == pytest.approx([abs(cohort + 0.4), abs(cohort - 0.6)], abs=1e-12)


def test_multiclass_signed_gap_is_a_per_class_vector() -> None:
    # 3 classes; group 0 recalls (1, 1/2, 0), group 1 (0, 1/2, 1): EOP per class (1, 0, -1)
    g0 = np.array([[2, 0, 0], [1, 1, 0], [0, 2, 0]])
    g1 = np.array([[0, 2, 0], [0, 1, 1], [0, 0, 2]])
    np.testing.assert_allclose(signed_gaps({0: g0, 1: g1}, "eop", (0, 1), [0, 1, 2]), [1.0, 0.0, -1.0])
    # a client with the groups swapped: gaps (−1, 0, 1); cohort sums to zero gaps: Δ = mean(1, 0, 1) for both
    assert fairness_deltas([{0: g0, 1: g1}, {0: g1, 1: g0}], "eop", [0, 1]) == pytest.approx([2 / 3, 2 / 3])
    # one-vs-rest mean of signed values would cancel to 0 for each; the vector does not
    assert not math.isclose(fairness_deltas([{0: g0, 1: g1}, {0: g0, 1: g0}], "eop", [0, 1])[1], 0.0)


def test_metric_resolves_by_the_number_of_groups() -> None:
    assert FairFedParams().metric == "auto"
    two, three = {0: "Female", 1: "Male"}, {0: "Asian", 1: "Black", 2: "White"}
    assert resolve_metric("auto", two) == "eop" and resolve_metric("auto", three) == "eod"
    assert resolve_metric("spd", two) == "spd" and resolve_metric("eod", two) == "eod"
    with pytest.raises(ConfigError, match=r"metric=eop .* race has 3 groups \(Asian, Black, White\): use metric=eod or spd"):
        resolve_metric("eop", three, "race")
    with pytest.raises(ValueError, match="metric must be one of auto, eop, spd, eod"):
        FairFedParams(metric="eopp")


@pytest.mark.parametrize(("attribute", "metric", "resolved"), [("gender", "auto", "eop"), ("race", "auto", "eod"), ("race", "eop", None)])
def test_the_data_sources_groups_decide_before_training(oph_root: Path, attribute: str, metric: str, resolved: str | None) -> None:
    cfg = load_config(None, tiny_overrides(oph_root, **{"algorithm.name": "fairfed", "algorithm.metric": metric, "data.attribute": attribute}))
    source = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0)
    algorithm = FairFed(algorithm_params(cfg), cfg)
    if resolved is None:
        with pytest.raises(ConfigError, match="data.attribute=race has 3 groups"):
            algorithm.adapt(One(), source)
        return
    algorithm.adapt(One(), source)
    assert algorithm.groups == tuple(sorted(source.group_names[attribute]))
    # the source's groups, not the cohort's: a round whose clients show one group still uses the resolved metric
    assert algorithm.gap_metric([{0: counts(1, 0, 0, 1)}]) == (resolved, list(algorithm.groups))


def test_a_sampled_client_whose_update_never_arrives_keeps_its_weight() -> None:
    # A, B and C are sampled and send statistics; C's update fails. The round's weights come from the
    # whole cohort; the arrived A and B are stored rescaled to the total they had (the sum of every known
    # weight stays), C keeps its old weight.
    c = {0: counts(4, 0, 0, 4), 1: counts(2, 2, 1, 3)}
    algorithm = FairFed(FairFedParams(beta=0.5), SimpleNamespace())
    state = {**algorithm.init_state(One()), "fair_weights": {"C": 70.0}}
    statistics = {"A": stats(40, A), "B": stats(120, B), "C": stats(60, c)}
    cohort = fairfed_weights([40.0, 120.0, 70.0], fairness_deltas([A, B, c], "eop", [0, 1]), beta=0.5, floor=1e-3)
    out = algorithm.aggregate(1, [update("A", 1.0, 40), update("B", 2.0, 120)], state, statistics)
    scale = 160.0 / (cohort[0] + cohort[1])
    assert out["fair_weights"] == pytest.approx({"A": cohort[0] * scale, "B": cohort[1] * scale, "C": 70.0}, rel=1e-12)
    assert sum(out["fair_weights"].values()) == pytest.approx(230.0, rel=1e-12)
    assert out["weights"]["w"].item() == pytest.approx((cohort[0] * 1.0 + cohort[1] * 2.0) / (cohort[0] + cohort[1]), rel=1e-6)
    # every update arrived: the weights are stored exactly as they were aggregated with
    full = algorithm.aggregate(1, [update("A", 1.0, 40), update("B", 2.0, 120), update("C", 0.0, 60)], state, statistics)
    assert full["fair_weights"] == dict(zip("ABC", cohort))


def test_an_update_without_statistics_is_an_error_naming_the_client() -> None:
    algorithm = FairFed(FairFedParams(), SimpleNamespace())
    state = algorithm.init_state(One())
    with pytest.raises(AggregationError, match="client B: .*without round statistics"):
        algorithm.aggregate(1, [update("A", 1.0, 40), update("B", 2.0, 120)], state, {"A": stats(40, A)})
    with pytest.raises(AggregationError, match="statistics=\\{client id"):
        algorithm.aggregate(1, [update("A", 1.0, 40)], state)
    # no update at all (every sampled client failed): the fold says so, whatever the statistics
    with pytest.raises(AggregationError, match="no client updates"):
        algorithm.aggregate(1, [], state, {"A": stats(40, A)})


def test_client_statistics_is_the_received_models_confusion_on_the_train_split(oph_root: Path) -> None:
    cfg = load_config(None, tiny_overrides(oph_root, **{"algorithm.name": "fairfed", "resources.clients_per_actor": 2}))
    source = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0)
    host = ClientHost(cfg, source.client_specs()[:1])
    (cid, client), algorithm = next(iter(host.clients.items())), host.algorithm
    state = algorithm.init_state(client.model)
    payload = algorithm.payload(state, 1)
    got = algorithm.client_statistics(client, payload, 1)
    seen = client.predict("train", client.load(payload))
    expected = group_confusion(seen.labels, predictions(seen.scores), seen.attributes[client.attribute], 2)
    assert got["num_examples"] == client.num_train and got[STATS_KEY].keys() == expected.keys()
    assert all(np.array_equal(got[STATS_KEY][g], m) for g, m in expected.items())
    assert STATS_KEY not in host.fit(cid, payload, 1).extra  # measured once, in the statistics pass
