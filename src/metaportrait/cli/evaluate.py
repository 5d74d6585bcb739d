"""`metaportrait eval`: evaluation protocols, each comparing the baselines and trained models in one run.

Examples::

    metaportrait eval self --videos clips/*.mp4 --output runs/eval/self.json --checkpoint runs/base/final
    metaportrait eval self --videos a.mp4 b.mp4 --output self.json --compare lite=default --max-frames 50
    metaportrait eval cross --sources faces/*.jpg --driving drivers/*.mp4 --output cross.json --checkpoint CKPT
    metaportrait eval self --videos clips/*.mp4 --output self.json --checkpoint CKPT \
        --lpips-alexnet alexnet-owt-7be5be79.pth --lpips-linear alex.pth \
        --fid-inception pt_inception-2015-12-05-6726825d.pth
    metaportrait eval curve --runs runs/lite_full runs/masks_full --output docs/images/curves.json

Methods: ``source-copy`` and ``mesh-warp`` (face-masked, training-free) always, ``model`` for
``--checkpoint`` and one method per ``--compare NAME=PATH`` (``PATH`` = ``default`` is the bundled model).
Beside ``results.json`` the run writes ``results.md`` (Table 1-style), ``results.png`` (comparison grid) and
``results.mp4`` (source | driving | methods, side by side), and ``results_series.png`` when the results hold
curves. The published LPIPS and FID are computed only from weight files the user gives (nothing is downloaded;
`metaportrait.eval.reference_nets` says where they come from). ``curve`` turns training runs' validation logs
into curves (`metaportrait.eval.curves`). Protocol details: `metaportrait.eval.protocols`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path

from metaportrait.cli.animate import add_motion_arguments
from metaportrait.cli.arguments import positive_int
from metaportrait.errors import InputError
from metaportrait.io.atomic import write_text_atomic

logger = logging.getLogger(__name__)



def _named_checkpoint(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", type=Path, required=True,
                        help="results file (.json); .md, .png and .mp4 go beside it")
    parser.add_argument("--checkpoint", default=None, help="model checkpoint folder, evaluated as method 'model' "
                        "('default' = the bundled model); without it only the baselines run")
    parser.add_argument("--compare", type=_named_checkpoint, action="append", default=[], metavar="NAME=PATH",
                        help="another checkpoint to evaluate under NAME (repeatable)")
    parser.add_argument("--max-frames", type=positive_int, default=100, help="frames kept per clip, after --stride")
    parser.add_argument("--stride", type=positive_int, default=2, help="keep every K-th frame")
    parser.add_argument("--size", type=positive_int, default=256, help="evaluation crop size in pixels")
    parser.add_argument("--no-video", action="store_true", help="skip the side-by-side mp4")
    parser.add_argument("--no-baselines", action="store_true",
                        help="only the checkpoints, not the training-free baselines (source copy, mesh warp)")


def _add_reference_metrics(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("published LPIPS / FID (only with their weight files; never downloaded)")
    group.add_argument("--lpips-alexnet", type=Path, default=None, metavar="ALEXNET.pth",
                       help="torchvision's ImageNet alexnet-owt-7be5be79.pth (LPIPS trunk; needs --lpips-linear)")
    group.add_argument("--lpips-linear", type=Path, default=None, metavar="ALEX_LIN.pth",
                       help="the lpips package's weights/v0.1/alex.pth (LPIPS heads; needs --lpips-alexnet)")
    group.add_argument("--fid-inception", type=Path, default=None, metavar="PT_INCEPTION.pth",
                       help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    protocols = parser.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    self_parser = protocols.add_parser("self", help="self-reconstruction: frame 0 of a clip driven by its own frames")
    self_parser.add_argument("--videos", type=Path, nargs="+", required=True, help="talking-head clips")
    _add_common(self_parser)
    _add_reference_metrics(self_parser)
    cross = protocols.add_parser("cross", help="cross-identity reenactment: every source with every driver")
    cross.add_argument("--sources", type=Path, nargs="+", required=True, help="portrait images (or videos)")
    cross.add_argument("--driving", type=Path, nargs="+", required=True, help="driving clips")
    add_motion_arguments(cross)
    cross.add_argument("--no-region-retarget", dest="regions", action="store_false",
                       help="relative motion without the mouth and eye retargeting (the plain landmark residual)")
    _add_common(cross)
    _add_reference_metrics(cross)
    personal = protocols.add_parser("personalize", help="held-out tail quality against fine-tuning seconds, one "
                                    "curve per starting model (the paper's Figure 7)")  # fmt: skip
    personal.add_argument("--video", type=Path, required=True, help="a video of one person (its tail is held out)")
    personal.add_argument("--inits", type=_named_checkpoint, nargs="+", required=True, metavar="NAME=PATH",
                          help="starting models: 'default', 'meta', a model folder or a `train meta` run folder")
    personal.add_argument("--seconds", type=float, default=120.0, help="fine-tuning seconds of the longest point")
    personal.add_argument("--at", type=float, nargs="+", default=None, metavar="SECONDS_OR_STEPS",
                          help="report points in training seconds (default: 15, 30, 60, 90, ... up to --seconds), "
                               "or in steps with --unit steps")
    personal.add_argument("--unit", choices=("seconds", "steps"), default="seconds",
                          help="what --at counts: wall seconds of fine-tuning, or optimiser steps (the same points "
                               "whatever the machine's load)")
    personal.add_argument("--holdout-seconds", type=float, default=10.0, help="the held-out tail of the video")
    personal.add_argument("--report-stride", type=positive_int, default=5, help="every k-th tail frame is compared")
    personal.add_argument("--source-frames", action="store_true",
                          help="also report each init animating the video's training frames as source frames "
                               "(curves '<init>+frames')")
    personal.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    personal.add_argument("--cache", type=Path, default=None, metavar="DIR",
                          help="front-end cache (default: $XDG_CACHE_HOME/metaportrait/personalize)")
    personal.add_argument("--output", "-o", type=Path, required=True,
                          help="results file (.json); the plot goes beside it as <name>_series.png")
    sr = protocols.add_parser("sr", help="super-resolution on held-out 512 clips against bicubic, per frame and "
                              "temporal: warping error, PSNR, ST-LPIPS, sharpness (the paper's Table 2)")  # fmt: skip
    sr.add_argument("--data", type=Path, required=True, help="a `metaportrait prepare --size 512` dataset folder")
    sr.add_argument("--identities", required=True, help="the held-out identities (file or comma list)")
    sr.add_argument("--sr", default="default", help="SR weights: 'default' (bundled), a folder or an official .pth")
    sr.add_argument("--inputs", choices=("downscaled", "generated"), default="downscaled",
                    help="256 inputs: the real frames downscaled, or the base model's self-reconstruction of them")
    sr.add_argument("--checkpoint", default="default", help="base model for --inputs generated")
    sr.add_argument("--frames", type=positive_int, default=40, help="frames per clip, from its start")
    sr.add_argument("--lpips-every", type=positive_int, default=4, help="ST-LPIPS on every k-th frame")
    sr.add_argument("--grid-clips", type=int, nargs="*", default=[0, 2, 5], metavar="INDEX",
                    help="clips shown in the picture grid (<output>.jpg: bicubic | per frame | temporal | real)")
    sr.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    sr.add_argument("--output", "-o", type=Path, required=True, help="results file (.json; a .md table beside it)")
    curve = protocols.add_parser("curve", help="validation PSNR / face L1 vs step of training runs, as a plot")
    curve.add_argument("--runs", type=Path, nargs="+", required=True, metavar="RUN_DIR",
                       help="training run folders (each with val.jsonl); curves are named by folder")
    curve.add_argument("--output", "-o", type=Path, required=True,
                       help="results file (.json); the plot goes beside it as <name>_series.png")


def _check_inputs(args: argparse.Namespace) -> None:
    if args.output.suffix.lower() != ".json":
        raise InputError(args.output, "results file must end in .json")
    if not args.output.parent.is_dir():
        raise InputError(args.output.parent, "output folder does not exist")
    if args.protocol == "personalize":
        if not args.video.is_file():
            raise InputError(args.video, "file not found")
        return
    if args.protocol == "sr":
        if not (args.data / "manifest.jsonl").is_file():
            raise InputError(args.data, "not a prepared dataset (no manifest.jsonl); run `metaportrait prepare`")
        return
    if args.protocol == "curve":
        for run_dir in args.runs:
            if not run_dir.is_dir():
                raise InputError(run_dir, "run folder not found")
        return
    paths = args.videos if args.protocol == "self" else [*args.sources, *args.driving]
    # The weight files themselves are checked (existence, keys, shapes) when the networks are loaded.
    if args.lpips_alexnet is not None and args.lpips_linear is None:
        raise InputError(args.lpips_alexnet, "--lpips-alexnet needs --lpips-linear too (LPIPS = trunk + linear heads)")
    if args.lpips_linear is not None and args.lpips_alexnet is None:
        raise InputError(args.lpips_linear, "--lpips-linear needs --lpips-alexnet too (LPIPS = trunk + linear heads)")
    for path in paths:
        if not path.is_file():
            raise InputError(path, "file not found")


def _checkpoints(args: argparse.Namespace) -> dict[str, str]:
    from metaportrait.eval.protocols import BASELINES

    checkpoints = {"model": args.checkpoint} if args.checkpoint is not None else {}
    for name, path in args.compare:
        if name in checkpoints or name in BASELINES:
            raise InputError(name, f"method name used twice (baselines: {', '.join(BASELINES)})")
        checkpoints[name] = path
    return checkpoints


def _command(args: argparse.Namespace) -> str:
    """The command line with every setting spelled out (defaults included), for the results file."""
    parts = ["metaportrait", "eval", args.protocol]
    if args.protocol == "self":
        parts += ["--videos", *map(str, args.videos)]
    else:
        parts += ["--sources", *map(str, args.sources), "--driving", *map(str, args.driving), "--motion", args.motion,
                  "--reference", str(args.reference), "--expression-scale", f"{args.expression_scale:g}"]
        if not args.regions:
            parts += ["--no-region-retarget"]
    parts += ["--output", str(args.output), "--max-frames", str(args.max_frames), "--stride", str(args.stride),
              "--size", str(args.size)]
    if args.checkpoint is not None:
        parts += ["--checkpoint", args.checkpoint]
    if args.no_baselines:
        parts += ["--no-baselines"]
    for name, path in args.compare:
        parts += ["--compare", f"{name}={path}"]
    for flag, path in (("--lpips-alexnet", args.lpips_alexnet), ("--lpips-linear", args.lpips_linear),
                       ("--fid-inception", args.fid_inception)):
        if path is not None:
            parts += [flag, str(path)]
    return shlex.join(parts)


def _series_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}_series.png")


def _write_series(results: dict, output: Path) -> None:
    """``<output stem>_series.png`` with every curve of ``results["series"]`` (nothing when there are none)."""
    if results["series"]:
        from metaportrait.eval.plots import plot_series

        plot_series(results, _series_path(output))


def _run_curve(args: argparse.Namespace) -> int:
    from metaportrait.eval.curves import training_curves

    command = shlex.join(["metaportrait", "eval", "curve", "--runs", *map(str, args.runs),
                          "--output", str(args.output)])
    results = {"command": command, **training_curves(args.runs)}
    write_text_atomic(args.output, json.dumps(results, indent=2, allow_nan=False) + "\n")
    _write_series(results, args.output)
    logger.info("wrote %s and %s", args.output, _series_path(args.output))
    return 0


def _run_personalize(args: argparse.Namespace) -> int:
    """Fine-tune each init on the video's training part and report the held-out tail at each mark."""
    import torch

    from metaportrait.cli.personalize import resolve_checkpoint
    from metaportrait.eval.protocols import MetricModels
    from metaportrait.io.checkpoint import load_model
    from metaportrait.personalize import (
        PersonalizeConfig,
        budget_curve,
        check_one_person,
        default_cache_dir,
        front_end,
        mark_budget,
        split_holdout,
        tail_source_frames,
    )

    torch.set_num_threads(args.threads)
    if args.unit == "steps" and not args.at:
        raise InputError(args.output, "--unit steps needs the report points in steps: --at N [N ...]")
    marks = sorted(args.at or [m for m in (15, 30, 60, 90, 120, 180, 240, 300) if m < args.seconds] + [args.seconds])
    cfg = PersonalizeConfig(**mark_budget(args.unit, max(marks)), holdout_seconds=args.holdout_seconds,
                            report_stride=args.report_stride)  # fmt: skip
    models = MetricModels.load()
    starts = {}
    for name, path in args.inits:
        starts[name] = load_model(resolve_checkpoint(path))
    image_sizes = {cfg_.image_size for _, cfg_ in starts.values()}
    if len(image_sizes) != 1:
        raise InputError(args.video, f"the inits run at different sizes {sorted(image_sizes)}")
    frontend = front_end([args.video], image_sizes.pop(), args.cache or default_cache_dir())
    check_one_person(frontend.clips, models.identity)
    train, tail = split_holdout(frontend.clips, cfg)
    frames = tail_source_frames(train, tail) if args.source_frames else None
    points = {}
    for name, (generator, model_cfg) in starts.items():
        curve = budget_curve(generator, model_cfg, train, tail, cfg, models, marks, args.unit, frames)
        points[name] = [{k: v for k, v in p.items() if k != "with_source_frames"} for p in curve]
        if frames is not None:
            points[f"{name}+frames"] = [{**{k: p[k] for k in ("seconds", "steps", "loss")}, **p["with_source_frames"]}
                                        for p in curve]  # fmt: skip
    metrics_shown = (("psnr", "PSNR (dB)", False), ("face_l1", "face L1", True), ("st_lpips", "ST-LPIPS", True),
                     ("id_distance", "identity distance", True), ("e_warp", "warping error", True))  # fmt: skip
    series = {}
    for metric, label, lower in metrics_shown:
        for axis in ("seconds", "steps"):
            series[f"{metric}_vs_{axis}"] = {
                "x_label": "fine-tuning seconds" if axis == "seconds" else "fine-tuning steps",
                "y_label": f"held-out {label}", "lower_is_better": lower,
                "curves": {name: {"x": [p[axis] for p in curve], "y": [p[metric] for p in curve]}
                           for name, curve in points.items()},
            }  # fmt: skip
    command = shlex.join(["metaportrait", "eval", "personalize", "--video", str(args.video), "--inits",
                          *[f"{n}={p}" for n, p in args.inits], "--at", *map(str, marks), "--unit", args.unit,
                          "--holdout-seconds",
                          str(args.holdout_seconds), "--report-stride", str(args.report_stride), "--threads",
                          str(args.threads), "--output", str(args.output)]
                         + (["--source-frames"] if args.source_frames else []))  # fmt: skip
    results = {
        "protocol": "personalize", "command": command,
        "settings": {"video": str(args.video), "holdout_first_frame": tail.first_frame,
                     "heldout_frames": len(tail.usable_frames),
                     "training_frames": sum(len(c.usable_frames) for c in train), "design": cfg.to_dict()},
        "methods": {name: {metric: {"mean": curve[-1][metric], "per_clip": {}} for metric, _, _ in metrics_shown}
                    for name, curve in points.items()},
        "points": points,
        "series": series,
    }  # fmt: skip
    write_text_atomic(args.output, json.dumps(results, indent=2, allow_nan=False) + "\n")
    _write_series(results, args.output)
    print(json.dumps(points, indent=1))
    logger.info("wrote %s and %s", args.output, _series_path(args.output))
    return 0


