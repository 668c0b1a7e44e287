"""What the quality estimate costs at inference, and how it tracks the truth on cases with labels.

    python benchmarks/quality.py RAW --registry M [--version V] [--cases 10] [--repeats 3] [--device cpu]

For each of ``--cases`` real cases under RAW (read and validated as ``brats infer`` does), the
version's prediction (``unet.predict.predict_case``: preprocess, predict with mirror TTA, restore,
post-process) is timed with and without the evidence the quality estimate is built from
(``unet.quality.Evidence``), the two taking turns going first, ``--repeats`` times each; printed:
the median seconds per case of each and their ratio. Where a case has a segmentation, the estimate
(with the version's calibration) is printed beside the true Dice of each region, with the review
flag and its reasons.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", nargs="+", help="folders of real BraTS cases")
    p.add_argument("--registry", required=True)
    p.add_argument("--version", default=None, help="default: the registry's best")
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from storage.cases import discover
    from storage.nifti import read_case, read_files, read_labels
    from storage.versions import ModelVersion
    from unet import quality
    from unet.checkpoint import cached_model
    from unet.metrics import evaluate_case
    from unet.postprocess import PostProcess
    from unet.predict import predict_case, volumes_ml

    version = ModelVersion.resolve(args.registry, args.version)
    model, info = cached_model(args.registry, version.version, args.device)
    post = PostProcess.from_dict(info.postprocess)
    cases = discover(*args.raw).cases[: args.cases]
    print(f"model {version.version} ({info.kind}, {len(info.members) or 1} view(s)); {len(cases)} case(s)")
    times: dict[str, list[float]] = {"without": [], "with": []}
    for case in cases:
        scan = read_case(case, read_files(case))
        per: dict[str, list[float]] = {"without": [], "with": []}
        for r in range(args.repeats):
            for name in ("without", "with") if r % 2 == 0 else ("with", "without"):
                evidence = quality.Evidence() if name == "with" else None
                started = time.perf_counter()
                labels, _ = predict_case(model, scan, info.profile, post, tta=True, batch_size=16, evidence=evidence)
                per[name].append(time.perf_counter() - started)
                if evidence is not None:
                    features = evidence.features()
        for name in per:
            times[name].append(statistics.median(per[name]))
        est, reasons = quality.assess(features, volumes_ml(labels, scan.zooms), info.quality)
        line = f"{case.case_id:24} {per['without'][0]:6.2f} s / {per['with'][0]:6.2f} s  est " + " ".join(
            f"{k} {v:.2f}" for k, v in est.items()
        )
        if "seg" in case.files:
            truth = read_labels(case.files["seg"], case.edition)
            m = evaluate_case(labels, truth, scan.zooms)
            line += "  true " + " ".join(f"{k} {m[f'dice_{k}']:.2f}" for k in est)
        print(line + (f"  REVIEW: {'; '.join(reasons)}" if reasons else ""), flush=True)
    a, b = statistics.median(times["without"]), statistics.median(times["with"])
    print(f"\nmedian seconds per case: without the estimate {a:.2f}, with it {b:.2f}: x{b / a:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
