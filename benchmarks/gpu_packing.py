"""GPU packing (issue 30, item 4): 1, 2, 4 and 8 client actors sharing one GPU, against one process.

    python benchmarks/gpu_packing.py [--actors 1 2 4 8] [--rounds 3] [--out DIR] [--quick] [--cpu-smoke]
                                     [--no-profile] [--overrides KEY=VALUE ...]

Workload: the embedded synthetic set split into 8 IID clients (`data.partition=iid
data.num_clients=8`), the default model (timm resnet18 from scratch) at `model.img_size=128`,
FedAvg with the default preset's training (Adam lr 1e-3, batch 32, 1 local epoch; about 178
training images, 6 steps, per client), all 8 clients every round
(`federation.clients_per_round=8`), a checkpoint every round (the default), evaluated after the
last round only (`eval.every=R`; `eval.bootstrap=0 eval.predictions=none report.html=false`
shorten the untimed tail after it; `fault.start_timeout_s=300`: actors that cannot start
fail the run in 5 minutes, not 30). resnet18 at 128 px is the size this is about: its kernels
on batches of 32 are short, so one process is expected to leave an H100 idle between them
(the profile below measures how much), which is the room packing has; and 8 of them (CUDA
context, weights, Adam, activations) fit in an eighth of its memory each. A model that fills
the GPU from one process has nothing to gain; a tiny one measures only Python.

Configurations, each a fresh `python -m raysim.run` (started in --out) timed from outside as
benchmarks/scale.py times it (`scale.run_process`, imported, not copied): N client actors with
`resources.actors=N resources.num_gpus=1/N` (1, 0.5, 0.25, 0.125: all on one GPU; each caps its
allocator at 0.95 x its share, client_actor.gpu_memory_fraction) and `resources.num_cpus` =
min(1, cores / N), so the N single-thread actors always fit the node's CPUs (1 on the device
machine's 16 cores). The reference (`gpu_packing.py --reference SPEC`, one process, no Ray): the
same 8 clients, read through `raysim.datasets` and built with `raysim.models.build_model` as
scale.py's cross-silo reference does, trained one after another on the same GPU with raysim's
per-process settings (`deterministic_torch`, 1 torch thread, a fresh Adam per client, the loss
read back every step) on the fast path one process would take there: the model in
channels_last, each client's uint8 images copied onto the GPU once per local training and
batches gathered, converted and normalised there (what raysim's GPU actors do with
`Client.staged` and `client_actor.memory_format`), `federation.precision` when it is bf16 or
fp16 (autocast; fp16 with a GradScaler); folded into a float64 weighted mean on the GPU,
checkpointed every round (`scale.Reference`, with the device added here), no evaluation.

Measured per process:
- rounds per minute: 60 x (R - 1) / (arrival of round R's console line - arrival of round 1's).
  Round 1 is warm-up and not counted (cuDNN / cuBLAS handles, CUDA's lazy loading of each
  kernel at its first use, the caching allocator's first growth, the first payload). raysim
  prints a round's line when its training and fold end, before that round's evaluation and
  checkpoint (the driver actor streams it then), so a counted round is the previous round's
  checkpoint plus its own training and fold, the reference's alike. The console's own
  `X s/round` (raysim: 0.1 s resolution of the running mean, too coarse for sub-second
  rounds) gives the same number from inside the process; both are kept in the results.
- GPU memory: `nvidia-smi --query-compute-apps=pid,used_memory` every second while the process
  runs; per actor its largest value, the table's column the largest actor (every process on
  the GPU that is not this script: raysim's client actors, the reference). Also the GPU's
  `memory.used` peak above the value just before the process started. null where nvidia-smi is
  missing. `torch.cuda.max_memory_allocated` only for the reference: raysim's client actors do
  not report it (neither `describe` nor provenance.json carries it).
- GPU busy: the mean of nvidia-smi's `utilization.gpu` (the share of time a kernel was running,
  not SM occupancy) over the samples between round 1's and round R's lines ("-" when the
  counted rounds are shorter than a sample).
- the reference's profile (unless --no-profile), after its timed rounds: one more round timed
  alone, then one under `torch.profiler` (CUDA kernels, copies; its trace saved as
  --out/profiles/*.json.gz). Kernel and copy time as shares of the plain round: the rest of it
  is the CPU side (Python, kernel launches, waits), which is where a second process on the
  same GPU can fit its kernels. Without MPS, processes on one GPU time-slice: packing fills the
  idle gaps of one process, it does not run two kernels at once.
- as scale.py: wall, ready (the last line before round 1), the machine's memory in use above
  idle (`free`).

The synthetic set is written once beforehand (under --out/cache), outside every timing; the
shard cache is emptied before each raysim run. One JSON per measured process under
--out/results (a finished one with the same settings is read, not rerun); console logs under
--out/logs. The Markdown table is printed last and saved with the machine (CPU, GPU name from
`torch.cuda.get_device_name`, driver, CUDA and cuDNN versions, compute mode) in
--out/gpu_packing.json and --out/gpu_packing.md. The target (issue 30): at least 2.5x the rounds
per minute of 1 actor at 4 actors, or the measured limit.

--quick is the issue's check of at most 5 minutes: 1 and 4 actors plus the reference, 2 rounds
each (round 2 counted). --cpu-smoke runs the same code paths on a machine without a GPU:
`num_gpus=0` and `resources.num_cpus=1/N` (N actors share one CPU's worth of Ray's resources
instead of one GPU), test_resnet at 32 px, 1 and 2 actors, 2 rounds, the reference on the CPU;
its numbers mean nothing and its table says so. Without CUDA and without --cpu-smoke the script
exits 2. Not part of CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import scale  # noqa: E402 - benchmarks/scale.py: the measurement helpers

NUM_CLIENTS = 8
TARGET = ("4 actors", 4, 2.5)  # issue 30: at least 2.5x the rounds per minute of 1 actor at 4 actors
MIB = 2**20


# --- GPU facts and sampling ------------------------------------------------------------------


def nvidia_smi(*args: str) -> list[list[str]] | None:
    """The rows of `nvidia-smi ARGS --format=csv,noheader,nounits`, split on commas; None when it is missing or fails."""
    try:
        out = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [[cell.strip() for cell in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def gpu_index() -> str:
    """nvidia-smi's index of the GPU torch calls cuda:0 (the first of CUDA_VISIBLE_DEVICES when it is a number)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return first if first.isdigit() else "0"


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


