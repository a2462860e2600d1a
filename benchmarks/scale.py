"""Scale (issues 12 and 29): raysim against a single-process reference loop on four workloads.

    python benchmarks/scale.py [--cases cross_device cross_device_10k cross_silo tune] [--cohorts 20 200 1000]
                               [--rounds 3] [--threads N] [--out DIR] [--quick] [--flower PYTHON]
                               [--silo-overrides KEY=VALUE ...]

Each measured process is started fresh and timed from outside the same way: raysim as a user
runs it (`python -m raysim.run ... --out RUN_DIR`, started in --out, not the repo root), the
reference as `scale.py --reference SPEC` (plain torch, one process, no Ray), which prints
raysim's `data: ...` and `round N/R | ... | X s/round` lines. Per process: wall time, the
arrival time of each console line, and the machine's memory in use above the idle baseline
(`free -b`'s `used`, which procps-ng 4 computes as total - available, so Ray's shared-memory
object store counts; sampled every second, the baseline just before the process starts; every
other process on the machine counts too). Round times come from the console's own numbers
(`X s/round` is the mean since round 1 started, so round n took n x_n - (n-1) x_(n-1)), not
from arrival times: raysim's driver actor streams its lines in batches. "s/round" is the median
over the rounds after the first, so raysim's includes the previous round's checkpoint and, when
due, its evaluation. "ready" is the arrival of the last line before round 1 (raysim: start-up,
ray.init, actors started, shards loaded; the reference: data read and split); "to round n" is
ready plus the console's time of rounds 1..n. Run it on a quiet machine: other jobs distort the
memory column, and a multi-threaded reference slows down far more than single-threaded actors
when the cores are oversubscribed.

- cross_device: a MedMNIST-format `pneumoniamnist.npz` written under --out/data (28 px gray
  uint8, binary labels with a learnable bright disc, 20 train + 2 val + 5 test images per
  client, generator seed 0), 1,000 IID clients (about 17 train images each after raysim's 15 %
  validation carve), resnet18 at 28 px from scratch, 1 local epoch, Adam, the default batch
  size, lr and checkpointing, evaluated after the last round only (eval.every=R), 20 / 200 /
  1,000 clients per round. Reference: the same file and split sizes, one timm model reused in
  place (`load_state_dict` of the global weights per client), a fresh Adam per client, a
  running float64 weighted sum, as many torch threads as the pool has cores (--threads); no
  evaluation, no checkpoint. "training round": the median of the rounds between the first and
  the last (with 2 rounds, the first), raysim's with its checkpoint. With --flower PYTHON the
  cohorts of up to 200 also run on Flower's simulation engine (benchmarks/scale_flower.py in
  Flower's own venv, the same npz and settings; its round: the median after the first).
- cross_device_10k: 10,000 clients, 100 per round, test_resnet at 28 px, 3 rounds, evaluated
  after the last round only (eval.every=R): "to round R" (start-up, ray.init, actors, data
  loading and R rounds with their checkpoints) against the reference's (data loading and R
  rounds); ready and round 1 separately. The console gives no separate ray.init time.
- cross_silo: the embedded default (`python -m raysim.run`, no data arguments) against a loop
  that reads the same synthetic set through `raysim.datasets` (no Ray, no cache), builds the
  same model with `raysim.models.build_model` and does the same training and evaluation
  (predictions on val and test of every client at the same rounds; AUC); whole-process wall.

- tune: `python -m raysim.tune` on a study of the embedded default with 4 trials (a grid over
  federation.lr, FIFO, one trial at a time), once at 2 rounds per trial and once at 4. A trial's
  evaluated rounds cost the same in both, so (2 x wall(2 rounds) - wall(4 rounds)) / 4 is the
  time a trial spends outside its rounds (its driver and client actors started, its shards
  loaded, Tune's bookkeeping), with the study's own start-up (Ray, Tune) spread over its trials.

raysim's decoded-shard cache ($RAYSIM_CACHE = --out/cache) is emptied before every raysim run,
so each one decodes its images as a first run does; the data files and the synthetic set are
written once beforehand, outside every timing. One JSON per measured process under
--out/results (a finished one with the same settings is read, not rerun); console logs under
--out/logs; the Markdown tables for benchmarks/RESULTS.md are printed last and saved with the
machine in --out/scale.json. --quick shrinks everything (test_resnet, 2 rounds, 100 clients /
10 per round, 1,000 / 20, the default on 3 clients) for a smoke test of a few minutes on 2
cores. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
ROUND = re.compile(r"^round\s+(\d+)/(\d+) \| clients (\d+) \| .*?(\d+(?:\.\d+)?) s/round")
ACTORS = re.compile(r"^starting (\d+) client actors")
IMAGES_PER_CLIENT = {"train": 20, "val": 2, "test": 5}
WORKLOADS = ("cross_device", "cross_device_10k", "cross_silo", "tune")
TUNE_LRS = [3e-4, 1e-3, 3e-3, 1e-2]  # the 4 trials of the Tune study (a grid: the same trials every time)
GB = 1e9
FLOWER_MAX_PER_ROUND = 200  # Flower keeps a round's replies: 1,000 per round passes the memory cap (RESULTS.md)


# --- measuring a process from outside ----------------------------------------------------------


def memory_used() -> int:
    """`free -b`'s `used` column, in bytes."""
    out = subprocess.run(["free", "-b"], capture_output=True, text=True, check=True).stdout
    return int(next(line for line in out.splitlines() if line.startswith("Mem:")).split()[2])


