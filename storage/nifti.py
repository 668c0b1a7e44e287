"""Raw BraTS cases on disk: find them, validate them, read them, write segmentations.

Layouts accepted (``discover``)::

    <root>/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz   # the official BraTS 2019 layout
    <root>/<case>/<case>_{...}.nii[.gz]                           # flat
    <root>/<case>_{...}.nii[.gz]                                  # root is itself one case folder

Any case-folder name made of letters, digits, ``._-`` is a case id (``BraTS19_…``, ``Brats18_…``,
``BraTS20_…``, ``BraTS2021_00006``, ``BraTS-GLI-00000-000`` alike). Files are ``<case>_<suffix>`` or
``<case>-<suffix>`` (BraTS 2023 uses the dash), with either suffix family::

    flair  t1   t1ce  t2     (BraTS 2012–2021)
    t2f    t1n  t1c   t2w    (BraTS 2023+)

``naming="auto"`` (the default) finds the family per case. The *edition* decides the label of
enhancing tumour: 4 up to BraTS 2021, 3 from BraTS 2023 on (suffixes ``t2f…`` or a ``BraTS-…`` id).
Segmentations are read in any integer dtype (int16, uint8, uint16, int32, …) or as floats holding
whole numbers, and come out as uint8 in the canonical BraTS 2019 labels {0, 1, 2, 4} whatever the
edition; writers map ET back (``et_label``).

Discovery survives what a real disk holds: a symlink loop or a dangling link is a problem named by
its path, not a silent skip or a hang; a name that is not UTF-8 is refused as an unsafe case id and
shown with ``\\xNN`` escapes (messages stay printable, JSON-safe one-liners); a case id is a full
match of ``CASE_ID`` (no path separators, no ``..``, no trailing newline). With several roots, an
empty or unreadable one is reported as a problem and the others are still read; when nothing at
all is found, discovery raises ``FileNotFoundError`` naming every root and why.

Every problem with a case is an ``InvalidCase`` whose message is one line: ``<file>: <reason>``.
Reading never trusts the header blindly: the data size the header promises is checked against the
bytes actually there before any array is allocated, so a truncated or absurd file costs nothing.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import fsspec
import nibabel as nib
import numpy as np

from storage.brats import ET_LABEL, GRADES, MODALITIES, SUFFIXES

try:  # ISA-L inflates gzip ~2.5x faster than zlib; optional
    from isal.igzip import decompress as _gunzip
except ImportError:  # pragma: no cover
    _gunzip = gzip.decompress
NAMINGS = ("auto", *SUFFIXES, "brats2021")  # brats2021: the old name of brats2023's suffixes, kept working
Naming = Literal["auto", "brats2019", "brats2023", "brats2021"]
SEPARATORS = ("_", "-")  # <case>_flair.nii.gz (2012–2021), <case>-t2f.nii.gz (2023)
EXTENSIONS = (".nii.gz", ".nii")
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # \Z: "$" would let a trailing newline in
MAX_DIM = 1024  # larger is not a brain MRI; refuse before allocating
AFFINE_ATOL = 1e-3


def shown(path: str | os.PathLike) -> str:
    """A path as a printable one-line string: bytes that are not UTF-8 become ``\\xNN``, newlines ``\\n``."""
    text = os.fspath(path)
    try:
        text = os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeError:  # a lone surrogate that did not come from the file system
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\n", "\\n").replace("\r", "\\r")


class InvalidCase(ValueError):
    """Invalid input data: never retried; the message names the file and the reason, on one line."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = shown(path), " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # crosses process boundaries (Dask workers) intact
        return InvalidCase, (self.path, self.reason)


@dataclass(frozen=True)
class CaseFiles:
    """Where one case's files are (paths may be local or fsspec URLs)."""

    case_id: str
    files: dict[str, str]  # channel name (flair, t1, t1ce, t2, seg) -> path
    grade: str | None = None  # "HGG" / "LGG" when the layout says
    edition: str = "brats2019"  # "brats2019" (ET label 4, up to 2021) or "brats2023" (ET label 3)

    def __post_init__(self):  # a case id becomes store keys, output file names, lock names: checked here too
        if not CASE_ID.fullmatch(self.case_id) or ".." in self.case_id:
            raise InvalidCase(self.case_id, "unsafe case id: use letters, digits and . _ - only")
        if self.edition not in ET_LABEL:
            raise ValueError(f"unknown edition {self.edition!r}; choose one of {sorted(ET_LABEL)}")

    @property
    def et_label(self) -> int:
        return ET_LABEL[self.edition]


@dataclass
class Discovery:
    cases: list[CaseFiles] = field(default_factory=list)
    problems: list[InvalidCase] = field(default_factory=list)  # cases refused before reading


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


# ------------------------------------------------------------------ discovery


