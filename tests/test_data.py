"""unet.data: slice dataset over the store, resumable sampler, augmentation, worker loader."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.store import SliceStore
from tests.conftest import child_env
from tests.helpers import alive
from unet.augment import N_PARAMS, AugmentConfig, apply_augment, augment_params
from unet.data import EpochSampler, SliceDataset, class_counts, index_slices, make_loader, with_context


@pytest.fixture(scope="module")
def train_cases(small_store) -> list[str]:
    return SliceStore(small_store).split["train"]


def test_index_skips_slices_without_brain(small_store, train_cases):
    store = SliceStore(small_store)
    refs = index_slices(store, train_cases)
    all_refs = index_slices(store, train_cases, skip_empty=False)
    brain = sum(sum(1 for n in store.attrs(c)["slice_brain"] if n) for c in train_cases)
    assert len(all_refs) == sum(store.image(c).shape[0] for c in train_cases)
    assert len(refs) == brain < len(all_refs)
    ds = SliceDataset(small_store, train_cases)
    assert len(ds) == brain
    for i in range(0, len(ds), 7):
        image, _, _ = ds[i]
        assert image.abs().sum() > 0  # every indexed slice has brain
    assert any(r.tumour > 0 for r in refs) and any(r.tumour == 0 for r in refs)


def test_items_are_the_store_slices(small_store, train_cases):
    store = SliceStore(small_store)
    ds = SliceDataset(small_store, train_cases)
    i = max(range(len(ds)), key=lambda k: ds.refs[k].tumour)
    image, label, _ = ds[i]
    ref = ds.refs[i]
    assert image.shape == (4, 64, 64) and image.dtype == torch.float16
    assert label.shape == (64, 64) and label.dtype == torch.uint8
    np.testing.assert_array_equal(image.numpy(), store.image(ref.case)[ref.z])
    np.testing.assert_array_equal(label.numpy(), store.label(ref.case)[ref.z])
    assert int((label > 0).sum()) == ref.tumour > 0
    counts = class_counts(store, ds.refs)
    assert counts.sum() == len(ds) * 64 * 64 and (counts[1:] > 0).all()


def test_augmentation_is_a_function_of_the_key(small_store, train_cases):
    ds = SliceDataset(small_store, train_cases, augment=AugmentConfig(), seed=3)
    i = max(range(len(ds)), key=lambda k: ds.refs[k].tumour)
    image, label, p1 = ds[(i, 2, 5)]
    _, _, p2 = ds[(i, 2, 5)]
    _, _, other = ds[(i, 2, 6)]
    plain_image, plain_label, identity = ds[i]  # an int key: no augmentation
    assert torch.equal(image, plain_image) and torch.equal(label, plain_label)  # workers only read
    assert torch.equal(p1, p2) and not torch.equal(p1, other)
    assert torch.equal(identity, torch.from_numpy(augment_params(None, None)))
    plain = SliceDataset(small_store, train_cases, augment=None, seed=3)  # no augmentation: a seed per sample still
    seeds = {float(plain[(i, 2, k)][2][4]) for k in range(8)}  # (the patch a crop cuts is drawn from it)
    assert len(seeds) == 8 and torch.equal(plain[(i, 2, 5)][2], plain[(i, 2, 5)][2])
    x, y = apply_augment(image[None].float(), label[None], p1[None])
    assert x.shape == (1, 4, 64, 64) and y.dtype == torch.uint8 and not torch.equal(x[0], image.float())
    assert set(y.unique().tolist()) <= set(label.unique().tolist())
    tumour = int((label > 0).sum())
    assert abs(int((y > 0).sum()) - tumour) < 0.2 * tumour  # a small rotation keeps the tumour size
    x, y = apply_augment(image[None].float(), label[None], identity[None])
    assert torch.allclose(x[0], image.float(), rtol=1e-4, atol=1e-4) and torch.equal(y[0], label)


def test_sampler_order_depends_on_seed_and_epoch_only_and_resumes():
    tumour = [i % 5 == 0 for i in range(40)]
    a, b = EpochSampler(tumour, seed=1), EpochSampler(tumour, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    full = list(a)
    assert full == list(b) and sorted(i for i, _, _ in full) == list(range(40))
    assert [k[1] for k in full] == [3] * 40 and [k[2] for k in full] == list(range(40))
    b.set_epoch(4)
    assert [i for i, _, _ in b] != [i for i, _, _ in full]
    a.set_epoch(3, start=16)  # resume after two batches of 8
    assert list(a) == full[16:] and len(a) == 24
    capped = EpochSampler(tumour, seed=1, num_samples=10)
    assert len(list(capped)) == 10


def test_oversampling_draws_more_tumour_slices():
    tumour = [i % 5 == 0 for i in range(200)]  # 20 % tumour slices
    plain = EpochSampler(tumour, seed=0)
    over = EpochSampler(tumour, seed=0, oversample_tumour=4.0)  # expect 4*.2/(4*.2+.8) = 50 %
    share = lambda s: np.mean([tumour[i] for i, _, _ in s])  # noqa: E731
    assert share(plain) == pytest.approx(0.2)
    assert 0.4 < share(over) < 0.6


def test_worker_processes_deliver_the_same_batches(small_store, train_cases):
    ds = SliceDataset(small_store, train_cases, augment=AugmentConfig(), seed=5)
    ds[0]  # opens the store here; workers must open their own
    assert pickle.loads(pickle.dumps(ds))._store is None
    sampler = EpochSampler([r.tumour > 0 for r in ds.refs], seed=5, num_samples=24)
    sampler.set_epoch(1)
    local = list(make_loader(ds, 8, sampler=sampler, workers=0))
    loader = make_loader(ds, 8, sampler=sampler, workers=2)
    remote = list(loader)
    del loader
    assert len(local) == len(remote) == 3
    for (x0, y0, p0), (x1, y1, p1) in zip(local, remote):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(p0, p1)
    assert x0.dtype == torch.float16 and y0.dtype == torch.uint8 and p0.shape == (len(x0), N_PARAMS)


PID_SCRIPT = """
import os, sys, time
from torch.utils.data import Dataset
from unet.data import make_loader

