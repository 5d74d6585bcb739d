"""The eyelid skin a closing driving eye shows and an open source eye hides, for the refinement to synthesise.

An open eye hides most of its upper lid in the fold above the lashes. When the driver closes the eye, the mesh
warp can only stretch what the source shows there: the lash line and the fold's shadow, drawn over the whole
lowered lid, so a blink becomes a dark smear instead of a lid of skin (docs/model_card.md). `eyelid_band`
marks, per eye, the band above the driving upper lid as tall as the lid came down (the source's local opening,
scaled to the driving eye's width, minus the driving one), plus what is left of the opening, faded in with
how far the eye has closed: ``prior_masks(..., eyelids=True)`` adds it to the synthesis channel, where the
output is the refinement network's (``ModelConfig.prior_eyelids``). With ``eyelid_channel=True`` the band is
also given alone, so the refinement can tell a lid from the mouth interior (``RefineConfig.eyelid_band``).
"""

from __future__ import annotations

import cv2
import numpy as np

from metaportrait.data.mesh_warp import check_landmarks, polygon_coverage

# MediaPipe eye contours, corner to corner: (corner, upper lid, corner, lower lid). They are the boundaries of
# the mesh's eye holes (`mesh_warp.HOLE_CORNERS`; tests/test_eyelids.py checks it).
EYES = {
    "right": (33, (246, 161, 160, 159, 158, 157, 173), 133, (7, 163, 144, 145, 153, 154, 155)),
    "left": (263, (466, 388, 387, 386, 385, 384, 398), 362, (249, 390, 373, 374, 380, 381, 382)),
}
FOREHEAD, CHIN = 10, 152  # MediaPipe's top and bottom of the face oval
# The band fades in from this closure (1 - the driving lid gaps' sum / the source's, scaled to the driving eye's
# width) to full at CLOSED: a narrowed eye keeps its warped iris, a blink gets a lid.
CLOSING, CLOSED = 0.3, 0.8
EYELID_SIGMA_AT_128 = 1.0  # feathering in px at 128 px, scaled with the image size


def eyelid_band(source_landmarks: np.ndarray, driving_landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """``float32`` ``(H, W)`` in [0, 1]: where the output should be synthesised eyelid (see the module docstring).

    Args:
        source_landmarks, driving_landmarks: ``(478, 2)`` pixel coordinates in the ``height`` x ``width`` frame.
    """
    source = check_landmarks(source_landmarks, "source_landmarks")
    driving = check_landmarks(driving_landmarks, "driving_landmarks")
    if height <= 0 or width <= 0:
        raise ValueError(f"band size must be positive, got {height} x {width}")
    band = np.zeros((height, width), np.float32)
    for corner_a, upper, corner_b, lower in EYES.values():
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
        lid_top = driving[upper] + up * np.maximum(source_gap - driving_gap, 0.0)[:, None]
        polygon = np.concatenate([driving[[corner_a]], lid_top, driving[[corner_b]], driving[lower][::-1]])
        band = np.maximum(band, weight * polygon_coverage(polygon, height, width))
    if not band.any():
        return band  # open eyes, most frames: no blur to pay for
    sigma = EYELID_SIGMA_AT_128 * min(height, width) / 128.0
    return np.clip(cv2.GaussianBlur(band, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE), 0.0, 1.0)
