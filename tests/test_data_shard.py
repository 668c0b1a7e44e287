"""storage.shards.ShardSlices: the loader's direct shard reads return exactly what zarr reads, or defer to zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import ZstdCodec

from storage.shards import COMPRESSOR, ShardSlices, slice_reader
from storage.store import SliceStore
from unet.augment import AugmentConfig
from unet.data import EpochSampler, SliceDataset, make_loader


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaN and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def real_store(real_case, tmp_path_factory) -> str:
    """The committed real case at the full profile (240 x 240 slices, float16), as the ingest writes it."""
    from storage.cases import case_files
    from tasks.ingest import ingest_case

    url = str(tmp_path_factory.mktemp("real") / "slices.zarr")
    store = SliceStore(url, mode="a")
    store.claim_profile("full")
    ingest_case.fn(case_files(real_case), url, "full")
    store.publish(split={"train": store.case_ids(), "val": [], "test": []})
    return url


def _random_case(rng: np.random.Generator, z: int = 12, side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    image = rng.normal(size=(z, 4, side, side)).astype(np.float16)
    image[:, :, :4] = 0  # background, as around a brain
    image[0] = 0  # a slice without brain
    image[1, 0, 5, 5], image[1, 1, 5, 6] = np.float16("nan"), np.float16("-0.0")
    label = rng.integers(0, 4, size=(z, side, side), dtype=np.uint8)
    return image, label


@pytest.mark.parametrize("which", ["small", "real"])
def test_every_slice_is_bit_identical_to_zarr(which, small_store, request):
    url = small_store if which == "small" else request.getfixturevalue("real_store")
    store = SliceStore(url)
    cases = store.case_ids()
    assert cases
    for case in cases:
        for array in (store.image(case), store.label(case)):
            reader = ShardSlices.for_array(array)
            assert reader is not None, f"{array.path}: the store's layout should be read directly"
            for z in range(array.shape[0]):  # every slice, with brain or not, both arrays
                assert _same(reader[z], array[z]), (case, array.path, z)
            with pytest.raises(IndexError):
                reader[array.shape[0]]


def test_dataset_items_and_batches_match_the_zarr_path(real_store, small_store):
    for url in (small_store, real_store):
        cases = SliceStore(url).case_ids()
        fast = SliceDataset(url, cases, augment=AugmentConfig(), seed=4)
        slow = SliceDataset(url, cases, augment=AugmentConfig(), seed=4, direct=False)
        assert isinstance(fast._case(cases[0])[0], ShardSlices) and isinstance(slow._case(cases[0])[0], zarr.Array)
        keys = [(i, 1, p) for p, i in enumerate(range(0, len(fast), max(1, len(fast) // 23)))] + [0, len(fast) - 1]
        for key in keys:
            for a, b in zip(fast[key], slow[key]):
                assert a.dtype == b.dtype and _same(a.numpy(), b.numpy()), key
    # a whole epoch through worker processes: the same batches as zarr read in this process
    cases = SliceStore(small_store).split["train"]
    fast = SliceDataset(small_store, cases, augment=AugmentConfig(), seed=4)
    slow = SliceDataset(small_store, cases, augment=AugmentConfig(), seed=4, direct=False)
    sampler = EpochSampler([r.tumour > 0 for r in fast.refs], seed=4, num_samples=40)
    sampler.set_epoch(2, start=8)  # resumed after one batch of 8
    loader = make_loader(fast, 8, sampler=sampler, workers=2)
    remote = list(loader)
    del loader
    local = list(make_loader(slow, 8, sampler=sampler, workers=0))
    assert len(remote) == len(local) == 4
    for batch_a, batch_b in zip(remote, local):
        assert all(torch.equal(a, b) for a, b in zip(batch_a, batch_b))


def test_a_rewritten_case_is_read_anew(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = SliceStore(url, mode="a")
    rng = np.random.default_rng(0)
    image, label = _random_case(rng)
    store.write_case("c1", image, label, {"slice_brain": [1] * 12, "slice_tumour": [1] * 12})
    reader = slice_reader(store.image("c1"))
    assert isinstance(reader, ShardSlices)
    assert _same(reader[1], image[1]) and _same(reader[0], image[0])
    image2, label2 = _random_case(rng)
    store.write_case("c1", image2, label2, {"slice_brain": [1] * 12, "slice_tumour": [1] * 12})
    assert _same(reader[1], image2[1]) and _same(reader[1], SliceStore(url).image("c1")[1])
    # a shard whose index fails its checksum is refused, as zarr refuses it
    path = Path(url) / "cases" / "c1" / "image" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        reader[3]
    # a deleted case reads as zarr reads it
    store.delete_case("c1")
    assert _same(reader[2], store_image := reader.array[2]) and not store_image.any()


def test_chunks_never_written_read_as_fill_value(tmp_path):
    """An index entry of (2^64-1, 2^64-1): what zarr writes for an empty chunk when asked to skip them."""
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    data = np.zeros((6, 4, 16, 16), np.float16)
    data[2] = 1.5
    arr = root.create_array(
        "image", data=data, chunks=(1, 4, 16, 16), shards=(6, 4, 16, 16), compressors=COMPRESSOR, fill_value=0.25
    )
    arr[4] = np.float16(0.25)  # all fill value: not written
    arr = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["image"]
    reader = ShardSlices.for_array(arr)
    assert reader is not None
    for z in range(6):
        assert _same(reader[z], arr[z]), z
    assert (reader[4] == np.float16(0.25)).all()


def test_layouts_it_does_not_know_are_left_to_zarr(tmp_path):
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    data = np.random.default_rng(1).normal(size=(6, 4, 8, 8)).astype(np.float16)
    other = {
        "two_slice_chunks": {"chunks": (2, 4, 8, 8), "shards": (6, 4, 8, 8), "compressors": COMPRESSOR},
        "two_shards": {"chunks": (1, 4, 8, 8), "shards": (3, 4, 8, 8), "compressors": COMPRESSOR},
        "zstd": {"chunks": (1, 4, 8, 8), "shards": (6, 4, 8, 8), "compressors": ZstdCodec()},
        "unsharded": {"chunks": (1, 4, 8, 8), "compressors": COMPRESSOR},
    }
    for name, kw in other.items():
        root.create_array(name, data=data, **kw)
        arr = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")[name]
        assert ShardSlices.for_array(arr) is None, name
        assert slice_reader(arr) is arr
    # not a local path: an fsspec memory store
    mem = zarr.open_group("memory://shard-test", mode="w", zarr_format=3)
    mem.create_array("image", data=data, chunks=(1, 4, 8, 8), shards=(6, 4, 8, 8), compressors=COMPRESSOR)
    assert ShardSlices.for_array(mem["image"]) is None
    # the same layout as the store's, but never written: zarr reads its fill values
    root.create_array("empty", shape=(6, 4, 8, 8), dtype="float16", chunks=(1, 4, 8, 8), shards=(6, 4, 8, 8))
    assert ShardSlices.for_array(root["empty"]) is None
    assert slice_reader(None) is None


def test_a_store_it_cannot_read_directly_still_trains(tmp_path, monkeypatch):
    """SliceDataset over a store ShardSlices declines reads through zarr, with the same items."""
    url = str(tmp_path / "s.zarr")
    store = SliceStore(url, mode="a")
    image, label = _random_case(np.random.default_rng(2))
    store.write_case("c1", image, label, {"slice_brain": [0] + [1] * 11, "slice_tumour": [0] + [1] * 11})
    monkeypatch.setattr(ShardSlices, "for_array", classmethod(lambda cls, array: None))
    ds = SliceDataset(url, ["c1"])
    assert isinstance(ds._case("c1")[0], zarr.Array) and len(ds) == 11
    x, y, _ = ds[0]
    assert _same(x.numpy(), image[1]) and _same(y.numpy(), label[1])
