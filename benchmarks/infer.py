"""Inference benchmark: seconds per volume end to end, today's path against the default one, side by side.

    python benchmarks/infer.py --raw /work/data/real20 [--cases 2] [--base 64] [--configs same:full]
                               [--batch-size 16] [--tta] [--device auto]

For each padding:profile in ``--configs`` (default ``same:full``, the case the numbers below are
about) and each of ``--cases`` volumes (real BraTS cases from ``--raw``; without it, synthetic
240x240x155 scans written once under ``--data``), the stages a ``brats infer`` task runs, with the
same functions, one volume at a time: read + validate (``read_case``), preprocess
(``preprocess_case``, grown window as inference does), predict (``unet.predict.predict_volume``: brain
slices in batches, restored to the input grid) and write (``write_segmentation``), along two paths:

* (a) ``whole``: as before cropping: fp32, contiguous tensors, every brain slice on the whole plane
  (``predict_volume(..., precision="fp32", crop=False, channels_last=False)``);
* (b) ``default``: what ``predict_volume`` does by default: each batch cropped to its brain's box plus
  ``CROP_MARGIN`` on the network's grid, channels_last, autocast where ``autocast_dtype`` says so
  (bf16 on CUDA and on CPUs with native bf16).

Reported per path: median seconds per volume of each stage and of the total (and the min..max of
the total), the FLOPs actually computed (``unet.flops.flops_per_forward`` at each forward's tile size x
its slices, mirrors included, counted by a hook on the model) and the FLOP/s they ran at during
``predict``, against a matmul peak measured in the same run (``torch.mm`` of two 2048x2048
matrices, 4096 on CUDA, on this process's torch threads: fp32, and bf16 where the CPU or GPU has
it); then the ratio b/a of the median totals, and the agreement of the two segmentations (Dice
per region WT/TC/ET, the median and the worst over the volumes).

The weights are untrained (seed 0): the cost does not depend on them, but the agreement of an
untrained network is not the real check of cropping (its argmax is noise near ties); that check is
``tests/test_predict_crop.py``, with a trained model on real cases. The two paths take turns
going first (a b, b a, a b, ...), so that a cold file cache or a noisy machine hurts both alike.
On CUDA every stage is timed after a synchronize.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from storage.brats import REGIONS
from storage.cases import discover
from storage.nifti import read_case, write_segmentation
from storage.synth import write_dataset
from unet.device import autocast_dtype, cpu_has_bf16, pick_device
from unet.flops import flops_per_forward
from unet.metrics import dice
from unet.model import UNet, UNetConfig
from unet.predict import CROP_MARGIN, predict_volume
from unet.preprocess import PROFILES, preprocess_case

SHAPE = (240, 240, 155)
PATHS = {  # name -> predict_volume() options
    "whole": {"precision": "fp32", "crop": False, "channels_last": False},
    "default": {},
}


def scans(data: Path, n: int) -> list:
    cases = discover(data).cases if data.is_dir() and any(data.iterdir()) else []
    if len(cases) < n:
        write_dataset(data, cases=n, seed=11, shape=SHAPE, with_seg=False, prefix="BraTS19_NEW")
        cases = discover(data).cases
    return cases[:n]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, reps: int = 10) -> float:
    """FLOP/s of ``torch.mm`` on two square matrices: the best of ``reps`` after a warm-up."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class FlopCounter:
    """Counts the FLOPs of every forward of a model (its input's batch x ``flops_per_forward``)."""

    def __init__(self, model: UNet):
        self.model, self.flops, self.tiles = model, 0, []
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        x = args[0]
        h, w = x.shape[-2:]
        self.flops += x.shape[0] * flops_per_forward(self.model, h, w)
        self.tiles += [(h, w)] * x.shape[0]

    def reset(self) -> None:
        self.flops, self.tiles = 0, []


