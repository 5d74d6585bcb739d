"""Training-free piecewise-affine warp of a face along its dense landmarks (the "mesh warp" baseline and prior).

For every output pixel of the *driving* frame we find the triangle of the driving mesh that covers it and map
the pixel, with that triangle's affine map, to the same triangle in the *source* image. The result is a
backward sampling grid: where to read the source for each output pixel.

Triangles: the fixed face mesh, its hole fills and iris fans (`metaportrait.prior.topology`), and an outer band:
a ring at 1.4x the face oval (about its centroid, so hair and the head outline follow the head) and 20 fixed
points just outside the image (so the background stays put), triangulated with Delaunay on the source positions
(this part is the only per-call topology).

Visibility without depth: we have only 2D points, so overlapping triangles (a turned head folds the mesh) are
resolved by drawing order: outer band, then hole fills, then back-facing face triangles (whose winding is
opposite to the mesh's overall winding in this view), then front-facing ones from far to near, where "near"
is a fixed proxy: few mesh-graph hops from the nose tip.

Coordinates follow the landmark contract: continuous pixel coordinates, the centre of pixel column ``j`` is
``x = j + 0.5``, which is also ``grid_sample``'s ``align_corners=False`` convention (``u = 2 x / W - 1``).
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.spatial import Delaunay

from metaportrait.prior.eyelids import fill_lids
from metaportrait.prior.geometry import SUBPIXEL_BITS, check_landmarks, signed_areas
from metaportrait.prior.masks import face_mask
from metaportrait.prior.mouth import MOUTH_CORNERS, MOUTH_FILLS, MouthFill, mouth_split
from metaportrait.prior.topology import NUM_LANDMARKS, mesh_topology, strip_triangles

RING_SCALE = 1.4  # ring radius relative to the face oval, about the oval's centroid
BORDER_POINTS_PER_SIDE = 5  # 4 sides x 5 = 20 fixed points around the image
BORDER_MARGIN = 0.05  # fixed points sit this fraction of the image size outside it

# Face-masked variant (measured at 128 px, feasibility.md section 2): dilate the face-oval hull by 8 px and
# feather with sigma 3 px; both scale with the image size.
MASK_DILATE_AT_128 = 8.0
MASK_SIGMA_AT_128 = 3.0

_MIN_AREA = 1e-3  # px^2; thinner driving triangles are not drawn (their affine map is ill-conditioned)


def _border_points(height: int, width: int) -> np.ndarray:
    """``(20, 2)`` fixed points on a rectangle just outside the image."""
    margin = BORDER_MARGIN * max(height, width) + 1.0
    xs = np.linspace(-margin, width + margin, BORDER_POINTS_PER_SIDE + 1)
    ys = np.linspace(-margin, height + margin, BORDER_POINTS_PER_SIDE + 1)
    top = np.stack([xs[:-1], np.full(BORDER_POINTS_PER_SIDE, -margin)], 1)
    right = np.stack([np.full(BORDER_POINTS_PER_SIDE, width + margin), ys[:-1]], 1)
    bottom = np.stack([xs[::-1][:-1], np.full(BORDER_POINTS_PER_SIDE, height + margin)], 1)
    left = np.stack([np.full(BORDER_POINTS_PER_SIDE, -margin), ys[::-1][:-1]], 1)
    return np.concatenate([top, right, bottom, left])


def _ring(landmarks: np.ndarray, oval: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(36, 2)`` ring at `RING_SCALE` x the face oval, pulled in where it would pass the border points."""
    contour = landmarks[oval]
    centre = contour.mean(0)
    offset = (contour - centre) * RING_SCALE
    # Keep the ring inside the rectangle of fixed border points (half their margin), or the band between
    # them would fold. Scale each offset down just enough.
    half_margin = 0.5 * (BORDER_MARGIN * max(height, width) + 1.0)
    low = np.array([-half_margin, -half_margin]) - centre
    high = np.array([width + half_margin, height + half_margin]) - centre
    with np.errstate(divide="ignore", invalid="ignore"):
        limit = np.where(offset > 0, high / offset, np.where(offset < 0, low / offset, np.inf))
    shrink = np.clip(limit.min(1, keepdims=True), 0.0, 1.0)
    return centre + offset * shrink


