"""Personalisation (MetaPortrait §3.2, §4.3): fine-tune a generator on a short video of one person, so that it
knows what one photo cannot show (teeth, wrinkles, how the hair moves).

`personalize` runs four steps, top to bottom:

1. **Front-end** (`front_end`): every video becomes a clip of fixed face crops at the model's size with dense
   landmarks, by the dataset preparation code (`metaportrait.data.prepare.prepare_clip`: resampled to 25 fps,
   one crop box per video). Clips are cached by video path, size, modification time and settings, so a rerun
   starts training at once. Frames without a face are skipped and counted; a video in which most frames have no
   face, or whose faces are another person's than the first video's first face (dlib distance above 0.6), stops
   the command.
2. **Split**: the last ``holdout_seconds`` of the last video are held out (never trained on); everything
   before is training material.
3. **Fine-tuning** (`metaportrait.meta.reptile.adapt`, the inner loop of meta-training): Adam on one part of
   the generator (`PersonalizeConfig.part`) with the generator loss of `metaportrait.train.losses`, on random
   same-clip pairs of the person's frames at the model's own resolution, no critic, for ``seconds`` of
   training (or ``steps``). Every ``eval_every`` training seconds the held-out tail is checked (PSNR and face L1
   of ``eval_pairs`` fixed pairs at the model's size; this time is not counted in the budget).
4. **Report** (`tail_report`): the one-shot model and the personalised one, each animating the tail's first
   frame along the rest of the tail as `metaportrait eval self` does (paste-back through the `Animator`),
   compared with the real frames: PSNR, SSIM, face L1, ST-LPIPS and identity distance; optionally also with
   the person's training frames as source frames (`metaportrait.source_frames`, `tail_source_frames`).

The default design (`PersonalizeConfig`) was chosen by measurement on people the bundled model never saw
(docs/experiments.md, 2026-12-06).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from metaportrait.config import ModelConfig
from metaportrait.data.dataset import PreparedClip
from metaportrait.data.drawing import MEDIAPIPE_TOPOLOGIES
from metaportrait.prior.masks import face_mask
from metaportrait.data.pairs import NO_AUGMENT, AugmentConfig, FixedPairs, PairOptions, RandomPairs, StepSampler
from metaportrait.data.prepare import ClipSkipped, PrepareConfig, VideoJob, prepare_clip
from metaportrait.errors import InputError
from metaportrait.io.atomic import write_text_atomic
from metaportrait.io.checkpoint import save_model
from metaportrait.io.image import frames_to_tensor
from metaportrait.losses.perceptual import MobileNetV2Features
from metaportrait.meta.reptile import AdaptResult, WeightAverage, adapt
from metaportrait.models.identity import DLIB_SAME_PERSON_THRESHOLD, IdentityEncoder, identity_distance
from metaportrait.source_frames import MAX_SOURCE_FRAMES, SourceFrames, spread_indices
from metaportrait.train.config import PERSONAL_LOSS, LossWeights
from metaportrait.train.meta import query_metrics

logger = logging.getLogger(__name__)

FPS = 25.0  # the front-end resamples every video to this rate (as `metaportrait prepare`)
MAX_FACELESS_SHARE = 0.5  # a video with more frames than this without a face is refused
IDENTITY_SAMPLES = 6  # frames per video compared with the first face
MIN_TAIL_FRAMES = 8  # frames with a face the held-out tail needs
# The end-of-run summary flags a personalised model whose held-out ST-LPIPS is more than this factor, or whose
# identity distance more than this amount, above the one-shot model's (run-to-run spread: docs/experiments.md).
WORSE_ST_LPIPS_FACTOR = 1.04
WORSE_IDENTITY_DISTANCE = 0.01

@dataclass(frozen=True)
class PersonalizeConfig:
    """Settings of one personalisation run (one default per setting; see docs/experiments.md for the choice)."""

    # `Generator.part_parameters`: "all", "warp", "refine", "decoder" or "norms". "all" measured best: the warping
    # network is where a person's own motion (hair, background, head outline) is learned (docs/experiments.md).
    part: str = "all"
    lr: float = 3e-4  # Adam (1e-3 drifts past the best point within 60 s on an expressive speaker: experiments.md)
    betas: tuple[float, float] = (0.5, 0.999)
    grad_clip: float = 1.0
    batch_size: int = 2  # pairs per step
    # The weights kept and reported are an exponential moving average of the fine-tuning's (`WeightAverage`) with
    # this decay; None: the last step's weights.
    average_decay: float | None = None
    augment: AugmentConfig = NO_AUGMENT  # paired augmentation of the training pairs
    seconds: float | None = 60.0  # training budget in wall seconds (held-out checks not counted); None: steps only
    steps: int | None = None  # step budget; None: seconds only
    holdout_seconds: float = 10.0  # the last this-many seconds of the last video are never trained on
    min_train_seconds: float = 2.0  # video with a face needed before the held-out tail
    eval_every: float = 15.0  # training seconds between held-out checks
    eval_pairs: int = 8  # fixed tail pairs of the held-out checks
    report_stride: int = 4  # the final report uses every k-th tail frame
    # the final report also animates the training frames of the tail's video as source frames (two more rows)
    report_source_frames: bool = False
    loss: LossWeights = field(default_factory=lambda: PERSONAL_LOSS)
    seed: int = 0

    def __post_init__(self):
        from metaportrait.models.generator import PARTS

        if self.part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {self.part!r}")
        if self.seconds is None and self.steps is None:
            raise ValueError("give a budget: seconds or steps")
        if (self.seconds is not None and self.seconds <= 0) or (self.steps is not None and self.steps < 1):
            raise ValueError(f"seconds must be > 0 and steps >= 1, got {self.seconds}, {self.steps}")
        if self.lr <= 0 or self.batch_size < 1 or self.holdout_seconds <= 0 or self.min_train_seconds <= 0:
            raise ValueError("lr, batch_size, holdout_seconds and min_train_seconds must be positive")
        if self.average_decay is not None and not 0.0 <= self.average_decay < 1.0:
            raise ValueError(f"average_decay must be in [0, 1), got {self.average_decay}")
        if self.eval_every <= 0 or self.eval_pairs < 1 or self.report_stride < 1:
            raise ValueError("eval_every, eval_pairs and report_stride must be positive")
        if self.loss.gan > 0 or self.loss.feature_matching > 0 or self.loss.mouth_gan > 0:
            raise ValueError("personalisation trains without critics: loss.gan, feature_matching, mouth_gan must be 0")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ---------------------------------------------------------------------------------------------------------
# 1. Front-end
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FrontEnd:
    """The person's videos as prepared clips (crops at the model's size, landmarks), in the order given."""

    clips: list[PreparedClip]
    frames: int  # frames over all videos (at `FPS`)
    faceless: int  # of which without a face (skipped)
    cached: int  # videos whose clip came from the cache
    seconds: float  # wall time of the front-end


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/metaportrait/personalize`` (``~/.cache/...`` without it)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "metaportrait" / "personalize"


def front_end(videos: Sequence[str | Path], size: int, cache_dir: str | Path) -> FrontEnd:
    """Crops and landmarks of every video (cached in ``cache_dir``).

    Raises:
        InputError: a missing or unreadable video, one without a face in most frames.
    """
    start = time.perf_counter()
    cache_dir = Path(cache_dir)
    (cache_dir / "clips").mkdir(parents=True, exist_ok=True)
    config = PrepareConfig(size=size, fps=FPS)
    clips, cached = [], 0
    for video in map(Path, videos):
        if not video.is_file():
            raise InputError(video, "file not found")
        stat = video.stat()
        key_text = json.dumps([str(video.resolve()), stat.st_size, stat.st_mtime_ns, dataclasses.asdict(config)])
        key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
        entry_path = cache_dir / f"{key}.json"
        if entry_path.is_file() and (cache_dir / "clips" / key).is_dir():
            entry = json.loads(entry_path.read_text(encoding="utf-8"))
            cached += 1
        else:
            logger.info("front-end: %s", video)
            try:
                entry = prepare_clip(VideoJob(video.resolve(), key, "person"), config, cache_dir / "clips")
            except ClipSkipped as skipped:
                raise InputError(video, skipped.reason) from None
            write_text_atomic(entry_path, json.dumps(entry) + "\n")
        clip = PreparedClip(
            folder=cache_dir / "clips" / key, clip=video.stem, identity="person", source_video=str(video),
            frame_count=int(entry["frames"]), fps=float(entry["fps"]), size=int(entry["size"]),
            crop=tuple(entry["crop"]),
        )  # fmt: skip
        faceless = int((~clip.present).sum())
        if faceless > MAX_FACELESS_SHARE * clip.frame_count:
            raise InputError(video, f"no face in {faceless} of {clip.frame_count} frames")
        clips.append(clip)
    frames = sum(c.frame_count for c in clips)
    faceless = sum(int((~c.present).sum()) for c in clips)
    return FrontEnd(clips, frames, faceless, cached, time.perf_counter() - start)


def check_one_person(clips: Sequence[PreparedClip], encoder: IdentityEncoder) -> float:
    """The largest dlib distance of sampled faces (`IDENTITY_SAMPLES` per clip) to the first clip's first face.

    Raises:
        InputError: naming the first video whose face is farther than dlib's same-person threshold.
    """
    reference, largest = None, 0.0
    for clip in clips:
        usable = clip.usable_frames
        picks = usable[np.unique(np.linspace(0, len(usable) - 1, IDENTITY_SAMPLES).round().astype(int))]
        with torch.no_grad():
            embeddings = encoder.embed(frames_to_tensor(np.asarray(clip.frames[picks])),
                                       torch.from_numpy(np.asarray(clip.landmarks[picks])))  # fmt: skip
        if reference is None:
            reference = embeddings[:1]
        distances = identity_distance(embeddings, reference)
        worst = int(distances.argmax())
        if float(distances[worst]) > DLIB_SAME_PERSON_THRESHOLD:
            raise InputError(
                clip.source_video,
                f"frame {int(picks[worst])} shows another person than the first face of {clips[0].source_video} "
                f"(dlib distance {float(distances[worst]):.2f} > {DLIB_SAME_PERSON_THRESHOLD}); give videos of one "
                "person",
            )
        largest = max(largest, float(distances.max()))
    return largest


# ---------------------------------------------------------------------------------------------------------
# 2. Split
# ---------------------------------------------------------------------------------------------------------


def split_holdout(clips: Sequence[PreparedClip], cfg: PersonalizeConfig) -> tuple[list[PreparedClip], PreparedClip]:
    """(training clips, held-out tail): the tail is the last ``holdout_seconds`` of the last clip.

    Raises:
        InputError: too little video with a face for the tail plus ``min_train_seconds`` of training.
    """
    last = clips[-1]
    cut = last.frame_count - int(round(cfg.holdout_seconds * last.fps))
    tail = last.part(max(cut, 0), last.frame_count)
    train = [*clips[:-1], last.part(0, max(cut, 0))]
    train_frames = sum(len(c.usable_frames) for c in train)
    need = cfg.min_train_seconds * last.fps
    if cut <= 0 or len(tail.usable_frames) < MIN_TAIL_FRAMES or train_frames < need:
        total = sum(len(c.usable_frames) for c in clips) / last.fps
        raise InputError(
            last.source_video,
            f"too little video: {total:.1f} s with a face, need the {cfg.holdout_seconds:g} s held-out tail of the "
            f"last video plus {cfg.min_train_seconds:g} s to train on",
        )
    return train, tail


# ---------------------------------------------------------------------------------------------------------
# 3. Fine-tuning
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FineTuneResult:
    """What `fine_tune` did: the inner loop's result and the held-out checks."""

    adapt: AdaptResult
    curve: list[dict] = field(default_factory=list)  # {"seconds", "step", "psnr", "face_l1"} per held-out check


