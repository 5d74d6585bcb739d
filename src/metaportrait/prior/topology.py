"""The fixed triangulation of MediaPipe's 478-point face mesh that the mesh-warp prior draws.

- the 852 triangles of MediaPipe's face mesh, recovered from ``FACEMESH_TESSELATION`` (its edges) as the
  triangles whose three edges are all in the edge list, minus two "separating" triangles (49-64-129 and
  279-294-358, each enclosing a vertex) whose edges are each shared by three such triangles;
- the three holes of that mesh (inner mouth, both eyes) filled with a strip triangulation between their
  upper and lower contours, so an opening mouth or eye samples the source's mouth or eye interior;
- each iris as a fan of four triangles, drawn only over the eye holes (so an iris never paints over an eyelid).

The face triangles are sorted far to near, where "near" is a fixed depth proxy: few mesh-graph hops from the
nose tip (`metaportrait.prior.warp` draws them in that order). The outer band around the face is per call and
lives in `metaportrait.prior.warp`.
"""

from __future__ import annotations

import functools
import importlib.util
import runpy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_LANDMARKS = 478
NUM_MESH_POINTS = 468
NOSE_TIP = 1  # MediaPipe index of the nose tip; the "nearest" point for the drawing order

# Hole contours as (corner, corner): the loop of the hole's boundary edges is split at these two corners into
# an upper and a lower path, which are joined by a strip of triangles.
HOLE_CORNERS = {"mouth": (78, 308), "right_eye": (33, 133), "left_eye": (263, 362)}

# Irises: centre, then the four rim points in order around it.
IRISES = {"right_eye": (468, 469, 470, 471, 472), "left_eye": (473, 474, 475, 476, 477)}


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


def strip_triangles(upper: list[int], lower: list[int]) -> list[tuple[int, int, int]]:
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
        strip = strip_triangles(upper, lower)
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
