"""`metaportrait animate`: a portrait made to follow a driving video, written as an H.264 mp4.

Examples::

    metaportrait animate -s portrait.jpg -d driving.mp4 -o result.mp4
    metaportrait animate -s portrait.jpg -d driving.mp4 -o result.mp4 --motion absolute --max-frames 100
    metaportrait animate -s portrait.jpg -d driving.mp4 -o face_crop.mp4 --crop-output --eyes 1.2 --yaw 10

The source may be an image or a video (its first frame is used). The output has the driving video's frame
rate (or ``--fps``) and its audio, cut to the video's length. Frames are streamed, so memory does not grow
with the length of the driving video; the output appears only when it is complete. The steps overlap: the
driving video is decoded and tracked in background threads ahead of the generator, and the output is encoded
in another behind it (``--no-overlap``: one step after another, the same frames); ``--threads`` sets torch's.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import get_args

import numpy as np

from metaportrait.cli.arguments import positive_int, reference_frame
from metaportrait.config import Precision
from metaportrait.errors import InputError
from metaportrait.motion import MAX_YAW_PITCH_DEGREES, REFERENCES_HELP, Controls

logger = logging.getLogger(__name__)

VIDEO_OUTPUT_SUFFIXES = (".mp4", ".mov")


# --- argument helpers shared with `metaportrait edit` --------------------------------------------------------

def _bounded_float(low: float | None, high: float | None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not np.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return value

    return parse


def add_motion_arguments(parser: argparse.ArgumentParser) -> None:
    """``--motion``, ``--reference`` and ``--expression-scale`` (see `metaportrait.motion.retarget_motion`)."""
    parser.add_argument("--motion", choices=("relative", "absolute"), default="relative",
                        help="relative: follow the driver's motion but keep the portrait's face shape, mouth and "
                             "eye openness carried across onto the portrait's own lips and lids (default); "
                             "absolute: use the driver's landmarks as they are")
    parser.add_argument("--reference", type=reference_frame, default="auto",
                        help=f"relative motion's starting frame: {REFERENCES_HELP}; default auto")
    parser.add_argument("--expression-scale", type=_bounded_float(0.0, 3.0), default=1.0,
                        help="strength of the driver's expression change: 1 as the driver, 0 none, 1.3 stronger")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--eyelid-fill``, ``--no-paste-back``, ``--no-source-detail`` and ``--crop-output``."""
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint folder (model.safetensors + config.json); default: the bundled lite model")
    parser.add_argument("--eyelid-fill", action=argparse.BooleanOptionalAction, default=None,
                        help="close the eyes as lids of skin brought down by the mesh prior instead of the model's "
                             "stretched lashes (default: the checkpoint's; off in the bundled one, see "
                             "docs/experiments.md, the lid fill of 2026-11-25)")  # fmt: skip
    parser.add_argument("--no-paste-back", dest="paste_back", action="store_false",
                        help="do not blend the generated face back into the full portrait: write the face crop")
    parser.add_argument("--no-source-detail", dest="keep_source_detail", action="store_false",
                        help="paste the whole generated crop back; by default the portrait's own pixels stay where "
                             "the model leaves the source still (sharper hair and background)")  # fmt: skip
    parser.add_argument("--crop-output", action="store_true",
                        help="write just the generated face crop (the model's size, 256 for the bundled model)")
    parser.add_argument("--backend", choices=("torch", "onnx", "compiled"), default="torch",
                        help="run the generator in torch, in ONNX Runtime (exported on first use and cached), or "
                             "compiled to C++ (fastest; built on first use in about a minute and cached; needs a "
                             "C++ compiler)")
    parser.add_argument("--onnx-folder", type=Path, default=None,
                        help="with --backend onnx: the export's folder (default: a cache folder per checkpoint)")


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    """Expression and head-pose controls (see `metaportrait.motion.edit_landmarks`)."""
    group = parser.add_argument_group("expression and pose controls")
    group.add_argument("--eyes", type=_bounded_float(0.0, 3.0), default=None,
                       help="eye openness factor: 1 unchanged, 0 closed, 1.3 wider")
    group.add_argument("--mouth", type=_bounded_float(0.0, 1.5), default=None,
                       help="mouth openness (inner-lip gap / mouth width): 0 closed, 0.3 talking, 0.6 open jaw; "
                            "when animating, it replaces the driver's mouth motion")
    angle = _bounded_float(-MAX_YAW_PITCH_DEGREES, MAX_YAW_PITCH_DEGREES)
    group.add_argument("--yaw", type=angle, default=0.0, help="head turn in degrees (+ = nose to the image's right)")
    group.add_argument("--pitch", type=angle, default=0.0, help="head nod in degrees (+ = nose down)")
    group.add_argument("--roll", type=_bounded_float(-90.0, 90.0), default=0.0,
                       help="head tilt in degrees (+ = clockwise on screen)")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=get_args(Precision), default="auto",
                        help="the networks' arithmetic (generator, super-resolution): bf16 (bfloat16 autocast: "
                             "faster; generated face crops within 57 dB PSNR of fp32's) or fp32; auto (default): bf16 "
                             "where the CPU has it natively")


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads``, ``--no-overlap`` and ``--precision``."""
    add_precision_argument(parser)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads for the generator (default: torch's own choice)")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="run decoding, landmark tracking, the generator and encoding one after another "
                             "instead of side by side in threads (the same frames)")


def controls_from_args(args: argparse.Namespace) -> Controls:
    return Controls(eyes=args.eyes, mouth=args.mouth, yaw=args.yaw, pitch=args.pitch, roll=args.roll)


def check_output_path(path: Path, suffixes: tuple[str, ...]) -> Path:
    """Fail before any work if ``path`` cannot be written: wrong suffix, missing or read-only folder."""
    if path.suffix.lower() not in suffixes:
        raise InputError(path, f"output must end with one of {', '.join(suffixes)}")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(path, f"output folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(path, f"output folder {str(folder)!r} is not writable")
    if path.is_dir():
        raise InputError(path, "is a folder; give a file name")
    return path


def read_source(path: Path) -> np.ndarray:
    """The portrait: an image, or the first frame of a video (``uint8`` ``(H, W, 3)`` RGB)."""
    from metaportrait.io.image import is_video_path, read_image
    from metaportrait.io.video import VideoReader

    if is_video_path(path):
        with VideoReader(path) as reader:
            return next(iter(reader))
    return read_image(path)


def read_source_frames(value: Path | bool | None, source: Path, source_image: np.ndarray):
    """`--source-frames`: None, or the `SourceFrames` of the given video (True: of the ``source`` video), checked to
    have the portrait's framing."""
    from metaportrait.errors import InputError
    from metaportrait.io.image import is_video_path
    from metaportrait.source_frames import SourceFrames

    if value is None:
        return None
    if value is True:
        if not is_video_path(source):
            raise InputError(source, "--source-frames without a video needs --source to be a video")
        value = source
    frames = SourceFrames.from_video(value)
    frames.check_framing(*source_image.shape[:2])
    return frames


