"""`metaportrait train base`: train the base generator (stage warp, then stage full) on a prepared dataset.

Examples::

    metaportrait train base --stage warp --data datasets/pool --out runs/warp --val-identities lp_d3,lp_d9
    metaportrait train base --stage full --data datasets/pool --out runs/full --init runs/warp --val-identities ids.txt
    metaportrait train base --stage warp --data datasets/pool --out runs/warp --resume --steps 6000
    python -m torch.distributed.run --nproc_per_node 2 "$(which metaportrait)" train base --stage warp ...

The settings start from the recipe of ``--preset`` and ``--stage`` (`metaportrait.train.config.recipe`); flags
override single fields. The resolved config is printed and saved as ``RUN_DIR/train_config.json``. With
``--resume`` the saved config is used; only ``--steps`` and the runtime flags (workers, threads, intervals) may
change it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from metaportrait.config import PRESETS
from metaportrait.models.generator import PARTS
from metaportrait.errors import InputError

# flag destination -> TrainConfig field, for the flags that override one field
_OVERRIDES = {
    "steps": "steps",
    "batch_size": "batch_size",
    "size": "size",
    "lr": "lr",
    "warp_lr_scale": "warp_lr_scale",
    "num_workers": "num_workers",
    "threads": "threads",
    "seed": "seed",
    "log_every": "log_every",
    "sample_every": "sample_every",
    "checkpoint_every": "checkpoint_every",
    "val_every": "val_every",
    "val_identities": "val_identities",
    "landmark_topology": "landmark_topology",
    "use_identity": "use_identity",
    "prior_mouth": "prior_mouth",
    "init": "init",
    "init_refine": "init_refine",
    "init_refine_from": "init_refine_from",
    "freeze_refine_steps": "freeze_refine_steps",
    "ema_decay": "ema_decay",
    "mouth_critic_region": "mouth_critic_region",
    "mouth_template": "mouth_template",
    "open_mouth_weight": "open_mouth_weight",
    "closed_eye_weight": "closed_eye_weight",
    "subtract_source_flow": "subtract_source_flow",
    "smooth_upscale": "smooth_upscale",
    "gain_map": "gain_map_grid",
    "eyelid_band": "prior_eyelids",
    "eyelid_condition": "eyelid_condition",
    "eyelid_fill": "prior_eyelid_fill",
    "prior_face_masked": "prior_face_masked",
    "lr_milestones": "lr_milestones",
    "warp_width": "warp_block_expansion",
    "warp_max_features": "warp_max_features",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="train_command", required=True, metavar="WHAT")
    base = sub.add_parser("base", help="the base generator: warp stage, then full stage", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    base.add_argument("--stage", choices=("warp", "full"), required=True, help="warp: W alone; full: W + R + GAN")
    base.add_argument("--data", type=Path, required=True, metavar="DATASET_DIR", help="`metaportrait prepare` output")
    base.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder (created)")
    base.add_argument("--preset", choices=sorted(PRESETS), help="model preset (default: lite)")
    base.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint")
    base.add_argument("--init", metavar="RUN_DIR",
                      help="start from the warp network of this run (or model folder), e.g. to fine-tune it in stage warp")  # fmt: skip
    base.add_argument("--init-refine", action="store_const", const=True,
                      help="with --init: also load its refinement network (a full-stage run or model)")  # fmt: skip
    base.add_argument("--init-refine-from", metavar="RUN_DIR",
                      help="with --init: load the refinement network from this other full-stage run or model")  # fmt: skip
    base.add_argument("--freeze-refine-steps", type=int, metavar="N",
                      help="stage full: keep the refinement network fixed for the first N steps")  # fmt: skip
    base.add_argument("--ema-decay", type=float, metavar="D",
                      help="validate and save a moving average of the weights (e.g. 0.99; default 0: off)")  # fmt: skip
    base.add_argument("--mouth-critic-region", choices=("crop", "synthesised"),
                      help="patches the mouth critic judges: the whole mouth crop (default) or the band the model "
                           "must synthesise (stage full with --loss mouth_gan>0)")  # fmt: skip
    base.add_argument("--mouth-template", action=argparse.BooleanOptionalAction,
                      help="the refinement also sees a teeth/cavity sketch of the driving mouth opening "
                           "(default: the preset's; --init-refine-from a model without it adds it at zero weight)")  # fmt: skip
    # Options that change no weights: a model trained without one starts a run with it.
    for flag, what in (
        ("--subtract-source-flow", "subtract from every flow the flow of the source driving itself"),
        ("--smooth-upscale", ("a fixed [1, 2, 1] filter after the refinement's sub-pixel upscale, against its "
                             "checkerboard")),
        ("--eyelid-band", ("the output is also synthesised on the eyelid skin a closing driving eye shows and "
                          "the source hides")),
        ("--eyelid-fill", "the mesh prior fills a closing eye's lowered lid from the skin above it"),
        ("--prior-face-masked", ("the mesh prior keeps hair, neck and background still (identity outside the "
                                "face) and the learned flow moves them, instead of the ring prior")),
    ):  # fmt: skip
        base.add_argument(flag, action=argparse.BooleanOptionalAction,
                          help=f"{what} (default: the preset's; no new weights, so --init from a model without it "
                               "works)")  # fmt: skip
    base.add_argument("--eyelid-condition", action=argparse.BooleanOptionalAction,
                      help="with --eyelid-band: the refinement also sees the lid band as its own input (default: the "
                           "preset's; --init from a model without it adds it at zero weight)")  # fmt: skip
    base.add_argument("--gain-map", type=int, metavar="GRID",
                      help="the refinement also predicts a smooth gain on the warped image, GRID x GRID cells (e.g. "
                           "32; 0: none; default: the preset's; --init from a model without it adds it at zero)")  # fmt: skip
    base.add_argument("--open-mouth-weight", type=float, metavar="K",
                      help="draw driving frames with weight 1 + K x mouth opening (default 0: uniform)")  # fmt: skip
    base.add_argument("--closed-eye-weight", type=float, metavar="K",
                      help="add K x eye closure (against the clip's median) to the driving frames' weight: more "
                           "blinks (default 0)")  # fmt: skip
    base.add_argument("--steps", type=int, help="total training steps (default: the recipe's)")
    base.add_argument("--batch-size", type=int, help="pairs per step and process")
    base.add_argument("--size", type=int, help="training crop size in pixels (multiple of 32)")
    base.add_argument("--lr", type=float, help="generator learning rate")
    base.add_argument("--lr-milestones", type=int, nargs="+", metavar="STEP",
                      help="steps at which the learning rates decay (default: 3/4 of the recipe's steps)")  # fmt: skip
    base.add_argument("--warp-lr-scale", type=float, help="warp network lr = lr x this")
    base.add_argument("--loss", action="append", metavar="NAME=WEIGHT",
                      help="override one loss weight of the recipe, e.g. --loss mouth_gan=1 (repeatable; the names "
                           "are the fields of `metaportrait.train.config.LossWeights`)")  # fmt: skip
    base.add_argument("--val-identities", metavar="FILE_OR_LIST",
                      help="held-out identities: a file with one per line, or a comma-separated list")  # fmt: skip
    base.add_argument("--num-workers", type=int, help="DataLoader workers per process")
    base.add_argument("--threads", type=int, help="torch CPU threads per process")
    base.add_argument("--seed", type=int)
    base.add_argument("--log-every", type=int, metavar="STEPS")
    base.add_argument("--sample-every", type=int, metavar="STEPS")
    base.add_argument("--checkpoint-every", type=int, metavar="STEPS")
    base.add_argument("--val-every", type=int, metavar="STEPS")
    ablation = base.add_argument_group("ablations (paper Table 3)")
    ablation.add_argument("--landmark-topology", choices=("mediapipe478", "sparse68"),
                          help="landmark line images: dense mesh (the preset's) or a sparse 68-point subset")  # fmt: skip
    ablation.add_argument("--no-identity", dest="use_identity", action="store_const", const=False,
                          help="refinement without the identity branch")  # fmt: skip
    ablation.add_argument("--prior-mouth", choices=("stretch", "upper_lip"),
                          help="how the mesh prior fills a mouth opening (the preset's: upper_lip)")  # fmt: skip
    capacity = base.add_argument_group("capacity (new weight shapes: start from scratch or a model of that size)")
    capacity.add_argument("--warp-width", type=int, metavar="C",
                          help="channels of the warping hourglass's first level, doubling per level (default: the "
                               "preset's; lite 16)")  # fmt: skip
    capacity.add_argument("--warp-max-features", type=int, metavar="C",
                          help="cap on the warping hourglass's channels (default: the preset's; lite 128)")
    base.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    from metaportrait.cli import train_sr

    train_sr.add_parser(sub)

    meta = sub.add_parser("meta", help="Reptile meta-training over identity tasks (the start of `personalize`)",
                          description=_META_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    meta.add_argument("--init", required=True, metavar="BASE_RUN_OR_MODEL",
                      help="the generator to start from: 'default' (the bundled model), a model or a run folder")
    meta.add_argument("--data", type=Path, required=True, metavar="DATASET_DIR", help="`metaportrait prepare` output")
    meta.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder (created)")
    meta.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint")
    meta.add_argument("--inner-steps", type=int, metavar="K", help="inner-loop steps per task")
    meta.add_argument("--inner-lr", type=float, help="inner-loop Adam learning rate")
    meta.add_argument("--outer-lr", type=float, help="Reptile step size eps at the start (decays linearly)")
    meta.add_argument("--outer-lr-final", type=float, help="eps at the last step")
    meta.add_argument("--tasks-per-step", type=int, metavar="N", help="identities adapted per outer step")
    meta.add_argument("--part", choices=PARTS, help="the part of the generator the inner loop adapts")
    meta.add_argument("--batch-size", type=int, help="pairs per inner step")
    meta.add_argument("--steps", type=int, help="outer steps")
    meta.add_argument("--val-identities", metavar="FILE_OR_LIST",
                      help="held-out identities for validation: a file with one per line, or a comma-separated list")
    meta.add_argument("--threads", type=int, help="torch CPU threads")
    meta.add_argument("--seed", type=int)
    meta.add_argument("--checkpoint-every", type=int, metavar="STEPS")
    meta.add_argument("--val-every", type=int, metavar="STEPS")
    meta.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def _loss_weights(items: list[str], recipe_losses):
    """``["mouth_gan=1", ...]`` applied to the recipe's `LossWeights` (scalar weights only)."""
    scalars = {f.name for f in dataclasses.fields(recipe_losses) if not isinstance(getattr(recipe_losses, f.name), tuple)}
    changes = {}
    for item in items:
        name, _, value = item.partition("=")
        if name.strip() not in scalars:
            raise InputError("--loss", f"{item!r}: not NAME=WEIGHT with a scalar loss weight name")
        try:
            changes[name.strip()] = float(value)
        except ValueError:
            raise InputError("--loss", f"{item!r}: the weight is not a number") from None
    return dataclasses.replace(recipe_losses, **changes)


