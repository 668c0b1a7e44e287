"""Cropping to the brain at inference (unet/predict.py): it must segment what the whole plane does.

The real check uses a trained full-profile U-Net (base 8, same padding, batch norm) committed under
``tests/data/models`` (see ``tests/data/README.md``) on the committed real case, which it never saw
in training: an untrained network's argmax is noise near ties, so only a trained one says whether
the crop's edge changes the segmentation. More real cases: set ``BRATS_CROP_CASES`` to a folder of
BraTS cases (the first two are used).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.brats import REGIONS
from storage.cases import discover
from storage.nifti import read_case
from storage.registry import Registry
from tests.conftest import REAL, ROOT
from unet.checkpoint import load_model
from unet.metrics import dice
from unet.model import UNet, UNetConfig
from unet.predict import CROP_MARGIN, brain_box, predict_crop, predict_plane, predict_slices, predict_volume
from unet.preprocess import PROFILES, preprocess_case

MODELS = ROOT / "tests" / "data" / "models"
VERSION = "v20261201-020822-ed23"  # full profile, base 8, same padding: tests/data/README.md
WHOLE = {"precision": "fp32", "crop": False, "channels_last": False, "batch_size": 16}  # the whole plane
MIN_DICE = 0.99


def _cases() -> list[Path]:
    cases = [REAL / "Brats18_2013_2_1"]
    extra = os.environ.get("BRATS_CROP_CASES")
    if extra:
        cases += [c.path for c in discover(extra).cases[:2]]
    return cases


@pytest.fixture(scope="module")
def trained() -> UNet:
    model, info = load_model(Registry(str(MODELS)), VERSION, "cpu")
    assert info.profile == "full" and model.cfg.padding == "same"
    return model


@pytest.fixture(scope="module", params=_cases(), ids=lambda p: p.name)
def case(request) -> tuple[np.ndarray, dict]:
    found = discover(request.param).cases
    slices, _, attrs = preprocess_case(read_case(found[0]), PROFILES["full"], dtype=np.float32, grow=True)
    return slices, attrs


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {r: dice(np.isin(a, m), np.isin(b, m)) for r, m in REGIONS.items()}


class Tiles:
    """The (h, w) of every forward of a model."""

    def __init__(self, model: UNet):
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(lambda m, args: self.shapes.append(tuple(args[0].shape[-2:])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ----------------------------------------------------------------------------- the trained model, real data


@pytest.mark.parametrize("precision,tta", [("fp32", False), ("auto", False), ("auto", True)])
def test_cropped_prediction_agrees_with_the_whole_plane_on_a_real_case(trained, case, precision, tta):
    slices, attrs = case
    g, brain = attrs["geometry"], attrs["slice_brain"]
    whole = predict_volume(trained, slices, g, brain, tta=tta, **WHOLE)
    with Tiles(trained) as tiles:
        cropped = predict_volume(trained, slices, g, brain, tta=tta, precision=precision, batch_size=16)
    for region, members in REGIONS.items():  # a real segmentation, not an empty one agreeing with another
        assert np.isin(whole, members).sum() > 1000, region
    scores = agreement(cropped, whole)
    assert min(scores.values()) >= MIN_DICE, scores
    # the crop did save work: the network ran on far fewer pixels than the brain slices' planes
    assert np.mean([h * w for h, w in tiles.shapes]) < 0.8 * 240 * 240


def test_a_brain_touching_the_window_edge_is_cropped_there_and_still_agrees(trained, case):
    """Shift the real brain into the plane's top-left corner: the crop is clipped at the edge (where the
    whole plane's prediction has the same zero-padded context) and the segmentations still agree."""
    slices, attrs = case
    z = np.flatnonzero(attrs["slice_brain"])
    footprint = slices[z].any(axis=(0, 1))
    rows, cols = np.flatnonzero(footprint.any(1)), np.flatnonzero(footprint.any(0))
    shifted = np.zeros_like(slices)
    shifted[:, :, : 240 - rows[0], : 240 - cols[0]] = slices[:, :, rows[0] :, cols[0] :]
    box = brain_box(torch.from_numpy(shifted[z].any(axis=(0, 1))))
    assert box[0] == 0 and box[2] == 0  # the brain touches the top and left edges
    g = attrs["geometry"]
    whole = predict_volume(trained, shifted, g, attrs["slice_brain"], **WHOLE)
    cropped = predict_volume(trained, shifted, g, attrs["slice_brain"], batch_size=16)
    scores = agreement(cropped, whole)
    assert min(scores.values()) >= MIN_DICE, scores


