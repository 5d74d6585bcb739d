"""Base-model training (MetaPortrait §3.1): stage ``warp`` trains the warping network W on the warped source image;
stage ``full`` trains W and the refinement network R together with a discriminator (and a mouth critic on mouth
crops when ``loss.mouth_gan`` > 0).

`train_base` reads top to bottom, each part a helper defined below it in the same order: set-up (processes,
threads, run-folder checks, seeds), data, networks and optimisers (`_build_run`: a `_Run` holds them with the AMP
scaler, the averaged generator and the step counters), resume or init, then the loop. One step of the loop: the
generator's loss on the batch (`metaportrait.train.losses.GeneratorLoss`, which meta-learning and personalisation
call too), the generator's update and its moving average (`_generator_step`), the critics' updates
(`_critic_steps`: the multi-scale discriminator, and the mouth critic); then, when due, the interval's log line,
samples, validation (keeping the best generator) and the checkpoint.

It runs as a single process, or as several under ``torchrun`` (``python -m torch.distributed.run --nproc_per_node N``): every
process draws its own pairs, gradients are averaged with an explicit all-reduce (no DDP wrapper: the warp stage
leaves R's parameters unused, and two optimisers are easier to follow this way), and only rank 0 writes files.

Run directory (``out_dir``):

``train_config.json``   the `TrainConfig` (``--resume`` rebuilds the run from it)
``log.jsonl``           one line per ``log_every`` steps: step, losses (mean over the interval and the ranks),
                        gradient norms, lr, s/step
``val.jsonl``           one line per validation: step, PSNR, L1, face-region L1 (on held-out identities)
``checkpoint.pt``       training state (networks, optimisers, step, RNG states), tensors and primitives only,
                        so ``torch.load(..., weights_only=True)`` reads it; written atomically
``model/``              the latest generator, `metaportrait.io.checkpoint.save_model` format (what inference loads)
``best/``               the generator with the best validation PSNR, same format
``samples/step_*.png``  rows of source | driving landmarks | warped | output (stage full) | driving frame

With ``ema_decay`` > 0 the generator that is validated and written to ``model/`` and ``best/`` is an exponential
moving average of the trained weights (Polyak averaging, as StyleGAN / FOMM-style repos ship): small CPU batches
make single-step weights noisy, and the average of the last ~1 / (1 - ema_decay) steps is what gets used
(measured on the lite model: no gain when the learning rate already decays at the end, docs/experiments.md).

Exact resume: training pairs are a function of the step (`metaportrait.data.pairs.StepSampler`), the lr schedule
of the step, and nothing in the networks draws random numbers, so on CPU with ``num_workers=0`` a run resumed
at step n ends with the same weights as an uninterrupted run (tests/test_train.py checks it).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from metaportrait.config import ModelConfig
from metaportrait.data.dataset import PreparedDataset, split_by_identity
from metaportrait.data.drawing import MEDIAPIPE_TOPOLOGIES
from metaportrait.data.pairs import FixedPairs, PairOptions, RandomPairs, StepSampler
from metaportrait.errors import InputError
from metaportrait.eval.metrics import face_region_l1, l1, psnr
from metaportrait.io.atomic import atomic_path, remove_temporaries, write_text_atomic
from metaportrait.io.checkpoint import load_config, load_model, save_model
from metaportrait.io.image import to_uint8_frames, write_image
from metaportrait.losses.perceptual import MobileNetV2Features, VGG19Features
from metaportrait.models.discriminator import MouthDiscriminator, MultiScaleDiscriminator
from metaportrait.models.generator import Generator
from metaportrait.models.identity import EMBEDDING_DIM, IdentityEncoder
from metaportrait.train.config import TrainConfig
from metaportrait.train.losses import GeneratorLoss, GeneratorTerms, critic_loss

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
# Settings a resumed run may change: its length and schedule, the open-mouth and closed-eye sampling (continuing
# a run on more open mouths or blinks) and bookkeeping.
RESUMABLE_CHANGES = (
    "steps", "lr_milestones", "open_mouth_weight", "closed_eye_weight",
    "num_workers", "threads", "log_every", "sample_every", "checkpoint_every", "val_every",
)
MAX_SKIPPED_STEPS = 10  # consecutive steps with a non-finite loss before training stops
SAMPLE_ROWS = 4


@dataclass
class TrainResult:
    """What `train_base` returns."""

    step: int  # last step trained
    best_psnr: float  # best validation PSNR in dB (nan without validation)
    log: dict  # the last log.jsonl record
    generator: Generator  # the generator written to model/: the trained one, or its average with ema_decay > 0


def train_base(
    cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = False, progress: bool = True
) -> TrainResult:
    """Train the base generator of preset ``cfg.preset`` on a prepared dataset.

    Args:
        cfg: training settings (see `metaportrait.train.config`).
        data_dir: a `metaportrait prepare` output folder.
        out_dir: the run folder (created; see the module docstring for its content).
        resume: continue the run in ``out_dir`` from its ``checkpoint.pt`` up to ``cfg.steps``. ``cfg`` must
            equal the run's ``train_config.json`` except for `RESUMABLE_CHANGES`.
        progress: show a tqdm bar (rank 0 only).

    Returns:
        the step reached, the best validation PSNR, the last log record and the generator written to
        ``model/`` (the trained one, or its moving average with ``ema_decay`` > 0).

    Raises:
        InputError: bad data folder, a run folder that already holds a run (without ``resume``) or none (with it),
            or an ``init`` run whose model does not match.
    """
    # Set-up: processes, threads, settings and run-folder checks, seeds.
    procs = start_processes()
    previous_threads = torch.get_num_threads()  # restored at the end: callers (tests) share the process
    torch.set_num_threads(cfg.threads)
    model_cfg = cfg.model_config()
    out_dir = Path(out_dir)
    resume = _check_run(cfg, model_cfg, out_dir, resume)  # False when killed before its first checkpoint
    _seed(cfg.seed)  # the same on every rank: all ranks build identical initial networks

    # Data, networks, optimisers; resume or start; output files.
    train_pairs, val_pairs = _data(cfg, model_cfg, data_dir, procs.is_main)
    run = _build_run(cfg, model_cfg, procs.device)
    _resume_or_init(run, cfg, model_cfg, out_dir / "checkpoint.pt" if resume else None, procs.distributed)
    if procs.is_main:
        _prepare_run_folder(out_dir, cfg, run.step)
    loader = _loader(train_pairs, cfg, run.step, procs)

    # Training loop: per step the generator's update, then the critics'; then the log, samples, validation and
    # checkpoint when due (rank 0 writes; the other ranks go on to the next all-reduce and wait).
    if procs.is_main and val_pairs is not None and run.step == 0:
        _validate_and_keep_best(run, val_pairs, cfg, model_cfg, procs.device, out_dir)  # the untrained model
    interval, last_logged = _Interval(), {}
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not (procs.is_main and progress), desc=f"train {cfg.stage}")
    tick = time.perf_counter()
    for batch in loader:
        batch = {k: v.to(procs.device, non_blocking=True) for k, v in batch.items()}
        _set_learning_rates(run, cfg)
        with _autocast(cfg, procs.device):
            result = run.generator_loss(run.generator, batch)
        if finite_on_every_rank(result.total, procs.distributed):
            run.skipped_in_a_row = 0
            losses = _generator_step(run, result, cfg, procs.world_size)
            losses |= _critic_steps(run, result, batch["driving"], cfg, procs)
            run.scaler.update()
            interval.add(losses)
        else:
            _skip_step(run, interval)
        run.step += 1
        interval.steps += 1
        interval.seconds += time.perf_counter() - tick
        bar.update(1)

        if _due(run.step, cfg.log_every, cfg.steps):
            last_logged = _log_interval(interval, run, procs, out_dir, bar)
            interval = _Interval()
        if procs.is_main and _due(run.step, cfg.sample_every, cfg.steps):
            _write_samples(out_dir / "samples", run.step, batch, result.out, cfg.stage)
        if procs.is_main and val_pairs is not None and _due(run.step, cfg.val_every, cfg.steps):
            _validate_and_keep_best(run, val_pairs, cfg, model_cfg, procs.device, out_dir)
        if procs.is_main and _due(run.step, cfg.checkpoint_every, cfg.steps):
            _save_checkpoint(run, cfg, model_cfg, out_dir)
        tick = time.perf_counter()
    bar.close()

    # Done.
    torch.set_num_threads(previous_threads)
    stop_processes(procs)
    best_psnr = run.best_psnr if run.best_psnr > -math.inf else math.nan
    return TrainResult(run.step, best_psnr, last_logged, run.averaged)


# ----------------------------------------------------------------------------------------------------------------
# The run's state.


@dataclass
class Processes:
    """This process under torchrun (which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), or
    alone (rank 0 of 1)."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this call initialised the process group, and destroys it at the end

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class _Run:
    """What the loop works on: the networks (trained and frozen), the generator's loss, the optimisers, the AMP
    scaler and the counters. `_save_checkpoint` writes the trained part."""

    generator: Generator
    averaged: Generator  # what is validated and saved: the moving average with ema_decay > 0, else `generator`
    discriminator: MultiScaleDiscriminator | None  # stage full
    mouth_critic: MouthDiscriminator | None  # stage full with loss.mouth_gan > 0
    identity_encoder: IdentityEncoder | None  # frozen; stage full with an identity input or loss
    generator_loss: GeneratorLoss
    optimizer_g: torch.optim.Adam  # two parameter groups: refine at lr, warp at lr * warp_lr_scale
    optimizer_d: torch.optim.Adam | None
    optimizer_m: torch.optim.Adam | None
    scaler: torch.amp.GradScaler  # one scaler for G and the critics, as the official code
    step: int = 0  # steps done
    best_psnr: float = -math.inf  # best validation PSNR so far
    skipped_in_a_row: int = 0  # consecutive steps skipped for a non-finite loss


