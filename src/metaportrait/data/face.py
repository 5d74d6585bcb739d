"""Face boxes and square face crops: detection, crop boxes from landmarks, cropping, pasting back.

A `CropBox` is a square in source pixels (centre ``cx, cy`` and ``side``) built from dense landmarks. Datasets
use one stable box per clip (`clip_box`, the median of the per-frame boxes) so the head moves inside a fixed
crop; inference uses a smoothed moving box (`BoxSmoother`) so the crop follows the head without shaking.

Coordinates are continuous pixel coordinates (as in `metaportrait.data.landmarks`): the left edge of the
image is ``x = 0`` and pixel column ``i`` covers ``[i, i + 1)``. A box maps ``[x0, x0 + side]`` onto
``[0, size]`` of the crop. Boxes may extend beyond the image; `crop` fills the outside by replicating the
border pixels and `paste_back` only writes inside the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from metaportrait.data.landmarks import NUM_MESH_POINTS, OneEuroFilter, quiet_native_stderr

DEFAULT_EXPAND = 1.6  # crop side = expand * max(width, height) of the 468-point face-mesh box
DEFAULT_SHIFT = -0.08  # vertical offset of the centre in units of the side; negative = up (keeps hair, less neck)

# One-Euro settings for the moving inference box (pixels). Much slower than the landmark filter: a shaking
# crop makes the whole animated frame shake, while a lagging crop only lets the head drift a little.
BOX_MIN_CUTOFF = 0.4
BOX_BETA = 0.01


@dataclass(frozen=True)
class FaceDetection:
    """A face found by the MediaPipe face detector: corners in source pixels and a confidence in [0, 1]."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float


def detect_face(image: np.ndarray, min_confidence: float = 0.5) -> FaceDetection | None:
    """The most confident face in ``image`` (``uint8`` ``(H, W, 3)`` RGB), or ``None``.

    Tries MediaPipe's short-range model (faces within ~2 m, the usual portrait) and falls back to the
    full-range model for small or distant faces.
    """
    _check_image(image)
    height, width = image.shape[:2]
    for model_selection in (0, 1):
        with quiet_native_stderr():
            import mediapipe as mp  # heavy; only needed here

            with mp.solutions.face_detection.FaceDetection(
                model_selection=model_selection, min_detection_confidence=min_confidence
            ) as detector:
                result = detector.process(np.ascontiguousarray(image))
        if not result.detections:
            continue
        best = max(result.detections, key=lambda d: d.score[0])
        box = best.location_data.relative_bounding_box
        return FaceDetection(
            x0=box.xmin * width,
            y0=box.ymin * height,
            x1=(box.xmin + box.width) * width,
            y1=(box.ymin + box.height) * height,
            score=float(best.score[0]),
        )
    return None


@dataclass(frozen=True)
class CropBox:
    """A square crop region in source pixels: centre ``(cx, cy)`` and side length ``side`` (> 0)."""

    cx: float
    cy: float
    side: float

    def __post_init__(self):
        if not (self.side > 0 and math.isfinite(self.side) and math.isfinite(self.cx) and math.isfinite(self.cy)):
            raise ValueError(f"CropBox needs a finite centre and a positive side, got {self}")

    @property
    def x0(self) -> float:
        """Left edge in source pixels."""
        return self.cx - self.side / 2

    @property
    def y0(self) -> float:
        """Top edge in source pixels."""
        return self.cy - self.side / 2

    def to_list(self) -> list[float]:
        """``[x0, y0, side]``, the form stored in the dataset manifest (docs/contracts.md)."""
        return [float(self.x0), float(self.y0), float(self.side)]

    @classmethod
    def from_list(cls, values: list[float] | tuple[float, float, float]) -> CropBox:
        """Inverse of `to_list`."""
        x0, y0, side = (float(v) for v in values)
        return cls(x0 + side / 2, y0 + side / 2, side)

    @classmethod
    def from_landmarks(
        cls, points: np.ndarray, expand: float = DEFAULT_EXPAND, shift: float = DEFAULT_SHIFT
    ) -> CropBox:
        """The crop around one face.

        Args:
            points: ``(478, 2)`` or ``(468, 2)`` landmark pixel coordinates; only the 468 mesh points are used.
            expand: side = ``expand`` * max(width, height) of the mesh points' bounding box.
            shift: the centre moves down by ``shift * side`` (negative moves it up).
        """
        points = np.asarray(points)
        if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < NUM_MESH_POINTS:
            raise ValueError(f"expected landmarks of shape (478, 2), got {points.shape}")
        if expand <= 0:
            raise ValueError(f"expand must be > 0, got {expand}")
        mesh = points[:NUM_MESH_POINTS].astype(np.float64)
        low, high = mesh.min(axis=0), mesh.max(axis=0)
        side = expand * float(max(high - low))
        cx, cy = (low + high) / 2
        return cls(float(cx), float(cy + shift * side), side)


