"""Tests for unet.model: the U-Net (Ronneberger et al. 2015) and its cross-entropy.

All real computation uses tiny widths (base 2-8) so the suite runs in seconds on a CPU;
the paper-sized network is only instantiated on the meta device.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unet.flops import flops_per_forward
from unet.loss import CrossEntropy, class_weights_from_counts, cross_entropy
from unet.model import UNet, UNetConfig, center_crop, mirror_pad
from unet.norm import IBN


def tiny(padding: str = "valid", base: int = 4, depth: int = 4, **kw) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(base_channels=base, depth=depth, padding=padding, **kw)).eval()


# ----------------------------------------------------------------------------- shapes


def test_paper_config_shape_and_parameter_count() -> None:
    cfg = UNetConfig(in_channels=1, num_classes=2, base_channels=64, depth=4, padding="valid")
    with torch.device("meta"):
        model = UNet(cfg)
        y = model(torch.empty(1, 1, 572, 572))
    assert y.shape == (1, 2, 388, 388)
    assert sum(p.numel() for p in model.parameters()) == 31_030_658
    # no normalisation layers in the paper configuration, biases everywhere
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 2 * 9 + 4 + 1  # 18 3x3 convs, 4 up-convs, 1x1 head
    assert all(m.bias is not None for m in convs)
    widths = [blk[0].out_channels for blk in model.down]
    assert widths == [64, 128, 256, 512, 1024]


def test_valid_forward_real_tensor_shape() -> None:
    model = tiny("valid", base=2)
    with torch.no_grad():
        assert model(torch.randn(2, 4, 204, 204)).shape == (2, 4, 20, 20)
        assert model(torch.randn(1, 4, 188, 220)).shape == (1, 4, 4, 36)


def test_same_mode_keeps_size() -> None:
    model = tiny("same", base=8)
    with torch.no_grad():
        y = model(torch.randn(1, 4, 96, 96))
    assert y.shape == (1, 4, 96, 96)


def test_output_size_and_input_size_for() -> None:
    paper = tiny("valid")
    assert paper.output_size(572) == 388
    assert paper.input_size_for(388) == 572
    assert paper.input_size_for(240) == 428 and paper.output_size(428) == 244
    assert paper.input_size_for(96) == 284 and paper.output_size(284) == 100
    assert paper.input_size_for(1) == 188 and paper.output_size(188) == 4
    for bad in (570, 571, 573, 187, 100, 0):
        with pytest.raises(ValueError):
            paper.output_size(bad)
    with pytest.raises(ValueError):
        paper(torch.randn(1, 4, 100, 100))

    for depth in (1, 2, 3, 4):
        model = tiny("valid", depth=depth)
        for out in range(1, 130):
            n = model.input_size_for(out)
            assert model.output_size(n) >= out
            # minimal: no smaller input tiles to an output that large
            for smaller in range(1, n):
                try:
                    assert model.output_size(smaller) < out
                except ValueError:
                    pass
        valid = [n for n in range(1, 300) if _tiles(model, n)]
        # valid sizes step by 2**depth and shrink by 12 * 2**depth - 8
        assert all(b - a == 2**depth for a, b in zip(valid, valid[1:]))
        assert all(n - model.output_size(n) == 12 * 2**depth - 8 for n in valid)

    same = tiny("same", depth=4)
    assert same.output_size(240) == 240 and same.output_size(96) == 96
    assert same.input_size_for(240) == 240 and same.input_size_for(95) == 96
    assert same.input_size_for(97) == 112
    with pytest.raises(ValueError):
        same.output_size(100)


def _tiles(model: UNet, n: int) -> bool:
    try:
        model.output_size(n)
    except ValueError:
        return False
    return True


def test_valid_forward_is_translation_consistent() -> None:
    """A valid-mode output pixel only sees its own 185x185 window: the forward of a
    sub-window (shifted by a multiple of 2**depth) equals that part of the big output."""
    model = tiny("valid", base=2)
    x = torch.randn(1, 4, 220, 220)
    with torch.no_grad():
        big = model(x)  # 36 x 36
        sub = model(x[..., 16 : 16 + 188, 32 : 32 + 188])  # 4 x 4
    torch.testing.assert_close(sub, big[..., 16:20, 32:36])


# ----------------------------------------------------------------------------- predict


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("size", [(240, 240), (96, 96), (50, 37)])
def test_predict_full_size(padding: str, size: tuple[int, int]) -> None:
    model = tiny(padding, base=4)
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        y = model.predict(x)
    assert y.shape == (2, 4, *size)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_predict_batch_independent(padding: str) -> None:
    model = tiny(padding, base=4)
    x = torch.randn(3, 4, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(x)[1:2], model.predict(x[1:2]), rtol=1e-4, atol=1e-4)


def test_predict_valid_equals_forward_on_mirror_padded_input() -> None:
    model = tiny("valid", base=4)
    x = torch.randn(1, 4, 96, 96)
    # 96 -> smallest valid input 284 (output 100): 94 px of mirror padding per side,
    # the network itself removes 92 per side, leaving 2 extra output px per side.
    xp = F.pad(x, (94, 94, 94, 94), mode="reflect")
    with torch.no_grad():
        raw = model(xp)
        pred = model.predict(x)
    assert raw.shape[-1] == 100
    torch.testing.assert_close(pred, raw[..., 2:98, 2:98])
    torch.testing.assert_close(pred, center_crop(raw, 96))


def test_predict_same_equals_forward_when_already_tiled() -> None:
    model = tiny("same", base=4)
    x = torch.randn(1, 4, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(x), model(x))
        # 90 -> reflect-padded to 96 (3 px per side), output cropped back
        x90 = x[..., :90, :90]
        ref = model(F.pad(x90, (3, 3, 3, 3), mode="reflect"))[..., 3:93, 3:93]
        torch.testing.assert_close(model.predict(x90), ref)


def test_center_crop_and_mirror_pad() -> None:
    t = torch.arange(36).reshape(1, 6, 6)
    assert center_crop(t, 2).tolist() == [[[14, 15], [20, 21]]]
    assert center_crop(t, (6, 4)).shape == (1, 6, 4)
    with pytest.raises(ValueError):
        center_crop(t, 7)
    row = torch.tensor([[[0.0, 1.0, 2.0]]])  # 1x1x3
    # pad larger than the image: periodic mirror extension ... 2 1 | 0 1 2 | 1 0 1 2 ...
    out = mirror_pad(row.unsqueeze(0), (4, 5, 0, 0))
    assert out.flatten().tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1]
    small = torch.randn(1, 2, 5, 7)
    torch.testing.assert_close(mirror_pad(small, (3, 1, 2, 4)), F.pad(small, (3, 1, 2, 4), mode="reflect"))


# ----------------------------------------------------------------------------- init, norm


def test_kaiming_init() -> None:
    model = tiny("same", base=16, depth=2)
    conv = model.down[1][2]  # 32 -> 32 3x3 conv: N = 32 * 9
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == 32
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.05)
    up = model.up[0].up  # 64 -> 32 up-conv: each output pixel sees N = 64 inputs
    assert up.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all((m.bias == 0).all() for m in convs)


@pytest.mark.parametrize("norm, cls", [("batch", nn.BatchNorm2d), ("instance", nn.InstanceNorm2d)])
def test_optional_norm(norm: str, cls: type) -> None:
    model = tiny("same", base=4, depth=2, norm=norm)
    assert sum(isinstance(m, cls) for m in model.modules()) == 2 * 5
    model.train()
    y = model(torch.randn(2, 4, 32, 32))
    assert y.shape == (2, 4, 32, 32) and torch.isfinite(y).all()
    with pytest.raises(ValueError):
        UNetConfig(norm="group")
    with pytest.raises(ValueError):
        UNetConfig(padding="reflect")


def test_ibn_norm_drops_the_first_levels_contrast_on_half_its_channels() -> None:
    """``norm ibn``: one mixed layer after the first conv (instance norm on its first half of the
    channels, batch norm on the rest), batch norm everywhere else."""
    model = tiny("same", base=4, depth=2, norm="ibn")
    mixed = [m for m in model.modules() if isinstance(m, IBN)]
    assert len(mixed) == 1 and model.down[0][1] is mixed[0]
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in model.modules()) == 1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2 * 5  # the mixed layer's half too
    layer = mixed[0].eval()
    x = torch.randn(2, 4, 16, 16)
    scaled = x * torch.tensor([3.0, 0.5, 1.0, 1.0])[:, None, None] + torch.tensor([1.0, -2.0, 0.0, 0.0])[:, None, None]
    y, y_scaled = layer(x), layer(scaled)
    assert torch.allclose(y[:, :2], y_scaled[:, :2], atol=1e-4)  # contrast and brightness gone: instance half
    assert torch.equal(y[:, 2:], y_scaled[:, 2:])  # untouched channels, untouched output
    assert not torch.allclose(layer(x * 3)[:, 2:], y[:, 2:])  # the batch half keeps the scale it was given
    model.train()
    out = model(torch.randn(2, 4, 32, 32).contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 4, 32, 32) and torch.isfinite(out).all()


def test_dropout_at_the_end_of_the_contracting_path_only_while_training() -> None:
    """``dropout``: the paper's, on the last contracting level's output (its skip too) and the
    bottleneck's; nothing dropped in eval mode; at 0 the network is the one without it."""
    model = tiny("same", base=4, depth=2, dropout=0.5).train()
    seen = {}
    for i in range(3):  # the two levels and the bottleneck, before any dropout
        model.down[i].register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, out))
    model.up[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("deep", args))
    model.up[1].register_forward_pre_hook(lambda m, args: seen.__setitem__("shallow", args))
    x = torch.randn(2, 4, 16, 16)
    model(x)
    (bottom, last_skip), first_skip = seen["deep"], seen["shallow"][1]
    for before, after in ((seen[2], bottom), (seen[1], last_skip)):
        kept = after != 0
        assert torch.allclose(after[kept], 2 * before[kept])  # survivors scaled by 1 / (1 - 0.5)
        dropped = float(((before != 0) & ~kept).sum() / (before != 0).sum())
        assert 0.3 < dropped < 0.7
    assert torch.equal(first_skip, seen[0])  # the first level: not dropped
    model.eval()
    assert torch.equal(model(x), model(x))
    assert torch.equal(tiny("same", base=4, depth=2)(x), model(x))  # same seed, same weights: dropout holds none


