"""`metaportrait personalize`: fine-tune a model on videos of one person; writes a checkpoint folder.

Examples::

    metaportrait personalize me1.mp4 me2.mp4 --output models/me
    metaportrait personalize me.mp4 --output models/me --seconds 120 --holdout-seconds 10 --threads 2
    metaportrait personalize me.mp4 --output models/me --checkpoint meta --steps 10   # a quick one
    metaportrait animate -s me.jpg -d talk.mp4 -o out.mp4 --checkpoint models/me

The videos (any resolution and frame rate) go through the front-end first (face crops and landmarks at the
model's size, cached, so a rerun starts training at once); the last ``--holdout-seconds`` of the last video are
held out and never trained on. Fine-tuning runs for ``--seconds`` of training (or ``--steps``); then the one-shot
and the personalised model are compared on the held-out tail. OUTPUT gets ``model.safetensors`` and
``config.json`` (what ``animate --checkpoint`` and ``Animator.from_pretrained`` load), ``report.json`` and
``report.png`` (the held-out curve); it appears only when complete. The model's architecture comes from the
checkpoint's own config. Design and measurements: `metaportrait.personalize`, docs/experiments.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from metaportrait.cli.arguments import positive_int
from metaportrait.errors import InputError

logger = logging.getLogger(__name__)

# The meta-learned starting point (`train meta`, run meta_v4), inside the package: better than the bundled model
# over the first ~10 fine-tuning steps, not at the default 60 s (docs/results.md, Figure 7), so not the default.
BUNDLED_META = "assets/models/lite_meta"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from metaportrait.models.generator import PARTS
    from metaportrait.personalize import PersonalizeConfig

    defaults = PersonalizeConfig()
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("videos", type=Path, nargs="+", metavar="VIDEO", help="videos of one person")
    parser.add_argument("--output", "-o", type=Path, required=True, metavar="DIR", help="checkpoint folder to write")
    parser.add_argument("--checkpoint", default="default", metavar="meta|default|PATH",
                        help="starting model: 'default' (the bundled one-shot model), 'meta' (the bundled "
                             "meta-learned one), a checkpoint folder or a training run folder (default: default)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=_positive_float, default=None,
                        help=f"fine-tuning budget in wall seconds (default {defaults.seconds:g})")
    budget.add_argument("--steps", type=positive_int, default=None, help="fine-tuning budget in steps instead")
    parser.add_argument("--holdout-seconds", type=_positive_float, default=defaults.holdout_seconds,
                        help="the last this-many seconds of the last video are held out for the report")
    parser.add_argument("--part", choices=PARTS, default=defaults.part,
                        help="which part of the generator is tuned ('norms': its biases and normalisation scales)")
    parser.add_argument("--lr", type=_positive_float, default=defaults.lr, help="Adam learning rate")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="pairs per step")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR",
                        help="front-end cache (default: $XDG_CACHE_HOME/metaportrait/personalize)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--report-source-frames", action="store_true",
                        help="the final report also animates the person's training frames as source frames "
                             "(`animate --source-frames`; two more rows, so the report takes about twice as long)")


def resolve_checkpoint(name: str) -> Path:
    """The checkpoint folder of ``--checkpoint``: ``default``, ``meta``, a model folder or a run folder (its
    ``model/``)."""
    import importlib.resources

    from metaportrait.pipeline import bundled_checkpoint

    if name == "default":
        return bundled_checkpoint()
    if name == "meta":
        path = Path(str(importlib.resources.files("metaportrait") / BUNDLED_META))
        if not (path / "config.json").is_file():
            raise InputError(path, "the meta-learned checkpoint is missing from this install; use --checkpoint "
                                   "default or a `train meta` run folder")  # fmt: skip
        return path
    path = Path(name)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"  # a training run folder
    return path


def run(args: argparse.Namespace) -> int:
    import torch

    from metaportrait.io.checkpoint import load_model
    from metaportrait.personalize import PersonalizeConfig, personalize, temporary_folder

    try:
        cfg = PersonalizeConfig(
            part=args.part, lr=args.lr, batch_size=args.batch_size, holdout_seconds=args.holdout_seconds,
            seconds=None if args.steps is not None else (args.seconds or PersonalizeConfig().seconds),
            steps=args.steps, report_source_frames=args.report_source_frames,
        )  # fmt: skip
    except ValueError as error:
        raise InputError(args.output, f"invalid settings: {error}") from None
    if args.output.exists() and not args.overwrite:
        raise InputError(args.output, "already exists; pass --overwrite to replace it")
    for video in args.videos:
        if not video.is_file():
            raise InputError(video, "file not found")
    path = resolve_checkpoint(args.checkpoint)
    generator, model_cfg = load_model(path)
    torch.set_num_threads(args.threads)
    try:
        report = personalize(args.videos, args.output, generator, model_cfg, cfg, str(path), args.cache,
                             overwrite=args.overwrite)  # fmt: skip
    except KeyboardInterrupt:
        # write_checkpoint removes its temporary folder on the way out; nothing is left under --output.
        raise InputError(args.output, "interrupted; no checkpoint written") from None
    assert not temporary_folder(args.output).exists()
    methods = report["methods"]
    print(json.dumps({"front_end": report["front_end"], "training": report["training"], "heldout": methods},
                     indent=2))  # fmt: skip
    logger.info("wrote %s (model, report.json, report.png)", args.output)
    return 0
