"""Training of the temporal super-resolution network (`metaportrait train sr`).

Data: a `metaportrait prepare --size 512` dataset. Each step takes ``clips`` random windows of ``frames``
consecutive 512 frames (horizontally flipped at random) as ground truth and makes the 256 input on the fly
(`degrade`): blur, sub-pixel shifts (misalignment), downscale to 256 with a random kernel, noise and JPEG, with
clip-level strengths and per-frame noise and shifts, so the inputs look like the base model's output. Every
random choice is drawn from a generator seeded by ``(seed, step)``, so a resumed run sees the same batches.

A share of the clips (``clean``) is only downscaled (area), as the evaluation's inputs. Another share
(``generated``) gets as input what ``animate --sr`` will feed the network: the base model's own 256 reconstruction
of the window (another frame of the same clip animated along the window's landmarks and pasted back), so a
fine-tune (``init``: start from a trained SR model) sees the generator's real artefacts.

Losses: L1 + L1 of the image gradients (``edge``: rewards the detail plain L1 averages away) + the project's
perceptual pyramid (`metaportrait.losses.perceptual`, MobileNetV2) on a random ``crop``-sized patch of every output
frame (the same patch of the ground truth; a quarter of the cost of the whole 512 frame) + GFPGAN's pyramid
loss (``pyramid``: L1 of the U-Net's intermediate RGB outputs against the resized ground truth, which gives the
U-Net that conditions the decoder a direct restoration signal) + a temporal term
``|(O_t - O_t-1) - (G_t - G_t-1)|`` that penalises flicker the ground truth does not have + (``gan``) an LSGAN
term from a two-scale patch critic that sees the same patch as the perceptual term (the critic is trained in the
same step, after the network, on that patch of the output and of the ground truth). Adam (global gradient
norm clipped at ``grad_clip``; a step with a non-finite loss or gradient is skipped) with a linear warm-up over
``warmup`` steps, then a cosine decay to ``lr / 10`` at ``steps``; an exponential moving average of the weights is
what gets exported.

Initialisation: residual presets start with their decoder's RGB heads at zero (the untrained network is the plain
upsampling), which leaves every other weight without gradient at the first step and the whole network moving only
as fast as those heads grow. Training therefore re-draws the heads at ``rgb_init`` times their default scale
(small: the first outputs stay within about a grey level of the upsampling) before the first step.

Run folder (the same conventions as `metaportrait.train.base`):

``train_config.json``  the `SRTrainConfig` (``--resume`` rebuilds the run from it)
``log.jsonl``          one line per ``log_every`` steps: step, losses, seconds per step
``val.jsonl``          one line per validation: PSNR of the network and of bilinear upsampling on held-out clips
``checkpoint.pt``      network, average, optimiser, step, critic and its optimiser when ``gan`` > 0
                       (weights-only loadable; written atomically)
``model/``             the averaged network (`metaportrait.io.checkpoint.save_sr_model`), what `animate --sr` loads

Under ``torchrun`` (``python -m torch.distributed.run --nproc_per_node N``, gloo on CPU) every process trains on
``clips`` clips of its own a step (process r gets the clips r*clips .. (r+1)*clips - 1 of the step's draw, so N
processes see what one process with ``N * clips`` clips sees) and the gradients of the network and of the critic
are averaged before clipping; process 0 writes the run folder (its losses are the logged ones).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from metaportrait.config import SR_PRESETS, DiscriminatorConfig, SRConfig, _from_dict
from metaportrait.data.dataset import PreparedClip, PreparedDataset, parse_identities
from metaportrait.errors import InputError
from metaportrait.eval.sr import reconstruct
from metaportrait.io.atomic import atomic_path, remove_temporaries, write_text_atomic
from metaportrait.io.checkpoint import save_sr_model
from metaportrait.losses.perceptual import MobileNetV2Features, PerceptualPyramidLoss
from metaportrait.models.discriminator import MultiScaleDiscriminator
from metaportrait.models.sr import TemporalSR, upsample
from metaportrait.train.base import (
    _update_average,
    append_jsonl,
    average_gradients,
    export_model,
    finite_on_every_rank,
    start_processes,
    stop_processes,
    truncate_jsonl,
)
from metaportrait.train.losses import critic_loss, generator_adversarial
from metaportrait.upscale import load_sr, sr_weights

# Settings a resumed run may change (the rest must equal the run's train_config.json).
RESUMABLE_CHANGES = ("steps", "threads", "log_every", "checkpoint_every", "val_every", "ema_decay", "lr")
# The patch critic of the adversarial term: small, as the SR network it judges (two scales of a 256² patch;
# three blocks see texture, 25-px patches at full scale, and fit patches down to 64 px).
SR_CRITIC = DiscriminatorConfig(scales=(1.0, 0.5), block_expansion=16, max_features=128, num_blocks=3, norm="none")


def learning_rate(cfg: SRTrainConfig, step: int) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then a cosine decay from ``cfg.lr`` to ``cfg.lr / 10`` at
    ``cfg.steps``."""
    if step <= cfg.warmup:
        return cfg.lr * step / max(cfg.warmup, 1)
    progress = min(1.0, (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def init_rgb_heads(model: TemporalSR, scale: float, generator: torch.Generator) -> None:
    """Re-draw the decoder's RGB heads of a residual preset at ``scale`` x their default init (StyleGAN2's
    ``randn / sqrt(fan_in)``), so every weight gets a gradient from the first step."""
    if not model.cfg.residual or scale == 0:
        return
    with torch.no_grad():
        for to_rgb in [model.stylegan_decoder.to_rgb1, *model.stylegan_decoder.to_rgbs]:
            weight = to_rgb.modulated_conv.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * scale / math.sqrt(weight[0, 0].numel()))


@dataclass(frozen=True)
class SRTrainConfig:
    preset: str = "lite"
    frames: int = 3  # consecutive frames per training clip
    clips: int = 1  # clips per step
    steps: int = 20000
    lr: float = 4e-4  # 1e-3 diverged (output saturated, then NaN) after ~220 steps, even with warm-up
    warmup: int = 100  # steps of linear lr warm-up; then a cosine decay to lr / 10 at `steps`
    ema_decay: float = 0.995
    grad_clip: float = 1.0  # max global gradient norm (0: off); a step with a non-finite loss is skipped
    rgb_init: float = 0.01  # residual presets: decoder RGB heads re-drawn at this x their default scale (0: zero)
    l1: float = 1.0
    edge: float = 1.0  # L1 of the horizontal and vertical image differences (0: off)
    # Perceptual pyramid (MobileNetV2, layer weights 1, scales 1 and 1/2): its value is ~140x the L1's at the start.
    perceptual: float = 0.1
    crop: int = 256  # side of the random patch the perceptual term sees (0: the whole frame)
    temporal: float = 2.0  # weight of the frame-difference term (0: off)
    # GFPGAN's pyramid loss: L1 of the U-Net's own RGB outputs (8 px .. unet_size) against the resized ground
    # truth, so the U-Net whose features condition the decoder learns restoration directly (0: off)
    pyramid: float = 1.0
    clean: float = 0.3  # share of clips whose input is only downscaled (area), no blur, shift, noise or JPEG
    # largest per-frame input misalignment, in input pixels (a clip draws its own bound in [0, shift)). A shift the
    # network cannot see makes blur the L1-optimal output: runs up to sr_v3 used 0.6 and stayed at bicubic.
    shift: float = 0.6
    # share of clips whose input is the base model's 256 reconstruction of the window (`render_window`), made
    # with the generator checkpoint ``generator`` ("default": the bundled one); no other degradation on those
    generated: float = 0.0
    generator: str = "default"
    init: str | None = None  # start from this SR model folder ("default": the bundled sr_lite) instead of scratch
    gan: float = 0.0  # weight of the LSGAN term of the patch critic (0: no critic)
    critic_lr: float = 1e-4
    val_identities: tuple[str, ...] = ()  # held out: never trained on; validation windows come from them
    seed: int = 0
    threads: int = 1
    log_every: int = 10
    checkpoint_every: int = 50
    val_every: int = 200

    def __post_init__(self):
        if self.preset not in SR_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (choose from {sorted(SR_PRESETS)})")
        if self.frames < 1 or self.clips < 1 or self.steps < 0:
            raise ValueError("frames and clips must be >= 1 and steps >= 0")
        if not 0 <= self.generated <= 1 or not 0 <= self.clean <= 1:
            raise ValueError("generated and clean are shares in [0, 1]")

    def model_config(self) -> SRConfig:
        return SR_PRESETS[self.preset]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> SRTrainConfig:
        return _from_dict(cls, data, "train")

    def replace(self, **changes) -> SRTrainConfig:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------------------
# Data


def degrade(frames: np.ndarray, size: int, rng: np.random.Generator, clean: float = 0.0,
            shift: float = 0.6) -> np.ndarray:
    """``uint8 (T, S, S, 3)`` ground-truth frames -> ``uint8 (T, size, size, 3)`` inputs that look like a blurry,
    slightly misaligned, noisy, compressed render. Strengths are per clip; shifts, noise and JPEG per frame.
    With probability ``clean`` the clip is only downscaled (area)."""
    if clean > 0 and rng.random() < clean:
        return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])
    scale = frames.shape[1] / size
    sigma = rng.uniform(0.1, 1.2) * scale  # Gaussian blur at the ground-truth resolution
    kernel = rng.choice([cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_CUBIC])
    noise = rng.uniform(0, 6) if rng.random() < 0.7 else 0.0  # grey levels
    quality = int(rng.integers(55, 96)) if rng.random() < 0.8 else None
    max_shift = rng.uniform(0, shift) * scale  # per-frame misalignment, in ground-truth pixels
    out = []
    for frame in frames:
        image = cv2.GaussianBlur(frame, (0, 0), sigma) if sigma > 0.3 else frame
        dx, dy = rng.uniform(-max_shift, max_shift, size=2)
        if max_shift > 0:
            matrix = np.float32([[1, 0, dx], [0, 1, dy]])
            image = cv2.warpAffine(image, matrix, image.shape[1::-1], flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT)
        image = cv2.resize(image, (size, size), interpolation=int(kernel)).astype(np.float32)
        if noise > 0:
            image = image + rng.normal(0, noise, image.shape).astype(np.float32)
        image = np.clip(image, 0, 255).round().astype(np.uint8)
        if quality is not None:
            ok, encoded = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
            image = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]
        out.append(image)
    return np.stack(out)


