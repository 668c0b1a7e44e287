"""Augmentation: parameters drawn per sample, applied per batch; background stays 0, labels stay labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unet.augment import AUGMENTATIONS, AugmentConfig, apply_augment, augment_params, identity_params


def test_apply_augment_flips_exactly_and_keeps_background_zero():
    rng = np.random.default_rng(0)
    image = torch.zeros(2, 4, 16, 16)
    image[:, :, 4:10, 2:8] = torch.from_numpy(rng.normal(size=(2, 4, 6, 6))).float()
    label = torch.zeros(2, 16, 16, dtype=torch.uint8)
    label[:, 5:7, 3:5] = 2
    flip = torch.from_numpy(np.stack([augment_params(None, None)] * 2))
    flip[0, 0] = 1.0  # flip the first sample only
    x, y = apply_augment(image, label, flip)
    # left-right is the slice's H axis (NIfTI axis 0, dim -2); W (dim -1) is anterior-posterior
    assert torch.allclose(x[0], image[0].flip(-2), atol=1e-4) and torch.equal(y[0], label[0].flip(-2))
    assert torch.allclose(x[1], image[1], atol=1e-4) and torch.equal(y[1], label[1])
    jitter = AugmentConfig(flip_lr=0.0, rotate_degrees=0.0, intensity_scale=0.2, intensity_shift=0.5)
    params = torch.from_numpy(np.stack([augment_params(jitter, rng) for _ in range(2)]))
    x, _ = apply_augment(image, label, params)
    background = (image == 0).all(1, keepdim=True).expand_as(image)
    assert (x[background] == 0).all() and not torch.allclose(x, image)


def brain_batch(n: int = 4, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = torch.zeros(n, 4, size, size)
    image[:, :, 6:26, 8:24] = torch.from_numpy(rng.normal(size=(n, 4, 20, 16))).float()
    label = torch.zeros(n, size, size, dtype=torch.uint8)
    label[:, 10:18, 12:20] = 2
    label[:, 12:15, 14:17] = 3
    return image, label


@pytest.mark.parametrize("fine", [1, 2])
@pytest.mark.parametrize("name", ["strong", "scanner", "gin", "drop", "drop-but-t1ce"])
def test_strong_augmentation_keeps_background_zero_and_labels_valid(fine, name):
    image, label = brain_batch()
    label = label.repeat_interleave(fine, -2).repeat_interleave(fine, -1)  # labels on a finer grid (profile tp)
    rng = np.random.default_rng(1)
    params = torch.from_numpy(np.stack([augment_params(AUGMENTATIONS[name], rng) for _ in range(len(image))]))
    x, y = apply_augment(image, label, params)
    assert x.shape == image.shape and y.shape == label.shape and y.dtype == torch.uint8
    assert set(y.unique().tolist()) <= {0, 2, 3} and torch.isfinite(x).all()
    again, _ = apply_augment(image, label, params)  # a function of the parameters (noise from their seed)
    torch.testing.assert_close(x, again)
    moved = (x != 0).any(1)
    coarse = y[:, ::fine, ::fine] > 0
    assert (moved | ~coarse).float().mean() > 0.99  # tumour lies on brain after the same spatial change


def test_every_strong_operation_changes_only_the_brain():
    image, label = brain_batch(n=1)
    outside = (image == 0).all(1, keepdim=True).expand_as(image)
    for name, cfg in {
        "noise": AugmentConfig(
            flip_lr=0, rotate_degrees=0, intensity_scale=0, intensity_shift=0, p_noise=1, noise_std=0.1
        ),
        "blur": AugmentConfig(flip_lr=0, rotate_degrees=0, intensity_scale=0, intensity_shift=0, p_blur=1),
        "contrast": AugmentConfig(flip_lr=0, rotate_degrees=0, intensity_scale=0, intensity_shift=0, p_contrast=1),
        "lowres": AugmentConfig(flip_lr=0, rotate_degrees=0, intensity_scale=0, intensity_shift=0, p_lowres=1),
        "gamma": AugmentConfig(flip_lr=0, rotate_degrees=0, intensity_scale=0, intensity_shift=0, p_gamma=1),
        "bias": AugmentConfig(flip_lr=0, rotate_degrees=0, intensity_scale=0, intensity_shift=0, p_bias=1),
        "gin": AugmentConfig(flip_lr=0, rotate_degrees=0, intensity_scale=0, intensity_shift=0, p_gin=1),
        "drop": AugmentConfig(flip_lr=0, rotate_degrees=0, intensity_scale=0, intensity_shift=0, p_drop=1),
        "scale": AugmentConfig(
            flip_lr=0, rotate_degrees=0, intensity_scale=0, intensity_shift=0, p_scale=1, scale=(0.7, 0.8)
        ),
    }.items():
        params = torch.from_numpy(augment_params(cfg, np.random.default_rng(3)))[None]
        x, y = apply_augment(image, label, params)
        assert not torch.allclose(x, image), name
        if name != "scale":
            assert (x[outside] == 0).all() and torch.equal(y, label), name


def test_identity_parameters_change_nothing():
    image, label = brain_batch()
    x, y = apply_augment(image, label, torch.from_numpy(np.stack([identity_params()] * len(image))))
    torch.testing.assert_close(x, image)
    assert torch.equal(y, label)
    assert np.array_equal(augment_params(None, None), identity_params())


def test_a_bias_field_is_smooth_and_scales_each_modality_on_its_own():
    image = torch.ones(1, 4, 32, 32)  # a flat brain: what remains is the field
    cfg = AugmentConfig(flip_lr=0, rotate_degrees=0, intensity_scale=0, intensity_shift=0, p_bias=1)
    params = torch.from_numpy(augment_params(cfg, np.random.default_rng(5)))[None]
    x, _ = apply_augment(image, torch.zeros(1, 32, 32, dtype=torch.uint8), params)
    field = (x + 3.0) / 4.0  # z = 1 -> b * 1 + (b - 1) * 3 = 4b - 3
    assert field.min() > 0.2 and field.max() < 5  # exp of a quadratic with coefficients in +-0.3
    assert (field[..., 1:, :] - field[..., :-1, :]).abs().max() < 0.1  # smooth: no step between neighbours
    assert not torch.allclose(field[0, 0], field[0, 1])  # each modality its own field


def test_gin_gives_each_modality_its_own_random_network_the_same_on_every_context_slice():
    """GIN (``unet.augment._gin``): a sample's modality goes through one random network on each slice
    of its 2.5D context (identical slices in, identical out), keeps its brain mean, and becomes a
    contrast no linear change of the image gives; a share of 0 leaves the sample as it was, and the
    same parameters give the same image (a resumed run replays it)."""
    image, label = brain_batch(n=3)
    context = image.repeat(1, 3, 1, 1)  # 3 identical slices x 4 modalities: channel j is modality j % 4
    cfg = AugmentConfig(flip_lr=0, rotate_degrees=0, intensity_scale=0, intensity_shift=0, p_gin=1)
    params = torch.from_numpy(np.stack([augment_params(cfg, np.random.default_rng(i)) for i in range(3)]))
    params[1, 6] = 0.0  # the second sample: no GIN
    params[2, 6] = 1.0  # the third: GIN alone
    x, y = apply_augment(context, label, params)
    again, _ = apply_augment(context, label, params)
    assert torch.equal(x, again) and torch.equal(y, label)
    torch.testing.assert_close(x[:, :4], x[:, 4:8])
    torch.testing.assert_close(x[:, :4], x[:, 8:])
    torch.testing.assert_close(x[1], context[1])
    brain = (image[0] != 0).any(0)
    assert ((x[0] == 0) | brain).all()  # background stays 0
    before, after = context[2, :4, brain], x[2, :4, brain]  # (modality, brain voxels)
    torch.testing.assert_close(after.mean(1), before.mean(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(after.std(1), before.std(1), atol=1e-3, rtol=1e-3)
    for m in range(4):  # not a gain and offset of the modality: a new contrast
        fit = np.polyfit(before[m].numpy(), after[m].numpy(), 1)
        residual = after[m].numpy() - np.polyval(fit, before[m].numpy())
        assert residual.std() > 0.1 * after[m].std().item(), m


def test_drop_blanks_one_modality_on_every_context_slice_and_keeps_the_rest():
    """Modality dropout (the ``drop`` set): a sample drawn for it loses one modality, the same on every
    slice of its 2.5D context, and keeps the other three exactly as the same parameters without the
    dropout give them; about a quarter of the samples are drawn for it, each modality as often."""
    image, label = brain_batch(n=8)
    context = image.repeat(1, 3, 1, 1)  # channel j is modality j % 4
    cfg = AugmentConfig(flip_lr=0, rotate_degrees=0, intensity_scale=0.2, intensity_shift=0.1, p_drop=1)
    params = torch.from_numpy(np.stack([augment_params(cfg, np.random.default_rng(i)) for i in range(8)]))
    kept = params.clone()
    kept[:, 7] = 0
    x, y = apply_augment(context, label, params)
    whole, _ = apply_augment(context, label, kept)
    assert torch.equal(y, label) and set(params[:, 7].tolist()) <= {1, 2, 3, 4}
    for i in range(8):
        gone = [j for j in range(12) if j % 4 == int(params[i, 7]) - 1]
        assert (x[i, gone] == 0).all() and (whole[i, gone] != 0).any()
        rest = [j for j in range(12) if j not in gone]
        torch.testing.assert_close(x[i, rest], whole[i, rest])
    rng = np.random.default_rng(0)
    drawn = np.array([augment_params(AUGMENTATIONS["drop"], rng)[7] for _ in range(4000)])
    assert 0.22 < (drawn > 0).mean() < 0.28
    assert np.bincount(drawn.astype(int), minlength=5)[1:].min() > 200  # every modality is dropped
    strong = np.random.default_rng(3)
    same = np.random.default_rng(3)  # the other draws are strong's, in strong's order
    np.testing.assert_array_equal(
        np.delete(augment_params(AUGMENTATIONS["strong"], strong), 7),
        np.delete(augment_params(AUGMENTATIONS["drop"], same), 7),
    )
    kept = np.array([augment_params(AUGMENTATIONS["drop-but-t1ce"], rng)[7] for _ in range(3000)])
    counts = np.bincount(kept.astype(int), minlength=5)
    assert counts[3] == 0 and counts[[1, 2, 4]].min() > 200  # T1ce (3) is never blanked, the others are
