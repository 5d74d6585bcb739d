"""Super-resolution evaluation (`metaportrait eval sr`, the paper's Table 2) on held-out 512 clips.

Two kinds of 256 input, the issue's two protocols:

* ``downscaled``: the real 512 frames area-downscaled to 256 (what SR must undo at best);
* ``generated``: the base model's self-reconstruction at 256 (the clip's first frame, downscaled, animated along
  the smoothed landmarks of every later frame, as `metaportrait eval self`), i.e. what `animate --sr` upscales;
  compared with the real 512 frames of those later frames.

Rows: ``bicubic`` (cv2 INTER_CUBIC), ``per_frame`` (the network on one frame at a time: no temporal context),
``temporal`` (the network streamed over the clip with its sliding window, `metaportrait.upscale.StreamingSR`) and
``real`` (the real frames, as a reference). Metrics per clip, then averaged: E_warp (Lai et al.'s warping error
along DIS flow measured on the *real* frames, so every row is judged against the same motion), PSNR, ST-LPIPS (on
every ``lpips_every``-th frame), sharpness (variance of the Laplacian relative to the real frames': 1 = as sharp
as real), and FD-MobileNetV2 over all frames of all clips pooled (few frames: compare rows only).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from metaportrait.data.dataset import PreparedClip
from metaportrait.eval import metrics
from metaportrait.io.image import frames_to_tensor

ROWS = ("bicubic", "per_frame", "temporal")
INPUTS = ("downscaled", "generated")


def sharpness(frames: np.ndarray) -> float:
    """Mean variance of the Laplacian of the grey ``uint8 (T, H, W, 3)`` frames."""
    return float(np.mean([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for f in frames]))


def _resize_all(frames: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    if frames.shape[1] == size:
        return np.ascontiguousarray(frames)
    return np.stack([cv2.resize(f, (size, size), interpolation=interpolation) for f in frames])


def reconstruct(animator, clip: PreparedClip, source_index: int, source_landmarks: np.ndarray,
                targets: np.ndarray, size: int) -> np.ndarray:
    """The base model's reconstruction at ``size``: ``clip``'s frame ``source_index`` area-downscaled to ``size``
    and animated by ``animator`` (a `metaportrait.pipeline.Animator`) along ``targets`` ``(T, 478, 2)``, pasted back
    into itself; landmarks in ``size`` pixels. ``uint8 (T, size, size, 3)``: what `animate --sr` upscales."""
    source = cv2.resize(clip.frames[source_index], (size, size), interpolation=cv2.INTER_AREA)
    return np.stack(list(animator.animate_landmarks(source, targets, paste_back=True,
                                                    source_landmarks=source_landmarks, fps=clip.fps)))


def generated_inputs(clip: PreparedClip, frames: int, animator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The base model's 256 self-reconstruction of a clip's frames 1..``frames - 1`` and the real frames they
    stand for: ``uint8 (T-1, size, size, 3)`` and ``uint8 (T-1, S, S, 3)`` (S = the clip's size)."""
    from metaportrait.eval.protocols import smooth_targets

    real = np.ascontiguousarray(clip.frames[:frames])
    landmarks = np.asarray(clip.landmarks[:frames], np.float32) * (size / real.shape[1])
    targets = smooth_targets(landmarks, clip.fps)
    return reconstruct(animator, clip, 0, targets[0], targets[1:], size), real[1:]


def evaluate_sr(
    model: torch.nn.Module,
    clips: Sequence[PreparedClip],
    *,
    frames: int = 40,
    inputs: str = "downscaled",
    animator=None,
    lpips_every: int = 4,
    chunk: int = 16,
    context: int = 4,
    grid_clips: Sequence[int] = (),
    grid_crop: int = 224,
    progress=None,
) -> tuple[dict, np.ndarray | None]:
    """Table 2 for ``model`` (a `metaportrait.models.sr.TemporalSR`) on ``clips`` (512 prepared clips).

    Args:
        frames: frames per clip, from its start.
        inputs: ``"downscaled"`` or ``"generated"`` (needs ``animator``: a `metaportrait.pipeline.Animator` of the
            base model, whose crops must be the SR network's input size).
        grid_clips: indices of the clips shown in the picture grid (bicubic | per frame | temporal | real, a
            ``grid_crop``-px centre patch of the middle frame).
        progress: called with each clip's name when it is done.

    Returns:
        ``({"methods": {row: {metric: {"mean", "per_clip"}}}, "clips": [...]}``, the grid image or None).
    """
    from metaportrait.eval.features import STLPIPS, fd_mobilenetv2
    from metaportrait.upscale import StreamingSR

    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    if inputs == "generated" and animator is None:
        raise ValueError("inputs='generated' needs the base model's animator")
    size_in, size_out = model.cfg.input_size, model.cfg.output_size
    lpips = STLPIPS("alex")
    per_clip: dict[str, dict[str, list[float]]] = {row: {} for row in (*ROWS, "real")}
    pooled: dict[str, list[np.ndarray]] = {row: [] for row in (*ROWS, "real")}
    grid_rows = []
    for index, clip in enumerate(clips):
        if inputs == "generated":
            low, real = generated_inputs(clip, frames, animator, size_in)
        else:
            real = np.ascontiguousarray(clip.frames[:frames])
            low = None
        real = _resize_all(real, size_out, cv2.INTER_AREA)
        if low is None:
            low = _resize_all(real, size_in, cv2.INTER_AREA)
        outputs = {"bicubic": _resize_all(low, size_out, cv2.INTER_CUBIC),
                   "per_frame": np.stack(list(StreamingSR(model, chunk=1, context=0).upscale(list(low))))}
        outputs["temporal"] = np.stack(list(StreamingSR(model, chunk, context).upscale(list(low))))
        outputs["real"] = real
        if index in grid_clips:
            middle, half = len(real) // 2, grid_crop // 2
            top = size_out // 2 - half
            grid_rows.append(np.concatenate([outputs[row][middle, top:top + 2 * half, top:top + 2 * half]
                                             for row in (*ROWS, "real")], axis=1))  # fmt: skip
        flow = metrics.temporal_flow(real)
        real_sharpness = sharpness(real)
        picked = slice(None, None, lpips_every)
        for row, out in outputs.items():
            with torch.no_grad():
                distance = float(lpips(frames_to_tensor(out[picked]), frames_to_tensor(real[picked])).mean())
            values = {
                "e_warp": metrics.warping_error(out, flow),
                "st_lpips": distance,
                "sharpness": sharpness(out) / real_sharpness,
            }
            if row != "real":
                values["psnr"] = metrics.psnr(out, real)
            for metric, value in values.items():
                per_clip[row].setdefault(metric, []).append(float(value))
            pooled[row].append(out[::2])
        if progress is not None:
            progress(clip.clip)

    real_pool = frames_to_tensor(np.concatenate(pooled["real"]))
    names = [c.clip for c in clips]
    methods = {}
    for row in (*ROWS, "real"):
        methods[row] = {metric: {"mean": float(np.mean(values)), "per_clip": dict(zip(names, values))}
                        for metric, values in per_clip[row].items()}  # fmt: skip
        if row != "real":
            pool = frames_to_tensor(np.concatenate(pooled[row]))
            methods[row]["fd_mobilenetv2"] = {"mean": fd_mobilenetv2(pool, real_pool), "per_clip": {}}
    grid = np.concatenate(grid_rows) if grid_rows else None
    return {"protocol": "sr", "inputs": inputs, "clips": names, "frames_per_clip": frames, "methods": methods}, grid