class GpuSampler(threading.Thread):
    """nvidia-smi every `every` seconds: the GPU's memory in use and utilisation, and each compute
    process's memory (MiB). The first sample, taken at construction, is the idle baseline."""

    def __init__(self, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.every, self.index = every, gpu_index()
        self.available = shutil.which("nvidia-smi") is not None
        self.done = threading.Event()
        self.t0 = time.perf_counter()
        self.baseline = self.sample()
        self.samples: list[list[Any]] = []

    def sample(self) -> list[Any] | None:
        """[seconds since t0, memory.used MiB, utilization.gpu %, {pid: used MiB}], or None without nvidia-smi."""
        if not self.available:
            return None
        t = time.perf_counter() - self.t0
        gpu = nvidia_smi("--query-gpu=memory.used,utilization.gpu", "-i", self.index)
        apps = nvidia_smi("--query-compute-apps=pid,used_memory") or []
        used, util = (number(gpu[0][0]), number(gpu[0][1])) if gpu and len(gpu[0]) >= 2 else (None, None)
        own = str(os.getpid())  # this script: never a measured process
        return [t, used, util, {row[0]: number(row[1]) for row in apps if len(row) >= 2 and row[0] != own}]

    def run(self) -> None:
        while not self.done.wait(self.every):
            if (s := self.sample()) is not None:
                self.samples.append(s)

    def stop(self) -> dict[str, Any]:
        self.done.set()
        self.join()
        return {"available": self.available, "baseline": self.baseline, "samples": self.samples}


def gpu_facts() -> dict[str, Any]:
    """The GPU as torch and nvidia-smi describe it (no CUDA context is created here)."""
    import torch

    facts: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        try:
            facts |= {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(), "cudnn": torch.backends.cudnn.version()}
        except RuntimeError as err:  # a facts query never stops the benchmark: the runs say whether CUDA works
            facts["error"] = str(err).splitlines()[0]
    rows = nvidia_smi("--query-gpu=name,driver_version,memory.total,compute_mode", "-i", gpu_index())
    if rows and len(rows[0]) >= 4:
        facts |= {"smi_name": rows[0][0], "driver": rows[0][1], "memory_mib": number(rows[0][2]), "compute_mode": rows[0][3]}
    try:
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=15).stdout
        facts["driver_cuda"] = m[1] if (m := re.search(r"CUDA Version:\s*([\d.]+)", header)) else None
    except (OSError, subprocess.TimeoutExpired):
        facts["driver_cuda"] = None
    return facts


