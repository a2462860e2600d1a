"""`python -m raysim.doctor`: does raysim work on this node? One line per check, a summary,
exit 0 when every check holds (1 when one fails, 2 for a bad flag).

    python -m raysim.doctor                      # on a CPU or GPU node, offline
    python -m raysim.doctor --json doctor.json   # also the results as JSON

It starts a private Ray (loopback only, as a run does) and checks, with raysim's own actors:

- **ray**: Ray sees this node's CPUs and as many GPUs as torch does;
- **actors share a device**: four actors of `--share` each (GPU fraction on a GPU node, CPU
  fraction otherwise) run at once, on the same GPU;
- **memory cap**: on a GPU, each of them caps its allocator as a client actor does
  (`client_actor.cap_gpu_memory`); an allocation past the cap fails inside that actor only,
  in one line, while the others allocate within theirs;
- **client actors on the device**: a tiny `test_resnet` run (3 synthetic clients, 2 rounds)
  whose client actors ask for `--share` of a GPU reports them on CUDA (on a CPU node: on the CPU);
- **bit-identical**: that run again, in the same actors, gives the same metrics bit for bit;
  if not, the ops that warned under deterministic mode are named;
- **mixed precision**: on a GPU, the run in bf16 and in fp16 finishes with finite losses (a CPU
  actor refuses lower precision: skipped there);
- **GPU fold**: on a GPU, whether the float64 weighted mean summed there (`resources.gpu_fold`)
  equals the CPU's bit for bit (either answer passes; it says which placement class it is).

A check that cannot apply here (no GPU) is `skip`, not a failure. Nothing is downloaded; the
runs go to a temporary folder (`--out` keeps them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raysim import cli

OK, SKIP, FAIL = "ok", "skip", "FAIL"


@dataclass
class Result:
    name: str
    status: str  # OK, SKIP or FAIL
    detail: str
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)  # numbers behind the line (--json)


@dataclass
class Node:
    """What the checks share: the Engine (its private Ray), whether a GPU is here, where runs go."""

    engine: Any
    gpus: int
    share: float
    out: Path
    runs: dict[str, Path] = field(default_factory=dict)
    probes: list[Any] = field(default_factory=list)  # the sharing check's actors, which the cap check uses and stops


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m raysim.doctor", description="Check raysim on this node (CPU or GPU): one line per check, exit 0 when all hold.")
    parser.add_argument("--share", type=float, default=0.25, help="the GPU (or, on a CPU node, CPU) fraction each checked actor asks for (default 0.25: four share a device)")
    parser.add_argument("--out", help="keep the tiny runs in this new folder (default: a temporary folder, removed)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.share <= 0.5:
        print(f"error: python -m raysim.doctor: --share must be in (0, 0.5] (two or more actors on one device), got {args.share:g}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    try:
        check_paths(args.out, args.json)
    except cli.InputError as err:
        print(f"error: python -m raysim.doctor: {err}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    with contextlib.ExitStack() as stack:
        out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="raysim-doctor-")))
        out.mkdir(parents=True, exist_ok=True)
        results = run_checks(out, args.share)
    failed = [r for r in results if r.status == FAIL]
    counts = {status: sum(r.status == status for r in results) for status in (OK, SKIP, FAIL)}
    print(f"raysim doctor: {len(results)} checks: {counts[OK]} ok, {counts[SKIP]} skipped, {counts[FAIL]} failed")
    if args.json:
        Path(args.json).write_text(json.dumps({"node": node_facts(), "results": [asdict(r) for r in results]}, indent=2, default=str))
    return 1 if failed else 0


def check_paths(out: str | None, json_file: str | None) -> None:
    """--out new or empty, --json a file in an existing folder: refused before Ray starts."""
    cli.check_out_dir(out)
    if out is not None and Path(out).is_dir() and any(Path(out).iterdir()):
        raise cli.InputError(f"--out {out} is not empty; give a new or empty folder")
    if json_file is not None:
        path = Path(json_file)
        if path.is_dir():
            raise cli.InputError(f"--json {json_file} is a directory; give a file name")
        if not path.parent.is_dir():
            raise cli.InputError(f"--json {json_file}: {path.parent} is not an existing directory")


def node_facts() -> dict[str, Any]:
    import ray
    import torch

    import raysim

    facts: dict[str, Any] = {"python": platform.python_version(), "raysim": raysim.__version__, "torch": torch.__version__, "ray": ray.__version__, "cpus": os.cpu_count()}
    facts["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return facts


def run_checks(out: Path, share: float) -> list[Result]:
    """Every check in order, each line printed as it finishes; a check that raises is a FAIL
    naming the exception (the next checks still run)."""
    import torch

    from raysim.engine.engine import Engine

    facts = node_facts()
    print(
        f"raysim {facts['raysim']}, torch {facts['torch']} (CUDA {facts['cuda']}), ray {facts['ray']}, Python {facts['python']}, {facts['cpus']} CPUs"
        + (f", GPU {facts['gpus'][0]}" if facts.get("gpus") else ", no GPU")
    )
    results = []
    with Engine() as engine:
        node = Node(engine, torch.cuda.device_count() if torch.cuda.is_available() else 0, share, out)
        for name, check in CHECKS:
            start = time.monotonic()
            try:
                result = check(node)
            except Exception as err:  # noqa: BLE001 - a check that breaks is that check's failure, reported in one line
                result = Result(name, FAIL, f"{type(err).__name__}: {cli.one_line(err)[:300]}")
            result.name, result.seconds = name, round(time.monotonic() - start, 1)
            print(f"{result.status:>4}  {name}: {result.detail} ({result.seconds:g} s)", flush=True)
            results.append(result)
    return results


# --- the checks ---------------------------------------------------------------------------------


def check_ray(node: Node) -> Result:
    import ray

    have = ray.cluster_resources()
    cpus, gpus = int(have.get("CPU", 0)), int(have.get("GPU", 0))
    data = {"ray_cpus": cpus, "ray_gpus": gpus, "torch_gpus": node.gpus, "os_cpus": os.cpu_count()}
    if gpus != node.gpus:
        return Result("", FAIL, f"Ray sees {gpus} GPUs, torch {node.gpus}: check CUDA_VISIBLE_DEVICES and the driver", data=data)
    return Result("", OK, f"a private Ray sees {cpus} CPUs and {gpus} GPUs (torch: {node.gpus})", data=data)


def check_sharing(node: Node) -> Result:
    """Four probe actors at `share` at once: on a GPU node, all on one GPU, each capped; one
    allocating past its cap fails inside itself only."""
    import ray

    n = min(4, int(1 / node.share))
    options = {"num_gpus": node.share, "num_cpus": 0} if node.gpus else {"num_cpus": node.share}
    probes = [Probe.options(**options).remote(node.share) for _ in range(n)]
    try:
        facts = ray.get([p.facts.remote() for p in probes], timeout=300)
        pids = {f["pid"] for f in facts}
        if len(pids) != n:
            return Result("", FAIL, f"{n} actors asked for, {len(pids)} processes answered")
        if not node.gpus:
            return Result("", OK, f"{n} actors at {node.share:g} CPU each ran at once on the CPU", data={"facts": facts})
        devices = {(tuple(f["gpu_ids"]), f["device_name"]) for f in facts}
        if len(devices) != 1 or any(f["device"] != "cuda" for f in facts):
            return Result("", FAIL, f"the {n} actors did not share one GPU: {sorted(devices)}", data={"facts": facts})
        return Result("", OK, f"{n} actors at {node.share:g} GPU each ran at once on {facts[0]['device_name']} (Ray GPU ids {facts[0]['gpu_ids']})", data={"facts": facts})
    finally:
        node.probes = probes


def check_memory_cap(node: Node) -> Result:
    import ray

    probes = node.probes
    try:
        if not node.gpus:
            return Result("", SKIP, "no GPU: the per-actor memory cap applies to CUDA only")
        over, *within = [p.allocate.remote(factor) for p, factor in zip(probes, [1.25] + [0.5] * (len(probes) - 1), strict=True)]
        failed, fine = ray.get(over, timeout=120), ray.get(within, timeout=120)
        data = {"past_cap": failed, "within_cap": fine}
        if failed["ok"] or not all(r["ok"] for r in fine):
            return Result("", FAIL, f"past the cap: {failed}; within: {fine}", data=data)
        cap_gib = failed["cap_bytes"] / 1024**3
        return Result(
            "",
            OK,
            f"cap {failed['cap']:.4f} of the GPU ({cap_gib:.1f} GiB) per actor: {failed['asked'] / 1024**3:.1f} GiB failed in that actor only ({failed['error']}); "
            f"{len(fine)} others allocated {fine[0]['asked'] / 1024**3:.1f} GiB each",
            data=data,
        )
    finally:
        for probe in probes:
            ray.kill(probe)


def tiny_run(node: Node, name: str, **overrides: object) -> tuple[Path, dict[str, Any]]:
    """The tiny run (3 synthetic clients of 300 patients, test_resnet at 32 px, 2 rounds, scored
    after the second) in the doctor's Engine."""
    from raysim import config

    settings: dict[str, object] = {
        "data.name": "synthetic",
        "model.name": "test_resnet",
        "model.img_size": 32,
        "federation.rounds": 2,
        "federation.batch_size": 16,
        "data.patients": 300,  # a small synthetic set: generated in seconds, cached like the default's
        "eval.every": 2,  # scored after the last round only
        "eval.bootstrap": 0,
        "report.html": False,
        "resources.num_gpus": node.share if node.gpus else 0,
        "resources.num_cpus": node.share,
        **overrides,
    }
    cfg = config.load(None, [f"{k}={v}" for k, v in settings.items()])
    run_dir = Path(node.engine.run(cfg, node.out / name, echo=lambda _: None))
    node.runs[name] = run_dir
    return run_dir, json.loads((run_dir / "provenance.json").read_text())