class Pid(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return os.getpid()

if __name__ == "__main__":
    loader = make_loader(Pid(), 1, workers=2)
    print(*sorted({int(p) for p in loader}), flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_leave_when_the_trainer_is_killed(tmp_path):
    script = tmp_path / "pids.py"
    script.write_text(PID_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env=child_env(root),
    )
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(alive(p) for p in workers)
    finally:
        proc.kill()  # kill -9: no clean shutdown of the loader
        proc.wait()
    deadline = time.monotonic() + 20
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in workers)


def test_with_context_stacks_the_neighbours_in_order_and_repeats_the_ends():
    slices = np.arange(5)[:, None, None, None] * np.ones((5, 4, 2, 3))  # slice z holds the value z
    one = with_context(slices, 0, 1)
    assert one.shape == (12, 2, 3) and [one[c * 4, 0, 0] for c in range(3)] == [0, 0, 1]  # z - 1 repeats z = 0
    many = with_context(slices, np.array([1, 4]), 2)
    assert many.shape == (2, 20, 2, 3)
    assert [many[0, c * 4, 0, 0] for c in range(5)] == [0, 0, 1, 2, 3]
    assert [many[1, c * 4, 0, 0] for c in range(5)] == [2, 3, 4, 4, 4]
    np.testing.assert_array_equal(with_context(slices, np.array([2]), 0), slices[[2]])


def test_a_25d_sample_is_its_slice_and_its_neighbours(small_store, train_cases):
    flat = SliceDataset(small_store, train_cases)
    deep = SliceDataset(small_store, train_cases, context=1)
    i = max(range(len(flat)), key=lambda k: flat.refs[k].tumour)
    ref = flat.refs[i]
    image, label, _ = deep[i]
    assert image.shape[0] == 12 and torch.equal(label, flat[i][1])
    stored = SliceStore(small_store).image(ref.case)
    for c, dz in enumerate((-1, 0, 1)):
        np.testing.assert_array_equal(image[4 * c : 4 * c + 4].numpy(), stored[ref.z + dz])
