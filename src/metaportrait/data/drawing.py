"""Landmark line images: the coloured line drawings the generator takes as its motion input.

Each topology is a fixed list of edges between landmark points, each edge with its own RGB colour, drawn in
list order (later edges on top) as 1-px anti-aliased lines (``cv2.LINE_AA``) on a black canvas:

``mediapipe478``
    The MediaPipe Face Mesh connections: tesselation + contours + irises of ``mp.solutions.face_mesh``
    (1330 undirected edges over 478 points), frozen in ``assets/mediapipe478_edges.tsv``. Edges are
    grouped; a contour edge belongs to its contour group, every other tesselation edge to ``mesh``. Groups
    are drawn in the order of `GROUP_HUES` (``mesh`` first, irises last), and within a group in sorted
    ``(p0, p1)`` order with ``p0 < p1``. Colour rule (`edge_colors`):

    * ``mesh``: dim colours, every channel in ``[16, 112]``: edge ``k`` of the group gets code
      ``c = (k + 1) * 391529 mod 97**3`` written in base 97 as ``(r, g, b) - 16``. The multiplier is coprime
      to 97, so codes, hence colours, are all different, and neighbouring edges get unrelated colours.
    * contour groups: the group's hue from `GROUP_HUES` at full saturation, with brightness ramping
      from 160 to 255 along the group's edges, so every group has a clearly different hue and every edge a
      different colour. "Right"/"left" are the subject's (MediaPipe naming): ``right_eye`` is on the image's
      left.

``sparse68``
    A 68-point subset of the MediaPipe points laid out like iBUG-68 (jaw 17, brows 10, nose 9, eyes 12,
    mouth 20; `SPARSE68_INDEX`) joined by the usual 68-point polylines, for the dense-vs-sparse ablation.
    Edges index the 478 MediaPipe points directly. Colours follow the contour rule above (jaw uses the
    ``face_oval`` hue, inner and outer lips share ``lips``).

``official669``
    The official MetaPortrait drawing of 669 dense points (616 edges with the official colours, from the
    official ``dense_669_connectivity.tsv`` and dataset code; ``assets/official669_edges.tsv``). Drawn
    exactly as the official code does: endpoints truncated to int (``int(x * W)`` for normalised points),
    no sub-pixel precision.

The two MediaPipe topologies draw with 1/16-pixel endpoint precision (OpenCV's ``shift``) so slow motion
moves the lines smoothly instead of in 1-px steps.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from importlib import resources

import cv2
import numpy as np

# Group -> hue in degrees, in drawing order. "mesh" has no hue (see the module docstring).
GROUP_HUES: dict[str, float | None] = {
    "mesh": None,
    "face_oval": 55.0,  # yellow
    "nose": 28.0,  # orange
    "right_eyebrow": 300.0,  # magenta (subject's right = image left)
    "left_eyebrow": 270.0,  # violet
    "right_eye": 120.0,  # green
    "left_eye": 160.0,  # teal
    "lips": 0.0,  # red
    "right_iris": 195.0,  # sky blue
    "left_iris": 230.0,  # blue
}
_MESH_LEVELS = 97  # mesh colour channels take 97 levels, 16..112
_MESH_MULTIPLIER = 391529  # coprime to 97: (k + 1) * m mod 97**3 is a bijection on edge numbers
_CONTOUR_VALUE_RANGE = (160.0, 255.0)  # brightness ramp of a contour group

# iBUG-68 layout on MediaPipe Face Mesh indices (image-left = subject's right comes first, as in iBUG).
SPARSE68_PARTS: dict[str, list[int]] = {
    # 0-16: jaw from the image-left ear (eye level) over the chin (8 = 152) to the image-right ear
    "jaw": [127, 234, 93, 132, 58, 172, 150, 176, 152, 400, 379, 397, 288, 361, 323, 454, 356],
    "right_eyebrow": [70, 63, 105, 66, 107],  # 17-21: image-left brow, outer to inner
    "left_eyebrow": [336, 296, 334, 293, 300],  # 22-26: image-right brow, inner to outer
    "nose_bridge": [168, 197, 5, 4],  # 27-30: nasion down to the tip
    "nose_base": [98, 97, 2, 326, 327],  # 31-35: nostril wings and subnasale, left to right
    "right_eye": [33, 160, 158, 133, 153, 144],  # 36-41: outer corner, upper lid, inner corner, lower lid
    "left_eye": [362, 385, 387, 263, 373, 380],  # 42-47: inner corner, upper lid, outer corner, lower lid
    "outer_lips": [61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91],  # 48-59: left corner, upper, lower
    "inner_lips": [78, 81, 13, 311, 308, 402, 14, 178],  # 60-67: left corner, upper, right corner, lower
}
SPARSE68_INDEX = np.array([i for part in SPARSE68_PARTS.values() for i in part], dtype=np.int64)  # (68,)
# part -> (colour group, closed polyline?)
_SPARSE68_STYLE: dict[str, tuple[str, bool]] = {
    "jaw": ("face_oval", False),
    "right_eyebrow": ("right_eyebrow", False),
    "left_eyebrow": ("left_eyebrow", False),
    "nose_bridge": ("nose", False),
    "nose_base": ("nose", False),
    "right_eye": ("right_eye", True),
    "left_eye": ("left_eye", True),
    "outer_lips": ("lips", True),
    "inner_lips": ("lips", True),
}


@dataclass(frozen=True)
class Topology:
    """Edges and colours of one landmark line drawing.

    Attributes:
        name: key in `TOPOLOGIES`.
        num_points: number of landmark points the edges index into.
        edges: ``int64`` ``(E, 2)`` point index pairs, in drawing order.
        colors: ``uint8`` ``(E, 3)`` RGB colour of each edge.
        groups: ``(E,)`` group name of each edge.
        subpixel: draw endpoints with 1/16-px precision (else truncate to int, as the official code does).
    """

    name: str
    num_points: int
    edges: np.ndarray
    colors: np.ndarray
    groups: tuple[str, ...]
    subpixel: bool
    _edge_list: list = field(init=False, repr=False, compare=False)
    _color_list: list = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.edges.ndim != 2 or self.edges.shape[1] != 2 or self.colors.shape != (len(self.edges), 3):
            raise ValueError(f"{self.name}: edges {self.edges.shape} and colours {self.colors.shape} do not match")
        if len(self.groups) != len(self.edges):
            raise ValueError(f"{self.name}: {len(self.groups)} groups for {len(self.edges)} edges")
        if self.edges.min() < 0 or self.edges.max() >= self.num_points:
            raise ValueError(f"{self.name}: edge indices outside [0, {self.num_points})")
        # Plain Python lists: cv2.line in a loop is the hot path, and list access beats numpy indexing there.
        object.__setattr__(self, "_edge_list", self.edges.tolist())
        object.__setattr__(self, "_color_list", [tuple(c) for c in self.colors.tolist()])


def edge_colors(group: str, count: int) -> np.ndarray:
    """The colours of the ``count`` edges of ``group`` (rule in the module docstring); ``uint8`` ``(count, 3)``."""
    if group not in GROUP_HUES:
        raise ValueError(f"unknown edge group {group!r}; known: {sorted(GROUP_HUES)}")
    hue = GROUP_HUES[group]
    if hue is None:
        codes = (np.arange(1, count + 1, dtype=np.int64) * _MESH_MULTIPLIER) % _MESH_LEVELS**3
        digits = np.stack([codes // _MESH_LEVELS**2, (codes // _MESH_LEVELS) % _MESH_LEVELS, codes % _MESH_LEVELS], 1)
        return (digits + 16).astype(np.uint8)
    low, high = _CONTOUR_VALUE_RANGE
    values = np.linspace(low, high, count) if count > 1 else np.array([high])
    red, green, blue = colorsys.hsv_to_rgb(hue / 360.0, 1.0, 1.0)
    return np.rint(values[:, None] * np.array([red, green, blue])[None]).astype(np.uint8)


def mediapipe478_table() -> tuple[np.ndarray, list[str], np.ndarray]:
    """Build the ``mediapipe478`` edge table from the installed MediaPipe (how the asset file was made).

    Returns:
        edges ``(E, 2)``, group names ``(E,)`` and colours ``uint8`` ``(E, 3)``, in drawing order.
    """
    import mediapipe as mp

    face_mesh = mp.solutions.face_mesh

    def undirected(connections) -> set[tuple[int, int]]:
        return {(min(a, b), max(a, b)) for a, b in connections}

    contour_sets = {
        "face_oval": face_mesh.FACEMESH_FACE_OVAL,
        "nose": face_mesh.FACEMESH_NOSE,
        "right_eyebrow": face_mesh.FACEMESH_RIGHT_EYEBROW,
        "left_eyebrow": face_mesh.FACEMESH_LEFT_EYEBROW,
        "right_eye": face_mesh.FACEMESH_RIGHT_EYE,
        "left_eye": face_mesh.FACEMESH_LEFT_EYE,
        "lips": face_mesh.FACEMESH_LIPS,
        "right_iris": face_mesh.FACEMESH_RIGHT_IRIS,
        "left_iris": face_mesh.FACEMESH_LEFT_IRIS,
    }
    grouped = {group: sorted(undirected(connections)) for group, connections in contour_sets.items()}
    in_contours = set().union(*map(set, grouped.values()))
    all_edges = undirected(face_mesh.FACEMESH_TESSELATION) | undirected(face_mesh.FACEMESH_CONTOURS)
    all_edges |= undirected(face_mesh.FACEMESH_IRISES)
    grouped["mesh"] = sorted(all_edges - in_contours)
    edges, groups, colors = [], [], []
    for group in GROUP_HUES:  # drawing order
        edges += grouped[group]
        groups += [group] * len(grouped[group])
        colors.append(edge_colors(group, len(grouped[group])))
    return np.array(edges, dtype=np.int64), groups, np.concatenate(colors)


def _sparse68_topology() -> Topology:
    edges, groups, colors = [], [], []
    for part, points in SPARSE68_PARTS.items():
        group, closed = _SPARSE68_STYLE[part]
        part_edges = list(zip(points[:-1], points[1:]))
        if closed:
            part_edges.append((points[-1], points[0]))
        edges += part_edges
        groups += [group] * len(part_edges)
    groups_in_order = list(dict.fromkeys(groups))
    colors = np.zeros((len(edges), 3), dtype=np.uint8)
    group_array = np.array(groups)
    for group in groups_in_order:
        mask = group_array == group
        colors[mask] = edge_colors(group, int(mask.sum()))
    return Topology("sparse68", 478, np.array(edges, dtype=np.int64), colors, tuple(groups), subpixel=True)


def _read_edge_table(file_name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """Read an asset TSV with columns edge, p0, p1, [group,] r, g, b (``#`` comment lines first)."""
    text = resources.files("metaportrait").joinpath("assets", file_name).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    column = {name: i for i, name in enumerate(header)}
    if [int(row[column["edge"]]) for row in rows] != list(range(len(rows))):
        raise ValueError(f"{file_name}: edge numbers are not 0..{len(rows) - 1} in order")
    edges = np.array([[int(row[column["p0"]]), int(row[column["p1"]])] for row in rows], dtype=np.int64)
    colors = np.array([[int(row[column[c]]) for c in "rgb"] for row in rows], dtype=np.uint8)
    groups = tuple(row[column["group"]] for row in rows) if "group" in column else None
    return edges, colors, groups


def _asset_topology(name: str, file_name: str, num_points: int, subpixel: bool) -> Topology:
    edges, colors, groups = _read_edge_table(file_name)
    return Topology(name, num_points, edges, colors, groups or (name,) * len(edges), subpixel)


TOPOLOGIES: dict[str, Topology] = {
    "mediapipe478": _asset_topology("mediapipe478", "mediapipe478_edges.tsv", 478, subpixel=True),
    "sparse68": _sparse68_topology(),
    "official669": _asset_topology("official669", "official669_edges.tsv", 669, subpixel=False),
}
# Topologies drawn from MediaPipe Face Mesh points, i.e. the ones our trackers and datasets can feed.
MEDIAPIPE_TOPOLOGIES = ("mediapipe478", "sparse68")

_SHIFT_BITS = 4  # OpenCV fixed-point endpoints: 1/16 px


def _draw_lines(canvas: np.ndarray, points: np.ndarray, topology: Topology, thickness: int, normalized: bool) -> None:
    points = np.asarray(points)
    if points.ndim != 2 or points.shape != (topology.num_points, 2):
        expected = (topology.num_points, 2)
        raise ValueError(f"topology {topology.name} needs points of shape {expected}, got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("landmark points contain NaN or inf")
    if thickness < 1:
        raise ValueError(f"thickness must be >= 1, got {thickness}")
    height, width = canvas.shape[:2]
    points = points.astype(np.float64)
    if normalized:
        points = points * np.array([width, height])
    if topology.subpixel:
        # Pixel i spans [i, i + 1) in landmark coordinates; OpenCV puts its centre at i.
        coords = np.rint((points - 0.5) * (1 << _SHIFT_BITS)).astype(np.int64).tolist()
        shift = _SHIFT_BITS
    else:
        coords = np.trunc(points).astype(np.int64).tolist()  # int(x) as in the official code
        shift = 0
    line, antialiased = cv2.line, cv2.LINE_AA
    for (start, end), color in zip(topology._edge_list, topology._color_list):
        line(canvas, coords[start], coords[end], color, thickness, antialiased, shift)


def _topology(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown landmark topology {name!r}; choose one of {sorted(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def draw_landmark_image(
    points: np.ndarray,
    height: int,
    width: int,
    topology: str = "mediapipe478",
    thickness: int = 1,
    normalized: bool = False,
) -> np.ndarray:
    """Draw the landmark line image of one face.

    Args:
        points: ``(N, 2)`` ``(x, y)`` landmark coordinates, N = the topology's point count (478 for the
            MediaPipe topologies, 669 for ``official669``); pixels, or ``[0, 1]`` fractions of the width and
            height when ``normalized``.
        height, width: canvas size in pixels.
        topology: one of `TOPOLOGIES`.
        thickness: line width in pixels.
        normalized: points are in ``[0, 1]`` (the official landmark files) instead of pixels.

    Returns:
        ``uint8`` ``(height, width, 3)`` RGB image, black where no line is drawn.
    """
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    _draw_lines(canvas, points, _topology(topology), thickness, normalized)
    return canvas


def draw_landmarks_on(
    image: np.ndarray, points: np.ndarray, topology: str = "mediapipe478", thickness: int = 1
) -> np.ndarray:
    """The landmark lines drawn over a copy of ``image`` (``uint8`` ``(H, W, 3)`` RGB); points in pixels."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}")
    canvas = np.ascontiguousarray(image).copy()
    _draw_lines(canvas, points, _topology(topology), thickness, normalized=False)
    return canvas
