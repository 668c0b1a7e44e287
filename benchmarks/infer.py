"""Inference benchmark: seconds per full-size (240x240x155) volume, end to end.

    python benchmarks/infer.py [--cases 3] [--base 64] [--device auto] [--configs same:full,valid:full,same:tp,valid:tp]

On N synthetic full-size scans (no seg, written once under --data), for each padding x profile,
the stages a ``brats infer`` task runs, with the same functions, one volume at a time:
read + validate (``read_case``), preprocess (``preprocess_case``: z-score, profile), predict
(``unet.predict.segment``: brain slices in batches, overlap-tile in valid mode, restore to the
input grid) and write (``write_segmentation`` with the input's header, atomically). Untrained
weights (the cost does not depend on them). The model is built once per config, outside the timing.
Prints the median over the volumes of each stage and of the total, and the min..max of the total.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from storage.nifti import discover, load_reference, read_case, write_segmentation
from storage.synth import write_dataset
from unet.model import UNet, UNetConfig
from unet.predict import segment
from unet.preprocess import PROFILES, preprocess_case

SHAPE = (240, 240, 155)


def scans(data: Path, n: int) -> list:
    cases = discover(data).cases if data.is_dir() and any(data.iterdir()) else []
    if len(cases) < n:
        write_dataset(data, cases=n, seed=11, shape=SHAPE, with_seg=False, prefix="BraTS19_NEW")
        cases = discover(data).cases
    return cases[:n]


def run_one(model: UNet, case, profile: str, out: Path, device: str, batch_size: int) -> dict[str, float]:
    t = [time.perf_counter()]
    scan = read_case(case)
    t.append(time.perf_counter())
    slices, _, attrs = preprocess_case(scan, PROFILES[profile], dtype="float32")
    t.append(time.perf_counter())
    labels = segment(model, slices, attrs["geometry"], attrs["slice_brain"], batch_size=batch_size, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t.append(time.perf_counter())
    write_segmentation(labels, load_reference(case.files["flair"]), out / f"{case.case_id}_seg.nii.gz")
    t.append(time.perf_counter())
    stages = dict(zip(("read", "preprocess", "predict", "write"), (b - a for a, b in zip(t, t[1:]))))
    return {**stages, "total": t[-1] - t[0], "brain_slices": sum(1 for n in attrs["slice_brain"] if n)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=3, help="volumes per config (the median is reported)")
    p.add_argument("--base", type=int, default=64, help="U-Net base channels (paper: 64)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--configs", default="same:full,valid:full,same:tp,valid:tp", help="padding:profile,...")
    p.add_argument(
        "--data", default=str(Path(tempfile.gettempdir()) / "brats-bench-infer"), help="synthetic scans (kept)"
    )
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    cases = scans(Path(args.data), args.cases)
    where = (
        torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} torch threads"
    )
    print(
        f"infer benchmark: {len(cases)} synthetic {'x'.join(map(str, SHAPE))} volume(s), "
        f"U-Net base {args.base} depth {args.depth}, batch {args.batch_size}, {where}"
    )
    header = (
        f"{'padding':8} {'profile':7} {'net input':>9} {'brain sl':>8} {'read':>6} {'prep':>6} "
        f"{'predict':>8} {'write':>6} {'total s':>8} {'min..max':>13}"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            padding, profile = config.split(":")
            torch.manual_seed(0)
            model = UNet(UNetConfig(base_channels=args.base, depth=args.depth, padding=padding)).to(device).eval()
            side = (PROFILES[profile].window or SHAPE[0]) // PROFILES[profile].factor
            runs = [run_one(model, case, profile, Path(tmp), device, args.batch_size) for case in cases]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            totals = [r["total"] for r in runs]
            print(
                f"{padding:8} {profile:7} {model.input_size_for(side):>9} {med['brain_slices']:>8.0f} "
                f"{med['read']:>6.2f} {med['preprocess']:>6.2f} {med['predict']:>8.2f} {med['write']:>6.2f} "
                f"{med['total']:>8.2f} {min(totals):>6.1f}..{max(totals):<6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
