"""Point-cloud pre-processing for RegionBLIP (section 3.1 and the released data loaders, reference/original_repos.md 2d).

Object clouds (Objaverse / Cap3D, the P-text data) are sampled to a fixed count by farthest point sampling, centred on
their centroid and scaled into the unit sphere. Scene clouds (ScanRefer, the P-region-text data) are sampled at random
and kept in raw scene units. A region of a scene is an axis-aligned 3D box handed to PaFE as its 8 corners x xyz.
Everything here works on numpy arrays, is seeded, and applies the same transform to a cloud and its box, so the box
keeps framing the same points.

Like every file in `processing/`, it imports nothing from `modeling/`.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = [
    "CORNER_SIGNS",
    "augment_point_cloud",
    "box_3d_corners",
    "farthest_point_sample_numpy",
    "normalize_to_unit_sphere",
    "sample_points",
]

# Corner order of the released ScanRefer loader: (+,+,+), (+,+,-), (-,+,-), (-,+,+), (+,-,+), (+,-,-), (-,-,-), (-,-,+).
CORNER_SIGNS = np.array(
    [[1, 1, 1], [1, 1, -1], [-1, 1, -1], [-1, 1, 1], [1, -1, 1], [1, -1, -1], [-1, -1, -1], [-1, -1, 1]],
    dtype=np.float64,
)
_CONVENTIONS = ("released", "exact")


def farthest_point_sample_numpy(points: np.ndarray, num_samples: int, start_index: int = 0) -> np.ndarray:
    """Indices `(num_samples,)` of a farthest-point sample of `points (N, 3)`, starting at `start_index`.

    O(N * num_samples) time, O(N) memory (one running min-distance vector).
    """
    num_points = points.shape[0]
    selected = np.empty(num_samples, dtype=np.int64)
    min_distance = np.full(num_points, np.inf)
    current = int(start_index)
    for step in range(num_samples):
        selected[step] = current
        min_distance = np.minimum(min_distance, ((points - points[current]) ** 2).sum(axis=1))
        current = int(min_distance.argmax())
    return selected


def sample_points(points: np.ndarray, num_points: int, method: str, rng: np.random.Generator) -> np.ndarray:
    """Exactly `num_points` rows of `points (N, C)`: all of them (shuffled) when `N == num_points`, else FPS with a
    random start (`method="fps"`) or a random subset without replacement (`"random"`)."""
    count = points.shape[0]
    if count < num_points:
        raise ValueError(f"needs at least {num_points} points, got {count}")
    if method == "fps" and count > num_points:
        index = farthest_point_sample_numpy(points[:, :3], num_points, start_index=int(rng.integers(count)))
    else:
        index = rng.permutation(count)[:num_points]
    return points[index]


def normalize_to_unit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Released `pc_norm`: the centroid `(3,)` and the largest distance from it (1.0 for a single point)."""
    centroid = points[:, :3].mean(axis=0)
    radius = float(np.sqrt(((points[:, :3] - centroid) ** 2).sum(axis=1)).max())
    return centroid, radius if radius > 0 else 1.0


def box_3d_corners(box: Any, convention: str = "released") -> np.ndarray:
    """One 3D box -> its 8 corners `(8, 3)` in `CORNER_SIGNS` order.

    Args:
        box: 6 numbers `(cx, cy, cz, sx, sy, sz)` (axis-aligned centre + size) or 8 corners `(8, 3)` / 24 numbers
            (returned as given).
        convention: `"released"` reproduces the released ScanRefer loader, whose y and z half-extents are swapped
            (corner = centre + signs * (sx, sz, sy) / 2); `"exact"` uses (sx, sy, sz) / 2.
    """
    if convention not in _CONVENTIONS:
        raise ValueError(f"`box_3d_convention` must be one of {_CONVENTIONS}; got {convention!r}.")
    array = np.asarray(box, dtype=np.float64)
    if array.size == 24:
        return array.reshape(8, 3)
    if array.shape != (6,):
        raise ValueError(f"a 3D box must be 6 numbers (cx, cy, cz, sx, sy, sz) or 8 corners x xyz; got {array.shape}")
    centre, size = array[:3], array[3:]
    if (size < 0).any():
        raise ValueError(f"a 3D box must have non-negative sizes; got {size.tolist()}")
    extents = size[[0, 2, 1]] if convention == "released" else size
    return centre + CORNER_SIGNS * extents / 2.0


def augment_point_cloud(
    points: np.ndarray,
    corners: np.ndarray | None,
    rng: np.random.Generator,
    *,
    scale_range: tuple[float, float] = (0.8, 1.25),
    shift_range: float = 0.1,
    rotate: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Released training augmentation: random rotation about the up (z) axis, anisotropic scale, shift.

    The same transform is applied to `points (N, C)` (xyz columns only) and `corners (8, 3)`.
    """
    if not (isinstance(shift_range, numbers.Real) and shift_range >= 0):
        raise ValueError(f"`shift_range` must be >= 0; got {shift_range!r}.")
    angle = rng.uniform(0.0, 2.0 * np.pi) if rotate else 0.0
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    scale = rng.uniform(scale_range[0], scale_range[1], size=3)
    shift = rng.uniform(-shift_range, shift_range, size=3)

    def transform(xyz: np.ndarray) -> np.ndarray:
        return (xyz @ rotation.T) * scale + shift

    augmented = points.copy()
    augmented[:, :3] = transform(points[:, :3])
    return augmented, None if corners is None else transform(corners)
