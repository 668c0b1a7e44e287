"""Synthetic BraTS 2019-like cases: realistic-looking, learnable brain-tumour phantoms.

Each case is a skull-stripped head phantom written exactly like a real BraTS file set
(240x240x155 int16, 1 mm, LPS voxel axes with affine diag(-1,-1,1) and origin
(0, 239, 0), qform code 2 / sform code 1, background exactly 0).

Phantom model (all voxel work in float32 on the brain's bounding box only):

* Brain and healthy tissue: ``storage.phantom`` (an irregular egg of white and grey matter,
  sulci, ventricles, deep nuclei).
* Tumour (inside the brain, either hemisphere): three nested irregular blobs (radius
  modulated by low-frequency noise, random stretch and rotation) give the labels
  0 background, 1 necrosis / non-enhancing core, 2 oedema, 4 enhancing tumour.
  HGG: necrotic centre (1) inside an enhancing rim (4) inside oedema (2), which spreads
  preferentially into white matter.  LGG: never label 4; the core is label 1 only,
  with lower contrast.  The tumour pushes the ventricles away (mass effect).
* Intensities: per-modality tissue means calibrated on a real BraTS case (T1: WM > GM >
  CSF; T2: CSF > GM > WM; FLAIR: CSF dark, GM > WM; T1ce like T1 with a bright enhancing
  rim), jittered per case, times smooth texture and a smooth separable multiplicative
  bias field, plus Gaussian noise.  Brain voxels are clipped to >= 1 so that
  ``volume > 0`` recovers the brain mask exactly; everything outside is 0.

Randomness comes only from the ``np.random.Generator`` handed to :func:`make_case`;
:func:`write_dataset` seeds case ``i`` with ``np.random.default_rng([seed, i])`` so a
case never changes when more cases are requested.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from storage.brats import GRADES, MODALITIES
from storage.phantom import Head, Tissue, TumourPlan, make_head, make_tissue, plan_tumour, ramp, smooth_field

BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)

Shape = tuple[int, int, int]
Box = tuple[slice, slice, slice]


def brats_affine(shape: Shape = BRATS_SHAPE) -> np.ndarray:
    """The BraTS voxel-to-world affine: diag(-1, -1, 1, 1) with origin (0, shape[1] - 1, 0)."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = float(shape[1] - 1)
    return affine


BRATS_AFFINE = brats_affine


# --------------------------------------------------------------------------- tumour


@dataclass
class _Tumour:
    """Tumour labels and soft intensity weights on a sub-box of the head box."""

    local: Box  # slices into the head box
    seg: np.ndarray  # int16 labels on the sub-box
    oedema: np.ndarray  # 0..1 strength of the oedema signal (graded edge)
    core: np.ndarray  # 0..1 core (enhancing for HGG, non-enhancing for LGG)
    necrosis: np.ndarray  # 0..1 necrotic centre (HGG only)


