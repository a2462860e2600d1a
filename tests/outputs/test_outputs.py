"""Run outputs: appended Parquet parts (no rewrites), truncation for resume and replay,
`eval.predictions`, and pseudonymised sample ids whose key never reaches the run directory."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim import config, secrets
from raysim.config import ConfigError
from raysim.outputs import recorder
from raysim.outputs.recorder import METRIC_COLUMNS, RunRecorder
from raysim.types import Predictions

from helpers import load_config, make_driver, tiny_overrides

KEY = "k3y-for-tests-0123456789abcdef"


def metric_rows(round_: int, metric: str = "auc", clients: int = 3) -> pd.DataFrame:
    rows = [(round_, "val", f"site{i}", "", "race", "Black", metric, 0.1 * i) for i in range(1, clients + 1)]
    rows.append((round_, "val", "mean", "", "", "", metric, float("nan")))  # NaN values survive the round trip
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def predictions(client: str = "site1", n: int = 5) -> list[Predictions]:
    ids = np.array([f"patient{10000 + i}/study{i}/view1_frontal.jpg" for i in range(n)])
    return [Predictions(client, "val", ids, np.arange(n) % 2, np.linspace(0.1, 0.9, n), {"race": np.arange(n) % 3}, "")]


def record(recorder: RunRecorder, round_: int) -> None:
    """One round as the driver records it: its traffic rows, then an evaluation."""
    recorder.add(metric_rows(round_, "bytes_up"), [])
    recorder.add(metric_rows(round_), recorder.prediction_frames(round_, predictions(), ["race"]))


def stamps(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


# --- appended parts ---------------------------------------------------------------------------


def test_each_round_appends_parts_and_never_rewrites_earlier_ones(tmp_path: Path) -> None:
    run_recorder = RunRecorder(tmp_path)
    seen: dict[str, dict[str, tuple[int, int, int]]] = {"metrics": {}, "predictions": {}}
    written = []
    for round_ in range(1, 13):
        record(run_recorder, round_)
        new_bytes = 0
        for output, before in seen.items():
            now = stamps(tmp_path / f"{output}.parquet")
            assert {name: now[name] for name in before} == before  # same inode, mtime and size: untouched
            new = set(now) - set(before)
            assert new == ({f"part-r{round_:06d}-k00.parquet", f"part-r{round_:06d}-k01.parquet"} if output == "metrics" else {f"part-r{round_:06d}-k00.parquet"})
            new_bytes += sum(now[name][2] for name in new)
            seen[output] = now
        written.append(new_bytes)
    assert max(written) <= 1.05 * written[0]  # a round writes its own rows: the same bytes in round 12 as in round 1
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "metrics.parquet"), run_recorder.metrics, check_exact=True)
    assert run_recorder.metrics["round"].dtype == np.int64 and run_recorder.metrics["value"].dtype == np.float64
    assert list(run_recorder.metrics.columns) == METRIC_COLUMNS
    preds = pd.read_parquet(tmp_path / "predictions.parquet")
    assert len(preds) == 12 * 5 and list(preds["round"].unique()) == list(range(1, 13))  # parts in round order


def test_truncate_drops_later_parts_and_a_resumed_recorder_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    full = RunRecorder(tmp_path / "full")
    for round_ in range(1, 5):
        record(full, round_)

    cut = RunRecorder(tmp_path / "cut")
    for round_ in range(1, 4):  # round 3 done, but the last checkpoint is round 2
        record(cut, round_)
    (tmp_path / "cut" / "metrics.parquet" / ".part-r000003-k02.parquet.tmp").write_bytes(b"half a write")
    resumed = RunRecorder(tmp_path / "cut")
    resumed.load_existing()
    resumed.truncate(2)
    for output in ("metrics", "predictions"):
        names = sorted(p.name for p in (tmp_path / "cut" / f"{output}.parquet").iterdir())
        assert names and all(re.fullmatch(r"part-r00000[12]-k0[01]\.parquet", name) for name in names), names
    pd.testing.assert_frame_equal(resumed.metrics, pd.read_parquet(tmp_path / "cut" / "metrics.parquet"), check_exact=True)
    assert set(resumed.metrics["round"]) == {1, 2}

    for round_ in (3, 4):  # the replayed round 3 writes the names it wrote before
        record(resumed, round_)
    assert stamps(tmp_path / "cut" / "metrics.parquet").keys() == stamps(tmp_path / "full" / "metrics.parquet").keys()
    pd.testing.assert_frame_equal(resumed.metrics, full.metrics, check_exact=True)
    for output in ("metrics", "predictions"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "cut" / f"{output}.parquet"), pd.read_parquet(tmp_path / "full" / f"{output}.parquet"), check_exact=True)

    resumed.truncate(0)  # a recovery before the first checkpoint starts from nothing
    assert resumed.metrics.empty and not list((tmp_path / "cut" / "metrics.parquet").iterdir())


def test_a_fresh_recorder_replaces_what_an_earlier_start_left(tmp_path: Path) -> None:
    """A run started again from scratch (no checkpoint to resume) owns its outputs, as when each
    was one file rewritten; a recorder only built (the CLI's check before Ray) touches nothing."""
    first = RunRecorder(tmp_path)
    for round_ in (1, 2, 3):
        record(first, round_)
    RunRecorder(tmp_path)  # built, never written
    assert len(list((tmp_path / "metrics.parquet").iterdir())) == 6
    again = RunRecorder(tmp_path)
    record(again, 1)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "metrics.parquet"), again.metrics, check_exact=True)
    assert set(pd.read_parquet(tmp_path / "predictions.parquet")["round"]) == {1}