def sample_window(clip: PreparedClip, frames: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``frames`` consecutive frames of ``clip`` starting at a random frame with a face: ``uint8 (T, S, S, 3)``
    and the first frame's index."""
    usable = clip.usable_frames
    starts = usable[usable <= clip.frame_count - frames]
    start = int(rng.choice(starts)) if len(starts) else 0
    return np.ascontiguousarray(clip.frames[start:start + frames]), start


def render_source(clip: PreparedClip, start: int, frames: int, rng: np.random.Generator) -> int:
    """The frame a generated input of the window ``start .. start + frames - 1`` is animated from: a random other
    usable frame of the clip (the window's first when there is none)."""
    usable = clip.usable_frames
    others = usable[(usable < start) | (usable >= start + frames)]
    return int(rng.choice(others)) if len(others) else start


def render_window(animator, clip: PreparedClip, start: int, frames: int, size: int, source_index: int) -> np.ndarray:
    """The base model's reconstruction of ``clip``'s frames ``start .. start + frames - 1`` from frame
    ``source_index`` along the window's landmarks (`metaportrait.eval.sr.reconstruct`, as the evaluation's
    generated inputs). ``uint8 (T, size, size, 3)``."""
    scale = size / clip.frames.shape[1]
    landmarks = np.asarray(clip.landmarks[start:start + frames], np.float32) * scale
    return reconstruct(animator, clip, source_index, np.asarray(clip.landmarks[source_index], np.float32) * scale,
                       landmarks, size)


def make_batch(clips: list[PreparedClip], cfg: SRTrainConfig, model_cfg: SRConfig, step: int, animator=None,
               rank: int = 0, world_size: int = 1):
    """The step's ``(lq, gt)`` for process ``rank`` of ``world_size``: ``(clips, T, 3, in, in)`` and
    ``(clips, T, 3, out, out)`` float in [0, 1], the ``rank``-th share of ``cfg.clips * world_size`` clips drawn
    in order (so the processes together see what one process with all of them sees). ``animator`` (a
    `metaportrait.pipeline.Animator`) is needed when ``cfg.generated`` > 0."""
    rng = np.random.default_rng([cfg.seed, step])
    lq, gt = [], []
    for slot in range(cfg.clips * (rank + 1)):  # the earlier processes' clips are drawn too, to advance the draw
        kept = slot >= cfg.clips * rank
        clip = clips[int(rng.integers(len(clips)))]
        window, start = sample_window(clip, cfg.frames, rng)
        # drawn only when asked, so runs without generated inputs keep the batches they always had. The other
        # processes' clips make every draw this process's would (degrade draws too) but are not rendered.
        generated = cfg.generated > 0 and rng.random() < cfg.generated
        source_index = render_source(clip, start, cfg.frames, rng) if generated else None
        if window.shape[1] != model_cfg.output_size:
            window = np.stack([cv2.resize(f, (model_cfg.output_size,) * 2, interpolation=cv2.INTER_AREA)
                               for f in window])
        flip = rng.random() < 0.5
        if generated:
            if not kept:
                continue
            low = render_window(animator, clip, start, cfg.frames, model_cfg.input_size, source_index)
        else:
            low = degrade(window[:, :, ::-1] if flip else window, model_cfg.input_size, rng, cfg.clean, cfg.shift)
        if kept:
            lq.append(low[:, :, ::-1] if generated and flip else low)
            gt.append(window[:, :, ::-1] if flip else window)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(np.stack(a))).permute(0, 1, 4, 2, 3).float() / 255  # noqa: E731
    return as_tensor(lq), as_tensor(gt)


