"""Inference: animate a portrait with a driving video, or with a sequence of target landmarks.

::

    from metaportrait.io.image import read_image
    from metaportrait.io.video import VideoReader
    from metaportrait.pipeline import Animator

    animator = Animator.from_pretrained()  # the bundled lite checkpoint
    with VideoReader("driving.mp4") as reader:
        for frame in animator(read_image("portrait.jpg"), reader, driving_fps=reader.fps):
            ...  # uint8 (H, W, 3) RGB, the size of the portrait
    print(animator.stats)

Both entry points share one code path. Step 1 prepares the source; step 2 produces per-frame target landmarks in
source-crop pixels: `Animator.__call__` measures them on a driving video and transfers the motion,
`Animator.animate_landmarks` takes them as given; steps 3-4 (`Animator._render`) turn targets into frames.
Frames are streamed: a driving video is read, and results are produced, a few frames (``batch_size``) at a time.
With ``overlap`` (the default) the stages run side by side (`metaportrait.stages`): the driving video is decoded in
one background thread and tracked in another, a few batches ahead of the generator, through bounded queues; the
frames are the same, bit for bit, as with ``overlap=False``, which runs every step in the caller's thread.
Driving frames larger than `LANDMARK_MAX_SIDE` are tracked at a cost that does not grow with their size
(`metaportrait.data.landmarks.iter_tracked`'s ``max_side``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import cv2
import numpy as np
import torch

from metaportrait.config import ModelConfig, Precision
from metaportrait.data.drawing import MEDIAPIPE_TOPOLOGIES, draw_landmark_image
from metaportrait.data.face import (
    BoxSmoother,
    CropBox,
    blend_region,
    box_region,
    crop,
    points_from_crop,
    points_to_crop,
    warp_into_region,
)
from metaportrait.data.face import paste_back as blend_crop  # the name `paste_back` is our flag
from metaportrait.data.landmarks import iter_tracked, landmarks_of_image
from metaportrait.errors import InputError
from metaportrait.io.image import frames_to_tensor, to_tensor, to_uint8_frames
from metaportrait.models.blocks import make_coordinate_grid, resize_map
from metaportrait.motion import Controls, RunningReference, absolute_motion, resolve_reference, retarget_motion
from metaportrait.prior import build_prior
from metaportrait.source_frames import (
    FADE_SECONDS,
    MIN_STAY_SECONDS,
    SourceChooser,
    SourceFrames,
    appearance_differences,
    frames_at,
)
from metaportrait.stages import prefetch
from metaportrait.upscale import ONNX_SR_CHUNK, ONNX_SR_CONTEXT, StreamingSR, load_sr

Motion = Literal["relative", "absolute"]
Backend = Literal["torch", "onnx", "compiled"]
BACKENDS: tuple[str, ...] = ("torch", "onnx", "compiled")
PRECISIONS: tuple[str, ...] = get_args(Precision)
REFERENCES: tuple[str, ...] = ("auto", "first", "running")
MOTIONS: tuple[str, ...] = ("relative", "absolute")
BUNDLED_CHECKPOINT = "assets/models/lite"  # inside the metaportrait package
RETARGET_CHUNK = 256  # driving frames whose motion is transferred at once (memory stays flat in clip length)
DEFAULT_BATCH_SIZE = 4  # frames per generator forward: amortises per-call overhead, keeps latency and memory low
# Driving frames with a longer side than this are tracked on a downscaled copy and refined on a face crop (the
# landmark cost stops growing with the video's resolution; accuracy against full-resolution tracking in
# docs/results.md). None: track every frame at full resolution.
LANDMARK_MAX_SIDE = 640
PASTE_FEATHER = 0.1  # soft paste-back edge, as a fraction of the crop side
PREPARED_SOURCE_FRAMES = 8  # with source frames: prepared frames kept besides the portrait (least recently used go)
# Source detail is kept where the model moves the source by less than this many crop pixels (fading out to it).
STILL_MOTION_PX = 1.0


@dataclass
class AnimationStats:
    """Counters of the latest animation, updated while its frames are produced."""

    frames: int = 0  # frames produced so far
    lost_frames: int = 0  # driving frames without a detected face (the last good landmarks were reused)
    seconds: float = 0.0  # wall time from the call until the latest frame
    reference_frame: int | None = None  # the driving frame relative motion is measured from (None: absolute)
    reference_changes: int = 0  # with the "running" reference: how often it moved to a more neutral frame
    source_switches: int = 0  # with source frames: how often the animated source changed
    sources_used: int = 0  # with source frames: different sources animated so far (the portrait included)
    # Wall seconds per step: "decode" (pulling driving frames), "landmarks" (tracking, smoothing, driver crop),
    # "motion" (transfer onto the source), "model" (line images, mesh prior, generator), "sr" (the
    # super-resolution network, with `sr`), "compose" (paste-back).
    # With overlapping stages (`Animator.overlap`) the first three run in background threads while the others run
    # in the caller's: each is still that step's own time, but together they add up to more than `seconds`.
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def add_time(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    @property
    def fps(self) -> float:
        """Frames per second so far (0 before the first frame)."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class PreparedSource:
    """Step 1's result: everything about the source portrait the per-frame steps reuse."""

    image: np.ndarray  # uint8 (H, W, 3) RGB, the full portrait
    landmarks: np.ndarray  # float32 (478, 2) pixels of `image`
    box: CropBox  # the one crop box of the still source
    crop: np.ndarray  # uint8 (S, S, 3), S = config.image_size
    crop_landmarks: np.ndarray  # float32 (478, 2) pixels of `crop`
    tensor: torch.Tensor  # (1, 3, S, S) in [0, 1]
    lines: torch.Tensor  # (1, 3, S, S) in [0, 1], the source landmark line image
    identity: torch.Tensor | None  # (1, identity_dim) embedding, None when the model does not use identity
    flow: torch.Tensor | None = None  # (1, 2, h, w) `Generator.source_flow`, with warp.subtract_source_flow only
    levels: list[torch.Tensor] | None = None  # `Generator.encode_source`: the source's feature pyramid, batch 1
    # int16 (H, W, 3): the portrait minus its own crop pasted back, i.e. the detail the crop round trip (resampling
    # to S and back) loses; added back where the model leaves the source still (`compose_frame`).
    detail: np.ndarray | None = None
    # (1, 3, S, S): the crop minus the model's own reconstruction of it (the source driven by its own landmarks),
    # added to the generated crop where the model leaves the source still, so there the crop is the source's.
    residual: torch.Tensor | None = None


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX; Linux ``/proc/cpuinfo``). Elsewhere
    bfloat16 is emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """``"auto"`` -> ``"bf16"`` on CPUs with native bfloat16 (`cpu_has_bf16`), else ``"fp32"``; others as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    return precision


@functools.cache
def dlib_identity_encoder() -> torch.nn.Module:
    """The dlib identity encoder, loaded once per process: parsing its weights takes seconds, and the module is
    frozen (eval mode, no trainable state), so every animator can share it."""
    from metaportrait.models.identity import IdentityEncoder

    return IdentityEncoder.from_dlib()


def bundled_checkpoint() -> Path:
    """Folder of the lite checkpoint shipped inside the package (it may be absent in a fresh source checkout)."""
    return Path(str(importlib.resources.files("metaportrait") / BUNDLED_CHECKPOINT))


class Animator:
    """Talking-head generation: a still portrait made to follow a driving video or target landmarks.

    Args:
        generator: the trained `metaportrait.models.generator.Generator` (put in eval mode here).
        config: its `ModelConfig`; its line images must be drawn from MediaPipe points (``mediapipe478`` or the
            ``sparse68`` subset).
        identity_encoder: `IdentityEncoder` for the source embedding; loaded from dlib's weights when the model
            uses identity and none is given.
        batch_size: frames per generator forward.
        keep_source_detail: where the model leaves the source still (no motion, no synthesis), the pasted-back
            frame keeps the portrait's own pixels instead of the crop's resampled copy (`compose_frame`), and the
            generated crop the source crop's instead of the model's reconstruction of it (`PreparedSource.residual`).
        overlap: decode and track the driving video in background threads, ahead of the generator (see the
            module docstring); False runs every step in the caller's thread. The frames are the same either way.
        queue_frames: with ``overlap``, how many driving frames (and how many targets) each background stage
            may hold ready; default two batches. Bounded, so memory does not grow with the video's length.
        landmark_max_side: see `LANDMARK_MAX_SIDE`.
        precision: the per-frame generator call in ``"fp32"``, or ``"bf16"`` (CPU autocast: convolutions and
            matrix products in bfloat16, faster on CPUs that have it; face crops within 57-59 dB PSNR of
            fp32's, docs/results.md), or ``"auto"`` (bf16 where the CPU has it natively, `cpu_has_bf16`).

    Attributes:
        stats: `AnimationStats` of the latest call, filled in while its frames are consumed.
    """

    def __init__(self, generator: torch.nn.Module, config: ModelConfig, identity_encoder: torch.nn.Module | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, keep_source_detail: bool = True, sr: StreamingSR | None = None,
                 overlap: bool = True, queue_frames: int | None = None,
                 landmark_max_side: int | None = LANDMARK_MAX_SIDE, precision: Precision = "fp32"):
        if config.landmark_topology not in MEDIAPIPE_TOPOLOGIES:
            raise ValueError(
                f"the animator measures MediaPipe landmarks; this model was built for {config.landmark_topology!r} "
                f"line images (only {', '.join(MEDIAPIPE_TOPOLOGIES)} models can be animated)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if queue_frames is not None and queue_frames < 1:
            raise ValueError(f"queue_frames must be at least 1, got {queue_frames}")
        if config.use_identity and identity_encoder is None:
            identity_encoder = dlib_identity_encoder()
        self.generator = generator.eval()
        self.config = config
        self.identity_encoder = identity_encoder if config.use_identity else None
        self.batch_size = batch_size
        self.keep_source_detail = keep_source_detail
        self.size = config.image_size
        self.sr = sr  # face super-resolution of the generated crops (streamed), pasted back at its output size
        self.overlap = overlap
        self.queue_frames = queue_frames
        self.landmark_max_side = landmark_max_side
        # Autocast only applies to a torch module (an ONNX Runtime session computes in float32, a compiled
        # generator in the precision it was built for).
        self.precision = resolve_precision(precision) if isinstance(generator, torch.nn.Module) else \
            getattr(generator, "precision", "fp32")
        # A compiled generator is built for one batch size (`metaportrait.compiled_backend`): pad to it.
        self.fixed_batch: int | None = getattr(generator, "fixed_batch", None)
        self.stats = AnimationStats()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                        keep_source_detail: bool = True, eyelid_fill: bool | None = None,
                        backend: Backend = "torch", onnx_folder: str | Path | None = None,
                        sr: bool | str | Path | None = None, overlap: bool = True,
                        precision: Precision = "fp32") -> Animator:
        """Load a checkpoint folder (``model.safetensors`` + ``config.json``).

        Args:
            path: the folder; ``None`` or ``"default"`` means the lite checkpoint bundled with the package.
            eyelid_fill: override the checkpoint's ``prior_eyelid_fill`` (closing eyes as lids of skin from the
                mesh prior; no weights depend on it). None: as the checkpoint says.
            backend: ``"torch"``, or ``"onnx"``: the per-frame generator step in ONNX Runtime
                (`metaportrait.onnx_backend`), exported on first use into ``onnx_folder`` (default: a cache
                folder per checkpoint), or ``"compiled"``: compiled ahead of time for ``batch_size`` and
                ``precision`` on first use, cached per checkpoint (`metaportrait.compiled_backend`).
            sr: super-resolve the generated face crops (`metaportrait.upscale`): True for the bundled SR network,
                or its folder / official file; None or False: no super-resolution.
            overlap: run the stages side by side (see `Animator`).
            precision: see `Animator`.

        Raises:
            InputError: the folder (or the bundled checkpoint) is missing or not a valid checkpoint.
        """
        from metaportrait.io.checkpoint import load_model

        if path is None or str(path) == "default":
            path = bundled_checkpoint()
            if not (path / "model.safetensors").is_file():
                raise InputError(path, "the bundled lite checkpoint is not installed; pass --checkpoint FOLDER")
        path = Path(path)
        if not path.is_dir():
            raise InputError(path, "checkpoint folder not found")
        generator, config = load_model(path)
        if eyelid_fill is not None and eyelid_fill != config.prior_eyelid_fill:
            if not config.use_mesh_prior:
                raise InputError(path, "this model has no mesh prior, so it cannot fill eyelids from it")
            config = config.replace(prior_eyelid_fill=eyelid_fill)
        if backend == "onnx":
            from metaportrait.io.checkpoint import checkpoint_sha256
            from metaportrait.onnx_backend import onnx_generator

            try:
                generator = onnx_generator(generator, config, checkpoint_sha256(path), onnx_folder)
            except ValueError as error:
                raise InputError(path, str(error)) from None
        elif backend == "compiled":
            from metaportrait.compiled_backend import compiled_generator
            from metaportrait.io.checkpoint import checkpoint_sha256

            try:
                generator = compiled_generator(generator, config, checkpoint_sha256(path), batch_size,
                                               resolve_precision(precision))
            except ValueError as error:
                raise InputError(path, str(error)) from None
        elif backend != "torch":
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        upscaler = None
        if sr and backend == "onnx":  # both networks in ONNX Runtime
            upscaler = StreamingSR(_onnx_sr(sr, onnx_folder), chunk=ONNX_SR_CHUNK, context=ONNX_SR_CONTEXT)
        elif sr:
            sr_model, sr_precision = load_sr(sr), resolve_precision(precision)
            finish = _compiled_sr_finish(sr, sr_model, sr_precision) if backend == "compiled" else None
            upscaler = StreamingSR(sr_model, precision=sr_precision, finish=finish)
        if upscaler is not None and upscaler.input_size != config.image_size:
            raise InputError(sr if sr is not True else "--sr", f"the super-resolution network takes "
                             f"{upscaler.input_size}² crops, but this model renders {config.image_size}²")
        return cls(generator, config, batch_size=batch_size, keep_source_detail=keep_source_detail, sr=upscaler,
                   overlap=overlap, precision=precision)

    # --- entry points -----------------------------------------------------------------------------------------

    def __call__(
        self,
        source_image: np.ndarray,
        driving_frames: Iterable[np.ndarray],
        motion: Motion = "relative",
        paste_back: bool = True,
        crop_output: bool = False,
        controls: Controls | None = None,
        *,
        reference: str | int = "auto",
        expression_scale: float = 1.0,
        driving_fps: float = 25.0,
        source_name: str | Path = "<source>",
        driving_name: str | Path = "<driving>",
        source_landmarks: np.ndarray | None = None,
        source_frames: SourceFrames | None = None,
    ) -> Iterator[np.ndarray]:
        """Animate ``source_image`` with the head motion and expressions of ``driving_frames``.

        The source is checked (step 1) when this is called; the driving frames are read lazily while the
        returned iterator is consumed, one small batch at a time.

        Args:
            source_image: ``uint8`` ``(H, W, 3)`` RGB portrait.
            driving_frames: ``uint8`` ``(h, w, 3)`` RGB frames of one clip, in order (e.g. a `VideoReader`).
            motion: ``"relative"`` moves the source face as the driver moves relative to a reference frame,
                keeping the source's face shape, with mouth and eye openness carried across onto the portrait's
                own lips and lids (`metaportrait.motion.retarget_motion`); ``"absolute"`` uses the driver's
                landmarks as they are (the driver's face shape, positioned by the driver's crop).
            paste_back: blend each generated face crop into the full portrait with a feathered edge (True), or
                yield the model's ``(S, S, 3)`` face crop as it is (False; ``S`` = ``config.image_size``).
            crop_output: yield just the generated ``(S, S, 3)`` face crop (the CLI's ``--crop-output``); the
                same frames as ``paste_back=False``.
            controls: expression / pose edits applied to every frame (`metaportrait.motion.Controls`).
            reference: the driving frame relative motion starts from: ``"auto"`` (the clip's most neutral
                frame, `metaportrait.motion.neutral_frame`; reported in ``stats.reference_frame``), ``"first"``,
                a frame number, or ``"running"``: the most neutral frame seen so far
                (`metaportrait.motion.RunningReference`), so that frames stream out as the driver's come in
                (live input; with the other choices the whole clip is tracked before the first frame).
            expression_scale: strength of the driver's expression change (1 = as the driver, 0 = none).
            driving_fps: frame rate of the driving clip (sets the landmark and crop smoothing time constants).
            source_name, driving_name: file names for error messages.
            source_landmarks: ``(478, 2)`` landmarks of ``source_image`` if already measured.
            source_frames: other frames of the portrait's person in the portrait's framing
                (`metaportrait.source_frames`): per output frame the one nearest the target in pose and
                expression is animated instead of the portrait, and the output frame is that frame re-animated.

        Returns:
            Iterator of ``uint8`` RGB frames: ``(H, W, 3)`` pasted back; ``(S, S, 3)`` with ``crop_output`` or
            without ``paste_back``.

        Raises:
            NoFaceError: no face in the source (now), or in any driving frame (when iterating, before any
                frame is produced).
        """
        if motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
        if not (reference in REFERENCES or (isinstance(reference, int) and reference >= 0)):
            raise ValueError(f"reference must be one of {REFERENCES} or a frame number >= 0, got {reference!r}")
        if not (np.isfinite(expression_scale) and expression_scale >= 0):
            raise ValueError(f"expression_scale must be >= 0, got {expression_scale}")
        start = self._start()
        # 1. Source: landmarks, one crop box, the crop at the model's size, identity embedding, line image.
        source = self.prepare_source(source_image, source_name, source_landmarks, paste_back and not crop_output)
        bank = self._bank(source, source_frames, paste_back and not crop_output, driving_fps)
        # 2. Driving: per frame, tracked + smoothed landmarks (lost face -> last good), mapped into the driver's
        #    own smoothed crop, then transferred onto the source crop from the reference frame. With overlap,
        #    decoding and tracking each run in their own thread, ahead of the generator.
        if not self.overlap:
            targets = self._driving_targets(source, self._timed(driving_frames, "decode"), motion, reference,
                                            expression_scale, driving_fps, driving_name)
        else:
            depth = self.queue_frames or 2 * self.batch_size
            cancel = threading.Event()  # set when the consumer stops early: every stage then ends
            frames = prefetch(self._timed(driving_frames, "decode"), depth, cancel, "metaportrait-decode")
            targets = self._driving_targets(source, frames, motion, reference, expression_scale, driving_fps,
                                            driving_name)
            targets = prefetch(targets, depth, cancel, "metaportrait-landmarks")
        # 3-4. Controls, model inputs, generator, paste back.
        return self._render(source, targets, controls, paste_back, crop_output, start, bank)

    def animate_landmarks(
        self,
        source_image: np.ndarray,
        target_landmarks: Iterable[np.ndarray],
        paste_back: bool = True,
        crop_output: bool = False,
        controls: Controls | None = None,
        *,
        source_name: str | Path = "<source>",
        source_landmarks: np.ndarray | None = None,
        source_frames: SourceFrames | None = None,
        fps: float = 25.0,
    ) -> Iterator[np.ndarray]:
        """Animate ``source_image`` along given target landmarks (no driving video), e.g. scripted motion.

        Args:
            source_image: ``uint8`` ``(H, W, 3)`` RGB portrait.
            target_landmarks: per output frame a ``(478, 2)`` array of landmarks in pixels of ``source_image``
                (e.g. the source's own landmarks edited with `metaportrait.motion.edit_landmarks`); a
                ``(T, 478, 2)`` array works too.
            paste_back, crop_output, controls, source_name, source_landmarks, source_frames: as in `__call__`.
            fps: frame rate of the targets (sets how long a source frame is kept and a switch fades).

        Returns:
            Iterator of ``uint8`` RGB frames, one per target.
        """
        start = self._start()
        # 1. Source (as in __call__).
        source = self.prepare_source(source_image, source_name, source_landmarks, paste_back and not crop_output)
        bank = self._bank(source, source_frames, paste_back and not crop_output, fps)
        # 2. Targets are given in portrait pixels: move them into the source crop.
        targets = ((points_to_crop(np.asarray(t, np.float32), source.box, self.size), True) for t in target_landmarks)
        return self._render(source, targets, controls, paste_back, crop_output, start, bank)

    # --- steps ----------------------------------------------------------------------------------------------

    def _start(self) -> float:
        self.stats = AnimationStats()
        return time.perf_counter()

    def prepare_source(self, image: np.ndarray, name: str | Path = "<source>",
                       landmarks: np.ndarray | None = None, pasted: bool = True) -> PreparedSource:
        """Step 1: the source portrait's landmarks, crop, line image and identity embedding.

        ``pasted=False`` (frames will not be pasted back) skips the portrait's detail, which only the paste-back uses.

        Raises:
            NoFaceError: no face in ``image`` (naming ``name``).
        """
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"source image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        if landmarks is None:
            landmarks = landmarks_of_image(image, name)
        box = CropBox.from_landmarks(landmarks)
        crop_image = crop(image, box, self.size)
        crop_landmarks = points_to_crop(landmarks, box, self.size)
        tensor = to_tensor(crop_image)
        thickness = self.config.line_thickness(self.size)
        lines = to_tensor(draw_landmark_image(crop_landmarks, self.size, self.size, self.config.landmark_topology,
                                              thickness))  # fmt: skip
        identity = None
        if self.identity_encoder is not None:
            with torch.no_grad():
                identity = self.identity_encoder.embed(tensor, torch.from_numpy(crop_landmarks)[None])
        flow = None
        with torch.no_grad():
            if self.config.warp.subtract_source_flow:
                flow = self.generator.source_flow(tensor, lines)
            levels = self.generator.encode_source(tensor)  # once per portrait, not once per frame
        source = PreparedSource(image, landmarks, box, crop_image, crop_landmarks, tensor, lines, identity, flow,
                                levels=levels)
        if not (self.keep_source_detail and pasted):
            return source
        pasted_crop = crop(image, box, self.sr.output_size) if self.sr else crop_image  # the size that is pasted
        round_trip = blend_crop(image, pasted_crop, box, feather=PASTE_FEATHER)
        detail = image.astype(np.int16) - round_trip.astype(np.int16)
        # What the model loses on the source itself (measured in docs/results.md, "Self-reconstruction").
        reconstruction = self._generator_result(source, [crop_landmarks])["output"]
        return dataclasses.replace(source, detail=detail, residual=tensor - reconstruction)

    def _bank(self, source: PreparedSource, frames: SourceFrames | None, pasted: bool,
              fps: float) -> _SourceBank | None:
        """Step 1b: the chooser over ``frames`` (None without them); their sources are prepared when first used."""
        if frames is None:
            return None
        frames.check_framing(*source.image.shape[:2])
        appearance = appearance_differences(frames, source.image, source.landmarks)
        chooser = SourceChooser(frames, source.landmarks, min_stay=frames_at(MIN_STAY_SECONDS, fps),
                                appearance=appearance)
        return _SourceBank(frames, chooser, pasted, {-1: source}, frames_at(FADE_SECONDS, fps))

    def _driving_targets(self, source: PreparedSource, frames: Iterable[np.ndarray], motion: Motion,
                         reference: str | int, expression_scale: float, fps: float,
                         name: str | Path) -> Iterator[tuple[np.ndarray, bool]]:
        """Step 2 for a driving video: ``(target landmarks in source-crop pixels, face found)`` per frame.

        The whole clip is tracked before the first target (the neutral reference is found over all of it; only
        its landmarks are kept, not its frames), except with ``reference="running"`` or absolute motion, which
        stream: one target per driving frame as it comes. The time spent pulling ``frames`` (decoding, or waiting
        for the decoding thread) is not counted as landmark time.
        """
        if motion == "absolute" or reference == "running":
            yield from self._streamed_targets(source, frames, motion, expression_scale, fps, name)
            return
        boxes = BoxSmoother(fps)
        driving, found = [], []
        pulling = [0.0]
        begin = time.perf_counter()
        for _, points, present in iter_tracked(_pulled(frames, pulling), smooth=True, fps=fps, name=name,
                                               max_side=self.landmark_max_side):
            # The driver's crop follows its head smoothly, so its landmarks are comparable across frames and
            # with the source crop (both are face-sized squares of the same side).
            box = boxes(CropBox.from_landmarks(points))
            driving.append(points_to_crop(points, box, self.size))
            found.append(present)
        self.stats.add_time("landmarks", time.perf_counter() - begin - pulling[0])
        begin = time.perf_counter()
        driving = np.stack(driving)  # (T, 478, 2)
        try:
            index = resolve_reference(reference, driving)
        except ValueError as error:
            raise InputError(name, str(error)) from None
        self.stats.reference_frame = index
        self.stats.add_time("motion", time.perf_counter() - begin)
        # A chunk at a time: the transfer's float64 intermediates for a whole 10-minute clip took 440 MB.
        for start in range(0, len(driving), RETARGET_CHUNK):
            begin = time.perf_counter()
            part = np.concatenate([driving[index:index + 1], driving[start:start + RETARGET_CHUNK]])
            targets = retarget_motion(source.crop_landmarks, part, 0, expression_scale)[1:]  # frame by frame
            self.stats.add_time("motion", time.perf_counter() - begin)
            yield from zip(targets, found[start:start + RETARGET_CHUNK])

    def _streamed_targets(self, source: PreparedSource, frames: Iterable[np.ndarray], motion: Motion,
                          expression_scale: float, fps: float, name: str | Path) -> Iterator[tuple[np.ndarray, bool]]:
        """`_driving_targets` one frame at a time: absolute motion, or relative to a `RunningReference`."""
        boxes = BoxSmoother(fps)
        running = RunningReference(window=max(2, round(10 * fps)))  # the last 10 seconds
        pulling = [0.0]
        begin = time.perf_counter()
        try:
            for _, points, present in iter_tracked(_pulled(frames, pulling), smooth=True, fps=fps, name=name,
                                                   max_side=self.landmark_max_side):
                driving = points_to_crop(points, boxes(CropBox.from_landmarks(points)), self.size)
                tracked = time.perf_counter()
                self.stats.add_time("landmarks", tracked - begin)
                if motion == "relative":
                    pair = np.stack([running(driving), driving])
                    target = retarget_motion(source.crop_landmarks, pair, 0, expression_scale)[1]
                    self.stats.reference_changes = running.changes
                else:
                    target = absolute_motion(driving, self.size, self.size)
                self.stats.add_time("motion", time.perf_counter() - tracked)
                yield target, present
                begin = time.perf_counter()
        finally:  # also when the consumer stops early (live: Ctrl-C)
            # Pulling frames (decoding) happened inside the tracking loop: keep the two apart.
            self.stats.add_time("landmarks", -pulling[0])

    def _timed(self, items: Iterable, stage: str) -> Iterator:
        """``items``, adding the time spent producing each to ``stats.stage_seconds[stage]``."""
        items = iter(items)
        while True:
            begin = time.perf_counter()
            item = next(items, None)
            self.stats.add_time(stage, time.perf_counter() - begin)
            if item is None:
                return
            yield item

    def _render(self, source: PreparedSource, targets: Iterable[tuple[np.ndarray, bool]], controls: Controls | None,
                paste_back: bool, crop_output: bool, start: float,
                bank: _SourceBank | None = None) -> Iterator[np.ndarray]:
        """Steps 2b-4, shared by both entry points: controls, model inputs, generator, compositing."""
        generate = functools.partial(self._source_faces, source) if bank is None else \
            functools.partial(self._bank_faces, bank)
        faces = self._faces(targets, controls or Controls(), generate)
        if self.sr is not None:  # 3b. Super-resolution over a sliding window of the generated crops.
            faces = self.sr.stream(faces)
        sr_seconds = self.sr.seconds if self.sr is not None else 0.0
        # 4. The face crop, or the full portrait (or chosen source frame) with the crop pasted back.
        for face, made in faces:
            if self.sr is not None:  # the network time of the window this frame came out of
                self.stats.add_time("sr", self.sr.seconds - sr_seconds)
                sr_seconds = self.sr.seconds
            begin = time.perf_counter()
            frame = compose_frame(made.source, face, paste_back, crop_output, made.still)
            if made.fade is not None:  # a switch of source frames: blend in the previous source's frame
                old = made.fade.face
                if old.shape != face.shape:  # the previous source's crop was not super-resolved
                    old = cv2.resize(old, face.shape[1::-1], interpolation=cv2.INTER_CUBIC)
                old = compose_frame(made.fade.source, old, paste_back, crop_output, None)
                frame = np.clip(np.rint(made.fade.weight * old.astype(np.float32)
                                        + (1 - made.fade.weight) * frame), 0, 255).astype(np.uint8)
            self.stats.add_time("compose", time.perf_counter() - begin)
            self.stats.frames += 1
            self.stats.seconds = time.perf_counter() - start
            yield frame

    def _faces(self, targets: Iterable[tuple[np.ndarray, bool]], controls: Controls,
               generate: Callable[[list[np.ndarray]], list[tuple[np.ndarray, _Face]]]
               ) -> Iterator[tuple[np.ndarray, _Face]]:
        """Steps 2b-3: ``(generated crop, what step 4 needs)`` per target, generated a batch at a time by
        ``generate`` (`_source_faces` or `_bank_faces`) from the batch's targets in source-crop pixels."""
        targets = iter(targets)
        while batch := list(itertools.islice(targets, self.batch_size)):
            # 2b. User controls on the target landmarks; count frames whose driver face was lost.
            points = [controls.apply(target) for target, _ in batch]
            self.stats.lost_frames += sum(not present for _, present in batch)
            # 3. Generator on a batch of frames.
            begin = time.perf_counter()
            faces = generate(points)
            self.stats.add_time("model", time.perf_counter() - begin)
            yield from faces

    def _source_faces(self, source: PreparedSource, points: list[np.ndarray]) -> list[tuple[np.ndarray, _Face]]:
        """Step 3 for one batch from the portrait alone."""
        crops, stillness = self._generate_with_stillness(source, points)
        stills = stillness if stillness is not None else [None] * len(crops)
        return [(crop, _Face(source, still)) for crop, still in zip(crops, stills)]

    def _bank_faces(self, bank: _SourceBank, points: list[np.ndarray]) -> list[tuple[np.ndarray, _Face]]:
        """Step 3 for one batch with source frames: per target, the chosen source (`SourceChooser`) animated to it,
        and during a switch's fade also the previous source."""
        # Targets in portrait pixels choose the source (same framing), then move into that source's crop.
        pixels = [points_from_crop(p, bank.sources[-1].box, self.size) for p in points]
        plans = [bank.plan(p) for p in pixels]
        # One request per (source, target k, role): the chosen source, and during a fade also the previous one.
        requests = [(index, k, "chosen") for k, (index, _, _) in enumerate(plans)]
        requests += [(previous, k, "fading") for k, (_, previous, _) in enumerate(plans) if previous is not None]
        made: dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]] = {}  # (k, role) -> (crop, stillness)
        sources: dict[int, PreparedSource] = {}  # this batch's sources
        for index in sorted({index for index, _, _ in requests}):  # each source prepared and run once
            wanted = [(k, role) for i, k, role in requests if i == index]
            source = sources[index] = bank.source(index, self)
            crops, still = self._generate_with_stillness(
                source, [points_to_crop(pixels[k], source.box, self.size) for k, _ in wanted])
            for j, key in enumerate(wanted):
                made[key] = (crops[j], None if still is None else still[j])
        self.stats.source_switches = bank.chooser.switches
        self.stats.sources_used = len(bank.used)
        faces = []
        for k, (index, previous, weight) in enumerate(plans):
            fade = None if previous is None else _Fade(made[k, "fading"][0], sources[previous], weight)
            crop, still = made[k, "chosen"]
            faces.append((crop, _Face(sources[index], still, fade)))
        return faces

    def _generate(self, source: PreparedSource, targets: list[np.ndarray]) -> np.ndarray:
        """Step 3: ``uint8`` ``(B, S, S, 3)`` generated crops for ``B`` target landmark sets (source-crop pixels)."""
        return self._generate_with_stillness(source, targets)[0]

    def _generate_with_stillness(
        self, source: PreparedSource, targets: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Step 3: the generated crops and, when the source keeps its detail, per crop ``float32`` ``(B, S, S)`` in
        [0, 1]: how still the model left the source there (`stillness`); otherwise None. Where it is still, the
        crop gets the source's `PreparedSource.residual` back."""
        result = self._generator_result(source, targets)
        output = result["output"]  # (B, 3, S, S) in [0, 1]
        if source.detail is None:
            return to_uint8_frames(output), None
        still = stillness(result, self.config)  # (B, S, S); there the motion is under a pixel: no warp needed
        if source.residual is not None:
            output = (output + still[:, None] * source.residual).clamp(0.0, 1.0)
        return to_uint8_frames(output), still.numpy()

    def _generator_result(self, source: PreparedSource, targets: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """The generator's outputs (`Generator.forward`) for ``B`` target landmark sets in source-crop pixels."""
        fixed = self.fixed_batch
        if fixed is not None and len(targets) != fixed:  # chunks of the compiled batch, the last one padded
            chunks = [list(targets[i:i + fixed]) for i in range(0, len(targets), fixed)]
            results = [self._generator_result(source, chunk + [chunk[-1]] * (fixed - len(chunk))) for chunk in chunks]
            return {key: torch.cat([result[key][:len(chunk)] for result, chunk in zip(results, chunks)])
                    for key in results[0]}  # fmt: skip
        size, count = self.size, len(targets)
        thickness = self.config.line_thickness(size)
        lines = frames_to_tensor(
            np.stack([draw_landmark_image(t, size, size, self.config.landmark_topology, thickness) for t in targets])
        )  # (B, 3, S, S)
        prior_grid = masks = None
        cfg, points = self.config, source.crop_landmarks
        if cfg.use_mesh_prior:
            priors = [build_prior(points, t, size, cfg) for t in targets]
            prior_grid = torch.from_numpy(np.stack([prior.grid for prior in priors]))  # (B, S, S, 2)
            if cfg.prior_masks:
                masks = torch.from_numpy(np.stack([prior.masks for prior in priors]))  # (B, prior_mask_channels, S, S)
        identity = None if source.identity is None else source.identity.expand(count, -1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            result = self.generator(
                source.tensor.expand(count, -1, -1, -1),
                source.lines.expand(count, -1, -1, -1),
                lines,
                identity=identity,
                prior_grid=prior_grid,
                prior_masks=masks,
                source_flow=None if source.flow is None else source.flow.expand(count, -1, -1, -1),
                source_levels=source.levels,
            )
        return {k: v.float() if v.is_floating_point() else v for k, v in result.items()}  # bf16 -> fp32


@dataclass(frozen=True)
class _Fade:
    """The previous source's crop for the same target, blended in with ``weight`` during a switch."""

    face: np.ndarray  # uint8 (S, S, 3)
    source: PreparedSource
    weight: float  # in (0, 1): the previous source's share of the frame


@dataclass(frozen=True)
class _Face:
    """What step 4 needs besides a generated crop: its source, its stillness map, a fade."""

    source: PreparedSource
    still: np.ndarray | None = None
    fade: _Fade | None = None


@dataclass
class _SourceBank:
    """Per animation: the source frames, the chooser and the most recently used prepared frames (-1: the portrait,
    always kept; at most `PREPARED_SOURCE_FRAMES` others, as each holds full-size images)."""

    frames: SourceFrames
    chooser: SourceChooser
    pasted: bool
    sources: dict[int, PreparedSource]
    fade_frames: int  # output frames a switch fades over
    fading_from: int | None = None
    fade_left: int = 0
    used: set[int] = dataclasses.field(default_factory=lambda: {-1})

    def plan(self, target_pixels: np.ndarray) -> tuple[int, int | None, float]:
        """``(source index, previous source index or None, its weight)`` for one target in portrait pixels."""
        before = self.chooser.current
        index = self.chooser(target_pixels)
        if index != before:
            self.fading_from, self.fade_left = before, self.fade_frames
        if self.fade_left == 0:
            return index, None, 0.0
        weight = self.fade_left / (self.fade_frames + 1)
        self.fade_left -= 1
        return index, self.fading_from, weight

    def source(self, index: int, animator: Animator) -> PreparedSource:
        self.used.add(index)
        if index in self.sources:
            self.sources[index] = self.sources.pop(index)  # most recently used last
        else:
            self.sources[index] = animator.prepare_source(self.frames.images[index], f"{self.frames.name}[{index}]",
                                                          self.frames.landmarks[index], self.pasted)
            stale = [i for i in self.sources if i != -1][:-PREPARED_SOURCE_FRAMES]
            for i in stale:
                del self.sources[i]
        return self.sources[index]


def _onnx_sr(sr: bool | str | Path, onnx_folder: str | Path | None):
    """`--sr` with `--backend onnx`: the SR network's ONNX export, from ``onnx_folder``'s ``sr/`` when an
    `export-onnx` folder has one, else from (or made into) the cache folder of its weights."""
    from metaportrait.io.checkpoint import checkpoint_sha256
    from metaportrait.onnx_backend import SR_FOLDER, onnx_sr
    from metaportrait.upscale import sr_weights

    model = load_sr(sr)
    given = Path(onnx_folder) / SR_FOLDER if onnx_folder is not None else None
    return onnx_sr(model, checkpoint_sha256(sr_weights(sr)), given if given is not None and given.exists() else None)


def _compiled_sr_finish(sr: bool | str | Path, model, precision: str):
    """`--sr` with `--backend compiled`: the SR network's finish compiled for `StreamingSR`'s calls (built on first
    use and cached per SR checkpoint), or None when it has nothing worth compiling."""
    from metaportrait.compiled_backend import compiled_sr_finish
    from metaportrait.io.checkpoint import checkpoint_sha256
    from metaportrait.upscale import DEFAULT_CHUNK, sr_weights

    return compiled_sr_finish(model, checkpoint_sha256(sr_weights(sr)), DEFAULT_CHUNK, precision)


def _pulled(items: Iterable, seconds: list[float]) -> Iterator:
    """``items``, adding the time spent waiting for each to ``seconds[0]``."""
    items = iter(items)
    while True:
        begin = time.perf_counter()
        item = next(items, None)
        seconds[0] += time.perf_counter() - begin
        if item is None:
            return
        yield item


def stillness(result: dict[str, torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """``(B, S, S)`` in [0, 1] from a generator result: how far the output is the source left where it was.

    ``occlusion * (1 - motion / STILL_MOTION_PX)``, clipped: 1 where the deformation is the identity and the
    source is shown as is, 0 from `STILL_MOTION_PX` crop pixels of motion on or where the output is synthesised.
    """
    deformation, occlusion = result["deformation"], result["occlusion"]  # (B, h, w, 2), (B, 1, S, S)
    _, _, size, _ = occlusion.shape
    h, w = deformation.shape[1:3]
    convention = "centers" if config.use_mesh_prior else config.warp.identity_grid
    identity = make_coordinate_grid(h, w, convention, dtype=deformation.dtype)
    motion = ((deformation - identity) * deformation.new_tensor([w / 2, h / 2])).norm(dim=-1)  # pixels of w x h
    motion = resize_map(motion[:, None] * (size / w), (size, size))  # (B, 1, S, S), pixels of the crop
    return (occlusion * (1 - motion / STILL_MOTION_PX).clamp(0, 1))[:, 0]


def compose_frame(source: PreparedSource, face: np.ndarray, paste_back: bool = True,
                  crop_output: bool = False, still: np.ndarray | None = None) -> np.ndarray:
    """Step 4: one output frame from a generated ``uint8`` ``(S, S, 3)`` face crop (see `Animator.__call__`).

    With ``still`` (``(S, S)`` `stillness`) and the source's ``detail``, the pasted crop gets back the portrait's
    own detail where the model left the source still: there the frame equals the portrait, not a crop that was
    resampled to the model's size and back (at best 33-45 dB PSNR on 256² portraits, softer on larger ones).
    """
    if crop_output or not paste_back:
        return face
    if still is None or source.detail is None:
        return blend_crop(source.image, face, source.box, feather=PASTE_FEATHER)
    frame = source.image.copy()
    region = box_region(source.box, *frame.shape[:2])
    if region is None:
        return frame
    left, top, right, bottom = region  # outside the box the weight is 0: only its region changes
    # The pasted region (rounded as `blend_crop` rounds it) plus the still-weighted detail, rounded once more: the
    # same frame as pasting back and then adding the detail, in one pass over the region.
    values = blend_region(source.image, face, source.box, region, PASTE_FEATHER)
    detail = source.detail[top:bottom, left:right].astype(np.float32)
    detail *= warp_into_region(still, source.box, region)[..., None]
    values += detail
    np.rint(values, out=values)
    frame[top:bottom, left:right] = np.clip(values, 0, 255, out=values)
    return frame
