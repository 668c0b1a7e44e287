"""Ingest benchmark: the flow against the course's way and against the floor of merely decoding.

    python benchmarks/ingest.py [--cases 20] [--workers 2] [--repeats 3] [--profile full]

On M full-size synthetic cases (written once, cached under --data), side by side in one run:
  (a) the ingest flow: Prefect + Dask LocalCluster (started inside, as in production) -> Zarr;
  (b) the course's way: serially, normalize and write one .npy file per slice (image and label);
  (c) the floor: a LocalCluster of the same size that only decodes every NIfTI file (nibabel).
Each is run --repeats times, alternating, and the medians are compared: a/c (target <= 1.3) and b/a.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="brats-bench-prefect-"))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

from flows.dask_runner import dask_runner  # noqa: E402
from flows.embedded import prefect_api  # noqa: E402
from flows.ingest import Preprocessing, ingest  # noqa: E402
from storage.brats import BRATS_TO_CLASS  # noqa: E402
from storage.nifti import discover  # noqa: E402
from storage.synth import write_dataset  # noqa: E402
from unet.preprocess import brain_mask, normalized_slices  # noqa: E402


def decode(paths: list[str]) -> int:
    return sum(int(np.asanyarray(nib.load(p).dataobj).size) for p in paths)


def floor(cases, workers: int) -> float:
    start = time.perf_counter()
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.gather(client.map(decode, [list(c.files.values()) for c in cases]))
    return time.perf_counter() - start


def course(cases, out: Path) -> float:
    """One file per slice, written serially: the way the course notebooks do it."""
    start = time.perf_counter()
    for case in cases:
        image = np.stack(
            [np.asanyarray(nib.load(case.files[m]).dataobj).astype(np.float32) for m in ("flair", "t1", "t1ce", "t2")]
        )
        image = normalized_slices(image, brain_mask(image))[0].transpose(1, 2, 3, 0)  # (C, X, Y, Z) z-scores
        seg = BRATS_TO_CLASS[np.asanyarray(nib.load(case.files["seg"]).dataobj)]
        folder = out / case.case_id
        folder.mkdir(parents=True)
        for z in range(image.shape[-1]):
            np.save(folder / f"image_{z:03d}.npy", image[..., z].astype(np.float16))
            np.save(folder / f"label_{z:03d}.npy", seg[..., z])
    return time.perf_counter() - start


def flow(raw: Path, store: Path, workers: int, profile: str) -> float:
    start = time.perf_counter()
    state = ingest.with_options(task_runner=dask_runner(workers=workers))(
        [str(raw)], str(store), Preprocessing(profile=profile), return_state=True
    )
    seconds = time.perf_counter() - start
    summary = state.result()
    assert summary["ingested"] == len(discover(raw).cases), summary
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", choices=["full", "tp"], default="full")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "brats-bench-raw"))
    args = ap.parse_args()

    raw = Path(args.data) / f"synth-{args.cases}"
    if not raw.exists():
        t = time.perf_counter()
        write_dataset(raw.with_suffix(".part"), args.cases, seed=0)
        raw.with_suffix(".part").rename(raw)
        print(f"wrote {args.cases} synthetic cases in {time.perf_counter() - t:.1f} s -> {raw}")
    cases = discover(raw).cases
    work = Path(tempfile.mkdtemp(prefix="brats-bench-"))
    times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    with prefect_api():
        for r in range(args.repeats):
            times["c"].append(floor(cases, args.workers))
            times["a"].append(flow(raw, work / f"store-{r}.zarr", args.workers, args.profile))
            times["b"].append(course(cases, work / f"course-{r}"))
            shutil.rmtree(work / f"store-{r}.zarr")
            shutil.rmtree(work / f"course-{r}")
            print(
                f"repeat {r + 1}: a {times['a'][-1]:.1f} s  b {times['b'][-1]:.1f} s  c {times['c'][-1]:.1f} s",
                flush=True,
            )
    shutil.rmtree(work)
    a, b, c = (statistics.median(times[k]) for k in "abc")
    print(
        f"\n{args.cases} cases x 240x240x155 x 5 files, {args.workers} workers, profile {args.profile}, "
        f"median of {args.repeats}"
    )
    print(f"  (a) ingest flow (Prefect + Dask -> Zarr)      {a:7.1f} s   {args.cases / a:5.2f} cases/s")
    print(f"  (b) course: one .npy per slice, serial       {b:7.1f} s   {args.cases / b:5.2f} cases/s")
    print(f"  (c) floor: decode NIfTI only, same workers   {c:7.1f} s   {args.cases / c:5.2f} cases/s")
    print(f"  a/c = {a / c:.2f}  (target <= 1.3)      b/a = {b / a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