def _make_tumour(rng: np.random.Generator, head: Head, tissue: Tissue, plan: TumourPlan) -> _Tumour:
    cos, sin = np.cos(head.angle), np.sin(head.angle)
    rotation = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])
    centre = head.centre + rotation.T @ (plan.centre * head.semi)  # voxels
    reach = 2.1 * plan.r_oedema + 4.0  # stretch >= 0.8 and wobble factor >= 0.65 keep blobs inside
    lo = np.maximum(np.floor(centre - reach).astype(int), [s.start for s in head.box])
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, [s.stop for s in head.box])
    local = tuple(slice(a - s.start, b - s.start) for a, b, s in zip(lo, hi, head.box))
    shape = tuple(int(b - a) for a, b in zip(lo, hi))

    # Random orientation and stretch, shared by the nested blobs.
    orient, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    frame = (orient * rng.uniform(0.8, 1.25, 3)).astype(np.float32)
    offsets = [np.arange(a, b, dtype=np.float32) - c for a, b, c in zip(lo, hi, centre)]
    grid = np.stack(np.meshgrid(*offsets, indexing="ij"), axis=-1)
    core_shift = rng.normal(0.0, 0.12, 3).astype(np.float32) * plan.r_oedema

    def blob_radius(shift: np.ndarray, radius: float, wobble: float, cell: float) -> np.ndarray:
        local_xyz = (grid - shift) @ frame
        r = np.sqrt(np.einsum("...i,...i->...", local_xyz, local_xyz)) / radius
        r *= np.clip(1.0 - wobble * smooth_field(rng, shape, max(2.0, cell)), 0.65, None)
        return r

    r_oedema = blob_radius(np.zeros(3, np.float32), plan.r_oedema, 0.3, 0.5 * plan.r_oedema)
    r_core = blob_radius(core_shift, plan.r_core, 0.18, 0.6 * plan.r_core)
    rim_wobble = 1.0 - 0.25 * smooth_field(rng, shape, max(2.0, 0.4 * plan.r_core))

    brain = tissue.brain[local]
    gm = tissue.gm[local]
    csf = tissue.csf[local]
    # Oedema tracks white matter: shrinks into cortex, avoids CSF and the brain surface.
    oedema_radius = r_oedema + 0.35 * gm + 0.6 * csf
    px = 1.0 / plan.r_oedema
    core = ramp(1.0 - r_core, 1.5 / plan.r_core) * brain
    oedema = np.maximum(ramp(1.0 - oedema_radius, 6.0 * px), core) * brain

    seg = np.zeros(shape, np.int16)
    seg[(oedema_radius < 1.0) & brain] = 2
    core_mask = (r_core < 1.0) & brain
    if not core_mask.any():  # degenerate small case: keep at least the tumour centre voxel
        centre_idx = tuple(np.clip(np.round(centre - lo).astype(int), 0, np.array(shape) - 1))
        core_mask[centre_idx] = brain[centre_idx]
    if plan.grade == "HGG":
        necrosis_radius = r_core * rim_wobble
        necrosis_mask = core_mask & (necrosis_radius < plan.necrosis_ratio)
        if necrosis_mask.sum() >= core_mask.sum():  # HGG always keeps an enhancing rim
            necrosis_mask[:] = False
        necrosis = ramp(plan.necrosis_ratio - necrosis_radius, 1.5 / plan.r_core) * core
        seg[core_mask] = 4
        seg[necrosis_mask] = 1
    else:
        necrosis = np.zeros(shape, np.float32)
        seg[core_mask] = 1
    return _Tumour(local=local, seg=seg, oedema=oedema, core=core, necrosis=necrosis)


# --------------------------------------------------------------------------- intensities

# Tissue means per modality, calibrated on a real BraTS 2018/2019 case
# (brain medians: flair ~330, t1 ~530, t1ce ~315, t2 ~420).
_MEANS: dict[str, dict[str, float]] = {
    #          WM     GM     CSF   oedema  necrosis  enhancing  non-enh. core (LGG)
    "flair": {"wm": 330, "gm": 390, "csf": 80, "ed": 530, "ncr": 330, "et": 460, "net": 470},
    "t1": {"wm": 590, "gm": 470, "csf": 210, "ed": 470, "ncr": 330, "et": 520, "net": 440},
    "t1ce": {"wm": 330, "gm": 300, "csf": 130, "ed": 320, "ncr": 180, "et": 720, "net": 300},
    "t2": {"wm": 360, "gm": 450, "csf": 950, "ed": 640, "ncr": 840, "et": 560, "net": 700},
}
_LGG_CONTRAST = 0.65  # LGG lesion intensities sit this fraction of the way from WM to the HGG value


