"""Validation of a model during training: every validation case scored as the test scores it.

Per-case 3D Dice (WT, TC, ET; the BraTS rules for empty masks) over all of a case's brain slices on
the store's grid (at the labels' resolution where the store keeps them finer than the slices:
the probabilities upsampled as inference upsamples them), averaged over the cases; and the mean loss.
"""

from __future__ import annotations

import numpy as np
import torch

from storage.brats import CLASS_REGIONS
from storage.store import SliceStore
from unet.data import with_context
from unet.loss import upsample_linear
from unet.metrics import dice
from unet.model import centre_slice
from unet.outputs import labels_of


@torch.no_grad()
def validate(
    model, store: SliceStore, cases: list[str], loss_fn, device, amp, channels_last: bool, batch_size: int
) -> dict:
    """Mean loss over the validation cases' brain slices, and per-case 3D Dice per region (WT/TC/ET)
    averaged over the cases, as the test is scored (both masks empty: 1; one empty: 0)."""
    was_training = model.training
    model.eval()
    loss_sum, n, per_case = 0.0, 0, {r: [] for r in CLASS_REGIONS}
    for case in cases:
        image, label = store.image(case), np.asarray(store.label(case)[:])
        brain = np.flatnonzero(np.asarray(store.attrs(case)["slice_brain"]) > 0)
        f = label.shape[-1] // image.shape[-1]  # labels on a finer grid (profile tp): scored there
        pred = np.zeros_like(label)
        for start in range(0, brain.size, batch_size):
            idx = brain[start : start + batch_size]
            x = with_context(image, idx, model.cfg.context)
            x = torch.from_numpy(x.astype(np.float32)).to(device)
            y = torch.from_numpy(label[idx]).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model.predict(x)
            loss_sum += float(loss_fn(logits, y)) * len(x)
            n += len(x)
            probs = upsample_linear(model.probabilities(logits), f)
            outside = (centre_slice(x, model.cfg) == 0).all(1)  # no brain: background
            outside = outside.repeat_interleave(f, -2).repeat_interleave(f, -1)
            pred[idx] = labels_of(probs, model.cfg.outputs).masked_fill(outside, 0).cpu().numpy()
        for r, members in CLASS_REGIONS.items():
            per_case[r].append(dice(np.isin(pred, members), np.isin(label, members)))
    model.train(was_training)
    row = {"val_loss": loss_sum / max(n, 1), **{f"dice_{r}": float(np.mean(v)) for r, v in per_case.items()}}
    row["dice_mean"] = float(np.mean([row[f"dice_{r}"] for r in CLASS_REGIONS]))
    return row