# ----------------------------------------------------------------------------- geometry of the crop (tiny nets)


def tiny(padding: str, depth: int = 3, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(base_channels=4, depth=depth, padding=padding)).eval()


def brain_slices(n: int, h: int, w: int, box: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """Noise inside ``box`` (the 'brain'), exactly 0 outside, as normalization leaves a scan."""
    x = np.zeros((n, 4, h, w), np.float32)
    y0, y1, x0, x1 = box
    x[:, :, y0:y1, x0:x1] = np.random.default_rng(seed).normal(size=(n, 4, y1 - y0, x1 - x0))
    return x


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize(
    "h,w,box",
    [
        (240, 240, (60, 180, 50, 200)),
        (240, 240, (0, 70, 200, 240)),
        (96, 96, (10, 90, 0, 96)),
        (37, 50, (3, 20, 9, 49)),
    ],
)
def test_the_crop_lies_on_the_network_grid_and_holds_the_brain_with_its_margin(padding, h, w, box):
    model = tiny(padding)
    s = 2**model.cfg.depth
    x = brain_slices(2, h, w, box)
    with Tiles(model) as tiles:
        probs = predict_slices(model, x, precision="fp32")
    ((th, tw),) = set(tiles.shapes)
    for size in (th, tw):
        assert model.output_size(size) > 0  # a size the network takes: a multiple of 2**depth in same mode
        if padding == "same":
            assert size % s == 0
    y0, y1, x0, x1 = box
    want_h = min(y1 + CROP_MARGIN, h) - max(y0 - CROP_MARGIN, 0)
    want_w = min(x1 + CROP_MARGIN, w) - max(x0 - CROP_MARGIN, 0)
    assert model.output_size(th) >= min(want_h, h) and model.output_size(tw) >= min(want_w, w)
    if h == 240 and box[1] - box[0] < 150:
        assert th * tw < model.input_size_for(h) * model.input_size_for(w)  # a smaller tile than the plane's
    assert probs.shape == (2, 4, h, w) and np.allclose(probs.sum(1), 1, atol=1e-5)
    outside = ~x.any(1)
    assert (probs[:, 0][outside] == 1).all()


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize(
    "h,w,box", [(240, 240, (60, 180, 50, 200)), (37, 50, (0, 20, 9, 50)), (100, 90, (7, 93, 0, 90))]
)
def test_in_valid_mode_the_crop_predicts_exactly_what_the_whole_plane_does(tta, h, w, box):
    """Valid mode: the crop's context is the whole plane's mirror padding, on the same pooling grid."""
    model = tiny("valid")
    x = torch.from_numpy(brain_slices(3, h, w, box, seed=1))
    whole = predict_plane(model, x, tta)
    cropped = predict_crop(model, x, brain_box(x.ne(0).any(0).any(0)), tta)
    y0, y1, x0, x1 = box
    assert torch.allclose(cropped[..., y0:y1, x0:x1], whole[..., y0:y1, x0:x1], atol=1e-5)


def test_without_crop_and_autocast_the_prediction_is_the_whole_plane_in_fp32():
    model = tiny("same")
    x = brain_slices(2, 64, 48, (5, 40, 8, 30))
    probs = predict_slices(model, x, precision="fp32", crop=False, channels_last=False)
    expected = predict_plane(model, torch.from_numpy(x)).numpy()
    inside = x.any(1)
    assert np.allclose(probs.transpose(0, 2, 3, 1)[inside], expected.transpose(0, 2, 3, 1)[inside], atol=1e-6)


def test_a_batch_without_brain_is_background_without_running_the_network():
    model = tiny("same")
    with Tiles(model) as tiles:
        probs = predict_slices(model, np.zeros((2, 4, 48, 48), np.float32))
    assert not tiles.shapes
    assert (probs[:, 0] == 1).all() and (probs[:, 1:] == 0).all()
