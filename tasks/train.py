"""Prefect task of the train stage: train a model version resumably.

``train_model`` (on a GPU tagged ``gpu``: the deploy's ``gpu`` concurrency limit caps how many run
at once; ``train_model_on``) calls
``unet.train.fit`` with the version's checkpoint (its split: the store's, or a cross-validation
fold's), so a retry resumes rather than restarts. It logs a line per epoch, shows progress (UI +
terminal bar), and leaves the weights, the curves and the validation overlays with the version.
Opening, ensembling and promoting versions is ``tasks/versions.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from prefect import get_run_logger

from storage.registry import Registry
from storage.versions import ModelVersion
from tasks.artifacts import RunProgress
from tasks.figures import curves_png, overlay_png
from tasks.stage import stage_task
from unet.checkpoint import RegistryCheckpoint, save_model
from unet.config import TrainConfig
from unet.data import SliceDataset
from unet.model import UNet, UNetConfig
from unet.outputs import labels_of
from unet.predict import predict_slices
from unet.train import Callbacks, fit

OVERLAYS = 3


def is_retriable(task, task_run, state) -> bool:
    """Bad input or config (ValueError & co.) fails at once; anything else (I/O, a lost GPU, a kill
    of the process it ran in) is retried, and the retry resumes from the last checkpoint."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (ValueError, TypeError, KeyError, FileNotFoundError))


# ----------------------------------------------------------------------------- version


class _Report(Callbacks):
    """Per-epoch log lines and info.json progress; a progress artifact and terminal bar."""

    def __init__(self, version: ModelVersion, epochs: int):
        self.model_version, self.version, self.epochs = version, version.version, epochs
        self.log = get_run_logger()
        self.progress, self.pending, self.every = None, 0, 1

    def on_start(self, total_steps, done_steps, resumed_from):
        if resumed_from:
            self.log.info(
                "%s: resumed at epoch %d step %d (%d/%d steps done)",
                self.version,
                resumed_from[0] + 1,
                resumed_from[1],
                done_steps,
                total_steps,
            )
        else:
            self.log.info("%s: training from scratch, %d steps", self.version, total_steps)
        self.progress = RunProgress(total_steps, "train-progress", f"training {self.version}")
        self.every = max(1, total_steps // 100)  # the progress artifact: about 100 updates a run
        if done_steps:
            self.progress.advance(done_steps)

    def on_step(self, epoch, step, global_step):
        self.pending += 1
        if self.pending >= self.every:
            self.progress.advance(self.pending)
            self.pending = 0

    def on_epoch(self, row):
        validated = (
            f", val loss {row['val_loss']:.4f}, Dice WT {row['dice_WT']:.3f} TC {row['dice_TC']:.3f} "
            f"ET {row['dice_ET']:.3f}"
            if "val_loss" in row
            else ""
        )
        self.log.info(
            "epoch %d/%d: train loss %.4f%s, %.1f slices/s",
            row["epoch"],
            self.epochs,
            row["train_loss"],
            validated,
            row["slices_per_s"],
        )
        self.model_version.record_epoch(row)

    def close(self):
        if self.progress is not None:
            if self.pending:
                self.progress.advance(self.pending)
            self.progress.close()


@stage_task("train-model", "train-{version}", delay=10, retry_if=is_retriable)
def train_model(store_url: str, registry_url: str, version: str, network: UNetConfig, training: TrainConfig) -> dict:
    start = time.perf_counter()
    registry, mv = Registry(registry_url), ModelVersion(registry_url, version)
    report = _Report(mv, training.epochs)
    split = mv.info.split  # the store's, or a cross-validation fold's
    try:
        result = fit(store_url, network, training, RegistryCheckpoint(registry, version), report, split)
    finally:
        report.close()

    model = UNet(network)
    model.load_state_dict(result.best_state)  # the epoch with the best validation Dice
    save_model(registry, version, model)
    files = _figures(registry, version, model, result, store_url, split["val"])
    metrics = {
        "best_epoch": result.best["epoch"],
        **{k: result.best[k] for k in ("dice_WT", "dice_TC", "dice_ET", "dice_mean", "val_loss")},
        "final_train_loss": result.history[-1]["train_loss"],
    }
    mv.record_training(metrics, result.history, files, result.device)
    summary = {
        "version": version,
        "registry": registry_url,
        "device": result.device,
        "epochs": len(result.history),
        "steps": result.history[-1]["steps"],
        "resumed_from": {"epoch": result.resumed_from[0] + 1, "step": result.resumed_from[1]}
        if result.resumed_from
        else None,
        "metrics": metrics,
        "files": files,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return summary


def train_model_on(device) -> Callable:
    """``train_model`` as it runs on ``device``: on a CUDA GPU tagged ``gpu`` (the deploy's ``gpu``
    concurrency limit lets one train per GPU), elsewhere untagged, so CPU folds run side by side."""
    return train_model.with_options(tags={"gpu"}) if torch.device(device).type == "cuda" else train_model


def _figures(registry: Registry, version: str, model: UNet, result, store_url: str, cases: list[str]) -> dict[str, str]:
    """Loss/Dice curves, and the kept model's segmentation of the validation slices with the most tumour
    (one per case first) as inference makes it there (TTA, background outside the brain), beside the
    truth; saved with the model."""
    files = {"curves.png": registry.put(version, "curves.png", curves_png(result.history))}
    val = SliceDataset(store_url, cases, context=model.cfg.context)
    order = sorted(range(len(val)), key=lambda i: -val.refs[i].tumour)
    firsts, cases = [], set()
    for i in order:  # the largest tumour slice of each case, then the next largest overall
        if val.refs[i].case not in cases:
            firsts.append(i)
            cases.add(val.refs[i].case)
    for n, i in enumerate((firsts + [i for i in order if i not in firsts])[:OVERLAYS]):
        image, label = val.read(i)
        pred = labels_of(predict_slices(model, image[None].astype(np.float32), tta=True), model.cfg.outputs)[0]
        f = label.shape[-1] // pred.shape[-1]  # labels on a finer grid: shown on the slices' grid
        centre = image[model.cfg.context * 4 : model.cfg.context * 4 + 4]
        title = f"{val.refs[i].case} slice {val.refs[i].z}"
        files[f"overlay-{n + 1}.png"] = registry.put(
            version, f"overlay-{n + 1}.png", overlay_png(centre, label[::f, ::f], pred, title)
        )
    return files
