"""raysim's cross-device workload on Flower's simulation engine, for the ratio in RESULTS.md.

Runs in its own virtual environment: Flower pins its own Ray, which must never be installed
into raysim's. This file does not import raysim. Recipe (versions of the last measured run):

    python3.11 -m venv /tmp/flwr/.venv
    /tmp/flwr/.venv/bin/pip install "flwr[simulation]" torch==2.14.1 torchvision==0.29.1 timm numpy
    # resolved: flwr 1.42.0, ray 2.55.1, torch 2.14.1, torchvision 0.29.1, timm 1.0.31, numpy 2.4.6

    /tmp/flwr/.venv/bin/python benchmarks/scale_flower.py --data DATA.npz --clients 1000 --per-round 20 --rounds 3 --out flower-20.json
    # alone (no npz from benchmarks/scale.py): a deterministic synthetic file of the same shape
    /tmp/flwr/.venv/bin/python benchmarks/scale_flower.py --make-data /tmp/flwr/synth.npz --clients 100 --per-round 10 --rounds 2

The workload is raysim's (benchmarks/scale.py): the npz's train split partitioned IID over
``--clients`` clients (seeded), each client holding out ``--val-fraction`` of its share as
validation (raysim's ``data.val_fraction``) and training on the rest; timm resnet18 from
scratch (2 classes, 1 channel, 28 px); 1 local epoch of Adam (lr 1e-3, batch 32, no weight
decay: raysim's embedded default); FedAvg weighted by examples over ``--per-round`` clients
sampled each round (Flower's ``FedAvg`` strategy, ``Strategy.start`` through
``flwr.simulation.run_simulation``). Each client gets ``--cpus-per-client`` CPUs from Ray
and as many torch threads, so Flower runs (CPUs / cpus-per-client) clients at once, like
raysim's actor pool. Client-side evaluation is off unless ``--fraction-evaluate`` > 0.

The ClientApp builds a fresh model for every message, as Flower's PyTorch quickstart does;
``--reuse-model`` keeps one model per Ray actor and loads each client's arrays into it (how
raysim and pfl-research work), which separates Flower's engine cost from that idiom.

Measured: time from the call until the strategy starts (nodes registered), each round's wall
time (the first also pays Ray's start, the actor pool, the workers' imports and data loading;
so the median of the rounds after the first), total wall time, and machine memory in use
above the idle baseline (``free -b`` used, sampled every second; peak minus the sample before
the start) and, since other jobs move that, the peak PSS of this process tree (Ray included). Prints a Markdown row; ``--out`` writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

# Set before Flower is imported: no telemetry (nothing outside this machine is reachable).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

log = logging.getLogger("scale_flower")

KEYS = tuple(f"{split}_{kind}" for split in ("train", "val", "test") for kind in ("images", "labels"))

# Per Ray actor process (this module is imported there by name, so these persist across messages).
_DATA: dict[tuple[str, int, int, float], list[tuple[np.ndarray, np.ndarray]]] = {}
_MODELS: dict[str, nn.Module] = {}


# --- data ---------------------------------------------------------------------------------


def make_data(path: Path, train: int, seed: int = 0) -> None:
    """Write a deterministic MedMNIST-format npz: uint8 28x28 gray images, binary labels (N, 1)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", train), ("val", max(train // 10, 2)), ("test", max(train // 10, 2))):
        labels = rng.integers(0, 2, size=(n, 1), dtype=np.uint8)
        images = rng.normal(100, 30, size=(n, 28, 28))
        images[:, 10:18, 10:18] += 60.0 * labels[:, :, None]  # a learnable blob for class 1
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def client_shards(path: str, clients: int, seed: int, val_fraction: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every client's training (images, labels): an IID split of the train set, validation carved off."""
    key = (path, clients, seed, val_fraction)
    if key not in _DATA:
        with np.load(path) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise ValueError(f"{path} is not MedMNIST-format: missing {missing}")
            images, labels = npz["train_images"], npz["train_labels"].reshape(-1).astype(np.int64)
        if images.ndim != 3:
            raise ValueError(f"{path}: expected gray images (N, H, W), got {images.shape}")
        rng = np.random.default_rng(seed)
        shards = []
        for part in np.array_split(rng.permutation(len(labels)), clients):
            keep = np.sort(rng.permutation(part)[int(round(val_fraction * len(part))) :])
            shards.append((images[keep], labels[keep]))
        _DATA[key] = shards
    return _DATA[key]


# --- client -------------------------------------------------------------------------------


def build_model(name: str) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=2, in_chans=1)


