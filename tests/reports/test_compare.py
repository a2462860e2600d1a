"""raysim.compare: pooling over seeds, the protocol and fingerprint refusals, labels, the Pareto
front, the per-client view, the outputs and their plots, study reports, and the benchmark's
table being compare's (2 methods x 2 seeds, real runs)."""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raysim.compare import main
from raysim.reports import compare, compare_plots
from raysim.reports import study as study_report
from raysim.reports.compare import CompareError, pareto_front, pooled

from helpers import CLIENTS, COLUMNS, GROUPS, make_run, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]




@pytest.fixture
def four_runs(tmp_path: Path) -> Path:
    """fedavg and fedprox+mu=0.1, seeds 0 and 1; the selected round is the best validation round (not the last)."""
    runs = tmp_path / "runs"
    make_run(runs / "fedavg-s0", {"name": "fedavg"}, 0, {1: 0.7, 2: 0.8}, {1: 0.70, 2: 0.80})
    make_run(runs / "fedavg-s1", {"name": "fedavg"}, 1, {1: 0.9, 2: 0.8}, {1: 0.90, 2: 0.60})  # round 1 selected
    make_run(runs / "fedprox+mu=0.1-s0", {"name": "fedprox", "mu": 0.1}, 0, {1: 0.7, 2: 0.7}, {1: 0.75, 2: 0.95}, clients={"site1": 0.6, "site2": 0.8, "site3": 0.9})  # tie: round 1
    make_run(runs / "fedprox+mu=0.1-s1", {"name": "fedprox", "mu": 0.1}, 1, {1: 0.6, 2: 0.7}, {1: 0.50, 2: 0.85}, clients={"site1": 0.7, "site2": 0.8, "site3": 0.7})
    return runs


# --- pooling --------------------------------------------------------------------------------


def test_pooling_mean_sample_std_and_t_interval() -> None:
    from scipy import stats

    s = pooled([0.8, 0.9, 0.7])
    assert s.mean == pytest.approx(0.8) and s.std == pytest.approx(0.1) and s.n == 3  # ddof=1: sqrt(0.02 / 2)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2 dof)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3))
    assert (s.ci_lo, s.ci_hi) == pytest.approx((0.8 - half, 0.8 + half))
    nan_safe = pooled([0.8, math.nan, 0.9])
    assert nan_safe.n == 2 and nan_safe.mean == pytest.approx(0.85) and nan_safe.std == pytest.approx(math.sqrt(0.005))
    one = pooled([0.5])
    assert one.mean == 0.5 and one.n == 1 and math.isnan(one.std) and math.isnan(one.ci_lo)
    assert pooled([]).n == 0 and compare.pct_cell(pd.Series([0.5])) == "50.0" and compare.pct_cell(pd.Series([0.5, math.nan, 0.7])) == "60.0 ± 14.1 (n=2)"


def test_table_pools_seeds_at_the_selected_round(four_runs: Path) -> None:
    comp = compare.compare([four_runs])
    assert comp.labels == ["fedavg", "fedprox+mu=0.1"] and comp.baseline == "fedavg" and comp.groups == list(GROUPS)
    assert comp.per_run["round"].tolist() == [2, 1, 1, 2]  # best validation, earliest on a tie
    text = comp.markdown()
    lines = text.splitlines()
    assert lines[0] == "| method | n | AUC | AUC 95 % CI | ES-AUC | ES-AUC 95 % CI | AUC Asian | AUC Black | AUC White | EOD | SPD | MB up / client / round | round |"
    half = 100 * 12.706204736174705 * math.sqrt(0.005) / math.sqrt(2)  # t(0.975, 1 dof) * s / sqrt(n)
    assert (
        lines[2]
        == f"| fedavg | 2 | 85.0 ± 7.1 | [{85 - half:.1f}, {85 + half:.1f}] | 75.0 ± 7.1 | [{75 - half:.1f}, {75 + half:.1f}] | 80.0 ± 7.1 | 75.0 ± 7.1 | 90.0 ± 7.1 | 20.0 ± 0.0 | 10.0 ± 0.0 | 1.333 | 2/1 |"
    )
    assert lines[3].startswith("| fedprox+mu=0.1 | 2 | 80.0 ± 7.1 |") and lines[3].endswith("| 1/2 |")
    assert "sample std (ddof = 1)" in text and "Student-t" in text and "ε" not in lines[0]
    pooled_csv = comp.pooled()
    assert pooled_csv.loc[0, "auc_mean"] == pytest.approx(0.85) and pooled_csv.loc[0, "auc_n"] == 2 and pooled_csv.loc[0, "algorithm"] == "fedavg"
    # the baseline row comes first, whatever the input order
    assert compare.compare([four_runs], baseline="fedprox+mu=0.1").labels == ["fedprox+mu=0.1", "fedavg"]


