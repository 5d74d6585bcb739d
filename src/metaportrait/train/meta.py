"""Meta-training (MetaPortrait §3.2): Reptile over identity tasks, so that a few fine-tuning steps on one person
(`metaportrait.personalize`) already move the generator the right way.

`train_meta` is one function read top to bottom. One outer step:

1. draw ``tasks_per_step`` identities of the training split (a pure function of the step and the seed);
2. for each, from the meta-weights theta, run the inner loop `metaportrait.meta.reptile.adapt` for
   ``inner_steps`` steps on that person's *support* pairs (the first ``1 - query_share`` of every clip) with a
   fresh Adam, the generator loss of `metaportrait.train.losses` and the part of the generator that
   personalisation tunes (`MetaConfig.part`);
3. theta <- theta + eps * mean(phi_task - theta), with eps decaying linearly from ``outer_lr`` to
   ``outer_lr_final`` over the run.

Validation, every ``val_every`` steps, on held-out identities: from theta, adapt ``inner_steps`` on each one's
support pairs and measure PSNR / face L1 on fixed *query* pairs (the last ``query_share`` of its clips: other
times of the same person), before and after adapting; the gain is what meta-training should raise.

Run directory (``out_dir``): ``meta_config.json``, ``log.jsonl`` (one line per step: eps, inner losses, the
outer step's size, s/step), ``val.jsonl``, ``checkpoint.pt`` (theta and the step, written atomically; resume is
exact: tasks and pairs are functions of the step, the inner optimiser starts fresh per task and the outer update
has no state) and ``model/`` (theta in the `metaportrait.io.checkpoint` format, what ``personalize --checkpoint``
loads).

Under ``torchrun`` (``python -m torch.distributed.run --nproc_per_node N``, gloo on CPU) every rank adapts its
share of the step's tasks (slots rank, rank + N, ...; ``tasks_per_step`` must be a multiple of N), the task deltas
are summed with ``all_reduce``, and every rank takes the same outer step: N processes with one task each give the
weights of one process with N tasks. Only rank 0 validates and writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from metaportrait.config import ModelConfig, _from_dict
from metaportrait.data.dataset import PreparedClip, PreparedDataset, split_by_identity
from metaportrait.data.drawing import MEDIAPIPE_TOPOLOGIES
from metaportrait.data.pairs import NO_AUGMENT, FixedPairs, PairOptions, RandomPairs
from metaportrait.errors import InputError
from metaportrait.eval.metrics import face_region_l1, psnr
from metaportrait.io.atomic import atomic_path, remove_temporaries, write_text_atomic
from metaportrait.io.checkpoint import load_model
from metaportrait.losses.perceptual import MobileNetV2Features
from metaportrait.meta.reptile import adapt, reptile_update, restore, snapshot
from metaportrait.models.generator import PARTS
from metaportrait.models.identity import IdentityEncoder
from metaportrait.train.base import append_jsonl, export_model, start_processes, stop_processes, truncate_jsonl
from metaportrait.train.config import PERSONAL_LOSS, LossWeights
from metaportrait.train.losses import GeneratorLoss

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
RESUMABLE_CHANGES = ("steps", "threads", "log_every", "checkpoint_every", "val_every")
MIN_SUPPORT_FRAMES = 4  # an identity needs this many support and query frames to be a task


@dataclass(frozen=True)
class MetaConfig:
    """Everything `train_meta` needs besides the data and output folders."""

    init: str  # the starting generator: a model folder, or a run folder (its model/)
    part: str = "all"  # `Generator.part_parameters`: what the inner loop adapts (personalisation's part)
    inner_steps: int = 4  # K > 1 (one step would be joint training, notes/methods.md §1)
    inner_lr: float = 3e-4  # personalisation's learning rate
    inner_betas: tuple[float, float] = (0.5, 0.999)
    grad_clip: float = 1.0
    outer_lr: float = 1.0  # eps at step 0
    outer_lr_final: float = 0.0  # eps at the last step (linear decay, as supervised-reptile)
    tasks_per_step: int = 2
    batch_size: int = 2  # pairs per inner step
    size: int = 256  # training size: the model's own (personalisation trains at it)
    query_share: float = 0.3  # the last share of every clip's frames is query material, never support
    steps: int = 1000
    loss: LossWeights = field(default_factory=lambda: PERSONAL_LOSS)
    val_identities: tuple[str, ...] = ()  # held-out identities for validation (their clips are never tasks)
    val_query_pairs: int = 4  # per validation identity
    log_every: int = 1
    checkpoint_every: int = 10
    val_every: int = 50
    seed: int = 0
    threads: int = 2

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {self.part!r}")
        if self.inner_steps < 1 or self.tasks_per_step < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("inner_steps, tasks_per_step, batch_size and steps must be >= 1")
        if not (0.0 <= self.outer_lr_final <= self.outer_lr <= 1.0) or self.inner_lr <= 0:
            raise ValueError("need 0 <= outer_lr_final <= outer_lr <= 1 and inner_lr > 0")
        if not 0.0 < self.query_share < 1.0 or self.size % 32:
            raise ValueError("query_share must be in (0, 1) and size a multiple of 32")
        if min(self.log_every, self.checkpoint_every, self.val_every, self.threads, self.val_query_pairs) < 1:
            raise ValueError("log_every, checkpoint_every, val_every, threads and val_query_pairs must be >= 1")
        if self.loss.gan > 0 or self.loss.feature_matching > 0 or self.loss.mouth_gan > 0:
            raise ValueError("meta-training has no critic: loss.gan, feature_matching and mouth_gan must be 0")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaConfig:
        return _from_dict(cls, data, "meta")

    def epsilon(self, step: int) -> float:
        """The outer step size at ``step`` (linear from outer_lr to outer_lr_final)."""
        done = step / self.steps
        return (1.0 - done) * self.outer_lr + done * self.outer_lr_final


@dataclass
class Task:
    """One identity: random support pairs (inner loop) and fixed query pairs (validation)."""

    identity: str
    support: RandomPairs
    query: list[PreparedClip]


def make_tasks(clips: list[PreparedClip], options: PairOptions, cfg: MetaConfig) -> list[Task]:
    """One `Task` per identity with enough frames; support = the first ``1 - query_share`` of each clip."""
    groups: dict[str, list[PreparedClip]] = {}
    for clip in clips:
        groups.setdefault(clip.identity, []).append(clip)
    tasks = []
    for identity, group in sorted(groups.items()):
        cuts = [int(round(c.frame_count * (1.0 - cfg.query_share))) for c in group]
        support = [c.part(0, cut) for c, cut in zip(group, cuts)]
        query = [c.part(cut, c.frame_count) for c, cut in zip(group, cuts)]
        if sum(len(c.usable_frames) >= MIN_SUPPORT_FRAMES for c in support) == 0:
            continue
        if sum(len(c.usable_frames) for c in query) < 2:
            continue
        support = [c for c in support if len(c.usable_frames) >= 2]
        tasks.append(Task(identity, RandomPairs(support, options, NO_AUGMENT, cfg.seed), query))
    return tasks


def task_batches(task: Task, cfg: MetaConfig, step: int, slot: int) -> Iterator[dict[str, torch.Tensor]]:
    """The inner loop's ``inner_steps`` support batches of task ``slot`` at outer ``step`` (a pure function)."""
    first = (step * cfg.tasks_per_step + slot) * cfg.inner_steps * cfg.batch_size
    indices = range(first, first + cfg.inner_steps * cfg.batch_size)
    return iter(DataLoader(torch.utils.data.Subset(task.support, indices), batch_size=cfg.batch_size))


