"""unet.train: the loop learns, validates, checkpoints, and resumes exactly after a kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.registry import Registry
from storage.store import SliceStore
from tests.conftest import child_env
from unet.checkpoint import RegistryCheckpoint, rng_state, set_rng_state
from unet.config import TrainConfig
from unet.data import SliceDataset, make_loader
from unet.device import autocast_dtype, cpu_has_bf16, pick_device
from unet.geometry import Geometry, to_labels
from unet.loss import CrossEntropy, SegLoss
from unet.metrics import evaluate_case
from unet.model import UNet, UNetConfig
from unet.predict import predict_volume
from unet.step import Optimization, crop, train_step
from unet.train import Callbacks, fit
from unet.validate import validate

ROOT = Path(__file__).resolve().parents[1]
TINY = UNetConfig(base_channels=4, depth=2, padding="same")
SHORT = TrainConfig(
    epochs=2, batch_size=4, lr=3e-3, max_steps_per_epoch=6, workers=0, checkpoint_every=2, class_weight_power=0.5
)


pytestmark = pytest.mark.usefixtures("one_thread")


def weights_close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float().cpu(), b[k].float().cpu(), atol=1e-5) for k in a)


def test_device_and_precision_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_device().type in ("cuda", "mps", "cpu")
    # bf16 on a CPU only where it is native (AVX512-BF16/AMX: about 2x the fp32 step), else fp32
    assert autocast_dtype(torch.device("cpu")) is (torch.bfloat16 if cpu_has_bf16() else None)
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), "fp32") is None
    with pytest.raises(ValueError):
        autocast_dtype(torch.device("cpu"), "fp8")


def test_a_device_that_is_not_there_is_refused_at_once():
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 where there is none)
    with pytest.raises(ValueError, match=missing):
        pick_device(missing)
    with pytest.raises(ValueError, match="not a torch device"):
        pick_device("tpu")


def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3))
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_a_few_steps_lower_the_loss(small_store):
    ds = SliceDataset(small_store, SliceStore(small_store).split["train"])
    tumour = sorted(range(len(ds)), key=lambda i: -ds.refs[i].tumour)[:8]
    x, y, _ = next(iter(make_loader(torch.utils.data.Subset(ds, tumour), 8)))
    x = x.float()
    torch.manual_seed(0)
    model = UNet(TINY)
    loss_fn = CrossEntropy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = Optimization(model, loss_fn, opt, sched, scaler, None, 1.0)
    losses = [train_step(step, x, y).item() for _ in range(20)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("steps", [1, 4, 5, 20])
def test_any_number_of_steps_trains(small_store, steps):
    """The one-cycle schedule takes any run length (20 steps at a 5 % warm-up is one warm-up step,
    which ``torch.optim.lr_scheduler.OneCycleLR`` alone divides by zero on)."""
    cfg = TrainConfig(epochs=steps, batch_size=4, max_steps_per_epoch=1, workers=0, checkpoint_every=0, warmup=0.05)
    result = fit(small_store, TINY, cfg)
    assert result.history[-1]["steps"] == steps


def test_a_long_warm_up_is_kept_as_asked(small_store):
    """The short-run guard only lengthens a warm-up: 80 % of 20 steps peaks near step 16, not at half."""
    cfg = TrainConfig(epochs=20, batch_size=4, max_steps_per_epoch=1, workers=0, checkpoint_every=0, warmup=0.8)
    lrs = [r["lr"] for r in fit(small_store, TINY, cfg).history]  # after each step
    assert 13 <= max(range(len(lrs)), key=lrs.__getitem__) <= 16


def _segment_and_score(model, store: SliceStore, case: str) -> float:
    """A stored case segmented whole (``predict_volume``, on its own grid): its WT Dice against the
    stored labels restored to that grid."""
    attrs = store.attrs(case)
    seg = predict_volume(model.eval(), store.image(case), attrs["geometry"], attrs["slice_brain"], batch_size=16)
    geometry = Geometry.from_dict(attrs["geometry"])
    one_hot = np.eye(4, dtype=np.float32)[np.asarray(store.label(case)[:])].transpose(0, 3, 1, 2)
    truth = to_labels(geometry, geometry.restore(one_hot))
    assert set(np.unique(seg)) <= {0, 1, 2, 4} and seg.shape == truth.shape
    return evaluate_case(seg, truth)["dice_WT"]


@pytest.mark.parametrize(
    "norm, augment", [(None, "light"), ("ibn", "light"), (None, "gin"), (None, "drop"), (None, "drop-but-t1ce")]
)
def test_short_training_reaches_a_wt_dice_an_untrained_net_cannot(small_store, norm, augment):
    """The paper's network (no norm), with IBN (``unet/norm.py``), whose instance half keeps no
    running statistics, trained on GIN's random contrasts and with modalities dropped
    (``unet/augment.py``): each learns, and segmenting the validation cases whole in eval mode
    gives what validation scored."""
    model_cfg = UNetConfig(base_channels=8, depth=3, padding="same", norm=norm)
    cfg = TrainConfig(
        epochs=12,
        batch_size=8,
        lr=3e-3,
        class_weight_power=0.5,
        oversample_tumour=2.0,
        augment=augment,
        workers=0,
        checkpoint_every=0,
    )
    torch.manual_seed(cfg.seed)
    untrained = UNet(model_cfg)
    store = SliceStore(small_store)
    before = validate(untrained, store, store.split["val"], CrossEntropy(), torch.device("cpu"), None, False, 16)
    result = fit(small_store, model_cfg, cfg)
    assert len(result.history) == 12 and result.resumed_from is None
    assert before["dice_WT"] < 0.15
    assert result.best["dice_WT"] > 0.4
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]
    assert result.best["dice_mean"] == max(r["dice_mean"] for r in result.history)
    dice = [_segment_and_score(result.model, store, case) for case in store.split["val"]]
    assert np.mean(dice) == pytest.approx(result.history[-1]["dice_WT"], abs=0.05)  # what validation saw


def test_region_outputs_learn_and_segment_a_whole_case(small_store):
    """nnU-Net's BraTS variant end to end: sigmoid outputs per region, BCE + soft Dice; it learns
    what an untrained net cannot, and a whole case segmented through ``predict_volume`` (painted
    WT -> TC -> ET) has a whole tumour near its truth."""
    model_cfg = UNetConfig(base_channels=8, depth=3, padding="same", outputs="regions")
    cfg = TrainConfig(
        epochs=30, batch_size=8, lr=1e-2, loss="ce+dice", oversample_tumour=3.0, workers=0, checkpoint_every=0
    )
    torch.manual_seed(cfg.seed)
    store = SliceStore(small_store)
    loss_fn = SegLoss(dice=True, outputs="regions")
    before = validate(UNet(model_cfg), store, store.split["val"], loss_fn, torch.device("cpu"), None, False, 16)
    result = fit(small_store, model_cfg, cfg)
    assert before["dice_WT"] < 0.15 and result.best["dice_WT"] > 0.5
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]
    assert _segment_and_score(result.model, store, store.split["val"][0]) > 0.5  # painted WT -> TC -> ET


def test_patches_are_cut_where_the_tumour_is_and_again_the_same_on_resume():
    """``unet.step.crop``: each slice's patch of the image and of its (finer) labels cover the same
    place; a slice with tumour is mostly cut around it; the same seeds cut the same patches."""
    x = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 1, 64, 64).repeat(40, 2, 1, 1)
    y = torch.zeros((40, 128, 128), dtype=torch.uint8)
    y[:20, 100:110, 10:20] = 2  # tumour in the lower left of half the slices (label grid 2x finer)
    params = torch.zeros((40, 8))
    params[:, 4] = torch.arange(40) * 7919
    cx, cy = crop(x, y, params, 32)
    assert cx.shape == (40, 2, 32, 32) and cy.shape == (40, 64, 64)
    rows, cols = cx[:, 0, 0, 0].long() // 64, cx[:, 0, 0, 0].long() % 64  # each patch's corner
    assert torch.equal(cx[:, 0], x[0, 0][None, :32, :32] + (rows * 64 + cols)[:, None, None])
    for i in range(40):
        assert torch.equal(cy[i], y[i, 2 * rows[i] : 2 * rows[i] + 64, 2 * cols[i] : 2 * cols[i] + 64])
    with_tumour = [(cy[i] > 0).any().item() for i in range(20)]
    assert sum(with_tumour) >= 10  # about 2/3 centred on it, some of the rest find it too
    assert not (cy[20:] > 0).any()
    again = crop(x, y, params, 32)
    assert torch.equal(again[0], cx) and torch.equal(again[1], cy)
    assert crop(x, y, params, 64)[0] is x  # a slice no larger than the patch stays whole


def test_trained_on_patches_a_model_segments_whole_slices(small_store):
    """``patch``: trained on 32x32 crops of the 64x64 slices, it learns what an untrained net cannot,
    and segments a whole case (whole slices) near its truth."""
    model_cfg = UNetConfig(base_channels=8, depth=3, padding="same")
    cfg = TrainConfig(
        epochs=30,
        batch_size=8,
        lr=1e-2,
        loss="ce+dice",
        oversample_tumour=3.0,
        workers=0,
        checkpoint_every=0,
        patch=32,
        augment="light",
    )
    torch.manual_seed(cfg.seed)
    store = SliceStore(small_store)
    before = validate(
        UNet(model_cfg), store, store.split["val"], SegLoss(dice=True), torch.device("cpu"), None, False, 16
    )
    result = fit(small_store, model_cfg, cfg)
    assert before["dice_WT"] < 0.15 and result.best["dice_WT"] > 0.5
    assert _segment_and_score(result.model, store, store.split["val"][0]) > 0.5


def test_checkpoint_every_n_steps_and_every_epoch(small_store, tmp_path):
    registry = Registry(str(tmp_path / "models"))
    version = registry.create({"status": "training"})
    seen = []

    class Record(Callbacks):
        def on_checkpoint(self, epoch, step):
            seen.append((epoch, step))

    result = fit(small_store, TINY, SHORT, RegistryCheckpoint(registry, version), Record())
    # 6 steps per epoch, every 2 steps (not at an epoch's last step: the epoch end saves it)
    assert seen == [(0, 2), (0, 4), (1, 0), (1, 2), (1, 4), (2, 0)]
    state = RegistryCheckpoint(registry, version).load()
    assert (state["epoch"], state["step"], state["global_step"]) == (2, 0, 12)
    assert weights_close(state["model"], result.model.state_dict())
    assert [r["epoch"] for r in state["history"]] == [1, 2]
    # a finished run called again resumes at its end: no step taken, same result; a checkpoint's plan
    # and network from before a field was added read as that field's default
    state["plan"].pop("average")
    state["model_config"].pop("dropout")
    RegistryCheckpoint(registry, version).save(state)
    again = fit(small_store, TINY, SHORT, RegistryCheckpoint(registry, version))
    assert again.resumed_from == (2, 0) and again.history == result.history
    assert weights_close(again.model.state_dict(), result.model.state_dict())
    with pytest.raises(ValueError, match="another model or training config"):
        fit(small_store, TINY, TrainConfig(**{**SHORT.__dict__, "lr": 1e-2}), RegistryCheckpoint(registry, version))


KILLED_RUN = """
import sys, time, torch
torch.set_num_threads(1)
from storage.registry import Registry
from unet.checkpoint import RegistryCheckpoint
from unet.model import UNetConfig
from unet.config import TrainConfig
from unet.train import Callbacks, fit

