"""Ingest benchmark: the ``brats ingest`` command against the floor of merely decoding the files.

    python benchmarks/ingest.py --raw DIR [--cases 42] [--workers 2] [--repeats 3] [--profile full]
    python benchmarks/ingest.py            # synthetic cases instead (written once under --data)

Cases: the real cases under ``--raw`` (any BraTS layout), repeated under new ids (symbolic links)
until there are ``--cases`` of them; without ``--raw``, full-size synthetic cases. Side by side in
one run, each ``--repeats`` times, alternating, medians compared:

  floor   decode every NIfTI file with nibabel, nothing else, in ``--workers`` processes
          (a pool started before the clock: the floor is the decoding alone; its processes keep freed
          memory as the ``brats`` program does, ``flows.cli.keep_freed_memory``, so the floor is no
          slower than in a plain process)
  work    the ingest task's own body (``tasks.ingest.ingest_case.fn``: read once, hash, validate,
          normalize, write the case to Zarr), in the same pool: per-case work against the floor's
  flow    ``brats ingest RAW --store S --workers W`` as a user runs it: a new process, start-up
          (temporary Prefect API, Dask cluster, imports) and teardown included
  fixed   the same command with nothing to do (every case already in the store, unchanged): its
          fixed start-up and teardown
  flow/fixed with a server: the same two commands with ``PREFECT_API_URL`` set to a running
          ``prefect server start`` (started once, before the clock): no temporary API to start
  monai   MONAI's plain loop (``LoadImaged`` + ``NormalizeIntensityd(nonzero, channel_wise)`` ->
          one ``.npy`` per case), serially, when MONAI is installed
  nnunet  with ``--nnunet BIN`` (the ``bin`` folder of an environment with nnunetv2): nnU-Net v2's
          own path to training data: convert to its raw layout (images linked, labels renumbered
          4 -> 3), then ``nnUNetv2_plan_and_preprocess -c 2d`` with ``--workers`` processes

Targets: flow <= 2.0 x floor, flow <= 0.5 x monai, work per case <= 1.3 x floor per case, fixed <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.prefect_server import prefect_server, program  # noqa: E402
from flows.cli.memory import keep_freed_memory  # noqa: E402
from storage.cases import discover  # noqa: E402
from storage.synth import write_dataset  # noqa: E402


def replicate(raw: Path, n: int, out: Path) -> Path:
    """``n`` cases from the real cases under ``raw``: the cases themselves, then copies under new ids
    (``<id>_r2``, …; symbolic links to the same files)."""
    cases = discover(raw).cases
    if not cases:
        raise SystemExit(f"{raw}: no BraTS cases")
    out.mkdir(parents=True)
    for i in range(n):
        case = cases[i % len(cases)]
        new = case.case_id if i < len(cases) else f"{case.case_id}_r{i // len(cases) + 1}"
        folder = out / new
        folder.mkdir()
        for path in case.files.values():
            name = Path(path).name
            (folder / name.replace(case.case_id, new, 1)).symlink_to(Path(path).resolve())
    return out


def decode(files: list[str]) -> float:
    start = time.perf_counter()
    for path in files:
        np.asanyarray(nib.load(path).dataobj)
    return time.perf_counter() - start


def work(case, store: str, profile: str) -> float:
    from tasks.ingest import ingest_case

    start = time.perf_counter()
    ingest_case.fn(case, store, profile)
    return time.perf_counter() - start


def pooled(pool: ProcessPoolExecutor, fn, items: list[tuple]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    per_case = list(pool.map(fn, *zip(*items)))
    return time.perf_counter() - start, per_case


def command(raw: Path, store: Path, workers: int, profile: str, api: str | None = None) -> float:
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    if api:
        env["PREFECT_API_URL"] = api
    args = [program("brats"), "ingest", str(raw), "--store", str(store)]
    args += ["--workers", str(workers), "--profile", profile]
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return seconds


def monai_loop(cases, out: Path) -> float:
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd

    load = Compose(
        [
            LoadImaged(keys=["image", "label"], image_only=True),
            EnsureChannelFirstd(keys=["image", "label"]),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        ]
    )
    start = time.perf_counter()
    for case in cases:
        item = load({"image": [case.files[m] for m in ("flair", "t1", "t1ce", "t2")], "label": case.files["seg"]})
        np.save(out / f"{case.case_id}_image.npy", np.asarray(item["image"]))
        np.save(out / f"{case.case_id}_label.npy", np.asarray(item["label"]))
    return time.perf_counter() - start


def nnunet(cases, bin_dir: Path, out: Path, workers: int) -> float:
    """nnU-Net v2: dataset conversion + fingerprint + plan + 2d preprocessing, timed as one."""
    raw = out / "raw" / "Dataset501_BraTS"
    env = {
        **os.environ,
        "nnUNet_raw": str(out / "raw"),
        "nnUNet_preprocessed": str(out / "preprocessed"),
        "nnUNet_results": str(out / "results"),
    }
    start = time.perf_counter()
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for case in cases:
        for i, m in enumerate(("flair", "t1", "t1ce", "t2")):
            (raw / "imagesTr" / f"{case.case_id}_{i:04d}.nii.gz").symlink_to(Path(case.files[m]).resolve())
        seg = nib.load(case.files["seg"])
        labels = np.asanyarray(seg.dataobj).astype(np.uint8)
        labels[labels == 4] = 3  # nnU-Net wants consecutive labels
        nib.save(nib.Nifti1Image(labels, seg.affine, seg.header), raw / "labelsTr" / f"{case.case_id}.nii.gz")
    (raw / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"},
                "labels": {"background": 0, "NCR": 1, "ED": 2, "ET": 3},
                "numTraining": len(cases),
                "file_ending": ".nii.gz",
            }
        )
    )
    subprocess.run(
        [str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", "501", "-c", "2d", "-np", str(workers)]
        + ["-npfp", str(workers)],
        env=env,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, help="real BraTS cases (default: synthetic ones)")
    ap.add_argument("--cases", type=int, default=42)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", choices=["full", "tp"], default="full")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "brats-bench-raw"))
    ap.add_argument("--no-monai", action="store_true", help="skip MONAI's loop")
    ap.add_argument("--nnunet", type=Path, help="bin folder of an environment with nnunetv2 (nnU-Net v2 side by side)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="brats-bench-"))
    if args.raw:
        raw, kind = replicate(args.raw, args.cases, tmp / "raw"), f"real ({args.raw})"
    else:
        raw, kind = Path(args.data) / f"synth-{args.cases}", "synthetic"
        if not raw.exists():
            write_dataset(raw.with_suffix(".part"), args.cases, seed=0)
            raw.with_suffix(".part").rename(raw)
    cases = discover(raw).cases
    try:
        import monai  # noqa: F401

        with_monai = not args.no_monai
    except ImportError:
        with_monai = False

    times: dict[str, list[float]] = {
        k: [] for k in ("floor", "work", "flow", "fixed", "flow+server", "fixed+server", "monai", "nnunet")
    }
    server, api = prefect_server(tmp / "prefect-server")
    per_case: dict[str, list[float]] = {"floor": [], "work": []}
    with ProcessPoolExecutor(args.workers, initializer=keep_freed_memory) as pool:
        list(pool.map(decode, [list(c.files.values()) for c in cases[: args.workers]]))  # started, warm
        for r in range(args.repeats):
            wall, each = pooled(pool, decode, [(list(c.files.values()),) for c in cases])
            times["floor"].append(wall)
            per_case["floor"] += each
            store = tmp / f"work-{r}.zarr"
            wall, each = pooled(pool, work, [(c, str(store), args.profile) for c in cases])
            times["work"].append(wall)
            per_case["work"] += each
            shutil.rmtree(store)
            store = tmp / f"flow-{r}.zarr"
            times["flow"].append(command(raw, store, args.workers, args.profile))
            times["fixed"].append(command(raw, store, args.workers, args.profile))  # all unchanged: skipped
            shutil.rmtree(store)
            times["flow+server"].append(command(raw, store, args.workers, args.profile, api))
            times["fixed+server"].append(command(raw, store, args.workers, args.profile, api))
            shutil.rmtree(store)
            if with_monai:
                (tmp / "monai").mkdir()
                times["monai"].append(monai_loop(cases, tmp / "monai"))
                shutil.rmtree(tmp / "monai")
            if args.nnunet:
                times["nnunet"].append(nnunet(cases, args.nnunet, tmp / "nnunet", args.workers))
                shutil.rmtree(tmp / "nnunet")
            print("repeat", r + 1, "  ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items() if v), flush=True)
    server.terminate()
    server.wait()
    shutil.rmtree(tmp)

    m = {k: statistics.median(v) for k, v in times.items() if v}
    floor_case, work_case = statistics.median(per_case["floor"]), statistics.median(per_case["work"])
    n = len(cases)
    print(f"\n{n} {kind} cases, {args.workers} workers, profile {args.profile}, medians of {args.repeats}")
    print(f"  floor: decode the NIfTI files only (nibabel)     {m['floor']:6.1f} s   {floor_case:5.2f} s/case")
    print(f"  work: the ingest task's body, same pool         {m['work']:6.1f} s   {work_case:5.2f} s/case")
    print(f"  flow: `brats ingest`, start-up included         {m['flow']:6.1f} s")
    print(f"  fixed: `brats ingest` with nothing to do        {m['fixed']:6.1f} s")
    print(f"  flow, with a running prefect server             {m['flow+server']:6.1f} s")
    print(f"  fixed, with a running prefect server            {m['fixed+server']:6.1f} s")
    if "monai" in m:
        print(f"  MONAI LoadImaged+NormalizeIntensityd -> .npy    {m['monai']:6.1f} s   (serial)")
    if "nnunet" in m:
        print(f"  nnU-Net v2 convert + plan + preprocess (2d)     {m['nnunet']:6.1f} s   ({args.workers} processes)")
    print(f"  flow / floor = {m['flow'] / m['floor']:.2f} (target <= 2.0)")
    if "monai" in m:
        print(f"  flow / MONAI = {m['flow'] / m['monai']:.2f} (target <= 0.5)")
    print(f"  work / floor per case = {work_case / floor_case:.2f} (target <= 1.3)")
    print(f"  fixed start-up = {m['fixed']:.1f} s, {m['fixed+server']:.1f} s with a server (target <= 5)")
    print(f"  with a server: flow / floor = {m['flow+server'] / m['floor']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
