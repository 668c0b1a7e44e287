"""The GPU check: one command on a CUDA machine, one table at the end.

    python benchmarks/gpu.py [--device cuda] [--raw REAL_CASES] [--work DIR]
    python benchmarks/gpu.py --tiny --device cpu       # the same steps in seconds (a test runs it)

Steps, each a fresh process as a user starts it (start-up included), in order:

1. ``brats synth`` synthetic cases, ``brats ingest`` them (Dask), ``brats train`` with the gpu recipe
   (one model, a few epochs), ``brats evaluate``, ``brats infer`` on new scans: the product's flows
   end to end on the device;
2. ``benchmarks/train.py``: the train step (base 64, 240², batch 32, bf16 on CUDA, same padding) and
   the loader with 1 and 14 workers;
3. ``benchmarks/batch_infer.py``: the whole ``brats infer`` on real volumes (``--raw``; else the
   synthetic ones), one case at a time against overlapped.

Printed: the device and torch, then per step its seconds, whether it passed, and its figure (the
train flow's last epoch rate, the step and loader rates, volumes per second). Logs go to
``--work``. ``--tiny``: a few small cases and a tiny network, for a CPU and for the test suite.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def benchmark(name: str) -> list[str]:
    """The command line of another script of benchmarks/."""
    return [sys.executable, str(ROOT / "benchmarks" / name)]


def steps(work: Path, device: str, tiny: bool, raw: str | None) -> list[tuple[str, list[str], str]]:
    """(name, argv, regex of the figure in its output) per step."""
    brats = [sys.executable, "-m", "flows.cli"]
    store, models, new = str(work / "slices.zarr"), str(work / "models"), str(work / "new")
    shape = ["--shape", "48", "48", "24"] if tiny else []
    if tiny:
        train = ["--base-channels", "8", "--depth", "2", "--no-deep-supervision", "--context", "0", "--epochs", "12"]
        train += ["--max-steps-per-epoch", "15", "--batch-size", "8", "--lr", "0.01", "--augment", "light"]
        train += ["--workers", "0", "--validate-every", "12"]  # ~60 steps: a synthetic tumour learnt
        step = ["--base", "4", "--depth", "2", "--size", "48", "--batch", "2", "--steps", "1", "--warmup", "0"]
        step += ["--paddings", "same", "--workers", "1", "--cores", "1", "--cases", "2", "--loader-windows", "1"]
    else:
        train = ["--epochs", "3", "--max-steps-per-epoch", "60"]
        step = "--base 64 --size 240 --batch 32 --paddings same --workers 14 --cores 14".split()
    cases = "2" if tiny else "10"
    return [
        ("synth", [*brats, "synth", str(work / "raw"), "--cases", "4" if tiny else "10", *shape], ""),
        ("synth new scans", [*brats, "synth", new, "--cases", cases, "--no-seg", "--prefix", "NEW", *shape], ""),
        ("ingest", [*brats, "ingest", str(work / "raw"), "--store", store], r"'ingested': (\d+)"),
        (
            "train flow",
            [*brats, "train", "--store", store, "--registry", models, "--recipe", "gpu", "--folds", "0"]
            + ["--device", device, *train],
            r"([\d.]+ slices/s)",
        ),
        (
            "evaluate flow",
            [*brats, "evaluate", "--store", store, "--registry", models, "--version", "latest", "--device", device],
            r'"dice_WT": ([\d.]+)',
        ),
        (
            "infer flow",
            [*brats, "infer", new, "--out", str(work / "out"), "--registry", models, "--version", "latest"]
            + ["--device", device],
            "",
        ),
        (
            "train step + loader",
            [*benchmark("train.py"), "--device", device, "--data", str(work / "bench"), *step],
            r"\n(same\s+\d+\s.*)",
        ),
        (
            "batch inference",
            [*benchmark("batch_infer.py"), raw or new, "--cases", cases, "--repeats", "1", "--registry", models]
            + ["--version", "latest"],  # the version just trained, promoted or not
            r"\| overlap \|.*\| ([\d.]+) \| [\d.]+\.\.",
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu")
    p.add_argument("--raw", help="real BraTS cases for the batch inference (default: the synthetic new scans)")
    p.add_argument("--work", help="where data, models and logs go (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="small cases and a tiny network: seconds, on any machine")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="brats-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the figures are read from the runs' INFO lines
    env.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    env.pop("PREFECT_API_URL", None)

    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"device {args.device} ({cuda}), torch {torch.__version__}, {os.cpu_count()} cores; logs in {work}")
    rows, failed = [], 0
    for name, argv, pattern in steps(work, args.device, args.tiny, args.raw):
        log = work / f"{name.replace(' ', '-').replace('+', 'and')}.log"
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - start
        log.write_text(done.stdout)
        found = re.findall(pattern, done.stdout) if pattern else []
        figure = found[-1].strip().strip("|").strip() if found else ""
        ok = done.returncode == 0
        failed += not ok
        rows.append((name, seconds, "ok" if ok else f"failed ({done.returncode}): {log}", figure))
        print(f"  {name}: {seconds:.1f} s, {rows[-1][2]}", flush=True)

    print("\n| step | seconds | result | figure |\n|---|---:|---|---|")
    for name, seconds, result, figure in rows:
        print(f"| {name} | {seconds:.1f} | {result} | {figure[:100]} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