def fine_tune(
    generator: torch.nn.Module,
    model_cfg: ModelConfig,
    train_clips: Sequence[PreparedClip],
    tail: PreparedClip,
    cfg: PersonalizeConfig,
    encoder: IdentityEncoder | None,
    on_step: Callable[[int, float, float, dict | None], None] | None = None,
) -> FineTuneResult:
    """Fine-tune ``generator`` in place on pairs of ``train_clips`` (module docstring, step 3). With
    ``cfg.average_decay`` the held-out checks, ``on_step`` and the result see the averaged weights.

    Args:
        on_step: called after every step with ``(step, loss, training seconds, held-out check or None)``.
    """
    from metaportrait.train.losses import GeneratorLoss

    size = model_cfg.image_size
    options = PairOptions.for_model(model_cfg, size)
    pairs = RandomPairs(train_clips, options, cfg.augment, cfg.seed)
    max_steps = cfg.steps if cfg.steps is not None else 10**9
    loader = DataLoader(pairs, batch_size=cfg.batch_size, sampler=StepSampler(0, max_steps, cfg.batch_size))
    held_out = next(iter(DataLoader(FixedPairs([tail], options, cfg.eval_pairs), batch_size=cfg.eval_pairs)))
    generator_loss = GeneratorLoss(cfg.loss, model_cfg, "full", size, MobileNetV2Features(), encoder)
    parameters = [p for _, p in generator.part_parameters(cfg.part)]
    average = WeightAverage(parameters, cfg.average_decay) if cfg.average_decay is not None else None
    result = FineTuneResult(adapt=AdaptResult(0, 0.0))
    result.curve.append({"seconds": 0.0, "step": 0, **query_metrics(generator, model_cfg, held_out, encoder)})

    def after_step(step: int, loss: float, seconds: float) -> None:
        if average is not None:
            average.swap()  # the callers see the averaged weights
        check = None
        if seconds >= result.curve[-1]["seconds"] + cfg.eval_every:
            check = query_metrics(generator, model_cfg, held_out, encoder)
            check = {"seconds": round(seconds, 2), "step": step, **check}
            result.curve.append(check)
        if on_step is not None:
            on_step(step, loss, seconds, check)
        if average is not None:
            average.swap()

    result.adapt = adapt(
        generator, loader, lambda model, batch: generator_loss(model, batch).total, parameters, cfg.lr,
        steps=cfg.steps, seconds=cfg.seconds, betas=cfg.betas, grad_clip=cfg.grad_clip, on_step=after_step,
        average=average,
    )  # fmt: skip
    if average is not None:
        average.swap()  # keep the average
    if result.curve[-1]["step"] != result.adapt.steps:
        final = query_metrics(generator, model_cfg, held_out, encoder)
        result.curve.append({"seconds": round(result.adapt.seconds, 2), "step": result.adapt.steps, **final})
    generator.eval()
    return result