def check_client_actors(node: Node) -> Result:
    _, provenance = tiny_run(node, "fp32-a")
    devices = sorted({f"cuda ({m['gpu']})" if m.get("gpu") else "cpu" for m in provenance.get("actor_machines", [])})
    want = "cuda" if node.gpus else "cpu"
    data = {"devices": devices, "actor_machines": provenance.get("actor_machines")}
    if not devices or any(not d.startswith(want) for d in devices):
        return Result("", FAIL, f"client actors computed on {devices or 'nothing reported'}, expected {want}", data=data)
    share = f"{node.share:g} GPU" if node.gpus else f"{node.share:g} CPU"
    return Result("", OK, f"a tiny test_resnet run (3 clients, 2 rounds) ran its client actors ({share} each) on {', '.join(devices)}", data=data)


def check_bit_identical(node: Node) -> Result:
    import pandas as pd

    first = node.runs.get("fp32-a") or tiny_run(node, "fp32-a")[0]
    second, _ = tiny_run(node, "fp32-b")
    a, b = (pd.read_parquet(d / "metrics.parquet") for d in (first, second))
    try:
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    except AssertionError:
        warned = nondeterministic_ops(node)
        return Result("", FAIL, f"the same run twice gave other metrics; ops that warned under deterministic mode: {', '.join(warned) or 'none'}", data={"warned": warned})
    return Result("", OK, f"the same run again (its actors warm) gave the same {len(a)} metric values bit for bit")