def _changed(given: dict, cfg, resumable: tuple[str, ...]) -> list[str]:
    """The settings of the command line that differ from the resumed run's ``cfg`` and may not change (repeating
    the run's own values is allowed)."""

    def same(field: str) -> bool:
        saved = getattr(cfg, field)
        value = given[field]
        return tuple(value) == tuple(saved) if isinstance(saved, (tuple, list)) else value == saved

    return sorted(field for field in given if field not in resumable and not same(field))


def build_config(args: argparse.Namespace):
    """The `TrainConfig` of the command line: recipe + overrides, or the resumed run's config."""
    from metaportrait.data.dataset import parse_identities
    from metaportrait.train.base import RESUMABLE_CHANGES
    from metaportrait.train.config import TrainConfig, recipe

    given = {field: getattr(args, flag) for flag, field in _OVERRIDES.items() if getattr(args, flag) is not None}
    if "val_identities" in given:
        given["val_identities"] = parse_identities(given["val_identities"])
    if args.resume:
        saved = args.out / "train_config.json"
        if not saved.is_file():
            raise InputError(saved, "not found: there is no run to resume here")
        cfg = TrainConfig.from_dict(json.loads(saved.read_text(encoding="utf-8")))
        fixed = _changed(given, cfg, RESUMABLE_CHANGES) + (["loss"] if args.loss else [])
        if fixed:
            raise InputError(args.out, f"a resumed run keeps its settings; cannot change {fixed}")
        if cfg.stage != args.stage or cfg.preset != (args.preset or cfg.preset):
            raise InputError(saved, f"the run is stage {cfg.stage!r}, preset {cfg.preset!r}; the command line differs")
        return _settings(args, cfg, given)
    for key in ("init", "init_refine_from"):
        if key in given:
            given[key] = str(Path(given[key]))
    if "lr_milestones" in given:
        given["lr_milestones"] = tuple(given["lr_milestones"])
    try:
        cfg = recipe(args.preset or "lite", args.stage, given.get("steps"))
        if args.loss:
            given["loss"] = _loss_weights(args.loss, cfg.loss)
    except ValueError as error:
        raise InputError(args.out, f"invalid settings: {error}") from None
    return _settings(args, cfg, given)


