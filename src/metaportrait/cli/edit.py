"""`metaportrait edit`: change the expression or head pose of one portrait and write a single image.

Examples::

    metaportrait edit -s portrait.jpg --mouth 0.6 -o open_mouth.png
    metaportrait edit -s portrait.jpg --yaw 15 --pitch -5 --eyes 0 -o turned.png

Without any control the output is the model's reconstruction of the portrait (useful to judge the model).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from metaportrait.cli.animate import (
    add_control_arguments,
    add_model_arguments,
    check_output_path,
    controls_from_args,
    read_source,
)

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", "-s", type=Path, required=True, help="portrait image (or video: first frame)")
    parser.add_argument("--output", "-o", type=Path, required=True, help="output image (.png, .jpg, .webp, .bmp)")
    add_model_arguments(parser)
    add_control_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from metaportrait.data.landmarks import landmarks_of_image
    from metaportrait.io.image import IMAGE_SUFFIXES, write_image
    from metaportrait.pipeline import Animator

    output = check_output_path(args.output, IMAGE_SUFFIXES)
    image = read_source(args.source)
    points = landmarks_of_image(image, args.source)
    animator = Animator.from_pretrained(args.checkpoint, batch_size=1, keep_source_detail=args.keep_source_detail,
                                        eyelid_fill=args.eyelid_fill, backend=args.backend,
                                        onnx_folder=args.onnx_folder)
    # One target: the portrait's own landmarks; the controls turn them into the edit.
    frames = animator.animate_landmarks(image, [points], paste_back=args.paste_back, crop_output=args.crop_output,
                                        controls=controls_from_args(args), source_name=args.source,
                                        source_landmarks=points)
    (frame,) = list(frames)
    write_image(output, frame)
    logger.info("wrote %s (%dx%d)", output, frame.shape[1], frame.shape[0])
    return 0
