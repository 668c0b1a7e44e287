"""An ensemble of U-Nets (the K models of a cross-validation) that predicts as one model.

Its logits are the log of the members' mean class probabilities (``unet.outputs``), so the softmax
its ``probabilities`` takes of them is exactly that mean, and the labels decided from it the
ensemble's vote by probability. The members must agree on what shapes mean (depth, padding, input
channels and context, classes, outputs); their widths and normalisation may differ.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from unet.model import UNet

SHAPE_FIELDS = ("in_channels", "num_classes", "depth", "padding", "context", "outputs")


class Ensemble(nn.Module):
    def __init__(self, members: list[UNet]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        shapes = {tuple(getattr(m.cfg, f) for f in SHAPE_FIELDS) for m in members}
        if len(shapes) > 1:
            raise ValueError(f"ensemble members disagree on {SHAPE_FIELDS}: {sorted(shapes)}")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.member_probs(x).mean(0)
        return probs.clamp_min(torch.finfo(torch.float32).tiny).log()

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(M, N, K, h, w): each member's class probabilities (their mean is the ensemble's)."""
        return torch.stack([m.probabilities(m(x)) for m in self.members])

    @staticmethod
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        """The ensemble's logits are log probabilities, whatever its members' outputs."""
        return torch.softmax(logits.float(), 1)

    # shapes are the members' (they agree): the same tiling, padding and overlap-tile prediction
    output_size = UNet.output_size
    input_size_for = UNet.input_size_for
    _valid_output = UNet._valid_output
    _smallest_valid_input = UNet._smallest_valid_input
    predict = UNet.predict
