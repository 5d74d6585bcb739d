"""`metaportrait live`: a portrait driven live by a camera or by a file played in real time.

Examples::

    metaportrait live --source me.jpg --driving 0 --output live.mp4        # camera 0, until Ctrl-C
    metaportrait live --source me.jpg --driving talk.mp4 --output live.mp4  # the file at its own frame rate

Frames are taken as they arrive, the newest first: when the model is slower than the input, frames are dropped
instead of falling behind, and the output repeats the last frame in their place so it stays in time. The motion
is relative to the most neutral driving frame seen so far (``--reference running`` of `animate`). At the end one
JSON line reports frames offered / processed / dropped, frames per second and latency (p50, p95).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from metaportrait.cli import animate as animate_cli
from metaportrait.cli.arguments import positive_int

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", "-s", type=Path, required=True, help="portrait image (or video: first frame)")
    parser.add_argument("--driving", "-d", required=True, metavar="CAMERA_INDEX|FILE",
                        help="a camera index (0, 1, ...) or a video file, played at its own frame rate")
    parser.add_argument("--output", "-o", type=Path, default=None, help="also write the result (.mp4 or .mov)")
    parser.add_argument("--max-frames", type=positive_int, default=None, metavar="N",
                        help="stop a camera after N frames (default: until Ctrl-C)")
    parser.add_argument("--expression-scale", type=animate_cli._bounded_float(0.0, 3.0), default=1.0,
                        help="strength of the driver's expression change: 1 as the driver, 0 none")
    animate_cli.add_model_arguments(parser)
    animate_cli.add_precision_argument(parser)


def run(args: argparse.Namespace) -> int:
    from metaportrait.io.video import VideoWriter, even_size
    from metaportrait.live import CameraSource, FileSource, run_live
    from metaportrait.pipeline import Animator

    # 1. Inputs and the output location, before loading the model.
    output = None if args.output is None else animate_cli.check_output_path(args.output, animate_cli.VIDEO_OUTPUT_SUFFIXES)
    portrait = animate_cli.read_source(args.source)
    if args.driving.isdigit():
        source = CameraSource(int(args.driving), args.max_frames)
    else:
        source = FileSource(args.driving)
    animator = Animator.from_pretrained(args.checkpoint, batch_size=1, keep_source_detail=args.keep_source_detail,
                                        eyelid_fill=args.eyelid_fill, backend=args.backend,
                                        onnx_folder=args.onnx_folder, precision=args.precision)

    # 2. Run; the writer renames its temporary file only if everything succeeded.
    with VideoWriter(output, source.fps) if output is not None else contextlib.nullcontext() as writer:
        def on_frame(frame, repeats: int) -> None:
            if writer is not None:
                for _ in range(repeats):
                    writer.write(even_size(frame))

        report = run_live(animator, portrait, source, on_frame, expression_scale=args.expression_scale,
                          paste_back=args.paste_back and not args.crop_output, portrait_name=args.source)
    print(json.dumps(report.to_dict()), file=sys.stdout)
    if output is not None:
        logger.info("wrote %s", output)
    return 0
