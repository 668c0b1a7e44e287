"""Training benchmark: U-Net step rate (same and valid padding) against the rate the loader delivers.

    python benchmarks/train.py [--batch 16] [--base 64] [--steps N] [--size 240] [--workers W] [--device auto]
                               [--store URL | --raw DIR [--cases N]] [--cores 14] [--assume-tflops 495]

* step: ``unet.data.apply_augment`` + ``unet.train.train_step`` (forward through ``UNet.predict``, i.e. mirror-padded
  to the valid tile in valid mode, cross-entropy, backward, clipping, AdamW, schedule) on a batch that already
  sits on the device; autocast as training picks it (``unet.device.autocast_dtype``: bf16
  on CUDA and on CPUs with native bf16, else fp32), channels_last on CUDA. Median of ``--steps``
  timed steps after ``--warmup``; achieved TFLOP/s = 3 x ``unet.flops.flops_per_forward`` (fwd + bwd) of the
  network input x batch / step time.
* loader: ``unet.data`` exactly as training uses it (brain slices, augmentation parameters, worker
  processes, pinned memory on CUDA) over a store of real cases (``--store``, or ``--raw DIR``: the
  first ``--cases`` labelled cases of DIR ingested once at the full profile under ``--data``), or
  of synthetic full-size cases when neither is given. Median slices/s over windows of batches,
  after the prefetch queues have drained, with 1 worker and with ``--workers``: slices/s per worker
  process (``--read zarr``: every chunk through zarr, as before ``storage.shards.ShardSlices``). Also
  ``SliceDataset.__getitem__`` in this process, through zarr and through ``ShardSlices``.
* ratio = loader slices/s / step slices/s: the loader must deliver at least twice the step rate.
* projection for a GPU machine: per-worker slices/s (the lower of the two measurements) x ``--cores``
  worker processes (default 14: a 16-core GPU machine less the trainer and its pin-memory thread)
  against one H100's step rate at base 64, ``--size``, bf16: measured when this run is one (CUDA,
  base 64, bf16), else 3 x ``unet.flops.flops_per_forward`` per slice at ``--assume-tflops`` achieved (default
  495 = half of the H100 SXM's 989 dense bf16 TFLOP/s: a high figure for a conv U-Net, whose norms,
  activations, concatenations and optimizer are memory-bound, so the loader target is not
  understated).

On a 2-core CPU run the steps small, e.g. ``--base 16 --batch 4 --steps 3 --loader-batch 16``, or skip
them with ``--paddings none``.
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
from unet.augment import AugmentConfig, apply_augment, augment_params
from unet.data import EpochSampler, SliceDataset, make_loader
from unet.device import autocast_dtype, pick_device
from unet.flops import flops_per_forward
from unet.loss import CrossEntropy
from unet.model import UNet, UNetConfig
from unet.step import Optimization, train_step

H100_DENSE_BF16_TFLOPS = 989.0  # H100 SXM, dense (no sparsity)


def _ingest(url: str, cases: list) -> str:
    from tasks.ingest import ingest_case

    store = SliceStore(url, mode="a")
    store.claim_profile("full")
    for case in cases:
        ingest_case.fn(case, url, "full")
    store.publish(split={"train": store.case_ids(), "val": [], "test": []})
    return url


def synthetic_store(data: Path, cases: int, size: int) -> str:
    """A full-size slice store of synthetic cases (kept under ``data`` for the next run)."""
    url = str(data / f"slices-{size}.zarr")
    if Path(url).exists() and len(SliceStore(url).split.get("train", [])) >= cases:
        return url
    from storage.cases import discover
    from storage.synth import write_dataset

    write_dataset(data / "raw", cases=cases, seed=3, shape=(size, size, 64))
    return _ingest(url, discover(data / "raw").cases[:cases])


def real_store(data: Path, raw: Path, cases: int) -> str:
    """The first ``cases`` labelled cases under ``raw`` at the full profile (kept under ``data``)."""
    from storage.cases import discover

    found = [c for c in discover(raw).cases if "seg" in c.files][:cases]
    if not found:
        raise SystemExit(f"{raw}: no labelled BraTS cases found")
    url = str(data / f"real-{raw.resolve().name}-{len(found)}.zarr")
    if Path(url).exists() and SliceStore(url).split.get("train") == sorted(c.case_id for c in found):
        return url
    return _ingest(url, found)


def train_cases(url: str) -> list[str]:
    store = SliceStore(url)
    return store.split.get("train") or store.case_ids()


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
        train_step(Optimization(model, loss_fn, optimizer, scheduler, scaler, amp, 1.0), xa, ya)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    side = model.input_size_for(args.size)  # what the network sees: 240 (same) or 428 (valid, depth 4)
    flops = 3 * flops_per_forward(model, side, side) * args.batch
    t = statistics.median(times)
    return {
        "padding": padding,
        "input": side,
        "step_s": t,
        "slices_s": args.batch / t,
        "tflops": flops / t / 1e12,
        "amp": str(amp).replace("torch.", "") if amp else "fp32",
    }


def loader_rate(url: str, args, device: torch.device, workers: int) -> float:
    """Median slices/s out of ``make_loader`` with ``workers`` processes, as training uses it."""
    ds = SliceDataset(url, train_cases(url), augment=AugmentConfig(), seed=0, direct=args.read == "direct")
    sampler = EpochSampler([r.tumour > 0 for r in ds.refs], seed=0)
    loader = make_loader(ds, args.loader_batch, sampler=sampler, workers=workers, pin_memory=device.type == "cuda")
    drain = 2 * max(workers, 1) * 4 + 2  # first batches come from full prefetch queues
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


def dataset_rate(url: str, direct: bool, seconds: float = 2.0) -> float:
    """Median slices/s of ``SliceDataset.__getitem__`` with augmentation keys, in this process."""
    ds = SliceDataset(url, train_cases(url), augment=AugmentConfig(), seed=0, direct=direct)
    sampler = EpochSampler([r.tumour > 0 for r in ds.refs], seed=0)
    keys = list(sampler)
    for key in keys[:32]:  # open the cases' arrays
        ds[key]
    rates, i, end = [], 0, time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 3:
        start = time.perf_counter()
        for _ in range(64):
            ds[keys[i % len(keys)]]
            i += 1
        rates.append(64 / (time.perf_counter() - start))
    return statistics.median(rates)


def h100_step(args) -> dict[str, float]:
    """FLOPs per slice (fwd + bwd) at base 64, ``--size``; slices/s at ``--assume-tflops`` achieved."""
    out = {}
    for padding in ("same", "valid"):
        model = UNet(UNetConfig(base_channels=64, depth=args.depth, padding=padding))
        side = model.input_size_for(args.size)
        flops = 3 * flops_per_forward(model, side, side)
        out[padding] = (flops, args.assume_tflops * 1e12 / flops)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--base", type=int, default=64, help="U-Net base channels (paper: 64)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--size", type=int, default=240, help="slice side (full profile: 240)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on a GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on a GPU, 1 on CPU)")
    p.add_argument("--paddings", default="same,valid", help="step rates to measure ('none': loader only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader worker processes")
    p.add_argument("--loader-batch", type=int, default=None, help="loader batch (default: --batch)")
    p.add_argument("--read", choices=("direct", "zarr"), default="direct", help="loader reads (zarr: as before)")
    p.add_argument("--loader-windows", type=int, default=5, help="windows of 8 batches timed for the loader")
    p.add_argument("--store", default=None, help="slice store to read (default: --raw, else synthetic)")
    p.add_argument("--raw", default=None, help="BraTS cases to ingest once at the full profile and read")
    p.add_argument("--cases", type=int, default=None, help="cases from --raw (default 6) or synthetic (default 4)")
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "brats-bench-train"))
    p.add_argument("--cores", type=int, default=14, help="loader worker processes of the projected GPU machine")
    p.add_argument(
        "--assume-tflops", type=float, default=0.5 * H100_DENSE_BF16_TFLOPS, help="achieved H100 bf16 TFLOP/s"
    )
    args = p.parse_args()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.loader_batch = args.loader_batch or args.batch
    paddings = [] if args.paddings in ("", "none") else args.paddings.split(",")

    if args.store:
        url, kind = args.store, "given store"
    elif args.raw:
        url, kind = real_store(Path(args.data), Path(args.raw), args.cases or 6), f"real cases from {args.raw}"
    else:
        url, kind = synthetic_store(Path(args.data), args.cases or 4, args.size), "SYNTHETIC cases"
    store = SliceStore(url)
    cases = train_cases(url)
    side = store.image(cases[0]).shape[-1]
    slices = len(SliceDataset(url, cases).refs)
    where = torch.cuda.get_device_name() if gpu else f"{device.type.upper()}, {torch.get_num_threads()} torch threads"
    print(
        f"train benchmark: {args.size}x{args.size} slices, U-Net base {args.base} depth {args.depth}, "
        f"batch {args.batch}, {args.steps} timed steps (median) on {where}\n"
        f"loader: {url} ({kind}: {len(cases)} cases, {slices} brain slices of {side}x{side}), "
        f"augmentation on, batch {args.loader_batch}, reads: {args.read}, {os.cpu_count()} cores here",
        flush=True,
    )
    zarr_rate, direct_rate = dataset_rate(url, direct=False), dataset_rate(url, direct=True)
    print(f"  SliceDataset in this process: {zarr_rate:8.0f} slices/s through zarr, {direct_rate:8.0f} direct")
    one = loader_rate(url, args, device, 1)  # before the steps: its workers do not compete with them
    print(f"  DataLoader, 1 worker:         {one:8.0f} slices/s per worker", flush=True)
    loader, per_worker = one, one
    if args.workers > 1:
        loader = loader_rate(url, args, device, args.workers)
        per_worker = min(one, loader / args.workers)
        each = loader / args.workers
        print(f"  DataLoader, {args.workers} workers:        {loader:8.0f} slices/s, {each:.0f} per worker", flush=True)

    rows = [step_rate(padding, args, device) for padding in paddings]
    if rows:
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

    # projection: a GPU machine's loader workers against one H100's step rate at base 64, bf16
    assumed = h100_step(args)
    measured = {r["padding"]: r["slices_s"] for r in rows if gpu and args.base == 64 and r["amp"] == "bfloat16"}
    projected = per_worker * args.cores
    print(
        f"projection: {per_worker:.0f} slices/s per worker x {args.cores} workers = {projected:.0f} slices/s "
        f"against one H100 at base 64, {args.size}x{args.size}, bf16 (target loader/step >= 2):"
    )
    for padding, (flops, rate) in assumed.items():
        if padding in measured:
            step, how = measured[padding], f"measured here ({measured[padding] * flops / 1e12:.0f} TFLOP/s)"
        else:
            step, how = rate, f"assumed {args.assume_tflops:g} TFLOP/s achieved"
        ratio = projected / step
        print(
            f"  {padding:5}: {flops / 1e9:6.1f} GFLOP/slice fwd+bwd, step {step:7.0f} slices/s ({how}), "
            f"loader/step {ratio:5.1f}x {'ok' if ratio >= 2 else 'LOADER TOO SLOW'}; 2x holds up to "
            f"{projected / 2 * flops / 1e12:.0f} TFLOP/s achieved"
        )


if __name__ == "__main__":
    main()
