"""An ensemble predicts the mean of its members' probabilities, through every prediction path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.registry import Registry
from unet.checkpoint import load_model, save_model
from unet.ensemble import Ensemble
from unet.model import UNet, UNetConfig
from unet.predict import predict_slices


def members(padding: str, n: int = 3, **kw) -> list[UNet]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(UNet(UNetConfig(base_channels=4, depth=2, padding=padding, **kw)).eval())
    return out


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_ensemble_probabilities_are_the_mean_of_its_members(padding):
    models = members(padding)
    x = torch.randn(2, 4, 40, 36)
    with torch.no_grad():
        mean = sum(torch.softmax(m.predict(x), 1) for m in models) / len(models)
        got = torch.softmax(Ensemble(models).predict(x), 1)
    torch.testing.assert_close(got, mean, rtol=1e-5, atol=1e-6)
    image = np.zeros((2, 4, 40, 36), np.float32)
    image[:, :, 8:30, 6:28] = x[:, :, 8:30, 6:28].numpy()  # brain in the middle, background around
    probs = predict_slices(Ensemble(models), image, precision="fp32")  # the cropped inference path
    each = np.mean([predict_slices(m, image, precision="fp32") for m in models], axis=0)
    np.testing.assert_allclose(probs, each, rtol=1e-4, atol=1e-5)


def test_members_must_agree_on_shapes():
    with pytest.raises(ValueError, match="disagree"):
        Ensemble(members("same", 1) + members("valid", 1))
    with pytest.raises(ValueError, match="disagree"):
        Ensemble(members("same", 1) + members("same", 1, context=1))
    Ensemble(members("same", 1) + [UNet(UNetConfig(base_channels=8, depth=2, padding="same", norm="batch"))])


def test_an_ensemble_version_loads_as_one_model(tmp_path):
    registry = Registry(str(tmp_path / "models"))
    versions = []
    for m in members("same"):
        version = registry.create({"profile": "tp", "status": "complete"})
        save_model(registry, version, m)
        versions.append(version)
    ensemble = registry.create({"profile": "tp", "status": "complete", "members": versions, "model": {}})
    model, info = load_model(registry, ensemble)
    assert isinstance(model, Ensemble) and len(model.members) == 3 and info.members == versions
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        expected = sum(torch.softmax(load_model(registry, v)[0].predict(x), 1) for v in versions) / 3
        torch.testing.assert_close(torch.softmax(model.predict(x), 1), expected, rtol=1e-5, atol=1e-6)