# --- measured processes ----------------------------------------------------------------------


def run_sampled(cmd: list[str], *, out: Path, name: str) -> dict[str, Any]:
    """`scale.run_process` with the GPU sampled beside it; the round lines with their arrival times."""
    sampler = GpuSampler()
    sampler.t0 = time.perf_counter()  # the process's clock (run_process starts its own a few ms later)
    sampler.start()
    try:
        result = scale.run_process(cmd, cwd=out, log=out / "logs" / f"{name}.log", env=scale.child_env(out))
    finally:
        gpu = sampler.stop()
    lines = scale.read_log(Path(result["log"]))
    result["round_lines"] = [[t, int(m[1]), float(m[4])] for t, text in lines if (m := scale.ROUND.match(text))]
    return result | {"gpu": gpu}


def run_packing(out: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(out / "cache" / "shards", ignore_errors=True)  # every run decodes its images
    return run_sampled([sys.executable, "-m", "raysim.run", "--out", str(run_dir), *overrides], out=out, name=name)


def run_reference(out: Path, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    path = out / "specs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1))
    return run_sampled([sys.executable, str(HERE), "--reference", str(path)], out=out, name=name)


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """Rounds per minute (arrivals and the console's numbers), GPU memory and busy share of one run."""
    lines = run.get("round_lines") or []
    s: dict[str, Any] = {"rpm": None, "console_rpm": None, "counted_rounds": 0, "actor_mib": None, "pids": None, "gpu_above_idle_mib": None, "busy_pct": None, "busy_samples": 0}
    if run.get("rc") == 0 and len(lines) >= 2:
        (t1, n1, x1), (tr, nr, xr) = lines[0], lines[-1]
        s["counted_rounds"] = nr - n1
        s["rpm"] = 60 * (nr - n1) / (tr - t1) if tr > t1 else None
        console_s = (nr * xr - n1 * x1) / (nr - n1)  # the running means: rounds n1 + 1 .. nr
        s["console_rpm"] = 60 / console_s if console_s > 0 else None
        window = (t1, tr)
    else:
        window = None
    gpu = run.get("gpu") or {}
    samples = gpu.get("samples") or []
    if gpu.get("available") and samples:
        per_pid: dict[str, float] = {}
        for _, _, _, apps in samples:
            for pid, mib in apps.items():
                if mib is not None:
                    per_pid[pid] = max(per_pid.get(pid, 0.0), mib)
        s["per_pid_mib"] = per_pid
        s["pids"] = len(per_pid)
        s["actor_mib"] = max(per_pid.values()) if per_pid else None
        used = [u for _, u, _, _ in samples if u is not None]
        base = (gpu.get("baseline") or [None, None])[1]
        s["gpu_above_idle_mib"] = max(used) - base if used and base is not None else None
        if window is not None:
            busy = [u for t, _, u, _ in samples if window[0] <= t <= window[1] and u is not None]
            s["busy_pct"], s["busy_samples"] = (float(np.mean(busy)) if busy else None), len(busy)
    return s


# --- the reference loop (runs as `gpu_packing.py --reference SPEC`) ----------------------------


class DeviceReference(scale.Reference):
    """scale.py's reference loop on `device`, on the fast path one process would take there: on a
    GPU the model in channels_last, each client's uint8 training images copied onto the GPU once
    per local training (batches gathered there), converted and normalised there, labels copied
    per batch; `precision` bf16 / fp16 under torch.autocast (fp16 with a fresh GradScaler per
    client); the float64 fold on the device. On the CPU: scale.Reference's batches, as before."""

    def __init__(self, model: Any, spec: dict[str, Any], channels: int, device: Any, precision: str = "fp32") -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.layout = torch.channels_last if self.cuda else torch.contiguous_format
        super().__init__(model.to(device, memory_format=self.layout), spec, channels)  # the global state and the sums follow the model
        self.device, self.precision = device, precision
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.mean, self.std = self.mean.to(device), self.std.to(device)

    def inputs(self, images: Any) -> Any:
        """A batch of uint8 images (numpy, or a tensor already on the device) as normalised float32 there."""
        torch = self.torch
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        x = (x.to(self.device, torch.float32).div_(255.0) - self.mean) / self.std
        return x.contiguous(memory_format=self.layout) if x.dim() == 4 else x

    def fit(self, images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[float, int]:
        """scale.Reference.fit on the device, with raysim's finiteness check per step."""
        torch, model, n, batch = self.torch, self.model, len(labels), self.spec["batch_size"]
        model.load_state_dict(self.global_state, strict=False)
        model.train()
        staged = torch.from_numpy(np.ascontiguousarray(images)).to(self.device) if self.cuda else None  # one copy per local training
        scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        autocast = (lambda: torch.autocast(self.device.type, dtype=self.autocast_dtype)) if self.autocast_dtype is not None else contextlib.nullcontext
        optimizer, total, steps = self.optimizer(), 0.0, 0
        for epoch in range(self.spec["local_epochs"]):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            for lo in range(0, n, batch):
                index = order[lo : lo + batch]
                if len(index) == 1 and n > 1:
                    continue  # as raysim: a single-sample batch breaks BatchNorm
                x = staged.index_select(0, index.to(self.device)) if staged is not None else images[index.numpy()]
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    loss = torch.nn.functional.cross_entropy(model(self.inputs(x)), torch.from_numpy(labels[index.numpy()]).to(self.device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"reference loss became {loss.item()}")
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                total, steps = total + loss.item(), steps + 1
        return total, steps

    def round(self, clients: list[tuple[np.ndarray, np.ndarray]], round_: int) -> float:
        loss = super().round(clients, round_)
        self.synchronize()  # the fold's kernels are done when the round's line is printed
        return loss

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)


def profile_round(loop: DeviceReference, clients: list[tuple[np.ndarray, np.ndarray]], round_: int, trace: Path | None) -> dict[str, Any]:
    """Round `round_` timed alone, then round `round_ + 1` under torch.profiler: where a round's time goes."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = loop.device.type == "cuda"
    loop.synchronize()
    start = time.perf_counter()
    loop.round(clients, round_)
    plain_s = time.perf_counter() - start
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        loop.round(clients, round_ + 1)
    profiled_s = time.perf_counter() - start
    on_device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernels_us = sum(e.time_range.elapsed_us() for e in on_device if not e.name.startswith(("Memcpy", "Memset")))
    copies_us = sum(e.time_range.elapsed_us() for e in on_device if e.name.startswith("Memcpy"))
    steps = sum(len(range(0, len(y), loop.spec["batch_size"])) - (len(y) % loop.spec["batch_size"] == 1 and len(y) > 1) for _, y in clients) * loop.spec["local_epochs"]
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"profile: round {round_ + 1} under torch.profiler (top 15 by {sort}):\n" + prof.key_averages().table(sort_by=sort, row_limit=15), flush=True)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    out = {
        "plain_round_s": plain_s, "profiled_round_s": profiled_s, "steps": int(steps), "device_events": len(on_device),
        "kernels_s": kernels_us / 1e6, "copies_s": copies_us / 1e6, "trace": str(trace) if trace else None,
        "kernels_share": kernels_us / 1e6 / plain_s, "copies_share": copies_us / 1e6 / plain_s,
    }  # fmt: skip
    if cuda:
        out["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(loop.device) / MIB
    print(
        f"profile: plain round {plain_s:.3f} s, kernels {out['kernels_s']:.3f} s ({100 * out['kernels_share']:.0f} %), copies {out['copies_s']:.3f} s, {len(on_device)} device events, {steps} steps",
        flush=True,
    )
    return out


def reference_main(spec_path: Path) -> None:
    """The 8 clients one after another in this process on spec["device"], raysim's per-process settings."""
    spec = json.loads(spec_path.read_text())
    from raysim import config
    from raysim.determinism import deterministic_torch

    cfg = config.load(None, spec["overrides"])
    deterministic_torch(cfg.resources.threads_per_client)  # first: before CUDA starts (as a client actor)
    import torch

    from raysim.datasets import DATASETS
    from raysim.models.backbones import build_model

    device = torch.device(spec["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("reference: device cuda asked for, but torch sees no CUDA GPU")
    torch.manual_seed(cfg.seed)
    source = DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed)
    specs = source.client_specs()
    shards = {s.id: source.load(s, "train") for s in specs}
    clients = [(shard.images, shard.table.labels.astype(np.int64)) for shard in shards.values()]
    model = build_model(cfg.model, num_classes=source.num_classes, in_chans=source.channels, seed=cfg.seed, slices=source.volume_slices)
    print(f"data: reference on {device} with {len(clients)} clients: " + ", ".join(f"{cid} ({len(s.table)} train)" for cid, s in shards.items()), flush=True)
    precision = getattr(cfg.federation, "precision", "fp32")  # federation.precision, where this raysim has it
    loop = DeviceReference(model, spec, channels=source.channels, device=device, precision=precision)
    scale.run_rounds(loop, clients, spec)
    result: dict[str, Any] = {"device": str(device), "precision": precision, "train_images": sum(len(y) for _, y in clients)}
    if device.type == "cuda":
        result["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        result["gpu_name"] = torch.cuda.get_device_name(device)
    if spec.get("profile"):  # after the timed rounds: a failure here loses none of them
        try:
            result["profile"] = profile_round(loop, clients, spec["rounds"] + 1, Path(spec["trace"]) if spec.get("trace") else None)
        except Exception as err:  # noqa: BLE001 - reported in the table instead
            result["profile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"profile failed: {result['profile_error']}", flush=True)
    print("RESULT " + json.dumps(result), flush=True)


# --- report ----------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}{suffix}"


def share(n: int) -> str:
    return f"{1 / n:g}"


def table(machine: dict[str, Any], setup: dict[str, Any], runs: dict[int, dict[str, Any]], reference: dict[str, Any] | None) -> str:
    v, g = machine["versions"], machine["gpu"]
    smoke = setup["cpu_smoke"]
    gpu_line = (
        "GPU: none"
        if not g.get("cuda_available") and not g.get("smi_name")
        else (
            f"GPU: {g.get('name') or g.get('smi_name') or '?'} ({fmt(g.get('memory_mib'), 0)} MiB, driver {g.get('driver') or '?'} (up to CUDA {g.get('driver_cuda') or '?'}), "
            f"compute mode {g.get('compute_mode') or '?'}), torch CUDA {g.get('torch_cuda') or '-'}, cuDNN {g.get('cudnn') or '-'}"
        )
    )
    counted = "round 2" if setup["rounds"] == 2 else f"rounds 2-{setup['rounds']}"
    lines = []
    if smoke:
        lines += ["**CPU smoke test (`--cpu-smoke`): no GPU, `num_gpus=0`, N actors sharing 1 CPU of Ray's resources, test_resnet at 32 px. "
                  "It checks that the script runs end to end; its numbers mean nothing.**", ""]  # fmt: skip
    lines += [
        f"{machine['date']}, `{machine['host']}` ({machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']:.0f} GiB); {gpu_line}; Python {machine['python']}, "
        f"torch {v['torch']}, Ray {v['ray']}, timm {v['timm']}, raysim {v['raysim']} ({machine['commit']}). `python benchmarks/gpu_packing.py {' '.join(machine['argv'])}`.",
        "",
        f"Synthetic set, {NUM_CLIENTS} IID clients, {setup['model']} at {setup['img_size']} px, FedAvg, all {NUM_CLIENTS} clients every round, {setup['rounds']} rounds "
        f"(round 1 is warm-up: rounds/min over {counted} from the arrival of the console's round lines), a checkpoint every round, evaluated after the "
        f"last round only (not timed). Reference: the same clients one after another in one process on the same {'CPU' if smoke else 'GPU'}, no Ray. "
        "GPU memory: nvidia-smi's per-process `used_memory`, the largest actor's peak, and the GPU's `memory.used` peak above idle; GPU busy: nvidia-smi's "
        "`utilization.gpu` over the counted rounds (kernel time share, not SM occupancy).",
        "",
        "| configuration | num_gpus per actor | num_cpus per actor | rounds/min | ratio to 1 actor | ratio to reference | GPU memory per actor, max (MiB) | "
        "GPU memory above idle (MiB) | GPU busy (%) | host memory above idle (GB) | ready (s) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    one = summary(runs[1])["rpm"] if 1 in runs else None
    ref = summary(reference) if reference else None
    ref_rpm = ref["rpm"] if ref else None

    def row(label: str, run: dict[str, Any], gpus: str, cpus: str) -> str:
        s = summary(run)
        if run["rc"] != 0:
            return f"| {label} | {gpus} | {cpus} | failed (rc {run['rc']}; {run['log']}) |" + " |" * 8
        cells = [gpus, cpus, fmt(s["rpm"], 1), scale.ratio(s["rpm"], one), scale.ratio(s["rpm"], ref_rpm), fmt(s["actor_mib"], 0), fmt(s["gpu_above_idle_mib"], 0),
                 fmt(s["busy_pct"], 0), fmt(run.get("memory_gb"), 2), fmt(run.get("to_ready_s"), 1), fmt(run.get("wall_s"), 1)]  # fmt: skip
        return f"| {label} | " + " | ".join(cells) + " |"

    for n, run in sorted(runs.items()):
        lines.append(row(f"raysim, {n} actor{'s' * (n > 1)}", run, "0" if smoke else share(n), f"{setup['num_cpus'][n]:g}"))
    if reference is not None:
        lines.append(row("reference (one process, no Ray)", reference, "-", "-"))
    lines += ["", target_line(runs, smoke)]
    if reference is not None and reference["rc"] == 0:
        lines += reference_lines(reference)
    return "\n".join(lines)


def target_line(runs: dict[int, dict[str, Any]], smoke: bool) -> str:
    label, n, goal = TARGET
    if 1 not in runs or n not in runs:
        return f"Target (>= {goal}x the rounds per minute of 1 actor at {label}): not measured (needs 1 and {n} actors)."
    one, many = summary(runs[1]), summary(runs[n])
    if one["rpm"] is None or many["rpm"] is None:
        return f"Target (>= {goal}x at {label}): no number (a run failed or counted no round)."
    got = many["rpm"] / one["rpm"]
    verdict = f"met ({got:.2f}x)" if got >= goal else f"missed by {goal - got:.2f}x ({got:.2f}x, {100 * (1 - got / goal):.0f} % short)"
    busy = ", ".join(f"{k} actor{'s' * (k > 1)} {fmt(summary(r)['busy_pct'], 0, ' %')}" for k, r in sorted(runs.items()))
    note = " (CPU smoke test: meaningless)" if smoke else ""
    return f"Target (issue 30: >= {goal}x the rounds per minute of 1 actor at {label}): {verdict}{note}. GPU busy over the counted rounds: {busy}."


def reference_lines(reference: dict[str, Any]) -> list[str]:
    rep = reference.get("reported") or {}
    lines = []
    if rep.get("max_memory_allocated_mib") is not None:
        lines.append(f"Reference: `torch.cuda.max_memory_allocated` {rep['max_memory_allocated_mib']:.0f} MiB over its timed rounds (raysim's actors do not report theirs).")
    p = rep.get("profile")
    if rep.get("profile_error"):
        lines.append(f"Reference profile: failed ({rep['profile_error']}).")
    elif p and not p["device_events"]:
        where = "it ran on the CPU" if rep.get("device") == "cpu" else "the profiler recorded no CUDA activity: CUPTI missing?"
        lines.append(f"Reference profile: no GPU kernels ({where}); a plain round took {p['plain_round_s']:.3f} s ({p['steps']} steps); the operator table is in its log.")
    elif p:
        rest = 1 - p["kernels_share"] - p["copies_share"]
        lines.append(
            f"Reference profile (one round timed alone, {p['steps']} steps, then one under torch.profiler; trace `{p['trace']}`): plain round {p['plain_round_s']:.3f} s, "
            f"GPU kernels {p['kernels_s']:.3f} s ({100 * p['kernels_share']:.0f} %), copies {p['copies_s']:.3f} s ({100 * p['copies_share']:.0f} %), "
            f"the rest ({100 * rest:.0f} %) on the CPU side: Python, launching {p['device_events']} kernels and copies, waits. One process keeps the GPU busy "
            f"{100 * (p['kernels_share'] + p['copies_share']):.0f} % of a round, so processes packed onto it can gain at most about "
            f"{1 / max(p['kernels_share'] + p['copies_share'], 1e-9):.1f}x (if their kernels ran no slower side by side)."
        )
    return [""] + lines if lines else []


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", nargs="+", type=int, default=None, help="client actors on the GPU, each with num_gpus 1/N (default 1 2 4 8; --quick: 1 4; --cpu-smoke: 1 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run, round 1 not counted (default 3; --quick and --cpu-smoke: 2)")
    parser.add_argument("--out", type=Path, default=None, help="default benchmark-runs/gpu-packing (--quick: ...-quick, --cpu-smoke: ...-cpu-smoke)")
    parser.add_argument("--quick", action="store_true", help="the issue's check of at most 5 minutes: 1 and 4 actors plus the reference, 2 rounds")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code paths on CPU (num_gpus=0, test_resnet at 32 px): a check of the script, not a measurement")
    parser.add_argument("--no-profile", action="store_true", help="skip the reference's profiled round")
    parser.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE", help="further raysim overrides for every run and the reference, e.g. model.name=resnet50")
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)  # internal: run the reference loop
    args = parser.parse_args()
    if args.reference:
        reference_main(args.reference)
        return
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_packing.py needs a CUDA GPU (torch.cuda.is_available() is False); --cpu-smoke checks the script on CPU", file=sys.stderr)
        sys.exit(2)
    smoke = args.cpu_smoke
    actors = args.actors or ([1, 2] if smoke else [1, 4] if args.quick else [1, 2, 4, 8])
    if any(n < 1 or n > NUM_CLIENTS for n in actors):
        parser.error(f"--actors: each between 1 and {NUM_CLIENTS} (one client per actor at most)")
    rounds = args.rounds or (2 if smoke or args.quick else 3)
    if rounds < 2:
        parser.error("--rounds: at least 2 (round 1 is warm-up, not counted)")
    default_out = "benchmark-runs/gpu-packing" + ("-cpu-smoke" if smoke else "-quick" if args.quick else "")
    out = (args.out or Path(default_out)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["RAYSIM_CACHE"] = str(out / "cache")
    model, img_size = ("test_resnet", 32) if smoke else ("resnet18", 128)
    workload = [
        "data.partition=iid", f"data.num_clients={NUM_CLIENTS}", f"model.name={model}", f"model.img_size={img_size}", f"federation.rounds={rounds}",
        f"federation.clients_per_round={NUM_CLIENTS}", f"eval.every={rounds}", "eval.bootstrap=0", "eval.predictions=none", "report.html=false", "fault.start_timeout_s=300", *args.overrides,
    ]  # fmt: skip
    from raysim import config
    from raysim.datasets import DATASETS

    cfg = config.load(None, workload)  # a bad override fails here, before anything runs
    model, img_size = cfg.model.name, cfg.model.img_size
    print(f"gpu_packing: {'CPU smoke test' if smoke else 'GPU'}; writing the synthetic set (untimed) ...", flush=True)
    specs = DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed).client_specs()
    if len(specs) != NUM_CLIENTS:
        raise SystemExit(f"gpu_packing: expected {NUM_CLIENTS} clients, the source made {len(specs)}")
    cores = len(os.sched_getaffinity(0))
    threads = cfg.resources.threads_per_client
    machine = scale.machine_info(argparse.Namespace(threads=threads)) | {"gpu": gpu_facts()}
    g = machine["gpu"]
    print(f"gpu_packing: {cores} cores; GPU {g.get('name') or g.get('smi_name') or 'none'}, driver {g.get('driver') or '-'}, torch CUDA {g.get('torch_cuda') or '-'}; "
          f"nvidia-smi {'found' if shutil.which('nvidia-smi') else 'missing: GPU memory is null'}", flush=True)  # fmt: skip
    tag = f"{model}-{img_size}px-{rounds}r" + ("-cpu" if smoke else "") + "".join(f"-{o.replace('=', '_')}" for o in args.overrides)
    num_cpus: dict[int, float] = {}
    runs: dict[int, dict[str, Any]] = {}
    for n in actors:
        if smoke:  # N actors share one CPU of Ray's resources, as they share one GPU on a GPU machine
            num_cpus[n], resources = 1 / n, [f"resources.actors={n}", "resources.num_gpus=0", f"resources.num_cpus={1 / n:g}"]
        else:
            num_cpus[n] = min(float(threads), cores / n)
            resources = [f"resources.actors={n}", f"resources.num_gpus={share(n)}", f"resources.num_cpus={num_cpus[n]:g}"]
        overrides = [*workload, *resources]
        name = f"packing-{tag}-{n}a"
        runs[n] = scale.measured(out, name, {"overrides": overrides}, lambda name=name, overrides=overrides: run_packing(out, name, overrides))
    spec = scale.reference_spec("gpu", workload, threads, device="cpu" if smoke else "cuda", profile=not args.no_profile)
    spec["checkpoint_dir"] = str(out / "runs" / f"reference-{tag}" / "checkpoints")  # checkpointed as often as raysim
    spec["trace"] = None if args.no_profile else str(out / "profiles" / f"reference-{tag}.json.gz")
    reference = scale.measured(out, f"reference-{tag}", spec, lambda: run_reference(out, f"reference-{tag}", spec))
    setup = {"cpu_smoke": smoke, "model": model, "img_size": img_size, "rounds": rounds, "num_cpus": num_cpus, "actors": actors}
    text = table(machine, setup, runs, reference)
    results = {"setup": setup, "machine": machine, "raysim": {str(n): r | {"summary": summary(r)} for n, r in runs.items()}, "reference": reference | {"summary": summary(reference)}}
    (out / "gpu_packing.json").write_text(json.dumps(results | {"table": text}, indent=1, default=str))
    (out / "gpu_packing.md").write_text(text + "\n")
    print("\n" + text)
    failed = [name for name, r in [*((f"{n} actors", r) for n, r in runs.items()), ("reference", reference)] if r["rc"] != 0]
    if failed:
        print(f"\ngpu_packing: failed: {', '.join(failed)} (logs under {out / 'logs'})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