def train_meta(cfg: MetaConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
               progress: bool = True) -> dict:
    """Meta-train the generator of ``cfg.init`` with Reptile on a prepared dataset (module docstring).

    Returns the last log record.

    Raises:
        InputError: bad data or init folder, a run folder that already holds a run (without ``resume``) or none
            (with it), a resumed run whose settings differ beyond `RESUMABLE_CHANGES`.
    """
    # ------------------------------------------------------------------------------------------------------------
    # Set-up.
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / "checkpoint.pt"
    if resume and not checkpoint_path.is_file():
        raise InputError(checkpoint_path, "not found: there is no run to resume here")
    if not resume and (out_dir / "meta_config.json").exists():
        raise InputError(out_dir, "already holds a meta-training run; pass --resume to continue it")
    procs = start_processes()
    if cfg.tasks_per_step % procs.world_size:
        raise InputError(out_dir, f"tasks_per_step {cfg.tasks_per_step} is not a multiple of the "
                                  f"{procs.world_size} processes")  # fmt: skip
    if procs.is_main and out_dir.is_dir():
        remove_temporaries(out_dir)  # left by a run killed while writing its checkpoint (SIGKILL, power cut)
    if procs.distributed:
        dist.barrier()  # every rank has checked the run folder before rank 0 writes into it
    progress = progress and procs.is_main
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    # ------------------------------------------------------------------------------------------------------------
    # Networks: the generator of the init model (its own config), the frozen loss networks.
    init = Path(cfg.init)
    if not (init / "config.json").is_file():
        init = init / "model"
    generator, model_cfg = load_model(init)
    if model_cfg.landmark_topology not in MEDIAPIPE_TOPOLOGIES:
        raise InputError(init, f"a {model_cfg.landmark_topology!r} model cannot train on MediaPipe landmarks")
    encoder = IdentityEncoder.from_dlib() if model_cfg.use_identity else None
    generator_loss = GeneratorLoss(cfg.loss, model_cfg, "full", cfg.size, MobileNetV2Features(), encoder)
    names = [name for name, _ in generator.part_parameters(cfg.part)]
    parameters = [p for _, p in generator.part_parameters(cfg.part)]

    # ------------------------------------------------------------------------------------------------------------
    # Data: training tasks and held-out validation tasks (identity-disjoint).
    dataset = PreparedDataset(data_dir)
    train_clips, val_clips = split_by_identity(dataset, cfg.val_identities)
    options = PairOptions.for_model(model_cfg, cfg.size)
    tasks = make_tasks(train_clips, options, cfg)
    val_tasks = make_tasks(val_clips, options, cfg)
    if not tasks:
        raise InputError(data_dir, "no identity has enough frames for support and query pairs")
    val_queries = [next(iter(DataLoader(FixedPairs(t.query, options, cfg.val_query_pairs), batch_size=64)))
                   for t in val_tasks]  # fmt: skip
    logger.info("meta: %d training identities, %d validation identities", len(tasks), len(val_tasks))

    # ------------------------------------------------------------------------------------------------------------
    # Resume or start.
    start_step = 0
    if resume:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("version") != CHECKPOINT_VERSION:
            raise InputError(checkpoint_path, f"format version {state.get('version')}, expected {CHECKPOINT_VERSION}")
        saved = MetaConfig.from_dict(state["meta_config"]).to_dict()
        changed = [k for k, v in cfg.to_dict().items() if saved[k] != v and k not in RESUMABLE_CHANGES]
        if changed:
            raise InputError(checkpoint_path, f"settings differ from the run's: {changed} (only {RESUMABLE_CHANGES})")
        generator.load_state_dict(state["generator"])
        start_step = int(state["step"])
    if procs.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "meta_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        for name in ("log.jsonl", "val.jsonl"):
            truncate_jsonl(out_dir / name, start_step)
    all_reduce = dist.all_reduce if procs.distributed else None

    def loss(model, batch):
        return generator_loss(model, batch).total

    def validate(step: int) -> None:
        """Query PSNR / face L1 of every validation identity before and after K inner steps from theta."""
        theta = snapshot(generator, names)
        record: dict[str, Any] = {"step": step}
        for number, (task, query) in enumerate(zip(val_tasks, val_queries)):
            before = query_metrics(generator, model_cfg, query, encoder)
            adapt(generator, task_batches(task, cfg, number, 0), loss, parameters, cfg.inner_lr,
                  steps=cfg.inner_steps, betas=cfg.inner_betas, grad_clip=cfg.grad_clip)  # fmt: skip
            after = query_metrics(generator, model_cfg, query, encoder)
            restore(generator, theta)
            for key in before:
                record.setdefault(f"{key}_before", []).append(before[key])
                record.setdefault(f"{key}_after", []).append(after[key])
        summary = {k: (round(float(np.mean(v)), 5) if isinstance(v, list) else v) for k, v in record.items()}
        append_jsonl(out_dir / "val.jsonl", summary)

    # ------------------------------------------------------------------------------------------------------------
    # Outer loop.
    if start_step == 0 and val_tasks and procs.is_main:
        validate(0)
    record: dict = {}
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not progress, desc="train meta")
    for step in range(start_step, cfg.steps):
        tick = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, step])
        chosen = rng.choice(len(tasks), size=cfg.tasks_per_step, replace=len(tasks) < cfg.tasks_per_step)
        theta = snapshot(generator, names)
        adapted, first_losses, last_losses = [], [], []
        for slot in range(procs.rank, cfg.tasks_per_step, procs.world_size):  # this rank's share of the tasks
            index = chosen[slot]
            restore(generator, theta)
            result = adapt(generator, task_batches(tasks[index], cfg, step, slot), loss, parameters, cfg.inner_lr,
                           steps=cfg.inner_steps, betas=cfg.inner_betas, grad_clip=cfg.grad_clip)  # fmt: skip
            adapted.append(snapshot(generator, names))
            first_losses.append(result.losses[0])
            last_losses.append(result.losses[-1])
        epsilon = cfg.epsilon(step)
        outer = reptile_update(generator, theta, adapted, epsilon, all_reduce, cfg.tasks_per_step)
        inner_losses = torch.tensor([sum(first_losses), sum(last_losses)], dtype=torch.float64)
        if all_reduce is not None:
            all_reduce(inner_losses)
        inner_first, inner_last = (inner_losses / cfg.tasks_per_step).tolist()
        done = step + 1
        record = {
            "step": done, "epsilon": round(epsilon, 6), "inner_loss_first": round(inner_first, 6),
            "inner_loss_last": round(inner_last, 6), **{k: round(v, 6) for k, v in outer.items()},
            "identities": [tasks[i].identity for i in chosen], "world_size": procs.world_size,
            "s_per_step": round(time.perf_counter() - tick, 3),
        }  # fmt: skip
        bar.update(1)
        bar.set_postfix(inner=f"{inner_first:.2f}->{inner_last:.2f}", eps=f"{epsilon:.3f}")
        if not procs.is_main:
            continue
        if done % cfg.log_every == 0 or done == cfg.steps:
            append_jsonl(out_dir / "log.jsonl", record)
        if val_tasks and (done % cfg.val_every == 0 or done == cfg.steps):
            validate(done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            state = {"version": CHECKPOINT_VERSION, "step": done, "meta_config": cfg.to_dict(),
                     "model_config": model_cfg.to_dict(), "generator": generator.state_dict()}  # fmt: skip
            with atomic_path(checkpoint_path) as tmp:
                torch.save(state, tmp)
            export_model(out_dir / "model", generator, model_cfg, {"stage": "full", "meta_step": done,
                                                                   "meta_init": str(cfg.init)})  # fmt: skip
    bar.close()
    stop_processes(procs)
    torch.set_num_threads(previous_threads)
    return record


def identity_input(encoder: IdentityEncoder | None, model_cfg: ModelConfig, batch: dict) -> torch.Tensor | None:
    """The generator's identity input for a batch (None for a model without one)."""
    if not model_cfg.use_identity:
        return None
    with torch.no_grad():
        return encoder.embed(batch["source"], batch["source_landmarks"])


@torch.no_grad()
def query_metrics(generator: torch.nn.Module, model_cfg: ModelConfig, batch: dict,
                  encoder: IdentityEncoder | None) -> dict[str, float]:
    """PSNR and face L1 of the generator's outputs on fixed held-out pairs (one collated `make_pair` batch)."""
    was_training = generator.training
    generator.eval()
    out = generator(
        batch["source"], batch["source_lines"], batch["driving_lines"],
        identity=identity_input(encoder, model_cfg, batch), prior_grid=batch.get("prior_grid"),
        prior_masks=batch.get("prior_masks"),
    )  # fmt: skip
    generator.train(was_training)
    image = out["output"].clamp(0, 1).permute(0, 2, 3, 1).numpy()
    target = batch["driving"].permute(0, 2, 3, 1).numpy()
    return {"psnr": psnr(image, target), "face_l1": face_region_l1(image, target, batch["face_mask"][:, 0].numpy())}