def nondeterministic_ops(node: Node) -> list[str]:
    import ray

    options = {"num_gpus": node.share, "num_cpus": 0} if node.gpus else {"num_cpus": node.share}
    probe = Probe.options(**options).remote(node.share)
    try:
        return ray.get(probe.deterministic_warnings.remote("test_resnet", 32), timeout=300)
    finally:
        ray.kill(probe)


def check_precision(node: Node) -> Result:
    import pandas as pd

    if not node.gpus:
        return Result("", SKIP, "no GPU: bf16 / fp16 are for GPU actors (a CPU actor refuses them in one line)")
    losses = {}
    for mode in ("bf16", "fp16"):
        run_dir, _ = tiny_run(node, mode, **{"federation.precision": mode})
        frame = pd.read_parquet(run_dir / "metrics.parquet")
        losses[mode] = [float(v) for v in frame[(frame["metric"] == "loss") & (frame["split"] == "train")]["value"]]
    finite = all(values and all(math.isfinite(v) for v in values) for values in losses.values())
    detail = "; ".join(f"{mode}: train losses {', '.join(f'{v:.4f}' for v in values) or 'none recorded'}" for mode, values in losses.items())
    return Result("", OK if finite else FAIL, f"the tiny run finished in bf16 and fp16 ({detail})", data=losses)


def check_gpu_fold(node: Node) -> Result:
    """Whether the weighted mean summed on the GPU (`resources.gpu_fold`) equals the CPU's, bit
    for bit: either answer is a pass; it says whether the two are one placement class."""
    import ray

    if not node.gpus:
        return Result("", SKIP, "no GPU: resources.gpu_fold needs a driver with a GPU share")
    probe = Probe.options(num_gpus=node.share, num_cpus=0).remote(node.share)
    try:
        found = ray.get(probe.fold_equality.remote(), timeout=300)
    finally:
        ray.kill(probe)
    if found["equal"]:
        return Result("", OK, f"the float64 weighted mean of {found['clients']} resnet18-sized updates on the GPU equals the CPU's bit for bit", data=found)
    return Result("", OK, f"the GPU fold differs from the CPU's (max |diff| {found['max_abs_diff']:.3g} over {found['clients']} updates): a different placement class, as the README says", data=found)