def client_model(cfg: ConfigRecord) -> nn.Module:
    """A fresh model (Flower's quickstart idiom), or with `reuse-model` this actor's one model."""
    name = str(cfg["model"])
    if not cfg["reuse-model"]:
        return build_model(name)
    if name not in _MODELS:
        _MODELS[name] = build_model(name)
    return _MODELS[name]


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, img_size: int, generator: torch.Generator):
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size].numpy()
        x = torch.from_numpy(images[idx]).to(torch.float32).div_(255.0).sub_(0.5).div_(0.5).unsqueeze(1)
        if x.shape[-1] != img_size:
            x = nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
        yield x, torch.from_numpy(labels[idx])


client_app = ClientApp()


def received(msg: Message, context: Context) -> tuple[Any, int, np.ndarray, np.ndarray, nn.Module]:
    """A message's config, this client's partition id and shard, and the model with the sent weights."""
    cfg = msg.content["config"]
    torch.set_num_threads(int(cfg["threads"]))
    pid = int(context.node_config["partition-id"])
    images, labels = client_shards(str(cfg["data"]), int(cfg["clients"]), int(cfg["seed"]), float(cfg["val-fraction"]))[pid]
    model = client_model(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return cfg, pid, images, labels, model


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    cfg, pid, images, labels, model = received(msg, context)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]))
    generator = torch.Generator().manual_seed(int(cfg["seed"]) * 1_000_003 + int(cfg["server-round"]) * 10_007 + pid)
    total, steps = 0.0, 0
    loop0 = time.process_time()
    for _ in range(int(cfg["epochs"])):
        for x, y in batches(images, labels, int(cfg["batch-size"]), int(cfg["img-size"]), generator):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
    loop_cpu = time.process_time() - loop0
    arrays = ArrayRecord(model.state_dict())
    # Seconds inside this function: wall, CPU, and CPU of the batch loop alone (FedAvg reports their means).
    timings = {"client-s": time.perf_counter() - wall0, "client-cpu-s": time.process_time() - cpu0, "loop-cpu-s": loop_cpu}
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"train-loss": total / max(steps, 1), **timings, "num-examples": len(labels)})})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, pid, images, labels, model = received(msg, context)
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for x, y in batches(images, labels, 256, int(cfg["img-size"]), torch.Generator().manual_seed(0)):
            logits = model(x)
            loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
    n = max(len(labels), 1)
    return Message(content=RecordDict({"metrics": MetricRecord({"eval-loss": loss / n, "eval-acc": correct / n, "num-examples": len(labels)})}), reply_to=msg)


# --- measurement --------------------------------------------------------------------------


def used_bytes() -> int:
    """Machine memory in use: the `used` column of `free -b`."""
    for line in subprocess.run(["free", "-b"], capture_output=True, text=True, check=True).stdout.splitlines():
        if line.startswith("Mem:"):
            return int(line.split()[2])
    raise RuntimeError("`free -b` printed no Mem: line")


