"""Personalisation designs against fine-tuning time: the measurement behind docs/experiments.md (2026-12-06).

For each video and each design (``PART:LR[:FLAG...]``; flags: ``nopercep``, ``percepN``, ``l1xF``, ``emaD`` (weight
average with decay D), ``aug`` / ``augc`` (zoom and shift / and colour augmentation), ``bN`` (batch size N),
``idW`` (the identity loss, 1 - cos of the dlib embeddings of output and source, at weight W)), runs
`metaportrait.personalize` steps 1-3 from the given checkpoint and, at 0 s and at every ``--at`` seconds of
fine-tuning, the report of step 4 on the held-out tail (the time of the reports is not counted). ``--oracle``
trains on the tail itself instead: what the design could fit of those frames in the time, an upper bound for any
held-out gain. Prints one JSON line per (video, design, seconds)::

    H=../shared/data/hires
    python scripts/personalize_budgets.py --checkpoint default --videos $H/mimictalk_German_20s.mp4 \\
        --designs refine:1e-3 decoder:1e-3 all:1e-3 refine:3e-4 refine:1e-3:nopercep --at 30 60 120 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from metaportrait.cli.personalize import resolve_checkpoint
from metaportrait.data.pairs import AugmentConfig
from metaportrait.eval.protocols import MetricModels
from metaportrait.io.checkpoint import load_model
from metaportrait.personalize import (
    PersonalizeConfig,
    budget_curve,
    check_one_person,
    default_cache_dir,
    front_end,
    split_holdout,
)


def design_config(text: str, seconds: float, holdout: float, stride: int) -> PersonalizeConfig:
    """``PART:LR[:FLAG...]`` -> the `PersonalizeConfig` of that design (flags: the module docstring)."""
    part, lr, *flags = text.split(":")
    cfg = PersonalizeConfig(part=part, lr=float(lr), seconds=seconds, holdout_seconds=holdout, report_stride=stride,
                            eval_every=1e9)  # fmt: skip
    for flag in flags:  # percepN: the perceptual term N times stronger; l1xF: the pixel L1 terms times F
        if flag == "nopercep":
            cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, perceptual_output=(0.0,) * 5))
        elif flag.startswith("percep"):
            weights = tuple(w * float(flag[len("percep"):]) for w in cfg.loss.perceptual_output)
            cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, perceptual_output=weights))
        elif flag in ("aug", "augc"):  # base training's zoom and shift, no flip; augc: and its colour changes
            colour = 0.15 if flag == "augc" else 0.0
            cfg = dataclasses.replace(cfg, augment=AugmentConfig(flip=0.0, brightness=colour, contrast=colour,
                                                                 saturation=colour))
        elif flag.startswith("ema"):  # emaD: keep an average of the weights with decay D
            cfg = dataclasses.replace(cfg, average_decay=float(flag[len("ema"):]))
        elif flag.startswith("b") and flag[1:].isdigit():  # bN: batches of N pairs
            cfg = dataclasses.replace(cfg, batch_size=int(flag[1:]))
        elif flag.startswith("id") and flag[2:].replace(".", "", 1).isdigit():  # idW: the identity loss at weight W
            cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, identity=float(flag[2:])))
        elif flag.startswith("l1x"):
            factor = float(flag[len("l1x"):])
            cfg = dataclasses.replace(cfg, loss=dataclasses.replace(
                cfg.loss, l1_output=cfg.loss.l1_output * factor, face=cfg.loss.face * factor))
        else:
            raise SystemExit(f"error: design {text!r}: unknown flag {flag!r}")
    return cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=Path, nargs="+", required=True, help="one person per video")
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--designs", nargs="+", default=["refine:1e-3"], metavar="PART:LR[:FLAG...]")
    parser.add_argument("--at", type=float, nargs="+", default=[30.0, 60.0, 120.0], metavar="SECONDS")
    parser.add_argument("--holdout-seconds", type=float, default=10.0)
    parser.add_argument("--report-stride", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--oracle", action="store_true",
                        help="train on the held-out tail itself: the most the budget could gain there (a bound)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_checkpoint(args.checkpoint)
    start, model_cfg = load_model(path)
    models = MetricModels.load()
    for video in args.videos:
        frontend = front_end([video], model_cfg.image_size, default_cache_dir())
        check_one_person(frontend.clips, models.identity)
        for design in args.designs:
            cfg = design_config(design, max(args.at), args.holdout_seconds, args.report_stride)
            train, tail = split_holdout(frontend.clips, cfg)
            if args.oracle:
                train = [tail]
            for point in budget_curve(start, model_cfg, train, tail, cfg, models, args.at):
                print(json.dumps({"video": video.stem, "checkpoint": args.checkpoint, "design": design,
                                  "oracle": args.oracle, **point}),
                      flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