@dataclass
class _Interval:
    """Loss sums since the last log line."""

    sums: dict[str, float] = dataclasses.field(default_factory=dict)  # loss name -> sum over the steps
    steps: int = 0
    seconds: float = 0.0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.detach())


# ----------------------------------------------------------------------------------------------------------------
# Set-up, data, networks, optimisers, resume.


def start_processes() -> Processes:
    """Read torchrun's environment and join the process group (gloo on CPU, nccl on CUDA) if not joined yet."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world_size, device, owns_group)


def stop_processes(procs: Processes) -> None:
    if procs.distributed:
        dist.barrier()
        if procs.owns_group:
            dist.destroy_process_group()


def _check_run(cfg: TrainConfig, model_cfg: ModelConfig, out_dir: Path, resume: bool) -> bool:
    """Refuse a preset that cannot train on prepared data, and a run folder that does not fit ``resume``; remove
    temporary files a killed run left. Returns whether to resume (False for a run killed before its first
    checkpoint: it starts again)."""
    if model_cfg.landmark_topology not in MEDIAPIPE_TOPOLOGIES:
        raise ValueError(
            f"preset {cfg.preset!r} draws {model_cfg.landmark_topology!r} landmark lines, but prepared datasets hold "
            f"MediaPipe landmarks; train a preset with one of {MEDIAPIPE_TOPOLOGIES}"
        )
    checkpoint_path = out_dir / "checkpoint.pt"
    if resume and not checkpoint_path.is_file():
        if not (out_dir / "train_config.json").is_file():
            raise InputError(checkpoint_path, "not found: there is no run to resume here")
        # The run was stopped before its first checkpoint: there is nothing to continue, so it starts again.
        logger.warning("%s: no checkpoint yet; the run starts again from step 0", out_dir)
        resume = False
    elif not resume and (out_dir / "train_config.json").exists():
        raise InputError(out_dir, "already holds a training run; pass --resume to continue it or choose a new folder")
    if out_dir.is_dir() and int(os.environ.get("RANK", "0")) == 0:
        for folder in (out_dir, out_dir / "samples"):  # left by a run killed while writing (SIGKILL, power cut)
            remove_temporaries(folder)
    return resume


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _data(
    cfg: TrainConfig, model_cfg: ModelConfig, data_dir: str | Path, is_main: bool
) -> tuple[RandomPairs, FixedPairs | None]:
    """Identity-disjoint train / validation split: random training pairs, fixed validation pairs (None without
    validation identities)."""
    dataset = PreparedDataset(data_dir)
    train_clips, val_clips = split_by_identity(dataset, cfg.val_identities)
    pair_options = PairOptions.for_model(model_cfg, cfg.size)
    train_pairs = RandomPairs(
        train_clips, pair_options, cfg.augment, cfg.seed, cfg.clip_weighting, open_mouth_weight=cfg.open_mouth_weight,
        closed_eye_weight=cfg.closed_eye_weight,
    )
    val_pairs = FixedPairs(val_clips[: cfg.val_max_clips], pair_options, cfg.val_pairs_per_clip) if val_clips else None
    if is_main:
        logger.info(
            "data: %d training clips (%d identities), %s validation pairs",
            len(train_pairs.clips), len({c.identity for c in train_pairs.clips}),
            len(val_pairs) if val_pairs else "no",
        )  # fmt: skip
    return train_pairs, val_pairs


def _build_run(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> _Run:
    """Networks (G trained; D and the mouth critic in stage full; frozen perceptual backbone and identity encoder),
    the generator's loss and the optimisers, at step 0 and without an averaged generator yet."""
    full = cfg.stage == "full"
    generator = Generator(model_cfg).to(device).train()
    discriminator = MultiScaleDiscriminator(model_cfg.discriminator).to(device).train() if full else None
    mouth_critic = MouthDiscriminator().to(device).train() if full and cfg.loss.mouth_gan > 0 else None
    if cfg.perceptual_backbone == "mobilenet_v2":
        backbone = MobileNetV2Features().to(device)
    else:
        backbone = VGG19Features(cfg.vgg19_weights).to(device)
    needs_identity = full and (model_cfg.use_identity or cfg.loss.identity > 0)
    if needs_identity and model_cfg.use_identity and model_cfg.identity_dim != EMBEDDING_DIM:
        raise ValueError(
            f"preset {cfg.preset!r} takes {model_cfg.identity_dim}-d identities; our encoder gives {EMBEDDING_DIM}-d"
        )
    identity_encoder = IdentityEncoder.from_dlib().to(device) if needs_identity else None
    generator_loss = GeneratorLoss(
        cfg.loss, model_cfg, cfg.stage, cfg.size, backbone, identity_encoder, discriminator, mouth_critic,
        cfg.mouth_critic_region,
    )  # fmt: skip
    optimizer_g, optimizer_d, optimizer_m = _optimisers(cfg, generator, discriminator, mouth_critic)
    scaler = torch.amp.GradScaler("cuda", enabled=_use_amp(cfg, device))
    return _Run(
        generator, generator, discriminator, mouth_critic, identity_encoder, generator_loss, optimizer_g, optimizer_d,
        optimizer_m, scaler,
    )  # fmt: skip