def split_clips(data_dir: Path, val_identities: tuple[str, ...]) -> tuple[list[PreparedClip], list[PreparedClip]]:
    dataset = PreparedDataset(data_dir)
    held_out = set(val_identities)
    train = [c for c in dataset if c.identity not in held_out and len(c.usable_frames)]
    val = [c for c in dataset if c.identity in held_out and len(c.usable_frames)]
    if not train:
        raise InputError(data_dir, "no training clip left after holding out the validation identities")
    return train, val


# ----------------------------------------------------------------------------------------------------------------
# The loop


def train_sr(cfg: SRTrainConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = False) -> dict:
    """Train (or, with ``resume``, continue) a run in ``out_dir``; returns the last log record."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    checkpoint_path = out_dir / "checkpoint.pt"
    if resume:
        if not checkpoint_path.is_file():
            raise InputError(checkpoint_path, "not found: there is no run to resume here")
        saved = SRTrainConfig.from_dict(json.loads((out_dir / "train_config.json").read_text()))
        changed = {k for k in cfg.to_dict() if getattr(cfg, k) != getattr(saved, k)} - set(RESUMABLE_CHANGES)
        if changed:
            raise InputError(out_dir, f"--resume cannot change {sorted(changed)} of the saved run")
    elif (out_dir / "train_config.json").exists():
        raise InputError(out_dir, "already holds a training run; pass --resume to continue it or choose a new folder")
    procs = start_processes()
    if procs.is_main and out_dir.is_dir():
        remove_temporaries(out_dir)  # left by a run killed while writing its checkpoint (SIGKILL, power cut)
    if procs.distributed:
        dist.barrier()  # every process has checked the run folder before process 0 writes into it
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    cv2.setNumThreads(1)
    model_cfg = cfg.model_config()
    train_clips, val_clips = split_clips(data_dir, cfg.val_identities)

    torch.manual_seed(cfg.seed)
    model = initial_model(cfg, model_cfg)
    averaged = TemporalSR(model_cfg)
    averaged.load_state_dict(model.state_dict())
    averaged.requires_grad_(False).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    perceptual = PerceptualPyramidLoss(MobileNetV2Features(), scales=(1.0, 0.5), layer_weights=(1.0,) * 5)
    critic = MultiScaleDiscriminator(SR_CRITIC) if cfg.gan > 0 else None
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, betas=(0.5, 0.999)) if critic else None
    animator = None
    if cfg.generated > 0:
        from metaportrait.pipeline import Animator  # the whole inference pipeline, only for generated inputs

        animator = Animator.from_pretrained(cfg.generator)
    start_step = 0
    if resume:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        averaged.load_state_dict(state["averaged"])
        optimizer.load_state_dict(state["optimizer"])
        if critic is not None:
            critic.load_state_dict(state["critic"])
            critic_optimizer.load_state_dict(state["critic_optimizer"])
        start_step = state["step"]
        if saved.ema_decay != cfg.ema_decay:  # a new decay restarts the average from the current weights
            averaged.load_state_dict(model.state_dict())
    if procs.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        for name in ("log.jsonl", "val.jsonl"):
            truncate_jsonl(out_dir / name, start_step)
    val_batches = [make_batch(val_clips, cfg.replace(clips=1, seed=10_000 + i), model_cfg, 0, animator)
                   for i in range(4)] if val_clips and procs.is_main else []

    sums: dict[str, float] = {}
    count, last_time, record = 0, time.time(), {}
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            lq, gt = make_batch(train_clips, cfg, model_cfg, step, animator, procs.rank, procs.world_size)
            for group in optimizer.param_groups:  # the schedule is a function of the step: exact on --resume
                group["lr"] = learning_rate(cfg, step)
            model.train()
            results = [model(clip, return_rgb=cfg.pyramid > 0) for clip in lq]  # each clip is one temporal window
            out = torch.stack([r[0] for r in results]) if cfg.pyramid > 0 else torch.stack(results)
            losses = sr_losses(out, gt, cfg, perceptual, step, critic)
            if cfg.pyramid > 0:
                losses["pyramid"] = pyramid_loss([r[1] for r in results], gt)
            weights = {"l1": cfg.l1, "edge": cfg.edge, "perceptual": cfg.perceptual, "temporal": cfg.temporal,
                       "pyramid": cfg.pyramid, "gan": cfg.gan}
            total = sum(weights[k] * v for k, v in losses.items())
            optimizer.zero_grad(set_to_none=True)
            if not finite_on_every_rank(total, procs.distributed):  # skip the step everywhere, keep the weights
                losses["grad_norm"] = total.detach() * 0
            else:
                total.backward()
                average_gradients(model.parameters(), procs.world_size)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                losses["grad_norm"] = norm
                if torch.isfinite(norm):  # the same on every process: the gradients are averaged
                    optimizer.step()
            if critic is not None:
                losses["critic"] = critic_step(critic, critic_optimizer, out.detach(), gt, cfg, step,
                                               procs.world_size)
            _update_average(averaged, model, cfg.ema_decay)
            for k, v in {**losses, "total": total}.items():  # "critic" is logged, not part of the total
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            count += 1
            if not procs.is_main:
                continue
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.time()
                record = {"step": step, **{k: v / count for k, v in sums.items()},
                          "seconds_per_step": (now - last_time) / count}
                append_jsonl(out_dir / "log.jsonl", record)
                print(json.dumps(record), flush=True)
                sums, count, last_time = {}, 0, now
            if val_batches and (step % cfg.val_every == 0 or step == cfg.steps):
                append_jsonl(out_dir / "val.jsonl", {"step": step, **_validate(averaged, val_batches)})
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                state = {"model": model.state_dict(), "averaged": averaged.state_dict(),
                         "optimizer": optimizer.state_dict(), "step": step}
                if critic is not None:
                    state |= {"critic": critic.state_dict(), "critic_optimizer": critic_optimizer.state_dict()}
                save_run(out_dir, state, averaged, cfg, data_dir)
    finally:
        torch.set_num_threads(previous_threads)
    stop_processes(procs)
    return record


def save_run(out_dir: Path, state: dict, averaged: TemporalSR, cfg: SRTrainConfig, data_dir: Path) -> None:
    """Write ``checkpoint.pt`` (``state``) and export the averaged network to ``model/``, both atomically."""
    with atomic_path(out_dir / "checkpoint.pt") as tmp:
        torch.save(state, tmp)
    export_model(out_dir / "model", averaged, averaged.cfg,
                 {"step": state["step"], "data": str(data_dir), "val_identities": list(cfg.val_identities)},
                 save=save_sr_model)


def step_patch(frames: torch.Tensor, cfg: SRTrainConfig, step: int) -> torch.Tensor:
    """``(clips, T, 3, S, S)`` -> ``(clips * T, 3, crop, crop)``: the step's random patch of every frame (the same
    place in each, drawn from the step's seed, so exact on --resume); the whole frames when ``crop`` is 0."""
    frames = frames.flatten(0, 1)
    size = frames.shape[-1]
    if not 0 < cfg.crop < size:
        return frames
    y, x = (int(v) for v in np.random.default_rng([cfg.seed, step, 1]).integers(0, size - cfg.crop + 1, 2))
    return frames[..., y:y + cfg.crop, x:x + cfg.crop]


