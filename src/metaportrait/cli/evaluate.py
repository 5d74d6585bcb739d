"""`metaportrait eval`: evaluation protocols, each comparing the baselines and trained models in one run.

Examples::

    metaportrait eval self --videos clips/*.mp4 --output runs/eval/self.json --checkpoint runs/base/final
    metaportrait eval self --videos a.mp4 b.mp4 --output self.json --compare lite=default --max-frames 50
    metaportrait eval cross --sources faces/*.jpg --driving drivers/*.mp4 --output cross.json --checkpoint CKPT

Methods: ``source-copy`` and ``mesh-warp`` (face-masked, training-free) always, ``model`` for
``--checkpoint`` and one method per ``--compare NAME=PATH`` (``PATH`` = ``default`` is the bundled model).
Beside ``results.json`` the run writes ``results.md`` (Table 1-style), ``results.png`` (comparison grid) and
``results.mp4`` (source | driving | methods, side by side). Protocol details: `metaportrait.eval.protocols`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    protocols = parser.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    self_parser = protocols.add_parser("self", help="self-reconstruction: frame 0 of a clip driven by its own frames")
    self_parser.add_argument("--videos", type=Path, nargs="+", required=True, help="talking-head clips")
    _add_common(self_parser)
    cross = protocols.add_parser("cross", help="cross-identity reenactment: every source with every driver")
    cross.add_argument("--sources", type=Path, nargs="+", required=True, help="portrait images (or videos)")
    cross.add_argument("--driving", type=Path, nargs="+", required=True, help="driving clips")
    cross.add_argument("--motion", choices=("relative", "absolute"), default="relative",
                       help="how driver motion is transferred to the source face")
    _add_common(cross)


def _check_inputs(args: argparse.Namespace) -> None:
    if args.output.suffix.lower() != ".json":
        raise InputError(args.output, "results file must end in .json")
    if not args.output.parent.is_dir():
        raise InputError(args.output.parent, "output folder does not exist")
    paths = args.videos if args.protocol == "self" else [*args.sources, *args.driving]
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
        parts += ["--sources", *map(str, args.sources), "--driving", *map(str, args.driving), "--motion", args.motion]
    parts += ["--output", str(args.output), "--max-frames", str(args.max_frames), "--stride", str(args.stride),
              "--size", str(args.size)]
    if args.checkpoint is not None:
        parts += ["--checkpoint", args.checkpoint]
    for name, path in args.compare:
        parts += ["--compare", f"{name}={path}"]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from metaportrait.eval import protocols
    from metaportrait.io.image import write_image
    from metaportrait.io.video import VideoWriter, even_size

    _check_inputs(args)
    checkpoints = _checkpoints(args)
    hashes = {}
    for name, path in checkpoints.items():
        if path == "default":
            from metaportrait.pipeline import bundled_checkpoint

            path = bundled_checkpoint()
        hashes[name] = protocols.checkpoint_sha256(path)
    methods = {**protocols.BASELINES, **protocols.methods_from_checkpoints(checkpoints)}
    models = protocols.MetricModels.load()
    options = dict(size=args.size, max_frames=args.max_frames, stride=args.stride)
    if args.protocol == "self":
        outcome = protocols.evaluate_self(args.videos, methods, models, **options)
    else:
        outcome = protocols.evaluate_cross(args.sources, args.driving, methods, models, motion=args.motion, **options)

    results = {"protocol": outcome.results["protocol"], "command": _command(args), "checkpoints": hashes,
               **outcome.results}
    table = protocols.markdown_table(results)
    write_text_atomic(args.output, json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_text_atomic(args.output.with_suffix(".md"), f"# {args.protocol} evaluation\n\n`{results['command']}`\n\n{table}")
    write_image(args.output.with_suffix(".png"), protocols.comparison_grid(outcome.visuals))
    if not args.no_video:
        with VideoWriter(args.output.with_suffix(".mp4"), fps=outcome.visuals.fps) as writer:
            for frame in protocols.side_by_side_frames(outcome.visuals):
                writer.write(even_size(frame))
    print(table, end="")
    logger.info("wrote %s (+ .md, .png%s)", args.output, "" if args.no_video else ", .mp4")
    return 0