def test_an_older_single_file_output_becomes_parts_on_resume(tmp_path: Path) -> None:
    rows = pd.concat([metric_rows(1), metric_rows(2), metric_rows(3)], ignore_index=True)
    rows.to_parquet(tmp_path / "metrics.parquet", index=False)
    preds = pd.concat([recorder.prediction_rows(r, predictions(), ["race"]) for r in (1, 2, 3)], ignore_index=True)
    preds.to_parquet(tmp_path / "predictions.parquet", index=False)
    run_recorder = RunRecorder(tmp_path)
    run_recorder.load_existing()
    run_recorder.truncate(2)
    assert (tmp_path / "metrics.parquet").is_dir() and (tmp_path / "predictions.parquet").is_dir()
    expected = rows[rows["round"] <= 2].reset_index(drop=True)
    pd.testing.assert_frame_equal(run_recorder.metrics, expected, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "metrics.parquet"), expected, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "predictions.parquet"), preds[preds["round"] <= 2].reset_index(drop=True), check_exact=True)


# --- eval.predictions and pseudonymisation ----------------------------------------------------


@pytest.mark.parametrize(("keep", "rounds"), [("all", {1, 2, 3}), ("final", {3}), ("none", set())])
def test_eval_predictions_keeps_every_evaluation_the_final_one_or_none(tmp_path: Path, keep: str, rounds: set[int]) -> None:
    run_recorder = RunRecorder(tmp_path, predictions=keep, final_round=3)
    for round_ in (1, 2, 3):
        record(run_recorder, round_)
    folder = tmp_path / "predictions.parquet"
    assert folder.exists() == bool(rounds)  # none: no predictions file at all
    if rounds:
        assert set(pd.read_parquet(folder)["round"]) == rounds
    assert set(pd.read_parquet(tmp_path / "metrics.parquet")["round"]) == {1, 2, 3}  # metrics whatever the switch


def test_pseudonyms_are_stable_for_a_key_differ_across_keys_and_hide_the_id() -> None:
    ids = predictions(n=50)[0].sample_ids
    first = secrets.pseudonym(ids, KEY.encode())
    assert list(first) == list(secrets.pseudonym(ids, KEY.encode()))  # stable: joinable across rounds and runs
    assert all(re.fullmatch(r"[0-9a-f]{16}", p) for p in first) and len(set(first)) == len(ids)
    other = secrets.pseudonym(ids, b"another-key-of-enough-bytes")
    assert not set(first) & set(other)
    for original, hashed in zip(ids, first):
        assert not any(part in hashed for part in re.findall(r"\d{3,}", original))  # no patient or study number

    rows = recorder.prediction_rows(4, predictions(n=50), ["race"], id_key=KEY.encode())
    assert list(rows["sample_id"]) == list(first)
    plain = recorder.prediction_rows(4, predictions(n=50), ["race"])
    pd.testing.assert_frame_equal(rows.drop(columns="sample_id"), plain.drop(columns="sample_id"), check_exact=True)