def _render(
    rng: np.random.Generator,
    head: Head,
    tissue: Tissue,
    tumour: _Tumour,
    modality: str,
    texture: np.ndarray,
    grade: str,
) -> np.ndarray:
    """One modality on the head box as float32 (before int16 conversion)."""
    means = {k: v * rng.normal(1.0, 0.04) for k, v in _MEANS[modality].items()}
    gain = rng.uniform(0.85, 1.15)
    wm = means["wm"]
    if grade == "LGG":
        for key in ("ed", "net"):
            means[key] = wm + _LGG_CONTRAST * (means[key] - wm)

    image = (means["gm"] - wm) * tissue.gm
    image += (means["csf"] - wm) * tissue.csf
    image += wm
    image *= 1.0 + rng.uniform(0.02, 0.05) * texture
    if modality == "t1ce":  # enhancing cortical vessels / dura in the sulcal CSF
        vessels = ramp(texture - 1.0, 0.5)
        vessels *= tissue.cortical_csf
        image += rng.uniform(400.0, 700.0) * vessels

    sub = image[tumour.local]
    lesion_texture = 1.0 + rng.uniform(0.06, 0.12) * texture[tumour.local]
    sub += tumour.oedema * (means["ed"] * lesion_texture - sub)
    core_value = means["et"] if grade == "HGG" else means["net"]
    sub += tumour.core * (core_value * lesion_texture - sub)
    sub += tumour.necrosis * (means["ncr"] * lesion_texture - sub)

    x_bias, y_bias, z_bias = _bias_factors(rng, head)
    image *= np.float32(gain) * x_bias * y_bias
    image *= z_bias
    return image


def _bias_factors(rng: np.random.Generator, head: Head) -> list[np.ndarray]:
    """Smooth multiplicative bias field, separable: exp of a random quadratic per axis (~ +/-15%)."""
    factors = []
    for axis, s in enumerate(head.box):
        t = (np.arange(s.start, s.stop, dtype=np.float32) - head.centre[axis]) / head.semi[axis]
        a, b = rng.normal(0.0, 0.07, 2)
        factor = np.exp(a * t + b * (t * t - 0.33)).astype(np.float32)
        factors.append(factor.reshape([-1 if k == axis else 1 for k in range(3)]))
    return factors


def _to_int16(
    rng: np.random.Generator, image: np.ndarray, brain: np.ndarray, noise_sd: float, shape: Shape, box: Box
) -> np.ndarray:
    values = image[brain]
    values += noise_sd * rng.standard_normal(values.shape, dtype=np.float32)
    np.rint(values, out=values)
    np.clip(values, 1, np.iinfo(np.int16).max, out=values)
    out = np.zeros(shape, np.int16)
    out[box][brain] = values.astype(np.int16)
    return out


# --------------------------------------------------------------------------- public API


def make_case(rng: np.random.Generator, shape: Shape = BRATS_SHAPE, grade: str = "HGG") -> dict[str, np.ndarray]:
    """One synthetic case: ``{"flair", "t1", "t1ce", "t2", "seg"}`` -> int16 arrays of ``shape`` (X, Y, Z).

    HGG always contains label 4 (enhancing rim; in practice also 1 and 2); LGG never contains
    label 4 (its core is label 1).  Brain voxels are >= 1 in every modality, everything outside
    the brain is exactly 0 (so ``flair > 0`` is the brain mask) and the tumour lies inside it.
    """
    if grade not in GRADES:
        raise ValueError(f"grade must be one of {GRADES}, got {grade!r}")
    shape = tuple(int(n) for n in shape)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3-D with every side >= 16, got {shape}")

    head = make_head(rng, shape)
    plan = plan_tumour(rng, head, grade)
    tissue = make_tissue(rng, head, plan)
    tumour = _make_tumour(rng, head, tissue, plan)
    box_shape = tissue.brain.shape
    texture = smooth_field(rng, box_shape, max(2.0, 3.0 * float(head.semi.mean()) / 75.0))

    case: dict[str, np.ndarray] = {}
    for modality in MODALITIES:
        image = _render(rng, head, tissue, tumour, modality, texture, grade)
        noise_sd = rng.uniform(0.02, 0.035) * _MEANS[modality]["wm"]
        case[modality] = _to_int16(rng, image, tissue.brain, noise_sd, shape, head.box)

    seg = np.zeros(shape, np.int16)
    seg[head.box][tumour.local] = tumour.seg
    case["seg"] = seg
    return case