def _optimisers(
    cfg: TrainConfig,
    generator: Generator,
    discriminator: MultiScaleDiscriminator | None,
    mouth_critic: MouthDiscriminator | None,
) -> tuple[torch.optim.Adam, torch.optim.Adam | None, torch.optim.Adam | None]:
    """Adam for G with two parameter groups (refine at lr, warp at lr * warp_lr_scale), and one for each critic.
    Each group keeps its ``base_lr`` for the schedule (`_set_learning_rates`)."""
    warp_params, refine_params = list(generator.warp_parameters()), list(generator.refine_parameters())
    if {id(p) for p in warp_params} | {id(p) for p in refine_params} != {id(p) for p in generator.parameters()}:
        raise RuntimeError("warp_parameters() and refine_parameters() must cover all generator parameters")
    optimizer_g = torch.optim.Adam(
        [
            {"params": refine_params, "lr": cfg.lr, "base_lr": cfg.lr},
            {"params": warp_params, "lr": cfg.lr * cfg.warp_lr_scale, "base_lr": cfg.lr * cfg.warp_lr_scale},
        ],
        betas=cfg.betas,
    )
    return optimizer_g, _critic_optimiser(cfg, discriminator), _critic_optimiser(cfg, mouth_critic)


def _critic_optimiser(cfg: TrainConfig, critic: torch.nn.Module | None) -> torch.optim.Adam | None:
    if critic is None:
        return None
    return torch.optim.Adam(
        [{"params": list(critic.parameters()), "lr": cfg.lr_discriminator, "base_lr": cfg.lr_discriminator}],
        betas=cfg.betas,
    )


