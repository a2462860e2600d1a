"""The per-run report (raysim.report): plots present and non-empty, table cells equal to
metrics.parquet at the selected round, the distributions of large federations, the optional
sections (roles, privacy, missing clients), sources without attributes, the CLI, one real run."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from raysim.outputs import recorder, runs
from raysim.report import main
from raysim.reports import figures
from raysim.reports.run_report import WORST, write_report

from helpers import load_config, tiny_overrides

RACE = {"race": ["Asian", "Black", "White"], "gender": ["Female", "Male"]}


# --- hand-built runs ------------------------------------------------------------------------


def synthetic_metrics(
    n_clients: int = 3,
    rounds: int = 4,
    *,
    attributes: dict[str, list[str]] | None = None,
    bootstrap: bool = True,
    train_loss: bool = True,
    roles: dict[str, str] | None = None,
    epsilon: bool = False,
    dropped: dict[str, int] | None = None,
    multiclass: bool = False,
    seed: int = 0,
) -> pd.DataFrame:
    """A long metrics frame shaped like the engine's (means by recorder.with_means): AUC rising
    with the round, `dropped` clients absent from their round on (with `missing` / `n_clients`)."""
    attributes = RACE if attributes is None else attributes
    rng = np.random.default_rng(seed)
    names = [f"site{i + 1}" for i in range(n_clients)]
    roles, dropped = roles or {}, dropped or {}
    rows: list[tuple[object, ...]] = []
    skill = dict(zip(names, rng.normal(0, 0.04, n_clients)))  # each client's own offset, so the spread is visible
    for r in range(1, rounds + 1):
        here = [c for c in names if dropped.get(c, rounds + 1) > r]
        for c in here:
            role = roles.get(c, "")
            rows += [(r, "train", c, role, "", "", "bytes_down", 1.5e6), (r, "train", c, role, "", "", "bytes_up", 1.5e6 * (1 + (c == names[0])))]
            if train_loss:
                rows.append((r, "train", c, role, "", "", "loss", float(1.0 / r + rng.uniform(0, 0.1))))
            for split in ("val", "test"):
                base = 0.55 + 0.3 * (1 - np.exp(-r / 3)) + skill[c] + rng.uniform(-0.03, 0.03)
                rows += [(r, split, c, role, "", "", m, float(np.clip(base + rng.uniform(-0.05, 0.05), 0, 1))) for m in ("auc", "acc", "bacc")]
                rows.append((r, split, c, role, "", "", "loss", float(rng.uniform(0.3, 0.8))))
                for attr, groups in attributes.items():
                    rows += [(r, split, c, role, attr, "", m, float(rng.uniform(0.3, 0.7) if m.startswith("es") else rng.uniform(0.0, 0.3))) for m in ("es_auc", "es_acc", "es_bacc", "eod", "spd")]
                    for g in groups:
                        value = float(np.clip(base + rng.uniform(-0.15, 0.1), 0.01, 0.99))
                        rows += [(r, split, c, role, attr, g, "auc", value), (r, split, c, role, attr, g, "acc", value - 0.1), (r, split, c, role, attr, g, "bacc", value - 0.05)]
                        if bootstrap:
                            rows += [(r, split, c, role, attr, g, "auc_lo", value - 0.1), (r, split, c, role, attr, g, "auc_hi", min(value + 0.08, 1.0))]
    frame = recorder.with_means(pd.DataFrame(rows, columns=recorder.METRIC_COLUMNS))
    extra: list[tuple[object, ...]] = []
    for r in range(1, rounds + 1):
        if epsilon:
            extra += [(r, "train", "server", "", "", "", "epsilon", 0.5 * r), (r, "train", "server", "", "", "", "delta", 1e-5)]
        gone = sorted(c for c, at in dropped.items() if at <= r)
        if gone:
            extra += [(r, "train", c, roles.get(c, ""), "", "", "missing", 1.0) for c in gone] + [(r, "train", "mean", "", "", "", "n_clients", float(n_clients - len(gone)))]
    if extra:
        frame = pd.concat([frame, pd.DataFrame(extra, columns=recorder.METRIC_COLUMNS)], ignore_index=True)
    return frame


def make_run(path: Path, metrics: pd.DataFrame, *, attribute: str | None = "race", algorithm: dict | None = None, data: str = "synthetic", model: str = "test_resnet") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "seed": 7,
        "data": {"name": data, "attribute": attribute, "partition": None},
        "model": {"name": model, "img_size": 16},
        "algorithm": algorithm or {"name": "fedprox", "mu": 0.01},
        "federation": {"rounds": int(metrics["round"].max()), "local_epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 0.001},
        "eval": {"every": 1, "bootstrap": 20},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    prov = {"created": "2026-01-02T03:04:05+00:00", "python": "3.11.7", "packages": {"raysim": "0.3.0", "torch": "2.14.1", "ray": "2.60.0"}, "git_commit": "abc123", "attribute": attribute or ""}
    (path / "provenance.json").write_text(json.dumps(prov))
    metrics.to_parquet(path / "metrics.parquet", index=False)
    return path


def segmentation_metrics(n_clients: int = 3, rounds: int = 3, *, attributes: bool = True, n_boot: int = 20, samples: int = 24, seed: int = 0) -> pd.DataFrame:
    """A segmentation run's long frame as the engine writes it: per-sample Dice / IoU / hd95 / CDR
    error drawn per client and split, aggregated by `segmetrics.client_segmentation_metrics`
    (intervals, ES-Dice, gaps, groups), means by recorder.with_means; Dice rising with the round."""
    import warnings

    from raysim.metrics import segmentation as segmetrics

    rng = np.random.default_rng(seed)
    names = [f"site{i + 1}" for i in range(n_clients)]
    skill = dict(zip(names, rng.normal(0, 0.05, n_clients)))
    group_names = {"race": dict(enumerate(RACE["race"]))} if attributes else {}
    rows: list[tuple[object, ...]] = []
    for r in range(1, rounds + 1):
        for c in names:
            rows += [(r, "train", c, "", "", "", "bytes_down", 2e6), (r, "train", c, "", "", "", "bytes_up", 2e6), (r, "train", c, "", "", "", "loss", 1.0 / r)]
            for split in ("val", "test"):
                base = 0.5 + 0.3 * (1 - np.exp(-r / 2)) + skill[c]
                codes = rng.integers(0, 3, samples)
                disc = np.clip(base + 0.1 + rng.normal(0, 0.05, samples) - 0.05 * (codes == 1), 0, 1)
                cup = np.clip(base - 0.1 + rng.normal(0, 0.08, samples), 0, 1)
                values = {"dice_disc": disc, "dice_cup": cup, "iou_disc": disc / (2 - disc), "iou_cup": cup / (2 - cup)}
                values |= {"hd95_disc": rng.uniform(0.01, 0.1, samples), "hd95_cup": rng.uniform(0.02, 0.2, samples), "cdr_error": rng.uniform(0, 0.2, samples)}
                rim = np.clip((disc + cup) / 2 - 0.1, 0, 1)  # the rim (issue 25), drawn from no rng: the other values stay those of before
                values |= {"dice_rim": rim, "iou_rim": rim / (2 - rim), "hd95_rim": np.clip(1.5 * values["hd95_disc"], 0, 1)}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", segmetrics.UndefinedMetricWarning)
                    out = segmetrics.client_segmentation_metrics(values, {"race": codes} if attributes else {}, group_names, n_boot=n_boot, seed=r)
                rows += [(r, split, c, "", a, g, m, float(v)) for a, g, m, v in out]
    return recorder.with_means(pd.DataFrame(rows, columns=recorder.METRIC_COLUMNS))


# --- reading the page back ------------------------------------------------------------------


class _Page(HTMLParser):
    """The tables (name -> header + rows of cell text) and plots (name -> PNG bytes) of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.plots: dict[str, bytes] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a["data-table"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.plots[a["data-plot"]] = base64.b64decode(a["src"].split(",", 1)[1])

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, name: str) -> list[dict[str, str]]:
        header, *body = self.tables[name]
        return [dict(zip(header, row)) for row in body]


