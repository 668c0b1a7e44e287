"""Training benchmark: U-Net step rate (same and valid padding) against the rate the loader delivers.

    python benchmarks/train.py [--batch 16] [--base 64] [--steps N] [--size 240] [--workers W] [--device auto]

* step: ``unet.data.apply_augment`` + ``unet.train.train_step`` (forward through ``UNet.predict``, i.e. mirror-padded
  to the valid
  tile in valid mode, cross-entropy, backward, clipping, AdamW, schedule) on a batch that already
  sits on the device; bf16 autocast and channels_last on CUDA, fp32 on CPU. Median of ``--steps``
  timed steps after ``--warmup``; achieved TFLOP/s = 3 x ``UNet.flops_per_forward`` (fwd + bwd) of the
  network input x batch / step time.
* loader: ``unet.data`` exactly as training uses it (brain slices, augmentation parameters, ``--workers``
  processes, pinned memory on CUDA) over a synthetic full-size store (built once under ``--data``, or
  ``--store``); median slices/s over windows of batches, after the prefetch queues have drained.
* ratio = loader slices/s / step slices/s: the loader must deliver at least twice the step rate.

On a 2-core CPU run it small, e.g. ``--base 16 --batch 4 --steps 3``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from storage.store import SliceStore
from unet.data import AugmentConfig, EpochSampler, SliceDataset, apply_augment, augment_params, make_loader
from unet.device import pick_device
from unet.model import CrossEntropy, UNet, UNetConfig
from unet.train import autocast_dtype, train_step


def synthetic_store(data: Path, cases: int, size: int) -> str:
    """A full-size slice store of synthetic cases (kept under ``data`` for the next run)."""
    url = str(data / f"slices-{size}.zarr")
    if Path(url).exists() and len(SliceStore(url).split.get("train", [])) >= cases:
        return url
    from storage.nifti import discover
    from storage.synth import write_dataset
    from tasks.ingest import ingest_case

    write_dataset(data / "raw", cases=cases, seed=3, shape=(size, size, 64))
    store = SliceStore(url, mode="a")
    store.claim_profile("full")
    for case in discover(data / "raw").cases[:cases]:
        ingest_case.fn(case, url, "full")
    store.publish({"train": store.case_ids(), "val": [], "test": []})
    return url


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(padding: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    channels_last = device.type == "cuda"
    model = UNet(UNetConfig(base_channels=args.base, depth=args.depth, padding=padding))
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format).train()
    x = torch.randn(args.batch, 4, args.size, args.size, device=device)
    y = torch.randint(0, 4, (args.batch, args.size, args.size), device=device, dtype=torch.uint8)
    rng = np.random.default_rng(0)
    params = torch.from_numpy(np.stack([augment_params(AugmentConfig(), rng) for _ in range(args.batch)])).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-4, total_steps=args.warmup + args.steps + 1)
    amp = autocast_dtype(device, "auto")
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    loss_fn = CrossEntropy().to(device)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        xa, ya = apply_augment(x, y, params)  # on the device, as in training
        if channels_last:
            xa = xa.contiguous(memory_format=torch.channels_last)
        train_step(model, xa, ya, loss_fn, optimizer, scheduler, scaler, amp, 1.0)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    side = model.input_size_for(args.size)  # what the network sees: 240 (same) or 428 (valid, depth 4)
    flops = 3 * model.flops_per_forward(side, side) * args.batch
    t = statistics.median(times)
    return {
        "padding": padding,
        "input": side,
        "step_s": t,
        "slices_s": args.batch / t,
        "tflops": flops / t / 1e12,
        "amp": str(amp).replace("torch.", "") if amp else "fp32",
    }


def loader_rate(url: str, args, device: torch.device) -> float:
    ds = SliceDataset(url, SliceStore(url).split["train"], augment=AugmentConfig(), seed=0)
    sampler = EpochSampler([r.tumour > 0 for r in ds.refs], seed=0)
    loader = make_loader(ds, args.batch, sampler=sampler, workers=args.workers, pin_memory=device.type == "cuda")
    drain = 2 * max(args.workers, 1) * 4 + 2  # first batches come from full prefetch queues
    window, windows = 8, []
    epoch, seen, start, slices = 0, 0, None, 0
    while len(windows) < args.loader_windows:
        sampler.set_epoch(epoch)
        for x, _, _ in loader:
            if device.type == "cuda":
                x = x.to(device, non_blocking=True)  # pinned host -> device, as in training
            seen += 1
            if seen == drain:
                start, slices = time.perf_counter(), 0
            elif start is not None:
                slices += len(x)
                if (seen - drain) % window == 0:
                    sync(device)
                    now = time.perf_counter()
                    windows.append(slices / (now - start))
                    start, slices = now, 0
                    if len(windows) >= args.loader_windows:
                        break
        epoch += 1
    del loader
    return statistics.median(windows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--base", type=int, default=64, help="U-Net base channels (paper: 64)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--size", type=int, default=240, help="slice side (full profile: 240)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on a GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on a GPU, 1 on CPU)")
    p.add_argument("--paddings", default="same,valid")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader worker processes")
    p.add_argument("--loader-windows", type=int, default=5, help="windows of 8 batches timed for the loader")
    p.add_argument("--store", default=None, help="slice store to read (default: a synthetic one under --data)")
    p.add_argument("--cases", type=int, default=4, help="synthetic cases (size x size x 64) when no --store")
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "brats-bench-train"))
    args = p.parse_args()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)

    url = args.store or synthetic_store(Path(args.data), args.cases, args.size)
    where = torch.cuda.get_device_name() if gpu else f"{device.type.upper()}, {torch.get_num_threads()} torch threads"
    print(
        f"train benchmark: {args.size}x{args.size} slices, U-Net base {args.base} depth {args.depth}, "
        f"batch {args.batch}, {args.steps} timed steps (median) on {where}; "
        f"loader: {args.workers} workers, augmentation on, {url}",
        flush=True,
    )
    loader = loader_rate(url, args, device)  # first: its workers do not compete with the steps
    rows = [step_rate(padding, args, device) for padding in args.paddings.split(",")]
    header = (
        f"{'padding':8} {'net input':>9} {'precision':>9} {'step s':>8} {'step slices/s':>13} {'TFLOP/s':>8} "
        f"{'loader slices/s':>15} {'loader/step':>11}"
    )
    print(header + "\n" + "-" * len(header))
    for r in rows:
        ratio = loader / r["slices_s"]
        print(
            f"{r['padding']:8} {r['input']:>9} {r['amp']:>9} {r['step_s']:8.3f} {r['slices_s']:13.1f} "
            f"{r['tflops']:8.3f} {loader:15.1f} {ratio:10.1f}x {'ok' if ratio >= 2 else 'LOADER TOO SLOW'}"
        )


if __name__ == "__main__":
    main()
