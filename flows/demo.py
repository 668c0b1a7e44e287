"""Flow ``demo`` (``brats demo``): the whole story on this machine, with nothing to set up.

Synthesizes a small BraTS-like dataset and a few "new" scans, runs the pipeline on the embedded
defaults (ephemeral Prefect API, Dask LocalCluster, local store) with the ``cpu`` recipe made small
(one model instead of a 5-fold ensemble, a few short epochs), segments the new scans with the model
it just trained, and prints the held-out Dice and where everything is.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from prefect import flow

from flows.infer import infer
from flows.pipeline import pipeline
from flows.recipes import recipe
from storage.synth import BRATS_SHAPE, write_dataset
from unet.preprocess import Preprocessing


@flow(name="demo", log_prints=True)
def demo(
    workdir: str = "runs/demo",
    cases: int = 16,
    new_scans: int = 2,
    epochs: int = 5,
    base_channels: int = 16,
    seed: int = 0,
) -> dict:
    """Synthetic data -> ingest -> train -> evaluate -> infer, all on this machine.

    Args:
        workdir: where data, store, models and outputs go
        cases: synthetic training cases
        new_scans: fresh synthetic scans to segment at the end
        epochs: training epochs (40 steps each)
        base_channels: U-Net base channels
        seed: seeds the data and the training
    """
    work = Path(workdir)
    start = time.perf_counter()
    for name, n, kw in (("raw", cases, {}), ("inbox", new_scans, {"with_seg": False, "prefix": "BraTS19_NEW"})):
        if not (work / name).exists():
            write_dataset(work / f"{name}.part", n, seed=seed + (1000 if name == "inbox" else 0), **kw)
            (work / f"{name}.part").rename(work / name)
    print(f"synthetic data ready in {work} ({time.perf_counter() - start:.0f} s)")

    registry_url = str(work / "models")
    cpu = recipe("cpu")
    result = pipeline(
        raw=[str(work / "raw")],
        store_url=str(work / "slices.zarr"),
        registry_url=registry_url,
        data=Preprocessing(profile="tp"),
        network=cpu.network.model_copy(update={"base_channels": base_channels}),
        training=cpu.training.model_copy(
            update=dict(folds=0, epochs=epochs, max_steps_per_epoch=40, validate_every=1, seed=seed, device="auto")
        ),
    )
    version = result["train"]["version"]
    inferred = infer([str(work / "inbox")], str(work / "segmentations"), version, registry_url)

    ev = result["evaluate"]
    print(f"BraTS demo finished in {time.perf_counter() - start:.0f} s")
    print(f"  model {version} ({registry_url}), evaluated on {ev['cases']} held-out case(s):")
    for region in ("WT", "TC", "ET"):
        print(f"    {region}: Dice {ev[f'dice_{region}']:.3f}   HD95 {ev[f'hd95_{region}']:.1f} mm")
    print(f"  slice store      {work / 'slices.zarr'}")
    print(
        f"  segmentations    {work / 'segmentations'}  "
        f"({inferred['written']} written: <case>_seg.nii.gz + <case>.json volumes)"
    )
    print("  runs, artifacts  in the Prefect UI: `prefect server start`, then rerun with PREFECT_API_URL set (README)")
    return {"version": version, "evaluate": ev, "infer": inferred}


def synth(
    out: str,
    cases: int = 10,
    seed: int = 0,
    shape: tuple[int, int, int] = BRATS_SHAPE,
    layout: Literal["brats", "flat"] = "brats",
    with_seg: bool = True,
    prefix: str = "BraTS19",
) -> int:
    """Write synthetic BraTS 2019 cases (for demos, tests and benchmarks).

    Args:
        out: output root
        cases: number of cases
        seed: case i depends only on (seed, i)
        shape: X Y Z of the grid (default: the BraTS grid)
        layout: brats: <out>/{HGG,LGG}/<case>/; flat: <out>/<case>/
        with_seg: write the segmentation too (--no-seg: new scans, as for inference)
        prefix: case id prefix
    """
    dirs = write_dataset(out, cases, seed=seed, shape=shape, with_seg=with_seg, layout=layout, prefix=prefix)
    print(f"wrote {len(dirs)} cases under {out}")
    return 0