def _run_sr(args: argparse.Namespace) -> int:
    """Table 2 on the held-out clips of a 512 dataset."""
    import torch

    from metaportrait.data.dataset import PreparedDataset, parse_identities
    from metaportrait.eval import report
    from metaportrait.eval.sr import evaluate_sr
    from metaportrait.io.image import write_image
    from metaportrait.upscale import load_sr

    torch.set_num_threads(args.threads)
    model = load_sr(args.sr)
    held_out = set(parse_identities(args.identities))
    clips = [c for c in PreparedDataset(args.data) if c.identity in held_out and c.frame_count >= 2]
    if not clips:
        raise InputError(args.data, "no clip of the given identities (check --identities)")
    animator = None
    if args.inputs == "generated":
        from metaportrait.pipeline import Animator

        animator = Animator.from_pretrained(args.checkpoint)
        if animator.config.image_size != model.cfg.input_size:
            raise InputError(args.checkpoint, f"the base model renders {animator.config.image_size} px faces; the "
                                              f"SR network takes {model.cfg.input_size} px")  # fmt: skip
    results, grid = evaluate_sr(model, clips, frames=args.frames, inputs=args.inputs, animator=animator,
                                lpips_every=args.lpips_every, grid_clips=args.grid_clips,
                                progress=lambda name: logger.info("%s done", name))  # fmt: skip
    command = shlex.join(["metaportrait", "eval", "sr", "--data", str(args.data), "--identities", args.identities,
                          "--sr", str(args.sr), "--inputs", args.inputs, "--checkpoint", args.checkpoint,
                          "--frames", str(args.frames), "--lpips-every", str(args.lpips_every), "--grid-clips",
                          *map(str, args.grid_clips), "--threads", str(args.threads), "--output", str(args.output)])
    results = {"command": command, **results}
    table = report.markdown_table(results)
    write_text_atomic(args.output, json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_text_atomic(args.output.with_suffix(".md"),
                      f"# sr evaluation ({args.inputs} inputs)\n\n`{command}`\n\n{table}")
    if grid is not None:
        write_image(args.output.with_suffix(".jpg"), grid)
    print(table, end="")
    logger.info("wrote %s (+ .md%s)", args.output, ", .jpg" if grid is not None else "")
    return 0


def run(args: argparse.Namespace) -> int:
    from metaportrait.eval import protocols, report
    from metaportrait.io.image import write_image
    from metaportrait.io.video import VideoWriter, even_size

    _check_inputs(args)
    if args.protocol == "curve":
        return _run_curve(args)
    if args.protocol == "personalize":
        return _run_personalize(args)
    if args.protocol == "sr":
        return _run_sr(args)
    checkpoints = _checkpoints(args)
    hashes = {}
    for name, path in checkpoints.items():
        if path == "default":
            from metaportrait.pipeline import bundled_checkpoint

            path = bundled_checkpoint()
        hashes[name] = protocols.checkpoint_sha256(path)
    baselines = {} if args.no_baselines else protocols.BASELINES
    if not baselines and not checkpoints:
        raise InputError(args.output, "--no-baselines leaves nothing to evaluate: give --checkpoint or --compare")
    methods = {**baselines, **protocols.methods_from_checkpoints(checkpoints)}
    lpips_files = (args.lpips_alexnet, args.lpips_linear) if args.lpips_alexnet is not None else None
    models = protocols.MetricModels.load(lpips_files=lpips_files, fid_inception=args.fid_inception)
    options = {"size": args.size, "max_frames": args.max_frames, "stride": args.stride}
    if args.protocol == "self":
        outcome = protocols.evaluate_self(args.videos, methods, models, **options)
    else:
        outcome = protocols.evaluate_cross(args.sources, args.driving, methods, models, motion=args.motion,
                                           reference=args.reference, expression_scale=args.expression_scale,
                                           regions=args.regions, **options)

    results = {"protocol": outcome.results["protocol"], "command": _command(args), "checkpoints": hashes,
               **outcome.results}
    table = report.markdown_table(results)
    write_text_atomic(args.output, json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_text_atomic(args.output.with_suffix(".md"), f"# {args.protocol} evaluation\n\n`{results['command']}`\n\n{table}")
    write_image(args.output.with_suffix(".png"), report.comparison_grid(outcome.visuals))
    _write_series(results, args.output)
    if not args.no_video:
        with VideoWriter(args.output.with_suffix(".mp4"), fps=outcome.visuals.fps) as writer:
            for frame in report.side_by_side_frames(outcome.visuals):
                writer.write(even_size(frame))
    print(table, end="")
    logger.info("wrote %s (+ .md, .png%s)", args.output, "" if args.no_video else ", .mp4")
    return 0