def _resume_or_init(
    run: _Run, cfg: TrainConfig, model_cfg: ModelConfig, checkpoint_path: Path | None, distributed: bool
) -> None:
    """Load the checkpoint at ``checkpoint_path`` (resume), or the ``init`` networks (stage full: a warp-stage run's
    warp network, or more); then give every rank rank 0's weights and start the averaged generator."""
    state = None
    if checkpoint_path is not None:
        try:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch.load raises many types on damaged or foreign files
            raise InputError(checkpoint_path, f"cannot read the training state ({type(error).__name__}: "
                                              f"{str(error).splitlines()[0] if str(error) else 'damaged'})") from None
        version = state.get("version") if isinstance(state, dict) else None
        if version != CHECKPOINT_VERSION:
            raise InputError(checkpoint_path, f"format version {version}, expected {CHECKPOINT_VERSION}")
        saved = TrainConfig.from_dict(state["train_config"])
        changed = [k for k, v in cfg.to_dict().items() if saved.to_dict()[k] != v and k not in RESUMABLE_CHANGES]
        if changed:
            raise InputError(checkpoint_path, f"settings differ from the run's: {changed} (only {RESUMABLE_CHANGES})")
        run.generator.load_state_dict(state["generator"])
        run.optimizer_g.load_state_dict(state["optimizer_generator"])
        if run.discriminator is not None:
            run.discriminator.load_state_dict(state["discriminator"])
            run.optimizer_d.load_state_dict(state["optimizer_discriminator"])
        if run.mouth_critic is not None:
            run.mouth_critic.load_state_dict(state["mouth_discriminator"])
            run.optimizer_m.load_state_dict(state["optimizer_mouth_discriminator"])
        run.scaler.load_state_dict(state["scaler"])
        run.step, run.best_psnr = int(state["step"]), float(state["best_psnr"])
        _set_rng_state(state["rng"])
    elif cfg.init is not None:
        # The warping network, as the official Full stage (the warp stage never trains R); or all of G; or R from
        # another model.
        _load_init(run.generator, model_cfg, Path(cfg.init), "all" if cfg.init_refine else "warp")
        if cfg.init_refine_from is not None:
            _load_init(run.generator, model_cfg, Path(cfg.init_refine_from), "refine")
    if distributed:
        # Identical start on every rank whatever happened above (rank 0 is the reference).
        for module in (run.generator, run.discriminator, run.mouth_critic):
            if module is not None:
                for tensor in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(tensor.data, src=0)
    # The averaged generator (ema_decay > 0) starts from the starting weights; it is what gets validated and saved.
    if cfg.ema_decay > 0:
        run.averaged = copy.deepcopy(run.generator).requires_grad_(False)
        if state is not None:
            run.averaged.load_state_dict(state["averaged_generator"])


