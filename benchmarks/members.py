"""Which models make a better ensemble: cross-validations on the same folds, alone and in pairs.

    python benchmarks/members.py A/real-benchmark.json B/real-benchmark.json [C/real-benchmark.json ...]

Each file is what ``benchmarks/real.py`` writes; the runs must share their folds (by site, or by
patient with the same ``--seed``). For every fold, the first run's fold model (A) and each other
run's (B, C, ...) segment the fold's cases, which none of them saw: each alone, and A with each
other as a two-member ensemble (``unet.ensemble``: the mean of their probabilities), with the
mirror TTA and the first run's post-processing, as ``benchmarks/real.py`` scores its cases. Printed:
mean Dice and HD95 per region, the worst case, and the cases worse and better than A alone.

A pair of the same recipe with another ``--seed`` is the control: it shows what a second member
gives by itself, so a pair that beats it gains from being *different* (e.g. trained with another
augmentation), which is what an ensemble whose members are trained differently buys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = ("dice_WT", "dice_TC", "dice_ET", "hd95_WT", "hd95_TC", "hd95_ET")


def fold_models(record: Path) -> dict[tuple[str, ...], object]:
    """A run's fold models, by the cases each never saw."""
    from storage.registry import Registry
    from unet.checkpoint import load_model

    registry, models = Registry(str(record.parent / "models")), {}
    for version in sorted((record.parent / "models").glob("v*")):
        if any(version.glob("oof-*.npz")):  # a fold model (the ensemble keeps none)
            model, info = load_model(registry, version.name, "cpu")
            models[tuple(sorted(info.split["val"]))] = model.eval()
    if not models:
        raise SystemExit(f"{record}: no fold models beside it (a run of benchmarks/real.py keeps them in models/)")
    return models


def score(store, case: str, model, post) -> dict[str, float]:
    from tasks.evaluate import ground_truth, predict_stored_case
    from unet.metrics import evaluate_case

    zooms = store.attrs(case)["zooms"]
    labels = post.apply(predict_stored_case(store, case, model, True, 16), zooms)
    metrics = evaluate_case(labels, ground_truth(store, case)[0], zooms)
    return {k: round(float(metrics[k]), 4) for k in KEYS}


def line(name: str, rows: dict, reference: dict | None) -> str:
    cells = [f"{name:<28}"]
    cells += [f"{np.nanmean([r[k] for r in rows.values()]):6.3f}" for k in KEYS[:3]]
    cells += [f"{np.nanmean([r[k] for r in rows.values()]):5.1f}" for k in KEYS[3:]]
    cells += [f"{min(r[k] for r in rows.values()):5.2f}" for k in KEYS[:2]]
    if reference is not None:
        for k in KEYS[:3]:
            d = np.array([rows[c][k] - reference[c][k] for c in rows])
            cells.append(f"{int((d < -0.01).sum()):2d}/{int((d > 0.01).sum()):2d}")
    return " ".join(cells)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="+", type=Path, help="real-benchmark.json of runs on the same folds")
    p.add_argument("--out", type=Path, help="write every case's scores here (JSON)")
    args = p.parse_args(argv)
    if len(args.records) < 2:
        raise SystemExit("give at least two runs: the first is paired with each other")
    from storage.store import SliceStore
    from unet.ensemble import Ensemble
    from unet.postprocess import PostProcess

    first = args.records[0]
    (record,) = json.loads(first.read_text()).values()
    post = PostProcess.from_dict(record["postprocess"]["postprocess"])
    store = SliceStore(str(next(first.parent.glob("slices-*.zarr"))))
    runs = [fold_models(r) for r in args.records]
    for path, models in zip(args.records[1:], runs[1:]):
        if set(models) != set(runs[0]):
            raise SystemExit(f"{path}: its folds are not those of {first}")
    names = ["A"] + [chr(ord("B") + i) for i in range(len(runs) - 1)]
    scored: dict[str, dict] = {n: {} for n in names + [f"A+{n}" for n in names[1:]]}
    for fold, a in runs[0].items():
        models = {"A": a} | {n: r[fold] for n, r in zip(names[1:], runs[1:])}
        models |= {f"A+{n}": Ensemble([a, models[n]]) for n in names[1:]}
        for case in fold:
            for name, model in models.items():
                scored[name][case] = score(store, case, model, post)
            print(case, " ".join(f"{n} {s[case]['dice_WT']:.3f}" for n, s in scored.items()), flush=True)
    print("\nruns: " + ", ".join(f"{n} = {r}" for n, r in zip(names, args.records)))
    print(f"{'':<28} {'Dice WT':>6} {'TC':>6} {'ET':>6} HD95 WT {'TC':>5} {'ET':>5} worst WT/TC  worse/better than A")
    for name, rows in scored.items():
        print(line(name, rows, None if name == "A" else scored["A"]))
    if args.out:
        args.out.write_text(json.dumps(scored, indent=1))
    return scored


if __name__ == "__main__":
    main()