def tree_stats(root: int) -> tuple[int, float]:
    """PSS bytes and CPU seconds (user + system) of `root` and its live descendants (Ray's GCS,
    raylet, workers). PSS counts shared pages (the object store) once in all, unlike RSS sums;
    neither moves with other jobs on the machine, unlike `free`'s used and wall time."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            children.setdefault(int(fields[1]), []).append(pid)
            cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    pss, seconds, todo = 0, 0.0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        seconds += cpu.get(pid, 0.0)
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return pss, seconds


class MemorySampler(threading.Thread):
    """Samples `free -b` used and this process tree's PSS every second; stops the run if used
    climbs `limit` bytes above the baseline."""

    def __init__(self, limit: float) -> None:
        super().__init__(daemon=True)
        self.baseline = used_bytes()
        self.peak = self.baseline
        self.pss_peak = tree_stats(os.getpid())[0]
        self.limit = limit
        self.exceeded = False
        self.stopped = threading.Event()

    def run(self) -> None:
        import _thread

        while not self.stopped.wait(1.0):
            self.peak = max(self.peak, used_bytes())
            self.pss_peak = max(self.pss_peak, tree_stats(os.getpid())[0])
            if self.peak - self.baseline > self.limit and not self.exceeded:
                self.exceeded = True
                log.error("memory above idle passed %.1f GB: stopping the run", self.limit / 1e9)
                _thread.interrupt_main()


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    """The run as a Markdown table row, with the ClientApp's own time per client (rounds after the first)."""
    rounds, v = result["round_s"], result["versions"]
    steady = [m for r, m in result["client_means_per_round"].items() if int(r) > 1] or list(result["client_means_per_round"].values())

    def client(key: str) -> str:
        return f"{statistics.mean(m[key] for m in steady):.2f}" if steady else "-"

    return "\n".join(
        [
            "",
            "| engine | clients | per round | rounds | model per client | start -> strategy s | each round s (1st: with Ray and actor start) | s / round (median after first) "
            "| tree CPU s / round (driver process) | ClientApp s / client (wall, CPU, batch-loop CPU) | total s | GB above idle | tree PSS GB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| flower {v['flwr']} (ray {v['ray']}) | {args.clients} | {args.per_round} | {len(rounds)}/{args.rounds} | {'reuse' if args.reuse_model else 'fresh'} "
            f"| {fmt(result['start_to_strategy_s'])} | {' / '.join(f'{r:.1f}' for r in rounds) or '-'} | {fmt(result['round_median_after_first_s'])} "
            f"| {fmt(result['round_cpu_median_after_first_s'])} ({fmt(result['round_driver_cpu_median_after_first_s'])}) | {client('client-s')}, {client('client-cpu-s')}, {client('loop-cpu-s')} "
            f"| {result['total_s']:.1f} | {result['mem_peak_above_idle_gb']:.2f} | {result['process_tree_pss_peak_gb']:.2f} |",
        ]
    )


