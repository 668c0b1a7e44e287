"""Where a scan's axial slices lie on its own grid, and the way back.

Geometry: the network sees axial slices of one canonical grid: the BraTS orientation (voxel axes
towards Left, Posterior, Superior: ``AXCODES``), ``SPACING`` mm in-plane, and the profile's window
laid over the brain. A scan on any other grid is brought there, and every output goes back to the
scan's own grid, voxel for voxel (``Geometry``, recorded with each case; ``to_labels``)::

    input grid (X, Y, Z), any orientation, any spacing
      -> reorient: axes permuted and flipped to AXCODES                exact (nibabel.orientations)
      -> resample in-plane to SPACING: images linear, labels nearest   only when the spacing differs
      -> window: the profile's size, centred on the grid, shifted just   exact: only background is
         enough to hold the whole brain, zero-padded past the grid       cut or added
         (for inference, grown to the brain if the brain is larger;
         profile full: the whole plane)
      -> downsample by the profile's factor

and back: upsample the class scores linearly, paste them into the window (background outside),
resample them to the input's in-plane spacing, decide the labels, reorient. Z is never resampled: the
network is 2D, so every axial slice is predicted on its own at its own position, whatever the
slice spacing. A BraTS scan (240x240xN, 1 mm, LPS) passes through unchanged but for the window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from nibabel.orientations import aff2axcodes, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from storage.brats import CLASS_TO_BRATS
from unet.outputs import Outputs, labels_of

AXCODES = ("L", "P", "S")  # the BraTS orientation: affine diag(-1, -1, 1)
SPACING = 1.0  # mm, in-plane, of the slice grid before the profile's downsampling
SPACING_RTOL = 0.01  # closer than this to SPACING counts as equal (no resampling)
MIN_PLANE = 8  # fewer voxels than this along an in-plane axis: a single sagittal/coronal slice, not a volume


@dataclass(frozen=True)
class Geometry:
    """How one scan maps to its slices. All fields are plain ints, so it round-trips through JSON."""

    shape: tuple[int, int, int]  # the input grid (X, Y, Z)
    ornt: tuple[tuple[int, int], ...]  # input axis i -> canonical axis ornt[i][0], flipped when ornt[i][1] == -1
    plane: tuple[int, int]  # in-plane size (H, W) after resampling to SPACING, on the canonical grid
    box: tuple[int, int, int, int]  # window (y0, y1, x0, x1) on that plane; may reach past it (zeros there)
    factor: int  # the profile's downsampling

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            tuple(d["shape"]), tuple(tuple(a) for a in d["ornt"]), tuple(d["plane"]), tuple(d["box"]), int(d["factor"])
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def oriented(self) -> tuple[int, int, int]:
        """The input grid's shape once reoriented (before resampling)."""
        out = [0, 0, 0]
        for size, (axis, _) in zip(self.shape, self.ornt):
            out[axis] = size
        return tuple(out)

    @property
    def slices(self) -> int:
        return self.oriented[2]

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(h, w) of the network's slices."""
        y0, y1, x0, x1 = self.box
        return (y1 - y0) // self.factor, (x1 - x0) // self.factor

    @property
    def resampled(self) -> bool:
        return tuple(self.plane) != tuple(self.oriented[:2])

    # ------------------------------------------------------------------ input grid -> slices

    def reorient(self, volume: np.ndarray) -> np.ndarray:
        """(X, Y, Z, ...) on the input grid -> the canonical orientation (a view, no copy)."""
        return _apply(volume, self.ornt)

    def window(self, planes: np.ndarray, order: int = 1) -> np.ndarray:
        """(..., H0, W0) planes of the oriented grid -> (..., window) resampled, cut and zero-padded."""
        return self.crop(self.resample(planes, order))

    def resample(self, planes: np.ndarray, order: int = 1) -> np.ndarray:
        """(..., H0, W0) planes of the oriented grid -> (..., H, W) at ``SPACING`` (themselves when already)."""
        return _zoom_plane(planes, self.plane, order) if self.resampled else planes

    def crop(self, planes: np.ndarray) -> np.ndarray:
        """(..., H, W) resampled planes -> (..., window): cut, and zero-padded past the plane."""
        y0, y1, x0, x1 = self.box
        h, w = self.plane
        if (y0, y1, x0, x1) == (0, h, 0, w):
            return planes
        out = np.zeros((*planes.shape[:-2], y1 - y0, x1 - x0), dtype=planes.dtype)
        sy, sx = slice(max(y0, 0), min(y1, h)), slice(max(x0, 0), min(x1, w))
        out[..., sy.start - y0 : sy.stop - y0, sx.start - x0 : sx.stop - x0] = planes[..., sy, sx]
        return out

    # ------------------------------------------------------------------ slices -> input grid

    def restore(self, scores: np.ndarray, outputs: Outputs = "classes") -> np.ndarray:
        """(n, K, h, w) class probabilities of n slices -> (X0, Y0, n) class ids on the oriented input grid.

        Probabilities are upsampled linearly before the labels are decided (the argmax, or for region
        outputs the painting of ``unet.outputs.labels_of``; geometry of the labels: the network's
        pixel i sits on window row ``f*i``), pasted into the window (background outside), and
        resampled back to the input's in-plane spacing when it differs.
        """

        n, k = scores.shape[:2]
        if tuple(scores.shape[2:]) != self.slice_shape:
            raise ValueError(f"scores {scores.shape} do not fit the slices {self.slice_shape} of this scan")
        f = self.factor
        if f > 1:
            scores = _upsample_linear(_upsample_linear(np.asarray(scores, dtype=np.float32), f, 2), f, 3)
        y0, y1, x0, x1 = self.box
        h, w = self.plane
        sy, sx = slice(max(y0, 0), min(y1, h)), slice(max(x0, 0), min(x1, w))
        inside = scores[..., sy.start - y0 : sy.stop - y0, sx.start - x0 : sx.stop - x0]
        if not self.resampled:  # labels first: one byte a voxel from here on
            classes = np.zeros((n, h, w), dtype=np.uint8)
            classes[:, sy, sx] = labels_of(inside, outputs)
        else:
            plane = np.zeros((n, k, h, w), dtype=np.float32)
            plane[:, 0] = 1.0  # background outside the window
            plane[:, :, sy, sx] = inside
            classes = labels_of(_zoom_plane(plane, self.oriented[:2], order=1), outputs)
        return classes.transpose(1, 2, 0)

    def unorient(self, volume: np.ndarray) -> np.ndarray:
        """(X0, Y0, Z0, ...) on the oriented grid -> the input grid's own axes (a view)."""
        back = [(0, 1)] * 3
        for axis, (target, flip) in enumerate(self.ornt):
            back[target] = (axis, flip)
        return _apply(volume, back)


