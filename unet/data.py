"""Training data: 2D slices of the slice store as a torch ``Dataset``, a resumable sampler, a loader.

* ``SliceDataset``: random access to the slices of some cases (one Zarr chunk per sample: the
  whole ``(1, 4, H, W)`` image chunk and the ``(1, H, W)`` label chunk). Slices without brain are
  skipped by default, using the per-slice counts the store keeps in its case attributes, so
  indexing reads no pixels. The store is opened lazily in each process that reads it (a
  ``DataLoader`` worker gets the URL, never an open handle). On a local store the chunks are read
  by ``storage.shards.ShardSlices`` (a ``pread`` and a blosc decode each, bit-identical to zarr, 15-25x faster
  than a zarr read per chunk); anything it does not understand is read through zarr.
* ``EpochSampler``: the order of an epoch is a function of ``(seed, epoch)`` only, optionally
  oversampling slices with tumour; it yields keys ``(index, epoch, position)``, and a sample's
  augmentation draws from ``default_rng([seed, epoch, position])``. So resuming at batch ``s`` of
  epoch ``e`` (``set_epoch(e, start=s * batch)``) replays exactly the batches a run that never
  stopped would have seen.
* 2.5D (``context`` k > 0): a sample is its slice and the k slices either side, every modality of
  each, as 4 (2k + 1) channels (``with_context``: neighbours past the volume's ends repeat its
  first or last slice); the same assembly serves prediction (``unet.predict``).
* Augmentation (``unet.augment``): workers only draw its parameters; ``apply_augment`` runs on
  the device, a batch at a time, so the CPU side is reading and decompressing chunks, nothing else.
* Labels may lie on a finer grid than the images (the ``tp`` profile keeps them at 1 mm):
  ``class_counts`` counts them where they are.
* ``make_loader``: worker processes (forkserver: safe beside Prefect's threads; they exit when the
  trainer dies, even by kill -9), pinned memory for CUDA, a deep prefetch queue; images travel in
  the store's dtype (float16: half the bytes) and labels as uint8; the image becomes float32 on
  the device.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass

import numcodecs.blosc
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from storage.shards import slice_reader
from storage.store import SliceStore
from unet.augment import AugmentConfig, augment_params
from unet.device import cores


@dataclass(frozen=True)
class SliceRef:
    case: str
    z: int
    tumour: int  # tumour voxels on the slice (0 when unlabeled)


def index_slices(store: SliceStore, cases: list[str], skip_empty: bool = True) -> list[SliceRef]:
    """Every slice of ``cases`` (those with brain only, by default), from the case attributes.

    Every case must be labelled: a scan without segmentation would teach "all background"."""
    refs = []
    for case in cases:
        a = store.attrs(case)
        tumour = a.get("slice_tumour")
        if tumour is None:
            raise ValueError(
                f"{store.url}: case {case} has no segmentation; unlabelled scans cannot be trained or validated on"
            )
        for z, (brain, t) in enumerate(zip(a["slice_brain"], tumour)):
            if brain or not skip_empty:
                refs.append(SliceRef(case, z, int(t)))
    return refs


def class_counts(store: SliceStore, refs: list[SliceRef]) -> np.ndarray:
    """Pixels per class 0..3 over the indexed slices, on the labels' own grid (what the loss sees;
    for ``unet.loss.class_weights_from_counts``). Slices left out hold no tumour (no brain), so the
    tumour classes are the cases' whole counts and background is what remains of the slices."""
    counts = np.zeros(4, dtype=np.float64)
    if not refs:
        return counts
    h, w = store.label(refs[0].case).shape[-2:]
    for case in sorted({r.case for r in refs}):
        counts[1:] += store.attrs(case)["class_voxels"][1:]
    counts[0] = len(refs) * h * w - counts[1:].sum()
    return counts


def with_context(slices, z: int | np.ndarray, k: int) -> np.ndarray:
    """Slice(s) ``z`` of ``slices`` ((Z, C, H, W): numpy, zarr, ``ShardSlices``) with their ``k``
    neighbours either side, every modality of each, as channels: (C (2k + 1), H, W) in the order
    z - k, ..., z + k, a neighbour past the volume's ends repeating its first or last slice. ``z`` an
    array: (N, C (2k + 1), H, W), read as one contiguous block."""
    depth = slices.shape[0]
    if np.ndim(z) == 0:
        if k == 0:
            return np.asarray(slices[int(z)])
        return np.concatenate(
            [np.asarray(slices[int(i)]) for i in np.clip(int(z) + np.arange(-k, k + 1), 0, depth - 1)]
        )
    zs = np.clip(np.asarray(z)[:, None] + np.arange(-k, k + 1), 0, depth - 1)  # (N, 2k + 1)
    lo, hi = int(zs.min()), int(zs.max()) + 1
    gathered = np.asarray(slices[lo:hi])[zs - lo]  # (N, 2k + 1, C, H, W)
    return gathered.reshape(gathered.shape[0], -1, *gathered.shape[-2:])


