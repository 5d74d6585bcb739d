"""Evaluation protocols: self-reconstruction and cross-reenactment, run on several methods in one pass.

A *method* is any callable ``(source_image, source_landmarks, driving_frames, target_landmarks) -> frames`` on
square face crops (`Method`): the two training-free baselines (`source_copy`, `mesh_warp`) and trained models
(`ModelMethod`). Every method gets the same inputs, so the comparison is fair by construction:

- **self** (`evaluate_self`): per clip, every kept frame is cut with one stable box (the clip's median
  face box) at ``size`` px. Frame 0 is the source; the targets are the real crops' landmarks (One-Euro
  smoothed, as the animation pipeline smooths a driver). Outputs for frames 1..T-1 are compared with the
  real crops: L1, PSNR, SSIM, face-region L1 (inside the real face-oval hull), ST-LPIPS (alex), identity to
  the source, AKD / AED / APD against the real frames' landmarks, E_warp with the real video's optical flow,
  and FD-MobileNetV2 of all output frames against all real frames. With the user's weight files
  (`MetricModels.load`), also the published LPIPS (AlexNet, v0.1) per frame and FID of all output frames against
  all real frames (`metaportrait.eval.reference_nets`); without them these metrics are absent, never estimated.
- **cross** (`evaluate_cross`): every source portrait with every driving clip. The driver is tracked and cut
  with a smoothed box that follows its head, and its motion is transferred onto the source crop
  (`metaportrait.motion.retarget_motion` from the ``reference`` frame, or ``absolute``), exactly as
  `metaportrait.pipeline.Animator` does.
  Metrics: identity distance and ID loss to the source; AKD / AED / APD of the output landmarks against the
  target landmarks the methods were given; AED / APD against the driver itself (``aed_driver``,
  ``apd_driver``: the literature's definition, which also counts face-shape differences); mouth and eye
  following (``mouth_corr``, ``mouth_range``, ``eye_corr``: `metaportrait.eval.metrics.following`); E_warp with each
  output's own flow (there is no ground truth); FD-MobileNetV2 (and, with its weights, FID) of all outputs
  against the source crops.

Output landmarks are measured with MediaPipe on the output frames (no smoothing), as the real frames' are.
Per-clip values are averaged over frames; a method's ``mean`` is the mean over clips (each clip counts once),
except FD and FID, which pool all frames. ``face_found`` is the fraction of output frames in which MediaPipe found a
face (landmark metrics reuse the last found landmarks elsewhere). Metric definitions and their relation to
published numbers: `metaportrait.eval.metrics`; the table, grid and video of a result: `metaportrait.eval.report`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from metaportrait.data.face import BoxSmoother, CropBox, clip_box, crop, points_to_crop
from metaportrait.data.landmarks import (
    LANDMARK_BETA,
    LANDMARK_D_CUTOFF,
    LANDMARK_MIN_CUTOFF,
    OneEuroFilter,
    iter_tracked,
    landmarks_of_image,
    track_frames,
)
from metaportrait.errors import InputError, NoFaceError
from metaportrait.io.checkpoint import checkpoint_sha256  # noqa: F401  (re-exported for the CLI)
from metaportrait.eval import metrics
from metaportrait.motion import resolve_reference, retarget_motion
from metaportrait.prior import PriorOptions, build_prior
from metaportrait.prior.masks import face_mask

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 256
LPIPS_BATCH = 8


# ---------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------


class Method(Protocol):
    """A talking-head method under evaluation, on ``S`` x ``S`` face crops."""

    def __call__(
        self,
        source_image: np.ndarray,
        source_landmarks: np.ndarray,
        driving_frames: np.ndarray,
        target_landmarks: np.ndarray,
    ) -> np.ndarray:
        """Args:
            source_image: ``uint8`` ``(S, S, 3)`` source crop.
            source_landmarks: ``(478, 2)`` its landmarks (crop pixels).
            driving_frames: ``uint8`` ``(T, S, S, 3)`` driving crops (the real frames in the self protocol).
            target_landmarks: ``(T, 478, 2)`` the landmarks each output frame should have, in source-crop pixels.

        Returns:
            ``uint8`` ``(T, S, S, 3)`` generated frames.
        """
        ...


def source_copy(source_image, source_landmarks, driving_frames, target_landmarks) -> np.ndarray:
    """Baseline: the source crop, unchanged, for every frame."""
    return np.repeat(source_image[None], len(target_landmarks), axis=0)


def mesh_warp(source_image, source_landmarks, driving_frames, target_landmarks, face_masked=True) -> np.ndarray:
    """Baseline: the piecewise-affine mesh warp (`metaportrait.prior.build_prior`), no training; by default only
    inside the face (identity elsewhere), the stronger of the two."""
    size = source_image.shape[0]
    if source_image.shape[:2] != (size, size):
        raise ValueError(f"the mesh-warp baseline takes square crops, got {source_image.shape[:2]}")
    options = PriorOptions(face_masked=face_masked)
    return np.stack([build_prior(source_landmarks, t, size, options).warp(source_image) for t in target_landmarks])


def mesh_warp_whole_frame(source_image, source_landmarks, driving_frames, target_landmarks) -> np.ndarray:
    """Baseline: the mesh warp applied to the whole frame (the face ring and border move hair and background)."""
    return mesh_warp(source_image, source_landmarks, driving_frames, target_landmarks, face_masked=False)


BASELINES: dict[str, Method] = {
    "source-copy": source_copy,
    "mesh-warp": mesh_warp,
    "mesh-warp-whole": mesh_warp_whole_frame,
}


class ModelMethod:
    """A trained model through the inference pipeline (`metaportrait.pipeline.Animator.animate_landmarks`).

    The crop is the "portrait": the model re-crops the face from it, generates, and pastes the result back, so
    the output is aligned with the evaluation crop whatever the model's own resolution.
    """

    def __init__(self, checkpoint: str | Path | None):
        from metaportrait.pipeline import Animator

        self.animator = Animator.from_pretrained(checkpoint)

    def __call__(self, source_image, source_landmarks, driving_frames, target_landmarks) -> np.ndarray:
        frames = self.animator.animate_landmarks(
            source_image, target_landmarks, paste_back=True, source_landmarks=source_landmarks
        )
        return np.stack(list(frames))


# ---------------------------------------------------------------------------------------------------------
# Metric networks and shared per-clip metrics
# ---------------------------------------------------------------------------------------------------------


@dataclass
class MetricModels:
    """The frozen networks behind the metrics; loaded once per run. The last two exist only when the user gave
    their weight files, and the metrics they compute ("lpips", "fid") are left out otherwise."""

    lpips: torch.nn.Module  # metaportrait.eval.features.STLPIPS
    identity: torch.nn.Module  # metaportrait.models.identity.IdentityEncoder
    features: torch.nn.Module  # metaportrait.eval.features.MobileNetV2PooledFeatures
    reference_lpips: torch.nn.Module | None = None  # metaportrait.eval.reference_nets.LPIPSAlex
    inception: torch.nn.Module | None = None  # metaportrait.eval.reference_nets.FIDInceptionV3

    @classmethod
    def load(
        cls, lpips_files: tuple[str | Path, str | Path] | None = None, fid_inception: str | Path | None = None
    ) -> MetricModels:
        """ST-LPIPS (alex), dlib identity ResNet and ImageNet MobileNetV2, from their installed weight files; and
        the published LPIPS / FID networks when their files are given.

        Args:
            lpips_files: (torchvision ``alexnet-owt-7be5be79.pth``, lpips ``weights/v0.1/alex.pth``) or None.
            fid_inception: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or None.

        Raises:
            InputError: a given weight file is missing or does not fit.
        """
        from metaportrait.eval.features import STLPIPS, MobileNetV2PooledFeatures
        from metaportrait.models.identity import IdentityEncoder

        reference_lpips = inception = None
        if lpips_files is not None:
            from metaportrait.eval.reference_nets import LPIPSAlex

            reference_lpips = LPIPSAlex(*lpips_files)
        if fid_inception is not None:
            from metaportrait.eval.reference_nets import FIDInceptionV3

            inception = FIDInceptionV3(fid_inception)
        return cls(STLPIPS("alex"), IdentityEncoder.from_dlib(), MobileNetV2PooledFeatures(), reference_lpips,
                   inception)


@torch.no_grad()
def _lpips_mean(model: torch.nn.Module, a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of an LPIPS-like ``model(a, b) -> (B,)`` on ``uint8`` ``(T, S, S, 3)`` frame pairs."""
    from metaportrait.io.image import frames_to_tensor

    values = [
        model(frames_to_tensor(a[i : i + LPIPS_BATCH]), frames_to_tensor(b[i : i + LPIPS_BATCH]))
        for i in range(0, len(a), LPIPS_BATCH)
    ]
    return float(torch.cat(values).mean())


