"""NIfTI files of a case in and out: read once, hash, decode, validate; segmentations written atomically.

Reading never trusts the header blindly: the data size the header promises is checked against the
bytes actually there before any array is allocated, so a truncated or absurd file costs nothing.
Segmentations are read in any integer dtype (int16, uint8, uint16, int32, …) or as floats holding
whole numbers, and come out as uint8 in the canonical BraTS 2019 labels {0, 1, 2, 4} whatever the
edition; writers map ET back (``et_label``). Every problem is an ``InvalidCase`` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
import nibabel as nib
import numpy as np

from storage.brats import ET_LABEL, MODALITIES
from storage.cases import CaseFiles, InvalidCase

try:  # ISA-L (de)compresses gzip several times faster than zlib; optional
    from isal.igzip import compress as _gzip
    from isal.igzip import decompress as _gunzip
except ImportError:  # pragma: no cover
    _gunzip, _gzip = gzip.decompress, gzip.compress
MAX_DIM = 1024  # larger is not a brain MRI; refuse before allocating
AFFINE_ATOL = 1e-3


@dataclass
class Case:
    """A validated case in memory."""

    files: CaseFiles
    volumes: dict[str, np.ndarray]  # flair, t1, t1ce, t2 -> (X, Y, Z) as stored (int16 usually), no copy
    seg: np.ndarray | None  # (X, Y, Z) uint8 BraTS labels {0,1,2,4} (ET 4 whatever the edition), or None
    affine: np.ndarray  # 4x4
    zooms: tuple[float, float, float]
    sha256: dict[str, str]  # channel -> hex digest of the file's bytes
    reference: nib.Nifti1Image  # the FLAIR file's image: its header and grid, for outputs on the same grid

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volumes[MODALITIES[0]].shape

    @property
    def image(self) -> np.ndarray:
        """(4, X, Y, Z) float32 in channel order (a copy)."""
        return np.stack([self.volumes[c].astype(np.float32) for c in MODALITIES])


def read_bytes(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        return f.read()


RACY_S = 2  # a file modified less than this long ago gets no stamp (see ``stamps``)


def stamps(case: CaseFiles) -> dict[str, str] | None:
    """Each file's size and modification time, ``"size:mtime_ns"``, read without opening the file: what
    ``make`` and ``rsync`` compare to tell a rewritten file. Taken before the bytes are read, so a
    write during the read leaves a stamp that no longer matches.

    None when a stamp cannot vouch for a file's bytes: a remote file (fsspec URL), or one modified
    less than ``RACY_S`` seconds ago, which a second write within the same tick of the file system's
    clock could change without changing its stamp (git's "racy" rule). Those files are hashed."""
    now = time.time_ns()
    out = {}
    for channel, path in case.files.items():
        if "://" in path:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_mtime_ns > now - RACY_S * 10**9:
            return None
        out[channel] = f"{st.st_size}:{st.st_mtime_ns}"
    return out


def _decode(path: str, raw: bytes) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Bytes of a .nii or .nii.gz file -> (array, image), refusing anything short, absurd or not NIfTI.

    The array is a read-only view of the decompressed bytes (no copy); gzip is inflated with ISA-L
    (``isal``), about 2.5x faster than zlib, when it is installed.
    """
    if path.endswith(".gz"):
        try:
            raw = _gunzip(raw)
        except Exception as e:  # in-memory inflate: any failure means a bad stream, not I/O
            raise InvalidCase(path, f"truncated or corrupt gzip stream ({e})") from None
    if len(raw) < 348:
        raise InvalidCase(path, f"not a NIfTI file ({len(raw)} bytes, a header alone is 348)")
    try:
        img = nib.Nifti1Image.from_bytes(raw)
    except Exception as e:  # nibabel raises several types for a bad header
        raise InvalidCase(path, f"not a readable NIfTI-1 file ({type(e).__name__}: {e})") from None
    shape = img.header.get_data_shape()
    if len(shape) != 3:
        raise InvalidCase(path, f"image is {len(shape)}D {tuple(shape)}; expected a 3D volume")
    if any(d < 1 or d > MAX_DIM for d in shape):
        raise InvalidCase(path, f"absurd dimensions {tuple(shape)} in header (each must be 1..{MAX_DIM})")
    dtype = img.header.get_data_dtype()
    if dtype.kind not in "iuf":
        raise InvalidCase(path, f"unsupported voxel type {dtype}")
    proxy = img.dataobj  # nibabel resolves the data offset (extensions) and the scaling
    offset, count = int(proxy.offset), int(np.prod(shape))
    if len(raw) < offset + count * dtype.itemsize:
        raise InvalidCase(
            path, f"truncated: header promises {offset + count * dtype.itemsize} bytes, file holds {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    if (proxy.slope, proxy.inter) != (1.0, 0.0):
        arr = arr * np.float32(proxy.slope) + np.float32(proxy.inter)
    return arr, img


def read_files(case: CaseFiles) -> dict[str, bytes]:
    """Every file of a case, as bytes (OSError: transient I/O, the caller may retry)."""
    return {channel: read_bytes(path) for channel, path in case.files.items()}


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {channel: hashlib.sha256(raw).hexdigest() for channel, raw in files.items()}


def read_case(case: CaseFiles, files: dict[str, bytes] | None = None) -> Case:
    """Read and validate one case: same grid across files, finite values, a brain, valid labels.

    ``files``: the case's bytes when the caller has them already (``read_files``), so that the bytes
    hashed are the bytes decoded and each file is read once."""
    files = files if files is not None else read_files(case)
    arrays, images, ref = {}, {}, None
    for channel, path in case.files.items():
        arr, img = _decode(path, files[channel])
        if ref is None:
            ref = (path, img)
        elif arr.shape != ref[1].shape:
            raise InvalidCase(path, f"shape {arr.shape} differs from {Path(ref[0]).name} {ref[1].shape}")
        elif not np.allclose(img.affine, ref[1].affine, atol=AFFINE_ATOL):
            raise InvalidCase(path, f"affine differs from {Path(ref[0]).name}")
        if channel == "seg":
            arr = labels(path, arr, case.et_label)
        else:
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InvalidCase(path, "contains NaN or Inf voxels")
            if not arr.any():
                raise InvalidCase(path, f"{channel} is all zero: no brain")
        arrays[channel], images[channel] = arr, img
    seg = arrays.pop("seg", None)
    img = ref[1]
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Case(case, arrays, seg, img.affine.copy(), zooms, digests(files), images["flair"])


def labels(path: str, arr: np.ndarray, et_label: int = 4) -> np.ndarray:
    """A segmentation as stored (any integer dtype, or floats holding whole numbers) -> uint8 BraTS
    labels {0, 1, 2, 4}, ET mapped from ``et_label``; InvalidCase for anything else."""
    allowed = (0, 1, 2, et_label)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InvalidCase(path, "segmentation contains NaN or Inf voxels")
        fractional = arr != np.round(arr)
        if fractional.any():
            raise InvalidCase(
                path,
                f"segmentation holds non-integral values (e.g. {float(arr[fractional][0]):g}); "
                "labels must be whole numbers",
            )
    elif arr.dtype.kind not in "iu":
        raise InvalidCase(path, f"segmentation dtype {arr.dtype}; expected integer labels")
    lo, hi = arr.min(), arr.max()
    out = arr.astype(np.uint8, copy=et_label != 4) if 0 <= lo and hi <= 255 else None
    if out is None or sum(np.count_nonzero(out == v) for v in allowed) != out.size:  # a pass per label, no sort
        bad = sorted({int(v) for v in np.unique(arr)} - set(allowed))  # whole numbers by now
        raise InvalidCase(
            path, f"labels {bad} outside {list(allowed)} (enhancing tumour is {et_label} in this edition)"
        )
    if et_label != 4:
        out[out == et_label] = 4
    return out


def read_labels(path: str, edition: str = "brats2019", sha256: str | None = None) -> np.ndarray:
    """A segmentation file -> (X, Y, Z) uint8 BraTS labels {0, 1, 2, 4} (``labels``); with ``sha256``,
    InvalidCase unless the file's bytes still have that digest."""
    raw = read_bytes(path)
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise InvalidCase(path, "changed since ingestion (sha256 differs)")
    return labels(path, _decode(path, raw)[0], ET_LABEL[edition])


# ------------------------------------------------------------------ writing


def write_segmentation(labels: np.ndarray, reference: nib.Nifti1Image, out: str | Path) -> Path:
    """Write BraTS labels on the reference's grid (affine, qform/sform codes, zooms) atomically."""
    out = Path(out)
    if labels.shape != reference.shape[:3]:
        raise ValueError(f"{out}: segmentation shape {labels.shape} != input grid {reference.shape[:3]}")
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    img = nib.Nifti1Image(labels.astype(np.uint8), reference.affine, header)
    img.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
    img.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
    return atomic_write_bytes(out, img.to_bytes() if not out.name.endswith(".gz") else _gzip(img.to_bytes()))


def _umask() -> int:
    """This process's umask (read without changing it where Linux tells, else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(out: str | Path, data: bytes) -> Path:
    """Write a file so that the path shows either nothing, the old file or the whole new one; its mode
    is what a plain ``open`` would give (0644 under umask 022), not the 0600 of a temporary file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