# ----------------------------------------------------------------------------- dataset


class SliceDataset(Dataset):
    """Slices of ``cases`` as ``(image (C, H, W) store dtype, label (H, W) uint8, params)`` tensors.

    Items are addressed by an int (identity params) or by a sampler key ``(index, epoch, position)``
    (random params when ``augment`` is set, drawn from ``default_rng([seed, epoch, position])``).
    """

    def __init__(
        self,
        store_url: str,
        cases: list[str],
        *,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        skip_empty: bool = True,
        direct: bool = True,
        context: int = 0,
    ):
        self.store_url = store_url
        self.augment, self.seed, self.context = augment, seed, context
        self.direct = direct  # False: every chunk through zarr (``ShardSlices`` reads the same bytes faster)
        self._store: SliceStore | None = None
        self._arrays: dict[str, tuple] = {}
        self.refs = index_slices(self.store, list(cases), skip_empty)

    @property
    def store(self) -> SliceStore:
        if self._store is None:  # first use in this process
            self._store = SliceStore(self.store_url)
        return self._store

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "_arrays": {}}  # workers open their own

    def __len__(self) -> int:
        return len(self.refs)

    def _case(self, case: str) -> tuple:
        if case not in self._arrays:
            image, label = self.store.image(case), self.store.label(case)
            if self.direct:
                image, label = slice_reader(image), slice_reader(label)
            self._arrays[case] = (image, label)
        return self._arrays[case]

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """One sample straight from the store: its image chunk (and its neighbours' with ``context``)
        and its label chunk."""
        ref = self.refs[index]
        image, label = self._case(ref.case)
        lab = label[ref.z] if label is not None else np.zeros(image.shape[-2:], np.uint8)
        return with_context(image, ref.z, self.context), lab

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, label, augmentation parameters for ``apply_augment``: identity for an int key)."""
        index, epoch, position = key if isinstance(key, tuple) else (key, 0, key)
        image, label = self.read(index)
        rng = np.random.default_rng([self.seed, epoch, position]) if isinstance(key, tuple) else None
        params = augment_params(self.augment, rng)
        return (
            torch.from_numpy(np.ascontiguousarray(image)),
            torch.from_numpy(np.ascontiguousarray(label)),
            torch.from_numpy(params),
        )


# ----------------------------------------------------------------------------- sampler


class EpochSampler(Sampler):
    """Yields ``(index, epoch, position)``; the order is a pure function of ``(seed, epoch)``.

    ``oversample_tumour = k > 1`` draws slices with tumour k times as often as the others (with
    replacement); ``k == 1`` is a plain permutation. ``num_samples`` caps an epoch (default: all).
    """

    def __init__(
        self, tumour: list[bool], seed: int = 0, oversample_tumour: float = 1.0, num_samples: int | None = None
    ):
        self.tumour = np.asarray(tumour, dtype=bool)
        self.seed, self.oversample = seed, float(oversample_tumour)
        self.num_samples = min(num_samples or len(self.tumour), len(self.tumour))
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from position ``start`` (samples already seen are skipped)."""
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.tumour)
        if self.oversample == 1.0:
            return rng.permutation(n)[: self.num_samples]
        p = np.where(self.tumour, self.oversample, 1.0)
        return rng.choice(n, size=self.num_samples, replace=True, p=p / p.sum())

    def __iter__(self):
        order = self.order(self.epoch)
        for position in range(self.start, len(order)):
            yield int(order[position]), self.epoch, position

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


# ----------------------------------------------------------------------------- loader


def _exit_with_trainer(trainer: int, worker_id: int) -> None:
    """``worker_init_fn``: a forkserver worker's parent is the fork server, so torch's own check for
    a dead parent misses a trainer killed with -9; poll the trainer and leave when it is gone.

    Also: blosc decodes on one thread in a worker (the workers are the parallelism; blosc's default,
    up to 8 threads each, would oversubscribe the cores the other workers use)."""
    numcodecs.blosc.set_nthreads(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(trainer, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def make_loader(
    dataset: SliceDataset,
    batch_size: int,
    *,
    sampler: Sampler | None = None,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` that keeps an accelerator fed: ``workers`` processes (never more than the cores
    this process may use), prefetching, pinning."""
    workers = min(workers, cores())
    context = None
    if workers > 0:  # not fork: the caller may run threads (Prefect, zarr's event loop)
        context = multiprocessing.get_context(
            "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        )
        if context.get_start_method() == "forkserver":
            context.set_forkserver_preload([__name__])  # workers fork with torch, zarr and this module imported
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,  # the sampler decides the order (sequential when None)
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        multiprocessing_context=context,
        worker_init_fn=functools.partial(_exit_with_trainer, os.getpid()) if workers > 0 else None,
    )
