"""`metaportrait upscale`: super-resolve the face of any face video (256 crop -> 512), written as an H.264 mp4.

Examples::

    metaportrait upscale talking.mp4 -o talking_sr.mp4
    metaportrait upscale talking.mp4 -o face512.mp4 --crop-output --sr runs/sr/model

The face is tracked and cropped as in `metaportrait animate`; each crop goes through the temporal SR network over
a sliding window (`metaportrait.upscale.StreamingSR`) and is pasted back at the frame's own resolution. Audio is
kept. The output appears only when it is complete.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from metaportrait.cli.animate import VIDEO_OUTPUT_SUFFIXES, add_precision_argument, check_output_path
from metaportrait.cli.arguments import positive_int

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", type=Path, help="a video with one face")
    parser.add_argument("--output", "-o", type=Path, required=True, help="output video (.mp4 or .mov)")
    parser.add_argument("--sr", default="default", metavar="WEIGHTS",
                        help="SR network: a `train sr` model folder or an official .pth file (default: bundled)")
    parser.add_argument("--crop-output", action="store_true", help="write the 512 face crops instead")
    parser.add_argument("--chunk", type=positive_int, default=None,
                        help="frames per network call (default 4)")
    parser.add_argument("--context", type=int, default=None,
                        help="windows instead of the default exact streaming: chunks with this many frames of "
                             "context on each side, computed again for each chunk (0: none across chunks)")
    parser.add_argument("--max-frames", type=positive_int, default=None, metavar="N", help="stop after N frames")
    add_precision_argument(parser)


def run(args: argparse.Namespace) -> int:
    import itertools

    from tqdm import tqdm

    from metaportrait.io.video import VideoReader, VideoWriter, even_size
    from metaportrait.pipeline import resolve_precision
    from metaportrait.upscale import DEFAULT_CHUNK, StreamingSR, load_sr, upscale_video

    output = check_output_path(args.output, VIDEO_OUTPUT_SUFFIXES)
    chunk = DEFAULT_CHUNK if args.chunk is None else args.chunk
    sr = StreamingSR(load_sr(args.sr), chunk=chunk, context=args.context, precision=resolve_precision(args.precision))
    start, count = time.perf_counter(), 0
    with VideoReader(args.video) as reader:
        frames = itertools.islice(iter(reader), args.max_frames)
        audio = args.video if reader.has_audio else None
        total = reader.frame_count if args.max_frames is None else min(reader.frame_count, args.max_frames)
        with VideoWriter(output, reader.fps, audio_from=audio) as writer, tqdm(
            total=total, unit="frame", desc="upscale", disable=None, file=sys.stderr
        ) as progress:
            for frame in upscale_video(frames, sr, reader.fps, args.crop_output, name=args.video):
                writer.write(even_size(frame))
                count += 1
                progress.update()
    seconds = time.perf_counter() - start
    logger.info("wrote %s: %d frames in %.1f s (%.2f frames/s)", output, count, seconds, count / max(seconds, 1e-9))
    return 0
