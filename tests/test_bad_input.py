"""The bad-input catalogue: each kind is refused with one line naming the file and the reason, and the
rest of the batch is unaffected.

Function-level tests here cover what ``tests/test_ingest.py`` does not (symlink loops, dangling
links, ``..`` / separator / newline names, non-UTF-8 names, unreadable roots, several roots); one
batch test puts every kind beside good cases through the real ingest flow (Prefect + Dask, two
worker processes) and the real infer flow.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from prefect.artifacts import Artifact

from storage.cases import InvalidCase, case_files, discover
from storage.nifti import read_case
from storage.synth import make_case, write_case
from tests.conftest import rewrite_nifti

SHAPE = (48, 48, 24)


def _case(parent: Path, case_id: str, seed: int = 0, grade: str = "HGG") -> Path:
    folder = Path(os.fsdecode(os.fsencode(parent) + b"/" + os.fsencode(case_id)))
    folder.mkdir(parents=True)
    write_case(folder, Path(folder).name, make_case(np.random.default_rng(seed), SHAPE, grade), SHAPE)
    return folder


def _one_line_json_safe(message: str) -> None:
    assert "\n" not in message and "\r" not in message, message
    message.encode("utf-8")  # no lone surrogates: it can go into a JSON request, a log, a terminal
    json.dumps(message, ensure_ascii=False).encode("utf-8")


# ----------------------------------------------------------------------------- discovery, function level


def test_symlink_loops_are_named_not_followed(tmp_path):
    good = _case(tmp_path / "HGG", "BraTS19_OK_0001_1")
    (tmp_path / "HGG" / "loopA").symlink_to("loopB")  # a two-link cycle
    (tmp_path / "HGG" / "loopB").symlink_to("loopA")
    (tmp_path / "HGG" / "BraTS19_UP_0001_1").symlink_to("..")  # a folder pointing back up the tree
    floop = _case(tmp_path / "LGG", "BraTS19_FL_0001_1", seed=1)
    t2 = floop / f"{floop.name}_t2.nii.gz"
    t2.unlink()
    t2.symlink_to(t2.name)  # a file pointing at itself
    found = discover(tmp_path)
    assert [c.case_id for c in found.cases] == [good.name]
    problems = {Path(p.path).name: p.reason for p in found.problems}
    assert set(problems) == {"loopA", "loopB", "BraTS19_UP_0001_1", t2.name}, problems
    assert all(reason.startswith("symlink loop") for reason in problems.values()), problems
    for p in found.problems:
        _one_line_json_safe(str(p))


def test_dangling_symlink_is_named_with_its_target(tmp_path):
    folder = _case(tmp_path, "BraTS19_DL_0001_1")
    flair = folder / f"{folder.name}_flair.nii.gz"
    flair.unlink()
    flair.symlink_to("/nonexistent/flair.nii.gz")
    found = discover(tmp_path)
    assert not found.cases and str(found.problems[0]) == f"{flair}: broken symlink to /nonexistent/flair.nii.gz"


@pytest.mark.parametrize(
    "name",
    ["BraTS19..0001", "..BraTS19", "BraTS19\\0001_1", "BraTS19_0001\n", ".BraTS19_0001", "BraTS19 0001", "-BraTS19"],
)
def test_unsafe_case_names_are_refused_before_they_become_paths(tmp_path, name):
    _case(tmp_path / "ok", "BraTS19_OK_0001_1")
    folder = tmp_path / "raw" / name
    folder.mkdir(parents=True)
    for m in ("flair", "t1", "t1ce", "t2"):
        (folder / f"{name}_{m}.nii.gz").write_bytes(b"")
    with pytest.raises(InvalidCase, match="unsafe case id") as err:
        case_files(folder)
    _one_line_json_safe(str(err.value))
    found = discover(tmp_path / "raw", tmp_path / "ok")
    assert [c.case_id for c in found.cases] == ["BraTS19_OK_0001_1"]
    assert len(found.problems) == 1 and "unsafe case id" in str(found.problems[0])


def test_non_utf8_names_are_refused_and_shown_escaped(tmp_path):
    _case(tmp_path / "HGG", "BraTS19_OK_0001_1")
    bad = _case(tmp_path / "HGG", "BraTS19_\udcff\udcfe_1", seed=2)  # the bytes b"BraTS19_\xff\xfe_1" on disk
    assert os.fsencode(bad).endswith(b"BraTS19_\xff\xfe_1")
    stray = tmp_path / "HGG" / "BraTS19_OK_0001_1" / "notes_\udce9.txt"  # a non-UTF-8 file beside good ones
    stray.write_text("ignored")
    found = discover(tmp_path)
    assert [c.case_id for c in found.cases] == ["BraTS19_OK_0001_1"]
    (problem,) = found.problems
    assert (
        str(problem) == f"{tmp_path}/HGG/BraTS19_\\xff\\xfe_1: unsafe case id 'BraTS19_\\xff\\xfe_1': "
        "use letters, digits and . _ - only"
    )
    _one_line_json_safe(str(problem))


def test_a_good_case_under_a_non_utf8_root_reads(tmp_path):
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/r\xe9sum\xe9"))
    folder = _case(root, "BraTS19_OK_0001_1")
    case = read_case(discover(root).cases[0])
    assert case.files.files["flair"] == str(folder / "BraTS19_OK_0001_1_flair.nii.gz") and case.shape == SHAPE


def test_unreadable_roots_are_clear_errors(tmp_path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    with pytest.raises(FileNotFoundError, match=r"not-a-folder: cannot read raw root \(Not a directory\)"):
        discover(a_file)
    with pytest.raises(FileNotFoundError, match=r"loop: cannot read raw root \(Too many levels of symbolic links\)"):
        discover(loop)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:  # nothing anywhere: every root named, one line
        discover(empty, a_file)
    assert (
        str(err.value).count(": ") >= 2
        and "empty: no BraTS cases found" in str(err.value)
        and "\n" not in str(err.value)
    )


def test_one_bad_root_among_several_does_not_stop_the_others(tmp_path):
    good = _case(tmp_path / "good", "BraTS19_OK_0001_1")
    a_file, empty = tmp_path / "file", tmp_path / "empty"
    a_file.write_text("x")
    empty.mkdir()
    found = discover(tmp_path / "good", a_file, empty, tmp_path / "missing")
    assert [c.case_id for c in found.cases] == [good.name]
    assert [str(p) for p in found.problems] == [
        f"{a_file}: cannot read raw root (Not a directory)",
        f"{empty}: no BraTS cases found (expected HGG/ and LGG/ folders or case folders)",
        f"{tmp_path / 'missing'}: cannot read raw root (No such file or directory)",
    ]


# ----------------------------------------------------------------------------- the whole catalogue, one batch


def _catalogue(tmp_path: Path) -> tuple[list[Path], list[str], dict[str, tuple[str, str, bool]]]:
    """Raw roots holding good cases and one of every bad kind.

    Returns (roots, good case ids, {kind: (file named in the line, reason, also refused by inference)})."""
    raw = tmp_path / "raw"
    good = [
        _case(raw / "HGG", "BraTS19_GOOD_0001_1", 1),
        _case(raw / "HGG", "BraTS19_GOOD_0002_1", 2),
        _case(raw / "LGG", "BraTS19_GOOD_0003_1", 3, "LGG"),
    ]
    (good[0] / "README_\udcff.txt").write_text("a non-UTF-8 file name beside a good case")
    bad: dict[str, tuple[str, str, bool]] = {}

    def make(kind, seed, grade="HGG"):
        return _case(raw / grade, f"BraTS19_{kind}_0001_1", seed, grade)

    def f(folder, m):
        return folder / f"{folder.name}_{m}.nii.gz"

    c = make("MISSING", 10)
    f(c, "t1ce").unlink()
    bad["missing modality"] = (f(c, "t1ce").name, "missing t1ce modality", True)

    c = make("TRUNCGZ", 11)
    f(c, "t2").write_bytes(f(c, "t2").read_bytes()[:-3000])
    bad["truncated .nii.gz"] = (f(c, "t2").name, "truncated", True)

    c = make("NOTNIFTI", 12)
    f(c, "flair").write_bytes(gzip.compress(b"<html>403 Forbidden</html>\n" * 40))
    bad["not NIfTI"] = (f(c, "flair").name, "not a readable NIfTI", True)

    c = make("SHAPE", 13)
    rewrite_nifti(f(c, "t1"), np.ones((48, 48, 20), np.int16))
    bad["shape mismatch"] = (f(c, "t1").name, "shape (48, 48, 20) differs from", True)

    c = make("AFFINE", 14)
    rewrite_nifti(f(c, "t1"), np.asanyarray(nib.load(f(c, "t1")).dataobj), affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    bad["affine mismatch"] = (f(c, "t1").name, "affine differs from", True)

    for kind, value, seed in (("NAN", np.nan, 15), ("INF", np.inf, 16)):
        c = make(kind, seed)
        data = np.asanyarray(nib.load(f(c, "t1ce")).dataobj).astype(np.float32)
        data[20, 20, 10] = value
        rewrite_nifti(f(c, "t1ce"), data, dtype=np.float32)
        bad[f"{kind} voxels"] = (f(c, "t1ce").name, "NaN or Inf", True)

    c = make("ZERO", 17)
    for m in ("flair", "t1", "t1ce", "t2"):
        rewrite_nifti(f(c, m), np.zeros(SHAPE, np.int16))
    bad["all-zero brain"] = (f(c, "flair").name, "all zero: no brain", True)

    c = make("LABELS", 18)
    seg = np.asanyarray(nib.load(f(c, "seg")).dataobj).copy()
    seg[0, 0, 0] = 3
    rewrite_nifti(f(c, "seg"), seg)
    bad["labels outside {0,1,2,4}"] = (
        f(c, "seg").name,
        "labels [3] outside [0, 1, 2, 4]",
        False,
    )  # inference reads no seg

    c = make("FOURD", 19)
    rewrite_nifti(f(c, "t2"), np.ones((*SHAPE, 3), np.int16))
    bad["4D image"] = (f(c, "t2").name, "image is 4D", True)

    c = make("ABSURD", 20)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))  # 54 TB of int16 if anyone believed it
    hdr.set_data_dtype(np.int16)
    f(c, "t1").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\1" * 4096))
    bad["absurd header dims"] = (f(c, "t1").name, "absurd dimensions (30000, 30000, 30000)", True)

    (raw / "HGG" / "BraTS19_LOOP_0001_1").symlink_to("BraTS19_LOOP_0001_1")
    bad["symlink loop (folder)"] = ("BraTS19_LOOP_0001_1", "symlink loop", True)
    c = make("FLOOP", 21)
    f(c, "t1").unlink()
    f(c, "t1").symlink_to(f(c, "t1").name)
    bad["symlink loop (file)"] = (f(c, "t1").name, "symlink loop", True)

    _case(raw / "HGG", "BraTS19..0001_1", 22)
    bad["'..' in the name"] = ("BraTS19..0001_1", "unsafe case id", True)
    _case(raw / "HGG", "BraTS19\\0002_1", 23)
    bad["path separator in the name"] = ("BraTS19\\0002_1", "unsafe case id", True)
    _case(raw / "HGG", "BraTS19_\udcff_1", 24)
    bad["non-UTF-8 name"] = ("BraTS19_\\xff_1", "unsafe case id", True)

    _case(raw / "HGG", "BraTS19_TWICE_0001_1", 25)
    _case(raw / "LGG", "BraTS19_TWICE_0001_1", 26, "LGG")
    bad["same id in HGG and LGG"] = ("LGG/BraTS19_TWICE_0001_1", "case id BraTS19_TWICE_0001_1 also found at", True)

    empty = tmp_path / "empty-root"
    empty.mkdir()
    bad["empty root"] = ("empty-root", "no BraTS cases found", True)
    unreadable = tmp_path / "root-is-a-file"
    unreadable.write_text("not a folder")
    bad["unreadable root"] = ("root-is-a-file", "cannot read raw root (Not a directory)", True)
    return [raw, empty, unreadable], sorted(c.name for c in good), bad


def _lines_for(lines: list[str], bad: dict[str, tuple[str, str, bool]], inference: bool) -> None:
    """Each bad kind has its own line naming its file and its reason; no other line is there."""
    for line in lines:
        _one_line_json_safe(line)
    expected = {k: v for k, v in bad.items() if v[2] or not inference}
    for kind, (name, reason, _) in expected.items():
        hits = [line for line in lines if f"{name}: " in line and reason in line.split(f"{name}: ", 1)[1]]
        assert hits, f"{kind}: no line names {name!r} with {reason!r} in {lines}"
    assert len(lines) == len(expected), lines


def test_every_bad_input_beside_good_cases_through_the_ingest_and_infer_flows(prefect_api, tmp_path):
    from flows.infer import infer
    from flows.ingest import ingest
    from storage.store import SliceStore
    from tasks.runners import dask_runner
    from tests.helpers import register_model

    roots, good, bad = _catalogue(tmp_path)

    url = str(tmp_path / "slices.zarr")
    state = ingest.with_options(task_runner=dask_runner(workers=2))(
        raw=[str(r) for r in roots], store_url=url, return_state=True
    )
    summary = state.result(raise_on_failure=False)
    assert state.is_failed() and f"{len(bad)} case(s) quarantined" in state.message
    store = SliceStore(url)
    assert store.case_ids() == good and summary["ingested"] == len(good)
    assert sorted(sum(store.split.values(), [])) == good
    _lines_for([q["reason"] for q in store.quarantine], bad, inference=False)

    models, out = tmp_path / "models", tmp_path / "out"
    register_model(models)
    state = infer([str(r) for r in roots], str(out), registry_url=str(models), return_state=True)
    summary = state.result(raise_on_failure=False)
    refused = [k for k, v in bad.items() if v[2]]  # a seg beside the scans is not read: bad labels are no matter
    assert state.is_failed() and summary["failed"] == len(refused) and summary["written"] == len(good) + 1
    failed = [line[2:] for line in Artifact.get("infer-summary").data.split("## Failed", 1)[1].strip().splitlines()]
    _lines_for(failed, bad, inference=True)
    written = sorted(p.name[: -len("_seg.nii.gz")] for p in out.glob("*_seg.nii.gz"))
    assert written == sorted([*good, "BraTS19_LABELS_0001_1"])
    records = sorted(p.stem for p in out.glob("*.json") if not p.name.endswith(".failed.json"))
    assert records == written and not list(out.glob(".*"))
    notes = [json.loads(p.read_text()) for p in out.glob("*.failed.json")]  # for `brats inbox`: why it failed
    assert notes and all(n["reason"] in failed and n["case"] not in written for n in notes)