def _unreachable(path: Path) -> str | None:
    """Why a path that is there cannot be followed (a symlink loop, a dangling link), else None."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (too many levels of symbolic links)"
        if path.is_symlink():
            return f"broken symlink to {shown(os.readlink(path))}"
        return None if e.errno == errno.ENOENT else f"cannot read ({e.strerror or e})"
    if path.is_symlink() and path.is_dir():  # a folder link back to itself or an ancestor: a loop in the tree
        target, parent = path.resolve(), path.parent.resolve()
        if target == parent or target in parent.parents:
            return f"symlink loop (points back to {shown(target)})"
    return None


def _nifti(folder: Path, case_id: str, suffix: str) -> Path | None:
    """``<case>_<suffix>.nii.gz`` (or ``-`` for ``_``, or ``.nii``) in ``folder``, if there."""
    for sep in SEPARATORS:
        for ext in EXTENSIONS:
            p = folder / f"{case_id}{sep}{suffix}{ext}"
            if p.is_file():
                return p
            if os.path.lexists(p) and (why := _unreachable(p) or "not a regular file"):
                raise InvalidCase(p, why)
    return None


def _families(naming: str) -> tuple[str, ...]:
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; choose one of {list(NAMINGS)}")
    return tuple(SUFFIXES) if naming == "auto" else ("brats2023" if naming == "brats2021" else naming,)


def _is_case_dir(folder: Path, naming: str) -> bool:
    """A case folder holds at least one ``*_<suffix>.nii[.gz]`` file (any suffix the naming allows)."""
    suffixes = {s for family in _families(naming) for s in SUFFIXES[family].values()} | {"seg"}
    ends = tuple(f"{sep}{s}{ext}" for s in suffixes for sep in SEPARATORS for ext in EXTENSIONS)
    try:
        return any(f.name.endswith(ends) for f in folder.iterdir())
    except OSError:
        return False


def case_files(folder: str | Path, grade: str | None = None, naming: str = "auto") -> CaseFiles:
    """The files of one case folder; raises InvalidCase for an unsafe name or a missing modality.

    ``naming="auto"`` takes the suffix family whose four modalities are all there (both: ambiguous,
    refused); ``brats2019`` or ``brats2023`` (alias ``brats2021``) insists on one.
    """
    folder = Path(folder)
    case_id = folder.name
    if not CASE_ID.fullmatch(case_id) or ".." in case_id:
        raise InvalidCase(folder, f"unsafe case id '{shown(case_id)}': use letters, digits and . _ - only")
    if why := _unreachable(folder):
        raise InvalidCase(folder, why)
    found = {
        family: {c: _nifti(folder, case_id, s) for c, s in SUFFIXES[family].items()} for family in _families(naming)
    }
    whole = [family for family, files in found.items() if all(files.values())]
    if len(whole) > 1:
        raise InvalidCase(folder, "holds both flair/t1/t1ce/t2 and t2f/t1n/t1c/t2w files; choose one with --naming")
    if not whole:  # name the first missing modality of the family most nearly there
        family = max(found, key=lambda f: sum(p is not None for p in found[f].values()))
        channel = next(c for c, p in found[family].items() if p is None)
        raise InvalidCase(folder / f"{case_id}_{SUFFIXES[family][channel]}.nii.gz", f"missing {channel} modality")
    family = whole[0]
    files = {c: str(p) for c, p in found[family].items()}
    if (seg := _nifti(folder, case_id, "seg")) is not None:
        files["seg"] = str(seg)
    edition = "brats2023" if family == "brats2023" or case_id.startswith("BraTS-") else "brats2019"
    return CaseFiles(case_id, files, grade, edition)


def _listing(folder: Path) -> list[Path]:
    """A folder's entries by name; OSError when it cannot be listed (missing, a file, unreadable, a loop)."""
    return sorted(folder.iterdir(), key=lambda p: p.name)


def discover(*roots: str | Path, naming: str = "auto") -> Discovery:
    """Find every case under the given roots. Case-level problems are collected; so are those of a root
    that is empty or cannot be read, as long as another root yields something; else FileNotFoundError."""
    _families(naming)  # an unknown naming is the caller's error, raised before anything is read
    found = Discovery()
    seen: dict[str, str] = {}
    unusable: list[InvalidCase] = []  # roots that gave nothing at all
    for root in map(Path, roots):
        try:
            entries = _listing(root)
        except OSError as e:
            unusable.append(InvalidCase(root, f"cannot read raw root ({e.strerror or e})"))
            continue
        problems_before = len(found.problems)
        folders: list[tuple[Path, str | None]] = []
        if _is_case_dir(root, naming):
            folders.append((root, None))
        for entry in entries:
            if why := _unreachable(entry):
                found.problems.append(InvalidCase(entry, why))
            elif entry.name in GRADES and entry.is_dir():
                try:
                    folders += [(p, entry.name) for p in _listing(entry) if p.is_dir() or _unreachable(p)]
                except OSError as e:
                    found.problems.append(InvalidCase(entry, f"cannot read grade folder ({e.strerror or e})"))
            elif entry.is_dir() and _is_case_dir(entry, naming):
                folders.append((entry, None))
        for folder, grade in folders:
            try:
                case = case_files(folder, grade, naming)
            except InvalidCase as e:
                found.problems.append(e)
                continue
            if case.case_id in seen:
                found.problems.append(
                    InvalidCase(
                        folder, f"case id {case.case_id} also found at {shown(seen[case.case_id])}; skipped both copies"
                    )
                )
                found.cases = [c for c in found.cases if c.case_id != case.case_id]
                continue
            seen[case.case_id] = str(folder)
            found.cases.append(case)
        if not folders and len(found.problems) == problems_before:
            unusable.append(InvalidCase(root, "no BraTS cases found (expected HGG/ and LGG/ folders or case folders)"))
    if unusable and not found.cases and not found.problems:
        raise FileNotFoundError("; ".join(map(str, unusable)))
    found.problems += unusable
    return found


# ------------------------------------------------------------------ reading


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
    return atomic_write_bytes(out, img.to_bytes() if not out.name.endswith(".gz") else gzip.compress(img.to_bytes(), 6))


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
