"""Raw BraTS cases on disk: where they are, what they are called, and what is wrong with one.

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
Reading the files is ``storage.nifti``.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from storage.brats import ET_LABEL, GRADES, SUFFIXES

NAMINGS = ("auto", *SUFFIXES, "brats2021")  # brats2021: the old name of brats2023's suffixes, kept working
Naming = Literal["auto", "brats2019", "brats2023", "brats2021"]
NAMING_HELP = "file names: auto (per case), brats2019 (flair/t1/t1ce/t2) or brats2023 (t2f/t1n/t1c/t2w)"
SEPARATORS = ("_", "-")  # <case>_flair.nii.gz (2012–2021), <case>-t2f.nii.gz (2023)
EXTENSIONS = (".nii.gz", ".nii")
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # \Z: "$" would let a trailing newline in


def printable(path: str | os.PathLike) -> str:
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
        self.path, self.reason = printable(path), " ".join(str(reason).split())
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


# ------------------------------------------------------------------ discovery


def _unreachable(path: Path) -> str | None:
    """Why a path that is there cannot be followed (a symlink loop, a dangling link), else None."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (too many levels of symbolic links)"
        if path.is_symlink():
            return f"broken symlink to {printable(os.readlink(path))}"
        return None if e.errno == errno.ENOENT else f"cannot read ({e.strerror or e})"
    if path.is_symlink() and path.is_dir():  # a folder link back to itself or an ancestor: a loop in the tree
        target, parent = path.resolve(), path.parent.resolve()
        if target == parent or target in parent.parents:
            return f"symlink loop (points back to {printable(target)})"
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
        raise InvalidCase(folder, f"unsafe case id '{printable(case_id)}': use letters, digits and . _ - only")
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
                        folder,
                        f"case id {case.case_id} also found at {printable(seen[case.case_id])}; skipped both copies",
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