def boxes_from_landmarks(
    landmarks: np.ndarray, expand: float = DEFAULT_EXPAND, shift: float = DEFAULT_SHIFT
) -> np.ndarray:
    """Per-frame boxes as a ``float64`` ``(T, 3)`` array of ``(cx, cy, side)`` from ``(T, 478, 2)`` landmarks."""
    if landmarks.ndim != 3:
        raise ValueError(f"expected landmarks of shape (T, 478, 2), got {landmarks.shape}")
    boxes = [CropBox.from_landmarks(points, expand, shift) for points in landmarks]
    return np.array([(b.cx, b.cy, b.side) for b in boxes], dtype=np.float64).reshape(-1, 3)


def clip_box(
    landmarks: np.ndarray,
    present: np.ndarray,
    expand: float = DEFAULT_EXPAND,
    shift: float = DEFAULT_SHIFT,
) -> CropBox:
    """One stable box for a whole clip: the median centre and side of the per-frame boxes where a face was found.

    Args:
        landmarks: ``(T, 478, 2)`` pixel coordinates.
        present: ``bool`` ``(T,)``; frames marked False are ignored.
    """
    present = np.asarray(present, dtype=bool)
    if present.shape != (len(landmarks),):
        raise ValueError(f"present has shape {present.shape}, expected ({len(landmarks)},)")
    if not present.any():
        raise ValueError("clip_box needs at least one frame with a face")
    boxes = boxes_from_landmarks(landmarks[present], expand, shift)
    cx, cy, side = np.median(boxes, axis=0)
    return CropBox(float(cx), float(cy), float(side))


class BoxSmoother:
    """A crop box that follows the face smoothly over a video: One-Euro filtering of centre and side.

    Call it once per frame with that frame's raw box (e.g. ``CropBox.from_landmarks``); it returns the
    smoothed box. Call `reset` after a cut.
    """

    def __init__(self, fps: float, min_cutoff: float = BOX_MIN_CUTOFF, beta: float = BOX_BETA):
        self._filter = OneEuroFilter(fps, min_cutoff=min_cutoff, beta=beta, d_cutoff=1.0)

    def reset(self) -> None:
        """Forget the history; the next box passes through unchanged."""
        self._filter.reset()

    def __call__(self, box: CropBox) -> CropBox:
        """The smoothed box for this frame."""
        cx, cy, side = self._filter(np.array([box.cx, box.cy, box.side]))
        return CropBox(float(cx), float(cy), float(side))


def crop_matrix(box: CropBox, size: int) -> np.ndarray:
    """``(2, 3)`` affine matrix taking source points to crop points (``size`` x ``size`` crop)."""
    scale = size / box.side
    return np.array([[scale, 0.0, -scale * box.x0], [0.0, scale, -scale * box.y0]], dtype=np.float64)


def uncrop_matrix(box: CropBox, size: int) -> np.ndarray:
    """``(2, 3)`` affine matrix taking crop points back to source points; the inverse of `crop_matrix`."""
    scale = box.side / size
    return np.array([[scale, 0.0, box.x0], [0.0, scale, box.y0]], dtype=np.float64)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points)
    if points.shape[-1] != 2:
        raise ValueError(f"expected points of shape (..., 2), got {points.shape}")
    moved = points.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
    return moved.astype(np.float32)