def _settings(args: argparse.Namespace, cfg, given: dict):
    """``cfg`` with the command line's changes, or one error line naming the run folder."""
    try:
        return cfg.replace(**given)
    except ValueError as error:
        raise InputError(args.out, f"invalid settings: {error}") from None


_META_DOC = """`metaportrait train meta`: Reptile meta-training (`metaportrait.train.meta`) from a base model.

Examples::

    metaportrait train meta --init default --data datasets/pool256 --out runs/meta --val-identities a,b
    metaportrait train meta --init default --data datasets/pool256 --out runs/meta --resume --steps 2000
    torchrun --nproc_per_node 2 "$(which metaportrait)" train meta ... --tasks-per-step 2 --threads 1

A task is one identity of the dataset: the inner loop adapts the generator's part on support pairs (the first
70 % of each of its clips), the outer update moves the meta-weights toward the adapted ones. Validation on the
held-out identities adapts K steps and measures the query pairs (the last 30 %) before and after. The resolved
config is printed and saved as RUN_DIR/meta_config.json; RUN_DIR/model is what `personalize --checkpoint` loads.
Under torchrun every process adapts its share of the step's tasks and the deltas are all-reduced (the same
weights as one process adapting them all).
"""

# flag destination -> MetaConfig field
_META_OVERRIDES = {
    "inner_steps": "inner_steps", "inner_lr": "inner_lr", "outer_lr": "outer_lr", "outer_lr_final": "outer_lr_final",
    "tasks_per_step": "tasks_per_step", "part": "part", "batch_size": "batch_size", "steps": "steps",
    "val_identities": "val_identities", "threads": "threads", "seed": "seed", "checkpoint_every": "checkpoint_every",
    "val_every": "val_every",
}  # fmt: skip