def _prepare_run_folder(out_dir: Path, cfg: TrainConfig, step: int) -> None:
    """Write the config; cut the logs back to ``step`` (the checkpoint's, when resuming)."""
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    for name in ("log.jsonl", "val.jsonl"):
        truncate_jsonl(out_dir / name, step)


def _loader(pairs: RandomPairs, cfg: TrainConfig, step: int, procs: Processes) -> DataLoader:
    """This rank's training batches from ``step`` to ``cfg.steps``, one per step (`StepSampler`)."""
    return DataLoader(
        pairs,
        batch_size=cfg.batch_size,
        sampler=StepSampler(step, cfg.steps, cfg.batch_size, procs.rank, procs.world_size),
        num_workers=cfg.num_workers,
        worker_init_fn=_worker_init,
        persistent_workers=False,
    )


# ----------------------------------------------------------------------------------------------------------------
# One step.


def _use_amp(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.amp and device.type == "cuda"  # float16 autocast is a CUDA feature; CPU stays float32


def _autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.float16, enabled=_use_amp(cfg, device))


def _set_learning_rates(run: _Run, cfg: TrainConfig) -> None:
    """The learning rates of this step (official: MultiStepLR x lr_decay at each milestone)."""
    decay = cfg.lr_decay ** sum(run.step >= m for m in cfg.lr_milestones)
    for optimizer in (run.optimizer_g, run.optimizer_d, run.optimizer_m):
        for group in optimizer.param_groups if optimizer is not None else ():
            group["lr"] = group["base_lr"] * decay
    if run.step < cfg.freeze_refine_steps:
        run.optimizer_g.param_groups[0]["lr"] = 0.0  # R frozen (Adam with lr 0 leaves the weights exactly as they are)


def finite_on_every_rank(total: torch.Tensor, distributed: bool) -> bool:
    """Whether the loss is finite on every rank (if not, every rank skips the step)."""
    finite = torch.tensor(float(torch.isfinite(total.detach()).item()))
    if distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.item() >= 1


def _skip_step(run: _Run, interval: _Interval) -> None:
    """Count a step skipped for a non-finite loss; fail after `MAX_SKIPPED_STEPS` in a row."""
    run.skipped_in_a_row += 1
    interval.sums["skipped"] = interval.sums.get("skipped", 0.0) + 1.0
    if run.skipped_in_a_row >= MAX_SKIPPED_STEPS:
        raise FloatingPointError(f"step {run.step}: non-finite loss {MAX_SKIPPED_STEPS} steps in a row")
    run.optimizer_g.zero_grad(set_to_none=True)


def _generator_step(run: _Run, result: GeneratorTerms, cfg: TrainConfig, world_size: int) -> dict[str, torch.Tensor]:
    """Update G on its total loss and the averaged generator; returns the loss terms, their total and G's gradient
    norm."""
    run.optimizer_g.zero_grad(set_to_none=True)
    run.scaler.scale(result.total).backward()
    run.scaler.unscale_(run.optimizer_g)
    losses = dict(result.terms)
    losses["grad_norm_g"] = _finish_gradients(run.generator.parameters(), cfg, world_size)
    run.scaler.step(run.optimizer_g)
    if run.averaged is not run.generator:
        # Warm-up (as TensorFlow's ExponentialMovingAverage): early steps weigh more than ema_decay allows.
        _update_average(run.averaged, run.generator, min(cfg.ema_decay, (1 + run.step) / (10 + run.step)))
    losses["total_g"] = result.total
    return losses


