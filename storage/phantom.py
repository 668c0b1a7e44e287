"""The healthy head of a synthetic BraTS case (``storage.synth``): its shape, its tissues, and the
place of its tumour.

* Brain: an egg-shaped ellipsoid, slightly rotated and rescaled per case, whose surface is perturbed
  by smooth random fields (generated on a coarse grid and trilinearly upsampled). It covers only
  part of the field of view and ~80% of the axial slices.
* Healthy tissue as soft (partial-volume) fractions of white matter (WM), grey matter (GM) and CSF:
  a cortical GM ribbon under a thin CSF rim, sheet-like sulci (the zero set of a random field), the
  interhemispheric fissure, two banana-shaped lateral ventricles plus a third ventricle, and deep
  grey nuclei; the tumour pushes the ventricles away (mass effect).

All voxel work is float32 on the brain's bounding box only; randomness comes only from the generator
passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Shape = tuple[int, int, int]
Box = tuple[slice, slice, slice]


# --------------------------------------------------------------------------- smooth fields


def upsample(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear upsampling (corners aligned) by separable lerps; ~10x faster than ndimage.zoom."""
    out = coarse
    for axis in reversed(range(coarse.ndim)):
        m, n = out.shape[axis], shape[axis]
        pos = np.linspace(0.0, m - 1.0, n, dtype=np.float32)
        lo_idx = np.minimum(pos.astype(np.intp), max(m - 2, 0))
        hi_idx = np.minimum(lo_idx + 1, m - 1)
        weight = (pos - lo_idx).reshape([n if a == axis else 1 for a in range(out.ndim)])
        lo = np.take(out, lo_idx, axis=axis)
        hi = np.take(out, hi_idx, axis=axis)
        hi -= lo
        hi *= weight
        lo += hi
        out = lo
    return out


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cell: float) -> np.ndarray:
    """Zero-mean, roughly unit-variance random field with features about ``cell`` voxels wide."""
    # White noise on a grid of spacing cell/3, blurred over ~1 cell there (so the field is smooth
    # relative to the grid and trilinear upsampling leaves no visible facets), then upsampled.
    spacing = min(cell, max(1.5, cell / 3.0))
    coarse_shape = tuple(max(4, int(np.ceil(n / spacing)) + 1) for n in shape)
    coarse = rng.standard_normal(coarse_shape, dtype=np.float32)
    coarse = ndimage.gaussian_filter(coarse, cell / (2.0 * spacing), mode="wrap")
    coarse -= coarse.mean()
    coarse /= coarse.std() + 1e-6
    return upsample(coarse, shape)


def ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Soft step 0 -> 1 centred on x = 0 and ``width`` wide (a partial-volume edge), as a new array."""
    y = x / np.float32(width)
    y += 0.5
    return np.clip(y, 0.0, 1.0, out=y)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Head:
    """Per-case brain geometry in voxel units (semi-axes, centre, in-plane rotation)."""

    centre: np.ndarray  # (3,) voxel coordinates
    semi: np.ndarray  # (3,) semi-axes in voxels
    angle: float  # rotation about the z axis, radians
    box: Box  # bounding box of the brain inside the volume

    @property
    def voxel(self) -> float:
        """One voxel expressed in normalised brain units (for partial-volume ramps)."""
        return float(1.0 / self.semi.mean())

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalised, rotated coordinates (u: left-right, v: anterior-posterior, w: up) on ``box``,
        as broadcastable arrays of shapes (X, Y, 1), (X, Y, 1), (1, 1, Z)."""
        x, y, z = (np.arange(s.start, s.stop, dtype=np.float32) - c for s, c in zip(box, self.centre))
        cos, sin = np.float32(np.cos(self.angle)), np.float32(np.sin(self.angle))
        u = (cos * x[:, None] + sin * y[None, :])[:, :, None] / self.semi[0]
        v = (-sin * x[:, None] + cos * y[None, :])[:, :, None] / self.semi[1]
        w = (z / self.semi[2])[None, None, :]
        return u.astype(np.float32), v.astype(np.float32), w.astype(np.float32)


