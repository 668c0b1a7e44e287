"""Quality on real anatomy: ingest real BraTS cases, train on a patient split, score held-out cases.

    python benchmarks/real.py RAW [RAW ...] [--preset cpu|gpu] [--work runs/real] [--split-seed 0]

RAW: folders of real BraTS cases in any layout the readers take (e.g. the 20 BraTS 2018 cases
that ``shared/data/real20/extract.py`` writes, and ``tests/data``). The product's own flows run,
in one process on the embedded defaults (ephemeral Prefect API, Dask LocalCluster, local store):

    ingest (split by patient: --split train/val/test ratios)
      -> train (the preset; the best epoch by per-case 3D validation Dice; post-processing chosen
         on the validation cases)
      -> evaluate the test cases on their original grids: the network's raw output, with mirror
         TTA, with the post-processing, and with both

and prints, per test case and as means, Dice and HD95 (mm) for WT, TC and ET, with the time of each
stage. Presets (the budget is the training plan, fixed in steps so that figures are comparable):

    cpu  profile tp (96x96 slices), U-Net base 16, batch norm, about 15 minutes on 2 cores
    gpu  profile full (240x240), the paper's base 64, bf16 autocast: for a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # nothing leaves this machine

NETWORK = dict(depth=4, padding="same", norm="batch")
TRAINING = dict(max_steps_per_epoch=250, oversample_tumour=3.0, class_weight_power=0.5)
PRESETS = {  # profile, network, training
    "cpu": (
        "tp",
        {**NETWORK, "base_channels": 16},
        {**TRAINING, "epochs": 24, "batch_size": 8, "lr": 3e-3, "workers": 1, "device": "cpu"},
    ),
    "gpu": (
        "full",
        {**NETWORK, "base_channels": 64},
        {**TRAINING, "epochs": 30, "batch_size": 32, "lr": 1e-3, "workers": 8, "device": "cuda"},
    ),
}
REGIONS = ("WT", "TC", "ET")
VARIANTS = [  # name, post-processing, mirror TTA
    ("raw network output", False, False),
    ("+ TTA", False, True),
    ("+ post-processing", True, False),
    ("+ post-processing + TTA (default)", True, True),
]


def table(rows: list[dict], title: str) -> str:
    cols = [f"dice_{r}" for r in REGIONS] + [f"hd95_{r}" for r in REGIONS]
    head = f"{'case':24}" + "".join(f"{c:>10}" for c in cols)
    lines = [title, head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:24}" + "".join(f"{r[c]:>10.3f}" if c.startswith("dice") else f"{r[c]:>10.1f}" for c in cols)
        )
    lines.append("-" * len(head))
    for stat, fn in (("mean", statistics.fmean), ("median", statistics.median)):
        lines.append(
            f"{stat:24}"
            + "".join(
                f"{fn([r[c] for r in rows]):>10.3f}" if c.startswith("dice") else f"{fn([r[c] for r in rows]):>10.1f}"
                for c in cols
            )
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", nargs="+", help="folders of real BraTS cases")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--work", default="runs/real", help="store, registry and results go here")
    p.add_argument("--split", type=float, nargs=3, default=(0.6, 0.15, 0.25), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument(
        "--model", help="a version already trained in --work: choose its post-processing again and evaluate it"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="override a network or training field, e.g. --set epochs=10",
    )
    args = p.parse_args()

    from flows.embedded import prefect_api
    from flows.evaluate import evaluate
    from flows.infer import Prediction
    from flows.ingest import Preprocessing, ingest
    from flows.train import train
    from storage.store import SliceStore
    from tasks.evaluate import choose_postprocess
    from unet.model import UNetConfig
    from unet.train import TrainConfig

    profile, network, training = PRESETS[args.preset]
    work = Path(args.work)
    store, models = str(work / f"slices-{profile}.zarr"), str(work / "models")
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    network = UNetConfig(**{**network, **{k: v for k, v in overrides.items() if k in UNetConfig.model_fields}})
    training = TrainConfig(
        **{**training, "seed": args.seed, **{k: v for k, v in overrides.items() if k in TrainConfig.model_fields}}
    )
    seconds = {}
    started = time.perf_counter()
    with prefect_api():
        seconds["start-up"] = time.perf_counter() - started
        t = time.perf_counter()
        data = Preprocessing(profile=profile, split_ratios=tuple(args.split), split_seed=args.split_seed)
        state = ingest(args.raw, store, data, return_state=True)
        summary = state.result(raise_on_failure=False)
        if not isinstance(summary, dict):
            print(f"ingest failed: {state.message}", file=sys.stderr)
            return 1
        seconds["ingest"] = time.perf_counter() - t
        split = SliceStore(store).split
        print(
            f"{summary['cases_in_store']} real cases; split train {len(split['train'])}, val {len(split['val'])}, "
            f"test {len(split['test'])}"
            f"{' (' + state.message + ')' if not state.is_completed() else ''}",
            flush=True,
        )

        t = time.perf_counter()
        if args.model:  # chosen again by today's rule; trained as it was
            version = args.model
            choose_postprocess(store, models, version, training.device)
        else:
            version = train(store, models, network, training, fresh=True)["version"]
        seconds["train"] = time.perf_counter() - t
        t = time.perf_counter()
        runs = {}
        for name, post, tta in VARIANTS:  # the product's default last: its record stays with the version
            runs[name] = evaluate(
                store, version, models, "test", Prediction(postprocess=post, tta=tta, device=training.device)
            )
        seconds["evaluate"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started

    from storage.registry import Registry

    info = Registry(models).info(version)
    per_case = info["evaluation"]["per_case"]
    print()
    given = {**PRESETS[args.preset][1], **PRESETS[args.preset][2], **overrides, "seed": args.seed}
    print(f"preset {args.preset}: profile {profile}, " + ", ".join(f"{k} {v}" for k, v in given.items()))
    print(
        f"model {version}: best epoch {info['metrics']['best_epoch']} of {len(info['history'])}; "
        "validation (per-case 3D, store grid) Dice "
        + " ".join(f"{r} {info['metrics'][f'dice_{r}']:.3f}" for r in REGIONS)
    )
    choice = info.get("postprocess_choice", {})
    print(
        f"post-processing chosen on {choice.get('cases')} validation case(s): {info.get('postprocess')} "
        f"(mean validation Dice {choice.get('mean_dice_before', float('nan')):.4f} -> "
        f"{choice.get('mean_dice_after', float('nan')):.4f}, "
        f"HD95 {choice.get('mean_hd95_before', float('nan')):.1f} -> "
        f"{choice.get('mean_hd95_after', float('nan')):.1f} mm)"
    )
    print()
    print(table(per_case, f"test cases ({len(per_case)}), original grids, with post-processing and TTA (the default)"))
    print()
    print("means of the same test cases by variant:")
    for name, _, _ in VARIANTS:
        print(
            f"  {name:28}"
            + "".join(f"  Dice {r} {runs[name][f'dice_{r}']:.3f}" for r in REGIONS)
            + "".join(f"  HD95 {r} {runs[name][f'hd95_{r}']:5.1f}" for r in REGIONS)
        )
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    out = work / "real-benchmark.json"
    out.write_text(
        json.dumps(
            {"preset": args.preset, "version": version, "seconds": seconds, "means": runs, "per_case": per_case},
            indent=2,
        )
    )
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