CHECKS: list[tuple[str, Callable[[Node], Result]]] = [
    ("ray", check_ray),
    ("actors share a device", check_sharing),
    ("memory cap", check_memory_cap),
    ("client actors on the device", check_client_actors),
    ("bit-identical", check_bit_identical),
    ("mixed precision", check_precision),
    ("GPU fold", check_gpu_fold),
]


# --- the probe actor ----------------------------------------------------------------------------


def _probe_class() -> Any:
    import ray

    @ray.remote(max_restarts=0)
    class Probe:
        """A small actor asking Ray for what a client actor asks: facts, a capped allocation, the
        ops that warn under deterministic mode."""

        def __init__(self, share: float) -> None:
            import torch

            self.share = share
            self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
            self.cap = None
            if self.device.type == "cuda":  # the client actors' own cap (its module imports the methods: only where it applies)
                from raysim.engine.client_actor import cap_gpu_memory

                self.cap = cap_gpu_memory(share, self.device)

        def facts(self) -> dict[str, Any]:
            import torch

            name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu"
            return {"pid": os.getpid(), "device": self.device.type, "device_name": name, "gpu_ids": [str(i) for i in ray.get_gpu_ids()]}

        def allocate(self, factor: float) -> dict[str, Any]:
            """Allocate `factor` times this actor's cap; the error, in one line, if it fails."""
            import torch

            total = torch.cuda.get_device_properties(self.device).total_memory
            cap_bytes = int((self.cap or 1.0) * total)
            asked = int(factor * cap_bytes)
            try:
                block = torch.empty(asked, dtype=torch.uint8, device=self.device)
                del block
                return {"ok": True, "asked": asked, "cap": self.cap, "cap_bytes": cap_bytes}
            except torch.cuda.OutOfMemoryError as err:
                return {"ok": False, "asked": asked, "cap": self.cap, "cap_bytes": cap_bytes, "error": f"{type(err).__name__}: {cli.one_line(err)[:160]}"}
            finally:
                torch.cuda.empty_cache()

        def fold_equality(self, clients: int = 8, numel: int = 11_000_000) -> dict[str, Any]:
            """WeightedSum of `clients` seeded float32 updates (resnet18's size) on this GPU and on the CPU."""
            import torch

            from raysim.algorithms.aggregation import WeightedSum

            g = torch.Generator().manual_seed(0)
            updates = [{"w": torch.randn(numel, generator=g)} for _ in range(clients)]
            weights = [float(w) for w in torch.randint(10, 500, (clients,), generator=g)]
            means = []
            for device in (torch.device("cpu"), self.device):
                fold = WeightedSum(device=device)
                for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
                    fold.add(update, weight, f"c{i}")
                means.append(fold.mean()["w"])
            return {"equal": bool(torch.equal(*means)), "max_abs_diff": float((means[0] - means[1]).abs().max()), "clients": clients}

        def deterministic_warnings(self, model_name: str, img_size: int) -> list[str]:
            """The distinct warnings of a forward and backward pass of `model_name` under raysim's
            deterministic settings (ops with no deterministic kernel name themselves)."""
            import torch

            from raysim.config import ModelConfig
            from raysim.determinism import deterministic_torch
            from raysim.models.backbones import build_model

            deterministic_torch(1)
            model = build_model(ModelConfig(name=model_name, img_size=img_size), num_classes=2, in_chans=3, seed=0).to(self.device)
            x = torch.randn(4, 3, img_size, img_size, device=self.device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model(x).sum().backward()
            return sorted({str(w.message).splitlines()[0][:200] for w in caught if "deterministic" in str(w.message)})

    return Probe


class _LazyProbe:
    """`Probe` built on first use: `import raysim.doctor` stays Ray-free (and fast) for --help."""

    _cls: Any = None

    def options(self, **kwargs: Any) -> Any:
        if _LazyProbe._cls is None:
            _LazyProbe._cls = _probe_class()
        return _LazyProbe._cls.options(**kwargs)


Probe = _LazyProbe()


if __name__ == "__main__":
    sys.exit(main())
