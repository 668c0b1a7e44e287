"""One case array on disk: a single Zarr v3 shard of one-slice chunks, written and read directly.

``SliceStore.write_case`` stores each case array as one shard whose inner chunks are single slices,
each blosc-compressed (``COMPRESSOR``), followed by the shard index: a (offset, nbytes) pair of
little-endian uint64 per chunk (both ``MISSING`` for a chunk never written) and the index's crc32c.
Zarr reads and writes that layout through its async pipeline, chunk by chunk, at ~0.3 ms (write)
and ~1.5 ms (read, the index read again each time) a chunk on top of the (de)compression itself:
most of ingesting a case, and all but a few per cent of reading a training sample. So the layout
is made and read here, with numcodecs' blosc (the library zarr's codec calls), byte for byte what
zarr writes and reads (``tests/test_ingest.py``, ``tests/test_data_shard.py`` compare them):

* ``write_slices``: zarr makes the array's metadata; the shard's bytes are made here and written
  through the array's own store (any zarr store, local or fsspec).
* ``ShardSlices``: ``array[z]`` for a local array in this layout; ``slice_reader`` falls back to
  zarr for anything else.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
BLOSC = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE, blocksize=0)  # COMPRESSOR's bytes, from numcodecs
WRITE = {"write_empty_chunks": True}  # inside a shard an empty chunk costs bytes; checking costs 2x the write
MISSING = 2**64 - 1  # a shard index entry (offset, nbytes) of two of these: the chunk was never written


def write_slices(group: zarr.Group, name: str, data: np.ndarray) -> zarr.Array:
    """``data`` (Z, ...) as the array ``name`` of ``group``, in the layout above (chunks in order, then
    the index and its crc32c)."""
    z = data.shape[0]
    array = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=(1, *data.shape[1:]),
        shards=data.shape,
        compressors=COMPRESSOR,
        config=WRITE,
    )
    chunks = [BLOSC.encode(np.ascontiguousarray(data[i])) for i in range(z)]
    sizes = np.fromiter(map(len, chunks), dtype="<u8", count=z)
    index = np.stack([np.cumsum(sizes) - sizes, sizes], axis=1).astype("<u8").tobytes()
    shard = b"".join([*chunks, index, google_crc32c.value(index).to_bytes(4, "little")])
    key = f"{array.path}/{array.metadata.encode_chunk_key((0,) * data.ndim)}"
    sync(array.store.set(key, default_buffer_prototype().buffer.from_bytes(shard)))
    return array


class ShardSlices:
    """``array[z]`` for a local zarr v3 array stored the way ``SliceStore.write_case`` stores one:
    a single shard (index at its end, crc32c-checked) of one-slice chunks, each blosc-compressed.

    Why not zarr: a zarr read of one small chunk runs zarr's async pipeline (a hop to its event loop
    thread, then worker-thread hops to read the shard index, read the chunk and decode it) and reads
    the shard index again every time: ~1.5 ms per chunk, ~330 slices/s for a sample's two chunks,
    while reading and decoding the bytes take ~0.1 ms. Nothing public avoids it: the async API itself
    (no event-loop bridge) is ~500 slices/s, gathering a batch's reads is no faster, and zarr has no
    setting for synchronous I/O or for caching shard indexes. Here the index is read once per shard
    file (and again whenever the file changes: zarr replaces files by rename, so the index belongs to
    the inode read from), a chunk is one ``pread`` and one ``numcodecs`` blosc decode (the library
    zarr's blosc codec calls) straight into the output, so the bytes are the ones zarr would return.

    ``for_array`` returns None for anything else (an fsspec or memory store, other codecs, chunks
    that are not single slices, several shards, a shard not written yet), and a shard file that
    disappears later is read through zarr again: callers then use zarr, with zarr's result.
    """

    def __init__(self, array: zarr.Array, path: Path, chunk_shape: tuple[int, ...], dtype: np.dtype, fill_value):
        self.array, self.path = array, path
        self.chunk_shape, self.dtype, self.fill_value = chunk_shape, dtype, fill_value
        self.shape, self.n = tuple(array.shape), array.shape[0]
        self._stamp: tuple | None = None
        self._index = np.empty((0, 2), np.uint64)

    @classmethod
    def for_array(cls, array: zarr.Array) -> ShardSlices | None:
        """A reader for ``array`` if it is laid out as described above, else None (use zarr)."""
        store = array.store
        if not isinstance(store, LocalStore) or array.metadata.zarr_format != 3:
            return None
        meta = array.metadata.to_dict()
        shape = tuple(array.shape)
        chunk = (1, *shape[1:])
        dtype = np.dtype(array.dtype)
        little = {"name": "bytes", "configuration": {"endian": "little"}}
        try:
            (codec,) = meta["codecs"]
            conf = codec["configuration"]
            inner_bytes, blosc = conf["codecs"]
            understood = (
                codec["name"] == "sharding_indexed"
                and tuple(conf["chunk_shape"]) == chunk
                and tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]) == shape  # one shard
                and meta["chunk_grid"]["name"] == "regular"
                and conf.get("index_location", "end") == "end"
                and [dict(c) for c in conf["index_codecs"]] == [little, {"name": "crc32c"}]
                and inner_bytes["name"] == "bytes"
                and (dtype.itemsize == 1 or inner_bytes.get("configuration") == little["configuration"])
                and blosc["name"] == "blosc"
                and not meta.get("storage_transformers")
            )
        except (KeyError, TypeError, ValueError):
            return None
        if not understood or sys.byteorder != "little" or dtype.hasobject or shape[0] == 0:
            return None
        path = Path(store.root) / array.path / array.metadata.encode_chunk_key((0,) * len(shape))
        if not path.is_file():
            return None  # never written (zarr reads fill values) or not a plain file
        return cls(array, path, chunk, dtype, array.fill_value)

    def _load_index(self, fd: int, stamp: tuple) -> None:
        size = stamp[2]
        nbytes = self.n * 16 + 4
        tail = os.pread(fd, nbytes, size - nbytes) if size >= nbytes else b""
        if len(tail) != nbytes:
            raise ValueError(f"{self.path}: shard of {size} bytes cannot hold an index of {self.n} chunks")
        if google_crc32c.value(tail[:-4]) != int.from_bytes(tail[-4:], "little"):
            raise ValueError(f"{self.path}: shard index checksum mismatch")
        index = np.frombuffer(tail[:-4], "<u8").reshape(self.n, 2)
        written = index[:, 0] != MISSING
        if (index[written, 0] + index[written, 1] > size - nbytes).any():
            raise ValueError(f"{self.path}: shard index points past the chunks")
        self._index, self._stamp = index, stamp

    def __getitem__(self, z: int) -> np.ndarray:
        if not 0 <= z < self.n:
            raise IndexError(f"slice {z} of {self.n}")
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:  # the case was deleted or is being replaced: zarr's answer
            return self.array[z]
        try:
            st = os.fstat(fd)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                self._load_index(fd, stamp)
            offset, nbytes = (int(v) for v in self._index[z])
            out = np.empty(self.chunk_shape, self.dtype)
            if offset == MISSING:
                out.fill(self.fill_value)
                return out[0]
            data = os.pread(fd, nbytes, offset)
        finally:
            os.close(fd)
        # blosc header: bytes 4..8 hold the decoded size; decompress accepts a larger destination silently
        if len(data) != nbytes or nbytes < 16 or int.from_bytes(data[4:8], "little") != out.nbytes:
            raise ValueError(f"{self.path}: chunk {z} does not decode to {out.nbytes} bytes")
        numcodecs.blosc.decompress(data, out)
        return out[0]


def slice_reader(array: zarr.Array | None):
    """What ``SliceDataset`` indexes with ``[z]``: a ``ShardSlices`` where it applies, else the zarr array."""
    if array is None:
        return None
    return ShardSlices.for_array(array) or array