def versions() -> dict[str, str]:
    import flwr
    import ray

    return {"python": platform.python_version(), "flwr": flwr.__version__, "ray": ray.__version__, "torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__}


# --- driver -------------------------------------------------------------------------------


def server_app(args: argparse.Namespace, marks: list[tuple[float, float, float]], metrics: dict[int, dict[str, Any]]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(args.seed)  # FedAvg samples nodes with `random`
        torch.manual_seed(args.seed)
        initial = ArrayRecord(build_model(args.model).state_dict())
        strategy = FedAvg(
            fraction_train=args.per_round / args.clients,
            fraction_evaluate=args.fraction_evaluate,
            min_train_nodes=args.per_round,
            min_evaluate_nodes=max(1, int(args.fraction_evaluate * args.clients)) if args.fraction_evaluate else 0,
            min_available_nodes=args.clients,
        )
        config = ConfigRecord(
            {
                "data": str(args.data),
                "clients": args.clients,
                "seed": args.seed,
                "val-fraction": args.val_fraction,
                "model": args.model,
                "img-size": args.img_size,
                "lr": args.lr,
                "batch-size": args.batch_size,
                "epochs": args.epochs,
                "threads": args.threads,
                "reuse-model": args.reuse_model,
            }
        )

        def mark(server_round: int, arrays: ArrayRecord) -> None:
            # before round 1 and after every round: wall clock, CPU of the process tree, CPU of this process (ServerApp, SuperLink, engine threads)
            marks.append((time.perf_counter(), tree_stats(os.getpid())[1], time.process_time()))
            return None

        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=args.rounds, train_config=config, evaluate_config=ConfigRecord(dict(config)), evaluate_fn=mark)
        metrics.update({r: dict(m) for r, m in result.train_metrics_clientapp.items()})

    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--data", type=Path, help="MedMNIST-format npz (as benchmarks/scale.py writes it)")
    p.add_argument("--make-data", type=Path, help="write a deterministic synthetic npz here (train: --train-per-client x --clients images); used unless --data is given")
    p.add_argument("--train-per-client", type=int, default=20, help="--make-data only: train images per client before the validation carve (default 20)")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--per-round", type=int, default=20, help="clients sampled each round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--fraction-evaluate", type=float, default=0.0, help="share of all clients evaluated each round (0: no client-side evaluation)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs Ray may use (default: all)")
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per client")
    p.add_argument("--reuse-model", action="store_true", help="one model per Ray actor, loaded in place per client")
    p.add_argument("--mem-limit-gb", type=float, default=16.0, help="stop if memory above idle passes this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the numbers here as JSON")
    args = p.parse_args(argv)
    if args.make_data is None and args.data is None:
        p.error("give --data PATH or --make-data PATH")
    if not 0 < args.per_round <= args.clients:
        p.error(f"--per-round must be in [1, --clients={args.clients}], got {args.per_round}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    log.addHandler(logging.StreamHandler())  # Flower's own logger already prints to the console
    log.setLevel(logging.INFO)
    args = parse_args(argv)
    if args.make_data is not None:
        make_data(args.make_data, args.train_per_client * args.clients, args.seed)
        args.data = args.data or args.make_data
    args.data = args.data.resolve()
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))  # Ray workers import this module
    sys.path.insert(0, here)
    import scale_flower  # by name, so Ray pickles the ClientApp's functions by reference

    backend_config = {
        "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": args.cpus, "num_gpus": 0, "include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True},
    }
    marks: list[tuple[float, float, float]] = []
    metrics: dict[int, dict[str, Any]] = {}
    sampler = MemorySampler(args.mem_limit_gb * 1e9)
    sampler.start()
    start = time.perf_counter()
    aborted = None
    try:
        run_simulation(server_app=server_app(args, marks, metrics), client_app=scale_flower.client_app, num_supernodes=args.clients, backend_config=backend_config)
    except KeyboardInterrupt:
        aborted = "memory limit" if sampler.exceeded else "interrupted"
    total = time.perf_counter() - start
    sampler.stopped.set()
    sampler.join()
    rounds = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    round_cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    driver_cpu = [b[2] - a[2] for a, b in zip(marks, marks[1:])]
    steady = rounds[1:] or rounds
    result = {
        "engine": "flower",
        "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "cpus_used": args.cpus, "processor": platform.processor() or platform.machine()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "start_to_strategy_s": marks[0][0] - start if marks else None,
        "round_s": rounds,
        "round_median_after_first_s": statistics.median(steady) if steady else None,
        "round_cpu_s": round_cpu,
        "round_cpu_median_after_first_s": statistics.median(round_cpu[1:] or round_cpu) if round_cpu else None,
        "round_driver_cpu_s": driver_cpu,
        "round_driver_cpu_median_after_first_s": statistics.median(driver_cpu[1:] or driver_cpu) if driver_cpu else None,
        "total_s": total,
        "mem_baseline_gb": sampler.baseline / 1e9,
        "mem_peak_above_idle_gb": (sampler.peak - sampler.baseline) / 1e9,
        "process_tree_pss_peak_gb": sampler.pss_peak / 1e9,
        "client_means_per_round": metrics,
        "completed_rounds": len(rounds),
        "aborted": aborted,
    }
    print(markdown(result, args))
    if aborted:
        print(f"aborted: {aborted}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
