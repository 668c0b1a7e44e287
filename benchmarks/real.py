"""Quality on real anatomy: cross-validate a recipe on real BraTS cases, or compare variants of it.

    python benchmarks/real.py RAW [RAW ...] [--recipe cpu] [--set FIELD=JSON ...] [--work runs/real]
    python benchmarks/real.py RAW [RAW ...] --recipe cpu --ablation NAME:FIELD=JSON,FIELD=JSON ... [--work …]

RAW: folders of real BraTS cases in any layout the readers take (e.g. the 20 BraTS 2018 cases that
``shared/data/real20/extract.py`` writes, and ``tests/data``). The product's own flows run, in one
process on the embedded defaults (ephemeral Prefect API, Dask LocalCluster, local store):

    ingest with the recipe's profile and split
      -> train: with ``training.folds`` K (the cpu and gpu recipes), a K-fold cross-validation by
         patient, every case scored on its original grid by the fold model that never saw it, with
         the post-processing chosen on all of them; else one model on the split, scored on its test cases

and prints the per-fold table, the per-case scores (worst first), pooled means and medians, and the
worst cases by name. ``--ablation`` runs each variant (the recipe with some fields changed; an
empty change is the recipe itself) on the same folds, one after another, and prints each beside the
first; finished variants are kept in ``WORK/ablation/NAME.json`` and not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # nothing leaves this machine

REGIONS = ("WT", "TC", "ET")
COLUMNS = [f"dice_{r}" for r in REGIONS] + [f"hd95_{r}" for r in REGIONS]


def fmt(column: str, value: float) -> str:
    return f"{value:>9.3f}" if column.startswith("dice") else f"{value:>9.1f}"


def case_table(rows: list[dict], title: str) -> str:
    head = f"{'case':24}{'fold':>5}" + "".join(f"{c:>9}" for c in COLUMNS) + f"{'WT ml':>8}{'ET ml':>7}"
    lines = [title, head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: min(r[f"dice_{k}"] for k in REGIONS)):
        lines.append(
            f"{r['case']:24}{r.get('fold', ''):>5}"
            + "".join(fmt(c, r[c]) for c in COLUMNS)
            + f"{r.get('truth_WT_ml', float('nan')):>8.1f}{r.get('truth_ET_ml', float('nan')):>7.1f}"
        )
    lines.append("-" * len(head))
    for stat, fn in (("mean", statistics.fmean), ("median", statistics.median), ("worst", None)):
        values = [
            (min if c.startswith("dice") else max)([r[c] for r in rows]) if fn is None else fn([r[c] for r in rows])
            for c in COLUMNS
        ]
        lines.append(f"{stat:29}" + "".join(fmt(c, v) for c, v in zip(COLUMNS, values)))
    return "\n".join(lines)


def fold_table(per_fold: list[dict]) -> str:
    lines = [f"{'fold':>4}{'cases':>6}" + "".join(f"{c:>9}" for c in COLUMNS)]
    lines += [f"{f['fold']:>4}{f['cases']:>6}" + "".join(fmt(c, f[c]) for c in COLUMNS) for f in per_fold]
    return "\n".join(lines)


def misses(rows: list[dict]) -> list[str]:
    """The failures the targets name: a whole tumour below 0.6, an enhancing tumour of 1 ml or more
    missed (Dice under 0.05: a few voxels of overlap are not a found tumour)."""
    out = [f"{r['case']}: WT Dice {r['dice_WT']:.2f}" for r in rows if r["dice_WT"] < 0.6]
    out += [
        f"{r['case']}: ET of {r['truth_ET_ml']} ml missed (Dice {r['dice_ET']:.3f})"
        for r in rows
        if r.get("truth_ET_ml", 0) >= 1 and r["dice_ET"] < 0.05
    ]
    return out


def site_table(rows: list[dict]) -> str:
    """Per institution (``storage.split.site_of``): cases and mean Dice, worst WT first."""
    from storage.split import site_of

    sites: dict[str, list[dict]] = {}
    for r in rows:
        sites.setdefault(site_of(r["case"]), []).append(r)
    lines = [f"{'site':10}{'cases':>6}" + "".join(f"{c:>9}" for c in COLUMNS)]
    for site, part in sorted(sites.items(), key=lambda kv: statistics.fmean(r["dice_WT"] for r in kv[1])):
        lines.append(
            f"{site:10}{len(part):>6}" + "".join(fmt(c, statistics.fmean(r[c] for r in part)) for c in COLUMNS)
        )
    return "\n".join(lines)


def quality_lines(quality: dict | None, rows: list[dict]) -> str:
    """How the quality estimate (leave-one-out on these out-of-fold cases) tracks the true Dice."""
    if not quality:
        return "quality estimate: not calibrated"
    h = quality["held_out"]
    lines = [
        "quality estimate, each case estimated by a calibration fitted on the others (leave one out):",
        "  " + "; ".join(f"{r} Spearman {h[r]['spearman']:.3f}, MAE {h[r]['mae']:.3f}" for r in REGIONS),
        f"  flagged {h['flagged']} of {h['cases']} ({h['flagged'] / h['cases']:.0%}); bad cases (WT < 0.7 or "
        f"TC < 0.5) flagged: {h['bad_flagged']} of {h['bad']}; rule chosen on all: {quality['rule']}",
        f"  {'case':24}" + "".join(f"{'Dice ' + r:>9}{'est':>6}" for r in REGIONS) + "  review",
    ]
    for r in sorted(rows, key=lambda r: min(r["dice_WT"], r["dice_TC"]))[:8]:
        cells = "".join(f"{r[f'dice_{k}']:>9.3f}{r.get(f'est_{k}', float('nan')):>6.2f}" for k in REGIONS)
        lines.append(f"  {r['case']:24}{cells}  {'yes' if r.get('review') else ''}")
    return "\n".join(lines)


def parse_changes(text: str) -> dict:
    """``field=JSON,field=JSON`` -> {field: value}; a comma starts a new field only before ``name=``, so
    a JSON list holds commas (``member_augment=["drop","gin"]``)."""
    return {k: json.loads(v) for k, v in (part.split("=", 1) for part in re.split(r",(?=\w+=)", text) if part)}


def run_variant(store: str, models: str, recipe, changes: dict, seed: int) -> dict:
    """Train the recipe with ``changes`` (fields of its network or training); the CV record or test scores."""
    from flows.evaluate import evaluate
    from flows.train import train
    from storage.registry import Registry
    from unet.predict import Prediction

    unknown = set(changes) - set(type(recipe.network).model_fields) - set(type(recipe.training).model_fields)
    if unknown:
        raise SystemExit(f"no such network or training field: {', '.join(sorted(unknown))}")

    def changed(section, **more):  # validated as a whole: a JSON list becomes the field's tuple, a bad value is refused
        fields = type(section).model_fields
        return type(section).model_validate(
            {**section.model_dump(), **more, **{k: changes[k] for k in changes if k in fields}}
        )

    network, training = changed(recipe.network), changed(recipe.training, seed=seed)
    started = time.perf_counter()
    trained = train(store, models, network, training, fresh=True)
    seconds = time.perf_counter() - started
    info = Registry(models).info(trained["version"])
    if training.folds:
        cv = info["cv"]
        return {"version": trained["version"], "seconds": seconds, **cv, "quality": info.get("quality")}
    ev = evaluate(store, trained["version"], models, "test", Prediction(device=training.device))
    rows = Registry(models).info(trained["version"])["evaluation"]["per_case"]
    return {"version": trained["version"], "seconds": seconds, "per_case": rows, "per_fold": [], "evaluate": ev}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", nargs="+", help="folders of real BraTS cases")
    p.add_argument("--recipe", default="cpu", help="paper, cpu or gpu (flows.recipes)")
    p.add_argument("--work", default="runs/real", help="store, registry and results go here")
    p.add_argument("--seed", type=int, default=0, help="training seed (the folds too)")
    p.add_argument(
        "--by",
        choices=("patient", "site"),
        default="patient",
        help="folds by patient, or by site: leave-one-institution-out (each institution of the BraTS ids whole)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="change a field of the recipe (a data field, e.g. profile, for every variant: they share one store)",
    )
    p.add_argument(
        "--ablation", nargs="+", metavar="NAME:FIELD=JSON,…", help="variants of the recipe, on the same folds"
    )
    args = p.parse_args()

    from flows.cli.embedded import prefect_api
    from flows.ingest import ingest
    from flows.recipes import recipe as named

    recipe = named(args.recipe)
    base = {"fold_by": args.by, **parse_changes(",".join(args.set))}
    data = {k: base.pop(k) for k in list(base) if k in type(recipe.data).model_fields}  # one store for every variant
    recipe = recipe.model_copy(update={"data": type(recipe.data).model_validate({**recipe.data.model_dump(), **data})})
    variants = [
        (name, {**base, **parse_changes(text)}) for name, _, text in (v.partition(":") for v in args.ablation or [])
    ]
    variants = variants or [(args.recipe, base)]
    work = Path(args.work)
    (work / "ablation").mkdir(parents=True, exist_ok=True)
    store, models = str(work / f"slices-{recipe.data.profile}.zarr"), str(work / "models")
    results = {}
    with prefect_api():
        started = time.perf_counter()
        state = ingest(args.raw, store, recipe.data, return_state=True)
        summary = state.result(raise_on_failure=False)
        if not isinstance(summary, dict):
            print(f"ingest failed: {state.message}", file=sys.stderr)
            return 1
        print(
            f"{summary['cases_in_store']} real cases in {store}, split {summary['split']} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        for name, changes in variants:
            done = work / "ablation" / f"{name}.json"
            if args.ablation and done.exists():
                results[name] = json.loads(done.read_text())
                print(f"{name}: kept from {done}")
                continue
            print(f"{name}: recipe {args.recipe} with {changes or 'no change'} ...", flush=True)
            results[name] = {"changes": {**data, **changes}, **run_variant(store, models, recipe, changes, args.seed)}
            done.write_text(json.dumps(results[name], indent=2, default=str))

    for name, r in results.items():
        print(f"\n=== {name}: {r['changes'] or 'the recipe'} — {r['version']}, {r['seconds']:.0f} s")
        if r["per_fold"]:
            print(fold_table(r["per_fold"]))
        post = r.get("postprocess", {})
        if post:
            print(
                f"post-processing chosen out of fold: {post['postprocess']} (mean Dice "
                f"{post['mean_dice_before']:.4f} -> {post['mean_dice_after']:.4f}, HD95 "
                f"{post['mean_hd95_before']:.1f} -> {post['mean_hd95_after']:.1f} mm)"
            )
        print(case_table(r["per_case"], f"{len(r['per_case'])} cases, original grids"))
        print("misses: " + ("; ".join(misses(r["per_case"])) or "none"))
        print("per site (institution of the BraTS id):\n" + site_table(r["per_case"]))
        print(quality_lines(r.get("quality"), r["per_case"]))
    if len(results) > 1:
        first = next(iter(results))
        print(f"\nablation: per-case means on the same folds, and the change against {first}")
        print(f"{'variant':28}" + "".join(f"{c:>9}" for c in COLUMNS) + f"{'minutes':>9}")
        for name, r in results.items():
            means = [statistics.fmean(x[c] for x in r["per_case"]) for c in COLUMNS]
            ref = [statistics.fmean(x[c] for x in results[first]["per_case"]) for c in COLUMNS]
            print(f"{name:28}" + "".join(fmt(c, m) for c, m in zip(COLUMNS, means)) + f"{r['seconds'] / 60:>9.1f}")
            if name != first:
                print(
                    f"{'':28}"
                    + "".join(
                        f"{m - b:>+9.3f}" if c.startswith("dice") else f"{m - b:>+9.1f}"
                        for c, m, b in zip(COLUMNS, means, ref)
                    )
                )
    (work / "real-benchmark.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten: {work / 'real-benchmark.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