def sr_losses(out: torch.Tensor, gt: torch.Tensor, cfg: SRTrainConfig, perceptual, step: int,
              critic: MultiScaleDiscriminator | None = None) -> dict:
    """The step's loss terms for outputs and ground truth ``(clips, T, 3, S, S)`` in [0, 1] (weights not
    applied). The perceptual and adversarial terms see the step's patch (`step_patch`)."""
    losses = {"l1": (out - gt).abs().mean()}
    if cfg.edge > 0:
        losses["edge"] = sum((out.diff(dim=d) - gt.diff(dim=d)).abs().mean() for d in (-1, -2))
    patch_out, patch_gt = step_patch(out, cfg, step), step_patch(gt, cfg, step)
    losses["perceptual"] = perceptual(patch_out, patch_gt)
    if cfg.temporal > 0 and out.shape[1] > 1:
        losses["temporal"] = ((out[:, 1:] - out[:, :-1]) - (gt[:, 1:] - gt[:, :-1])).abs().mean()
    if critic is not None:
        critic.requires_grad_(False)  # the generator's term must not move the critic
        with torch.no_grad():
            real_scales = critic(patch_gt)
        losses["gan"] = generator_adversarial(critic(patch_out), real_scales)[0]
        critic.requires_grad_(True)
    return losses