AXCODES_ORNT = axcodes2ornt(AXCODES)


def geometry_of(
    affine: np.ndarray,
    shape: tuple[int, ...],
    zooms: tuple[float, ...],
    brain: np.ndarray,
    window: int | None,
    factor: int,
    grow: bool = False,
) -> Geometry:
    """The geometry of one scan: ``brain`` is its (X, Y, Z) brain mask on the input grid.

    The window is ``window`` voxels square, grid-centred, moved just enough to hold the brain's
    in-plane bounding box; ``None`` is the whole plane. A brain larger than the window is cut
    (training data: a fixed slice size) or, with ``grow``, the window grows to hold it (inference:
    every brain voxel is predicted). Raises ValueError for what cannot be a brain scan.
    """
    if len(shape) != 3:
        raise ValueError(f"image is {len(shape)}D {tuple(shape)}; expected a 3D volume")
    ornt = ornt_transform(io_orientation(affine), AXCODES_ORNT).astype(int)
    oriented = [0, 0, 0]
    spacing = [0.0, 0.0, 0.0]
    for size, zoom, (axis, _) in zip(shape, zooms, ornt):
        oriented[axis], spacing[axis] = int(size), float(zoom)
    extent = [oriented[i] * spacing[i] for i in (0, 1)]
    if min(oriented[:2]) < MIN_PLANE:
        raise ValueError(
            f"{oriented[0]}×{oriented[1]} voxels in the axial plane (grid {tuple(shape)}, "
            f"{''.join(aff2axcodes(affine))}); expected a 3D brain volume with axial slices"
        )
    plane = tuple(
        oriented[i] if abs(spacing[i] - SPACING) <= SPACING_RTOL * SPACING else max(1, round(extent[i] / SPACING))
        for i in (0, 1)
    )
    mask = _apply(brain, ornt).any(axis=2)  # in-plane footprint of the brain, oriented grid
    if plane != tuple(oriented[:2]):
        mask = _zoom_plane(mask.astype(np.float32), plane, order=1) > 0
    box = []
    for axis in (0, 1):
        hit = np.flatnonzero(mask.any(axis=1 - axis))
        lo, hi = (int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, plane[axis])
        size = plane[axis] if window is None else window
        if grow and hi - lo > size:
            size = -(-(hi - lo) // factor) * factor  # every brain voxel, a multiple of the factor
        start = (plane[axis] - size) // 2
        start = min(max(start, hi - size), lo) if hi - lo <= size else (lo + hi - size) // 2
        box += [start, start + size]
    return Geometry(tuple(int(s) for s in shape), tuple((int(a), int(f)) for a, f in ornt), plane, tuple(box), factor)


def _apply(volume: np.ndarray, ornt) -> np.ndarray:
    """nibabel's ``apply_orientation`` as views: flips, then the transpose of the first 3 axes."""
    out = np.asarray(volume)
    ornt = np.asarray(ornt)
    for axis, (_, flip) in enumerate(ornt):
        if flip == -1:
            out = np.flip(out, axis=axis)
    order = list(range(out.ndim))
    order[:3] = np.argsort(ornt[:, 0]).tolist()
    return out.transpose(order)


def _zoom_plane(planes: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """Resample the last two axes to ``size``; pixel edges stay aligned (``grid_mode``), so the field of
    view is the same and going there and back lands on the very same grid."""
    h, w = planes.shape[-2:]
    factors = (1.0,) * (planes.ndim - 2) + (size[0] / h, size[1] / w)
    out = ndimage.zoom(planes, factors, order=order, grid_mode=True, mode="grid-constant" if order == 0 else "nearest")
    assert out.shape[-2:] == tuple(size), (out.shape, size)
    return out


def _upsample_linear(a: np.ndarray, f: int, axis: int) -> np.ndarray:
    """Linear interpolation by an integer factor along ``axis``; sample i lands on output f*i.

    Output f*i + r (0 <= r < f) is ``(1 - r/f) * a[i] + r/f * a[i + 1]``; past the last sample
    the edge value is held.
    """
    n = a.shape[axis]
    nxt = np.take(a, np.minimum(np.arange(1, n + 1), n - 1), axis=axis)
    parts = [a if r == 0 else (1 - r / f) * a + (r / f) * nxt for r in range(f)]
    out = np.stack(parts, axis=axis + 1)  # (..., n, f, ...)
    return out.reshape(*a.shape[:axis], n * f, *a.shape[axis + 1 :])


def to_labels(geometry: Geometry, classes: np.ndarray) -> np.ndarray:
    """(X0, Y0, Z0) network classes on the oriented input grid (``Geometry.restore``) -> (X, Y, Z) uint8
    BraTS labels {0, 1, 2, 4} on the input's own grid."""
    return CLASS_TO_BRATS[geometry.unorient(classes)]
