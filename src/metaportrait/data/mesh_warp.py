"""Training-free piecewise-affine warp of a face along its dense landmarks (the "mesh warp" baseline and prior).

For every output pixel of the *driving* frame we find the triangle of the driving mesh that covers it and map
the pixel, with that triangle's affine map, to the same triangle in the *source* image. The result is a
backward sampling grid: where to read the source for each output pixel.

Topology (fixed, except the outer band):
- the 852 triangles of MediaPipe's face mesh, recovered from ``FACEMESH_TESSELATION`` (its edges) as the
  triangles whose three edges are all in the edge list, minus two "separating" triangles (49-64-129 and
  279-294-358, each enclosing a vertex) whose edges are each shared by three such triangles;
- the three holes of that mesh (inner mouth, both eyes) filled with a strip triangulation between their
  upper and lower contours, so an opening mouth or eye samples the source's mouth or eye interior;
- each iris as a fan of four triangles, drawn only over the eye holes (so an iris never paints over an eyelid);
- an outer band: a ring at 1.4x the face oval (about its centroid, so hair and the head outline follow the
  head) and 20 fixed points just outside the image (so the background stays put), triangulated with
  Delaunay on the source positions (this part is the only per-call topology).

Visibility without depth: we have only 2D points, so overlapping triangles (a turned head folds the mesh) are
resolved by drawing order: outer band, then hole fills, then back-facing face triangles (whose winding is
opposite to the mesh's overall winding in this view), then front-facing ones from far to near, where "near"
is a fixed proxy: few mesh-graph hops from the nose tip.

Coordinates follow the landmark contract: continuous pixel coordinates, the centre of pixel column ``j`` is
``x = j + 0.5``, which is also ``grid_sample``'s ``align_corners=False`` convention (``u = 2 x / W - 1``).
"""

from __future__ import annotations

import functools
import importlib.util
import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from scipy.spatial import Delaunay

NUM_LANDMARKS = 478
NUM_MESH_POINTS = 468

RING_SCALE = 1.4  # ring radius relative to the face oval, about the oval's centroid
BORDER_POINTS_PER_SIDE = 5  # 4 sides x 5 = 20 fixed points around the image
BORDER_MARGIN = 0.05  # fixed points sit this fraction of the image size outside it
NOSE_TIP = 1  # MediaPipe index of the nose tip; the "nearest" point for the drawing order

# Hole contours as (corner, corner): the loop of the hole's boundary edges is split at these two corners into
# an upper and a lower path, which are joined by a strip of triangles.
HOLE_CORNERS = {"mouth": (78, 308), "right_eye": (33, 133), "left_eye": (263, 362)}
# Irises: centre, then the four rim points in order around it.
IRISES = {"right_eye": (468, 469, 470, 471, 472), "left_eye": (473, 474, 475, 476, 477)}

# Face-masked variant (measured at 128 px, feasibility.md section 2): dilate the face-oval hull by 8 px and
# feather with sigma 3 px; both scale with the image size.
MASK_DILATE_AT_128 = 8.0
MASK_SIGMA_AT_128 = 3.0

# Prior masks (`prior_masks`), feathering sigmas at 128 px, scaled with the image size.
TRUST_SIGMA_AT_128 = 2.0
MOUTH_SIGMA_AT_128 = 1.0

# How the mesh fills a driving mouth opening (`mesh_warp_grid`, `prior_masks`): "stretch" maps the source's
# opening onto it (teeth stretched over a wide-open mouth: the classical baseline); "upper_lip" keeps the source's
# interior at its own height under the upper lip, where the upper teeth sit, and leaves the rest of the opening to
# synthesis (the lower lip's edge is repeated there in the grid).
MouthFill = Literal["stretch", "upper_lip"]
MOUTH_FILLS = ("stretch", "upper_lip")
MOUTH_CORNERS = HOLE_CORNERS["mouth"]

_SUBPIXEL_BITS = 4  # cv2.fillConvexPoly fixed-point precision (1/16 px)
_MIN_AREA = 1e-3  # px^2; thinner driving triangles are not drawn (their affine map is ill-conditioned)