def critic_step(critic: MultiScaleDiscriminator, optimizer: torch.optim.Optimizer, out: torch.Tensor,
                gt: torch.Tensor, cfg: SRTrainConfig, step: int, world_size: int = 1) -> torch.Tensor:
    """One LSGAN update of the patch critic on the step's patch of the (detached) output and the ground truth,
    its gradients averaged over the processes; returns its loss. A non-finite loss on any process skips it."""
    loss = critic_loss(critic(step_patch(gt, cfg, step)), critic(step_patch(out, cfg, step)))
    optimizer.zero_grad(set_to_none=True)
    if finite_on_every_rank(loss, world_size > 1):
        loss.backward()
        average_gradients(critic.parameters(), world_size)
        optimizer.step()
    return loss.detach()


def initial_model(cfg: SRTrainConfig, model_cfg: SRConfig) -> TemporalSR:
    """The network a run starts from: ``cfg.init``'s weights (a fine-tune), or the preset from scratch with its
    RGB heads re-drawn (`init_rgb_heads`).

    Raises:
        InputError: ``init`` is not an SR model of ``cfg.preset``'s shape.
    """
    model = TemporalSR(model_cfg)
    if cfg.init is None:
        init_rgb_heads(model, cfg.rgb_init, torch.Generator().manual_seed(cfg.seed))
        return model
    path = sr_weights(cfg.init)
    loaded = load_sr(path)
    if loaded.cfg != model_cfg:
        raise InputError(path, f"is not a {cfg.preset!r} SR model (its config differs from the preset's)")
    model.load_state_dict(loaded.state_dict())
    return model


