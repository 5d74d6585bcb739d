"""Evaluation metrics as plain functions (definitions and their sources: docs/notes methods.md section 2).

Images are NumPy ``(H, W, 3)`` or ``(N, H, W, 3)`` RGB, either ``uint8`` (divided by 255) or floating point in
``[0, 1]``; batched image metrics average the per-image values. Landmarks are ``(..., 478, 2)`` MediaPipe
pixel coordinates (in the evaluation protocols: of the 256 px crop).

Offline proxies, to be labelled as such in reports (the literature's networks cannot be downloaded here):

- ``akd``: mean distance of all 478 MediaPipe points, not of FAN's 68 points.
- ``apd``: head pose from ``cv2.solvePnP`` of 8 landmarks against a generic 3D face, not Deep3DFaceRecon;
  in degrees, not radians.
- ``aed``: non-rigid landmark residual after a similarity fit, in inter-ocular distances, not 3DMM
  expression coefficients.
- ``warping_error``: Lai et al.'s E_warp (squared error, forward-backward occlusion mask) with OpenCV DIS
  optical flow instead of FlowNet2.
- identity: dlib ResNet descriptors (`metaportrait.models.identity`), not ArcFace.
- ``fd_mobilenetv2`` (re-exported from `metaportrait.eval.features`): Fréchet distance on ImageNet
  MobileNetV2 features, not FID.

The published LPIPS (AlexNet) and FID (pytorch-fid's Inception) are in `metaportrait.eval.reference_nets`, and
are computed only from weight files the user gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from metaportrait.eval.features import fd_mobilenetv2
from metaportrait.motion import eye_openness, fit_similarity, mouth_openness

if TYPE_CHECKING:
    from metaportrait.models.identity import IdentityEncoder

__all__ = [
    "IMAGE_METRICS",
    "LANDMARK_METRICS",
    "TemporalFlow",
    "aed",
    "akd",
    "apd",
    "face_region_l1",
    "fd_mobilenetv2",
    "head_pose",
    "id_distance",
    "identity_metrics",
    "l1",
    "psnr",
    "ssim",
    "temporal_flow",
    "warping_error",
]

NUM_LANDMARKS = 478

# ---------------------------------------------------------------------------------------------------------
# Pixel metrics
# ---------------------------------------------------------------------------------------------------------

SSIM_WINDOW = 11  # Gaussian window of Wang et al. 2004 (and skimage / BasicSR "MATLAB mode")
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03  # standard constants, data range 1


def _as_unit(images: np.ndarray, name: str) -> np.ndarray:
    """``uint8`` or float ``[0, 1]`` images -> float64 ``(N, H, W, 3)``."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be (H, W, 3) or (N, H, W, 3) RGB, got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float64) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 or floating point in [0, 1], got {images.dtype}")
    if images.size and not (images.min() >= 0.0 and images.max() <= 1.0):  # also catches NaN
        raise ValueError(f"{name} must be in [0, 1], got range [{images.min():.4g}, {images.max():.4g}]")
    return images.astype(np.float64)


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_unit(a, "a"), _as_unit(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    return a, b


def l1(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of images in ``[0, 1]`` (over pixels, channels and images)."""
    a, b = _pair(a, b)
    return float(np.abs(a - b).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for data range 1, computed per image and averaged (inf if identical)."""
    a, b = _pair(a, b)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return float(np.mean(10.0 * np.log10(1.0 / mse)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data
    range 1, per channel, "valid" region (5 px border dropped), averaged over channels and images.

    Matches ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)``. Images need at least 11 x 11 pixels.
    """
    a, b = _pair(a, b)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape[1:3]}")
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    pad = SSIM_WINDOW // 2
    scores = []
    for x, y in zip(a, b):

        def blur(image: np.ndarray) -> np.ndarray:
            return cv2.GaussianBlur(image, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

        mu_x, mu_y = blur(x), blur(y)
        var_x = blur(x * x) - mu_x**2
        var_y = blur(y * y) - mu_y**2
        cov = blur(x * y) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        # Only windows that lie fully inside the image ("valid"); border handling then does not matter.
        scores.append(ssim_map[pad:-pad, pad:-pad].mean())
    return float(np.mean(scores))


def face_region_l1(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mask-weighted mean absolute difference, per image then averaged.

    Args:
        a, b: images (see module docstring).
        mask: ``(H, W)`` or ``(N, H, W)`` weights in ``[0, 1]`` (e.g. the face-oval hull), not all zero.
    """
    a, b = _pair(a, b)
    mask = np.asarray(mask, dtype=np.float64)
    if mask.ndim == 2:
        mask = np.broadcast_to(mask, a.shape[:3])
    if mask.shape != a.shape[:3]:
        raise ValueError(f"mask must be (H, W) or (N, H, W) matching images {a.shape}, got {mask.shape}")
    if mask.min() < 0 or mask.max() > 1:
        raise ValueError("mask must be in [0, 1]")
    weight = mask.sum(axis=(1, 2))
    if (weight <= 0).any():
        raise ValueError("mask is empty for at least one image")
    per_image = (np.abs(a - b).mean(axis=-1) * mask).sum(axis=(1, 2)) / weight
    return float(per_image.mean())


# ---------------------------------------------------------------------------------------------------------
# Landmark metrics: keypoints, head pose, expression
# ---------------------------------------------------------------------------------------------------------

# Generic 3D face for head pose, in millimetres, camera-aligned for a frontal face: x to the image's right,
# y down, z away from the camera; origin at the nose tip. The six classic points are the OpenCV / LearnOpenCV
# head-pose model scaled by 0.2 (nose tip, chin, outer eye corners, mouth corners) with y and z flipped into
# this frame; the inner eye corners use an average inter-canthal width of 32 mm.
POSE_MODEL_POINTS: dict[int, tuple[float, float, float]] = {
    1: (0.0, 0.0, 0.0),  # nose tip
    152: (0.0, 66.0, 13.0),  # chin
    33: (-45.0, -34.0, 27.0),  # subject's right eye, outer corner (image left)
    263: (45.0, -34.0, 27.0),  # subject's left eye, outer corner
    133: (-16.0, -33.0, 22.0),  # right eye, inner corner
    362: (16.0, -33.0, 22.0),  # left eye, inner corner
    61: (-30.0, 30.0, 25.0),  # right mouth corner
    291: (30.0, 30.0, 25.0),  # left mouth corner
}
OUTER_EYE_CORNERS = (33, 263)  # inter-ocular distance for AED


def _landmarks(points: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim < 2 or points.shape[-2:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"{name} must be (..., {NUM_LANDMARKS}, 2) pixel coordinates, got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"{name} holds non-finite values")
    return points


def _landmark_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _landmarks(a, "landmarks_a"), _landmarks(b, "landmarks_b")
    if a.shape != b.shape:
        raise ValueError(f"landmark shapes differ: {a.shape} vs {b.shape}")
    return a, b


def akd(landmarks_a: np.ndarray, landmarks_b: np.ndarray) -> float:
    """Average keypoint distance: mean Euclidean distance in pixels between corresponding points (all frames)."""
    a, b = _landmark_pair(landmarks_a, landmarks_b)
    return float(np.linalg.norm(a - b, axis=-1).mean())


def head_pose(landmarks: np.ndarray, image_size: float = 256.0) -> np.ndarray:
    """Head rotation ``(yaw, pitch, roll)`` in degrees from 2D landmarks, by ``cv2.solvePnP`` (SQPnP) of the 8
    `POSE_MODEL_POINTS` with a pinhole camera (focal length = ``image_size``, principal point at the centre).

    The rotation R (model -> camera) is decomposed as ``Rz(roll) @ Ry(yaw) @ Rx(pitch)``, so an in-plane
    rotation of the landmarks by theta about the principal point changes roll by exactly theta. Signs, in the
    camera frame (x right, y down, z forward): positive roll turns the face clockwise on screen; all zeros is
    a frontal upright face. The generic model makes absolute angles approximate (a few degrees); differences
    between frames of one face are what APD uses.

    Args:
        landmarks: ``(..., 478, 2)`` pixel coordinates in a square image of side ``image_size``.

    Returns:
        ``float64`` ``(..., 3)`` degrees.
    """
    points = _landmarks(landmarks, "landmarks")
    indices = list(POSE_MODEL_POINTS)
    model = np.array([POSE_MODEL_POINTS[i] for i in indices], dtype=np.float64)
    camera = np.array([[image_size, 0, image_size / 2], [0, image_size, image_size / 2], [0, 0, 1]], np.float64)
    flat = np.ascontiguousarray(points.reshape(-1, NUM_LANDMARKS, 2)[:, indices])  # cv2 needs C order
    angles = np.empty((len(flat), 3))
    for k, image_points in enumerate(flat):
        ok, rotation_vector, _ = cv2.solvePnP(model, image_points, camera, None, flags=cv2.SOLVEPNP_SQPNP)
        if not ok:
            raise ValueError(f"solvePnP failed on frame {k}")
        rotation, _ = cv2.Rodrigues(rotation_vector)
        yaw = np.arcsin(np.clip(-rotation[2, 0], -1.0, 1.0))
        pitch = np.arctan2(rotation[2, 1], rotation[2, 2])
        roll = np.arctan2(rotation[1, 0], rotation[0, 0])
        angles[k] = np.degrees([yaw, pitch, roll])
    return angles.reshape(*points.shape[:-2], 3)


def apd(landmarks_a: np.ndarray, landmarks_b: np.ndarray, image_size: float = 256.0) -> float:
    """Average pose distance: mean absolute difference of (yaw, pitch, roll) in degrees (see `head_pose`)."""
    a, b = _landmark_pair(landmarks_a, landmarks_b)
    difference = head_pose(a, image_size) - head_pose(b, image_size)
    wrapped = (difference + 180.0) % 360.0 - 180.0
    return float(np.abs(wrapped).mean())


def aed(landmarks_a: np.ndarray, landmarks_b: np.ndarray) -> float:
    """Average expression distance: the non-rigid landmark difference, in inter-ocular distances.

    Per frame, the similarity (scale, rotation, translation) that best maps ``a`` onto ``b`` on the rigid
    points (`metaportrait.motion.RIGID_POINTS`: face outline above the jaw, nose, eye corners) is removed; the
    mean Euclidean residual over all 478 points is divided by ``b``'s outer-eye-corner distance. Invariant to
    similarity transforms of either input; 0 for the same shape. Between different people it also measures
    face-shape differences.
    """
    a, b = _landmark_pair(landmarks_a, landmarks_b)
    scale, shift = fit_similarity(a, b)  # complex: b ~ scale * a + shift
    za = a[..., 0] + 1j * a[..., 1]
    zb = b[..., 0] + 1j * b[..., 1]
    residual = np.abs(scale[..., None] * za + shift[..., None] - zb)  # (..., 478)
    right, left = OUTER_EYE_CORNERS
    inter_ocular = np.abs(zb[..., right] - zb[..., left])
    return float((residual.mean(axis=-1) / inter_ocular).mean())


# Below these spreads (standard deviation of the openness over the clip) the driver's region barely moves, and a
# correlation with it measures tracker noise: the following metrics are NaN there.
MIN_MOUTH_SPREAD = 0.02
MIN_EYE_SPREAD = 0.02


def _correlation(a: np.ndarray, b: np.ndarray, min_spread: float) -> float:
    if b.std() < min_spread or a.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _range_ratio(a: np.ndarray, b: np.ndarray, min_spread: float) -> float:
    """Robust range (5th to 95th percentile) of ``a`` over ``b``'s."""
    if b.std() < min_spread:
        return float("nan")
    return float(np.ptp(np.percentile(a, [5, 95])) / np.ptp(np.percentile(b, [5, 95])))


def following(output_landmarks: np.ndarray, driving_landmarks: np.ndarray) -> dict[str, float]:
    """How the output's mouth and eyes follow the driver's, over one clip.

    Openness as `metaportrait.motion.mouth_openness` / `eye_openness` (ratios, so the two faces' sizes do not
    matter), per frame of ``(T, 478, 2)`` landmarks measured on the output and on the driver:

    * ``mouth_corr``, ``eye_corr``: Pearson correlation over time (1 = opens and closes with the driver);
    * ``mouth_range``: the output's robust openness range over the driver's (1 = opens as far).

    NaN when the driver's region hardly moves (`MIN_MOUTH_SPREAD`, `MIN_EYE_SPREAD`) or the clip is shorter
    than 3 frames.
    """
    a, b = _landmark_pair(output_landmarks, driving_landmarks)
    if a.ndim != 3 or len(a) < 3:
        return {"mouth_corr": float("nan"), "mouth_range": float("nan"), "eye_corr": float("nan")}
    mouth_a, mouth_b = mouth_openness(a), mouth_openness(b)
    return {
        "mouth_corr": _correlation(mouth_a, mouth_b, MIN_MOUTH_SPREAD),
        "mouth_range": _range_ratio(mouth_a, mouth_b, MIN_MOUTH_SPREAD),
        "eye_corr": _correlation(eye_openness(a), eye_openness(b), MIN_EYE_SPREAD),
    }


LANDMARK_METRICS = {"akd": akd, "aed": aed, "apd": apd}
IMAGE_METRICS = {"l1": l1, "psnr": psnr, "ssim": ssim}

# ---------------------------------------------------------------------------------------------------------
# Temporal consistency: warping error
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemporalFlow:
    """Optical flow between consecutive frames, for `warping_error`.

    Attributes:
        backward: ``float32`` ``(T-1, H, W, 2)``: for pixel ``p`` of frame ``t`` (index ``t-1`` here), frame
            ``t-1`` shows it at ``p + backward`` (pixels).
        valid: ``bool`` ``(T-1, H, W)``: not occluded and not on a motion boundary (Lai et al.'s mask).
    """

    backward: np.ndarray
    valid: np.ndarray


def _dis_flow(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Flow from ``first`` to ``second`` (grey uint8): ``first(p) ~ second(p + flow(p))``."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(first, second, None)


def _sample(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``image(p + flow(p))``, bilinear, zeros outside (cv2 pixel-centre coordinates)."""
    height, width = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return cv2.remap(image, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def temporal_flow(frames: np.ndarray) -> TemporalFlow:
    """DIS optical flow between consecutive frames and Lai et al.'s (ECCV 2018) occlusion mask.

    A pixel of frame ``t`` is marked occluded if the forward-backward check fails,
    ``|fw(p + bw(p)) + bw(p)|^2 > 0.01 (|fw(p + bw(p))|^2 + |bw(p)|^2) + 0.5``, or it lies on a motion boundary,
    ``|grad u|^2 + |grad v|^2 > 0.01 |bw|^2 + 0.002`` (forward differences of the backward flow). Pixels whose
    flow leaves the image are also excluded.

    Args:
        frames: ``uint8`` ``(T, H, W, 3)`` RGB, T >= 2.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 2:
        raise ValueError(f"frames must be uint8 (T >= 2, H, W, 3), got {frames.dtype} {frames.shape}")
    grey = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
    height, width = grey[0].shape
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    backward_flows, valid_masks = [], []
    for previous, current in zip(grey[:-1], grey[1:]):
        backward = _dis_flow(current, previous)  # current(p) ~ previous(p + backward(p))
        forward = _dis_flow(previous, current)
        forward_at_target = _sample(forward, backward)
        mismatch = ((forward_at_target + backward) ** 2).sum(-1)
        magnitude = (forward_at_target**2).sum(-1) + (backward**2).sum(-1)
        occluded = mismatch > 0.01 * magnitude + 0.5
        gradient = np.zeros((height, width), np.float32)
        gradient[:, :-1] += ((backward[:, 1:] - backward[:, :-1]) ** 2).sum(-1)
        gradient[:-1, :] += ((backward[1:, :] - backward[:-1, :]) ** 2).sum(-1)
        boundary = gradient > 0.01 * (backward**2).sum(-1) + 0.002
        target_x, target_y = xs + backward[..., 0], ys + backward[..., 1]
        inside = (target_x >= 0) & (target_x <= width - 1) & (target_y >= 0) & (target_y <= height - 1)
        backward_flows.append(backward)
        valid_masks.append(~occluded & ~boundary & inside)
    return TemporalFlow(np.stack(backward_flows), np.stack(valid_masks))


def warping_error(frames: np.ndarray, flow: TemporalFlow | None = None) -> float:
    """Warping error E_warp (Lai et al. 2018): each frame ``t-1`` is warped to frame ``t`` along the optical
    flow, and the squared difference (images in [0, 1], mean over channels) is averaged over the valid
    (non-occluded) pixels, then over the ``T-1`` frame pairs.

    Lai et al. and MetaPortrait compute the flow on the ground-truth / input video and apply it to every
    method's output, so all methods are judged against the same motion: pass ``flow=temporal_flow(real)``.
    Without ``flow`` the flow is measured on ``frames`` themselves (for outputs without a ground truth).
    This is Lai's squared-error form; MetaPortrait's code uses an L1 summed over channels (not comparable).

    Args:
        frames: ``uint8`` ``(T, H, W, 3)`` RGB, T >= 2.
        flow: precomputed flow for frames of this size and count.
    """
    frames = np.asarray(frames)
    if flow is None:
        flow = temporal_flow(frames)
    if frames.dtype != np.uint8 or frames.shape[:3] != (len(flow.backward) + 1, *flow.valid.shape[1:]):
        raise ValueError(f"frames {frames.dtype} {frames.shape} do not match the flow {flow.backward.shape}")
    errors = []
    for t in range(1, len(frames)):
        previous = frames[t - 1].astype(np.float32) / 255.0
        current = frames[t].astype(np.float32) / 255.0
        warped = _sample(previous, flow.backward[t - 1])
        valid = flow.valid[t - 1]
        squared = ((current - warped) ** 2).mean(-1)
        errors.append(float(squared[valid].sum() / max(int(valid.sum()), 1)))
    return float(np.mean(errors))


# ---------------------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------------------


def identity_metrics(
    images: np.ndarray,
    landmarks: np.ndarray,
    source_image: np.ndarray,
    source_landmarks: np.ndarray,
    encoder: IdentityEncoder,
    batch_size: int = 32,
) -> dict[str, float]:
    """Identity distance of generated frames to the source portrait, with dlib descriptors.

    Args:
        images: ``uint8`` ``(N, H, W, 3)`` generated frames.
        landmarks: ``(N, 478, 2)`` their landmarks (measured on the generated frames).
        source_image: ``uint8`` ``(H', W', 3)`` the source portrait; ``source_landmarks`` ``(478, 2)``.
        encoder: a `metaportrait.models.identity.IdentityEncoder`.

    Returns:
        ``{"id_distance": mean Euclidean distance (dlib: same person below 0.6),
        "id_loss": mean 1 - cosine similarity (MetaPortrait's ID-loss form)}``.
    """
    import torch

    from metaportrait.io.image import frames_to_tensor
    from metaportrait.models.identity import cosine_distance, identity_distance

    images = np.asarray(images)
    landmarks = _landmarks(landmarks, "landmarks")
    if landmarks.shape != (len(images), NUM_LANDMARKS, 2):
        raise ValueError(f"landmarks {landmarks.shape} do not match {len(images)} images")
    source_landmarks = _landmarks(source_landmarks, "source_landmarks")
    with torch.no_grad():
        source = encoder.embed(frames_to_tensor(source_image[None]), torch.from_numpy(source_landmarks[None]).float())
        embeddings = torch.cat(
            [
                encoder.embed(
                    frames_to_tensor(images[start : start + batch_size]),
                    torch.from_numpy(landmarks[start : start + batch_size]).float(),
                )
                for start in range(0, len(images), batch_size)
            ]
        )
    return {
        "id_distance": float(identity_distance(embeddings, source).mean()),
        "id_loss": float(cosine_distance(embeddings, source).mean()),
    }


def id_distance(
    images: np.ndarray,
    landmarks: np.ndarray,
    source_image: np.ndarray,
    source_landmarks: np.ndarray,
    encoder: IdentityEncoder,
) -> float:
    """Mean dlib identity distance of generated frames to the source (see `identity_metrics`)."""
    return identity_metrics(images, landmarks, source_image, source_landmarks, encoder)["id_distance"]
