"""Source frames against the appearance scale: the measurement behind docs/experiments.md (2026-12-07, "source
frames that look like the portrait").

For each ``VIDEO:HOLDOUT_SECONDS`` (the last seconds held out, as `metaportrait eval personalize`), the bundled
model's report of the held-out tail (`metaportrait.personalize.tail_report`: the tail's first frame animated
along the later frames' landmarks, every 5th frame compared), without and with source frames (up to 64 frames of
the part before the tail), once per ``--scales`` value of `SourceChooser`'s ``appearance_scale`` (``inf``: the
landmark distance alone). Prints one JSON line per (video, scale)::

    H=../shared/data/hires
    python scripts/source_frames_scale.py --threads 1 --scales inf 20 10 5 \\
        $H/latentsync_demo3_video.mp4:10 $H/joygen_example_15s.mp4:5 $H/styleheat_demo_video.mp4:5 \\
        ../shared/data/personal/obama/lia_obama.mov:10
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import torch

import metaportrait.pipeline as pipeline
from metaportrait.eval.protocols import MetricModels
from metaportrait.io.checkpoint import load_model
from metaportrait.pipeline import bundled_checkpoint
from metaportrait.personalize import (
    HeldOutTail,
    PersonalizeConfig,
    default_cache_dir,
    front_end,
    split_holdout,
    tail_report,
    tail_source_frames,
)
from metaportrait.source_frames import SourceChooser

METRICS = ("psnr", "face_l1", "st_lpips", "id_distance", "e_warp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", nargs="+", metavar="VIDEO:HOLDOUT_SECONDS")
    parser.add_argument("--scales", nargs="+", type=float, default=[math.inf, 20.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = MetricModels.load()
    generator, model_cfg = load_model(bundled_checkpoint())
    for item in args.videos:
        path, holdout = item.rsplit(":", 1)
        cfg = PersonalizeConfig(holdout_seconds=float(holdout))
        clips = front_end([path], model_cfg.image_size, default_cache_dir()).clips
        train, tail = split_holdout(clips, cfg)
        frames = tail_source_frames(train, tail)
        held = HeldOutTail.of(tail, cfg.report_stride)
        for scale in args.scales:
            # inf: every appearance factor is 1, i.e. the choice by landmarks alone.
            pipeline.SourceChooser = functools.partial(SourceChooser, appearance_scale=scale)
            report = tail_report({"x": generator}, model_cfg, held, models, frames)
            print(json.dumps({"video": path, "scale": scale,
                              "plain": {k: report["x"][k] for k in METRICS},
                              "source_frames": {k: report["x + source frames"][k] for k in METRICS}}), flush=True)


if __name__ == "__main__":
    main()
