"""Pixel geometry shared by the prior's modules: the landmark check, triangle areas and polygon rasterising.

Coordinates follow the landmark contract: continuous pixel coordinates, the centre of pixel column ``j`` is
``x = j + 0.5``.
"""

from __future__ import annotations

import cv2
import numpy as np

from metaportrait.prior.topology import NUM_LANDMARKS

SUBPIXEL_BITS = 4  # cv2.fillConvexPoly fixed-point precision (1/16 px)


def check_landmarks(landmarks: np.ndarray, name: str) -> np.ndarray:
    """``landmarks`` as ``float64`` ``(478, 2)`` pixel coordinates; ValueError naming ``name`` otherwise."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"{name} must be (478, 2) pixel coordinates, got shape {landmarks.shape}")
    if not np.isfinite(landmarks).all():
        raise ValueError(f"{name} holds non-finite values")
    return landmarks


def signed_areas(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """``(N,)`` signed areas in px² of ``triangles`` (``(N, 3)`` indices into ``(P, 2)`` ``points``); the sign is
    the winding."""
    a, b, c = points[triangles[:, 0]], points[triangles[:, 1]], points[triangles[:, 2]]
    return 0.5 * ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))


def hull_area(points: np.ndarray, oval: np.ndarray) -> float:
    """Area in px² (at least 1) of the convex hull of the face-oval points ``points[oval]``."""
    return max(float(cv2.contourArea(cv2.convexHull(points[oval].astype(np.float32)))), 1.0)


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
    corners = ((polygon - [x0, y0]) * supersample - 0.5) * (1 << SUBPIXEL_BITS)
    cv2.fillPoly(fine, [corners.astype(np.int32)], 1.0, cv2.LINE_8, SUBPIXEL_BITS)
    out[y0:y1, x0:x1] = cv2.resize(fine, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    return out
