"""Open the mouth of scikit-image's astronaut with one or more checkpoints and tile the crops into a PNG.

Rows: the face-masked mesh warp (the training-free baseline), then each checkpoint. Columns: the source crop,
then `--mouth` openings. Used for the picture in docs/model_card.md::

    python scripts/mouth_figure.py --checkpoint shipped=default --output docs/images/astronaut_mouth.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from metaportrait.data.landmarks import landmarks_of_image
from metaportrait.data.mesh_warp import mesh_warp_image
from metaportrait.eval.report import label_tile
from metaportrait.io.image import write_image
from metaportrait.motion import Controls
from metaportrait.pipeline import Animator

TILE = 192


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                        help="a model folder ('default' = the bundled one); repeat for several rows")
    parser.add_argument("--mouth", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    from skimage.data import astronaut

    image = astronaut()
    points = landmarks_of_image(image, "astronaut")

    def tile(crop: np.ndarray, text: str) -> np.ndarray:
        return label_tile(cv2.resize(crop, (TILE, TILE), interpolation=cv2.INTER_AREA), text)

    rows = []
    for index, spec in enumerate(args.checkpoint):
        name, _, path = spec.partition("=")
        animator = Animator.from_pretrained(None if path == "default" else path, batch_size=1)
        source = animator.prepare_source(image, "astronaut", points)
        if index == 0:  # the baseline row, on the same crop and the same edited landmarks
            mesh = [tile(source.crop, "source")]
            for mouth in args.mouth:
                target = Controls(mouth=mouth).apply(source.crop_landmarks)
                mesh.append(tile(mesh_warp_image(source.crop, source.crop_landmarks, target), f"mesh-warp {mouth}"))
            rows.append(np.concatenate(mesh, axis=1))
        row = [tile(source.crop, "source")]
        for mouth in args.mouth:
            (frame,) = animator.animate_landmarks(image, [points], crop_output=True, controls=Controls(mouth=mouth),
                                                  source_name="astronaut", source_landmarks=points)
            row.append(tile(frame, f"{name} {mouth}"))
        rows.append(np.concatenate(row, axis=1))
    write_image(args.output, np.concatenate(rows, axis=0))


if __name__ == "__main__":
    main()
