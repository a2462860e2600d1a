"""The console at scale (issue 16): summaries beyond 20 clients, capped per-client notes,
progress bars on a terminal only, and the line budget of a many-client run."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim import config, console
from raysim.datasets import ClientSpec, SampleTable
from raysim.engine.actor_startup import client_list, echo_shards
from raysim.engine.driver_actor import DriverHost
from raysim.outputs import recorder

from helpers import load_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
GROUPS = {0: "Asian", 1: "Black", 2: "White"}


def metric_frame(clients: int, seed: int = 0) -> pd.DataFrame:
    """Round-1 test rows of `clients` clients (AUC, ES-AUC, group AUCs, EOD, SPD) plus their mean."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(clients):
        cid = f"c{i:03d}"
        rows += [(cid, "", "", "auc", rng.uniform(0.5, 1.0)), (cid, "race", "", "es_auc", rng.uniform(0.4, 0.9))]
        rows += [(cid, "race", name, "auc", rng.uniform(0.5, 1.0)) for name in GROUPS.values()]
        rows += [(cid, "race", "", "eod", rng.uniform(0, 0.3)), (cid, "race", "", "spd", rng.uniform(0, 0.3))]
    frame = pd.DataFrame([(1, "test", c, "", a, g, m, v) for c, a, g, m, v in rows], columns=recorder.METRIC_COLUMNS)
    return recorder.with_means(frame)


def table(frame: pd.DataFrame) -> list[str]:
    return recorder.format_table(frame, round_=1, split="test", attribute="race", group_names=GROUPS).splitlines()


def value(frame: pd.DataFrame, client: str, metric: str, attribute: str = "") -> float:
    rows = frame[(frame["client"] == client) & (frame["metric"] == metric) & (frame["attribute"] == attribute) & (frame["group"] == "")]
    return float(rows["value"].item())


# --- summaries (pure functions) ------------------------------------------------------------------


def test_the_table_lists_up_to_20_clients_one_row_each() -> None:
    lines = table(metric_frame(20))
    assert lines[0] == "test metrics after round 1 (x100; attribute: race)"
    assert [line.split()[0] for line in lines[3:]] == [f"c{i:03d}" for i in range(20)] + ["mean"]


def test_beyond_20_clients_the_table_shows_the_spread_the_mean_and_the_worst_client() -> None:
    frame = metric_frame(300)
    lines = table(frame)
    assert lines[0] == "test metrics after round 1 (x100; attribute: race; 300 clients: min / median / max over clients)"
    assert lines[1].split() == ["client", "AUC", "ES-AUC", "AUC", "Asian", "AUC", "Black", "AUC", "White", "EOD", "SPD"]
    assert [line.split()[0] for line in lines[3:]] == ["min", "median", "max", "mean", "worst"]
    rows = {line.split()[0]: line.split() for line in lines[3:7]}
    clients = frame[(frame["metric"] == "auc") & (frame["attribute"] == "") & (frame["client"] != "mean")]
    for name, reduce in (("min", np.min), ("median", np.median), ("max", np.max)):
        assert rows[name][1] == f"{100 * reduce(clients['value']):.1f}"
    for column, metric in ((2, "es_auc"), (6, "eod"), (7, "spd")):  # ES-AUC, EOD, SPD spread over clients
        values = frame[(frame["metric"] == metric) & (frame["client"] != "mean")]["value"]
        assert rows["median"][column] == f"{100 * np.median(values):.1f}"
    assert rows["mean"][1] == f"{100 * value(frame, 'mean', 'auc'):.1f}"
    worst = clients.sort_values("value").iloc[0]
    assert lines[7].split()[:4] == ["worst", "AUC:", worst["client"], f"{100 * worst['value']:.1f}"]
    assert not any(re.match(r"c\d{3}\s", line) for line in lines)  # no per-client rows


def test_a_column_no_client_has_stays_a_dash_in_the_summary() -> None:
    frame = metric_frame(25)
    frame.loc[frame["metric"] == "spd", "value"] = np.nan
    median = next(line for line in table(frame) if line.startswith("median"))
    assert median.split()[-1] == "-"


def specs(n: int, role: str = "") -> list[ClientSpec]:
    def rows(k: int) -> SampleTable:
        return SampleTable(sample_ids=np.arange(k), labels=np.zeros(k, dtype=np.int64), attributes={})

    return [ClientSpec(f"c{i:03d}", {"train": rows(10 + i), "test": rows(5)}, role=role if i < 2 else "") for i in range(n)]