def make_head(rng: np.random.Generator, shape: Shape) -> Head:
    size = np.asarray(shape, dtype=np.float64)
    semi = size * np.array([0.29, 0.355, 0.395]) * rng.uniform(0.92, 1.05) * rng.uniform(0.97, 1.03, 3)
    centre = size * np.array([0.5, 0.55, 0.495]) - 0.5 + rng.normal(0.0, 0.01, 3) * size
    angle = float(np.deg2rad(rng.normal(0.0, 4.0)))
    reach = semi * np.array([1.3, 1.25, 1.25])
    # One empty voxel is always left at the volume border, even for an extreme draw.
    lo = np.clip(np.floor(centre - reach), 1, size - 1).astype(int)
    hi = np.clip(np.ceil(centre + reach) + 1, 1, size - 1).astype(int)
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    return Head(centre=centre.astype(np.float32), semi=semi.astype(np.float32), angle=angle, box=box)


@dataclass(frozen=True)
class TumourPlan:
    """Where the tumour sits (normalised brain coordinates) and how big it is (voxels)."""

    centre: np.ndarray  # (3,) normalised (u, v, w)
    r_oedema: float
    r_core: float
    necrosis_ratio: float  # necrosis radius / core radius (0 for LGG)
    grade: str


def plan_tumour(rng: np.random.Generator, head: Head, grade: str) -> TumourPlan:
    side = rng.choice([-1.0, 1.0])
    for _ in range(1000):
        centre = np.array([side * rng.uniform(0.12, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(-0.4, 0.55)])
        if np.linalg.norm(centre) < 0.68:
            break
    scale = float(head.semi.mean()) / 75.0
    if grade == "HGG":
        r_oedema = rng.uniform(15.0, 32.0) * scale
        r_core = max(r_oedema * rng.uniform(0.5, 0.78), 2.0)
        necrosis_ratio = rng.uniform(0.35, 0.7)
    else:
        r_oedema = rng.uniform(14.0, 30.0) * scale
        r_core = max(r_oedema * rng.uniform(0.35, 0.65), 2.0)
        necrosis_ratio = 0.0
    return TumourPlan(centre.astype(np.float32), r_oedema, r_core, necrosis_ratio, grade)


# --------------------------------------------------------------------------- healthy tissue


@dataclass
class Tissue:
    """Soft tissue fractions on the head box; wm = 1 - gm - csf inside the brain."""

    brain: np.ndarray  # bool
    gm: np.ndarray
    csf: np.ndarray
    cortical_csf: np.ndarray  # the sulcal / surface part of csf (hosts enhancing vessels)


def make_tissue(rng: np.random.Generator, head: Head, tumour: TumourPlan) -> Tissue:
    box = head.box
    shape = tuple(s.stop - s.start for s in box)
    scale = float(head.semi.mean()) / 75.0
    px = head.voxel
    u, v, w = head.coords(box)

    # Egg-shaped ellipsoid: wider at the back, flatter underneath, bumpy surface.
    egg_u = u / (1.0 + 0.07 * v)
    egg_w = w / np.where(w < 0, 0.9, 1.0).astype(np.float32)
    depth = np.sqrt(egg_u * egg_u + v * v + egg_w * egg_w)
    depth *= np.clip(1.0 - 0.045 * smooth_field(rng, shape, max(3.0, 14.0 * scale)), 0.9, 1.1)
    depth *= np.clip(1.0 - 0.015 * smooth_field(rng, shape, max(2.0, 6.0 * scale)), 0.96, 1.04)
    brain = largest_component(depth < 1.0)

    # Cortex: a thin CSF rim over a GM ribbon, folded by sulci = CSF sheets along the zero set
    # of a random field, each lined with GM on both sides, reaching ~20% deep.
    folds = np.abs(smooth_field(rng, shape, max(2.0, 8.0 * scale)))
    cortex = ramp(depth - 0.8, 4 * px)
    rim = ramp(depth - (1.0 - 1.2 * px), 1.2 * px)
    sulci = ramp(0.1 - folds, 0.1)
    sulci *= cortex
    gm = ramp(0.5 - folds, 0.2)
    gm *= cortex
    np.maximum(gm, ramp(depth - (1.0 - 5.0 * px), 1.5 * px), out=gm)
    u_voxel = 1.0 / float(head.semi[0])
    fissure = ramp((0.3 + 0.9 * min(scale, 1.0)) * u_voxel - np.abs(u), u_voxel)
    fissure = fissure * ramp(np.maximum(w - 0.32, np.abs(v) - 0.55), 0.05)
    csf = np.maximum(np.maximum(rim, sulci), fissure)
    cortical_csf = csf.copy()

    add_deep_structures(rng, head, tumour, gm, csf)
    gm *= 1.0 - csf
    return Tissue(brain=brain, gm=gm, csf=csf, cortical_csf=cortical_csf)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Drop the occasional detached speck the surface noise can pinch off: one brain, one piece."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)


def add_deep_structures(
    rng: np.random.Generator, head: Head, tumour: TumourPlan, gm: np.ndarray, csf: np.ndarray
) -> None:
    """Ventricles and deep grey nuclei, displaced away from the tumour (mass effect), in place."""
    reach = head.semi * np.array([0.5, 0.8, 0.5])
    lo = np.maximum(np.floor(head.centre - reach).astype(int), [s.start for s in head.box])
    hi = np.minimum(np.ceil(head.centre + reach).astype(int) + 1, [s.stop for s in head.box])
    sub = tuple(slice(a, b) for a, b in zip(lo, hi))
    local = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sub, head.box))
    u, v, w = np.broadcast_arrays(*head.coords(sub))

    # Mass effect: sample the template closer to the tumour centre -> structures pushed away.
    du, dv, dw = u - tumour.centre[0], v - tumour.centre[1], w - tumour.centre[2]
    sigma = 1.6 * tumour.r_oedema / float(head.semi.mean())
    strength = rng.uniform(0.2, 0.45) if tumour.grade == "HGG" else rng.uniform(0.05, 0.2)
    push = strength * np.exp(-(du * du + dv * dv + dw * dw) / (sigma * sigma))
    u, v, w = u - push * du, v - push * dv, w - push * dw

    atrophy = rng.uniform(0.8, 1.4)
    edge = 0.15 / atrophy
    ventricles = np.zeros(u.shape, np.float32)
    for side in (-1.0, 1.0):
        bend = 0.12 - 0.35 * v * v
        spread = side * (0.06 + 0.15 * v * v) * atrophy
        q = ((u - spread) / (0.06 * atrophy)) ** 2 + (v / 0.5) ** 2 + ((w - bend) / (0.08 * atrophy)) ** 2
        np.maximum(ventricles, ramp(1.0 - np.sqrt(q), edge), out=ventricles)
    q = (u / (0.02 * atrophy)) ** 2 + (v / 0.14) ** 2 + ((w + 0.04) / 0.12) ** 2
    np.maximum(ventricles, ramp(1.0 - np.sqrt(q), 0.3), out=ventricles)

    nuclei = np.zeros(u.shape, np.float32)
    for side in (-1.0, 1.0):
        q = ((u - side * 0.25) / 0.11) ** 2 + ((v + 0.02) / 0.2) ** 2 + ((w + 0.02) / 0.13) ** 2
        np.maximum(nuclei, 0.65 * ramp(1.0 - np.sqrt(q), 0.25), out=nuclei)

    np.maximum(csf[local], ventricles, out=csf[local])
    np.maximum(gm[local], nuclei, out=gm[local])
