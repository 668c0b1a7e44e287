"""CPU training step: the ``cpu`` recipe's step as it trains, with and without the layout and compiler choices.

    python benchmarks/cpu_step.py [--recipe cpu] [--variants eager,channels_last,...] [--rounds 8] [--steps 5]

One optimizer step of the recipe's network, loss and batch (``unet.step.train_step``: forward with
deep supervision, ``ce+dice`` on the 1 mm labels, backward, clipping, AdamW, schedule) on a batch of
the ``tp`` shape (96×96 images with their 2.5D context, 192×192 labels), in this process with
torch's default threads (the cores), the recipe's precision (``autocast_dtype``). Variants:

* ``eager``: contiguous (NCHW) tensors;
* ``channels_last``: NHWC tensors and weights (what the recipes train with: ``training.channels_last``);
* ``+compile``: ``torch.compile`` of the model (inductor; its compile time is reported, not timed);
* ``+fp32``: no autocast (the recipe's ``auto`` precision is bf16 on a CPU with native bf16);
* ``+instance``, ``+ibn``: the network's ``norm`` in place of the recipe's batch norm (``unet/norm.py``);
* ``+average``: the weights' moving average updated after every step (``training.average``, 0.999).

The variants are timed in turn within each round (order reversed every other round, so drift
on a shared machine falls on all of them alike); medians of ``--rounds`` rounds of ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flows.recipes import recipe  # noqa: E402
from unet.device import autocast_dtype  # noqa: E402
from unet.loss import SegLoss  # noqa: E402
from unet.model import UNet  # noqa: E402
from unet.step import Optimization, moving_average, train_step  # noqa: E402


def make(variant: str, network, training) -> tuple[Optimization, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    choices = set(variant.split("+"))
    layout = torch.channels_last if "channels_last" in choices else torch.contiguous_format
    for norm in choices & {"instance", "ibn"}:
        network = network.model_copy(update={"norm": norm})
    model = UNet(network).to(memory_format=layout).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=100_000)
    amp = autocast_dtype(torch.device("cpu"), "fp32" if "fp32" in choices else training.precision)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = SegLoss(None, dice=True, outputs=network.outputs)
    opt = Optimization(model, loss, optimizer, schedule, scaler, amp, training.grad_clip)
    if "compile" in choices:
        opt.model = torch.compile(model)
    if "average" in choices:
        opt.average = moving_average(model, 0.999)
    x = torch.randn(training.batch_size, network.input_channels, 96, 96).contiguous(memory_format=layout)
    y = torch.randint(0, 4, (training.batch_size, 192, 192), dtype=torch.uint8)
    return opt, x, y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="cpu")
    p.add_argument("--variants", default="eager,channels_last,channels_last+compile,channels_last+fp32")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="steps timed per round and variant")
    args = p.parse_args()
    r = recipe(args.recipe)
    variants = args.variants.split(",")
    runs = {}
    for v in variants:
        start = time.perf_counter()
        runs[v] = make(v, r.network, r.training)
        for _ in range(3):  # warm-up; compiles the compiled variant
            train_step(*runs[v])
        print(f"{v}: ready in {time.perf_counter() - start:.1f} s (3 warm-up steps)", flush=True)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.rounds):
        for v in variants if i % 2 == 0 else variants[::-1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(*runs[v]).item()
            times[v].append((time.perf_counter() - start) / args.steps)
    base, batch = statistics.median(times[variants[0]]), r.training.batch_size
    print(f"\nrecipe {args.recipe}: batch {batch}, base {r.network.base_channels}, {torch.get_num_threads()} threads")
    print(f"medians of {args.rounds} rounds of {args.steps} steps")
    for v in variants:
        t, amp = statistics.median(times[v]), str(runs[v][0].amp or "fp32").replace("torch.", "")
        print(f"{v:24} {amp:9} {t * 1000:7.0f} ms/step  {batch / t:6.1f} slices/s  {base / t:5.2f}x {variants[0]}")


if __name__ == "__main__":
    main()