def build_meta_config(args: argparse.Namespace):
    """The `MetaConfig` of the command line, or the resumed run's config with the allowed changes."""
    from metaportrait.data.dataset import parse_identities
    from metaportrait.train.meta import RESUMABLE_CHANGES, MetaConfig

    given = {field: getattr(args, flag) for flag, field in _META_OVERRIDES.items() if getattr(args, flag) is not None}
    if "val_identities" in given:
        given["val_identities"] = parse_identities(given["val_identities"])
    init = args.init
    if init == "default":
        from metaportrait.pipeline import bundled_checkpoint

        init = str(bundled_checkpoint())
    try:
        if args.resume:
            saved = args.out / "meta_config.json"
            if not saved.is_file():
                raise InputError(saved, "not found: there is no run to resume here")
            cfg = MetaConfig.from_dict(json.loads(saved.read_text(encoding="utf-8")))
            fixed = _changed(given, cfg, RESUMABLE_CHANGES)
            if fixed:
                raise InputError(args.out, f"a resumed run keeps its settings; cannot change {fixed}")
            return dataclasses.replace(cfg, **given)
        return MetaConfig(init=str(Path(init)), **given)
    except ValueError as error:
        raise InputError(args.out, f"invalid settings: {error}") from None


def run(args: argparse.Namespace) -> int:
    if args.train_command == "meta":
        from metaportrait.train.meta import train_meta

        cfg = build_meta_config(args)
        print(json.dumps(cfg.to_dict(), indent=2))
        if args.dry_run:
            return 0
        record = train_meta(cfg, args.data, args.out, resume=args.resume)
        print(f"done: step {record.get('step')}; model: {args.out / 'model'}")
        return 0
    if args.train_command == "sr":
        from metaportrait.cli import train_sr

        return train_sr.run(args)
    if args.train_command != "base":
        raise ValueError(f"unknown training command {args.train_command!r}")
    from metaportrait.train.base import train_base

    cfg = build_config(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(cfg.to_dict(), indent=2))
    if args.dry_run:
        return 0
    result = train_base(cfg, args.data, args.out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {result.step}, best validation PSNR {result.best_psnr:.2f} dB; model: {args.out / 'model'}")
    return 0
