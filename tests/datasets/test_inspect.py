"""The dataset inspector: counts that match the files, every problem listed, exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from raysim.datasets.inspect import main

NAMES = {"asian": "Asian", "black": "Black", "white": "White", "unknown": "Unknown"}


def csv_counts(root: Path, site: int, split: str) -> dict[str, int]:
    frame = pd.read_csv(root / f"meta_site{site}_race_{split}.csv")
    return {NAMES[k]: int(v) for k, v in frame["race"].value_counts().items()}


def test_json_matches_the_files(oph_root: Path, capsys) -> None:
    assert main(["--dataset", "fairfedmed_oph", "--attribute", "race", str(oph_root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["attribute"] == "race"
    assert [c["id"] for c in summary["clients"]] == ["site1", "site2", "site3"]
    for k, client in enumerate(summary["clients"], start=1):
        assert client["train"] == csv_counts(oph_root, k, "train")
        assert client["test"] == csv_counts(oph_root, k, "test")
        frame = pd.read_csv(oph_root / f"meta_site{k}_race_test.csv")
        assert client["labels"]["test"] == {"0": int((frame["glaucoma"] == "no").sum()), "1": int((frame["glaucoma"] == "yes").sum())}


@pytest.mark.slow  # a fresh interpreter in a subprocess
def test_table_and_problems_with_exit_status(oph_copy: Path) -> None:
    victims = pd.read_csv(oph_copy / "meta_site2_race_test.csv")["filename"].iloc[:2]
    for victim in victims:
        (oph_copy / "all" / victim).write_bytes(b"broken")
    proc = subprocess.run([sys.executable, "-m", "raysim.datasets.inspect", "--dataset", "fairfedmed_oph", str(oph_copy)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "attribute: race" in proc.stdout and "Black tr/te" in proc.stdout
    for victim in victims:  # every bad file is listed, not just the first
        assert f"site2/test: {oph_copy / 'all' / victim}: not a readable npz file" in proc.stderr
    assert "2 problem(s) found" in proc.stderr


def test_metadata_problem_and_unknown_dataset(oph_copy: Path, capsys) -> None:
    (oph_copy / "meta_site1_race_train.csv").unlink()
    assert main(["--dataset", "fairfedmed_oph", str(oph_copy)]) == 2  # no client readable: bad input, one line
    assert "meta_site1_race_train.csv" in capsys.readouterr().err
    assert main(["--dataset", "nosuchset", str(oph_copy)]) == 2
    assert "unknown dataset 'nosuchset'" in capsys.readouterr().err