def _critic_steps(
    run: _Run, result: GeneratorTerms, driving: torch.Tensor, cfg: TrainConfig, procs: Processes
) -> dict[str, torch.Tensor]:
    """Stage full: update D (LSGAN on the driving frame vs the detached output) and the mouth critic (the same on
    mouth crops); returns their losses and gradient norms."""
    losses = {}
    if run.discriminator is not None and cfg.loss.gan > 0:
        with _autocast(cfg, procs.device):
            real_scales = run.discriminator(driving)
            fake_scales = run.discriminator(result.prediction.detach())
            total_d = cfg.loss.gan * critic_loss(real_scales, fake_scales)
        norm = _critic_step(total_d, run.optimizer_d, run.discriminator, run.scaler, cfg, procs.world_size)
        losses["grad_norm_d"], losses["gan_d"] = norm, total_d
    if run.mouth_critic is not None:
        mouth = result.mouth
        with _autocast(cfg, procs.device):
            real_scales = [run.mouth_critic(mouth.real, mouth.lines)]
            fake_scales = [run.mouth_critic(mouth.fake.detach(), mouth.lines)]
            total_m = cfg.loss.mouth_gan * critic_loss(real_scales, fake_scales, mouth.region)
        norm = _critic_step(total_m, run.optimizer_m, run.mouth_critic, run.scaler, cfg, procs.world_size)
        losses["grad_norm_mouth_d"], losses["mouth_gan_d"] = norm, total_m
    return losses


# ----------------------------------------------------------------------------------------------------------------
# Log, samples, validation, checkpoint.


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def _log_interval(interval: _Interval, run: _Run, procs: Processes, out_dir: Path, bar: tqdm) -> dict:
    """The log record of the interval (losses: means over its steps and over the ranks; skipped steps: their
    count); rank 0 appends it to log.jsonl. Returns the record."""
    names = sorted(interval.sums)
    totals = torch.tensor([interval.sums[n] for n in names] + [interval.seconds], dtype=torch.float64)
    if procs.distributed:
        dist.all_reduce(totals)
        totals /= procs.world_size
    means = {n: totals[i].item() / interval.steps for i, n in enumerate(names) if n != "skipped"}
    if "skipped" in interval.sums:
        means["skipped"] = totals[names.index("skipped")].item()
    record = {
        "step": run.step,
        **{k: round(v, 6) for k, v in means.items()},
        "lr": run.optimizer_g.param_groups[0]["lr"],
        "lr_warp": run.optimizer_g.param_groups[1]["lr"],
        "s_per_step": round(totals[-1].item() / interval.steps, 4),
        "world_size": procs.world_size,
    }
    if procs.is_main:
        append_jsonl(out_dir / "log.jsonl", record)
        bar.set_postfix(loss=f"{means.get('total_g', float('nan')):.3f}", s_step=record["s_per_step"])
    return record


def _write_samples(folder: Path, step: int, batch: dict, out: dict, stage: str) -> None:
    """One row per pair: source | driving landmarks | warped | output (stage full) | driving frame."""
    columns = [batch["source"], batch["driving_lines"], out["warped"]]
    columns += ([out["output"]] if stage == "full" else []) + [batch["driving"]]
    grid = torch.cat([c[:SAMPLE_ROWS].detach().float().clamp(0, 1) for c in columns], dim=3)  # (n, 3, h, k*w)
    grid = torch.cat(list(grid), dim=1)  # (3, n*h, k*w): one row per pair
    write_image(folder / f"step_{step:07d}.png", to_uint8_frames(grid[None])[0])


def _validate_and_keep_best(
    run: _Run, pairs: FixedPairs, cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device, out_dir: Path
) -> None:
    """Validate the averaged generator, append the numbers to val.jsonl, and export it to best/ if its PSNR is the
    best so far. At step 0 (the untrained model, which is the best so far) also the training-free baselines."""
    first = run.step == 0
    metrics = _validate(run.averaged, pairs, run.identity_encoder, cfg, model_cfg, device, baselines=first)
    improved = first or metrics["psnr"] > run.best_psnr
    run.best_psnr = metrics["psnr"] if first else max(run.best_psnr, metrics["psnr"])
    append_jsonl(out_dir / "val.jsonl", {"step": run.step, **metrics, "best": improved})
    if improved:
        export_model(out_dir / "best", run.averaged, model_cfg, {"step": run.step, "stage": cfg.stage, **metrics})


def _save_checkpoint(run: _Run, cfg: TrainConfig, model_cfg: ModelConfig, out_dir: Path) -> None:
    """Write checkpoint.pt (atomically) and the generator to model/."""
    state = {
        "version": CHECKPOINT_VERSION,
        "step": run.step,
        "best_psnr": run.best_psnr,
        "train_config": cfg.to_dict(),
        "model_config": model_cfg.to_dict(),
        "generator": run.generator.state_dict(),
        "optimizer_generator": run.optimizer_g.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": _get_rng_state(),
    }
    if run.averaged is not run.generator:
        state["averaged_generator"] = run.averaged.state_dict()
    if run.discriminator is not None:
        state["discriminator"] = run.discriminator.state_dict()
        state["optimizer_discriminator"] = run.optimizer_d.state_dict()
    if run.mouth_critic is not None:
        state["mouth_discriminator"] = run.mouth_critic.state_dict()
        state["optimizer_mouth_discriminator"] = run.optimizer_m.state_dict()
    with atomic_path(out_dir / "checkpoint.pt") as tmp:
        torch.save(state, tmp)
    export_model(out_dir / "model", run.averaged, model_cfg, {"step": run.step, "stage": cfg.stage})