# ---------------------------------------------------------------------------------------------------------
# 4. Report
# ---------------------------------------------------------------------------------------------------------


def tail_source_frames(train_clips: Sequence[PreparedClip], tail: PreparedClip,
                       max_frames: int = MAX_SOURCE_FRAMES) -> SourceFrames | None:
    """Up to ``max_frames`` training frames of the tail's own video, spread evenly: the same crop box as the tail,
    hence its framing (None when the tail's video has no training part)."""
    parts = [c for c in train_clips if c.folder == tail.folder and len(c.usable_frames)]
    if not parts:
        return None
    usable = np.concatenate([c.usable_frames for c in parts])
    picks = usable[spread_indices(len(usable), max_frames)]
    return SourceFrames(np.asarray(parts[0].frames[picks]), np.asarray(parts[0].landmarks[picks], np.float32),
                        f"{tail.source_video} (training part)")


@dataclass(frozen=True)
class HeldOutTail:
    """What every report of one held-out tail compares with, computed once (the optical flow is the slow part):
    its first kept frame and the real crops of every ``stride``-th later frame, ``uint8 (S, S, 3)`` and
    ``(T, S, S, 3)``; their landmarks ``(T + 1, 478, 2)`` and smoothed targets in crop pixels; face masks
    ``(T, S, S)``; the real crops' optical flow (None for fewer than 2); the reports' frame rate."""

    source: np.ndarray
    real: np.ndarray
    landmarks: np.ndarray
    targets: np.ndarray
    face: np.ndarray
    flow: Any  # metaportrait.eval.metrics.TemporalFlow (eval is imported lazily here)
    fps: float

    @classmethod
    def of(cls, tail: PreparedClip, stride: int) -> HeldOutTail:
        from metaportrait.eval.metrics import temporal_flow
        from metaportrait.eval.protocols import smooth_targets

        kept = tail.usable_frames[::stride]
        crops = np.asarray(tail.frames[kept])
        landmarks = np.asarray(tail.landmarks[kept], dtype=np.float32)
        size = crops.shape[1]
        face = np.stack([face_mask(points, size, size, 0.0, 0.0) for points in landmarks[1:]])
        flow = temporal_flow(crops[1:]) if len(crops) >= 3 else None
        return cls(crops[0], crops[1:], landmarks, smooth_targets(landmarks, tail.fps / stride), face, flow,
                   tail.fps / stride)