def test_by_labels(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs / "a", {"name": "fairlora", "ema": 0, "own_weight": 1.0}, 0, {1: 0.7}, {1: 0.7}, config={"federation.local_epochs": 1})
    make_run(runs / "b", {"name": "fairlora", "ema": 0, "own_weight": 1.0}, 0, {1: 0.7}, {1: 0.7}, config={"federation.local_epochs": 5})
    with pytest.raises(CompareError, match=r"^cannot pool runs: federation\.local_epochs is 1 in a but 5 in b$"):
        compare.compare([runs])
    comp = compare.compare([runs], by=["algorithm", "federation.local_epochs"])
    assert comp.per_run["algorithm"].tolist() == ["fairlora+ema=0+own_weight=1.0"] * 2 and comp.labels == ["fairlora+ema=0+own_weight=1.0, 1", "fairlora+ema=0+own_weight=1.0, 5"]
    assert comp.markdown().startswith("| method | federation.local_epochs | n | AUC |")
    assert compare.compare([runs], by=["algorithm.name", "federation.local_epochs"]).per_run["algorithm.name"].tolist() == ["fairlora", "fairlora"]
    with pytest.raises(CompareError, match="--by federation.epochs: no such config key in a"):
        compare.compare([runs], by=["federation.epochs"])


# --- refusals -------------------------------------------------------------------------------