# --- the subcommand ------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", "-s", type=Path, required=True, help="portrait image (or video: first frame)")
    parser.add_argument("--driving", "-d", type=Path, required=True, help="driving video")
    parser.add_argument("--output", "-o", type=Path, required=True, help="output video (.mp4 or .mov)")
    parser.add_argument("--source-frames", nargs="?", const=True, default=None, metavar="VIDEO",
                        help="other frames of the portrait's person from the same camera (default: the --source "
                             "video itself): per output frame the one nearest in pose and expression is animated "
                             "instead of the portrait (sharper teeth, profile and hair; the background is that "
                             "frame's)")
    add_motion_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--max-frames", type=positive_int, default=None, metavar="N", help="stop after N output frames")
    parser.add_argument("--fps", type=_bounded_float(1.0, 240.0), default=None,
                        help="output frame rate (default: the driving video's); frames are dropped or repeated")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="frames per generator call")
    add_speed_arguments(parser)
    parser.add_argument("--sr", nargs="?", const=True, default=None, metavar="WEIGHTS",
                        help="super-resolve the face to 512 (temporal SR over a sliding window) before pasting it "
                             "back: the bundled SR network, or a folder / official .pth file given here")
    add_control_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import torch

    from metaportrait.io.video import VideoReader, VideoWriter, even_size, resample_fps
    from metaportrait.pipeline import Animator
    from metaportrait.stages import WriteBehind

    # 1. Check every input and the output location before loading the model.
    output = check_output_path(args.output, VIDEO_OUTPUT_SUFFIXES)
    source_image = read_source(args.source)
    controls = controls_from_args(args)
    source_frames = read_source_frames(args.source_frames, args.source, source_image)
    with VideoReader(args.driving) as reader:
        fps = args.fps or reader.fps
        expected = round(reader.frame_count * fps / reader.fps)
        if args.max_frames is not None:
            expected = min(expected, args.max_frames)
        animator = Animator.from_pretrained(args.checkpoint, batch_size=args.batch_size,
                                            keep_source_detail=args.keep_source_detail,
                                            eyelid_fill=args.eyelid_fill, backend=args.backend,
                                            onnx_folder=args.onnx_folder, sr=args.sr,
                                            overlap=args.overlap, precision=args.precision)  # fmt: skip
        if args.threads is not None:
            torch.set_num_threads(args.threads)

        # 2. Driving frames, lazily: resampled to the output rate, cut to --max-frames.
        driving = iter(reader) if args.fps is None else resample_fps(reader, reader.fps, fps)
        driving = itertools.islice(driving, args.max_frames)
        frames = animator(source_image, driving, motion=args.motion, paste_back=args.paste_back,
                          crop_output=args.crop_output, controls=controls, reference=args.reference,
                          expression_scale=args.expression_scale, driving_fps=fps,
                          source_name=args.source, driving_name=args.driving, source_frames=source_frames)

        # 3. Stream into the writer; it renames its temporary file only if everything succeeded. With overlap the
        #    encoder runs behind in its own thread (joined before the writer closes or aborts), and the frames'
        #    background stages are ended (closing) before the driving video is closed.
        audio = args.driving if reader.has_audio else None
        with contextlib.closing(frames), VideoWriter(output, fps, audio_from=audio) as writer, tqdm(
            total=expected, unit="frame", desc="animate", disable=None, file=sys.stderr
        ) as progress:
            def write(frame: np.ndarray) -> None:
                writer.write(even_size(frame))  # H.264 needs even sides
                progress.update()

            with WriteBehind(write, depth=2 * args.batch_size, name="metaportrait-encode") if args.overlap \
                    else contextlib.nullcontext() as behind:
                put = write if behind is None else behind.put
                for frame in frames:
                    put(frame)

    stats = animator.stats
    reference = "" if stats.reference_frame is None else f", motion relative to driving frame {stats.reference_frame}"
    if source_frames is not None:
        reference += (f", {stats.sources_used} of {len(source_frames) + 1} sources used, "
                      f"{stats.source_switches} switches")
    logger.info(
        "wrote %s: %d frames in %.1f s (%.2f frames/s), %d frames with lost face tracking%s%s",
        output, stats.frames, stats.seconds, stats.fps, stats.lost_frames, reference, ", with audio" if audio else "",
    )
    return 0