def _face_mesh_connections() -> dict:
    # Read MediaPipe's edge tables without importing mediapipe itself: that import loads the TFLite runtime
    # and ~800 modules (0.4 s), which every DataLoader worker would pay. The file is plain frozenset literals.
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or spec.origin is None:
        raise ImportError("mediapipe is required for the face-mesh topology")
    path = Path(spec.origin).parent / "python" / "solutions" / "face_mesh_connections.py"
    return runpy.run_path(str(path))


def _ordered_loop(edges: set[tuple[int, int]]) -> list[int]:
    """Vertices of a closed polygon given as an unordered set of edges, in order along the polygon."""
    neighbours: dict[int, list[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    if any(len(n) != 2 for n in neighbours.values()):
        raise ValueError("edges do not form a simple closed loop")
    start = min(neighbours)
    loop, previous = [start], None
    while True:
        a, b = neighbours[loop[-1]]
        following = a if a != previous else b
        if following == start:
            break
        previous = loop[-1]
        loop.append(following)
    if len(loop) != len(neighbours):
        raise ValueError("edges form more than one loop")
    return loop


def _strip(upper: list[int], lower: list[int]) -> list[tuple[int, int, int]]:
    """Triangles joining two paths that share their first and last vertex (a hole's upper and lower contour)."""
    triangles = []
    i = j = 0
    # Advance along whichever path is behind in relative position, emitting one triangle per step.
    while i < len(upper) - 1 or j < len(lower) - 1:
        advance_upper = j == len(lower) - 1 or (
            i < len(upper) - 1 and (i + 1) / (len(upper) - 1) <= (j + 1) / (len(lower) - 1)
        )
        if advance_upper:
            triangles.append((upper[i], upper[i + 1], lower[j]))
            i += 1
        else:
            triangles.append((upper[i], lower[j + 1], lower[j]))
            j += 1
    # The first and last triangles touch a shared corner and may be degenerate; drop those.
    return [t for t in triangles if len(set(t)) == 3]


@dataclass(frozen=True)
class MeshTopology:
    """The fixed part of the triangulation (see the module docstring); all arrays index the 478 landmarks.

    Attributes:
        face: ``int32`` ``(852, 3)`` face-mesh triangles with consistent winding, sorted far-to-near.
        holes: ``int32`` ``(K, 3)`` triangles filling the mouth and eye openings.
        eye_holes: ``bool`` ``(K,)`` which hole triangles belong to an eye.
        irises: ``int32`` ``(8, 3)`` iris fans.
        oval: ``int64`` ``(36,)`` the face-oval contour, in order.
        mouth_upper, mouth_lower: ``int64`` ``(11,)`` inner-lip contours from corner 78 to corner 308.
    """

    face: np.ndarray
    holes: np.ndarray
    eye_holes: np.ndarray
    irises: np.ndarray
    oval: np.ndarray
    mouth_upper: np.ndarray
    mouth_lower: np.ndarray


@functools.cache
def mesh_topology() -> MeshTopology:
    """Build (once per process) the fixed triangulation from MediaPipe's face-mesh edge list."""
    tables = _face_mesh_connections()
    edges = {(min(a, b), max(a, b)) for a, b in tables["FACEMESH_TESSELATION"]}
    neighbours: dict[int, set[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    cliques = sorted({tuple(sorted((a, b, c))) for a, b in edges for c in neighbours[a] & neighbours[b]})
    uses: dict[tuple[int, int], int] = {}
    for a, b, c in cliques:
        for edge in ((a, b), (a, c), (b, c)):
            uses[edge] = uses.get(edge, 0) + 1
    # A triangle of edges that encloses a vertex is not a face; all three of its edges are then over-used.
    face = [t for t in cliques if not all(uses[e] > 2 for e in ((t[0], t[1]), (t[0], t[2]), (t[1], t[2])))]
    face = _consistent_winding(face)
    face = _far_to_near(face, edges)

    boundary = {e for e, n in uses.items() if n == 1}
    holes, eye_flags, contours = [], [], {}
    for name, (corner_a, corner_b) in HOLE_CORNERS.items():
        component = _component(boundary, corner_a)
        loop = _ordered_loop(component)
        start = loop.index(corner_a)
        loop = loop[start:] + loop[:start]
        split = loop.index(corner_b)
        upper = loop[: split + 1]
        lower = [corner_a] + loop[split:][::-1]
        strip = _strip(upper, lower)
        contours[name] = (upper, lower)  # both from corner_a to corner_b
        holes += strip
        eye_flags += [name.endswith("eye")] * len(strip)

    irises = []
    for centre, *rim in IRISES.values():
        irises += [(centre, rim[k], rim[(k + 1) % 4]) for k in range(4)]

    oval = _ordered_loop({(min(a, b), max(a, b)) for a, b in tables["FACEMESH_FACE_OVAL"]})
    topology = MeshTopology(
        face=np.array(face, dtype=np.int32),
        holes=np.array(holes, dtype=np.int32),
        eye_holes=np.array(eye_flags, dtype=bool),
        irises=np.array(irises, dtype=np.int32),
        oval=np.array(oval, dtype=np.int64),
        mouth_upper=np.array(contours["mouth"][0], dtype=np.int64),
        mouth_lower=np.array(contours["mouth"][1], dtype=np.int64),
    )
    assert len(topology.mouth_upper) == len(topology.mouth_lower), "inner lips must pair up point by point"
    assert topology.face.shape == (852, 3), topology.face.shape
    return topology


def _component(edges: set[tuple[int, int]], vertex: int) -> set[tuple[int, int]]:
    """The edges of the connected component of ``edges`` that contains ``vertex``."""
    component, frontier = set(), {vertex}
    while frontier:
        v = frontier.pop()
        for edge in edges:
            if v in edge and edge not in component:
                component.add(edge)
                frontier |= set(edge)
    return component


def _consistent_winding(triangles: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Reorder vertices so that every shared edge is traversed in opposite directions by its two triangles."""
    by_edge: dict[tuple[int, int], list[int]] = {}
    for k, (a, b, c) in enumerate(triangles):
        for edge in ((a, b), (b, c), (a, c)):
            by_edge.setdefault((min(edge), max(edge)), []).append(k)
    oriented: dict[int, tuple[int, int, int]] = {0: triangles[0]}
    stack = [0]
    while stack:
        k = stack.pop()
        a, b, c = oriented[k]
        for u, v in ((a, b), (b, c), (c, a)):
            for other in by_edge[(min(u, v), max(u, v))]:
                if other in oriented:
                    continue
                x, y, z = triangles[other]
                directed = {(x, y), (y, z), (z, x)}
                # The neighbour must run this edge as v -> u.
                oriented[other] = (x, y, z) if (v, u) in directed else (x, z, y)
                stack.append(other)
    if len(oriented) != len(triangles):
        raise ValueError("face mesh is not connected")
    return [oriented[k] for k in range(len(triangles))]


def _far_to_near(triangles: list[tuple[int, int, int]], edges: set[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Sort triangles by decreasing mesh-graph distance of their vertices from the nose tip (a depth proxy)."""
    neighbours: dict[int, list[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    hops = {NOSE_TIP: 0}
    frontier = [NOSE_TIP]
    while frontier:
        following = []
        for v in frontier:
            for n in neighbours[v]:
                if n not in hops:
                    hops[n] = hops[v] + 1
                    following.append(n)
        frontier = following
    return sorted(triangles, key=lambda t: -sum(hops[v] for v in t))


def check_landmarks(landmarks: np.ndarray, name: str) -> np.ndarray:
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"{name} must be (478, 2) pixel coordinates, got shape {landmarks.shape}")
    if not np.isfinite(landmarks).all():
        raise ValueError(f"{name} holds non-finite values")
    return landmarks


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


def _outer_band(points: np.ndarray, oval: np.ndarray, num_face_points: int) -> np.ndarray:
    """Delaunay triangles of oval + ring + border points that lie outside the face oval (indices into points)."""
    outer_indices = np.concatenate([oval, np.arange(num_face_points, len(points))])
    triangles = outer_indices[Delaunay(points[outer_indices]).simplices]
    centroids = points[triangles].mean(1).astype(np.float32)
    contour = points[oval].astype(np.float32).reshape(-1, 1, 2)
    outside = np.array([cv2.pointPolygonTest(contour, (float(x), float(y)), False) < 0 for x, y in centroids])
    return triangles[outside]


def _signed_areas(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    a, b, c = points[triangles[:, 0]], points[triangles[:, 1]], points[triangles[:, 2]]
    return 0.5 * ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))


def _rasterise(points: np.ndarray, triangles: np.ndarray, index: np.ndarray, first_id: int) -> None:
    """Draw triangles (in order; later ones win) into ``index`` with ids ``first_id + k``; skips slivers."""
    # fillConvexPoly's integer pixel coordinates are pixel centres, ours are at +0.5.
    fixed = np.round((points - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    corners = fixed[triangles]  # (N, 3, 2)
    visible = np.abs(_signed_areas(points, triangles)) > _MIN_AREA
    for k in np.flatnonzero(visible):
        cv2.fillConvexPoly(index, corners[k], int(first_id + k), cv2.LINE_8, _SUBPIXEL_BITS)


def _affine_maps(source: np.ndarray, driving: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """``(N, 6)`` per-triangle affine maps from driving to source pixels: ``x_s = m0 x + m1 y + m2``, etc."""
    n = len(triangles)
    homogeneous = np.ones((n, 3, 3))
    homogeneous[:, :2, :] = driving[triangles].transpose(0, 2, 1)  # columns = vertices
    target = source[triangles].transpose(0, 2, 1)  # (N, 2, 3)
    det = np.linalg.det(homogeneous)
    ok = np.abs(det) > 2 * _MIN_AREA
    maps = np.zeros((n, 2, 3))
    maps[ok] = target[ok] @ np.linalg.inv(homogeneous[ok])
    # Slivers are never drawn; give them the identity so the table holds no garbage.
    maps[~ok] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    return maps.reshape(n, 6)


def _hull_area(points: np.ndarray, oval: np.ndarray) -> float:
    return max(float(cv2.contourArea(cv2.convexHull(points[oval].astype(np.float32)))), 1.0)


def _mouth_split(source: np.ndarray, driving: np.ndarray, topology: MeshTopology) -> tuple[np.ndarray, np.ndarray]:
    """For ``mouth="upper_lip"``: ``(9, 2)`` driving points splitting the inner-lip opening, and their ``(9, 2)``
    source points (the source's lower inner lip).

    Each split point lies below its upper-lip point by the source's opening there (scaled by the ratio of the
    face sizes), at most down to the driving lower lip: above it the source's interior is shown unstretched,
    below it the source has nothing to show."""
    upper, lower = topology.mouth_upper[1:-1], topology.mouth_lower[1:-1]
    scale = np.sqrt(_hull_area(driving, topology.oval) / _hull_area(source, topology.oval))
    source_gap = np.linalg.norm(source[lower] - source[upper], axis=1) * scale
    driving_offset = driving[lower] - driving[upper]
    fraction = np.clip(source_gap / np.maximum(np.linalg.norm(driving_offset, axis=1), 1e-6), 0.0, 1.0)
    return driving[upper] + fraction[:, None] * driving_offset, source[lower]


def polygon_coverage(polygon: np.ndarray, height: int, width: int, supersample: int = 4) -> np.ndarray:
    """``float32`` ``(H, W)``: the fraction of each pixel inside ``polygon`` (``(N, 2)`` pixels, any shape),
    from a ``supersample``-times finer rasterisation of its bounding box. A band thinner than a pixel gives
    partial values, and one of zero area gives none (a plain fill would still draw its outline)."""
    out = np.zeros((height, width), dtype=np.float32)
    if abs(cv2.contourArea(polygon.astype(np.float32))) < 0.1:
        return out
    x0, y0 = np.maximum(np.floor(polygon.min(0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(polygon.max(0)).astype(int) + 1, [width, height])
    if x1 <= x0 or y1 <= y0:
        return out
    fine = np.zeros(((y1 - y0) * supersample, (x1 - x0) * supersample), dtype=np.float32)
    corners = ((polygon - [x0, y0]) * supersample - 0.5) * (1 << _SUBPIXEL_BITS)
    cv2.fillPoly(fine, [corners.astype(np.int32)], 1.0, cv2.LINE_8, _SUBPIXEL_BITS)
    out[y0:y1, x0:x1] = cv2.resize(fine, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    return out


def identity_grid(height: int, width: int) -> np.ndarray:
    """``float32`` ``(H, W, 2)`` grid that samples every pixel at its own centre (``align_corners=False``)."""
    xs = (2.0 * np.arange(width) + 1.0) / width - 1.0
    ys = (2.0 * np.arange(height) + 1.0) / height - 1.0
    return np.stack(np.meshgrid(xs, ys), axis=-1).astype(np.float32)


def face_mask(landmarks: np.ndarray, height: int, width: int, dilate_px: float, feather_sigma: float) -> np.ndarray:
    """Soft mask of the face: the convex hull of the face oval, grown by ``dilate_px`` and Gaussian-feathered.

    Args:
        landmarks: ``(478, 2)`` pixel coordinates in the ``height`` x ``width`` image.
        dilate_px: growth of the hull in pixels (>= 0).
        feather_sigma: Gaussian blur sigma in pixels (>= 0; 0 = hard edge).

    Returns:
        ``float32`` ``(H, W)`` in ``[0, 1]``, 1 on the face.
    """
    landmarks = check_landmarks(landmarks, "landmarks")
    if dilate_px < 0 or feather_sigma < 0:
        raise ValueError(f"dilate_px and feather_sigma must be >= 0, got {dilate_px}, {feather_sigma}")
    hull = cv2.convexHull(((landmarks[mesh_topology().oval] - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32))
    inside = np.zeros((height, width), dtype=np.uint8)
    cv2.fillConvexPoly(inside, hull, 1, cv2.LINE_8, _SUBPIXEL_BITS)
    if dilate_px > 0:
        # Distance (in px) from each outside pixel to the hull; cheaper than a large dilation kernel.
        distance = cv2.distanceTransform(1 - inside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        mask = (distance <= dilate_px).astype(np.float32)
    else:
        mask = inside.astype(np.float32)
    if feather_sigma > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), feather_sigma, borderType=cv2.BORDER_REPLICATE)
    return mask


def prior_masks(
    source_landmarks: np.ndarray,
    driving_landmarks: np.ndarray,
    height: int,
    width: int,
    mouth: MouthFill = "stretch",
    template: bool = False,
    eyelids: bool = False,
    eyelid_channel: bool = False,
) -> np.ndarray:
    """Where a mesh-prior model trusts the mesh, and where it must synthesise (``ModelConfig.prior_masks``).

    Channel 0, the driving face: the face-oval hull, feathered. The piecewise-affine warp is exact at the
    landmarks and measured better there than the learned residual flow, which is trained for hair, neck and
    background (a one-off check on the earlier bundled model, 80 held-out pairs at 256 px: face-region L1 0.0325
    with the residual, 0.0306 with it removed inside the face; docs/model_card.md has the retrained model's eval).
    Channel 1, the part of the driving mouth opening the source cannot
    supply: the filled inner-lip contour, feathered, times ``1 - (source opening / driving opening)`` (areas
    relative to the face hull's): 0 when the source's mouth is open at least as wide (its teeth are warped), 1
    when it is closed (there are no pixels of the mouth interior to warp).

    Args:
        source_landmarks, driving_landmarks: ``(478, 2)`` pixel coordinates in the ``height`` x ``width`` frame.
        mouth: the grid's `MouthFill`. With "upper_lip" channel 1 is instead the part of the opening below the
            split line of `mesh_warp_grid` (feathered, 1 inside): exactly where that grid has no source pixels.
        template: append the `metaportrait.data.mouth_template` of the driving face (teeth, cavity) as
            channels 2-3, for models with ``RefineConfig.mouth_template``.
        eyelids: channel 1 also covers `metaportrait.data.eyelids.eyelid_band` (``ModelConfig.prior_eyelids``).
        eyelid_channel: append that band alone as the last channel, for models with ``RefineConfig.eyelid_band``
            (needs ``eyelids``).

    Returns:
        ``float32`` ``(2 + 2 * template + eyelid_channel, H, W)`` in ``[0, 1]``.
    """
    if mouth not in MOUTH_FILLS:
        raise ValueError(f"mouth must be one of {MOUTH_FILLS}, got {mouth!r}")
    if eyelid_channel and not eyelids:
        raise ValueError("eyelid_channel needs eyelids (the band is synthesised where it is given)")
    source = check_landmarks(source_landmarks, "source_landmarks")
    driving = check_landmarks(driving_landmarks, "driving_landmarks")
    scale = min(height, width) / 128.0
    face = face_mask(driving, height, width, 0.0, TRUST_SIGMA_AT_128 * scale)
    topology = mesh_topology()
    if mouth == "upper_lip":
        split, _ = _mouth_split(source, driving, topology)
        below = np.concatenate([driving[[MOUTH_CORNERS[0]]], split, driving[topology.mouth_lower[::-1]]])
        fill = polygon_coverage(below, height, width)
        fill = cv2.GaussianBlur(fill, (0, 0), MOUTH_SIGMA_AT_128 * scale, borderType=cv2.BORDER_REPLICATE)
        return _stack(face, fill, source, driving, template, eyelids, eyelid_channel)
    mouth_triangles = topology.holes[~topology.eye_holes]
    opening = {}
    for name, points in (("source", source), ("driving", driving)):
        opening[name] = np.abs(_signed_areas(points, mouth_triangles)).sum() / _hull_area(points, topology.oval)
    need = 0.0 if opening["driving"] <= 1e-6 else float(np.clip(1.0 - opening["source"] / opening["driving"], 0, 1))
    mouth = np.zeros((height, width), dtype=np.float32)
    if need > 0:
        for triangle in mouth_triangles:
            corners = ((driving[triangle] - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
            cv2.fillConvexPoly(mouth, corners, need, cv2.LINE_8, _SUBPIXEL_BITS)
        mouth = cv2.GaussianBlur(mouth, (0, 0), MOUTH_SIGMA_AT_128 * scale, borderType=cv2.BORDER_REPLICATE)
    return _stack(face, mouth, source, driving, template, eyelids, eyelid_channel)


def _stack(face, mouth, source, driving, template: bool, eyelids: bool, eyelid_channel: bool) -> np.ndarray:
    """`prior_masks`' channels: face, mouth [∪ eyelid band], [teeth, cavity], [eyelid band]."""
    # Both build on this module.
    from metaportrait.data.eyelids import eyelid_band
    from metaportrait.data.mouth_template import mouth_template

    channels = [face, mouth]
    if eyelids:
        band = eyelid_band(source, driving, *mouth.shape)
        channels[1] = np.maximum(mouth, band)
    if template:
        channels.extend(mouth_template(driving, *mouth.shape))
    if eyelid_channel:
        channels.append(band)
    return np.stack(channels).astype(np.float32)


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
            (`metaportrait.data.eyelids.fill_lids`); the baselines stretch.

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
        split_driving, split_source = _mouth_split(source, driving, topology)
        first = len(source_points)
        source_points = np.concatenate([source_points, split_source])
        driving_points = np.concatenate([driving_points, split_driving])
        split = [MOUTH_CORNERS[0], *range(first, first + len(split_driving)), MOUTH_CORNERS[1]]
        mouth_strips = _strip(list(topology.mouth_upper), split) + _strip(split, list(topology.mouth_lower))
        holes = np.concatenate([np.array(mouth_strips, dtype=np.int32), topology.holes[topology.eye_holes]])
        eye_holes = np.concatenate([np.zeros(len(mouth_strips), bool), np.ones(int(topology.eye_holes.sum()), bool)])
    face_areas = _signed_areas(driving, topology.face)
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
    coefficients = maps[index]  # (H, W, 6)
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
    source_x = coefficients[..., 0] * xs + coefficients[..., 1] * ys + coefficients[..., 2]
    source_y = coefficients[..., 3] * xs + coefficients[..., 4] * ys + coefficients[..., 5]
    grid = np.stack([2.0 * source_x / width - 1.0, 2.0 * source_y / height - 1.0], axis=-1).astype(np.float32)
    if eyelids:
        from metaportrait.data.eyelids import fill_lids  # it builds on this module

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