def points_to_crop(points: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """Source pixel coordinates ``(..., 2)`` -> crop pixel coordinates ``float32`` ``(..., 2)``."""
    return _apply(crop_matrix(box, size), points)


def points_from_crop(points: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """Crop pixel coordinates ``(..., 2)`` -> source pixel coordinates ``float32`` ``(..., 2)``."""
    return _apply(uncrop_matrix(box, size), points)


def _pixel_matrix(matrix: np.ndarray) -> np.ndarray:
    """The same mapping for OpenCV, which puts pixel centres at integers (ours are at i + 0.5)."""
    out = matrix.copy()
    # u_c + 0.5 = A (x_c + 0.5) + t  =>  u_c = A x_c + t + (A - I) 0.5
    out[:, 2] += (matrix[:, :2] @ np.array([0.5, 0.5])) - 0.5
    return out


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        description = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {description}")


def crop(image: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """Cut the square ``box`` out of ``image`` and resample it to ``size`` x ``size``.

    Args:
        image: ``uint8`` ``(H, W, 3)`` RGB.
        box: region in source pixels; parts outside the image are filled by replicating the border.
        size: output side in pixels.

    Returns:
        ``uint8`` ``(size, size, 3)`` RGB.
    """
    _check_image(image)
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    if box.side <= size:
        matrix = _pixel_matrix(crop_matrix(box, size))
        return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # Shrinking: bilinear warping would alias (it reads only 4 pixels per output pixel). Cut the box at about
    # native resolution first, then area-average down; both steps map box edges onto crop edges exactly.
    native = math.ceil(box.side)
    matrix = _pixel_matrix(crop_matrix(box, native))
    region = cv2.warpAffine(image, matrix, (native, native), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def box_region(box: CropBox, height: int, width: int) -> tuple[int, int, int, int] | None:
    """``(left, top, right, bottom)``: the integer pixels of a ``(height, width)`` frame the box covers, or None
    when it lies entirely outside the frame. Only these change when a crop is pasted back."""
    left, top = max(0, math.floor(box.x0)), max(0, math.floor(box.y0))
    right, bottom = min(width, math.ceil(box.x0 + box.side)), min(height, math.ceil(box.y0 + box.side))
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


def _warp_into_region(crop_values: np.ndarray, box: CropBox, region: tuple[int, int, int, int], border: int,
                      border_value: float = 0.0) -> np.ndarray:  # fmt: skip
    """Resample a crop-aligned array (bilinear) onto the frame pixels of ``region`` (from `box_region`)."""
    left, top, right, bottom = region
    to_region = uncrop_matrix(box, crop_values.shape[0])  # crop -> source, then the region's corner is the origin
    to_region[:, 2] -= (left, top)
    return cv2.warpAffine(crop_values, _pixel_matrix(to_region), (right - left, bottom - top), flags=cv2.INTER_LINEAR,
                          borderMode=border, borderValue=border_value)  # fmt: skip


def uncrop_map(values: np.ndarray, box: CropBox, height: int, width: int) -> np.ndarray:
    """A crop-aligned ``float32`` ``(S, S)`` map resampled into the ``(height, width)`` frame the crop was cut
    from (bilinear; 0 outside the box; only the box's region is computed)."""
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"expected a square (S, S) map, got {values.shape}")
    out = np.zeros((height, width), np.float32)
    region = box_region(box, height, width)
    if region is not None:
        left, top, right, bottom = region
        out[top:bottom, left:right] = warp_into_region(values, box, region)
    return out


def paste_back(full_image: np.ndarray, crop_image: np.ndarray, box: CropBox, feather: float = 0.1) -> np.ndarray:
    """Blend a (generated) crop back into the full frame it was cut from, with a soft edge.

    The crop is resampled into the box's region of the frame. Its weight is 1 in the middle and falls
    smoothly to 0 at the crop border over ``feather * size`` crop pixels, so no seam shows.

    Args:
        full_image: ``uint8`` ``(H, W, 3)`` RGB frame (not modified).
        crop_image: ``uint8`` ``(S, S, 3)`` RGB crop, aligned with ``box`` as `crop` produced it.
        box: where the crop came from, in source pixels.
        feather: width of the soft edge as a fraction of the crop side, in ``[0, 0.5]`` (0 = hard edge).

    Returns:
        A new ``uint8`` ``(H, W, 3)`` RGB frame.
    """
    _check_image(full_image)
    _check_image(crop_image)
    size = crop_image.shape[0]
    if crop_image.shape[1] != size:
        raise ValueError(f"crop must be square, got {crop_image.shape}")
    if not 0.0 <= feather <= 0.5:
        raise ValueError(f"feather must be in [0, 0.5], got {feather}")
    height, width = full_image.shape[:2]
    out = full_image.copy()
    # Only the integer region covered by the box (and inside the frame) changes.
    region = box_region(box, height, width)
    if region is None:
        return out  # the box lies entirely outside the frame
    left, top, right, bottom = region
    out[top:bottom, left:right] = blend_region(full_image, crop_image, box, region, feather)
    return out


def blend_region(full_image: np.ndarray, crop_image: np.ndarray, box: CropBox, region: tuple[int, int, int, int],
                 feather: float) -> np.ndarray:
    """`paste_back`'s work on ``region`` (`box_region`) only: ``float32`` ``(h, w, 3)`` values, already rounded and
    clipped to [0, 255], so a caller can add more to them before the one conversion to ``uint8``."""
    size = crop_image.shape[0]
    left, top, right, bottom = region
    blended = _warp_into_region(crop_image, box, region, cv2.BORDER_REPLICATE).astype(np.float32)
    # Weight of every region pixel from its position in crop coordinates (separable in x and y).
    scale = size / box.side
    u = (np.arange(left, right) + 0.5 - box.x0) * scale  # crop x of each column centre
    v = (np.arange(top, bottom) + 0.5 - box.y0) * scale  # crop y of each row centre
    ramp = max(feather * size, 1e-6)
    weight_x = _smoothstep(np.minimum(u, size - u) / ramp)
    weight_y = _smoothstep(np.minimum(v, size - v) / ramp)
    weight = (weight_y[:, None] * weight_x[None, :])[..., None].astype(np.float32)  # (h, w, 1)
    background = full_image[top:bottom, left:right].astype(np.float32)
    # background + weight * (pasted - background), in place: at 1024 px the temporaries cost more than the sums
    blended -= background
    blended *= weight
    blended += background
    np.rint(blended, out=blended)
    return np.clip(blended, 0, 255, out=blended)


def warp_into_region(crop_values: np.ndarray, box: CropBox, region: tuple[int, int, int, int]) -> np.ndarray:
    """A crop-aligned ``float32`` ``(S, S)`` map resampled onto the frame pixels of ``region`` (bilinear, 0 outside
    the box): `uncrop_map` without the rest of the frame."""
    return _warp_into_region(crop_values.astype(np.float32), box, region, cv2.BORDER_CONSTANT)