# ----------------------------------------------------------------------------- flops


def _hook_flops(model: UNet, h: int, w: int) -> int:
    """Independent count from real layer shapes (forward hooks on the meta device)."""
    total = 0

    def hook(m: nn.Module, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        if isinstance(m, nn.ConvTranspose2d):
            total += 2 * inp[0].numel() * m.out_channels * k
        else:
            total += 2 * out.numel() * m.in_channels * k

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_hook(hook)
    model(torch.empty(1, model.cfg.in_channels, h, w, device="meta"))
    return total


def test_flops_hand_count_tiny() -> None:
    model = tiny("valid", base=2, depth=1, in_channels=1, num_classes=2)
    hand = (
        2 * 1 * 2 * 9 * 18 * 18  # enc conv 1->2, 20 -> 18
        + 2 * 2 * 2 * 9 * 16 * 16  # enc conv 2->2, 18 -> 16, pool -> 8
        + 2 * 2 * 4 * 9 * 6 * 6  # bottleneck conv 2->4, 8 -> 6
        + 2 * 4 * 4 * 9 * 4 * 4  # bottleneck conv 4->4, 6 -> 4
        + 2 * 4 * 2 * 4 * 4 * 4  # up-conv 4->2, 2x2 kernel on 4x4 input -> 8x8
        + 2 * 4 * 2 * 9 * 6 * 6  # dec conv (2 skip + 2 up)->2, 8 -> 6
        + 2 * 2 * 2 * 9 * 4 * 4  # dec conv 2->2, 6 -> 4
        + 2 * 2 * 2 * 1 * 4 * 4  # 1x1 head 2->2
    )
    assert hand == 47_376
    assert flops_per_forward(model, 20, 20) == hand
    # same mode, 16x16: convs keep size
    same = tiny("same", base=2, depth=1, in_channels=1, num_classes=2)
    hand_same = 2 * 9 * 16 * 16 * (1 * 2 + 2 * 2 + 4 * 2 + 2 * 2) + 2 * 9 * 8 * 8 * (2 * 4 + 4 * 4)
    hand_same += 2 * 4 * 2 * 4 * 8 * 8 + 2 * 16 * 16 * 2 * 2
    assert flops_per_forward(same, 16, 16) == hand_same
    with pytest.raises(ValueError):
        flops_per_forward(model, 21, 20)


def test_flops_matches_layer_shapes_paper_config() -> None:
    with torch.device("meta"):
        model = UNet(UNetConfig(in_channels=1, num_classes=2))
        same = UNet(UNetConfig(padding="same", depth=3, base_channels=8))
    assert flops_per_forward(model, 572, 572) == _hook_flops(model, 572, 572)
    assert flops_per_forward(model, 428, 284) == _hook_flops(model, 428, 284)
    assert flops_per_forward(same, 96, 240) == _hook_flops(same, 96, 240)


# ----------------------------------------------------------------------------- loss


def _nll_by_hand(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel -log softmax(logits)[target], written out with exp/log."""
    logits = logits.double()
    lse = logits.exp().sum(1).log()  # (N, H, W)
    picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    return lse - picked


def test_cross_entropy_matches_hand_computation() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 3, 5)
    target = torch.randint(0, 4, (2, 3, 5))
    expected = _nll_by_hand(logits, target).mean()
    assert cross_entropy(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    assert cross_entropy(logits, target.to(torch.uint8)).item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(cross_entropy(logits, target), F.cross_entropy(logits, target))


def test_class_weights_change_loss_as_expected() -> None:
    torch.manual_seed(2)
    logits = torch.randn(1, 4, 4, 4)
    target = torch.randint(0, 4, (1, 4, 4))
    w = torch.tensor([0.25, 2.0, 1.0, 0.75])
    nll = _nll_by_hand(logits, target)
    expected = (w.double()[target] * nll).sum() / w.double()[target].sum()
    got = cross_entropy(logits, target, class_weights=w)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # uniform weights are a no-op
    torch.testing.assert_close(cross_entropy(logits, target, class_weights=[3.0] * 4), cross_entropy(logits, target))
    # background predicted well, tumour class 1 badly: up-weighting class 1 raises the loss
    logits = torch.zeros(1, 4, 2, 2)
    logits[:, 0] = 5.0
    target = torch.tensor([[[0, 0], [0, 1]]])
    plain = cross_entropy(logits, target)
    weighted = cross_entropy(logits, target, class_weights=[1.0, 10.0, 1.0, 1.0])
    assert weighted > plain * 2
    with pytest.raises(ValueError):
        cross_entropy(logits, target, class_weights=[1.0, 2.0])


def test_cross_entropy_crops_target_valid_mode() -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 6, 6)
    target = torch.full((2, 10, 10), 99)  # out-of-range labels in the border ...
    inner = torch.randint(0, 4, (2, 6, 6))
    target[:, 2:8, 2:8] = inner  # ... must be cropped away
    torch.testing.assert_close(cross_entropy(logits, target), F.cross_entropy(logits, inner))
    with pytest.raises(ValueError):
        cross_entropy(logits, inner[:, :5, :5])
    # end to end with a valid-mode model: 188 input -> 4 output, target cropped to 4x4
    model = tiny("valid", base=2)
    x = torch.randn(1, 4, 188, 188)
    t = torch.randint(0, 4, (1, 188, 188))
    out = model(x)
    loss = CrossEntropy()(out, t)
    torch.testing.assert_close(loss, F.cross_entropy(out, t[:, 92:96, 92:96]))


def test_ignore_index_and_module_buffer() -> None:
    logits = torch.randn(1, 4, 2, 3)
    target = torch.tensor([[[0, 1, -100], [2, 3, -100]]])
    expected = _nll_by_hand(logits, target.clamp(min=0))[target != -100].mean()
    assert cross_entropy(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    crit = CrossEntropy(class_weights=[1.0, 2.0, 3.0, 4.0])
    assert "class_weights" in crit.state_dict()
    torch.testing.assert_close(crit(logits, target), cross_entropy(logits, target, torch.tensor([1.0, 2.0, 3.0, 4.0])))


def test_class_weights_from_counts() -> None:
    counts = [900.0, 25.0, 50.0, 25.0]
    w = class_weights_from_counts(counts, power=1.0)
    raw = torch.tensor([1000 / 900, 1000 / 25, 1000 / 50, 1000 / 25])
    torch.testing.assert_close(w, raw / raw.mean())
    w = class_weights_from_counts(torch.tensor(counts))  # power 0.5
    raw = raw.sqrt()
    torch.testing.assert_close(w, raw / raw.mean())
    assert w.dtype == torch.float32 and w.mean().item() == pytest.approx(1.0)
    assert w[0] < w[2] < w[1] == w[3]
    torch.testing.assert_close(class_weights_from_counts([5, 5, 5], power=0.5), torch.ones(3))
    z = class_weights_from_counts([100, 0, 1])  # absent class -> rarest present weight
    assert torch.isfinite(z).all() and z[1] == z[2]
    for bad in ([0, 0], [-1, 2], []):
        with pytest.raises(ValueError):
            class_weights_from_counts(bad)


def test_few_optimizer_steps_lower_loss() -> None:
    torch.manual_seed(4)
    model = tiny("same", base=4, depth=2).train()
    x = torch.randn(2, 4, 32, 32)
    target = (x[:, 0] > 0.5).long() + (x[:, 1] > 1.0).long()  # learnable from the input
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    crit = CrossEntropy(class_weights_from_counts(torch.bincount(target.flatten(), minlength=4)))
    losses = []
    for _ in range(25):
        loss = crit(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]


# ----------------------------------------------------------------------------- perf modes


@pytest.mark.parametrize("padding, size", [("same", 32), ("valid", 188)])
def test_channels_last_bf16_autocast_cpu(padding: str, size: int) -> None:
    model = tiny(padding, base=4).to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 4, size, size).to(memory_format=torch.channels_last)
    target = torch.randint(0, 4, (2, size, size))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        loss = cross_entropy(y, target)
    assert y.dtype == torch.bfloat16
    assert y.shape[:2] == (2, 4) and torch.isfinite(y.float()).all()
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        p = model.predict(x[..., :30, :30])
    assert p.shape == (2, 4, 30, 30) and torch.isfinite(p.float()).all()