def pyramid_loss(rgbs: list[list[torch.Tensor]], gt: torch.Tensor) -> torch.Tensor:
    """Mean over levels of the L1 between the U-Net's RGB outputs (per clip, per level, ``(T, 3, s, s)`` in
    [-1, 1]) and the ground truth ``(clips, T, 3, S, S)`` in [0, 1] resized to each level."""
    terms = []
    for clip_rgbs, clip_gt in zip(rgbs, gt):
        for rgb in clip_rgbs:
            size = rgb.shape[-1]
            target = F.interpolate(clip_gt * 2 - 1, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=True) if size != clip_gt.shape[-1] else clip_gt * 2 - 1
            terms.append((rgb - target).abs().mean())
    return torch.stack(terms).mean()


@torch.no_grad()
def _validate(model: TemporalSR, batches) -> dict[str, float]:
    """Mean PSNR (dB) over the validation windows: the network and the plain upsampling it starts from."""
    def psnr(a, b):
        return float(-10 * torch.log10(((a - b) ** 2).mean().clamp_min(1e-10)))

    ours, plain = [], []
    for lq, gt in batches:
        out = model(lq[0])
        up = upsample(lq[0], model.cfg).clamp(0, 1)
        ours.append(psnr(out, gt[0]))
        plain.append(psnr(up, gt[0]))
    return {"psnr": float(np.mean(ours)), "psnr_upsampled": float(np.mean(plain))}


def read_val_identities(value: str | None) -> tuple[str, ...]:
    return parse_identities(value) if value else ()
