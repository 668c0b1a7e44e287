"""unet.data: slice dataset over the store, resumable sampler, augmentation, worker loader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from storage.store import SliceStore
from unet.data import AugmentConfig, EpochSampler, SliceDataset, augment, class_counts, index_slices, make_loader


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
        image, _ = ds[i]
        assert image.abs().sum() > 0  # every indexed slice has brain
    assert any(r.tumour > 0 for r in refs) and any(r.tumour == 0 for r in refs)


def test_items_are_the_store_slices(small_store, train_cases):
    store = SliceStore(small_store)
    ds = SliceDataset(small_store, train_cases)
    i = max(range(len(ds)), key=lambda k: ds.refs[k].tumour)
    image, label = ds[i]
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
    a1, l1 = ds[(i, 2, 5)]
    a2, l2 = ds[(i, 2, 5)]
    b, _ = ds[(i, 2, 6)]
    plain, plain_label = ds[i]  # an int key: no augmentation
    assert torch.equal(a1, a2) and torch.equal(l1, l2)
    assert not torch.equal(a1, b) and not torch.equal(a1, plain)
    assert a1.dtype == plain.dtype and a1.shape == plain.shape
    assert set(np.unique(l1.numpy())) <= set(np.unique(plain_label.numpy()))
    tumour = int((plain_label > 0).sum())
    assert abs(int((l1 > 0).sum()) - tumour) < 0.2 * tumour  # a small rotation keeps the tumour size


def test_augment_flip_and_jitter_keep_background_zero():
    rng = np.random.default_rng(0)
    image = np.zeros((4, 16, 16), np.float32)
    image[:, 4:10, 2:8] = rng.normal(size=(4, 6, 6))
    label = np.zeros((16, 16), np.uint8)
    label[5:7, 3:5] = 2
    flip = AugmentConfig(flip_lr=1.0, rotate_degrees=0.0, intensity_scale=0.0, intensity_shift=0.0)
    out, out_label = augment(image, label, flip, rng)
    np.testing.assert_array_equal(out, image[..., ::-1])
    np.testing.assert_array_equal(out_label, label[..., ::-1])
    jitter = AugmentConfig(flip_lr=0.0, rotate_degrees=0.0, intensity_scale=0.2, intensity_shift=0.5)
    out, _ = augment(image, label, jitter, rng)
    assert (out[:, image.any(0) == 0] == 0).all()
    assert not np.allclose(out, image)


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
    for (x0, y0), (x1, y1) in zip(local, remote):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