# ----------------------------------------------------------------------------------------------------------------
# Helpers.

_WARP_MODULES = ("ladder_network", "dense_motion_network")


def _load_init(generator: Generator, model_cfg: ModelConfig, path: Path, part: str) -> None:
    """Load the ``part`` ("warp", "refine" or "all") of G from a run folder (its ``model/``) or a model folder.

    The two model configs must agree on that part; the prior masks, their mouth fill, eyelid band and fill, the prior's
    face masking, the line width,
    ``warp.subtract_source_flow`` and ``refine.smooth_upscale`` change no weights, and the identity branch lives in
    R only, so a warp run serves both sides of the identity ablation.
    A refinement trained without the mouth template or the eyelid-band input loads into one with them: their
    input weights start at zero (`_pad_condition_inputs`), so the network starts out computing what it did. So does
    one without the gain map (``refine.gain_map_grid``): its head starts at zero, a gain of 1.
    """
    if not (path / "config.json").is_file():
        path = path / "model"  # a run folder
    init_cfg, init_meta = load_config(path)  # checked before the weights are read
    add_template = model_cfg.refine.mouth_template and not init_cfg.refine.mouth_template and part != "warp"
    add_lids = model_cfg.refine.eyelid_band and not init_cfg.refine.eyelid_band and part != "warp"
    add_gain = bool(model_cfg.refine.gain_map_grid) and not init_cfg.refine.gain_map_grid and part != "warp"
    if add_template and init_cfg.refine.eyelid_band:
        raise InputError(path, "cannot add the mouth template to a model with the eyelid-band input (it comes first)")
    comparable = init_cfg.replace(
        prior_masks=model_cfg.prior_masks, prior_mouth=model_cfg.prior_mouth, prior_eyelids=model_cfg.prior_eyelids,
        prior_eyelid_fill=model_cfg.prior_eyelid_fill, prior_face_masked=model_cfg.prior_face_masked,
        line_reference_size=model_cfg.line_reference_size,
        refine=dataclasses.replace(init_cfg.refine, mouth_template=init_cfg.refine.mouth_template or add_template,
                                   eyelid_band=init_cfg.refine.eyelid_band or add_lids,
                                   smooth_upscale=model_cfg.refine.smooth_upscale,
                                   gain_map_grid=model_cfg.refine.gain_map_grid if add_gain
                                   else init_cfg.refine.gain_map_grid),
        warp=dataclasses.replace(init_cfg.warp, subtract_source_flow=model_cfg.warp.subtract_source_flow),
    )  # fmt: skip
    if part == "warp":
        comparable = comparable.replace(use_identity=model_cfg.use_identity, refine=model_cfg.refine)
    if part == "refine":
        comparable = comparable.replace(warp=model_cfg.warp)
    if comparable != model_cfg:
        raise InputError(path, "its model config differs from this run's; cannot initialise from it")
    if part != "warp" and init_meta.get("stage") != "full":
        stage = init_meta.get("stage")
        raise InputError(path, f"loading a refinement network needs a full-stage model, this one is {stage!r}")
    init_run, _ = load_model(path)

    def wanted(key: str) -> bool:
        return part == "all" or (key.split(".")[0] in _WARP_MODULES) == (part == "warp")

    weights = {k: v for k, v in init_run.state_dict().items() if wanted(k)}
    if add_template or add_lids:
        weights = _pad_condition_inputs(weights, generator.state_dict(), 2 * add_template + add_lids)
    missing, unexpected = generator.load_state_dict(weights, strict=False)
    if add_gain:  # the new head keeps its zero initialisation
        missing = [k for k in missing if not k.startswith("SPDAE_G.conv_gain.")]
    if unexpected or any(wanted(k) for k in missing):
        raise InputError(path, f"weights do not fit: missing {missing}, unexpected {unexpected}")


def _pad_condition_inputs(
    weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor], added: int
) -> dict[str, torch.Tensor]:
    """Give the convolutions that read the refinement's condition maps zero weights on the ``added`` new prior
    channels (`condition_maps` appends them last), where ``target`` (the new network) expects them."""
    padded = dict(weights)
    for key, weight in weights.items():
        want = target.get(key)
        if want is None or want.shape == weight.shape:
            continue
        if weight.dim() != 4 or want.shape[1] != weight.shape[1] + added or want.shape[0] != weight.shape[0]:
            raise ValueError(f"{key}: {tuple(weight.shape)} cannot become {tuple(want.shape)} by adding {added} inputs")
        padded[key] = torch.cat([weight, weight.new_zeros(weight.shape[0], added, *weight.shape[2:])], dim=1)
    return padded