_OUTER_BANDS: dict[bytes, np.ndarray] = {}  # source points -> their outer band; one source drives many frames
_OUTER_BANDS_KEPT = 8


def _outer_band(points: np.ndarray, oval: np.ndarray, num_face_points: int) -> np.ndarray:
    """`_outer_band_of` ``points``, remembered for the last few sources (it depends on the source alone)."""
    key = np.ascontiguousarray(points, np.float64).tobytes() + oval.tobytes() + num_face_points.to_bytes(4, "little")
    band = _OUTER_BANDS.get(key)
    if band is None:
        band = _outer_band_of(points, oval, num_face_points)
        if len(_OUTER_BANDS) >= _OUTER_BANDS_KEPT:
            _OUTER_BANDS.pop(next(iter(_OUTER_BANDS)), None)
        _OUTER_BANDS[key] = band
    return band


def _outer_band_of(points: np.ndarray, oval: np.ndarray, num_face_points: int) -> np.ndarray:
    """Delaunay triangles of oval + ring + border points that lie outside the face oval (indices into points)."""
    outer_indices = np.concatenate([oval, np.arange(num_face_points, len(points))])
    triangles = outer_indices[Delaunay(points[outer_indices]).simplices]
    centroids = points[triangles].mean(1).astype(np.float32)
    contour = points[oval].astype(np.float32).reshape(-1, 1, 2)
    outside = np.array([cv2.pointPolygonTest(contour, (float(x), float(y)), False) < 0 for x, y in centroids])
    return triangles[outside]


def _rasterise(points: np.ndarray, triangles: np.ndarray, index: np.ndarray, first_id: int) -> None:
    """Draw triangles (in order; later ones win) into ``index`` with ids ``first_id + k``; skips slivers."""
    # fillConvexPoly's integer pixel coordinates are pixel centres, ours are at +0.5.
    fixed = np.round((points - 0.5) * (1 << SUBPIXEL_BITS)).astype(np.int32)
    corners = fixed[triangles]  # (N, 3, 2)
    visible = np.abs(signed_areas(points, triangles)) > _MIN_AREA
    for k in np.flatnonzero(visible):
        cv2.fillConvexPoly(index, corners[k], int(first_id + k), cv2.LINE_8, SUBPIXEL_BITS)


