"""Batch inference, the whole command: ``brats infer`` on N real volumes, one case at a time against
cases overlapped, side by side.

    python benchmarks/batch_infer.py /work/data/real20 [--cases 10] [--repeats 3]
                                     [--registry MODELS --version V]
                                     [--runs one=.:1 overlap=.:2 [NAME=CHECKOUT:CASES ...]]

Each run is ``python -m flows.cli infer RAW --out OUT --registry MODELS`` in a fresh process (start-up,
its temporary Prefect API and the model load included) on the first ``--cases`` cases found under the
given folders, into an empty output folder, with ``BRATS_CASES_AT_ONCE`` = CASES (how many scans are
read, predicted and written at once by threads sharing the model) and the code of CHECKOUT (``.``:
this one; another git worktree measures an older version beside this one). The runs take turns
(a b, b a, ...), so that the file cache and a noisy machine hurt them alike.

Printed: per run the median seconds of the command and volumes per second, min..max, and each run's
ratio to the first. The model: ``--registry``/``--version`` (e.g. a trained one), else an untrained
network of the cpu recipe (profile tp) registered in a temporary folder: the cost does not depend
on the weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scan_to_seg import untrained  # noqa: E402
from flows.recipes import recipe  # noqa: E402
from storage.cases import discover  # noqa: E402


def case_folder(raws: list[str], n: int, into: Path) -> list[str]:
    """The first ``n`` cases found under ``raws``, linked into one folder (one input for every run)."""
    cases = discover(*raws).cases[:n]
    if len(cases) < n:
        raise SystemExit(f"{n} cases asked, {len(cases)} found under {', '.join(raws)}")
    for case in cases:
        (into / case.case_id).symlink_to(Path(case.files["flair"]).parent.resolve())
    return [c.case_id for c in cases]


def run_once(checkout: Path, at_once: int, raw: Path, out: Path, registry: str, version: str, home: Path) -> float:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")]),
        "BRATS_CASES_AT_ONCE": str(at_once),
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.cli", "infer", str(raw), "--out", str(out)]
    command += ["--registry", registry, "--version", version]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", nargs="+", help="folders of real BraTS cases")
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--registry", help="a registry holding the model (default: an untrained cpu-recipe one)")
    p.add_argument("--version", help="the model version in --registry (default: its best)")
    p.add_argument("--runs", nargs="+", default=["one=.:1", "overlap=.:2"], metavar="NAME=CHECKOUT:CASES")
    args = p.parse_args()

    runs = {}
    for spec in args.runs:
        name, _, rest = spec.partition("=")
        checkout, _, at_once = rest.rpartition(":")
        runs[name] = (Path(checkout or ".").resolve(), int(at_once))

    with tempfile.TemporaryDirectory(prefix="batch-infer-") as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw"
        raw.mkdir()
        ids = case_folder(args.raw, args.cases, raw)
        if args.registry:
            from storage.registry import Registry

            registry, version = args.registry, Registry(args.registry).resolve(args.version)
        else:
            network = recipe("cpu").network.model_dump()  # profile tp, as the cpu recipe's
            registry, version = str(tmp / "models"), untrained(tmp / "models", **network)
        print(f"{len(ids)} real volumes, model {version} in {registry}, {os.cpu_count()} cores")
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(args.repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                checkout, at_once = runs[name]
                out = tmp / f"out-{name}-{r}"
                s = run_once(checkout, at_once, raw, out, registry, version, tmp / f"home-{name}-{r}")
                written = len(list(out.glob("*_seg.nii.gz")))
                if written != len(ids):
                    raise SystemExit(f"{name}: {written} of {len(ids)} segmentations written")
                seconds[name].append(s)
                print(f"  {name} (repeat {r + 1}): {s:.1f} s", flush=True)

    first = statistics.median(seconds[names[0]])
    print(f"\n| run | checkout | cases at once | median s | volumes/s | min..max s | x {names[0]} |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in names:
        checkout, at_once = runs[name]
        med = statistics.median(seconds[name])
        lo, hi = min(seconds[name]), max(seconds[name])
        where = "." if checkout == ROOT else str(checkout)
        rate = len(ids) / med
        print(f"| {name} | {where} | {at_once} | {med:.1f} | {rate:.2f} | {lo:.1f}..{hi:.1f} | {first / med:.2f} |")


if __name__ == "__main__":
    main()
