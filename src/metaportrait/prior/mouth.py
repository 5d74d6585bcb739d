"""The mouth: how the prior fills a driving mouth opening, and a geometric sketch of an open mouth's interior.

`MouthFill` names the two fills of `metaportrait.prior.warp.mesh_warp_grid` and
`metaportrait.prior.masks.prior_masks`; `mouth_split` is the split line the "upper_lip" fill needs.

Trained on pixel losses alone, the refinement fills a mouth opening the source cannot supply with the average
interior: a smooth pale-pink block (docs/model_card.md). Where teeth sit in an open mouth is, to first order,
geometry: the upper incisors hang from the upper inner lip, the lower ones rise from the lower inner lip, and
the dark cavity is what is left. `mouth_template` draws that layout as two soft maps the decoder takes as extra
conditions (``RefineConfig.mouth_template``); colours, shading and single teeth stay the network's to learn.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from metaportrait.prior.geometry import check_landmarks, hull_area, polygon_coverage
from metaportrait.prior.topology import HOLE_CORNERS, MeshTopology, mesh_topology

# How the mesh fills a driving mouth opening (`mesh_warp_grid`, `prior_masks`): "stretch" maps the source's
# opening onto it (teeth stretched over a wide-open mouth: the classical baseline); "upper_lip" keeps the source's
# interior at its own height under the upper lip, where the upper teeth sit, and leaves the rest of the opening to
# synthesis (the lower lip's edge is repeated there in the grid).
MouthFill = Literal["stretch", "upper_lip"]
MOUTH_FILLS = ("stretch", "upper_lip")
MOUTH_CORNERS = HOLE_CORNERS["mouth"]


def mouth_split(source: np.ndarray, driving: np.ndarray, topology: MeshTopology) -> tuple[np.ndarray, np.ndarray]:
    """For ``mouth="upper_lip"``: ``(9, 2)`` driving points splitting the inner-lip opening, and their ``(9, 2)``
    source points (the source's lower inner lip).

    Each split point lies below its upper-lip point by the source's opening there (scaled by the ratio of the
    face sizes), at most down to the driving lower lip: above it the source's interior is shown unstretched,
    below it the source has nothing to show."""
    upper, lower = topology.mouth_upper[1:-1], topology.mouth_lower[1:-1]
    scale = np.sqrt(hull_area(driving, topology.oval) / hull_area(source, topology.oval))
    source_gap = np.linalg.norm(source[lower] - source[upper], axis=1) * scale
    driving_offset = driving[lower] - driving[upper]
    fraction = np.clip(source_gap / np.maximum(np.linalg.norm(driving_offset, axis=1), 1e-6), 0.0, 1.0)
    return driving[upper] + fraction[:, None] * driving_offset, source[lower]


# Tooth heights, as a fraction of the local opening and capped by a fraction of the mouth width (in adults the
# visible upper incisors are about a fifth as tall as the mouth is wide, the lower ones less).
UPPER_TEETH_OF_OPENING, UPPER_TEETH_OF_WIDTH = 0.45, 0.17
LOWER_TEETH_OF_OPENING, LOWER_TEETH_OF_WIDTH = 0.25, 0.08
TEMPLATE_SIGMA_AT_128 = 0.75  # feathering in px at 128 px, scaled with the image size


def mouth_template(driving_landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upper + lower teeth and the cavity inside the driving inner-lip contour.

    Args:
        driving_landmarks: ``(478, 2)`` MediaPipe pixel coordinates in the ``height`` x ``width`` frame.

    Returns:
        ``float32`` ``(2, H, W)`` in [0, 1]: channel 0 the teeth, channel 1 the rest of the opening (cavity,
        tongue). Both are 0 outside the opening and when the mouth is closed.
    """
    driving = check_landmarks(driving_landmarks, "driving_landmarks")
    if height <= 0 or width <= 0:
        raise ValueError(f"template size must be positive, got {height} x {width}")
    topology = mesh_topology()
    upper, lower = driving[topology.mouth_upper[1:-1]], driving[topology.mouth_lower[1:-1]]
    left, right = driving[[MOUTH_CORNERS[0]]], driving[[MOUTH_CORNERS[1]]]
    mouth_width = float(np.linalg.norm(right - left))
    offset = lower - upper  # per inner-lip column, from the upper to the lower lip
    gap = np.maximum(np.linalg.norm(offset, axis=1, keepdims=True), 1e-6)

    def edge(start: np.ndarray, direction: np.ndarray, of_opening: float, of_width: float) -> np.ndarray:
        length = np.minimum(of_opening * gap, of_width * mouth_width)
        return start + direction / gap * length

    upper_edge = edge(upper, offset, UPPER_TEETH_OF_OPENING, UPPER_TEETH_OF_WIDTH)
    lower_edge = edge(lower, -offset, LOWER_TEETH_OF_OPENING, LOWER_TEETH_OF_WIDTH)
    opening = polygon_coverage(np.concatenate([left, upper, right, lower[::-1]]), height, width)
    upper_teeth = polygon_coverage(np.concatenate([left, upper, right, upper_edge[::-1]]), height, width)
    lower_teeth = polygon_coverage(np.concatenate([left, lower_edge, right, lower[::-1]]), height, width)
    teeth = np.minimum(np.maximum(upper_teeth, lower_teeth), opening)
    cavity = np.clip(opening - teeth, 0.0, 1.0)
    sigma = TEMPLATE_SIGMA_AT_128 * min(height, width) / 128.0
    maps = [cv2.GaussianBlur(m, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE) for m in (teeth, cavity)]
    return np.clip(np.stack(maps), 0.0, 1.0).astype(np.float32)