def _affine_maps(source: np.ndarray, driving: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """``(N, 6)`` per-triangle affine maps from driving to source pixels: ``x_s = m0 x + m1 y + m2``, etc."""
    n = len(triangles)
    x, y = np.moveaxis(driving[triangles].astype(np.float64), 2, 0)  # (N, 3) each: the driving vertices
    target = source[triangles].transpose(0, 2, 1)  # (N, 2, 3)
    # The inverse of [[x0 x1 x2], [y0 y1 y2], [1 1 1]] in closed form (its adjugate over its determinant, twice
    # the signed area): much faster than np.linalg.inv on a thousand 3x3 matrices.
    x0, x1, x2, y0, y1, y2 = x[:, 0], x[:, 1], x[:, 2], y[:, 0], y[:, 1], y[:, 2]
    det = x0 * (y1 - y2) + x1 * (y2 - y0) + x2 * (y0 - y1)
    ok = np.abs(det) > 2 * _MIN_AREA
    adjugate = np.stack([
        np.stack([y1 - y2, x2 - x1, x1 * y2 - x2 * y1], -1),
        np.stack([y2 - y0, x0 - x2, x2 * y0 - x0 * y2], -1),
        np.stack([y0 - y1, x1 - x0, x0 * y1 - x1 * y0], -1),
    ], 1)  # (N, 3, 3): row k = cofactors of vertex k
    maps = np.zeros((n, 2, 3))
    maps[ok] = target[ok] @ (adjugate[ok] / det[ok, None, None])
    # Slivers are never drawn; give them the identity so the table holds no garbage.
    maps[~ok] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    return maps.reshape(n, 6)


def identity_grid(height: int, width: int) -> np.ndarray:
    """``float32`` ``(H, W, 2)`` grid that samples every pixel at its own centre (``align_corners=False``)."""
    xs = (2.0 * np.arange(width) + 1.0) / width - 1.0
    ys = (2.0 * np.arange(height) + 1.0) / height - 1.0
    return np.stack(np.meshgrid(xs, ys), axis=-1).astype(np.float32)


def mesh_warp_grid(
    source_landmarks: np.ndarray,
    driving_landmarks: np.ndarray,
    height: int,
    width: int,
    face_masked: bool = False,
    mouth: MouthFill = "stretch",
    eyelids: bool = False,
) -> np.ndarray:
    """Backward sampling grid that moves the source face onto the driving landmarks (piecewise affine).

    Args:
        source_landmarks: ``(478, 2)`` pixel coordinates of the face in the source image.
        driving_landmarks: ``(478, 2)`` pixel coordinates of the target pose/expression, in the same
            ``height`` x ``width`` frame as the source (both images share one size).
        height, width: output size (the grid's size).
        face_masked: blend the grid to the identity outside the face-oval hulls of the driving and the source
            face (dilated 8 px and feathered with sigma 3 px at 128 px, scaled with the image size), so
            background and hair stay put.
        mouth: how the inner-lip opening is filled (`MouthFill`); the baselines stretch.
        eyelids: a closing driving eye's lowered lid reads the skin above it, not the stretched lash line
            (`metaportrait.prior.eyelids.fill_lids`); the baselines stretch.

    Returns:
        ``float32`` ``(H, W, 2)`` grid, ``(x, y)`` in ``grid_sample``'s ``[-1, 1]`` ``align_corners=False``
        convention: for each output pixel, where to sample the source. Values may leave ``[-1, 1]`` where the
        driving face reaches past the image of the source face.
    """
    source = check_landmarks(source_landmarks, "source_landmarks")
    driving = check_landmarks(driving_landmarks, "driving_landmarks")
    if height <= 0 or width <= 0:
        raise ValueError(f"grid size must be positive, got {height} x {width}")
    if mouth not in MOUTH_FILLS:
        raise ValueError(f"mouth must be one of {MOUTH_FILLS}, got {mouth!r}")
    topology = mesh_topology()

    # 1. Control points: 478 landmarks, then the ring, then the fixed border points.
    border = _border_points(height, width)
    source_points = np.concatenate([source, _ring(source, topology.oval, height, width), border])
    driving_points = np.concatenate([driving, _ring(driving, topology.oval, height, width), border])

    # 2. Triangles in drawing order (later wins), and their driving->source affine maps.
    outer = _outer_band(source_points, topology.oval, NUM_LANDMARKS)
    holes, eye_holes = topology.holes, topology.eye_holes
    if mouth == "upper_lip":
        # Two strips: upper lip -> split line shows the source's opening, split line -> lower lip its lower lip.
        split_driving, split_source = mouth_split(source, driving, topology)
        first = len(source_points)
        source_points = np.concatenate([source_points, split_source])
        driving_points = np.concatenate([driving_points, split_driving])
        split = [MOUTH_CORNERS[0], *range(first, first + len(split_driving)), MOUTH_CORNERS[1]]
        upper, lower = list(topology.mouth_upper), list(topology.mouth_lower)
        mouth_strips = strip_triangles(upper, split) + strip_triangles(split, lower)
        holes = np.concatenate([np.array(mouth_strips, dtype=np.int32), topology.holes[topology.eye_holes]])
        eye_holes = np.concatenate([np.zeros(len(mouth_strips), bool), np.ones(int(topology.eye_holes.sum()), bool)])
    face_areas = signed_areas(driving, topology.face)
    # Back-facing = winding opposite to the mesh's overall winding in this view (robust to mirrored faces).
    front = np.sign(face_areas) == np.sign(face_areas.sum())
    face = np.concatenate([topology.face[~front], topology.face[front]])
    triangles = np.concatenate([outer, holes, face, topology.irises])
    maps = _affine_maps(source_points, driving_points, triangles)

    # 3. Rasterise the driving triangles into an index map (-1 = no triangle).
    index = np.full((height, width), -1, dtype=np.int32)
    base = len(outer) + len(holes) + len(face)
    _rasterise(driving_points, triangles[:base], index, 0)
    iris_index = np.full((height, width), -1, dtype=np.int32)
    _rasterise(driving_points, topology.irises, iris_index, base)
    hole_ids = len(outer) + np.flatnonzero(eye_holes)
    in_eye = np.isin(index, hole_ids)
    index = np.where(in_eye & (iris_index >= 0), iris_index, index)

    # 4. Per pixel: apply its triangle's affine map to the pixel centre (vectorised gather).
    maps = np.concatenate([maps, [[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]]]).astype(np.float32)  # id -1 -> identity
    coefficients = np.take(maps, index, axis=0)  # (H, W, 6); id -1 takes the last row (faster than maps[index])
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
    source_x = coefficients[..., 0] * xs + coefficients[..., 1] * ys + coefficients[..., 2]
    source_y = coefficients[..., 3] * xs + coefficients[..., 4] * ys + coefficients[..., 5]
    grid = np.stack([2.0 * source_x / width - 1.0, 2.0 * source_y / height - 1.0], axis=-1).astype(np.float32)
    if eyelids:
        grid = fill_lids(grid, source, driving)

    if face_masked:
        scale = min(height, width) / 128.0
        dilate, sigma = MASK_DILATE_AT_128 * scale, MASK_SIGMA_AT_128 * scale
        # The union with the source's face region moves the source face away when the head moves, instead of
        # leaving it behind as a ghost (+0.1 dB over the driving hull alone on 10 driving clips, more on
        # large-motion ones).
        mask = np.maximum(
            face_mask(driving, height, width, dilate, sigma), face_mask(source, height, width, dilate, sigma)
        )
        identity = identity_grid(height, width)
        grid = identity + mask[..., None] * (grid - identity)
    return grid.astype(np.float32)


def apply_grid(image: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Sample ``image`` at ``grid`` (bilinear, edge pixels repeated outside), like ``grid_sample`` with
    ``align_corners=False`` and ``padding_mode="border"``.

    Args:
        image: ``uint8`` ``(H, W, 3)`` RGB.
        grid: ``float32`` ``(h, w, 2)`` ``(x, y)`` in ``[-1, 1]``; may be a different size than the image.

    Returns:
        ``uint8`` ``(h, w, 3)``.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if grid.ndim != 3 or grid.shape[2] != 2:
        raise ValueError(f"grid must be (h, w, 2), got {grid.shape}")
    height, width = image.shape[:2]
    # [-1, 1] (pixel edges) -> cv2 pixel-centre coordinates.
    map_x = ((grid[..., 0] + 1.0) * width - 1.0) / 2.0
    map_y = ((grid[..., 1] + 1.0) * height - 1.0) / 2.0
    return cv2.remap(
        image, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def mesh_warp_image(
    source_image: np.ndarray,
    source_landmarks: np.ndarray,
    driving_landmarks: np.ndarray,
    face_masked: bool = True,
) -> np.ndarray:
    """The training-free "mesh-warp" baseline: the source image warped onto the driving landmarks.

    Args:
        source_image: ``uint8`` ``(H, W, 3)`` RGB.
        source_landmarks, driving_landmarks: ``(478, 2)`` pixel coordinates in that ``H`` x ``W`` frame.
        face_masked: warp only the (dilated, feathered) driving and source face regions; identity elsewhere.

    Returns:
        ``uint8`` ``(H, W, 3)``.
    """
    height, width = source_image.shape[:2]
    grid = mesh_warp_grid(source_landmarks, driving_landmarks, height, width, face_masked=face_masked)
    return apply_grid(source_image, grid)
