"""The prior masks: where a mesh-prior model trusts the mesh warp, and where it must synthesise.

`face_mask` is the soft face-oval hull (also the face-masked grid's blend, the face-region losses' mask and the
evaluation's face region); `prior_masks` stacks the generator's ``prior_masks`` input from it, the mouth
opening the source cannot supply, the mouth template and the eyelid band.
"""

from __future__ import annotations

import cv2
import numpy as np

from metaportrait.prior.eyelids import eyelid_band
from metaportrait.prior.geometry import SUBPIXEL_BITS, check_landmarks, hull_area, polygon_coverage, signed_areas
from metaportrait.prior.mouth import MOUTH_CORNERS, MOUTH_FILLS, MouthFill, mouth_split, mouth_template
from metaportrait.prior.topology import mesh_topology

# Prior masks (`prior_masks`), feathering sigmas at 128 px, scaled with the image size.
TRUST_SIGMA_AT_128 = 2.0
MOUTH_SIGMA_AT_128 = 1.0


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
    hull = cv2.convexHull(((landmarks[mesh_topology().oval] - 0.5) * (1 << SUBPIXEL_BITS)).astype(np.int32))
    inside = np.zeros((height, width), dtype=np.uint8)
    cv2.fillConvexPoly(inside, hull, 1, cv2.LINE_8, SUBPIXEL_BITS)
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
        template: append the `metaportrait.prior.mouth.mouth_template` of the driving face (teeth, cavity) as
            channels 2-3, for models with ``RefineConfig.mouth_template``.
        eyelids: channel 1 also covers `metaportrait.prior.eyelids.eyelid_band` (``ModelConfig.prior_eyelids``).
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
        split, _ = mouth_split(source, driving, topology)
        below = np.concatenate([driving[[MOUTH_CORNERS[0]]], split, driving[topology.mouth_lower[::-1]]])
        fill = polygon_coverage(below, height, width)
        fill = cv2.GaussianBlur(fill, (0, 0), MOUTH_SIGMA_AT_128 * scale, borderType=cv2.BORDER_REPLICATE)
        return _stack(face, fill, source, driving, template, eyelids, eyelid_channel)
    mouth_triangles = topology.holes[~topology.eye_holes]
    opening = {}
    for name, points in (("source", source), ("driving", driving)):
        opening[name] = np.abs(signed_areas(points, mouth_triangles)).sum() / hull_area(points, topology.oval)
    need = 0.0 if opening["driving"] <= 1e-6 else float(np.clip(1.0 - opening["source"] / opening["driving"], 0, 1))
    mouth = np.zeros((height, width), dtype=np.float32)
    if need > 0:
        for triangle in mouth_triangles:
            corners = ((driving[triangle] - 0.5) * (1 << SUBPIXEL_BITS)).astype(np.int32)
            cv2.fillConvexPoly(mouth, corners, need, cv2.LINE_8, SUBPIXEL_BITS)
        mouth = cv2.GaussianBlur(mouth, (0, 0), MOUTH_SIGMA_AT_128 * scale, borderType=cv2.BORDER_REPLICATE)
    return _stack(face, mouth, source, driving, template, eyelids, eyelid_channel)


def _stack(face, mouth, source, driving, template: bool, eyelids: bool, eyelid_channel: bool) -> np.ndarray:
    """`prior_masks`' channels: face, mouth [∪ eyelid band], [teeth, cavity], [eyelid band]."""
    channels = [face, mouth]
    if eyelids:
        band = eyelid_band(source, driving, *mouth.shape)
        channels[1] = np.maximum(mouth, band)
    if template:
        channels.extend(mouth_template(driving, *mouth.shape))
    if eyelid_channel:
        channels.append(band)
    return np.stack(channels).astype(np.float32)