def tail_report(
    generators: dict[str, torch.nn.Module], model_cfg: ModelConfig, tail: HeldOutTail, models,
    source_frames: SourceFrames | None = None,
) -> dict[str, dict[str, float]]:
    """Self-reconstruction of the held-out tail by each generator (as `metaportrait eval self`): the tail's first
    kept frame animated along the smoothed landmarks of the later kept frames, pasted back, compared with the
    real crops. ``models``: `metaportrait.eval.protocols.MetricModels`. With ``source_frames`` (of the tail's
    framing, `tail_source_frames`) each generator is also reported animating them, as ``"<name> + source
    frames"``. Flicker is the warping error ``e_warp`` of the outputs along the real crops' optical flow (frames
    ``stride`` apart; the real crops' own value is in the row ``"real"``). Returns name -> metric -> value."""
    from metaportrait.eval.metrics import warping_error
    from metaportrait.eval.protocols import reconstruction_metrics
    from metaportrait.pipeline import Animator

    report = {"real": {"e_warp": round(warping_error(tail.real, tail.flow), 6)}} if tail.flow is not None else {}
    for name, generator in generators.items():
        animator = Animator(generator, model_cfg, identity_encoder=models.identity)
        for suffix, frames in [("", None)] + ([(" + source frames", source_frames)] if source_frames else []):
            output = np.stack(list(animator.animate_landmarks(tail.source, tail.targets[1:], paste_back=True,
                                                              source_landmarks=tail.targets[0],
                                                              source_frames=frames, fps=tail.fps)))  # fmt: skip
            values = reconstruction_metrics(models, output, tail.real, tail.face, tail.source, tail.targets[0],
                                            tail.landmarks[1:])
            if tail.flow is not None:
                values["e_warp"] = warping_error(output, tail.flow)
            report[name + suffix] = {k: round(float(v), 6 if k == "e_warp" else 5) for k, v in values.items()}
    return report


