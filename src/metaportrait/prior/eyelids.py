"""The eyelid skin a closing driving eye shows and an open source eye hides, for the refinement to synthesise.

An open eye hides most of its upper lid in the fold above the lashes. When the driver closes the eye, the mesh
warp can only stretch what the source shows there: the lash line and the fold's shadow, drawn over the whole
lowered lid, so a blink becomes a dark smear instead of a lid of skin (docs/model_card.md). `eyelid_band`
marks, per eye, the band above the driving upper lid as tall as the lid came down (the source's local opening,
scaled to the driving eye's width, minus the driving one), plus what is left of the opening, faded in with
how far the eye has closed: ``prior_masks(..., eyelids=True)`` adds it to the synthesis channel, where the
output is the refinement network's (``ModelConfig.prior_eyelids``). With ``eyelid_channel=True`` the band is
also given alone, so the refinement can tell a lid from the mouth interior (``RefineConfig.eyelid_band``).

`fill_lids` is the other answer, with no synthesis: the mesh warp fills the band from the skin above it
(``ModelConfig.prior_eyelid_fill``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from metaportrait.prior.geometry import check_landmarks, polygon_coverage

# MediaPipe eye contours, corner to corner: (corner, upper lid, corner, lower lid). They are the boundaries of
# the mesh's eye holes (`metaportrait.prior.topology.HOLE_CORNERS`; tests/test_eyelids.py checks it).
EYES = {
    "right": (33, (246, 161, 160, 159, 158, 157, 173), 133, (7, 163, 144, 145, 153, 154, 155)),
    "left": (263, (466, 388, 387, 386, 385, 384, 398), 362, (249, 390, 373, 374, 380, 381, 382)),
}
# The lower edge of each eye's brow, from the outer end (MediaPipe's eyebrow contours).
BROWS = {"right": (46, 53, 52, 65, 55), "left": (276, 283, 282, 295, 285)}
FOREHEAD, CHIN = 10, 152  # MediaPipe's top and bottom of the face oval
# The band fades in from this closure (1 - the driving lid gaps' sum / the source's, scaled to the driving eye's
# width) to full at CLOSED: a narrowed eye keeps its warped iris, a blink gets a lid.
CLOSING, CLOSED = 0.3, 0.8
EYELID_SIGMA_AT_128 = 1.0  # feathering in px at 128 px, scaled with the image size
# How far up a band pixel reads, as (its height in the band / the band's height) ** LASH_PROFILE lid heights:
# 1 squeezes the source's lash line into the band's lower part and brings the skin above down over the rest;
# 0 (the whole band reads skin) loses the lash line (docs/experiments.md, the lid fill of 2026-11-25).
LASH_PROFILE = 1.0
# The band's top reads at most this share of the way from it to the brow: where brows sit close to the eyes,
# a full lid height up is brow, copied onto the lid (measured: cross-reenactment AKD back to the unfilled
# model's, the closing-eye pixel numbers a little worse; docs/experiments.md, the lid fill of 2026-11-25).
BROW_SHARE = 0.5


def eyelid_band(source_landmarks: np.ndarray, driving_landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """``float32`` ``(H, W)`` in [0, 1]: where the output should be synthesised eyelid (see the module docstring).

    Args:
        source_landmarks, driving_landmarks: ``(478, 2)`` pixel coordinates in the ``height`` x ``width`` frame.
    """
    band = np.zeros((height, width), np.float32)
    for eye in _closing_eyes(source_landmarks, driving_landmarks, height, width):
        band = np.maximum(band, eye.weight * polygon_coverage(eye.polygon, height, width))
    if not band.any():
        return band  # open eyes, most frames: no blur to pay for
    return np.clip(_feather(band), 0.0, 1.0)


def fill_lids(grid: np.ndarray, source_landmarks: np.ndarray, driving_landmarks: np.ndarray) -> np.ndarray:
    """A mesh-warp grid whose eyelid band samples the skin above it instead of the stretched lash line.

    Inside each closing eye's band (`eyelid_band`), a pixel reads the grid further up the face, by up to one lid
    height at the band's top (`LASH_PROFILE`) and never past half the way to the brow (`BROW_SHARE`): the lowered
    lid shows the source's lash line squeezed into its lower part and the skin between lashes and brow moved
    down over the rest. A model then warps skin-coloured pixels onto the lid instead of painting it
    (``ModelConfig.prior_eyelid_fill``; docs/experiments.md, the lid fill of 2026-11-25).

    ``grid``: ``float32`` ``(H, W, 2)`` from `metaportrait.prior.warp.mesh_warp_grid` for these landmarks
    (pixel coordinates of its ``H`` x ``W`` frame) -> the same shape; unchanged where no eye closes.
    """
    assert grid.ndim == 3 and grid.shape[2] == 2, f"grid must be (H, W, 2), got {grid.shape}"
    height, width = grid.shape[:2]
    eyes = _closing_eyes(source_landmarks, driving_landmarks, height, width)
    if not eyes:
        return grid  # open eyes, most frames
    shift = np.zeros((height, width, 2), np.float32)  # pixels to read further up, per output pixel
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
    for eye in eyes:
        # The lid height along the eye: the contour points' heights, 0 at the corners, by position on the axis.
        along = (xs - eye.corner[0]) * eye.axis[0] + (ys - eye.corner[1]) * eye.axis[1]  # (H, W) px
        lid_height = np.interp(along, eye.positions, eye.heights).astype(np.float32)
        reach = np.interp(along, eye.positions, eye.reach).astype(np.float32)
        lid_line = np.interp(along, eye.positions, eye.lid_line)
        above = (xs - eye.corner[0]) * eye.up[0] + (ys - eye.corner[1]) * eye.up[1] - lid_line  # px above the lid
        rise = np.clip(above / np.maximum(lid_height, 1e-3), 0.0, 1.0) ** LASH_PROFILE
        covered = _feather(eye.weight * polygon_coverage(eye.polygon, height, width))
        shift += (covered * reach * rise)[..., None] * eye.up.astype(np.float32)
    if not shift.any():
        return grid  # closing, but no room below the brows
    map_x = (xs - 0.5)[None, :] + shift[..., 0]  # cv2.remap indexes pixels, centres at integers
    map_y = (ys - 0.5) + shift[..., 1]
    return cv2.remap(grid, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@dataclass(frozen=True)
class _ClosingEye:
    weight: float  # how far the eye has closed, 0 (CLOSING) .. 1 (CLOSED)
    polygon: np.ndarray  # (K, 2) px: the band, corner, raised upper lid, corner, lower lid
    corner: np.ndarray  # (2,) px: the first corner
    axis: np.ndarray  # (2,) unit vector corner to corner
    up: np.ndarray  # (2,) unit vector up the face, perpendicular to the axis
    positions: np.ndarray  # (P,) px along the axis, increasing: corners and upper-lid points
    heights: np.ndarray  # (P,) px: how far the lid came down there (0 at the corners)
    lid_line: np.ndarray  # (P,) px up the face from the first corner: the driving upper lid
    reach: np.ndarray  # (P,) px: how far up the band's top reads (the height, kept below the brow)


def _closing_eyes(source_landmarks, driving_landmarks, height: int, width: int) -> list[_ClosingEye]:
    """The driving eyes that close past CLOSING against the source's, with their lid band's geometry."""
    source = check_landmarks(source_landmarks, "source_landmarks")
    driving = check_landmarks(driving_landmarks, "driving_landmarks")
    if height <= 0 or width <= 0:
        raise ValueError(f"band size must be positive, got {height} x {width}")
    eyes = []
    for side, (corner_a, upper, corner_b, lower) in EYES.items():
        upper, lower = list(upper), list(lower)
        driving_width = float(np.linalg.norm(driving[corner_b] - driving[corner_a]))
        source_width = float(np.linalg.norm(source[corner_b] - source[corner_a]))
        if driving_width < 1e-3 or source_width < 1e-3:
            continue
        source_gap = np.linalg.norm(source[lower] - source[upper], axis=1) * (driving_width / source_width)
        driving_gap = np.linalg.norm(driving[lower] - driving[upper], axis=1)
        closure = 1.0 - driving_gap.sum() / max(float(source_gap.sum()), 1e-6)
        weight = float(np.clip((closure - CLOSING) / (CLOSED - CLOSING), 0.0, 1.0))
        if weight == 0.0:
            continue
        # Up the face: perpendicular to the corner-to-corner axis, towards the forehead (a closed eye's lids
        # coincide, so they cannot tell the side).
        axis = (driving[corner_b] - driving[corner_a]) / driving_width
        up = np.array([axis[1], -axis[0]])
        if np.dot(driving[FOREHEAD] - driving[CHIN], up) < 0:
            up = -up
        lowered = np.maximum(source_gap - driving_gap, 0.0)
        lid_top = driving[upper] + up * lowered[:, None]
        polygon = np.concatenate([driving[[corner_a]], lid_top, driving[[corner_b]], driving[lower][::-1]])
        positions = np.concatenate([[0.0], (driving[upper] - driving[corner_a]) @ axis, [driving_width]])
        heights = np.concatenate([[0.0], lowered, [0.0]])
        lid_line = np.concatenate([[0.0], (driving[upper] - driving[corner_a]) @ up, [0.0]])
        brow = driving[list(BROWS[side])] - driving[corner_a]
        brow_order = np.argsort(brow @ axis)
        brow_line = np.interp(positions, (brow @ axis)[brow_order], (brow @ up)[brow_order])
        clearance = np.maximum(brow_line - lid_line - heights, 0.0)  # band top to brow
        reach = np.minimum(heights, BROW_SHARE * clearance)
        order = np.argsort(positions, kind="stable")
        eyes.append(_ClosingEye(weight, polygon, driving[corner_a], axis, up, positions[order], heights[order],
                                lid_line[order], reach[order]))
    return eyes


def _feather(band: np.ndarray) -> np.ndarray:
    sigma = EYELID_SIGMA_AT_128 * min(band.shape) / 128.0
    return cv2.GaussianBlur(band, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