def test_the_client_list_names_up_to_20_clients_and_summarises_more() -> None:
    assert client_list(specs(3)) == "c000 (10 train), c001 (11 train), c002 (12 train)"
    many = client_list(specs(1000, role="large"))
    assert many == "samples per client (min / median / max) train 10 / 509.5 / 1009, test 5 / 5 / 5; 509500 train in all; roles: 2 large"
    assert "c999" not in many


def test_shards_are_listed_up_to_20_clients_and_summarised_beyond() -> None:
    def described(n: int) -> dict:
        return {f"c{i:03d}": {"train": {"n": 10 + i, "dropped": {"empty": 1} if i % 2 else {}}, "val": {"n": 3, "dropped": {}}} for i in range(n)}

    lines: list[str] = []
    echo_shards(lines.append, described(3))
    assert lines == ["  c000: train 10, val 3", "  c001: train 11, val 3; skipped {'empty': 1}", "  c002: train 12, val 3"]
    lines.clear()
    echo_shards(lines.append, described(500))
    assert lines == ["  500 clients loaded; samples per client (min / median / max): train 10 / 259.5 / 509, val 3 / 3 / 3", "  skipped {'empty': 250} in 250 clients"]


def test_per_client_notes_are_capped_per_kind_and_counted() -> None:
    lines: list[str] = []
    notes = console.Capped(lines.append, shown=5)
    for i in range(40):
        notes.say("failed this step", f"client c{i} failed this step: boom")
    notes.say("had their update rejected", "client c7: update rejected")
    notes.flush()
    assert lines == [f"client c{i} failed this step: boom" for i in range(5)] + ["client c7: update rejected", "... and 35 more clients failed this step"]
    notes.flush()  # a new round starts counting afresh
    assert len(lines) == 7
    assert console.first([f"c{i}" for i in range(8)]) == "c0, c1, c2, c3, c4 and 3 more"
    assert console.first(["a", "b"]) == "a, b"


def test_a_failed_list_in_the_round_line_is_capped() -> None:
    lines: list[str] = []
    recorder.Progress(3, 1, lines.append).round_done(1, clients=10, failed=[f"c{i}" for i in range(30)], train_loss=0.5)
    assert lines[0].startswith("round   1/3 | clients 10 | train loss 0.5000 | ")
    assert lines[0].endswith("| failed: c0, c1, c2, c3, c4 and 25 more")


# --- progress: throttling and drawing ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_throttled_but_every_phase_shows_its_start_and_its_end() -> None:
    seen: list[tuple[str, int, int]] = []
    clock = Clock()
    throttled = console.Throttled(lambda *event: seen.append(event), interval=0.1, clock=clock)
    with console.reporting_to(throttled):
        for done in range(0, 1001):  # 1,000 clients finished within 0.5 s
            clock.now = done * 0.0005
            console.report("round 1: clients trained", done, 1000)
        console.report("round 1: clients evaluated", 0, 10)
    console.report("outside", 1, 2)  # no sink installed: nothing
    phases = [event[0] for event in seen]
    assert seen[0] == ("round 1: clients trained", 0, 1000) and ("round 1: clients trained", 1000, 1000) in seen
    assert phases.count("round 1: clients trained") <= 7  # 0.5 s at most one per 0.1 s, plus the end
    assert seen[-1] == ("round 1: clients evaluated", 0, 10)


def test_counted_reports_each_item_once_it_is_consumed() -> None:
    seen: list[tuple[str, int, int]] = []
    with console.reporting_to(lambda *event: seen.append(event)):
        assert list(console.counted("abc", "pretrain", total=6, start=3)) == ["a", "b", "c"]
    assert seen == [("pretrain", 4, 6), ("pretrain", 5, 6), ("pretrain", 6, 6)]


def test_render_bar_shows_counts_percent_elapsed_and_eta_within_the_width() -> None:
    line = console.render_bar("round 3: clients trained", 12, 20, elapsed=4.0, eta=3.0, columns=100)
    assert line.startswith("round 3: clients trained [") and line.endswith("] 12/20  60% 0:00:04<0:00:03")
    inside = line[line.index("[") + 1 : line.index("]")]
    assert inside.count("#") == round(0.6 * len(inside))
    assert console.render_bar("x", 0, 20, elapsed=0.0, eta=None).endswith("0:00:00<?")
    assert len(console.render_bar("a very long phase name " * 10, 1, 2, 1.0, 1.0, columns=60)) == 59


class Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_bars_are_drawn_on_a_terminal_and_cleared_before_each_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    out, err = Terminal(True), Terminal(True)
    printer = console.Printer(out, err)
    printer.bar.clock = iter([0.0, 2.0, 2.5]).__next__  # the phase starts at 0 s; 5 of 10 done at 2 s
    printer.event(["round   1/2 | clients 10 | ..."], None)
    printer.event([], ("round 2: clients trained", 0, 10))
    printer.event([], ("round 2: clients trained", 5, 10))
    printer.event(["client c3 failed this step: boom"], ("round 2: clients trained", 6, 10))
    printer.close()
    assert out.getvalue() == "round   1/2 | clients 10 | ...\nclient c3 failed this step: boom\n"
    drawn = err.getvalue()
    assert "\r\x1b[Kround 2: clients trained [" in drawn and "5/10  50% 0:00:02<0:00:02" in drawn
    assert drawn.endswith("\r\x1b[K")  # nothing left on the terminal's last line
    assert "\n" not in drawn


@pytest.mark.parametrize("out_tty, err_tty", [(False, False), (False, True), (True, False)])
def test_without_a_terminal_there_are_lines_only(out_tty: bool, err_tty: bool) -> None:
    out, err = Terminal(out_tty), Terminal(err_tty)
    printer = console.Printer(out, err)
    printer.event(["data: x"], ("loading client shards", 0, 60))
    printer.event([], ("loading client shards", 60, 60))
    printer.event(["round   1/1 | clients 10 | train loss 0.7000 | 1.0 s/round | elapsed 0:00:01 | ETA 0:00:00"], None)
    printer.close()
    assert printer.bar is None and err.getvalue() == ""
    assert out.getvalue() == "data: x\nround   1/1 | clients 10 | train loss 0.7000 | 1.0 s/round | elapsed 0:00:01 | ETA 0:00:00\n"


# --- the driver's stream -------------------------------------------------------------------------


def test_the_driver_streams_progress_for_loading_training_and_evaluation(ray_session, oph_root: Path, tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides(oph_root, **{"federation.rounds": 1, "report.html": "false"}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    events = list(DriverHost(cfg, str(run_dir)).rounds())
    progress = [e.progress for e in events if e.progress is not None]
    for phase in ("loading client shards", "round 1: clients trained", "round 1: clients evaluated"):
        steps = [(done, total) for p, done, total in progress if p == phase]
        assert steps[0] == (0, 3) and steps[-1] == (3, 3), (phase, steps)
        assert [done for done, _ in steps] == sorted(done for done, _ in steps)
    lines = [line for e in events for line in e.lines]
    assert any(line.startswith("round   1/1 | clients 3 |") for line in lines)  # the round line, unchanged
    assert [e.round for e in events if e.round is not None] == [1]


# --- the line budget -----------------------------------------------------------------------------


def write_medmnist(path: Path, clients: int) -> None:
    """A pneumoniamnist-format npz: 10 train, 2 val, 4 test images per client, a learnable disc."""
    rng = np.random.default_rng(0)
    disc = ((np.mgrid[:28, :28] - 13.5) ** 2).sum(axis=0) < 36
    arrays = {}
    for split, per_client in {"train": 10, "val": 2, "test": 4}.items():
        labels = rng.integers(0, 2, per_client * clients).astype(np.uint8)
        pixels = 110 + 40 * rng.standard_normal((len(labels), 28, 28)) + 40 * labels[:, None, None] * disc
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = np.clip(pixels, 0, 255).astype(np.uint8), labels[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


@pytest.mark.slow
def test_a_60_client_run_prints_under_100_lines_plus_one_per_round(tmp_path: Path) -> None:
    """stdout and stderr together, Ray's and Python's warnings included, in a pipe: no bars."""
    clients, rounds = 60, 2
    write_medmnist(tmp_path / "data" / "pneumoniamnist.npz", clients)
    overrides = [
        "data.name=medmnist", f"data.root={tmp_path / 'data'}", "data.flag=pneumoniamnist", "data.partition=iid", f"data.num_clients={clients}",
        "model.name=test_resnet", "model.img_size=16", "federation.clients_per_round=10", f"federation.rounds={rounds}", "federation.batch_size=16",
        f"eval.every={rounds}", "eval.clients=all", "eval.bootstrap=0", "report.html=false",
    ]  # fmt: skip
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, "-m", "raysim.run", "--out", str(tmp_path / "run"), *overrides], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    lines = output.splitlines()
    assert len(lines) < 100 + rounds, output
    assert "\r" not in output and "\x1b" not in output  # not a terminal: no bars
    assert sum(bool(re.match(rf"round +\d/{rounds} \| clients 10 \| train loss \d\.\d{{4}} \| \d+\.\d s/round \| elapsed ", line)) for line in lines) == rounds
    assert f"data: medmnist with {clients} clients: samples per client (min / median / max) train " in output
    assert f"test metrics after round {rounds} (x100; {clients} clients: min / median / max over clients)" in output
    assert not any(re.match(r"\s*client0\d\d[:\s]", line) for line in lines)  # no line per client
