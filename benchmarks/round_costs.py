"""Where a cross-device round's time goes, per client: the training itself and raysim's overheads
before (0.2.0) and after the scale work (issue 12), measured piece by piece in one process.

    python benchmarks/round_costs.py [--model resnet18] [--img-size 28] [--images 17] [--repeats 10]

The workload is benchmarks/scale.py's cross-device client: resnet18 at 28 px, 1 channel, 17
training images, batch 32, Adam, 1 torch thread. Each piece is timed on its own (median of
--repeats) with the operations the engine performs on a client's update and payload:

- training: `load_state_dict` of the global weights into the actor's model, a fresh Adam, one
  epoch; the single-process reference loop does exactly this, plus the float64 running sum.
- Ray's transfer of a 45 MB state dict, as pickle protocol 5 (what Ray uses): torch tensors
  are copied through the pickle stream on both sides; numpy arrays travel out of band, so the
  only copy left is the object store's, timed here as one memcpy of the buffers.
- 0.2.0 per client: the payload deserialised for every `fit` call, the update's clone, its
  pickling and unpickling, an element-wise non-finite check, a float64 weighted add.
- now: the payload once per actor per round (not per client), the clone, numpy out of band
  (memcpy into the store, a zero-copy view out), the sum-based non-finite check, the add.

Not a timed test; run it on a quiet machine. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import pickle
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import timm
import torch
from torch import nn

from raysim.algorithms.aggregation import WeightedSum, non_finite


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` in milliseconds (after one warm-up call)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def pickled_round_trip(obj: object) -> tuple[Callable[[], object], Callable[[], object]]:
    """(dump, load) as Ray does them: protocol 5, out-of-band buffers copied into one store buffer."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    store = [np.empty(memoryview(b).nbytes, dtype=np.uint8) for b in buffers]

    def dump() -> object:
        out: list[pickle.PickleBuffer] = []
        stream = pickle.dumps(obj, protocol=5, buffer_callback=out.append)
        for target, buffer in zip(store, out):  # the object store's copy
            np.copyto(target, np.frombuffer(memoryview(buffer).cast("B"), dtype=np.uint8))
        return stream

    def load() -> object:
        return pickle.loads(data, buffers=[memoryview(s) for s in store])

    return dump, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--images", type=int, default=17)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = timm.create_model(args.model, num_classes=2, in_chans=1)
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(args.images, 1, args.img_size, args.img_size)
    y = torch.randint(0, 2, (args.images,))

    def train() -> None:
        model.load_state_dict(global_weights)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for start in range(0, args.images, args.batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[start : start + args.batch_size]), y[start : start + args.batch_size]).backward()
            optimizer.step()

    update = {k: v.detach().clone() for k, v in model.state_dict().items()}
    as_numpy = {k: v.numpy() for k, v in update.items()}
    torch_dump, torch_load = pickled_round_trip(update)
    numpy_dump, numpy_load = pickled_round_trip(as_numpy)
    fold = WeightedSum()

    costs = {
        "train (load weights, fresh Adam, 1 epoch)": timed(train, args.repeats),
        "clone of the update": timed(lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}, args.repeats),
        "pickle torch tensors (+ store copy)": timed(torch_dump, args.repeats),
        "unpickle torch tensors": timed(torch_load, args.repeats),
        "numpy out of band (+ store copy)": timed(numpy_dump, args.repeats),
        "numpy zero-copy view out": timed(numpy_load, args.repeats),
        "non-finite check, element-wise (0.2.0)": timed(lambda: [k for k, v in update.items() if v.is_floating_point() and not torch.isfinite(v).all()], args.repeats),
        "non-finite check, sum first (now)": timed(lambda: non_finite(update), args.repeats),
        "float64 weighted add": timed(lambda: fold.add(update, 17.0, "c"), args.repeats),
    }
    c = costs
    before = {
        "payload unpickled per client": c["unpickle torch tensors"],
        "clone": c["clone of the update"],
        "update pickled": c["pickle torch tensors (+ store copy)"],
        "update unpickled at the driver": c["unpickle torch tensors"],
        "non-finite check": c["non-finite check, element-wise (0.2.0)"],
        "float64 add": c["float64 weighted add"],
    }
    after = {
        "payload (once per actor per round)": 0.0,
        "clone": c["clone of the update"],
        "update out of band": c["numpy out of band (+ store copy)"],
        "view at the driver": c["numpy zero-copy view out"],
        "non-finite check": c["non-finite check, sum first (now)"],
        "float64 add": c["float64 weighted add"],
    }
    reference = c["train (load weights, fresh Adam, 1 epoch)"] + c["float64 weighted add"]
    mb = sum(v.numel() * v.element_size() for v in update.values()) / 1e6
    print(f"{platform.node()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · 1 thread · {args.model} {args.img_size} px, {args.images} images, {mb:.1f} MB update\n")
    print("| piece | ms per client |\n|---|---|")
    for name, ms in costs.items():
        print(f"| {name} | {ms:.1f} |")
    print(f"\nreference loop per client (train + float64 add): {reference:.1f} ms")
    for label, parts in (("0.2.0", before), ("now", after)):
        overhead = sum(parts.values())
        print(f"{label}: train {c['train (load weights, fresh Adam, 1 epoch)']:.1f} ms + overheads {overhead:.1f} ms ({', '.join(f'{k} {v:.1f}' for k, v in parts.items())}) = {(c['train (load weights, fresh Adam, 1 epoch)'] + overhead) / reference:.2f}x the reference's work")


if __name__ == "__main__":
    main()
