"""The training loss: cross-entropy as the paper's, the region Dice, labels on a finer grid, deep supervision."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unet.geometry import _upsample_linear
from unet.loss import DEEP_SUPERVISION_WEIGHTS, SegLoss, region_dice, upsample_linear
from unet.outputs import region_probabilities, region_targets


def test_plain_segloss_is_the_papers_cross_entropy():
    logits, target = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    torch.testing.assert_close(SegLoss()(logits, target), F.cross_entropy(logits, target))
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    torch.testing.assert_close(SegLoss(w)(logits, target), F.cross_entropy(logits, target, weight=w))


def test_upsampling_is_the_one_inference_uses():
    a = np.random.default_rng(0).random((2, 4, 5, 7)).astype(np.float32)
    expected = _upsample_linear(_upsample_linear(a, 2, 2), 2, 3)
    np.testing.assert_allclose(upsample_linear(torch.from_numpy(a), 2).numpy(), expected, atol=1e-6)


def test_labels_on_a_finer_grid_are_scored_there():
    logits, fine = torch.randn(2, 4, 6, 6), torch.randint(0, 4, (2, 12, 12))
    probs = upsample_linear(torch.softmax(logits, 1), 2)
    torch.testing.assert_close(SegLoss()(logits, fine), F.nll_loss(probs.log(), fine))
    with_dice = SegLoss(dice=True)(logits, fine)
    torch.testing.assert_close(with_dice, F.nll_loss(probs.log(), fine) + 1 - dice(probs, fine).mean())


def dice(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return region_dice(region_probabilities(probs), region_targets(target))


def test_region_dice_is_one_for_a_perfect_prediction_and_counts_regions_not_classes():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 2  # edema only: WT present, TC and ET absent
    perfect = F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(dice(perfect, target), torch.ones(3))
    wrong_class = F.one_hot(torch.where(target == 2, 1, 0), 4).permute(0, 3, 1, 2).float()  # NCR for edema
    dices = dice(wrong_class, target)
    assert dices[0] == 1.0 and dices[1] < 0.1  # WT still right; TC predicted where there is none


def test_deep_supervision_weighs_each_output_against_labels_at_its_resolution():
    target = torch.randint(0, 4, (2, 16, 16))
    outs = [torch.randn(2, 4, 16, 16), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)]
    parts = [F.cross_entropy(o, target[:, :: 16 // o.shape[-1], :: 16 // o.shape[-1]]) for o in outs]
    expected = sum(w * p for w, p in zip(DEEP_SUPERVISION_WEIGHTS, parts)) / sum(DEEP_SUPERVISION_WEIGHTS)
    torch.testing.assert_close(SegLoss()(outs, target), expected)


def test_region_outputs_are_scored_as_three_binary_problems():
    """Region outputs (WT, TC, ET sigmoids): binary cross-entropy of each against its mask, + its soft
    Dice; on a finer label grid the sigmoids are upsampled to the labels first."""
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8))
    masks = torch.stack([target > 0, (target == 1) | (target == 3), target == 3], 1).float()
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    torch.testing.assert_close(SegLoss(outputs="regions")(logits, target), bce)
    soft = 1 - region_dice(torch.sigmoid(logits), masks).mean()
    torch.testing.assert_close(SegLoss(dice=True, outputs="regions")(logits, target), bce + soft)
    fine = torch.randint(0, 4, (2, 16, 16))
    fine_masks = region_targets(fine).float()
    probs = upsample_linear(torch.sigmoid(logits), 2)
    torch.testing.assert_close(
        SegLoss(outputs="regions")(logits, fine), F.binary_cross_entropy(probs, fine_masks), atol=1e-5, rtol=1e-5
    )
    perfect = masks * 40 - 20  # sure and right: near zero loss
    assert SegLoss(dice=True, outputs="regions")(perfect, target) < 1e-3
