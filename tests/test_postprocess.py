"""Post-processing: what it removes, what it never removes, and how it is chosen."""

from __future__ import annotations

import numpy as np

from unet.postprocess import DICE_TIE, ET_MIN_ML, MIN_ISLAND_ML, PostProcess, best_postprocess, scores

SHAPE, ZOOMS = (60, 60, 60), (1.0, 1.0, 1.0)


def blob(centre, radius, label=2) -> np.ndarray:
    grid = np.indices(SHAPE)
    inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
    return np.where(inside, label, 0).astype(np.uint8)


def test_it_never_removes_the_only_island_however_small():
    tiny = blob((20, 20, 20), 1, label=4)  # 7 voxels: 0.007 ml
    np.testing.assert_array_equal(PostProcess(min_island_ml=5.0).apply(tiny, ZOOMS), tiny)


def test_islands_go_by_absolute_size_and_the_largest_always_stays():
    tumour, second, speck = blob((20, 20, 20), 6), blob((45, 45, 45), 5), blob((45, 10, 10), 1)
    labels = tumour | second | speck
    # a second real tumour stays next to a larger one (keeping "the largest only" deleted it)
    np.testing.assert_array_equal(PostProcess(min_island_ml=0.1).apply(labels, ZOOMS), tumour | second)
    np.testing.assert_array_equal(PostProcess(min_island_ml=5.0).apply(labels, ZOOMS), tumour)  # all below 5 ml
    # millilitres, not voxels: the same 7-voxel speck at 3 mm is 0.19 ml, above the threshold
    np.testing.assert_array_equal(PostProcess(min_island_ml=0.1).apply(labels, (3.0, 3.0, 3.0)), labels)


def test_small_enhancing_tumour_becomes_core():
    labels = blob((20, 20, 20), 6) | blob((20, 20, 20), 1, label=4)
    out = PostProcess(et_min_ml=0.05).apply(labels, ZOOMS)
    assert not (out == 4).any() and (out[labels == 4] == 1).all()


def test_the_choice_removes_far_false_islands_and_keeps_small_true_ones():
    tumour, far_false = blob((20, 20, 20), 8), blob((50, 50, 50), 4)  # 0.26 ml of false tumour, 40 mm away
    small_true = blob((45, 15, 45), 5)  # 0.52 ml of real tumour, predicted
    cases = [
        (tumour | far_false, tumour, ZOOMS),  # a false island 40 mm away: HD95 tens of mm
        (tumour | small_true, tumour | small_true, ZOOMS),  # a small real second island
    ]
    post, tried = best_postprocess(cases)
    assert post.min_island_ml == 0.5  # removes the false island, keeps the true one
    (d0, h0), (d1, h1) = scores(cases, PostProcess()), scores(cases, post)
    assert d1 >= d0 and h1 < h0 - 5
    assert len(tried) == len(MIN_ISLAND_ML) + len(ET_MIN_ML)  # every candidate, each field once
    assert all(t["mean_dice"] <= d1 + DICE_TIE for t in tried)
    removed_true = PostProcess(min_island_ml=1.0)
    assert scores(cases, removed_true)[0] < d1 - DICE_TIE  # deleting the real island would cost Dice: never chosen


def test_the_choice_changes_nothing_where_nothing_helps():
    tumour = blob((20, 20, 20), 8) | blob((20, 20, 20), 3, label=4)
    post, _ = best_postprocess([(tumour, tumour, ZOOMS)])
    np.testing.assert_array_equal(post.apply(tumour, ZOOMS), tumour)