def _pooled_features(models: MetricModels, frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame features of every set-level metric that is on: name -> (T, D) (FD-MobileNetV2; FID if loaded)."""
    from metaportrait.eval.features import mobilenetv2_features
    from metaportrait.io.image import frames_to_tensor

    images = frames_to_tensor(frames)
    features = {"fd_mobilenetv2": mobilenetv2_features(images, models.features)}
    if models.inception is not None:
        from metaportrait.eval.reference_nets import inception_features

        features["fid"] = inception_features(images, models.inception)
    return features


def _concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pooled features of several clips: name -> (sum of T, D)."""
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _frame_metrics(models: MetricModels, output: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """ST-LPIPS against the real frames, and LPIPS when its networks are loaded."""
    values = {"st_lpips": _lpips_mean(models.lpips, output, real)}
    if models.reference_lpips is not None:
        values["lpips"] = _lpips_mean(models.reference_lpips, output, real)
    return values


def reconstruction_metrics(
    models: MetricModels,
    output: np.ndarray,
    real: np.ndarray,
    face: np.ndarray,
    source: np.ndarray,
    source_landmarks: np.ndarray,
    output_landmarks: np.ndarray,
) -> dict[str, float]:
    """Per-frame means of the self-reconstruction metrics of ``uint8`` ``(T, S, S, 3)`` outputs against the real
    frames: L1, PSNR, SSIM, face-region L1 (``face``: ``(T, S, S)`` masks in [0, 1]), ST-LPIPS (and LPIPS when
    loaded) and the identity distance / loss to the ``source`` crop (``(478, 2)`` ``source_landmarks``), the
    outputs aligned for the identity network by ``output_landmarks`` ``(T, 478, 2)``."""
    return {
        "l1": metrics.l1(output, real),
        "psnr": metrics.psnr(output, real),
        "ssim": metrics.ssim(output, real),
        "face_l1": metrics.face_region_l1(output, real, face),
        **_frame_metrics(models, output, real),
        **metrics.identity_metrics(output, output_landmarks, source, source_landmarks, models.identity),
    }


def _track_output(frames: np.ndarray, name: str) -> tuple[np.ndarray | None, float]:
    """Raw MediaPipe landmarks of generated frames and the fraction of frames with a face (None if no face)."""
    try:
        landmarks, present = track_frames(frames, smooth=False, name=name)
    except NoFaceError:
        return None, 0.0
    return landmarks, float(present.mean())


def smooth_targets(landmarks: np.ndarray, fps: float) -> np.ndarray:
    """One-Euro smoothing of a landmark track with the pipeline's settings (targets as a driver would give)."""
    smoother = OneEuroFilter(fps, LANDMARK_MIN_CUTOFF, LANDMARK_BETA, LANDMARK_D_CUTOFF)
    return np.stack([smoother(points) for points in landmarks]).astype(np.float32)


def _landmark_metrics(output: np.ndarray | None, reference: np.ndarray, size: int) -> dict[str, float]:
    """AKD, AED and APD of output landmarks against reference landmarks (NaN if the output has no face)."""
    if output is None:
        return {"akd": math.nan, "aed": math.nan, "apd": math.nan}
    return {
        "akd": metrics.akd(output, reference),
        "aed": metrics.aed(output, reference),
        "apd": metrics.apd(output, reference, image_size=size),
    }


@dataclass
class _Accumulator:
    """Per-method results while a protocol runs: per-clip metric values and pooled features (FD, FID)."""

    per_clip: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> clip -> value
    features: list[dict[str, np.ndarray]] = field(default_factory=list)  # per clip: metric -> (T, D)

    def add(self, clip: str, values: dict[str, float]) -> None:
        for metric, value in values.items():
            self.per_clip.setdefault(metric, {})[clip] = value

    def summary(self, pooled: dict[str, float | None]) -> dict[str, dict]:
        """The method's JSON entry; ``pooled``: metric -> value of the set-level metrics (None: not computable)."""
        # Non-finite values (PSNR of an exact copy, landmark metrics without a face) are stored as null and left
        # out of the mean.
        result = {}
        for metric, clips in self.per_clip.items():
            finite = [v for v in clips.values() if math.isfinite(v)]
            result[metric] = {"mean": float(np.mean(finite)) if finite else None,
                              "per_clip": {c: (v if math.isfinite(v) else None) for c, v in clips.items()}}
        for metric, value in pooled.items():
            result[metric] = {"mean": value, "per_clip": {}}
        return result


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def _read_frames(path: Path, max_frames: int | None, stride: int) -> tuple[np.ndarray, float]:
    """Every ``stride``-th frame (up to ``max_frames`` kept) and the resulting frame rate."""
    from metaportrait.io.video import VideoReader

    kept = []
    with VideoReader(path) as reader:
        fps = reader.fps
        for index, frame in enumerate(reader):
            if index % stride == 0:
                kept.append(frame)
                if max_frames is not None and len(kept) >= max_frames:
                    break
    if len(kept) < 3:
        raise InputError(path, f"needs at least 3 frames after --stride {stride}, got {len(kept)}")
    return np.stack(kept), fps / stride


@dataclass(frozen=True)
class SelfClip:
    """One clip of the self-reconstruction protocol, cut to the evaluation size."""

    name: str
    frames: np.ndarray  # uint8 (T, S, S, 3) crops with one stable box
    landmarks: np.ndarray  # float32 (T, 478, 2) raw MediaPipe landmarks of the crops
    targets: np.ndarray  # float32 (T, 478, 2) the same, One-Euro smoothed: what the methods are driven with
    fps: float


def load_self_clip(path: str | Path, size: int, max_frames: int | None, stride: int) -> SelfClip:
    """Decode, track and crop one clip for `evaluate_self`.

    Raises:
        InputError: unreadable or too short; NoFaceError: no face in any frame.
    """
    path = Path(path)
    frames, fps = _read_frames(path, max_frames, stride)
    full_landmarks, present = track_frames(frames, smooth=False, name=path)
    box = clip_box(full_landmarks, present)
    crops = np.stack([crop(frame, box, size) for frame in frames])
    landmarks, _ = track_frames(crops, smooth=False, name=path)
    return SelfClip(path.stem, crops, landmarks, smooth_targets(landmarks, fps), fps)


def load_source(path: str | Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A source portrait (image, or a video's first frame) cut to its face box: crop and crop landmarks."""
    from metaportrait.io.image import is_image_path, read_image
    from metaportrait.io.video import read_video

    path = Path(path)
    image = read_image(path) if is_image_path(path) else read_video(path, max_frames=1)[0][0]
    points = landmarks_of_image(image, path)
    box = CropBox.from_landmarks(points)
    return crop(image, box, size), points_to_crop(points, box, size)


def load_driver(
    path: str | Path, size: int, max_frames: int | None, stride: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Driver crops and landmarks as the pipeline sees them: tracked and smoothed, box following the head."""
    path = Path(path)
    frames, fps = _read_frames(path, max_frames, stride)
    boxes = BoxSmoother(fps)
    crops, landmarks = [], []
    for frame, points, _ in iter_tracked(frames, smooth=True, fps=fps, name=path):
        box = boxes(CropBox.from_landmarks(points))
        crops.append(crop(frame, box, size))
        landmarks.append(points_to_crop(points, box, size))
    return np.stack(crops), np.stack(landmarks), fps


def transfer(source_landmarks: np.ndarray, driving_landmarks: np.ndarray, motion: str,
             reference: str | int = "auto", expression_scale: float = 1.0, regions: bool = True) -> np.ndarray:
    """Target landmarks in source-crop pixels (driver and source crops have the same size); the arguments after
    ``motion`` as in `metaportrait.motion.retarget_motion` (``reference`` as `resolve_reference` takes it)."""
    if motion == "relative":
        index = resolve_reference(reference, driving_landmarks)
        return retarget_motion(source_landmarks, driving_landmarks, index, expression_scale, regions)
    if motion == "absolute":  # the driver's landmarks as they are (both crops have the same size)
        return driving_landmarks.astype(np.float32)
    raise ValueError(f"motion must be 'relative' or 'absolute', got {motion!r}")


# ---------------------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Visuals:
    """What a protocol keeps for the comparison grid and the side-by-side video (per clip, per method)."""

    fps: float = 25.0  # frame rate of the first kept clip (after the stride)
    clips: list[str] = field(default_factory=list)
    sources: list[np.ndarray] = field(default_factory=list)  # (S, S, 3) per clip
    driving: list[np.ndarray] = field(default_factory=list)  # (T, S, S, 3) per clip
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)  # method -> (T, S, S, 3) per clip


@dataclass
class ProtocolResult:
    """``results``: the JSON document; ``visuals``: frames for the figures (a few clips only).

    Results format (``results.json``; the CLI adds ``command`` and ``checkpoints``)::

        protocol    "self" | "cross"
        settings    the protocol's settings (size, frames, stride, counts, ...)
        methods     {method: {metric: {"mean": float | null, "per_clip": {clip: float | null}}}}
                    set-level metrics (fd_mobilenetv2, fid) have an empty per_clip
        reference   (self only) {"e_warp_real": ...}: the real video's own warping error
        series      {name: series}: curves of a metric against a varying quantity, for example
                    personalisation (PSNR vs fine-tuning steps) or training (PSNR vs step);
                    drawn by `metaportrait.eval.plots.plot_series`. Each series is

                    {"x_label": "fine-tuning steps",
                     "y_label": "PSNR (dB)",
                     "lower_is_better": false,
                     "curves": {name: {"x": [0, 10, ...], "y": [24.1, 25.3, ...],
                                       "baseline": false}}}

                    x and y have the same length; a null y is a value that could not be measured (drawn
                    as a gap). "baseline" (optional, default false) marks a reference level drawn as a
                    dashed line. The evaluation protocols write ``{}``; ``metaportrait eval curve`` fills
                    it from training runs.
    """

    results: dict
    visuals: Visuals


def _progress(iterable, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, disable=None, **kwargs)


def evaluate_self(
    videos: Sequence[str | Path],
    methods: dict[str, Method],
    models: MetricModels,
    size: int = DEFAULT_SIZE,
    max_frames: int | None = 100,
    stride: int = 2,
    keep_visuals: int = 2,
) -> ProtocolResult:
    """Self-reconstruction on each video (see the module docstring).

    Args:
        videos: clip files; names (file stems) must be unique.
        methods: name -> method; all run on every clip.
        models: metric networks.
        size: evaluation crop size in pixels (AKD is in these pixels).
        max_frames: frames kept per clip (after the stride); None = all.
        stride: keep every ``stride``-th frame.
        keep_visuals: frames of the first this-many clips are kept for the figures.
    """
    _check_unique([Path(v).stem for v in videos])
    accumulators = {name: _Accumulator() for name in methods}
    real_features: list[dict[str, np.ndarray]] = []
    reference: dict[str, float] = {}
    visuals = Visuals()
    for number, video in enumerate(_progress(videos, desc="self", unit="clip"), start=1):
        clip = load_self_clip(video, size, max_frames, stride)
        logger.info("self %d/%d: %s, %d frames", number, len(videos), clip.name, len(clip.frames))
        source, source_landmarks = clip.frames[0], clip.targets[0]
        real = clip.frames[1:]
        # Re-tracked from frame 1 on, exactly as the outputs will be (MediaPipe's tracking mode depends on
        # the previous frame), so a perfect output has AKD 0.
        real_landmarks, _ = track_frames(real, smooth=False, name=clip.name)
        flow = metrics.temporal_flow(real)  # Lai et al.: flow of the ground truth, shared by all methods
        reference[clip.name] = metrics.warping_error(real, flow)
        face = np.stack([face_mask(points, size, size, 0.0, 0.0) for points in real_landmarks])
        real_features.append(_pooled_features(models, real))
        outputs = {}
        for name, method in methods.items():
            output = method(source, source_landmarks, real, clip.targets[1:])
            _check_output(name, output, real.shape)
            output_landmarks, found = _track_output(output, f"{name} on {clip.name}")
            values = {
                **reconstruction_metrics(models, output, real, face, source, source_landmarks,
                                         _or(output_landmarks, real_landmarks)),
                **_landmark_metrics(output_landmarks, real_landmarks, size),
                "e_warp": metrics.warping_error(output, flow),
                "face_found": found,
            }
            accumulators[name].add(clip.name, values)
            accumulators[name].features.append(_pooled_features(models, output))
            outputs[name] = output
        if len(visuals.clips) < keep_visuals:
            if not visuals.clips:
                visuals.fps = clip.fps
            visuals.clips.append(clip.name)
            visuals.sources.append(source)
            visuals.driving.append(real)
            visuals.outputs.append(outputs)
    real_all = _concatenate(real_features)
    results = {
        "protocol": "self",
        "settings": {"size": size, "max_frames": max_frames, "stride": stride, "clips": len(videos)},
        "methods": {name: acc.summary(_set_metrics(_concatenate(acc.features), real_all))
                    for name, acc in accumulators.items()},
        "reference": {"e_warp_real": {"mean": float(np.mean(list(reference.values()))), "per_clip": reference}},
        "series": {},
    }
    return ProtocolResult(results, visuals)


def evaluate_cross(
    sources: Sequence[str | Path],
    drivers: Sequence[str | Path],
    methods: dict[str, Method],
    models: MetricModels,
    motion: str = "relative",
    size: int = DEFAULT_SIZE,
    max_frames: int | None = 100,
    stride: int = 2,
    keep_visuals: int = 2,
    reference: str | int = "auto",
    expression_scale: float = 1.0,
    regions: bool = True,
) -> ProtocolResult:
    """Cross-identity reenactment of every source by every driver (see the module docstring).

    Args:
        sources: portrait images (or videos: first frame); drivers: driving clips. Stems must be unique.
        motion: "relative" (keeps the source's face shape) or "absolute".
        reference, expression_scale, regions: relative motion's reference frame, expression strength and
            per-region retargeting (`transfer`).
        Others as in `evaluate_self`.
    """
    _check_unique([Path(s).stem for s in sources])
    _check_unique([Path(d).stem for d in drivers])
    if models.reference_lpips is not None:
        logger.warning("LPIPS compares an output with its real frame, which cross-reenactment does not have: "
                       "not computed")
    loaded_sources = {Path(s).stem: load_source(s, size) for s in _progress(sources, desc="sources", unit="image")}
    accumulators = {name: _Accumulator() for name in methods}
    visuals = Visuals()
    for number, driver in enumerate(_progress(drivers, desc="cross", unit="driver"), start=1):
        driving, driving_landmarks, fps = load_driver(driver, size, max_frames, stride)
        logger.info("cross %d/%d: %s, %d frames", number, len(drivers), Path(driver).stem, len(driving))
        for source_name, (source, source_landmarks) in loaded_sources.items():
            pair = f"{source_name}<-{Path(driver).stem}"
            targets = transfer(source_landmarks, driving_landmarks, motion, reference, expression_scale, regions)
            outputs = {}
            for name, method in methods.items():
                output = method(source, source_landmarks, driving, targets)
                _check_output(name, output, driving.shape)
                output_landmarks, found = _track_output(output, f"{name} on {pair}")
                values = {
                    **metrics.identity_metrics(output, _or(output_landmarks, targets), source, source_landmarks,
                                               models.identity),
                    **_landmark_metrics(output_landmarks, targets, size),
                    **{
                        f"{name}_driver": value
                        for name, value in _landmark_metrics(output_landmarks, driving_landmarks, size).items()
                        if name != "akd"  # the driver's face has another shape: its keypoints are no target
                    },
                    **metrics.following(_or(output_landmarks, targets), driving_landmarks),
                    "e_warp": metrics.warping_error(output),
                    "face_found": found,
                }
                accumulators[name].add(pair, values)
                accumulators[name].features.append(_pooled_features(models, output))
                outputs[name] = output
            if len(visuals.clips) < keep_visuals:
                if not visuals.clips:
                    visuals.fps = fps
                visuals.clips.append(pair)
                visuals.sources.append(source)
                visuals.driving.append(driving)
                visuals.outputs.append(outputs)
    source_features = _pooled_features(models, np.stack([s for s, _ in loaded_sources.values()]))
    if len(loaded_sources) < 2:
        logger.warning("FD-MobileNetV2 / FID need at least 2 source images; not computed")
    results = {
        "protocol": "cross",
        "settings": {"size": size, "max_frames": max_frames, "stride": stride, "motion": motion,
                     "reference": reference, "expression_scale": expression_scale, "regions": regions,
                     "sources": len(sources), "drivers": len(drivers)},
        "methods": {name: acc.summary(_set_metrics(_concatenate(acc.features), source_features))
                    for name, acc in accumulators.items()},
        "series": {},
    }
    return ProtocolResult(results, visuals)


def _fd(features_a: np.ndarray, features_b: np.ndarray) -> float:
    from metaportrait.eval.features import frechet_distance, gaussian_statistics

    return frechet_distance(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


def _set_metrics(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Fréchet distance of all output frames to the reference set, per feature network (FD-MobileNetV2, FID).

    None when the reference set has fewer than 2 images (no covariance), as with a single cross source.
    """
    return {name: _fd(outputs[name], reference[name]) if len(reference[name]) > 1 else None for name in outputs}


def _or(landmarks: np.ndarray | None, fallback: np.ndarray) -> np.ndarray:
    # Identity alignment needs landmarks; without a detected face use the targets (the face should be there).
    return fallback if landmarks is None else landmarks


def _check_output(name: str, output: np.ndarray, expected: tuple[int, ...]) -> None:
    if not isinstance(output, np.ndarray) or output.dtype != np.uint8 or output.shape != expected:
        description = f"{output.dtype} {output.shape}" if isinstance(output, np.ndarray) else type(output).__name__
        raise RuntimeError(f"method {name!r} returned {description}, expected uint8 {expected}")


def _check_unique(names: list[str]) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(duplicates[0], "two inputs have the same file name; results are keyed by it")


def methods_from_checkpoints(checkpoints: dict[str, str | Path | None],
                             factory: Callable[[str | Path | None], Method] = ModelMethod) -> dict[str, Method]:
    """name -> `ModelMethod` for each checkpoint (None = the bundled model)."""
    return {name: factory(path) for name, path in checkpoints.items()}
