"""PNG figures for people: training curves and segmentation overlays (matplotlib, Agg, no display).

Both functions return PNG bytes, to be saved beside a model and inlined into markdown artifacts
(``tasks.artifacts.png_markdown``). Class colours: 1 NCR/NET red, 2 ED green, 3 ET yellow.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

CLASS_COLOURS = {1: ("NCR/NET", "#e41a1c"), 2: ("ED", "#4daf4a"), 3: ("ET", "#ffd92f")}
REGION_COLOURS = {"WT": "#377eb8", "TC": "#e41a1c", "ET": "#ff7f00"}
_CMAP = ListedColormap(["none"] + [c for _, c in CLASS_COLOURS.values()])


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_png(history: list[dict]) -> bytes:
    """Loss (train, val) and validation Dice (WT/TC/ET) per epoch.

    ``history`` rows carry ``epoch``, ``train_loss``, ``val_loss`` and ``dice_WT``/``dice_TC``/
    ``dice_ET``; missing keys are skipped.
    """
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, style in (("train_loss", "-o"), ("val_loss", "--s")):
        ys = [r.get(name, np.nan) for r in history]  # validation may run every few epochs only
        if not np.isnan(ys).all():
            ax_loss.plot(epochs, ys, style, label=name.replace("_", " "), markersize=3)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    if len(epochs) > 5:  # a few epochs read best on a linear axis
        ax_loss.set_yscale("log")
    ax_loss.legend()
    for region, colour in REGION_COLOURS.items():
        ys = [r.get(f"dice_{region}", np.nan) for r in history]
        if not np.isnan(ys).all():
            ax_dice.plot(epochs, ys, "-o", color=colour, label=region, markersize=3)
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="validation Dice (slices)", ylim=(0, 1))
    ax_dice.legend()
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
    return _png(fig)


def overlay_png(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray, title: str) -> bytes:
    """One slice with its classes drawn over it: [truth |] prediction.

    ``image`` is (4, H, W) (channels flair, t1, t1ce, t2; FLAIR is shown) or (H, W); ``truth`` and
    ``pred`` are (H, W) network classes 0..3 (``truth`` may be None for an unlabeled scan).
    """
    image = np.asarray(image, dtype=np.float32)
    gray = image[0] if image.ndim == 3 else image
    panels = [("truth", truth), ("prediction", pred)] if truth is not None else [("prediction", pred)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.9), squeeze=False)
    brain = gray[gray != 0]
    lo, hi = np.percentile(brain, [1, 99]) if brain.size else (0.0, 1.0)
    for ax, (name, classes) in zip(axes[0], panels):
        ax.imshow(gray, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        classes = np.asarray(classes)
        ax.imshow(np.ma.masked_equal(classes, 0), cmap=_CMAP, vmin=0, vmax=3, alpha=0.55, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.legend(
        handles=[Patch(color=c, label=n) for n, c in CLASS_COLOURS.values()],
        loc="lower center",
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    return _png(fig)


def scan_png(flair: np.ndarray, t1ce: np.ndarray, classes: np.ndarray, title: str) -> bytes:
    """A written segmentation over its scan: FLAIR and T1ce (H, W) of one slice, each with the
    network classes 0..3 (H, W) drawn over it."""
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.9), squeeze=False)
    for ax, (name, gray) in zip(axes[0], (("FLAIR", flair), ("T1ce", t1ce))):
        gray = np.asarray(gray, dtype=np.float32)
        brain = gray[gray != 0]
        lo, hi = np.percentile(brain, [1, 99]) if brain.size else (0.0, 1.0)
        ax.imshow(gray, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        ax.imshow(np.ma.masked_equal(classes, 0), cmap=_CMAP, vmin=0, vmax=3, alpha=0.45, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return _png(fig)
