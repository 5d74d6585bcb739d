"""Base-model training (MetaPortrait §3.1): stage ``warp`` trains the warping network W on the warped source image;
stage ``full`` trains W and the refinement network R together with a discriminator (and a mouth critic on mouth
crops when ``loss.mouth_gan`` > 0).

`train_base` is one function read top to bottom (set-up, data, networks, optimisers, resume, loop). It runs as a
single process, or as several under ``torchrun`` (``python -m torch.distributed.run --nproc_per_node N``): every
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
(measured on the lite model: no gain when the learning rate already decays at the end, docs/model_card.md).

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
from metaportrait.data.pairs import REGIONS, FixedPairs, PairOptions, RandomPairs, StepSampler, box_crops, box_masks
from metaportrait.errors import InputError
from metaportrait.eval.metrics import face_region_l1, l1, psnr
from metaportrait.io.atomic import atomic_path, write_text_atomic
from metaportrait.io.checkpoint import load_config, load_model, save_model
from metaportrait.io.image import to_uint8_frames, write_image
from metaportrait.losses.perceptual import MobileNetV2Features, PerceptualPyramidLoss, VGG19Features
from metaportrait.models.discriminator import MouthDiscriminator, MultiScaleDiscriminator
from metaportrait.models.generator import Generator
from metaportrait.models.identity import EMBEDDING_DIM, IdentityEncoder, cosine_distance
from metaportrait.train.config import TrainConfig

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
    # ------------------------------------------------------------------------------------------------------------
    # Set-up: processes, device, threads, seeds.
    # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; gloo on CPU, nccl on CUDA.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world_size > 1
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    we_initialised_group = False
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        we_initialised_group = True
    is_main = rank == 0
    previous_threads = torch.get_num_threads()  # restored at the end: callers (tests) share the process
    torch.set_num_threads(cfg.threads)
    use_amp = cfg.amp and device.type == "cuda"  # float16 autocast is a CUDA feature; CPU stays float32
    full = cfg.stage == "full"
    model_cfg = cfg.model_config()
    if model_cfg.landmark_topology not in MEDIAPIPE_TOPOLOGIES:
        raise ValueError(
            f"preset {cfg.preset!r} draws {model_cfg.landmark_topology!r} landmark lines, but prepared datasets hold "
            f"MediaPipe landmarks; train a preset with one of {MEDIAPIPE_TOPOLOGIES}"
        )
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / "checkpoint.pt"
    if resume and not checkpoint_path.is_file():
        raise InputError(checkpoint_path, "not found: there is no run to resume here")
    if not resume and (out_dir / "train_config.json").exists():
        raise InputError(out_dir, "already holds a training run; pass --resume to continue it or choose a new folder")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same on every rank: all ranks build identical initial networks

    # ------------------------------------------------------------------------------------------------------------
    # Data: identity-disjoint train / validation split, random training pairs, fixed validation pairs.
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

    # ------------------------------------------------------------------------------------------------------------
    # Networks: G (trained), D (stage full), frozen perceptual backbone and identity encoder.
    generator = Generator(model_cfg).to(device).train()
    discriminator = MultiScaleDiscriminator(model_cfg.discriminator).to(device).train() if full else None
    mouth_critic = MouthDiscriminator().to(device).train() if full and cfg.loss.mouth_gan > 0 else None
    mouth_crop = max(64, cfg.size // 4)  # px; the mouth box is about a quarter of the face crop wide
    if cfg.perceptual_backbone == "mobilenet_v2":
        backbone = MobileNetV2Features()
    else:
        backbone = VGG19Features(cfg.vgg19_weights)
    # Two weightings of one backbone (the module is shared, not copied).
    perceptual_warped = PerceptualPyramidLoss(backbone, cfg.loss.pyramid_scales, cfg.loss.perceptual_warped).to(device)
    perceptual_output = PerceptualPyramidLoss(backbone, cfg.loss.pyramid_scales, cfg.loss.perceptual_output).to(device)
    mouth_layers = (cfg.loss.mouth_perceptual,) * len(cfg.loss.perceptual_output)
    perceptual_mouth = PerceptualPyramidLoss(backbone, (1.0,), mouth_layers).to(device)
    needs_identity = full and (model_cfg.use_identity or cfg.loss.identity > 0)
    if needs_identity and model_cfg.use_identity and model_cfg.identity_dim != EMBEDDING_DIM:
        raise ValueError(
            f"preset {cfg.preset!r} takes {model_cfg.identity_dim}-d identities; our encoder gives {EMBEDDING_DIM}-d"
        )
    identity_encoder = IdentityEncoder.from_dlib().to(device) if needs_identity else None
    if (cfg.loss.synthesis_pixel != 1.0 or cfg.mouth_critic_region == "synthesised") and not model_cfg.prior_masks:
        raise ValueError(
            "loss.synthesis_pixel != 1 and mouth_critic_region='synthesised' need a model with prior masks "
            "(they mark the synthesised band)"
        )
    if cfg.loss.eyelid_pixel is not None and not model_cfg.refine.eyelid_band:
        raise ValueError("loss.eyelid_pixel needs a model with the eyelid-band input (--eyelid-condition)")
    # The official tanh output is trained on its raw value (clipping would cut the gradient below 0).
    output_key = "output_raw" if model_cfg.refine.output == "tanh" else "output"

    # ------------------------------------------------------------------------------------------------------------
    # Optimisers: G with two parameter groups (refine at lr, warp at lr * warp_lr_scale), D alone.
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
    optimizer_d = None
    if full:
        optimizer_d = torch.optim.Adam(
            [{"params": list(discriminator.parameters()), "lr": cfg.lr_discriminator, "base_lr": cfg.lr_discriminator}],
            betas=cfg.betas,
        )
    optimizer_m = None
    if mouth_critic is not None:
        optimizer_m = torch.optim.Adam(
            [{"params": list(mouth_critic.parameters()), "lr": cfg.lr_discriminator, "base_lr": cfg.lr_discriminator}],
            betas=cfg.betas,
        )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)  # one scaler for G and D, as the official code

    # ------------------------------------------------------------------------------------------------------------
    # Resume, or start (stage full: optionally from a warp-stage run's warp network).
    start_step, best_psnr, skipped_in_a_row = 0, -math.inf, 0
    if resume:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("version") != CHECKPOINT_VERSION:
            raise InputError(checkpoint_path, f"format version {state.get('version')}, expected {CHECKPOINT_VERSION}")
        saved = TrainConfig.from_dict(state["train_config"])
        changed = [k for k, v in cfg.to_dict().items() if saved.to_dict()[k] != v and k not in RESUMABLE_CHANGES]
        if changed:
            raise InputError(checkpoint_path, f"settings differ from the run's: {changed} (only {RESUMABLE_CHANGES})")
        generator.load_state_dict(state["generator"])
        optimizer_g.load_state_dict(state["optimizer_generator"])
        if full:
            discriminator.load_state_dict(state["discriminator"])
            optimizer_d.load_state_dict(state["optimizer_discriminator"])
        if mouth_critic is not None:
            mouth_critic.load_state_dict(state["mouth_discriminator"])
            optimizer_m.load_state_dict(state["optimizer_mouth_discriminator"])
        scaler.load_state_dict(state["scaler"])
        start_step, best_psnr = int(state["step"]), float(state["best_psnr"])
        _set_rng_state(state["rng"])
    elif cfg.init is not None:
        # The warping network, as the official Full stage (the warp stage never trains R); or all of G; or R from
        # another model.
        _load_init(generator, model_cfg, Path(cfg.init), "all" if cfg.init_refine else "warp")
        if cfg.init_refine_from is not None:
            _load_init(generator, model_cfg, Path(cfg.init_refine_from), "refine")
    if distributed:
        # Identical start on every rank whatever happened above (rank 0 is the reference).
        for module in (generator, discriminator, mouth_critic):
            if module is not None:
                for tensor in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(tensor.data, src=0)
    # The averaged generator (ema_decay > 0) starts from the starting weights; it is what gets validated and saved.
    averaged = generator
    if cfg.ema_decay > 0:
        averaged = copy.deepcopy(generator).requires_grad_(False)
        if resume:
            averaged.load_state_dict(state["averaged_generator"])

    # Output files: the config, and logs cut back to the checkpoint's step when resuming.
    if is_main:
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        for name in ("log.jsonl", "val.jsonl"):
            _truncate_jsonl(out_dir / name, start_step)
    sampler = StepSampler(start_step, cfg.steps, cfg.batch_size, rank, world_size)
    loader = DataLoader(
        train_pairs,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        worker_init_fn=_worker_init,
        persistent_workers=False,
    )

    # ------------------------------------------------------------------------------------------------------------
    # Training loop.
    if is_main and val_pairs is not None and start_step == 0:
        # Step 0: the untrained model, and the training-free baselines on the same pairs, for reference.
        metrics = _validate(averaged, val_pairs, identity_encoder, cfg, model_cfg, device, baselines=True)
        best_psnr = metrics["psnr"]
        _append_jsonl(out_dir / "val.jsonl", {"step": 0, **metrics, "best": True})
        _export_model(out_dir / "best", averaged, model_cfg, {"step": 0, "stage": cfg.stage, **metrics})
    sums: dict[str, float] = {}  # loss name -> sum over the steps since the last log line
    interval_steps, interval_time = 0, 0.0
    last_logged: dict[str, float] = {}
    step = start_step
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (is_main and progress), desc=f"train {cfg.stage}")
    tick = time.perf_counter()
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        source, driving = batch["source"], batch["driving"]

        # Learning rates of this step (official: MultiStepLR x lr_decay at each milestone).
        decay = cfg.lr_decay ** sum(step >= m for m in cfg.lr_milestones)
        for optimizer in (optimizer_g, optimizer_d, optimizer_m):
            for group in optimizer.param_groups if optimizer is not None else ():
                group["lr"] = group["base_lr"] * decay
        if step < cfg.freeze_refine_steps:
            optimizer_g.param_groups[0]["lr"] = 0.0  # R frozen (Adam with lr 0 leaves the weights exactly as they are)

        # Generator losses.
        losses: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            source_identity = identity_encoder.embed(source, batch["source_landmarks"]) if needs_identity else None
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            out = generator(
                source, batch["source_lines"], batch["driving_lines"],
                identity=source_identity if full and model_cfg.use_identity else None,
                prior_grid=batch.get("prior_grid"), prior_masks=batch.get("prior_masks"), stage=cfg.stage,
            )  # fmt: skip
            warped = out["warped"]
            losses["perceptual_warped"] = perceptual_warped(warped, driving)
            if cfg.loss.l1_warped > 0:
                losses["l1_warped"] = cfg.loss.l1_warped * (warped - driving).abs().mean()
            if cfg.loss.face > 0:
                losses["face_warped"] = cfg.loss.face * _face_l1((warped - driving).abs(), batch["face_mask"])
            if full:
                prediction = out[output_key]
                losses["perceptual_output"] = perceptual_output(prediction, driving)
                # Pixel error of the output, scaled by loss.synthesis_pixel where the source has no pixels
                # (the squared term: by its square).
                pixel_error = (prediction - driving).abs()  # (B, 3, H, W)
                if cfg.loss.synthesis_pixel != 1.0 or cfg.loss.eyelid_pixel is not None:
                    pixel_error = pixel_error * synthesis_pixel_weight(
                        batch["prior_masks"], cfg.loss.synthesis_pixel, cfg.loss.eyelid_pixel
                    )
                if cfg.loss.l1_output > 0:
                    losses["l1_output"] = cfg.loss.l1_output * pixel_error.mean()
                if cfg.loss.l2_output > 0:
                    losses["l2_output"] = cfg.loss.l2_output * pixel_error.square().mean()
                if cfg.loss.face > 0:
                    losses["face_output"] = cfg.loss.face * _face_l1(pixel_error, batch["face_mask"])
                if cfg.loss.eye > 0 or cfg.loss.mouth > 0:
                    masks = box_masks(batch["boxes"], cfg.size, cfg.size, cfg.size)  # (B, 3, H, W)
                    error = pixel_error.mean(dim=1, keepdim=True)  # (B, 1, H, W)
                    region = (error * masks).sum(dim=(2, 3)) / masks.sum(dim=(2, 3)).clamp_min(1.0)  # (B, 3)
                    losses["eye"] = cfg.loss.eye * region[:, : REGIONS.index("mouth")].mean()
                    losses["mouth"] = cfg.loss.mouth * region[:, REGIONS.index("mouth")].mean()
                if cfg.loss.identity > 0:
                    # The output is aligned for E_id with the driving landmarks: it should show them.
                    output_identity = identity_encoder.embed(prediction, batch["driving_landmarks"])
                    losses["identity"] = cfg.loss.identity * cosine_distance(output_identity, source_identity).mean()
                if cfg.loss.gan > 0 or cfg.loss.feature_matching > 0:
                    discriminator.requires_grad_(False)  # G's step must not leave gradients in D
                    fake_scales = discriminator(prediction)
                    with torch.no_grad():
                        real_scales = discriminator(driving)
                    discriminator.requires_grad_(True)
                    gan, matching = _generator_adversarial(fake_scales, real_scales)
                    losses["gan_g"] = cfg.loss.gan * gan
                    losses["feature_matching"] = cfg.loss.feature_matching * matching
                if mouth_critic is not None or cfg.loss.mouth_perceptual > 0:
                    mouth_boxes = batch["boxes"][:, REGIONS.index("mouth")]
                    real_mouth = box_crops(driving, mouth_boxes, cfg.size, mouth_crop)
                    fake_mouth = box_crops(prediction, mouth_boxes, cfg.size, mouth_crop)
                if cfg.loss.mouth_perceptual > 0:
                    losses["mouth_perceptual"] = perceptual_mouth(fake_mouth, real_mouth)
                if mouth_critic is not None:
                    mouth_lines = box_crops(batch["driving_lines"], mouth_boxes, cfg.size, mouth_crop)
                    critic_region = None  # (B, 1, s, s) weight of the critic's patches; None: all equal
                    if cfg.mouth_critic_region == "synthesised":
                        critic_region = box_crops(batch["prior_masks"][:, 1:2], mouth_boxes, cfg.size, mouth_crop)
                    mouth_critic.requires_grad_(False)
                    fake_scales = [mouth_critic(fake_mouth, mouth_lines)]  # one scale
                    with torch.no_grad():
                        real_scales = [mouth_critic(real_mouth, mouth_lines)]
                    mouth_critic.requires_grad_(True)
                    gan, matching = _generator_adversarial(fake_scales, real_scales, critic_region)
                    losses["mouth_gan_g"] = cfg.loss.mouth_gan * gan
                    if cfg.loss.mouth_feature_matching > 0:
                        losses["mouth_feature_matching"] = cfg.loss.mouth_feature_matching * matching
            total_g = sum(losses.values())

        # Non-finite loss on any rank: every rank skips this step (fail after MAX_SKIPPED_STEPS in a row).
        finite = torch.tensor(float(torch.isfinite(total_g.detach()).item()))
        if distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            skipped_in_a_row += 1
            sums["skipped"] = sums.get("skipped", 0.0) + 1.0
            if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                raise FloatingPointError(f"step {step}: non-finite loss {MAX_SKIPPED_STEPS} steps in a row")
            optimizer_g.zero_grad(set_to_none=True)
        else:
            skipped_in_a_row = 0

            # Generator update.
            optimizer_g.zero_grad(set_to_none=True)
            scaler.scale(total_g).backward()
            scaler.unscale_(optimizer_g)
            losses["grad_norm_g"] = _finish_gradients(generator.parameters(), cfg, world_size)
            scaler.step(optimizer_g)
            if averaged is not generator:
                # Warm-up (as TensorFlow's ExponentialMovingAverage): early steps weigh more than ema_decay allows.
                _update_average(averaged, generator, min(cfg.ema_decay, (1 + step) / (10 + step)))

            # Discriminator update (stage full): LSGAN on the driving frame vs the detached output.
            if full and cfg.loss.gan > 0:
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    real_scales = discriminator(driving)
                    fake_scales = discriminator(prediction.detach())
                    total_d = cfg.loss.gan * _critic_loss(real_scales, fake_scales)
                losses["grad_norm_d"] = _critic_step(total_d, optimizer_d, discriminator, scaler, cfg, world_size)
                losses["gan_d"] = total_d
            if mouth_critic is not None:
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    real_scales = [mouth_critic(real_mouth, mouth_lines)]
                    fake_scales = [mouth_critic(fake_mouth.detach(), mouth_lines)]
                    total_m = cfg.loss.mouth_gan * _critic_loss(real_scales, fake_scales, critic_region)
                losses["grad_norm_mouth_d"] = _critic_step(total_m, optimizer_m, mouth_critic, scaler, cfg, world_size)
                losses["mouth_gan_d"] = total_m
            scaler.update()
            losses["total_g"] = total_g
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        step += 1
        interval_steps += 1
        interval_time += time.perf_counter() - tick
        bar.update(1)

        # Log: means over the interval and over the ranks.
        if step % cfg.log_every == 0 or step == cfg.steps:
            names = sorted(sums)
            totals = torch.tensor([sums[n] for n in names] + [interval_time], dtype=torch.float64)
            if distributed:
                dist.all_reduce(totals)
                totals /= world_size
            means = {n: totals[i].item() / interval_steps for i, n in enumerate(names) if n != "skipped"}
            if "skipped" in sums:
                means["skipped"] = totals[names.index("skipped")].item()
            record = {
                "step": step,
                **{k: round(v, 6) for k, v in means.items()},
                "lr": optimizer_g.param_groups[0]["lr"],
                "lr_warp": optimizer_g.param_groups[1]["lr"],
                "s_per_step": round(totals[-1].item() / interval_steps, 4),
                "world_size": world_size,
            }
            if is_main:
                _append_jsonl(out_dir / "log.jsonl", record)
                bar.set_postfix(loss=f"{means.get('total_g', float('nan')):.3f}", s_step=record["s_per_step"])
            last_logged = record
            sums, interval_steps, interval_time = {}, 0, 0.0

        # Samples, validation, checkpoint (rank 0 only; the other ranks go on to the next all-reduce and wait).
        if is_main and (step % cfg.sample_every == 0 or step == cfg.steps):
            columns = [source, batch["driving_lines"], out["warped"]] + ([out["output"]] if full else []) + [driving]
            grid = torch.cat([c[:SAMPLE_ROWS].detach().float().clamp(0, 1) for c in columns], dim=3)  # (n, 3, h, k*w)
            grid = torch.cat(list(grid), dim=1)  # (3, n*h, k*w): one row per pair
            write_image(out_dir / "samples" / f"step_{step:07d}.png", to_uint8_frames(grid[None])[0])
        if is_main and val_pairs is not None and (step % cfg.val_every == 0 or step == cfg.steps):
            metrics = _validate(averaged, val_pairs, identity_encoder, cfg, model_cfg, device)
            improved = metrics["psnr"] > best_psnr
            best_psnr = max(best_psnr, metrics["psnr"])
            _append_jsonl(out_dir / "val.jsonl", {"step": step, **metrics, "best": improved})
            if improved:
                _export_model(out_dir / "best", averaged, model_cfg, {"step": step, "stage": cfg.stage, **metrics})
        if is_main and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            state = {
                "version": CHECKPOINT_VERSION,
                "step": step,
                "best_psnr": best_psnr,
                "train_config": cfg.to_dict(),
                "model_config": model_cfg.to_dict(),
                "generator": generator.state_dict(),
                "optimizer_generator": optimizer_g.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _get_rng_state(),
            }
            if averaged is not generator:
                state["averaged_generator"] = averaged.state_dict()
            if full:
                state["discriminator"] = discriminator.state_dict()
                state["optimizer_discriminator"] = optimizer_d.state_dict()
            if mouth_critic is not None:
                state["mouth_discriminator"] = mouth_critic.state_dict()
                state["optimizer_mouth_discriminator"] = optimizer_m.state_dict()
            with atomic_path(checkpoint_path) as tmp:
                torch.save(state, tmp)
            _export_model(out_dir / "model", averaged, model_cfg, {"step": step, "stage": cfg.stage})
        tick = time.perf_counter()
    bar.close()

    # ------------------------------------------------------------------------------------------------------------
    # Done.
    torch.set_num_threads(previous_threads)
    if distributed:
        dist.barrier()
        if we_initialised_group:
            dist.destroy_process_group()
    return TrainResult(step, best_psnr if best_psnr > -math.inf else math.nan, last_logged, averaged)


# ----------------------------------------------------------------------------------------------------------------
# Helpers of the loop.

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


def synthesis_pixel_weight(prior_masks: torch.Tensor, weight: float, eyelid_weight: float | None = None) -> torch.Tensor:
    """Per-pixel weight of the pixel losses: ``weight`` inside the band the model must synthesise (prior-mask
    channel 1, where the source has no pixels), 1 elsewhere. ``(B, C >= 2, H, W)`` masks in [0, 1] ->
    ``(B, 1, H, W)``. With ``eyelid_weight`` (masks whose last channel is the eyelid band alone), that weight
    inside the eyelid band instead.

    Pixel losses pull an unknowable region to the average of its training targets (for the mouth: a grey fill
    between teeth and cavity); with a low weight there, the perceptual and adversarial terms decide it.
    """
    assert prior_masks.dim() == 4 and prior_masks.shape[1] >= 2, f"prior masks (B, C, H, W), got {prior_masks.shape}"
    band = prior_masks[:, 1:2]
    if eyelid_weight is None:
        return 1.0 - (1.0 - weight) * band
    assert prior_masks.shape[1] >= 3, "eyelid_weight needs the eyelid band as the last prior-mask channel"
    lids = prior_masks[:, -1:]
    mouth = (band - lids).clamp_min(0.0)  # channel 1 is max(mouth, lids); they lie far apart
    return 1.0 - (1.0 - weight) * mouth - (1.0 - eyelid_weight) * lids


def _face_l1(error: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """Mean of a ``(B, 3, H, W)`` absolute-error map inside a ``(B, 1, H, W)`` face mask -> scalar."""
    area = face.sum(dim=(1, 2, 3)).clamp_min(1.0) * 3  # (B,), times 3 colour channels
    return (error * face).sum(dim=(1, 2, 3)).div(area).mean()


def _patch_mean(values: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """Mean of a critic's ``(B, 1, h, w)`` per-patch values, weighted by ``region`` ``(B, 1, H, W)`` in [0, 1]
    (area-averaged to the patch grid) when given; 0 when the region is empty."""
    if region is None:
        return values.mean()
    weight = F.adaptive_avg_pool2d(region, values.shape[-2:])
    return (weight * values).sum() / weight.sum().clamp_min(1e-6)


def _generator_adversarial(fake_scales, real_scales, region=None) -> tuple[torch.Tensor, torch.Tensor]:
    """LSGAN generator term sum_s mean (1 - D_s(fake))² and feature matching sum_s,l mean |f_l(fake) - f_l(real)|,
    from a critic's per-scale ``(features, prediction)`` outputs on the output and (without gradient) the target.
    ``region`` (optional) weights the LSGAN patches (`_patch_mean`); feature matching stays unweighted."""
    gan = sum(_patch_mean((1 - prediction) ** 2, region) for _, prediction in fake_scales)
    matching = sum(
        (fake_feature - real_feature).abs().mean()
        for (fake_features, _), (real_features, _) in zip(fake_scales, real_scales)
        for fake_feature, real_feature in zip(fake_features, real_features)
    )
    return gan, matching


def _critic_loss(real_scales, fake_scales, region=None) -> torch.Tensor:
    """LSGAN critic loss sum_s mean (1 - D_s(real))² + mean D_s(fake)², patches weighted by ``region`` if given."""
    return sum(
        _patch_mean((1 - real_map) ** 2, region) + _patch_mean(fake_map**2, region)
        for (_, real_map), (_, fake_map) in zip(real_scales, fake_scales)
    )


def _critic_step(loss, optimizer, critic: torch.nn.Module, scaler, cfg: TrainConfig, world_size: int) -> torch.Tensor:
    """One update of a discriminator on its loss; returns its gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = _finish_gradients(critic.parameters(), cfg, world_size)
    scaler.step(optimizer)
    return norm


def _finish_gradients(parameters, cfg: TrainConfig, world_size: int) -> torch.Tensor:
    """Average gradients over ranks, replace NaN/inf (official ``nan_to_num``) and clip.

    Returns the global gradient norm before clipping.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if world_size > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
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


def _export_model(folder: Path, generator: Generator, model_cfg: ModelConfig, meta: dict, save=save_model) -> None:
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


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of ``path`` with ``step <= last_step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        path.touch()
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