@torch.no_grad()
def _update_average(averaged: torch.nn.Module, trained: torch.nn.Module, decay: float) -> None:
    """averaged <- decay * averaged + (1 - decay) * trained, for every parameter; buffers are copied."""
    for mean, current in zip(averaged.parameters(), trained.parameters(), strict=True):
        mean.lerp_(current.detach(), 1.0 - decay)
    for mean, current in zip(averaged.buffers(), trained.buffers(), strict=True):
        mean.copy_(current)


def _critic_step(loss, optimizer, critic: torch.nn.Module, scaler, cfg: TrainConfig, world_size: int) -> torch.Tensor:
    """One update of a discriminator on its loss; returns its gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = _finish_gradients(critic.parameters(), cfg, world_size)
    scaler.step(optimizer)
    return norm


def average_gradients(parameters, world_size: int) -> list[torch.Tensor]:
    """Average the parameters' gradients over the ``world_size`` processes in place (one all-reduce of them
    flattened; nothing to do alone). Returns the gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if world_size > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    return grads


def _finish_gradients(parameters, cfg: TrainConfig, world_size: int) -> torch.Tensor:
    """Average gradients over ranks, replace NaN/inf (official ``nan_to_num``) and clip.

    Returns the global gradient norm before clipping.
    """
    grads = average_gradients(parameters, world_size)
    bound = cfg.grad_nan_bound
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=bound, neginf=-bound)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = (cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s rule
    for g in grads:
        g.mul_(scale)
    return norm


@torch.no_grad()
def _validate(
    generator: Generator,
    pairs: FixedPairs,
    identity_encoder: IdentityEncoder | None,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    device: torch.device,
    baselines: bool = False,
) -> dict[str, float]:
    """Self-reconstruction on the validation pairs: PSNR / L1 / face-region L1 of the output (stage full) or
    of the warped image (stage warp) against the driving frame, at the training size.

    With ``baselines``, also PSNR and face-region L1 of the source itself (``copy_*``) and, for mesh-prior
    models, of the source warped by the mesh prior alone (``prior_*``).
    """
    generator.eval()
    predictions, targets, masks, copies, priors = [], [], [], [], []
    loader = DataLoader(pairs, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        identity = None
        if cfg.stage == "full" and model_cfg.use_identity:
            identity = identity_encoder.embed(batch["source"], batch["source_landmarks"])
        out = generator(
            batch["source"], batch["source_lines"], batch["driving_lines"], identity=identity,
            prior_grid=batch.get("prior_grid"), prior_masks=batch.get("prior_masks"), stage=cfg.stage,
        )  # fmt: skip
        image = out["output"] if cfg.stage == "full" else out["warped"]
        predictions.append(image.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
        targets.append(batch["driving"].permute(0, 2, 3, 1).cpu().numpy())
        masks.append(batch["face_mask"][:, 0].cpu().numpy())
        copies.append(batch["source"].permute(0, 2, 3, 1).cpu().numpy())
        if "prior_grid" in batch:
            prior = F.grid_sample(batch["source"], batch["prior_grid"], padding_mode="border", align_corners=False)
            priors.append(prior.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
    generator.train()
    target, mask = np.concatenate(targets), np.concatenate(masks)
    images = {"": np.concatenate(predictions)}
    if baselines:
        images["copy_"] = np.concatenate(copies)
        if priors:
            images["prior_"] = np.concatenate(priors)
    metrics = {}
    for prefix, image in images.items():
        metrics[prefix + "psnr"] = round(psnr(image, target), 4)
        metrics[prefix + "l1"] = round(l1(image, target), 6)
        metrics[prefix + "face_l1"] = round(face_region_l1(image, target, mask), 6)
    return {**metrics, "pairs": len(target)}


def export_model(folder: Path, generator: Generator, model_cfg: ModelConfig, meta: dict, save=save_model) -> None:
    """`save_model` into a temporary folder, then swap it in, so ``folder`` never mixes two versions."""
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    save(tmp, generator, model_cfg, extra_meta=meta)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


def _get_rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and primitives (loadable with weights_only=True)."""
    version, python_state, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _worker_init(worker_id: int) -> None:
    # Pairs are seeded by their index, not by the worker; only keep each worker to one thread.
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of ``path`` with ``step <= last_step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        path.touch()
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and not _is_json(lines[-1]):  # the last line of a run killed while writing it
        lines = lines[:-1]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
