"""Region outputs (unet.outputs): labels painted WT -> TC -> ET are nested, and the class
probabilities a region network gives average as its region probabilities do."""

from __future__ import annotations

import numpy as np
import torch

from storage.brats import CLASS_REGIONS
from unet.outputs import labels_of, probabilities, region_probabilities


def test_painted_labels_nest_et_in_tc_in_wt_whatever_the_sigmoids_say():
    logits = torch.randn(64, 3, 16, 16) * 3  # sigmoids in any order: ET sure where TC is not, ...
    labels = labels_of(probabilities(logits, "regions"), "regions")
    r = torch.sigmoid(logits)
    wt, tc, et = (torch.isin(labels, torch.tensor(c)) for c in CLASS_REGIONS.values())
    assert bool((et <= tc).all() and (tc <= wt).all())
    # painted WT -> TC -> ET, each over the last (nnU-Net's rule)
    assert torch.equal(et, r[:, 2] > 0.5)
    assert torch.equal(tc, (r[:, 1] > 0.5) | (r[:, 2] > 0.5))
    assert torch.equal(wt, (r > 0.5).any(1))
    assert {0, 1, 2, 3} == set(labels.unique().tolist())


def test_region_probabilities_are_a_distribution_whose_region_sums_are_the_nested_sigmoids():
    logits = torch.randn(8, 3, 5, 5) * 2
    p = probabilities(logits, "regions")
    assert p.shape == (8, 4, 5, 5) and bool((p >= 0).all())
    torch.testing.assert_close(p.sum(1), torch.ones(8, 5, 5))
    r = torch.sigmoid(logits)
    et = r[:, 2]
    tc = torch.maximum(r[:, 1], et)
    wt = torch.maximum(r[:, 0], tc)
    torch.testing.assert_close(region_probabilities(p), torch.stack([wt, tc, et], 1))


def test_the_mean_of_region_probabilities_paints_as_the_mean_regions_do():
    """TTA and ensemble means (and linear upsampling) are taken of class probabilities: for a region
    network they must paint what the mean of its nested region probabilities paints."""
    views = [probabilities(torch.randn(4, 3, 9, 9) * 2, "regions") for _ in range(3)]
    mean = torch.stack(views).mean(0)
    r = torch.stack([region_probabilities(v) for v in views]).mean(0)
    painted = np.where(r[:, 2] > 0.5, 3, np.where(r[:, 1] > 0.5, 1, np.where(r[:, 0] > 0.5, 2, 0)))
    assert np.array_equal(labels_of(mean, "regions").numpy(), painted)


def test_class_outputs_are_labelled_by_their_argmax():
    probs = torch.softmax(torch.randn(6, 4, 7, 7), 1)
    assert torch.equal(labels_of(probs, "classes"), probs.argmax(1).to(torch.uint8))
