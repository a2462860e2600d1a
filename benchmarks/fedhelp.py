"""FedHelp vs FedAvg vs local training on 6 quantity-skewed clients: the FedHelp table.

    python benchmarks/fedhelp.py [--seeds 0 1 2] [--rounds 6] [--out DIR] [--sets synthetic medmnist]
                                 [--methods fedhelp fedavg local fedhelp+weighting=examples ...]

Two sets, both split [0.6, 0.2, 0.08, 0.06, 0.04, 0.02] (the paper's pneumonia ratios):
- `synthetic`: the embedded synthetic set with its sites pooled (the `fedhelp` preset);
- `medmnist`: a MedMNIST-format file (`pneumoniamnist.npz`, 28 px, gray) written from the
  synthetic fundus images, so the MedMNIST loader and its partitioner are exercised on a
  learnable task. Its foundation model and public set are given explicitly (the public-pool
  resnet50 that `raysim.pretrain` builds, as a local weights file; D_pub = the synthetic
  public population, `algorithm.public={population: public}`), as a user with their own data
  would.
On both sets D_pub comes from outside the clients, so FedHelp's clients train on exactly
FedAvg's and local's rows. FedAvg and local train the small model (resnet10t) only; FedHelp
adds each large client's private resnet50. Reported: the mean over small clients of test accuracy and AUC, the mean
over large clients of test accuracy (FedHelp: the private model), and MB sent per client
per round, at the evaluated round with the best mean validation accuracy (the paper's
headline is accuracy; `runs.select_round`, which the other tables use, ranks by AUC first);
mean ± sample std over seeds, in `raysim.compare`'s cells. A method may carry FedHelp
hyperparameters for an ablation (`fedhelp+kd_public=0` runs with `algorithm.kd_public=0`),
any method a full config key (`fedavg+federation.batch_size=4`).
Finished runs under --out are reused. Not part of CI.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from raysim import config
from raysim.client.pretraining import ensure_pretrained
from raysim.datasets import DATASETS
from raysim.engine.driver import finished_run
from raysim.engine.engine import Engine
from raysim.reports import compare

RATIOS = "[0.6, 0.2, 0.08, 0.06, 0.04, 0.02]"
METHODS = ("fedhelp", "fedavg", "local")


def medmnist_fixture(out: Path, img_size: int = 28) -> Path:
    """pneumoniamnist.npz in MedMNIST's exact format from the synthetic set's fundus images."""
    path = out / "pneumoniamnist.npz"
    if path.exists():
        return path
    cfg = config.load("default", [f"model.img_size={img_size}", "data.cache=false"])
    source = DATASETS.get("synthetic")(cfg.data, img_size=img_size, seed=0)
    arrays: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for spec in source.client_specs():
        for split, into in (("train", "train"), ("val", "train"), ("test", "test")):
            shard = source.load(spec, split)
            arrays[into].append(shard.images[:, 0])
            labels[into].append(shard.table.labels)
    train_x, train_y = np.concatenate(arrays["train"]), np.concatenate(labels["train"])
    n_val = len(train_x) // 10
    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        train_images=train_x[n_val:],
        train_labels=train_y[n_val:, None].astype(np.uint8),
        val_images=train_x[:n_val],
        val_labels=train_y[:n_val, None].astype(np.uint8),
        test_images=np.concatenate(arrays["test"]),
        test_labels=np.concatenate(labels["test"])[:, None].astype(np.uint8),
    )
    return path


def overrides(data_set: str, method: str, seed: int, args: argparse.Namespace) -> list[str]:
    name, *params = method.split("+")
    # `fedhelp+kd_public=0` sets algorithm.kd_public; a dotted key is a full config key (`fedavg+federation.batch_size=4`)
    settings = [p if "." in p.split("=")[0] else f"algorithm.{p}" for p in params]
    common = [f"algorithm.name={name}", f"seed={seed}", f"federation.rounds={args.rounds}", "eval.bootstrap=0", *settings]
    if name != "fedhelp":
        common.append("model.name=resnet10t")  # the same small model FedHelp shares
    if data_set == "synthetic":
        return common
    weights = ensure_pretrained(config.ModelConfig(name="resnet50", img_size=28))
    fm = f"algorithm.foundation={{backend: timm, model: resnet50, weights: '{weights}', img_size: 28}}"
    public = "algorithm.public={population: public}"  # synthetic fundus images, as the fixture's
    data = ["data.name=medmnist", f"data.root={args.out / 'medmnist-data'}", "data.partition=quantity", f"data.ratios={RATIOS}", "model.img_size=28"]
    return common + data + ([fm, public] if name == "fedhelp" else [])


def run_once(data_set: str, method: str, seed: int, args: argparse.Namespace) -> Path:
    run_dir = args.out / f"{data_set}-{method}-s{seed}"
    if (run_dir / "DONE").exists():
        return run_dir
    return finished_run(config.load("fedhelp", overrides(data_set, method, seed, args)), run_dir)


def summary(run_dir: Path, roles: dict[str, str]) -> dict[str, float]:
    """Small-client mean acc/AUC and large-client mean acc at the round with the best val accuracy."""
    m = pd.read_parquet(run_dir / "metrics.parquet")
    whole = m[(m["attribute"] == "") & (m["client"].isin(roles))]
    whole = whole.assign(role=whole["client"].map(roles))
    val = whole[(whole["split"] == "val") & (whole["metric"] == "acc")].groupby("round")["value"].mean()
    best, last = int(val.idxmax()), int(val.index.max())  # idxmax: the first of tied rounds

    def mean(role: str, metric: str, round_: int = best) -> float:
        test = whole[(whole["split"] == "test") & (whole["round"] == round_)]
        return float(test[(test["role"] == role) & (test["metric"] == metric)]["value"].mean())

    traffic = m[(m["split"] == "train") & (m["client"] != "mean") & ~m["client"].str.startswith("mean:")]
    per_client_round = traffic.groupby(["round", "client"])["value"].sum().mean() / 1e6 if len(traffic) else 0.0
    return {
        "round": best,
        "small_acc": mean("small", "acc"),
        "small_auc": mean("small", "auc"),
        "large_acc": mean("large", "acc"),
        # at the last round too: when every round ties on validation accuracy (all clients predict one
        # class at 0.5), the selected round is the first, while AUC may still be climbing
        "small_auc_last": mean("small", "auc", last),
        "large_auc_last": mean("large", "auc", last),
        "mb_per_client_round": float(per_client_round),
        "seconds": float((run_dir / "DONE").read_text()),
    }


def roles_of(data_set: str, args: argparse.Namespace) -> dict[str, str]:
    """The FedHelp roles (top 2 by training examples), also used to group FedAvg's and local's clients."""
    cfg = config.load("fedhelp", overrides(data_set, "fedhelp", 0, args))
    source = DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=0)
    specs = sorted(source.client_specs(), key=lambda s: (-s.num_train, s.id))
    return {s.id: "large" if i < 2 else "small" for i, s in enumerate(specs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sets", nargs="+", default=["synthetic", "medmnist"], choices=["synthetic", "medmnist"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods, optionally with FedHelp ablations: fedhelp+weighting=examples")
    parser.add_argument("--out", type=Path, default=Path("benchmark-runs/fedhelp"))
    args = parser.parse_args()
    args.out = args.out.resolve()
    if "medmnist" in args.sets:
        medmnist_fixture(args.out / "medmnist-data")
    Engine().open()  # Ray, and one warm pool of client actors for every run below (raysim.engine.warm)
    rows = []
    for seed in args.seeds:
        for data_set in args.sets:
            roles = roles_of(data_set, args)
            for method in args.methods:
                row = summary(run_once(data_set, method, seed, args), roles)
                rows.append({"set": data_set, "method": method, "seed": seed, **row})
                print(
                    f"{data_set:<9} {method:<8} seed {seed}: small acc {100 * row['small_acc']:.1f}, small AUC {100 * row['small_auc']:.1f}, "
                    f"large acc {100 * row['large_acc']:.1f} ({row['seconds']:.0f} s)",
                    flush=True,
                )
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "fedhelp.csv", index=False)
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}, {args.rounds} rounds, seeds {args.seeds}")
    print(table(frame))


def table(frame: pd.DataFrame) -> str:
    """One row per (set, method), seeds pooled by raysim.compare's cells (mean ± sample std, ddof = 1)."""
    pct = [("small_acc", "small acc"), ("small_auc", "small AUC"), ("large_acc", "large acc"), ("small_auc_last", "small AUC, last round"), ("large_auc_last", "large AUC, last round")]
    columns = [compare.Column(key, name, compare.pct_cell) for key, name in pct]
    columns += [
        compare.Column("mb_per_client_round", "MB / client / round", compare.mean_cell(2)),
        compare.Column("round", "round", compare.rounds_cell),
        compare.Column("seconds", "wall (s)", compare.mean_cell(0)),
    ]
    frame = frame.sort_values("seed", kind="stable")
    return compare.markdown(frame, ["set", "method"], columns) + "\n\n×100, mean ± sample std (ddof = 1) over the n seeds, at each run's round with the best mean validation accuracy."


if __name__ == "__main__":
    main()
