"""Volume prediction (unet/predict.py) and the way back to the input grid (Geometry.restore).

No Prefect here: numerics only, tiny random U-Nets, small arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.brats import BRATS_TO_CLASS
from unet.geometry import Geometry, geometry_of, to_labels
from unet.model import UNet, UNetConfig
from unet.predict import predict_plane, predict_slices, predict_volume, volumes_ml
from unet.preprocess import PROFILES

BRATS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


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


def brats_geometry(profile: str, shape=(240, 240, 7)) -> Geometry:
    """The geometry of a BraTS-grid scan whose brain sits well inside the centre window."""
    brain = np.zeros(shape, bool)
    brain[40:200, 40:200] = True
    p = PROFILES[profile]
    return geometry_of(BRATS_AFFINE, shape, (1.0, 1.0, 1.0), brain, p.window, p.factor)


def tiny(padding="same", depth=2, seed=0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(base_channels=4, depth=depth, padding=padding)).eval()


def window_classes(seg: np.ndarray, g: Geometry) -> np.ndarray:
    """BraTS labels on the grid -> the network's (Z, h, w) classes, as preprocessing makes them."""
    f = g.factor
    return np.ascontiguousarray(g.window(BRATS_TO_CLASS[g.reorient(seg)].transpose(2, 0, 1), order=0)[:, ::f, ::f])


# ----------------------------------------------------------------------------- Geometry.restore


def test_restore_full_profile_is_exact():
    rng = np.random.default_rng(0)
    seg = rng.choice(np.array([0, 1, 2, 4], dtype=np.int16), size=(240, 240, 5))
    g = brats_geometry("full", seg.shape)
    assert g.box == (0, 240, 0, 240)
    assert np.array_equal(to_labels(g, g.restore(one_hot(window_classes(seg, g)))), seg)


def test_restore_tp_profile_gives_labels_back_inside_the_window():
    seg = blobs()
    g = brats_geometry("tp", seg.shape)
    classes = window_classes(seg, g)
    assert classes.shape == (6, 96, 96) and g.box == (24, 216, 24, 216)
    back = to_labels(g, g.restore(one_hot(classes)))
    assert back.shape == seg.shape and back.dtype == np.uint8
    y0, y1, x0, x1 = g.box
    # the voxels the network's labels were sampled from come back exactly
    assert np.array_equal(back[y0:y1:2, x0:x1:2], seg[y0:y1:2, x0:x1:2])
    # the rest loses only a thin band at label boundaries
    inside = back[y0:y1, x0:x1] == seg[y0:y1, x0:x1]
    assert inside.mean() > 0.98
    for label in (1, 2, 4):  # one-hot ties between two labels go to the lower class: a band
        a, b = back == label, seg == label
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.93
    # outside the window nothing is predicted
    outside = np.ones((240, 240), bool)
    outside[y0:y1, x0:x1] = False
    assert not back[outside].any()


def test_restore_tp_puts_a_soft_boundary_where_it_was():
    """Soft scores of an edge at 100.5 (and 139.5) come back as rows 101..139, to the voxel.

    Nearest-neighbour upsampling would move it to 102; centre-aligned interpolation half a voxel.
    """
    g = brats_geometry("tp", (240, 240, 1))
    y = np.arange(240, dtype=np.float32)
    p_full = 1 / (1 + np.exp(-np.minimum(y - 100.5, 139.5 - y) / 3))  # P(tumour) along rows
    p = p_full[24:216:2]  # what the network says on the tp grid: row i sits on 24 + 2i
    scores = np.zeros((1, 4, 96, 96), np.float32)
    scores[0, 0] = (1 - p)[:, None]
    scores[0, 2] = p[:, None]
    back = to_labels(g, g.restore(scores))
    rows = np.flatnonzero(back[:, 120, 0])
    assert (rows[0], rows[-1]) == (101, 139)
    assert (back[rows, 24:216, 0] == 2).all()