def mark_budget(unit: str, last_mark: float) -> dict:
    """The ``seconds`` / ``steps`` fields of a `PersonalizeConfig` that fine-tune up to ``last_mark`` of ``unit``
    ("seconds" of wall time or optimiser "steps")."""
    if unit not in ("seconds", "steps"):
        raise ValueError(f"unit must be 'seconds' or 'steps', got {unit!r}")
    return {"seconds": last_mark, "steps": None} if unit == "seconds" else {"seconds": None, "steps": int(last_mark)}


def budget_curve(
    start: torch.nn.Module,
    model_cfg: ModelConfig,
    train_clips: Sequence[PreparedClip],
    tail: PreparedClip,
    cfg: PersonalizeConfig,
    models,
    marks: Sequence[float],
    unit: str = "seconds",
    source_frames: SourceFrames | None = None,
) -> list[dict]:
    """The tail report (`tail_report`) of ``start`` and of a copy of it fine-tuned for each of ``marks`` training
    seconds, or steps with ``unit="steps"`` (one run up to ``max(marks)``, reported as it passes each mark; the
    reports' time is not counted). Returns ``{"seconds", "steps", "loss", metric: value, ...}`` per point, the
    first at 0 s; ``seconds`` is the mark (seconds) or the measured training time (steps). With ``source_frames``
    each point also holds ``"with_source_frames"``: the metrics of the same generator animating them."""
    budget = mark_budget(unit, max(marks))
    generator = copy.deepcopy(start)
    encoder = models.identity if model_cfg.use_identity else None

    held_out = HeldOutTail.of(tail, cfg.report_stride)

    def measure() -> dict:
        values = tail_report({"x": generator}, model_cfg, held_out, models, source_frames)
        return {**values["x"], **({"with_source_frames": values["x + source frames"]} if source_frames else {})}

    points = [{"seconds": 0.0, "steps": 0, "loss": None, **measure()}]
    pending = sorted(marks)

    def report(step: int, loss: float, seconds: float, check: dict | None) -> None:
        while pending and (seconds if unit == "seconds" else step) >= pending[0]:
            values = measure()
            mark = pending.pop(0)
            if unit == "seconds":
                at = {"seconds": mark, "steps": step}
            else:
                at = {"seconds": round(seconds, 2), "steps": int(mark)}
            points.append({**at, "loss": round(loss, 4), **values})
            generator.train()

    torch.manual_seed(cfg.seed)
    tuned = dataclasses.replace(cfg, **budget, eval_every=float("inf"))
    fine_tune(generator, model_cfg, train_clips, tail, tuned, encoder, report)
    return points


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def write_checkpoint(out_dir: Path, generator: torch.nn.Module, model_cfg: ModelConfig, meta: dict, report: dict,
                     overwrite: bool) -> None:
    """The personalised checkpoint folder (``model.safetensors``, ``config.json``, ``report.json``,
    ``report.png``), written into a temporary folder beside ``out_dir`` and renamed into place, so ``out_dir``
    is never half-written (a replaced folder is moved aside first and deleted last)."""
    from metaportrait.eval.plots import plot_series

    tmp = temporary_folder(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a killed run
    try:
        save_model(tmp, generator, model_cfg, extra_meta=meta)
        write_text_atomic(tmp / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
        plot_series(report, tmp / "report.png")
        if out_dir.exists():
            if not overwrite:
                raise InputError(out_dir, "already exists; pass --overwrite to replace it")
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temporary_folder(out_dir: Path) -> Path:
    """Where `write_checkpoint` builds ``out_dir`` before renaming it."""
    return out_dir.with_name(f".{out_dir.name}.tmp-personalize")


def heldout_summary(methods: dict[str, dict[str, float]]) -> tuple[str, list[str]]:
    """One line comparing the personalised model with the one-shot one on the held-out tail (`tail_report`'s
    rows ``"one-shot"`` and ``"personalised"``), and the metrics on which the personalised one is worse: PSNR
    lower, ST-LPIPS above ``WORSE_ST_LPIPS_FACTOR`` times, identity distance above by ``WORSE_IDENTITY_DISTANCE``."""
    before, after = methods["one-shot"], methods["personalised"]
    worse = []
    if after["psnr"] < before["psnr"]:
        worse.append("PSNR")
    if after["st_lpips"] > WORSE_ST_LPIPS_FACTOR * before["st_lpips"]:
        worse.append("ST-LPIPS")
    if after["id_distance"] > before["id_distance"] + WORSE_IDENTITY_DISTANCE:
        worse.append("identity distance")
    line = (f"held-out tail, one-shot -> personalised: PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB "
            f"({after['psnr'] - before['psnr']:+.2f}), ST-LPIPS {before['st_lpips']:.4f} -> {after['st_lpips']:.4f}, "
            f"identity distance {before['id_distance']:.3f} -> {after['id_distance']:.3f}")  # fmt: skip
    return line, worse


def curve_series(curve: list[dict], oneshot: dict[str, float]) -> dict:
    """The held-out checks as `metaportrait.eval.plots` series (PSNR and face L1 against training seconds), with
    the one-shot model's value as a dashed baseline."""
    xs = [point["seconds"] for point in curve]
    series = {}
    for metric, label, lower in (("psnr", "PSNR (dB)", False), ("face_l1", "face L1", True)):
        series[f"heldout_{metric}"] = {
            "x_label": "fine-tuning seconds", "y_label": f"held-out {label}", "lower_is_better": lower,
            "curves": {"personalised": {"x": xs, "y": [point[metric] for point in curve]},
                       "one-shot": {"x": [xs[0], xs[-1]], "y": [oneshot[metric]] * 2, "baseline": True}},
        }  # fmt: skip
    return series


def personalize(
    videos: Sequence[str | Path],
    out_dir: str | Path,
    generator: torch.nn.Module,
    model_cfg: ModelConfig,
    cfg: PersonalizeConfig,
    checkpoint_name: str,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Personalise ``generator`` (its config ``model_cfg``, loaded from ``checkpoint_name``) on ``videos`` of one
    person and write the checkpoint folder ``out_dir`` (module docstring). Returns the report (also
    ``out_dir/report.json``).

    Raises:
        InputError: an existing ``out_dir`` without ``overwrite``, a model not drawn from MediaPipe landmarks, and
            the front-end's and split's refusals (no face, two people, too little video).
    """
    from tqdm import tqdm

    from metaportrait.eval.protocols import MetricModels

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(out_dir, "already exists; pass --overwrite to replace it")
    if model_cfg.landmark_topology not in MEDIAPIPE_TOPOLOGIES:
        raise InputError(checkpoint_name, f"a {model_cfg.landmark_topology!r} model cannot be personalised from "
                                          "MediaPipe landmarks")  # fmt: skip
    torch.manual_seed(cfg.seed)

    # 1-2. Front-end, one person, held-out tail.
    frontend = front_end(videos, model_cfg.image_size, cache_dir or default_cache_dir())
    models = MetricModels.load()  # ST-LPIPS, dlib identity (also the model's identity input), MobileNetV2
    largest_distance = check_one_person(frontend.clips, models.identity)
    train_clips, tail = split_holdout(frontend.clips, cfg)
    logger.info(
        "front-end: %.1f s (%d of %d videos cached); %d frames, %d without a face (skipped); %d training frames, "
        "held-out tail %d frames", frontend.seconds, frontend.cached, len(frontend.clips), frontend.frames,
        frontend.faceless, sum(len(c.usable_frames) for c in train_clips), len(tail.usable_frames),
    )  # fmt: skip

    # 3. Fine-tuning.
    oneshot = copy.deepcopy(generator).eval()
    bar = tqdm(total=cfg.steps, disable=not progress, desc="personalize", unit="step")
    heldout_psnr = float("nan")

    def show(step: int, loss: float, seconds: float, check: dict | None) -> None:
        nonlocal heldout_psnr
        heldout_psnr = check["psnr"] if check else heldout_psnr
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", heldout_psnr=f"{heldout_psnr:.2f}", s=f"{seconds:.0f}")

    encoder = models.identity if model_cfg.use_identity else None
    tuned = fine_tune(generator, model_cfg, train_clips, tail, cfg, encoder, show)
    bar.close()

    # 4. Report and checkpoint.
    frames = tail_source_frames(train_clips, tail) if cfg.report_source_frames else None
    table = tail_report({"one-shot": oneshot, "personalised": generator}, model_cfg,
                        HeldOutTail.of(tail, cfg.report_stride), models, frames)
    summary, worse = heldout_summary(table)
    report = {
        "checkpoint": checkpoint_name,
        "videos": [str(v) for v in videos],
        "settings": cfg.to_dict(),
        "front_end": {"seconds": round(frontend.seconds, 2), "frames": frontend.frames,
                      "frames_without_face": frontend.faceless, "videos_cached": frontend.cached,
                      "largest_identity_distance": round(largest_distance, 4)},
        "training": {"steps": tuned.adapt.steps, "seconds": round(tuned.adapt.seconds, 2),
                     "frames": sum(len(c.usable_frames) for c in train_clips),
                     "first_loss": tuned.adapt.losses[0] if tuned.adapt.losses else None,
                     "last_loss": tuned.adapt.losses[-1] if tuned.adapt.losses else None},
        "heldout": {"video": tail.source_video, "first_frame": tail.first_frame, "frames": len(tail.usable_frames),
                    "report_stride": cfg.report_stride},
        "methods": table,
        "worse_than_oneshot": worse,
        "curve": tuned.curve,
        "series": curve_series(tuned.curve, tuned.curve[0]),
    }  # fmt: skip
    meta = {"stage": "full", "personalized_from": checkpoint_name, "steps": tuned.adapt.steps}
    write_checkpoint(out_dir, generator, model_cfg, meta, report, overwrite)
    logger.info(summary)
    if worse:
        # Common on people whose hands, body or background move more than their face (docs/results.md).
        logger.warning("the personalised model is worse than the one-shot one on the held-out tail in %s; "
                       "`--part norms --lr 1e-3` moves less, or keep the model you started from", ", ".join(worse))
    return report