class Slow(Callbacks):  # slow the run down so the test can kill it mid-epoch
    def on_step(self, epoch, step, global_step):
        time.sleep(0.4)

store, root, version = sys.argv[1:4]
fit(store, UNetConfig(**{model}), TrainConfig(**{cfg}), RegistryCheckpoint(Registry(root), version), Slow())
"""


def test_killed_run_resumes_where_it_was_and_ends_like_an_uninterrupted_one(small_store, tmp_path):
    registry = Registry(str(tmp_path / "models"))
    version = registry.create({"status": "training"})
    ckpt = RegistryCheckpoint(registry, version)
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(KILLED_RUN).replace("{model}", repr(TINY.__dict__)).replace("{cfg}", repr(SHORT.__dict__))
    )
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), small_store, registry.root, version], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            state = ckpt.load() if registry.exists(version, "checkpoint.pt") else None
            if state is not None and state["global_step"] >= 4:  # epoch 0 step 4 or later: mid-run
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = ckpt.load()
    assert killed_at["global_step"] < 12  # killed before the end

    resumed = fit(small_store, TINY, SHORT, ckpt)
    assert resumed.resumed_from == (killed_at["epoch"], killed_at["step"]) != (0, 0)
    assert [r["epoch"] for r in resumed.history] == [1, 2] and resumed.history[-1]["steps"] == 12

    straight = fit(small_store, TINY, SHORT)  # the same run, never interrupted
    assert weights_close(resumed.model.state_dict(), straight.model.state_dict())
    for a, b in zip(resumed.history, straight.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["dice_WT"] == pytest.approx(b["dice_WT"], abs=1e-4)


def test_the_weights_moving_average_is_what_is_validated_kept_and_resumed(small_store, tmp_path):
    cfg = SHORT.model_copy(update={"average": 0.8, "keep": "last"})
    registry = Registry(str(tmp_path / "models"))
    first = RegistryCheckpoint(registry, registry.create({"status": "training"}))
    straight = fit(small_store, TINY, cfg, first)
    state = first.load()
    # the checkpoint keeps the average beside the step's own weights, which it is not
    assert int(state["average"]["n_averaged"]) == 12
    averaged = {k.removeprefix("module."): v for k, v in state["average"].items() if k != "n_averaged"}
    assert weights_close(averaged, straight.model.state_dict()) and weights_close(averaged, straight.best_state)
    assert not weights_close(state["model"], averaged)
    # the history's validation scored the average: the same Dice again from the weights kept
    store = SliceStore(small_store)
    again = validate(straight.model, store, store.split["val"], SegLoss(dice=True), torch.device("cpu"), None, False, 4)
    assert again["dice_WT"] == pytest.approx(straight.history[-1]["dice_WT"], abs=1e-4)

    class Stop(Callbacks):  # a run that fails after its checkpoint at step 8 (epoch 1, step 2)
        def on_step(self, epoch, step, global_step):
            if global_step == 9:
                raise RuntimeError("stopped")

    version = registry.create({"status": "training"})
    with pytest.raises(RuntimeError, match="stopped"):
        fit(small_store, TINY, cfg, RegistryCheckpoint(registry, version), Stop())
    ckpt = RegistryCheckpoint(registry, version)
    stopped = ckpt.load()
    assert stopped["global_step"] == 8 and int(stopped["average"]["n_averaged"]) == 8
    resumed = fit(small_store, TINY, cfg, ckpt)
    assert resumed.resumed_from == (1, 2)
    assert weights_close(resumed.model.state_dict(), straight.model.state_dict())
