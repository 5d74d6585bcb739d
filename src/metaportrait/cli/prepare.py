"""`metaportrait prepare`: turn a folder of talking-head videos into a training dataset.

Examples::

    metaportrait prepare my_videos/ --output datasets/mine256
    metaportrait prepare /work/shared/data --output /work/datasets/shared256 --size 256 --fps 25 --workers 2 \\
        --manifest /work/shared/data/MANIFEST.tsv

Every video under INPUT_DIR (recursive: .mp4 .mov .avi .webm .mpg .mpeg .mkv; other files are ignored) becomes
one clip of fixed face crops with dense landmarks, or a line in ``skipped.jsonl`` saying why not. Rerunning the
same command continues an interrupted run. Identity labels: see `metaportrait.data.prepare` (``--identities``
TSV, else ``--manifest``, else one folder per person).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from metaportrait.data.prepare import PrepareConfig, prepare_dataset

logger = logging.getLogger(__name__)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PrepareConfig()
    parser.add_argument("input_dir", type=Path, help="folder searched recursively for videos")
    parser.add_argument("--output", "-o", type=Path, required=True, help="dataset folder to create or continue")
    parser.add_argument("--size", type=_at_least(16), default=defaults.size, help="side of the square crops, pixels")
    parser.add_argument("--fps", type=_positive_float, default=defaults.fps, help="frame rate clips are resampled to")
    parser.add_argument("--workers", type=_at_least(1), default=1, help="clips processed in parallel (processes)")
    parser.add_argument("--max-frames", type=_at_least(1), default=None, help="keep at most N frames per clip")
    parser.add_argument(
        "--min-frames", type=_at_least(1), default=defaults.min_frames, help="skip clips with fewer face frames"
    )
    parser.add_argument(
        "--expand", type=_positive_float, default=defaults.expand, help="crop side / face-mesh box side"
    )
    parser.add_argument(
        "--shift", type=float, default=defaults.shift, help="vertical crop offset, fraction of the side (- = up)"
    )
    parser.add_argument(
        "--identities", type=Path, default=None,
        help="TSV of 'relative/path<TAB>identity' lines (paths relative to INPUT_DIR); overrides --manifest",
    )
    parser.add_argument(
        "--manifest", type=Path, default=None,
        help="shared-data MANIFEST.tsv: identity = its notes' 'identity: ...' text up to ';'",
    )


def run(args: argparse.Namespace) -> int:
    config = PrepareConfig(
        size=args.size, fps=args.fps, max_frames=args.max_frames, min_frames=args.min_frames,
        expand=args.expand, shift=args.shift,
    )
    summary = prepare_dataset(
        args.input_dir, args.output, config, workers=args.workers,
        identities_file=args.identities, manifest=args.manifest,
    )
    logger.info(
        "%s: %d clips prepared, %d skipped in this run (%d prepared and %d skipped earlier)",
        args.output, summary.prepared, summary.skipped, summary.already_done, summary.already_skipped,
    )
    return 0