def test_protocol_refusal_names_the_key(four_runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = four_runs.parent / "other"
    make_run(other / "fedavg-s2", {"name": "fedavg"}, 2, {1: 0.7, 2: 0.7, 3: 0.7}, {1: 0.7, 2: 0.7, 3: 0.7})
    with pytest.raises(CompareError) as err:
        compare.compare([four_runs / "fedavg-s0", other / "fedavg-s2"])
    assert str(err.value) == "cannot pool runs: federation.rounds is 2 in runs/fedavg-s0 but 3 in other/fedavg-s2"
    assert main([str(four_runs), str(other)]) == 2
    out, stderr = capsys.readouterr()
    assert out == "" and stderr.count("\n") == 1 and "federation.rounds is 2 in runs/fedavg-s0 but 3 in other/fedavg-s2" in stderr
    # seed, resources.*, eval.predictions, report.* and (with fingerprints) data.root may differ
    free = four_runs.parent / "free"
    make_run(
        free / "fedavg-s5", {"name": "fedavg"}, 5, {1: 0.7, 2: 0.7}, {1: 0.7, 2: 0.7}, config={"resources.num_cpus": 4, "eval.predictions": "none", "report.html": True, "data.root": "/elsewhere"}
    )
    assert len(compare.compare([four_runs, free]).per_run) == 5
    make_run(free / "fedavg-s6", {"name": "fedavg"}, 6, {1: 0.7, 2: 0.7}, {1: 0.7, 2: 0.7}, config={"eval.every": 2})
    with pytest.raises(CompareError, match=r"eval\.every is 1 in .* but 2 in .*fedavg-s6"):
        compare.compare([four_runs, free])


def test_a_key_added_after_a_run_pools_at_the_value_that_run_used(four_runs: Path) -> None:
    """model.prompt and the system section came after these runs' config.yaml: a run that
    writes them at their defaults pools with them; one that changes them does not."""
    newer = four_runs.parent / "newer"
    make_run(newer / "fedavg-s2", {"name": "fedavg"}, 2, {1: 0.7, 2: 0.7}, {1: 0.7, 2: 0.7}, config={"model.prompt": "a photo of {}.", "system.simulate": False, "system.availability": "always"})
    assert len(compare.compare([four_runs / "fedavg-s0", newer]).per_run) == 2
    make_run(newer / "fedavg-s3", {"name": "fedavg"}, 3, {1: 0.7, 2: 0.7}, {1: 0.7, 2: 0.7}, config={"system.simulate": True})
    with pytest.raises(CompareError, match=r"system\.simulate is false in runs/fedavg-s0 but true in newer/fedavg-s3"):
        compare.compare([four_runs / "fedavg-s0", newer / "fedavg-s3"])


def test_fingerprint_refusal(four_runs: Path) -> None:
    other = four_runs.parent / "other"
    make_run(other / "fedavg-s2", {"name": "fedavg"}, 2, {1: 0.7, 2: 0.7}, {1: 0.7, 2: 0.7}, data={"root": "/another/cache"})
    assert len(compare.compare([four_runs, other]).per_run) == 5  # where the data lay is not what it is
    make_run(other / "fedavg-s3", {"name": "fedavg"}, 3, {1: 0.7, 2: 0.7}, {1: 0.7, 2: 0.7}, data={"csv_sha256": "def"})
    with pytest.raises(CompareError, match=r"^cannot pool runs: data fingerprint csv_sha256 is abc in runs/fedavg-s0 but def in other/fedavg-s3$"):
        compare.compare([four_runs, other])


def test_same_seed_twice_is_refused(four_runs: Path) -> None:
    copy = four_runs.parent / "copy"
    make_run(copy / "fedavg-s0", {"name": "fedavg"}, 0, {1: 0.7, 2: 0.7}, {1: 0.7, 2: 0.7})
    with pytest.raises(CompareError, match="both seed 0 of fedavg"):
        compare.compare([four_runs, copy])


@pytest.mark.parametrize("make", ["missing", "empty", "not_a_run_dir"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str) -> None:
    target = tmp_path / "x"
    if make == "empty":
        target.mkdir()
    elif make == "not_a_run_dir":
        (target / "sub").mkdir(parents=True)
        (target / "sub" / "config.yaml").write_text("seed: 0\n")  # no metrics.parquet
    assert main([str(target)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert ("no such directory" if make == "missing" else f"no run found under {target}") in err


# --- Pareto front, per-client view, sources without attributes, privacy ----------------------


def test_pareto_front_membership() -> None:
    points = pd.DataFrame({"auc": [0.9, 0.8, 0.85, 0.7, 0.9], "es": [0.7, 0.9, 0.8, 0.6, math.nan]}, index=["a", "b", "c", "d", "e"])
    assert pareto_front(points, "auc", "es") == ["a", "b", "c"]  # d is beaten by all; e has no ES-AUC
    eod = pd.DataFrame({"auc": [0.9, 0.8, 0.85, 0.9], "eod": [0.3, 0.1, 0.35, 0.3]}, index=["a", "b", "c", "dup"])
    assert pareto_front(eod, "auc", "eod", higher_y=False) == ["a", "b", "dup"]  # lower EOD is better; ties both stay


def test_per_client_view_and_differences(four_runs: Path) -> None:
    comp = compare.compare([four_runs])
    table = comp.client_table()
    assert list(table.columns) == list(CLIENTS)
    assert table.loc["fedavg"].tolist() == pytest.approx([0.85, 0.85, 0.85])  # seed 0 round 2: 0.8; seed 1 round 1: 0.9
    assert table.loc["fedprox+mu=0.1"].tolist() == pytest.approx([0.65, 0.8, 0.8])
    deltas = comp.client_deltas()
    assert list(deltas.index) == ["fedprox+mu=0.1"] and deltas.loc["fedprox+mu=0.1"].tolist() == pytest.approx([-0.2, -0.05, -0.05])


def test_source_without_attributes_and_privacy_column(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs / "dp-s0", {"name": "dp_lora"}, 0, {1: 0.6, 2: 0.7}, {1: 0.6, 2: 0.7}, fairness=False, epsilon=3.0)
    make_run(runs / "dp-s1", {"name": "dp_lora"}, 1, {1: 0.6, 2: 0.7}, {1: 0.6, 2: 0.8}, fairness=False, epsilon=2.9)
    comp = compare.compare([runs])
    header = comp.markdown().splitlines()[0]
    assert header == "| method | n | AUC | AUC 95 % CI | Acc | MB up / client / round | round | ε spent |" and comp.attribute == ""
    assert comp.markdown().splitlines()[2].endswith("| 2/2 | 3.00 |")


# --- outputs --------------------------------------------------------------------------------


def _plots(document: str) -> dict[str, bytes]:
    return {name: base64.b64decode(data) for name, data in re.findall(r'<img data-plot="([^"]+)"[^>]*src="data:image/png;base64,([^"]+)"', document)}


def test_outputs_and_html_plots(four_runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert main([str(four_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "table.md").read_text() == compare.compare([four_runs]).markdown() + "\n"
    table = pd.read_csv(out / "table.csv")
    assert table["algorithm"].tolist() == ["fedavg", "fedprox+mu=0.1"]
    assert {"auc_mean", "auc_std", "auc_ci_lo", "auc_ci_hi", "auc_n", "es_auc_mean", "auc:Black_mean", "mb_up_mean"} <= set(table.columns)
    assert table["auc_std"].tolist() == pytest.approx([math.sqrt(0.005), math.sqrt(0.005)])
    per_run = pd.read_csv(out / "per_run.csv")
    assert len(per_run) == 4 and per_run["run"].tolist() == ["fedavg-s0", "fedavg-s1", "fedprox+mu=0.1-s0", "fedprox+mu=0.1-s1"]
    document = (out / "compare.html").read_text()
    plots = _plots(document)
    assert set(plots) == {"pareto", "group_auc", "client_auc", "client_delta"}
    for name, png in plots.items():
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name
    assert 'data-table="compare"' in document and "fedprox+mu=0.1" in document and "<script" not in document


def test_many_clients_show_distributions(tmp_path: Path) -> None:
    many = {f"site{i}": 0.5 + i / 100 for i in range(1, compare.MANY_CLIENTS + 2)}
    for name, shift in (("fedavg", 0.0), ("fedbn", 0.05)):
        make_run(tmp_path / "runs" / f"{name}-s0", {"name": name}, 0, {1: 0.7}, {1: 0.7}, clients={c: v + shift for c, v in many.items()})
    comp = compare.compare([tmp_path / "runs"])
    assert comp.clients[:2] == ["site1", "site2"] and len(comp.clients) == 31  # natural order
    assert comp.client_deltas().loc["fedbn"].to_numpy() == pytest.approx([0.05] * 31)
    compare_plots.write(comp, tmp_path / "out")
    document = (tmp_path / "out" / "compare.html").read_text()
    assert {"client_auc", "client_delta"} <= set(_plots(document)) and "<th>median</th>" in document and "<th>site31</th>" not in document


# --- study reports --------------------------------------------------------------------------


def test_study_report_from_a_study_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "study"
    study.mkdir()
    trials = pd.DataFrame(
        {
            "trial_id": ["t2", "t1", "t3"],
            "status": ["TERMINATED", "TERMINATED", "ERROR"],
            "federation.lr": [1e-3, 1e-2, 1e-4],
            "rounds_done": [4, 2, math.nan],
            "stopped_early": [False, True, math.nan],
            "best_round": [4, 1, math.nan],
            "objective": [0.8, 0.6, math.nan],
            "test_auc": [0.79, 0.62, math.nan],
        }
    )
    trials.to_parquet(study / "trials.parquet")
    (study / "best.yaml").write_text("# best trial t2 of s.yaml: objective auc - 0.5*eod = 0.8000 (val, round 4)\nseed: 0\n")
    for trial, curve in (("t2", [0.5, 0.6, 0.7, 0.8]), ("t1", [0.6, 0.55])):
        (study / f"run_trial_{trial}").mkdir()
        lines = [json.dumps({"round": r + 1, "objective": v, "trial_id": trial}) for r, v in enumerate(curve)]
        (study / f"run_trial_{trial}" / "result.json").write_text("\n".join(lines) + "\n")
    assert main([str(study), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| trial | status | federation.lr | objective (val) | best round | rounds reached | test AUC at best | stopped early |"
    assert "| t1 | TERMINATED | 0.01 | 0.6000 | 1 | 2 | 0.6200 | yes |" in printed and "| t3 | ERROR | 0.0001 | - |" in printed
    assert "best trial t2" in printed
    document = (study / "report.html").read_text()
    assert document == (tmp_path / "out" / "compare.html").read_text()
    assert all(t in document for t in ("t1", "t2", "t3")) and "auc - 0.5*eod" in document and "seed: 0" in document
    assert set(_plots(document)) == {"objective_per_parameter", "asha"}
    assert set(study_report.histories(study)) == {"t1", "t2"}
    assert study_report.log_axis(trials["federation.lr"], None) and not study_report.log_axis(trials["federation.lr"], {"uniform": [0, 1]})
    assert main([str(study), str(tmp_path)]) == 2  # a study is reported on its own


# --- segmentation runs ------------------------------------------------------------------------


def make_seg_run(path: Path, algorithm: dict, seed: int, val: dict[int, float], test: dict[int, float], *, clients: dict[str, tuple[float, float]] | None = None) -> Path:
    """A segmentation run by hand: mean validation and test Dice D per round (disc D + 0.1, cup
    D - 0.1); ES-Dice D - 0.05, Dice gap 0.04, CDR error 0.1; group D -0.02 / -0.04 / +0.03;
    client (disc, cup) Dice `clients` (default D + 0.1, D - 0.1 each), 2 MB up per client per round."""
    rows = []
    for round_, dice in test.items():
        for split, d in (("val", val[round_]), ("test", dice)):
            rows += [(round_, split, "mean", "", "", "", "dice_disc", d + 0.1), (round_, split, "mean", "", "", "", "dice_cup", d - 0.1)]
        rows += [(round_, "test", "mean", "", "", "", "cdr_error", 0.1), (round_, "test", "mean", "", "race", "", "es_dice", dice - 0.05), (round_, "test", "mean", "", "race", "", "dice_gap", 0.04)]
        for g, shift in zip(GROUPS, (-0.02, -0.04, 0.03)):
            rows += [(round_, "test", "mean", "", "race", g, "dice_disc", dice + shift + 0.1), (round_, "test", "mean", "", "race", g, "dice_cup", dice + shift - 0.1)]
        for client in CLIENTS:
            disc, cup = (clients or {}).get(client, (dice + 0.1, dice - 0.1))
            rows += [(round_, "test", client, "", "", "", "dice_disc", disc), (round_, "test", client, "", "", "", "dice_cup", cup), (round_, "train", client, "", "", "", "bytes_up", 2e6)]
            rows.append((round_, "test", client, "", "", "", "dice_disc_lo", disc - 0.05))  # per-client only: never in the table
    path.mkdir(parents=True)
    pd.DataFrame(rows, columns=COLUMNS).to_parquet(path / "metrics.parquet")
    cfg = {"seed": seed, "data": {"name": "synthetic", "attribute": "race"}, "model": {"name": "unet:test_resnet", "img_size": 32}, "algorithm": algorithm, "federation": {"rounds": max(test)}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (path / "provenance.json").write_text(json.dumps({"data": {"name": "synthetic", "csv_sha256": "abc"}, "attribute": "race"}))
    return path


@pytest.fixture
def seg_runs(tmp_path: Path) -> Path:
    runs = tmp_path / "seg"
    make_seg_run(runs / "fedavg-s0", {"name": "fedavg"}, 0, {1: 0.6, 2: 0.7}, {1: 0.6, 2: 0.7})
    make_seg_run(runs / "fedavg-s1", {"name": "fedavg"}, 1, {1: 0.8, 2: 0.7}, {1: 0.8, 2: 0.5})  # round 1 selected
    uneven = {"site1": (0.7, 0.5), "site2": (0.9, 0.7), "site3": (0.8, 0.6)}  # D 0.6, 0.8, 0.7: site1 the worst
    make_seg_run(runs / "fedbn-s0", {"name": "fedbn"}, 0, {1: 0.6, 2: 0.7}, {1: 0.6, 2: 0.7}, clients=uneven)
    make_seg_run(runs / "fedbn-s1", {"name": "fedbn"}, 1, {1: 0.6, 2: 0.7}, {1: 0.6, 2: 0.7}, clients=uneven)
    return runs


def test_segmentation_table_worst_client_and_spread(seg_runs: Path, tmp_path: Path) -> None:
    comp = compare.compare([seg_runs])
    assert comp.task == "segmentation" and comp.groups == list(GROUPS) and comp.per_run["round"].tolist() == [2, 1, 2, 2]
    assert comp.per_run["selected_by"].tolist() == ["dice"] * 4
    lines = comp.markdown().splitlines()
    assert lines[0] == (
        "| method | n | Dice disc | Dice disc 95 % CI | Dice cup | Dice cup 95 % CI | Dice | ES-Dice | Dice Asian | Dice Black | Dice White | CDR error | worst client Dice | client std | MB up / client / round | round |"
    )
    half = 100 * 12.706204736174705 * math.sqrt(0.005) / math.sqrt(2)  # t(0.975, 1 dof) * s / sqrt(n), s = std(0.7, 0.8)
    assert lines[2] == (
        f"| fedavg | 2 | 85.0 ± 7.1 | [{85 - half:.1f}, {85 + half:.1f}] | 65.0 ± 7.1 | [{65 - half:.1f}, {65 + half:.1f}] | 75.0 ± 7.1 | 70.0 ± 7.1 "
        "| 73.0 ± 7.1 | 71.0 ± 7.1 | 78.0 ± 7.1 | 10.0 ± 0.0 | 75.0 ± 7.1 | 0.0 ± 0.0 | 2.000 | 2/1 |"
    )
    assert lines[3].startswith("| fedbn | 2 | 80.0 ± 0.0 |") and "| 60.0 ± 0.0 | 8.2 ± 0.0 | 2.000 | 2/2 |" in lines[3]  # worst site1 (0.6); population std of 0.6, 0.8, 0.7
    fedbn = comp.per_run[comp.per_run["label"] == "fedbn"].iloc[0]
    assert fedbn["worst_client"] == "site1" and fedbn["worst_dice"] == pytest.approx(0.6) and fedbn["client_std"] == pytest.approx(math.sqrt(0.02 / 3))
    assert comp.client_table().loc["fedbn"].tolist() == pytest.approx([0.6, 0.8, 0.7]) and comp.client_deltas().loc["fedbn"].tolist() == pytest.approx([-0.15, 0.05, -0.05])
    assert "Dice <group>: the group's Dice (the mean of its disc and cup Dice)" in comp.markdown() and "population std" in comp.markdown()
    written = compare_plots.write(comp, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert {"dice_disc_mean", "dice_cup_ci_lo", "es_dice_mean", "dice:Black_mean", "cdr_error_mean", "worst_dice_mean", "client_std_mean"} <= set(table.columns)
    assert table["worst_dice_mean"].tolist() == pytest.approx([0.75, 0.6])
    document = written[-1].read_text()
    plots = _plots(document)
    assert set(plots) == {"pareto", "group_dice", "client_dice", "client_delta"}
    for name, png in plots.items():
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name
    assert "Pareto front (no other group is better on both axes): ES-Dice: fedavg; worst client Dice: fedavg." in document and "AUC" not in re.sub(r'src="data:[^"]*"', "", document)


def test_segmentation_and_classification_runs_never_pool(seg_runs: Path, four_runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CompareError) as err:
        compare.compare([seg_runs / "fedavg-s0", four_runs / "fedavg-s1"])
    assert str(err.value).startswith("cannot pool runs: seg/fedavg-s0 is a segmentation run but runs/fedavg-s1 is a classification run")
    assert main([str(four_runs), str(seg_runs)]) == 2
    assert "is a classification run but seg/fedavg-s0 is a segmentation run" in capsys.readouterr().err


def make_joint_run(path: Path, algorithm: dict, seed: int, val: dict[int, tuple[float, float]], test: dict[int, tuple[float, float]], *, clients: dict[str, tuple[float, float]] | None = None) -> Path:
    """A joint run (segmentation + grade) by hand: `make_run`'s grading rows for AUC (first of
    each pair) and `make_seg_run`'s Dice rows for D (second); client AUC = the test AUC, client
    Dice `clients` (default D + 0.1, D - 0.1), model joint:test_resnet."""
    make_seg_run(path.parent / f".{path.name}-dice", algorithm, seed, {r: d for r, (_, d) in val.items()}, {r: d for r, (_, d) in test.items()}, clients=clients)
    dice = pd.read_parquet(path.parent / f".{path.name}-dice" / "metrics.parquet")
    make_run(path, algorithm, seed, {r: a for r, (a, _) in val.items()}, {r: a for r, (a, _) in test.items()}, config={"model": {"name": "joint:test_resnet", "img_size": 32}})
    grading = pd.read_parquet(path / "metrics.parquet")
    pd.concat([grading, dice[dice["metric"] != "bytes_up"]], ignore_index=True).to_parquet(path / "metrics.parquet")
    return path


def test_joint_runs_get_the_grading_and_the_segmentation_columns(tmp_path: Path) -> None:
    runs = tmp_path / "joint"
    make_joint_run(runs / "fedavg-s0", {"name": "fedavg"}, 0, {1: (0.7, 0.6), 2: (0.8, 0.6)}, {1: (0.7, 0.5), 2: (0.8, 0.7)})
    # AUC alone would select round 1 (0.9 > 0.8); the mean of AUC and Dice selects round 2 (0.8 > 0.7)
    make_joint_run(runs / "fedavg-s1", {"name": "fedavg"}, 1, {1: (0.9, 0.5), 2: (0.8, 0.8)}, {1: (0.9, 0.5), 2: (0.9, 0.7)})
    uneven = {"site1": (0.7, 0.5), "site2": (0.9, 0.7), "site3": (0.8, 0.6)}  # D 0.6, 0.8, 0.7
    for seed in (0, 1):
        make_joint_run(runs / f"fedbn-s{seed}", {"name": "fedbn"}, seed, {1: (0.7, 0.6), 2: (0.7, 0.7)}, {1: (0.7, 0.6), 2: (0.8, 0.7)}, clients=uneven)
    comp = compare.compare([runs])
    assert comp.task == "joint" and comp.per_run["round"].tolist() == [2, 2, 2, 2] and set(comp.per_run["selected_by"]) == {"auc_dice"}
    lines = comp.markdown().splitlines()
    assert lines[0] == (
        "| method | n | AUC | AUC 95 % CI | ES-AUC | ES-AUC 95 % CI | AUC Asian | AUC Black | AUC White | EOD | SPD "
        "| Dice disc | Dice cup | Dice | ES-Dice | CDR error | worst client Dice | client std | MB up / client / round | round |"
    )
    half = 100 * 12.706204736174705 * math.sqrt(0.005) / math.sqrt(2)
    assert lines[2] == (
        f"| fedavg | 2 | 85.0 ± 7.1 | [{85 - half:.1f}, {85 + half:.1f}] | 75.0 ± 7.1 | [{75 - half:.1f}, {75 + half:.1f}] | 80.0 ± 7.1 | 75.0 ± 7.1 | 90.0 ± 7.1 | 20.0 ± 0.0 | 10.0 ± 0.0 "
        "| 80.0 ± 0.0 | 60.0 ± 0.0 | 70.0 ± 0.0 | 65.0 ± 0.0 | 10.0 ± 0.0 | 70.0 ± 0.0 | 0.0 ± 0.0 | 1.333 | 2/2 |"
    )
    assert lines[3].endswith("| 70.0 ± 0.0 | 65.0 ± 0.0 | 10.0 ± 0.0 | 60.0 ± 0.0 | 8.2 ± 0.0 | 1.333 | 2/2 |")  # fedbn: worst client site1 (D 0.6)
    fedbn = comp.per_run[comp.per_run["label"] == "fedbn"].iloc[0]
    assert fedbn["worst_client"] == "site1" and fedbn["client_std"] == pytest.approx(math.sqrt(0.02 / 3)) and fedbn["dice_gap"] == pytest.approx(0.04)
    assert comp.groups == list(GROUPS) and comp.client_table().loc["fedbn"].tolist() == pytest.approx([0.8] * 3)  # groups and clients by AUC
    note = comp.footnote()
    assert "the best mean of validation AUC and Dice" in note and "EOD and SPD: lower is fairer" in note and "Worst client Dice" in note and "Dice <group>" not in note
    written = compare_plots.write(comp, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert {"auc_mean", "eod_mean", "dice_disc_ci_lo", "es_dice_mean", "dice_gap_mean", "worst_dice_mean", "client_std_mean"} <= set(table.columns)
    assert table["worst_dice_mean"].tolist() == pytest.approx([0.7, 0.6])
    plots = _plots(written[-1].read_text())
    assert set(plots) == {"pareto", "pareto_dice", "group_auc", "client_auc", "client_delta"}
    assert all(png.startswith(b"\x89PNG") and len(png) > 5000 for png in plots.values())
    with pytest.raises(CompareError, match="is a joint run but .* is a segmentation run"):
        compare.compare([runs / "fedavg-s0", runs / ".fedavg-s0-dice"])


# --- the benchmark's table is compare's (real runs) -----------------------------------------


def _methods_benchmark():
    spec = importlib.util.spec_from_file_location("methods_benchmark", ROOT / "benchmarks" / "methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(240)
def test_benchmark_table_is_compares(ray_session, oph_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    methods = _methods_benchmark()
    out = tmp_path / "bench"
    tiny = tiny_overrides(oph_root, **{"federation.rounds": 1, "eval.bootstrap": 0, "resources.actors": 1})  # one actor per run: fast
    argv = ["--methods", "fedavg", "fedprox+mu=0.1", "--seeds", "0", "1", "--rounds", "1", "--eval-every", "1", "--img-size", "16", "--out", str(out), "--set", *tiny]
    methods.main(argv)  # trains the 4 runs
    trained = capsys.readouterr().out
    methods.main([*argv, "--report-only"])
    reported = capsys.readouterr().out
    assert main([str(out), "--by", "algorithm"]) == 0
    table = capsys.readouterr().out.rstrip("\n")
    assert table in trained and table in reported
    assert table.splitlines()[2].startswith("| fedavg | 2 |") and table.splitlines()[3].startswith("| fedprox+mu=0.1 | 2 |")
    assert (out / "compare" / "compare.html").exists() and (out / "compare" / "table.md").read_text().rstrip("\n") == table
