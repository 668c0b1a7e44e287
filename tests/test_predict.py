"""Volume prediction (unet/predict.py) and the way back to the input grid (restore_grid).

No Prefect here: numerics only, tiny random U-Nets, small arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unet.model import UNet, UNetConfig
from unet.predict import predict_probs, segment, volumes_ml
from unet.preprocess import BRATS_TO_CLASS, PROFILES, restore_grid, to_label_slices


def one_hot(classes: np.ndarray, k: int = 4) -> np.ndarray:
    """(Z, h, w) classes -> (Z, K, h, w) one-hot scores."""
    return np.moveaxis(np.eye(k, dtype=np.float32)[classes], -1, 1)


def blobs(shape=(240, 240, 6)) -> np.ndarray:
    """Nested balls: ED shell, NCR core, ET rim inside — smooth shapes like a real tumour."""
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    r = np.sqrt((x - 110.0) ** 2 + (y - 130.0) ** 2 + (3 * (z - 2.5)) ** 2)
    seg = np.zeros(shape, dtype=np.int16)
    seg[r < 40] = 2
    seg[r < 25] = 4
    seg[r < 15] = 1
    seg[np.hypot(x - 60.0, y - 70.0) < 9] = 2  # a second small lesion
    return seg


def tiny(padding="same", depth=2, seed=0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(base_channels=4, depth=depth, padding=padding)).eval()


# ----------------------------------------------------------------------------- restore_grid


def test_restore_full_profile_is_exact():
    rng = np.random.default_rng(0)
    seg = rng.choice(np.array([0, 1, 2, 4], dtype=np.int16), size=(240, 240, 5))
    classes = to_label_slices(seg, PROFILES["full"])
    assert np.array_equal(restore_grid(one_hot(classes), PROFILES["full"], seg.shape), seg)


def test_restore_tp_profile_gives_labels_back_inside_the_crop_box():
    seg = blobs()
    profile = PROFILES["tp"]
    classes = to_label_slices(seg, profile)
    assert classes.shape == (6, 96, 96)
    back = restore_grid(one_hot(classes), profile, seg.shape)
    assert back.shape == seg.shape and back.dtype == np.uint8
    y0, y1, x0, x1 = profile.crop_box(240, 240)
    # the voxels the network's labels were sampled from come back exactly
    assert np.array_equal(back[y0:y1:2, x0:x1:2], seg[y0:y1:2, x0:x1:2])
    # the rest loses only a thin band at label boundaries
    inside = back[y0:y1, x0:x1] == seg[y0:y1, x0:x1]
    assert inside.mean() > 0.98
    for label in (1, 2, 4):  # one-hot ties between two labels go to the lower class: a band
        a, b = back == label, seg == label
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.93
    # outside the crop box nothing is predicted
    outside = np.ones((240, 240), bool)
    outside[y0:y1, x0:x1] = False
    assert not back[outside].any()


def test_restore_tp_puts_a_soft_boundary_where_it_was():
    """Soft scores of an edge at 100.5 (and 139.5) come back as rows 101..139, to the voxel.

    Nearest-neighbour upsampling would move it to 102; centre-aligned interpolation half a voxel.
    """
    profile = PROFILES["tp"]
    y = np.arange(240, dtype=np.float32)
    p_full = 1 / (1 + np.exp(-np.minimum(y - 100.5, 139.5 - y) / 3))  # P(tumour) along rows
    p = p_full[24:216:2]  # what the network says on the tp grid: row i sits on 24 + 2i
    scores = np.zeros((1, 4, 96, 96), np.float32)
    scores[0, 0] = (1 - p)[:, None]
    scores[0, 2] = p[:, None]
    back = restore_grid(scores, profile, (240, 240, 1))
    rows = np.flatnonzero(back[:, 120, 0])
    assert (rows[0], rows[-1]) == (101, 139)
    assert (back[rows, 24:216, 0] == 2).all()


def test_restore_refuses_scores_of_another_grid():
    with pytest.raises(ValueError, match="do not fit"):
        restore_grid(np.zeros((4, 4, 96, 96), np.float32), PROFILES["tp"], (240, 240, 5))


# ----------------------------------------------------------------------------- predict_probs


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_predict_probs_with_tta_keeps_the_shape_and_is_the_mean_of_mirrors(padding):
    model = tiny(padding)
    x = torch.randn(3, 4, 37, 50)
    plain = predict_probs(model, x)
    tta = predict_probs(model, x, tta=True)
    assert plain.shape == tta.shape == (3, 4, 37, 50)
    assert torch.allclose(tta.sum(1), torch.ones(3, 37, 50), atol=1e-5)
    with torch.no_grad():
        flipped = torch.softmax(model.predict(x.flip(-1)), 1).flip(-1)
    assert not torch.allclose(plain, tta)  # random weights are not mirror-symmetric
    by_hand = (plain + flipped + predict_probs(model, x.flip(-2)).flip(-2) + predict_probs(model, x.flip(-2, -1)).flip(-2, -1)) / 4
    assert torch.allclose(tta, by_hand, atol=1e-6)


# ----------------------------------------------------------------------------- segment


def case_slices(z=7, h=240, w=240, empty=(0, 6)) -> np.ndarray:
    rng = np.random.default_rng(1)
    slices = rng.normal(size=(z, 4, h, w)).astype(np.float16)
    slices[:, :, :20] = 0
    slices[list(empty)] = 0  # no brain: predicted background without running the net
    return slices


def test_segment_maps_class_3_to_label_4_and_skips_empty_slices():
    model = tiny()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))  # every voxel -> class 3
    slices = case_slices()
    labels = segment(model, slices, "full", (240, 240, 7), batch_size=3)
    assert labels.shape == (240, 240, 7) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 4}
    assert not labels[:, :, [0, 6]].any()
    assert (labels[:, :, 1:6] == 4).all()


@pytest.mark.parametrize("profile,padding", [("full", "same"), ("tp", "valid")])
def test_segment_is_the_same_in_any_batching_and_for_one_slice(profile, padding):
    model = tiny(padding, seed=3)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.3, 0.3, 0.3]))  # a mix of classes
    h, w = PROFILES[profile].slice_shape(240, 240)
    slices = case_slices(h=h, w=w)
    whole = segment(model, slices, profile, (240, 240, 7), batch_size=16)
    assert len(np.unique(whole)) > 2 and set(np.unique(whole)) <= {0, 1, 2, 4}
    assert np.array_equal(whole, segment(model, slices, profile, (240, 240, 7), batch_size=2))
    one = segment(model, slices, profile, (240, 240, 7), only=[3])
    assert np.array_equal(one[:, :, 3], whole[:, :, 3]) and not one[:, :, [2, 4]].any()


def test_segment_reads_zarr_and_refuses_the_wrong_profile(tmp_path):
    import zarr

    slices = case_slices(h=96, w=96)
    arr = zarr.create_array(str(tmp_path / "s.zarr"), shape=slices.shape, dtype=slices.dtype, chunks=(1, 4, 96, 96))
    arr[:] = slices
    model = tiny()
    assert np.array_equal(segment(model, arr, "tp", (240, 240, 7)), segment(model, slices, "tp", (240, 240, 7)))
    with pytest.raises(ValueError, match="do not fit"):
        segment(model, slices, "full", (240, 240, 7))


def test_volumes_ml_from_zooms():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[0, 0, :4] = 1
    labels[1, 0, :3] = 2
    labels[2, 0, :2] = 4
    v = volumes_ml(labels, (2.0, 1.0, 0.5))  # 1 mm³ per voxel -> 0.001 ml
    assert v == {"WT": 0.009, "TC": 0.006, "ET": 0.002, "L1": 0.004, "L2": 0.003, "L4": 0.002}
    assert BRATS_TO_CLASS[4] == 3