def run_one(model, counter, case, profile, out: Path, device, batch_size, tta, options) -> tuple[dict, np.ndarray]:
    counter.reset()
    t = [time.perf_counter()]
    scan = read_case(case)
    t.append(time.perf_counter())
    slices, _, attrs = preprocess_case(scan, PROFILES[profile], dtype=np.float32, grow=True)
    t.append(time.perf_counter())
    labels = predict_volume(
        model, slices, attrs["geometry"], attrs["slice_brain"], tta=tta, batch_size=batch_size, device=device, **options
    )
    sync(device)
    t.append(time.perf_counter())
    write_segmentation(labels, scan.reference, out / f"{case.case_id}_seg.nii.gz")
    t.append(time.perf_counter())
    stages = dict(zip(("read", "preprocess", "predict", "write"), (b - a for a, b in zip(t, t[1:]))))
    pixels = [h * w for h, w in counter.tiles]
    row = {
        **stages,
        "total": t[-1] - t[0],
        "brain_slices": sum(1 for n in attrs["slice_brain"] if n),
        "flops": counter.flops,
        "tile_pixels": float(np.mean(pixels)) if pixels else 0.0,
        "plane_pixels": float(np.prod(slices.shape[2:])),
    }
    return row, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", default=None, help="real BraTS cases (any layout discover() reads); default: synthetic")
    p.add_argument("--cases", type=int, default=2, help="volumes per config (the median is reported)")
    p.add_argument("--base", type=int, default=64, help="U-Net base channels (paper: 64)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tta", action="store_true", help="mirror TTA on both paths (2x the compute)")
    p.add_argument("--configs", default="same:full", help="padding:profile,... e.g. same:full,valid:full,same:tp")
    p.add_argument(
        "--data", default=str(Path(tempfile.gettempdir()) / "brats-bench-infer"), help="synthetic scans (kept)"
    )
    args = p.parse_args()
    device = pick_device(args.device)

    if args.raw:
        cases, what = discover(args.raw).cases[: args.cases], f"real ({args.raw})"
    else:
        cases, what = scans(Path(args.data), args.cases), "synthetic " + "x".join(map(str, SHAPE))
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
        has_bf16 = torch.cuda.is_bf16_supported()
    else:
        where = f"CPU, {torch.get_num_threads()} torch threads"
        has_bf16 = cpu_has_bf16()
    amp = autocast_dtype(device, "auto")
    peaks = {"fp32": matmul_peak(device, torch.float32)}
    if has_bf16:
        peaks["bf16"] = matmul_peak(device, torch.bfloat16)
    print(
        f"infer benchmark: {len(cases)} {what} volume(s), U-Net base {args.base} depth {args.depth} (untrained), "
        f"batch {args.batch_size}, TTA {'on' if args.tta else 'off'}, {where}\n"
        f"(a) whole: fp32, contiguous, whole plane; (b) default: crop to the brain + {CROP_MARGIN} px, "
        f"channels_last, autocast {str(amp).removeprefix('torch.') if amp else 'off (fp32)'}\n"
        "matmul peak (torch.mm, same run): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
    )
    peak_b = peaks["bf16" if amp is torch.bfloat16 and "bf16" in peaks else "fp32"]
    header = (
        f"{'padding':7} {'profile':7} {'path':8} {'slices':>6} {'tile px':>8} {'read':>5} {'prep':>5} "
        f"{'predict':>8} {'write':>5} {'total s':>8} {'min..max':>13} {'TFLOP':>6} {'GFLOP/s':>8} {'% peak':>6}"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            padding, profile = config.split(":")
            torch.manual_seed(0)
            model = UNet(UNetConfig(base_channels=args.base, depth=args.depth, padding=padding)).to(device).eval()
            counter = FlopCounter(model)
            runs: dict[str, list[dict]] = {name: [] for name in PATHS}
            agree: dict[str, list[float]] = {r: [] for r in REGIONS}
            for i, case in enumerate(cases):
                labels = {}
                for name in list(PATHS)[:: 1 if i % 2 == 0 else -1]:  # a, b; then b, a: the same odds for both
                    options = PATHS[name]
                    out = Path(tmp) / name
                    out.mkdir(exist_ok=True)
                    row, labels[name] = run_one(
                        model, counter, case, profile, out, device, args.batch_size, args.tta, options
                    )
                    runs[name].append(row)
                for region, members in REGIONS.items():
                    agree[region].append(dice(np.isin(labels["whole"], members), np.isin(labels["default"], members)))
            totals = {}
            for name, rows in runs.items():
                med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                rate = statistics.median(r["flops"] / r["predict"] for r in rows)
                peak = peaks["fp32"] if name == "whole" else peak_b
                totals[name] = med["total"]
                t = [r["total"] for r in rows]
                print(
                    f"{padding:7} {profile:7} {name:8} {med['brain_slices']:>6.0f} "
                    f"{med['tile_pixels'] / med['plane_pixels']:>7.0%} {med['read']:>5.2f} {med['preprocess']:>5.2f} "
                    f"{med['predict']:>8.2f} {med['write']:>5.2f} {med['total']:>8.2f} {min(t):>6.1f}..{max(t):<6.1f} "
                    f"{med['flops'] / 1e12:>6.2f} {rate / 1e9:>8.1f} {rate / peak:>6.0%}",
                    flush=True,
                )
            print(
                f"{'':16} ratio b/a of the median totals: {totals['default'] / totals['whole']:.3f}; "
                f"agreement (Dice a vs b, median / worst): "
                + ", ".join(f"{r} {statistics.median(v):.4f} / {min(v):.4f}" for r, v in agree.items()),
                flush=True,
            )
    print(
        "tile px: the pixels the network ran on per slice, of the plane's; % peak: of the fp32 matmul for (a), "
        "of the matmul in (b)'s autocast dtype for (b). Untrained weights: the agreement is not the real check "
        "of cropping (tests/test_predict_crop.py is)."
    )


if __name__ == "__main__":
    main()