def _tissue_masks(rng: np.random.Generator, shape: Shape = BRATS_SHAPE, grade: str = "HGG") -> dict[str, np.ndarray]:
    """Full-volume boolean masks (brain, wm, gm, csf: majority tissue) for a fresh case drawn
    from ``rng`` -- consumes ``rng`` exactly like :func:`make_case` up to the tissue step, so
    calling both with identically seeded generators describes the same case.  For tests."""
    head = make_head(rng, shape)
    plan = plan_tumour(rng, head, grade)
    tissue = make_tissue(rng, head, plan)
    masks = {}
    wm = 1.0 - tissue.gm - tissue.csf
    for name, inside in (
        ("brain", tissue.brain),
        ("wm", tissue.brain & (wm > 0.9)),
        ("gm", tissue.brain & (tissue.gm > 0.9)),
        ("csf", tissue.brain & (tissue.csf > 0.9)),
    ):
        full = np.zeros(shape, bool)
        full[head.box] = inside
        masks[name] = full
    return masks


def write_case(
    case_dir: str | Path,
    case_id: str,
    volumes: Mapping[str, np.ndarray],
    shape: Shape = BRATS_SHAPE,
    with_seg: bool = True,
) -> Path:
    """Write ``<case_dir>/<case_id>_<modality>.nii.gz`` (and ``_seg.nii.gz``) like real BraTS files.

    int16, 1 mm voxels, BraTS affine; images carry qform code 2 / sform code 1 and the seg
    qform code 1 / sform code 1, exactly as in the released BraTS files; units mm.
    """
    case_dir = Path(case_dir)
    case_dir.mkdir(parents=True, exist_ok=True)
    affine = brats_affine(shape)
    names = list(MODALITIES) + (["seg"] if with_seg else [])
    for name in names:
        data = np.asarray(volumes[name])
        if data.shape != tuple(shape):
            raise ValueError(f"{name}: shape {data.shape} != {tuple(shape)}")
        img = nib.Nifti1Image(data.astype(np.int16, copy=False), affine)
        img.set_data_dtype(np.int16)
        img.header.set_qform(affine, code=1 if name == "seg" else 2)
        img.header.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        nib.save(img, case_dir / f"{case_id}_{name}.nii.gz")
    return case_dir


def case_id(prefix: str, index: int) -> str:
    """Case id for 0-based ``index``: ``BraTS19`` -> ``BraTS19_SYN_0001_1``; a prefix that already
    carries a tag (contains ``_``), e.g. ``BraTS19_NEW``, is used as is -> ``BraTS19_NEW_0001_1``."""
    stem = prefix if "_" in prefix else f"{prefix}_SYN"
    return f"{stem}_{index + 1:04d}_1"


def write_dataset(
    out: str | Path,
    cases: int,
    seed: int = 0,
    shape: Shape = BRATS_SHAPE,
    lgg_fraction: float = 0.3,
    with_seg: bool = True,
    layout: str = "brats",
    prefix: str = "BraTS19",
) -> list[Path]:
    """Write ``cases`` synthetic cases under ``out`` and return their directories in order.

    ``layout="brats"``: ``<out>/{HGG,LGG}/<id>/<id>_<mod>.nii.gz``; ``layout="flat"``:
    ``<out>/<id>/...``.  Case ``i`` (grade included) depends only on ``(seed, i)``.
    """
    if layout not in ("brats", "flat"):
        raise ValueError(f"layout must be 'brats' or 'flat', got {layout!r}")
    out = Path(out)
    dirs: list[Path] = []
    for index in range(cases):
        rng = np.random.default_rng([seed, index])
        grade = "LGG" if rng.random() < lgg_fraction else "HGG"
        volumes = make_case(rng, shape=shape, grade=grade)
        cid = case_id(prefix, index)
        parent = out / grade if layout == "brats" else out
        dirs.append(write_case(parent / cid, cid, volumes, shape, with_seg=with_seg))
    return dirs