def test_the_key_comes_from_the_key_file_or_the_environment_and_must_be_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(secrets.ID_KEY_ENV, raising=False)
    run_dir = tmp_path / "run"
    assert secrets.id_key(config.EvalConfig(), run_dir) is None  # off by default
    with pytest.raises(ConfigError, match=r"eval.pseudonymize=true needs a key: set \$RAYSIM_ID_KEY or eval.id_key_file"):
        secrets.id_key(config.EvalConfig(pseudonymize=True), run_dir)
    monkeypatch.setenv(secrets.ID_KEY_ENV, f"  {KEY}\n")
    assert secrets.id_key(config.EvalConfig(pseudonymize=True), run_dir) == KEY.encode()
    monkeypatch.setenv(secrets.ID_KEY_ENV, "short")
    with pytest.raises(ConfigError, match=r"\$RAYSIM_ID_KEY: the pseudonymisation key has 5 bytes, fewer than 16"):
        secrets.id_key(config.EvalConfig(pseudonymize=True), run_dir)

    key_file = tmp_path / "secrets" / "id.key"
    key_file.parent.mkdir()
    key_file.write_text("from-the-file-0123456789\n")
    assert secrets.id_key(config.EvalConfig(pseudonymize=True, id_key_file=str(key_file)), run_dir) == b"from-the-file-0123456789"  # the file wins
    with pytest.raises(ConfigError, match="eval.id_key_file .*missing.key: cannot read"):
        secrets.id_key(config.EvalConfig(pseudonymize=True, id_key_file=str(tmp_path / "missing.key")), run_dir)
    inside = run_dir / "checkpoints" / "id.key"
    inside.parent.mkdir(parents=True)
    inside.write_text(KEY)
    with pytest.raises(ConfigError, match="lies in the run directory"):
        secrets.id_key(config.EvalConfig(pseudonymize=True, id_key_file=str(inside)), run_dir)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["eval.predictions=some"], "eval.predictions must be one of all, final, none; got 'some'"),
        (["eval.pseudonymize=yes please"], "eval.pseudonymize must be true or false"),
        (["eval.id_key_file=/keys/id.key"], "eval.id_key_file is set but eval.pseudonymize is false"),
        (["eval.pseudonymize=true", "eval.id_key_file=id.key"], "eval.id_key_file must be an absolute path"),
    ],
)
def test_config_errors_name_the_key(override: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_cli_refuses_to_start_without_a_key(oph_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from raysim import run

    monkeypatch.delenv(secrets.ID_KEY_ENV, raising=False)
    code = run.main(["--out", str(tmp_path / "run"), *tiny_overrides(oph_root, **{"eval.pseudonymize": "true"})])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == run.EXIT_BAD_INPUT and len(err) == 1, err
    assert err[0].startswith("error: eval.pseudonymize=true needs a key") and "RAYSIM_ID_KEY" in err[0]
    assert not (tmp_path / "run").exists()  # nothing trained, nothing recorded: the refused run leaves no trace


# --- through the driver -----------------------------------------------------------------------


def test_a_run_writes_final_pseudonymised_predictions_or_none_and_the_same_metrics(ray_session, oph_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.delenv(secrets.ID_KEY_ENV, raising=False)
    key_file = tmp_path / "id.key"
    key_file.write_text(KEY + "\n")
    plain = make_driver(oph_root, tmp_path / "plain").run()
    hashed = make_driver(oph_root, tmp_path / "hashed", **{"eval.predictions": "final", "eval.pseudonymize": "true", "eval.id_key_file": str(key_file)}).run()
    silent = make_driver(oph_root, tmp_path / "silent", **{"eval.predictions": "none"}).run()
    pd.testing.assert_frame_equal(plain, hashed, check_exact=True)  # what is recorded, not what is measured
    pd.testing.assert_frame_equal(plain, silent, check_exact=True)
    for name in ("plain", "hashed", "silent"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / name / "metrics.parquet"), plain, check_exact=True)

    every = pd.read_parquet(tmp_path / "plain" / "predictions.parquet")
    final = pd.read_parquet(tmp_path / "hashed" / "predictions.parquet")
    assert set(every["round"]) == {1, 2} and set(final["round"]) == {2}
    expected = every[every["round"] == 2].reset_index(drop=True)
    expected["sample_id"] = secrets.pseudonym(expected["sample_id"], KEY.encode())
    pd.testing.assert_frame_equal(final, expected, check_exact=True)
    assert not set(final["sample_id"]) & set(every["sample_id"])
    assert not (tmp_path / "silent" / "predictions.parquet").exists()  # nothing patient-level to copy (Tune checkpoints the run directory)

    saved = load_config(tmp_path / "hashed" / "config.yaml")
    assert saved.eval.pseudonymize and saved.eval.id_key_file == str(key_file)  # the key's place, never the key
    for path in (tmp_path / "hashed").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert KEY.encode() not in data and KEY.encode().hex().encode() not in data, path
