"""Open the mouth (or close the eyes) of scikit-image's astronaut with checkpoints and tile the crops into a PNG.

Rows: the face-masked mesh warp (the training-free baseline), then each checkpoint. Columns: the source crop,
then `--mouth` openings (or, with ``--eyes``, eye openness: 1 = as they are, 0 = closed). Used for the pictures
in docs/model_card.md::

    python scripts/mouth_figure.py --checkpoint shipped=default --output docs/images/astronaut_mouth.png
    python scripts/mouth_figure.py --checkpoint shipped=default --eyes 0.5 0.2 0 --output docs/images/astronaut_blink.png

Reproduces docs/images/astronaut_mouth.png (docs/model_card.md, "Evaluation on held-out people"; the teeth under
the upper lip that `test_bundled_model_keeps_the_source_teeth_under_the_upper_lip` measures) and
docs/images/astronaut_blink.png (docs/experiments.md, "2026-11-25: source crop put back ..., lid fill ...").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from metaportrait.data.landmarks import landmarks_of_image
from metaportrait.eval.report import label_tile
from metaportrait.io.image import write_image
from metaportrait.motion import Controls
from metaportrait.pipeline import Animator
from metaportrait.prior.warp import mesh_warp_image

TILE = 192


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                        help="a model folder ('default' = the bundled one); repeat for several rows")
    parser.add_argument("--mouth", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    parser.add_argument("--eyes", type=float, nargs="+", help="eye openness columns instead of mouth openings")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    from skimage.data import astronaut

    image = astronaut()
    points = landmarks_of_image(image, "astronaut")

    def tile(crop: np.ndarray, text: str) -> np.ndarray:
        if args.eyes:  # the eye band of the crop, magnified: a blink is a few pixels tall
            top, bottom = int(0.34 * len(crop)), int(0.52 * len(crop))
            band = crop[top:bottom, int(0.12 * len(crop)) : int(0.88 * len(crop))]
            return label_tile(cv2.resize(band, (2 * TILE, 2 * TILE * len(band) // band.shape[1]),
                                         interpolation=cv2.INTER_CUBIC), text)  # fmt: skip
        return label_tile(cv2.resize(crop, (TILE, TILE), interpolation=cv2.INTER_AREA), text)

    columns = ([(f"eyes {v}", Controls(eyes=v)) for v in args.eyes] if args.eyes
               else [(str(v), Controls(mouth=v)) for v in args.mouth])  # fmt: skip
    rows = []
    for index, spec in enumerate(args.checkpoint):
        name, _, path = spec.partition("=")
        animator = Animator.from_pretrained(None if path == "default" else path, batch_size=1)
        source = animator.prepare_source(image, "astronaut", points)
        if index == 0:  # the baseline row, on the same crop and the same edited landmarks
            mesh = [tile(source.crop, "source")]
            for label, controls in columns:
                target = controls.apply(source.crop_landmarks)
                mesh.append(tile(mesh_warp_image(source.crop, source.crop_landmarks, target), f"mesh-warp {label}"))
            rows.append(np.concatenate(mesh, axis=1))
        row = [tile(source.crop, "source")]
        for label, controls in columns:
            (frame,) = animator.animate_landmarks(image, [points], crop_output=True, controls=controls,
                                                  source_name="astronaut", source_landmarks=points)
            row.append(tile(frame, f"{name} {label}"))
        rows.append(np.concatenate(row, axis=1))
    write_image(args.output, np.concatenate(rows, axis=0))


if __name__ == "__main__":
    main()