def read_page(path: Path) -> tuple[str, _Page]:
    text = path.read_text(encoding="utf-8")
    return text, _Page(text)


def assert_real_png(data: bytes, name: str) -> None:
    import matplotlib.image

    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{name}: not a PNG"
    assert len(data) > 5_000, f"{name}: only {len(data)} bytes"
    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400, f"{name}: {pixels.shape}"
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20, f"{name}: nearly one flat colour"


# --- tests ---------------------------------------------------------------------------------


def test_every_plot_is_a_real_png_and_the_page_is_self_contained(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", synthetic_metrics())
    out = write_report(run)
    text, page = read_page(out)
    assert out == run.resolve() / "report.html"
    for name in ("auc", "es_auc_race", "acc", "group_auc", "eod_spd", "bytes", "train_loss"):
        assert name in page.plots, f"no plot {name}: {sorted(page.plots)}"
        assert_real_png(page.plots[name], name)
    assert "<script" not in text and "http://" not in text and "https://" not in text  # nothing fetched, nothing run
    info = {row["setting"]: row["value"] for row in page.rows("run")}
    assert info["method"] == "fedprox (mu=0.01)" and info["seed"] == "7" and info["git commit"] == "abc123" and "torch 2.14.1" in info["versions"]
    assert "privacy" not in page.tables and "roles" not in page.tables and "No client was dropped" in text


def test_table_cells_equal_metrics_parquet_at_the_selected_round(tmp_path: Path) -> None:
    metrics = synthetic_metrics(seed=1)
    # validation peaks at round 2, test keeps rising: the report must follow validation
    val = (metrics["split"] == "val") & (metrics["metric"] == "auc") & (metrics["attribute"] == "")
    metrics.loc[val & (metrics["round"] == 2), "value"] = 0.99
    run = make_run(tmp_path / "run", metrics)
    text, page = read_page(write_report(run))
    m = runs.read_run(run).metrics
    chosen = runs.select_round(m)
    assert chosen.round == 2 and chosen.reason in text
    cell = {(r["client"]): r for r in page.rows("clients")}
    assert list(cell) == ["site1", "site2", "site3", "mean"]
    for client, row in cell.items():
        assert row["val AUC"] == figures.percent(runs.value(m, round_=2, split="val", metric="auc", client=client))
        assert row["test AUC"] == figures.percent(runs.value(m, round_=2, split="test", metric="auc", client=client))
        assert row["test acc"] == figures.percent(runs.value(m, round_=2, split="test", metric="acc", client=client))
        for label, metric in (("test ES-AUC (race)", "es_auc"), ("test EOD", "eod"), ("test SPD", "spd")):
            assert row[label] == figures.percent(runs.value(m, round_=2, split="test", metric=metric, attribute="race", client=client))
    for row in page.rows("group_auc"):
        for label, metric in (("AUC", "auc"), ("AUC low", "auc_lo"), ("AUC high", "auc_hi")):
            assert row[label] == figures.percent(runs.value(m, round_=2, split="test", metric=metric, attribute="race", group=row["group"], client=row["client"]))
    assert {r["client"] for r in page.rows("group_auc")} == {"site1", "site2", "site3", "mean"}
    selected = {r["mean over clients (x100)"]: r for r in page.rows("selected")}
    assert selected["AUC"]["validation"] == "99.0"
    assert selected["ES-AUC (race)"]["test"] == figures.percent(runs.value(m, round_=2, split="test", metric="es_auc", attribute="race"))
    for row in page.rows("per_round"):
        assert row["test AUC"] == figures.percent(runs.value(m, round_=int(row["round"]), split="test", metric="auc"))
    traffic = page.rows("traffic")
    sent = m[(m["metric"] == "bytes_up") & (m["round"] == 1) & m["client"].str.startswith("site")]["value"]
    assert traffic[0]["MB up in all"] == f"{sent.sum() / 1e6:.2f}" and traffic[0]["clients trained"] == "3"
    loss = page.rows("train_loss")
    assert loss[-1]["mean loss"] == f"{runs.value(m, round_=4, split='train', metric='loss'):.4f}"


def test_above_50_clients_the_report_shows_distributions(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", synthetic_metrics(n_clients=60, rounds=3))
    text, page = read_page(write_report(run))
    for name in ("auc", "es_auc_race", "auc_spread", "group_auc", "eod_spd"):
        assert_real_png(page.plots[name], name)
    assert "clients" not in page.tables and "each client and the mean" not in text  # no per-client table or plot
    assert "median and 10-90 % band over clients" in text
    m = runs.read_run(run).metrics
    at = runs.select_round(m).round
    test = m[(m["round"] == at) & (m["split"] == "test") & (m["metric"] == "auc") & (m["attribute"] == "") & m["client"].str.startswith("site")]
    worst = test.sort_values("value", kind="stable").head(WORST)
    assert [r["client"] for r in page.rows("worst_clients")] == list(worst["client"])
    assert [r["test AUC"] for r in page.rows("worst_clients")] == [figures.percent(v) for v in worst["value"]]
    assert {r["client"] for r in page.rows("group_auc")} == {"mean"}
    assert len(text) < 1_500_000


def test_privacy_section_only_with_epsilon_rows(tmp_path: Path) -> None:
    _, page = read_page(write_report(make_run(tmp_path / "dp", synthetic_metrics(epsilon=True), algorithm={"name": "dp_fedavg"})))
    assert_real_png(page.plots["epsilon"], "epsilon")
    assert [r["epsilon"] for r in page.rows("privacy")] == ["0.5", "1", "1.5", "2"]
    _, plain = read_page(write_report(make_run(tmp_path / "plain", synthetic_metrics())))
    assert "epsilon" not in plain.plots and "privacy" not in plain.tables


def test_dropped_clients_are_listed(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", synthetic_metrics(n_clients=4, dropped={"site3": 2}))
    text, page = read_page(write_report(run))
    assert page.rows("missing") == [{"client": "site3", "first round missing": "2", "last round missing": "4", "rounds missing": "3"}]
    assert page.rows("n_clients") == [{"rounds": "2-4", "clients left": "3"}]
    assert [r["clients trained"] for r in page.rows("traffic")] == ["4", "3", "3", "3"]
    assert "1 of 4 clients were dropped" in text


def test_role_runs_show_the_role_means(tmp_path: Path) -> None:
    roles = {"site1": "large", "site2": "small", "site3": "small"}
    run = make_run(tmp_path / "run", synthetic_metrics(roles=roles), algorithm={"name": "fedhelp"})
    text, page = read_page(write_report(run))
    m = runs.read_run(run).metrics
    at = runs.select_round(m).round
    means = {r["mean of"]: r for r in page.rows("roles")}
    assert set(means) == {"mean:large", "mean:small", "mean"}
    assert means["mean:small"]["test AUC"] == figures.percent(runs.value(m, round_=at, split="test", metric="auc", client="mean:small"))
    assert "large (1 clients)" in text or "large (1 client" in text
    assert_real_png(page.plots["roles_test"], "roles_test")
    assert [r["role"] for r in page.rows("clients")] == ["large", "small", "small", ""]


def test_a_source_without_attributes_reports_without_fairness(tmp_path: Path) -> None:
    """MedMNIST-like: attribute "" everywhere, multi-class accuracy rows, no intervals."""
    run = make_run(tmp_path / "run", synthetic_metrics(attributes={}, bootstrap=False), attribute=None, data="medmnist")
    text, page = read_page(write_report(run))
    assert "no sensitive attributes" in text
    assert {"auc", "acc", "bytes", "train_loss"} <= set(page.plots)
    assert not {"group_auc", "eod_spd"} & set(page.plots) and not any(k.startswith("es_auc") for k in page.plots)
    assert "test acc" in page.rows("clients")[0] and "test EOD" not in page.rows("clients")[0]


def test_old_runs_without_loss_or_intervals_get_a_note(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", synthetic_metrics(bootstrap=False, train_loss=False))
    text, page = read_page(write_report(run))
    assert "No training loss" in text and "No bootstrap intervals" in text
    assert "train_loss" not in page.plots and "AUC low" not in page.rows("group_auc")[0]


def test_cli_writes_the_page_or_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", synthetic_metrics(rounds=2))
    assert main([str(run), "--out", str(tmp_path / "elsewhere.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "elsewhere.html") and (tmp_path / "elsewhere.html").stat().st_size > 10_000
    (tmp_path / "empty").mkdir()
    (tmp_path / "young").mkdir()
    (tmp_path / "young" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "broken" / "metrics.parquet").write_text("not parquet")
    for bad, expected in (("nowhere", "not a directory"), ("empty", "no config.yaml"), ("young", "no metrics.parquet yet"), ("broken", "unreadable")):
        assert main([str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err and bad in err, err


def test_the_embedded_default_run_writes_its_report(ray_session, oph_root: Path, tmp_path: Path) -> None:
    from raysim import config
    from raysim.engine.driver import Driver

    cfg = load_config(None, tiny_overrides(oph_root, **{"report.html": True}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    lines: list[str] = []
    Driver(cfg, run_dir, echo=lines.append).run()
    assert (run_dir / "report.html").is_file(), "\n".join(lines)  # written by the run itself (report.html: true)
    text, page = read_page(run_dir / "report.html")
    for name in ("auc", "acc", "bytes", "train_loss"):
        assert_real_png(page.plots[name], name)
    m = runs.read_run(run_dir).metrics
    chosen = runs.select_round(m)
    assert chosen.reason in text
    for row in page.rows("clients"):
        assert row["test AUC"] == figures.percent(runs.value(m, round_=chosen.round, split="test", metric="auc", client=row["client"]))
    assert re.search(r"<td>rounds</td><td>2 of 2 done</td>", text)


def test_runs_without_validation_or_evaluation_still_report(tmp_path: Path) -> None:
    """data.val_fraction=0 (nothing to select on) and a run with no evaluated round yet: a page that says so."""
    metrics = synthetic_metrics(rounds=2)
    text, page = read_page(write_report(make_run(tmp_path / "noval", metrics[metrics["split"] != "val"])))
    assert "no round selected" in text and "the last evaluated round, 2" in text and [r["client"] for r in page.rows("clients")][-1] == "mean"
    text, page = read_page(write_report(make_run(tmp_path / "young", metrics[metrics["split"] == "train"])))
    assert "no evaluation rows yet" in text and "bytes" in page.plots


# --- segmentation runs -----------------------------------------------------------------------


def _dice(m: pd.DataFrame, round_: int, split: str, client: str = runs.MEAN, attribute: str = "", group: str = "") -> float:
    """D = (Dice disc + Dice cup) / 2 of one client (or group) from the stored rows."""
    parts = [runs.value(m, round_=round_, split=split, metric=k, client=client, attribute=attribute, group=group) for k in ("dice_disc", "dice_cup")]
    return (parts[0] + parts[1]) / 2


def test_run_task_follows_the_metric_rows_then_the_model(tmp_path: Path) -> None:
    seg = runs.read_run(make_run(tmp_path / "seg", segmentation_metrics(rounds=1), model="unet:test_resnet"))
    assert seg.task == "segmentation" and runs.read_run(make_run(tmp_path / "cls", synthetic_metrics(rounds=1))).task == "classification"
    young = segmentation_metrics(rounds=1)
    young = young[young["split"] == "train"]  # no evaluation yet: the model decides
    assert runs.task_of(young, {"model": {"name": "unet:resnet18"}}) == "segmentation" and runs.task_of(young, {"model": {"name": "resnet18"}}) == "classification"
    assert runs.task_of(segmentation_metrics(rounds=1), {"model": {"name": "resnet18"}}) == "segmentation"  # rows win over the config


def test_segmentation_report_cells_equal_metrics_parquet(tmp_path: Path) -> None:
    metrics = segmentation_metrics(seed=3)
    val = (metrics["split"] == "val") & metrics["metric"].isin(["dice_disc", "dice_cup"]) & (metrics["attribute"] == "")
    metrics.loc[val & (metrics["round"] == 2), "value"] = 0.97  # validation peaks at round 2; the report must follow it
    run = make_run(tmp_path / "run", metrics, model="unet:test_resnet")
    text, page = read_page(write_report(run))
    m = runs.read_run(run).metrics
    chosen = runs.select_round(m)
    assert chosen.round == 2 and chosen.metric == "dice" and chosen.reason in text
    for name in ("dice_disc", "dice_cup", "es_dice_race", "client_dice", "group_dice_disc", "group_dice_cup", "dice_gaps", "bytes", "train_loss"):
        assert name in page.plots, f"no plot {name}: {sorted(page.plots)}"
        assert page.plots[name][:8] == b"\x89PNG\r\n\x1a\n" and len(page.plots[name]) > 5_000, name
    for name in ("dice_cup", "client_dice", "group_dice_disc", "dice_gaps"):  # the new kinds of plot, decoded (the shared ones are in the tests above)
        assert_real_png(page.plots[name], name)
    words = re.sub(r'src="data:[^"]*"', "", text)  # the page less its inline PNGs
    assert not {"auc", "acc", "group_auc", "eod_spd"} & set(page.plots) and "AUC" not in words and "<script" not in text
    assert "hd95 is the 95th percentile Hausdorff distance as a percentage of the image diagonal" in text
    pct = figures.percent
    cells = {r["client"]: r for r in page.rows("clients")}
    assert list(cells) == ["site1", "site2", "site3", "mean"]
    for client, row in cells.items():
        assert row["val Dice"] == pct(_dice(m, 2, "val", client)) == pct(0.97) and row["test Dice"] == pct(_dice(m, 2, "test", client))
        for part in ("disc", "cup"):
            assert row[f"test Dice {part}"] == pct(runs.value(m, round_=2, split="test", metric=f"dice_{part}", client=client))
            for bound, suffix in (("low", "lo"), ("high", "hi")):
                assert row[f"{part} {bound}"] == pct(runs.value(m, round_=2, split="test", metric=f"dice_{part}_{suffix}", client=client))  # '-' for the mean
        assert row["test ES-Dice (race)"] == pct(runs.value(m, round_=2, split="test", metric="es_dice", attribute="race", client=client))
        assert row["test Dice gap"] == pct(runs.value(m, round_=2, split="test", metric="dice_gap", attribute="race", client=client))
    assert cells["mean"]["disc low"] == "-" and cells["site1"]["disc low"] != "-"
    for row in page.rows("clients_geometry"):
        for metric in ("iou_disc", "iou_cup", "hd95_disc", "hd95_cup", "cdr_error"):
            header = next(h for h in row if h.startswith(f"test {metric.split('_')[0].replace('cdr', 'CDR').replace('iou', 'IoU')} {metric.split('_')[1]}"))
            assert row[header] == pct(runs.value(m, round_=2, split="test", metric=metric, client=row["client"])), (metric, header)
    assert "test hd95 disc (% of diagonal)" in page.rows("clients_geometry")[0]
    for row in page.rows("group_dice"):
        for label, metric in (("Dice disc", "dice_disc"), ("disc low", "dice_disc_lo"), ("cup high", "dice_cup_hi"), ("CDR error", "cdr_error"), ("hd95 cup (% of diagonal)", "hd95_cup")):
            assert row[label] == pct(runs.value(m, round_=2, split="test", metric=metric, attribute="race", group=row["group"], client=row["client"]))
    assert len(page.rows("group_dice")) == 4 * 3
    for row in page.rows("group_gaps"):
        for label, metric in (("ES-Dice", "es_dice"), ("ES-Dice cup", "es_dice_cup"), ("Dice gap disc", "dice_disc_gap")):
            assert row[label] == pct(runs.value(m, round_=2, split="test", metric=metric, attribute="race", client=row["client"]))
    selected = {r["mean over clients (x100)"]: r for r in page.rows("selected")}
    assert selected["Dice"]["test"] == pct(_dice(m, 2, "test")) and selected["ES-Dice (race)"]["validation"] == pct(runs.value(m, round_=2, split="val", metric="es_dice", attribute="race"))
    assert selected["hd95 cup (% of diagonal)"]["test"] == pct(runs.value(m, round_=2, split="test", metric="hd95_cup"))
    for row in page.rows("per_round"):
        r = int(row["round"])
        assert row["test Dice"] == pct(_dice(m, r, "test")) and row["validation Dice cup"] == pct(runs.value(m, round_=r, split="val", metric="dice_cup"))
        assert row["test ES-Dice"] == pct(runs.value(m, round_=r, split="test", metric="es_dice", attribute="race"))
    assert page.rows("traffic")[0]["MB up in all"] == "6.00" and page.rows("train_loss")[1]["mean loss"] == "0.5000"


def test_segmentation_client_fairness_worst_client_and_spread(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", segmentation_metrics(n_clients=5, seed=4), model="unet:test_resnet")
    _, page = read_page(write_report(run))
    m = runs.read_run(run).metrics
    at = runs.select_round(m).round
    rows = {(r["split"], r["metric"]): r for r in page.rows("client_fairness")}
    assert set(rows) == {(s, k) for s in ("validation", "test") for k in ("Dice", "Dice disc", "Dice cup", "Dice rim")}  # the rim: issue 25
    for split, name in (("val", "validation"), ("test", "test")):
        sites = [f"site{i}" for i in range(1, 6)]
        for label, values in (
            ("Dice", np.array([_dice(m, at, split, c) for c in sites])),
            ("Dice disc", np.array([runs.value(m, round_=at, split=split, metric="dice_disc", client=c) for c in sites])),
        ):
            row = rows[(name, label)]
            assert row["worst client"] == sites[int(np.argmin(values))] and row["clients"] == "5"
            expected = {"min": values.min(), "median": np.median(values), "max": values.max(), "std": values.std(ddof=0)}
            assert {k: row[k] for k in expected} == {k: figures.percent(v) for k, v in expected.items()}
    spread = runs.client_spread(pd.Series({"site10": 0.5, "site2": 0.5, "site3": np.nan, "site1": 0.9}))
    assert spread.worst == "site2" and spread.n == 3 and spread.std == pytest.approx(np.std([0.5, 0.5, 0.9]))  # natural order breaks the tie; NaN left out


def test_segmentation_report_of_a_large_federation_and_without_attributes(tmp_path: Path) -> None:
    run = make_run(tmp_path / "many", segmentation_metrics(n_clients=51, rounds=1, n_boot=5, samples=6), model="unet:test_resnet")
    text, page = read_page(write_report(run))
    for name in ("dice_spread", "dice_gaps"):
        assert_real_png(page.plots[name], name)
    assert {"dice_disc", "group_dice_disc"} <= set(page.plots)
    assert "clients" not in page.tables and "client_dice" not in page.plots and {r["client"] for r in page.rows("group_dice")} == {"mean"}
    m = runs.read_run(run).metrics
    at = runs.select_round(m).round
    test = pd.Series({c: _dice(m, at, "test", c) for c in runs.clients(m)})
    assert [r["client"] for r in page.rows("worst_clients")] == list(test.sort_values(kind="stable").index[:WORST])
    assert next(r for r in page.rows("client_fairness") if r["split"] == "test" and r["metric"] == "Dice")["worst client"] == test.idxmin()
    text, page = read_page(write_report(make_run(tmp_path / "plain", segmentation_metrics(attributes=False, rounds=2), attribute=None, model="unet:test_resnet")))
    assert "no per-group Dice" in text and "No ES-Dice" in text and not {"es_dice_race", "group_dice_disc", "dice_gaps"} & set(page.plots)
    assert "test ES-Dice (race)" not in page.rows("clients")[0] and page.rows("client_fairness")


def test_a_joint_runs_unseen_site_table_shows_grading_and_dice(tmp_path: Path) -> None:
    """Issue 25.6: a joint run's held-out site is graded and segmented; 0.5.0's table showed only AUC / acc."""
    grading = synthetic_metrics(rounds=3, attributes={}, bootstrap=False)
    dice = segmentation_metrics(rounds=3, attributes=False)
    dice = dice[~dice["metric"].isin(["bytes_up", "bytes_down", "loss"]) | (dice["split"] != "train")]
    frame = pd.concat([grading, dice[dice["split"] != "train"]], ignore_index=True)
    frame.loc[frame["client"] == "site3", "role"] = runs.HOLDOUT
    frame = recorder.with_means(frame[~frame["client"].str.startswith("mean")])
    run = make_run(tmp_path / "joint", frame, attribute=None, model="joint:test_resnet")
    write_report(run)
    _, page = read_page(run / "report.html")
    rows = page.rows("holdout")
    m = frame[(frame["client"] == "site3") & (frame["split"] == "test") & (frame["attribute"] == "")]
    for row in rows:
        r = int(row["round"])
        disc = m[(m["round"] == r) & (m["metric"] == "dice_disc")]["value"].iloc[0]
        auc = m[(m["round"] == r) & (m["metric"] == "auc")]["value"].iloc[0]
        assert row["test Dice disc site3"] == f"{100 * disc:.1f}" and row["test AUC site3"] == f"{100 * auc:.1f}"