class MemorySampler(threading.Thread):
    """Peak of `memory_used()` sampled every `every` seconds; the baseline is taken at construction."""

    def __init__(self, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.baseline = self.peak = memory_used()
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, memory_used())
            if self.done.wait(self.every):
                return

    def stop(self) -> float:
        """Stop sampling; the peak above the baseline in GB."""
        self.done.set()
        self.join()
        return (self.peak - self.baseline) / GB


def run_process(cmd: list[str], *, cwd: Path, log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd`, time-stamping each console line as it arrives; wall time, memory and the timeline."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sampler = MemorySampler()
    start = time.perf_counter()
    sampler.start()
    lines: list[tuple[float, str]] = []
    with log.open("w") as sink, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        sink.write(f"# {' '.join(cmd)}\n")
        assert proc.stdout is not None
        for line in proc.stdout:
            stamp = time.perf_counter() - start
            sink.write(f"{stamp:9.2f} {line}")
            lines.append((stamp, line.rstrip("\n")))
        rc = proc.wait()
    wall = time.perf_counter() - start
    result = {"rc": rc, "wall_s": wall, "memory_gb": sampler.stop(), "baseline_gb": sampler.baseline / GB, "log": str(log)}
    reported = [json.loads(text.removeprefix("RESULT ")) for _, text in lines if text.startswith("RESULT ")]
    if reported:
        result["reported"] = reported[-1]
    if rc != 0:
        result["tail"] = [text for _, text in lines[-15:]]
    return result | timeline(lines, wall)


def timeline(lines: list[tuple[float, str]], wall: float) -> dict[str, Any]:
    """Phase and round times from the console.

    A round's time comes from the console's own numbers (the round line's `X s/round` is the
    mean since round 1 started: round n took n x_n - (n - 1) x_(n-1)), so it does not depend on
    when the lines reach this process (raysim's driver actor streams them in batches: the
    start-up lines at once when every actor is ready, a round's line after its evaluation and
    checkpoint). The arrival times give the phases: ready (the last line before round 1:
    start-up, ray.init, actors started and shards loaded), round 1, the last round, the end.
    """
    rounds = [(t, int(m[1]), float(m[4])) for t, text in lines if (m := ROUND.match(text))]
    data = next((t for t, text in lines if text.startswith("data: ")), None)
    actors = next((int(m[1]) for _, text in lines if (m := ACTORS.match(text))), None)
    first = rounds[0][0] if rounds else wall
    before = [t for t, _ in lines if t < first]
    ready = before[-1] if before else data
    out: dict[str, Any] = {"to_data_s": data, "to_ready_s": ready, "actors": actors, "rounds_done": len(rounds)}
    if not rounds:
        return out
    stamps = [t for t, _, _ in rounds]
    cumulative = [n * mean for _, n, mean in rounds]
    times = [cumulative[0], *np.diff(cumulative)]
    out.update(  # to round n: ready + the console's time of rounds 1..n (the arrival may come after that round's evaluation)
        to_first_round_s=(ready or 0.0) + cumulative[0],
        to_last_round_s=(ready or 0.0) + cumulative[-1],
        after_last_round_s=wall - stamps[-1],  # after the last round line arrived: shutdown, exit
        round_times_s=[float(t) for t in times],
        round_s=float(statistics.median(times[1:]) if len(times) > 1 else times[0]),
        round_arrivals_s=[float(t) for t in [stamps[0] - (ready or 0.0), *np.diff(stamps)]],
        last_round_arrival_s=stamps[-1],
    )
    return out


def read_log(path: Path) -> list[tuple[float, str]]:
    """The (arrival time, line) pairs of a log written by `run_process`."""
    pairs = []
    for line in path.read_text().split("\n")[1:]:
        stamp, _, text = line.lstrip().partition(" ")
        try:
            pairs.append((float(stamp), text))
        except ValueError:  # the empty end of the file
            continue
    return pairs


def measured(out: Path, name: str, params: dict[str, Any], run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`'s result, saved under --out/results; a finished one with the same params is read instead."""
    path = out / "results" / f"{name}.json"
    params = json.loads(json.dumps(params))
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("params") == params and saved.get("rc") == 0:
            print(f"{name}: read from {path}", flush=True)
            if Path(saved["log"]).exists():  # the phases again from the time-stamped log, as this version reads them
                saved.update(timeline(read_log(Path(saved["log"])), saved["wall_s"]))
            saved.setdefault("test_auc", saved.get("reported", {}).get("test_auc"))
            return saved
    print(f"{name}: running ...", flush=True)
    result = {"params": params, "date": time.strftime("%Y-%m-%d %H:%M"), **run()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    status = "ok" if result["rc"] == 0 else f"FAILED (rc {result['rc']}; {result['log']})"
    print(f"{name}: {status}, wall {result['wall_s']:.1f} s, {result.get('round_s', float('nan')):.2f} s/round, memory {result['memory_gb']:.2f} GB above idle", flush=True)
    return result


def child_env(out: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAYSIM_CACHE": str(out / "cache")}
    env.pop("RAY_ADDRESS", None)  # a local measurement: never join a cluster
    return env


def run_raysim(out: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(out / "cache" / "shards", ignore_errors=True)  # every run decodes its images
    cmd = [sys.executable, "-m", "raysim.run", "--out", str(run_dir), *overrides]
    result = run_process(cmd, cwd=out, log=out / "logs" / f"{name}.log", env=child_env(out))
    if result["rc"] == 0:
        result["test_auc"] = final_test_auc(run_dir)
    return result


def run_tune(out: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    """The 4-trial study of the embedded default with `overrides` (federation.rounds), whole process."""
    import yaml

    study = {
        "base": {"config": "default", "overrides": overrides}, "search_space": {"federation.lr": {"grid_search": TUNE_LRS}},
        "objective": "auc", "mode": "max", "num_samples": 1, "scheduler": {"name": "fifo"}, "max_concurrent_trials": 1,
    }  # fmt: skip
    path = out / "specs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(study))
    study_dir = out / "runs" / name
    shutil.rmtree(study_dir, ignore_errors=True)
    shutil.rmtree(out / "cache" / "shards", ignore_errors=True)  # the first trial decodes, as a first run does
    return run_process([sys.executable, "-m", "raysim.tune", str(path), "--out", str(study_dir)], cwd=out, log=out / "logs" / f"{name}.log", env=child_env(out))


def tune_table(result: dict[str, dict[str, Any]], trials: int) -> list[str]:
    short, long_ = result["short"], result["long"]
    if short["rc"] or long_["rc"]:
        return ["", f"Tune study: failed ({short['log']}, {long_['log']})"]
    outside = (2 * short["wall_s"] - long_["wall_s"]) / trials
    rounds = (long_["wall_s"] - short["wall_s"]) / trials
    return [
        "",
        f"A {trials}-trial Tune study of the embedded default (`python -m raysim.tune`, FIFO, one trial at a time), whole process:",
        "",
        "| rounds per trial | study wall (s) | memory (GB) |",
        "|---|---|---|",
        f"| {result['short']['rounds']} | {short['wall_s']:.1f} | {short['memory_gb']:.2f} |",
        f"| {result['long']['rounds']} | {long_['wall_s']:.1f} | {long_['memory_gb']:.2f} |",
        "",
        f"Per trial: {outside:.1f} s outside its rounds (the study's start-up spread over its trials), {rounds:.1f} s for each {result['short']['rounds']} rounds.",
    ]


def run_reference(out: Path, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    path = out / "specs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1))
    result = run_process([sys.executable, str(HERE), "--reference", str(path)], cwd=out, log=out / "logs" / f"{name}.log", env=child_env(out))
    return result | {"test_auc": result.get("reported", {}).get("test_auc")}


def final_test_auc(run_dir: Path) -> float | None:
    """Mean over clients of the test AUC at the last evaluated round (None if unreadable)."""
    try:
        import pandas as pd

        m = pd.read_parquet(run_dir / "metrics.parquet")
    except (ImportError, OSError, ValueError):
        return None
    auc = m[(m["client"] == "mean") & (m["split"] == "test") & (m["metric"] == "auc") & (m["attribute"] == "") & (m["group"] == "")]
    return float(auc.sort_values("round")["value"].iloc[-1]) if len(auc) else None


# --- data ------------------------------------------------------------------------------------


def write_medmnist(folder: Path, clients: int, seed: int = 0) -> Path:
    """A pneumoniamnist-format npz for `clients` clients (written once; deterministic)."""
    path = folder / "pneumoniamnist.npz"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    disc = (((yy - 13.5) ** 2 + (xx - 13.5) ** 2) < 36).astype(np.float32)
    arrays = {}
    for split, per_client in IMAGES_PER_CLIENT.items():
        n = per_client * clients
        labels = rng.integers(0, 2, n).astype(np.uint8)
        images = np.empty((n, 28, 28), dtype=np.uint8)
        for lo in range(0, n, 20_000):  # chunks: bounded float memory at 10,000 clients
            hi = min(n, lo + 20_000)
            pixels = 110 + 40 * rng.standard_normal((hi - lo, 28, 28), dtype=np.float32) + 40 * labels[lo:hi, None, None] * disc
            images[lo:hi] = np.clip(pixels, 0, 255).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.reshape(-1, 1)
    tmp = folder / "partial.npz"
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


# --- the reference loop (runs as `scale.py --reference SPEC`) -----------------------------------


class Reference:
    """One model reused in place; a fresh optimizer per client; a running float64 weighted sum."""

    def __init__(self, model: Any, spec: dict[str, Any], channels: int) -> None:
        import torch

        self.torch, self.model, self.spec = torch, model, spec
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.25, 0.25, 0.25)), dtype=torch.float32)
        if channels != len(mean):
            mean, std = mean.mean().repeat(channels), std.mean().repeat(channels)
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        state = model.state_dict()
        self.global_state = {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}
        self.sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in self.global_state.items()}

    def inputs(self, images: np.ndarray) -> Any:
        x = self.torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
        return (x - self.mean) / self.std

    def optimizer(self) -> Any:
        s, params = self.spec, self.model.parameters()
        if s["optimizer"] == "sgd":
            return self.torch.optim.SGD(params, lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
        return getattr(self.torch.optim, {"adam": "Adam", "adamw": "AdamW"}[s["optimizer"]])(params, lr=s["lr"], weight_decay=s["weight_decay"])

    def fit(self, images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[float, int]:
        """Local epochs from the global weights; returns the summed batch losses and the steps."""
        torch, model, n = self.torch, self.model, len(labels)
        model.load_state_dict(self.global_state, strict=False)
        model.train()
        optimizer, total, steps = self.optimizer(), 0.0, 0
        for epoch in range(self.spec["local_epochs"]):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).numpy()
            for lo in range(0, n, self.spec["batch_size"]):
                index = order[lo : lo + self.spec["batch_size"]]
                if len(index) == 1 and n > 1:
                    continue  # as raysim: a single-sample batch breaks BatchNorm
                optimizer.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(self.inputs(images[index])), torch.from_numpy(labels[index]))
                loss.backward()
                optimizer.step()
                total, steps = total + loss.item(), steps + 1
        return total, steps

    def round(self, clients: list[tuple[np.ndarray, np.ndarray]], round_: int) -> float:
        """Train every client from the global weights and replace them by the weighted mean; the mean loss."""
        for s in self.sums.values():
            s.zero_()
        weight, total, steps = 0, 0.0, 0
        for i, (images, labels) in enumerate(clients):
            loss, n_steps = self.fit(images, labels, seed=round_ * 1_000_000 + i)
            state = self.model.state_dict()
            for k, s in self.sums.items():
                s.add_(state[k], alpha=len(labels))
            weight, total, steps = weight + len(labels), total + loss, steps + n_steps
        self.global_state = {k: (s / weight).to(self.global_state[k].dtype) for k, s in self.sums.items()}
        return total / max(steps, 1)

    def checkpoint(self, path: Path) -> None:
        """The global model, written as raysim writes a checkpoint: to a temporary name, fsynced, renamed."""
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        with partial.open("wb") as sink:
            torch.save(self.model.state_dict(), sink)
            sink.flush()
            os.fsync(sink.fileno())
        partial.replace(path)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of the global model, in batches of 256 (raysim's evaluation batch)."""
        self.model.load_state_dict(self.global_state, strict=False)
        self.model.eval()
        with self.torch.no_grad():
            probs = [self.torch.softmax(self.model(self.inputs(images[lo : lo + 256])), dim=1) for lo in range(0, len(images), 256)]
        return self.torch.cat(probs).numpy()


def run_rounds(loop: Reference, clients: list[tuple[np.ndarray, np.ndarray]], spec: dict[str, Any], evaluate: Callable[[int], str] | None = None) -> None:
    """The rounds, printing raysim's round line (and an evaluation line when due)."""
    rounds, start = spec["rounds"], time.perf_counter()
    for round_ in range(1, rounds + 1):
        chosen = np.random.default_rng([spec["seed"], round_]).choice(len(clients), size=min(spec["per_round"], len(clients)), replace=False)
        loss = loop.round([clients[i] for i in sorted(chosen)], round_)
        elapsed = time.perf_counter() - start
        print(f"round {round_:>3}/{rounds} | clients {len(chosen)} | train loss {loss:.4f} | {elapsed / round_:.3f} s/round", flush=True)
        if evaluate is not None and (round_ % spec["eval_every"] == 0 or round_ == rounds):
            print(f"test metrics after round {round_} (reference: {evaluate(round_)})", flush=True)
        if spec.get("checkpoint_dir") and (round_ % spec["checkpoint_every"] == 0 or round_ == rounds):
            loop.checkpoint(Path(spec["checkpoint_dir"]) / f"round_{round_:04d}.pt")


def reference_medmnist(spec: dict[str, Any]) -> dict[str, Any]:
    """The npz read once, IID split sizes with a stratified validation carve, training only."""
    import timm

    with np.load(spec["npz"]) as data:
        images, labels = data["train_images"][:, None], data["train_labels"].reshape(-1).astype(np.int64)
    parts = np.array_split(np.random.default_rng(spec["seed"]).permutation(len(labels)), spec["clients"])
    clients = []
    for part in parts:  # raysim's carve: round(val_fraction x count) of each label go to validation
        val = np.concatenate([part[labels[part] == c][: int(round(spec["val_fraction"] * np.sum(labels[part] == c)))] for c in np.unique(labels[part])])
        train = np.setdiff1d(part, val)
        clients.append((images[train], labels[train]))
    model = timm.create_model(spec["model"], num_classes=max(2, int(labels.max()) + 1), in_chans=1)
    print(f"data: reference with {len(clients)} clients ({sum(len(y) for _, y in clients)} train images)", flush=True)
    run_rounds(Reference(model, spec, channels=1), clients, spec)
    return {"train_images": sum(len(y) for _, y in clients)}


def reference_silo(spec: dict[str, Any]) -> dict[str, Any]:
    """The run's own config and data source (plain Python, no cache), the same evaluation rounds."""
    from sklearn.metrics import roc_auc_score

    from raysim import config
    from raysim.datasets import DATASETS
    from raysim.models.backbones import build_model

    cfg = config.load(None, spec["overrides"])
    source = DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed)
    specs = source.client_specs()
    shards = {s.id: {split: source.load(s, split) for split in s.splits} for s in specs}
    model = build_model(cfg.model, num_classes=source.num_classes, in_chans=source.channels, seed=cfg.seed, slices=source.volume_slices)
    print(f"data: reference with {len(specs)} clients: " + ", ".join(f"{cid} ({len(s['train'].table)} train)" for cid, s in shards.items()), flush=True)
    loop = Reference(model, spec, channels=source.channels)
    aucs: dict[int, dict[str, float]] = {}

    def evaluate(round_: int) -> str:
        def auc(split: str, cid: str) -> float:
            probs, y = loop.predict(shards[cid][split].images), shards[cid][split].table.labels
            try:
                return float(roc_auc_score(y, probs[:, 1])) if probs.shape[1] == 2 else float(roc_auc_score(y, probs, multi_class="ovr"))
            except ValueError:  # one class only
                return float("nan")

        aucs[round_] = {split: float(np.nanmean([auc(split, cid) for cid in shards])) for split in ("val", "test")}
        return f"mean AUC val {100 * aucs[round_]['val']:.1f}, test {100 * aucs[round_]['test']:.1f}"

    clients = [(s["train"].images, s["train"].table.labels.astype(np.int64)) for s in shards.values()]
    run_rounds(loop, clients, spec, evaluate)
    return {"test_auc": aucs[max(aucs)]["test"] if aucs else None}


def floor_main() -> None:
    """What no run can start faster than: raysim's private local Ray alone (`connect_ray`), then
    one empty client actor answering its first call (its process started and every module a
    client actor imports imported: torch, timm, the methods)."""
    start = time.perf_counter()
    from raysim.engine.client_actor import ClientActor
    from raysim.engine.driver import connect_ray

    imported = time.perf_counter()
    connect_ray(os.cpu_count())
    ray_ready = time.perf_counter()
    import ray

    actor = ClientActor.options(num_cpus=1).remote()
    ray.get(actor.reset.remote())
    actor_ready = time.perf_counter()
    print("RESULT " + json.dumps({"import_s": imported - start, "ray_init_s": ray_ready - imported, "actor_ready_s": actor_ready - ray_ready, "floor_s": actor_ready - start}), flush=True)


def warm_main(spec_path: Path) -> None:
    """The run of `spec` twice in one Engine (`raysim.Engine`): the first starts every actor, the
    second finds them warm. Per run: wall, ready, s/round (as `timeline` reads the console)."""
    spec = json.loads(spec_path.read_text())
    from raysim import Engine, config

    results = []
    with Engine() as engine:
        for n in (1, 2):
            out = Path(spec["out"]) / f"run{n}"
            shutil.rmtree(out, ignore_errors=True)
            lines: list[tuple[float, str]] = []
            start = time.perf_counter()
            engine.run(config.load(None, spec["overrides"]), out, echo=lambda line, start=start, lines=lines: lines.append((time.perf_counter() - start, line)))
            wall = time.perf_counter() - start
            for stamp, line in lines:
                print(f"[run {n} {stamp:8.2f}] {line}", flush=True)
            results.append({"wall_s": wall, **timeline(lines, wall)})
    print("RESULT " + json.dumps({"runs": results}), flush=True)


def run_flower(out: Path, name: str, python: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The same cross-device workload on Flower's simulation engine (benchmarks/scale_flower.py, in
    Flower's own venv: `python`): the same npz, clients, cohort, rounds, model and optimiser."""
    numbers = out / "results" / f"{name}.numbers.json"
    cmd = [str(python), str(HERE.parent / "scale_flower.py"), "--data", spec["npz"], "--clients", str(spec["clients"]), "--per-round", str(spec["per_round"]),
           "--rounds", str(spec["rounds"]), "--model", spec["model"], "--epochs", str(spec["local_epochs"]), "--batch-size", str(spec["batch_size"]), "--lr", str(spec["lr"]),
           "--val-fraction", str(spec["val_fraction"]), "--seed", str(spec["seed"]), "--out", str(numbers)]  # fmt: skip
    env = {k: v for k, v in child_env(out).items() if not k.startswith(("RAY_", "VIRTUAL_ENV"))}  # Flower starts its own Ray
    result = run_process(cmd, cwd=out, log=out / "logs" / f"{name}.log", env=env)
    if result["rc"] == 0:
        flower = json.loads(numbers.read_text())
        result |= {"round_s": flower["round_median_after_first_s"], "memory_gb": flower["mem_peak_above_idle_gb"], "flower": flower}
    return result


def run_floor(out: Path, name: str) -> dict[str, Any]:
    return run_process([sys.executable, str(HERE), "--floor"], cwd=out, log=out / "logs" / f"{name}.log", env=child_env(out))


def run_warm(out: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    path = out / "specs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"overrides": overrides, "out": str(out / "runs" / name)}, indent=1))
    shutil.rmtree(out / "cache" / "shards", ignore_errors=True)  # the first run decodes its images, as the cold one does
    return run_process([sys.executable, str(HERE), "--warm", str(path)], cwd=out, log=out / "logs" / f"{name}.log", env=child_env(out))


def reference_main(spec_path: Path) -> None:
    import torch

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    result = {"medmnist": reference_medmnist, "silo": reference_silo}[spec["kind"]](spec)
    print("RESULT " + json.dumps(result), flush=True)


# --- the workloads ---------------------------------------------------------------------------


@dataclass
class Case:
    name: str  # results file stem
    workload: str
    label: str  # the table's row label
    overrides: list[str]  # raysim's
    reference: dict[str, Any]  # the reference loop's spec


def reference_spec(kind: str, overrides: list[str], threads: int, **extra: Any) -> dict[str, Any]:
    """The reference's settings, read from the same resolved config raysim runs with."""
    from raysim import config

    cfg = config.load(None, overrides)
    fed = cfg.federation
    return {
        "kind": kind, "overrides": overrides, "threads": threads, "seed": cfg.seed, "model": cfg.model.name, "rounds": fed.rounds,
        "per_round": fed.clients_per_round or 10**9, "local_epochs": fed.local_epochs, "batch_size": fed.batch_size, "optimizer": fed.optimizer,
        "lr": fed.lr, "momentum": fed.momentum, "weight_decay": fed.weight_decay, "eval_every": cfg.eval.every, "val_fraction": cfg.data.val_fraction,
        "checkpoint_every": cfg.checkpoint.every, **extra,
    }  # fmt: skip


def medmnist_cases(args: argparse.Namespace, workload: str, clients: int, cohorts: list[int], model: str, extra: list[str]) -> list[Case]:
    npz = write_medmnist(args.out / "data" / f"medmnist-{clients}-clients", clients)
    cases = []
    for k in cohorts:
        overrides = [
            "data.name=medmnist", f"data.root={npz.parent}", "data.flag=pneumoniamnist", "data.partition=iid", f"data.num_clients={clients}",
            f"model.name={model}", "model.img_size=28", "model.pretrained=false", "federation.optimizer=adam", "federation.local_epochs=1",
            f"federation.clients_per_round={k}", f"federation.rounds={args.rounds}", *extra,
        ]  # fmt: skip
        spec = reference_spec("medmnist", overrides, args.threads, npz=str(npz), clients=clients)
        cases.append(Case(f"{workload}-{clients}c-{k}pr-{args.rounds}r-{model}", workload, f"{clients:,} / {k:,}", overrides, spec))
    return cases


def build_cases(args: argparse.Namespace) -> list[Case]:
    quick, cases = args.quick, []
    if "cross_device" in args.cases:
        # evaluated after the last round only, so the rounds before it are training rounds to compare
        cases += medmnist_cases(args, "cross_device", 100 if quick else 1000, args.cohorts, "test_resnet" if quick else "resnet18", [f"eval.every={args.rounds}"])
    if "cross_device_10k" in args.cases:
        clients, k = (1000, 20) if quick else (10_000, 100)
        cases += medmnist_cases(args, "cross_device_10k", clients, [k], "test_resnet", [f"eval.every={args.rounds}"])
    if "cross_silo" in args.cases:
        overrides = (["federation.rounds=2", "model.name=test_resnet"] if quick else []) + args.silo_overrides
        from raysim import config
        from raysim.datasets import DATASETS

        cfg = config.load(None, overrides)
        DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed).client_specs()  # generated once, untimed
        overrides.append("report.html=false")  # the reference writes no report
        name = "cross_silo" + "".join(f"-{o.replace('=', '_')}" for o in overrides)
        checkpoints = str(args.out / "runs" / f"{name}.reference" / "checkpoints")  # the reference checkpoints as often as raysim
        cases.append(Case(name, "cross_silo", "embedded default", overrides, reference_spec("silo", overrides, args.threads, checkpoint_dir=checkpoints)))
    return cases


# --- report ----------------------------------------------------------------------------------


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    git = ["git", "-C", str(HERE.parent.parent)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run([*git, "status", "--porcelain", "--", "raysim", "algorithms", "datasets"], capture_output=True, text=True).stdout.strip())
    versions = {}
    for package in ("raysim", "torch", "ray", "timm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "?"
    return {
        "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
        "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, "python": platform.python_version(),
        "versions": versions, "commit": commit + ("+local changes" if dirty else ""), "reference_threads": args.threads, "argv": sys.argv[1:],
    }  # fmt: skip


def training_round(run: dict[str, Any]) -> float | None:
    """A round that only trains (the cross-device cases evaluate after the last round only): the
    median of the rounds between the first (warm-up) and the last; with 2 rounds, the first."""
    times = run.get("round_times_s") or []
    if run["rc"] != 0 or not times:
        return None
    return float(statistics.median(times[1:-1])) if len(times) > 2 else times[0]


def cell(run: dict[str, Any], key: str, digits: int = 1, scale: float = 1.0) -> str:
    if run["rc"] != 0:
        return f"failed (rc {run['rc']})"
    value = run.get(key)
    return "-" if value is None or np.isnan(value) else f"{scale * value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


Column = tuple[str, str, int, float, bool]  # title, result key, digits, scale, compared (a ratio row cell)


def side_by_side(columns: list[Column], r: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """raysim, reference and their ratio as rows of one table."""
    lines = ["| | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cell(run, key, d, scale) for _, key, d, scale, _ in columns) + " |" for label, run in (("raysim", r), ("reference", ref))]
    return lines + ["| ratio | " + " | ".join(ratio(r.get(key), ref.get(key)) if compared else "" for _, key, _, _, compared in columns) + " |"]


def tables(machine: dict[str, Any], cases: list[Case], results: dict[str, dict[str, dict[str, Any]]]) -> str:
    v = machine["versions"]
    lines = [
        f"{machine['date']}, `{machine['host']}` ({machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']:.0f} GiB), Python {machine['python']}, "
        f"torch {v['torch']}, Ray {v['ray']}, timm {v['timm']}, raysim {v['raysim']} ({machine['commit']}); reference loop: {machine['reference_threads']} torch threads. "
        f"`python benchmarks/scale.py {' '.join(machine['argv'])}`. Memory: GB in use above idle (peak); s/round: median after round 1; "
        "ready: start-up, ray.init, actors started and shards loaded (raysim), data read and split (reference).",
    ]
    by_workload = {w: [c for c in cases if c.workload == w] for w in WORKLOADS}
    if by_workload["cross_device"]:
        c0 = by_workload["cross_device"][0]
        lines += ["", f"Cross-device, {c0.reference['model']} at 28 px, {c0.reference['rounds']} rounds:", "",
                  "| clients / per round | raysim training round (s) | reference (s) | ratio | Flower round (s) | ratio to Flower | raysim memory | reference memory | Flower memory | raysim to round 1 (s) | raysim wall (s) | reference wall (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in by_workload["cross_device"]:
            r, ref = results[c.name]["raysim"], results[c.name]["reference"]
            flower = results[c.name].get("flower") or {"rc": 0}
            train, ref_train = training_round(r), training_round(ref)
            cells = [f"{train:.2f}" if train else "-", f"{ref_train:.2f}" if ref_train else "-", ratio(train, ref_train), cell(flower, "round_s", 2), ratio(train, flower.get("round_s")),
                     cell(r, "memory_gb", 2), cell(ref, "memory_gb", 2), cell(flower, "memory_gb", 2), cell(r, "to_first_round_s"), cell(r, "wall_s"), cell(ref, "wall_s")]  # fmt: skip
            lines.append(f"| {c.label} | " + " | ".join(cells) + " |")
    for c in by_workload["cross_device_10k"]:
        rounds = c.reference["rounds"]
        lines += ["", f"{c.label} clients per round, {c.reference['model']} at 28 px, {rounds} rounds, evaluated after the last:", ""]
        columns: list[Column] = [("to ready (s)", "to_ready_s", 1, 1, True), ("to round 1 (s)", "to_first_round_s", 1, 1, True), (f"to round {rounds} (s)", "to_last_round_s", 1, 1, True),
                                 ("s/round", "round_s", 2, 1, True), ("wall (s)", "wall_s", 1, 1, True), ("memory (GB)", "memory_gb", 2, 1, False)]  # fmt: skip
        lines += side_by_side(columns, results[c.name]["raysim"], results[c.name]["reference"])
    for c in by_workload["cross_silo"]:
        lines += ["", f"Cross-silo, the embedded default{' with ' + ' '.join(c.overrides) if c.overrides else ''} (whole process):", ""]
        columns = [("wall (s)", "wall_s", 1, 1, True), ("to ready (s)", "to_ready_s", 1, 1, True), ("to round 1 (s)", "to_first_round_s", 1, 1, True), ("s/round", "round_s", 2, 1, True),
                   ("memory (GB)", "memory_gb", 2, 1, False), ("mean test AUC", "test_auc", 1, 100, False)]  # fmt: skip
        lines += side_by_side(columns, results[c.name]["raysim"], results[c.name]["reference"])
        lines += start_up_table(results[c.name])
    if "tune" in results:
        lines += tune_table(results["tune"], len(TUNE_LRS))
    return "\n".join(lines)


def start_up_table(result: dict[str, dict[str, Any]]) -> list[str]:
    """The cold CLI run against the floor, and the second run in one Engine against the reference."""
    floor, warm, cold, ref = result.get("floor"), result.get("warm"), result["raysim"], result["reference"]
    if not floor or floor.get("rc") or not warm or warm.get("rc"):
        return []
    f = floor["reported"]
    runs = warm["reported"]["runs"]
    lines = [
        "",
        f"Start-up: the floor is a private `ray.init` ({f['ray_init_s']:.1f} s) plus one empty client actor ready ({f['actor_ready_s']:.1f} s) after "
        f"importing raysim's engine ({f['import_s']:.1f} s): {f['floor_s']:.1f} s. The same run twice in one `Engine` (whole `engine.run` each):",
        "",
        "| | wall (s) | to ready (s) | s/round | wall / reference wall |",
        "|---|---|---|---|---|",
        f"| cold CLI (`python -m raysim.run`) | {cold['wall_s']:.1f} | {cold.get('to_ready_s') or float('nan'):.1f} | {cold.get('round_s', float('nan')):.2f} | {ratio(cold['wall_s'], ref['wall_s'])} |",
    ]
    for n, run in enumerate(runs, start=1):
        lines.append(f"| Engine run {n} | {run['wall_s']:.1f} | {run.get('to_ready_s') or float('nan'):.1f} | {run.get('round_s', float('nan')):.2f} | {ratio(run['wall_s'], ref['wall_s'])} |")
    lines.append(f"| reference (one process) | {ref['wall_s']:.1f} | {ref.get('to_ready_s') or float('nan'):.1f} | {ref.get('round_s', float('nan')):.2f} | 1.00x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--cohorts", nargs="+", type=int, default=None, help="cross_device clients per round (default 20 200 1000; --quick: 10)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the cross-device workloads (default 3; --quick: 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the reference loop (default: all cores, as raysim's pool)")
    parser.add_argument("--out", type=Path, default=None, help="default benchmark-runs/scale (--quick: benchmark-runs/scale-quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke test of a few minutes")
    parser.add_argument(
        "--flower",
        type=Path,
        metavar="PYTHON",
        help=f"also run the cross_device cohorts of up to {FLOWER_MAX_PER_ROUND} per round on Flower with this python (a venv with flwr[simulation]; see scale_flower.py)",
    )
    parser.add_argument("--silo-overrides", nargs="+", default=[], metavar="KEY=VALUE", help="raysim overrides for the cross_silo case, e.g. resources.actors=3 (its own results)")
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)  # internal: run one reference loop
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)  # internal: measure the start-up floor
    parser.add_argument("--warm", type=Path, help=argparse.SUPPRESS)  # internal: one run twice in one Engine
    args = parser.parse_args()
    if args.reference:
        reference_main(args.reference)
        return
    if args.floor:
        floor_main()
        return
    if args.warm:
        warm_main(args.warm)
        return
    args.cohorts = args.cohorts or ([10] if args.quick else [20, 200, 1000])
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.out = (args.out or Path("benchmark-runs/scale-quick" if args.quick else "benchmark-runs/scale")).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["RAYSIM_CACHE"] = str(args.out / "cache")
    machine = machine_info(args)
    cases = build_cases(args)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for case in cases:
        results[case.name] = {
            "raysim": measured(args.out, f"{case.name}.raysim", {"overrides": case.overrides}, lambda c=case: run_raysim(args.out, f"{c.name}.raysim", c.overrides)),
            "reference": measured(args.out, f"{case.name}.reference", case.reference, lambda c=case: run_reference(args.out, f"{c.name}.reference", c.reference)),
        }
        if case.workload == "cross_device" and args.flower and case.reference["per_round"] <= FLOWER_MAX_PER_ROUND:
            params = {"python": str(args.flower), **case.reference}
            results[case.name]["flower"] = measured(args.out, f"{case.name}.flower", params, lambda c=case: run_flower(args.out, f"{c.name}.flower", args.flower, c.reference))
        if case.workload == "cross_silo":  # the floor, and the same run twice in one Engine (issue 29)
            results[case.name]["floor"] = measured(args.out, f"{case.name}.floor", {"floor": 1}, lambda c=case: run_floor(args.out, f"{c.name}.floor"))
            results[case.name]["warm"] = measured(args.out, f"{case.name}.warm", {"overrides": case.overrides}, lambda c=case: run_warm(args.out, f"{c.name}.warm", c.overrides))
    if "tune" in args.cases:  # no reference loop: the study at two budgets (see the module docstring)
        tune = {}
        for key, rounds in (("short", 2), ("long", 4)):
            overrides = [f"federation.rounds={rounds}", *(["model.name=test_resnet"] if args.quick else [])]
            name = "tune-" + "-".join(o.replace("=", "_") for o in overrides)
            tune[key] = measured(args.out, name, {"overrides": overrides, "lrs": TUNE_LRS}, lambda n=name, o=overrides: run_tune(args.out, n, o)) | {"rounds": rounds}
        results["tune"] = tune
    text = tables(machine, cases, results)
    (args.out / "scale.json").write_text(json.dumps({"machine": machine, "results": results, "tables": text}, indent=1))
    print("\n" + text)


if __name__ == "__main__":
    main()