def test_restore_refuses_scores_of_another_grid():
    with pytest.raises(ValueError, match="do not fit"):
        brats_geometry("tp").restore(np.zeros((4, 4, 120, 120), np.float32))


# ----------------------------------------------------------------------------- predict_plane


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_predict_plane_with_tta_keeps_the_shape_and_is_the_mean_with_the_left_right_mirror(padding):
    model = tiny(padding)
    x = torch.randn(3, 4, 37, 50)
    plain = predict_plane(model, x)
    tta = predict_plane(model, x, tta=True)
    assert plain.shape == tta.shape == (3, 4, 37, 50)
    assert torch.allclose(tta.sum(1), torch.ones(3, 37, 50), atol=1e-5)
    assert not torch.allclose(plain, tta)  # random weights are not mirror-symmetric
    with torch.no_grad():  # left-right is H (NIfTI axis 0), the slice's first axis: dim -2
        mirrored = torch.softmax(model.predict(x.flip(-2)), 1).flip(-2)
    assert torch.allclose(tta, (plain + mirrored) / 2, atol=1e-6)


def test_pixels_without_brain_are_background_whatever_the_network_says():
    model = tiny()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))  # every pixel -> class 3
    x = np.random.default_rng(0).normal(size=(2, 4, 32, 32)).astype(np.float32)
    x[:, :, :8] = 0  # no brain in the top rows
    probs = predict_slices(model, x)
    assert (probs[:, 0, :8] == 1).all() and (probs[:, 1:, :8] == 0).all()
    assert (probs[:, 3, 8:] > 0.99).all()


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
    labels = predict_volume(model, slices, brats_geometry("full"), batch_size=3)
    assert labels.shape == (240, 240, 7) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 4}
    assert not labels[:, :, [0, 6]].any()
    assert (labels[20:, :, 1:6] == 4).all()
    assert not labels[:20].any()  # rows without brain (all channels 0) are background


@pytest.mark.parametrize("profile,padding", [("full", "same"), ("tp", "valid")])
def test_segment_is_the_same_in_any_batching_and_for_one_slice(profile, padding):
    model = tiny(padding, seed=3)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.3, 0.3, 0.3]))  # a mix of classes
    h, w = brats_geometry(profile).slice_shape
    slices = case_slices(h=h, w=w)
    g = brats_geometry(profile)
    whole = predict_volume(model, slices, g, batch_size=16)
    assert len(np.unique(whole)) > 2 and set(np.unique(whole)) <= {0, 1, 2, 4}
    assert np.array_equal(whole, predict_volume(model, slices, g.to_dict(), batch_size=2))
    one = predict_volume(model, slices, g, only=[3], batch_size=16)
    assert np.array_equal(one[:, :, 3], whole[:, :, 3]) and not one[:, :, [2, 4]].any()


def test_segment_reads_zarr_and_refuses_the_wrong_profile(tmp_path):
    import zarr

    slices = case_slices(h=96, w=96)
    arr = zarr.create_array(str(tmp_path / "s.zarr"), shape=slices.shape, dtype=slices.dtype, chunks=(1, 4, 96, 96))
    arr[:] = slices
    model = tiny()
    g = brats_geometry("tp")
    assert np.array_equal(predict_volume(model, arr, g, batch_size=4), predict_volume(model, slices, g, batch_size=4))
    with pytest.raises(ValueError, match="do not fit"):
        predict_volume(model, slices, brats_geometry("full"), batch_size=4)


def test_volumes_ml_from_zooms():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[0, 0, :4] = 1
    labels[1, 0, :3] = 2
    labels[2, 0, :2] = 4
    v = volumes_ml(labels, (2.0, 1.0, 0.5))  # 1 mm³ per voxel -> 0.001 ml
    assert v == {"WT": 0.009, "TC": 0.006, "ET": 0.002, "L1": 0.004, "L2": 0.003, "L4": 0.002}
    assert BRATS_TO_CLASS[4] == 3
