"""Picture grid of the super-resolution rows on the project's own output (docs/results.md, "Super-resolution")::

    python scripts/sr_grid.py --sr default --output docs/images/sr_grid.jpg

The bundled model animates scikit-image's astronaut along the built-in scripted motion (`metaportrait demo`'s
motion) and writes its 256 face crops; three of them are upscaled to 512 by bicubic, by the SR network per frame
and by the streamed temporal network (`animate --sr`). Columns: bicubic | per frame | temporal, a ``--crop``-px
centre patch at 512. There is no "real 512" column: this face has no 512 ground truth, and the shared data's
people may not be committed (the held-out table uses them, `metaportrait eval sr`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from metaportrait.data.landmarks import landmarks_of_image
from metaportrait.demo_motion import scripted_motion
from metaportrait.eval.report import label_tile
from metaportrait.io.image import write_image
from metaportrait.pipeline import Animator
from metaportrait.upscale import StreamingSR, load_sr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sr", default="default", help="SR weights ('default': bundled)")
    parser.add_argument("--output", type=Path, required=True, help="the grid (.jpg or .png)")
    parser.add_argument("--frames", type=int, nargs="+", default=[20, 60, 100], help="frames shown (rows)")
    parser.add_argument("--crop", type=int, default=256, help="side of the centre patch at 512")
    args = parser.parse_args()
    from skimage import data

    torch.set_num_threads(2)
    portrait = data.astronaut()
    points = landmarks_of_image(portrait, "skimage.data.astronaut()")
    animator = Animator.from_pretrained(None)
    crops = list(animator.animate_landmarks(portrait, scripted_motion(points, max(args.frames) + 1),
                                            paste_back=False, crop_output=True, source_landmarks=points))
    model = load_sr(args.sr)
    size = model.cfg.output_size
    temporal = list(StreamingSR(model).upscale(crops))
    per_frame = list(StreamingSR(model, chunk=1, context=0).upscale(crops[index] for index in args.frames))
    rows = []
    for index, single in zip(args.frames, per_frame):
        tiles = {
            "bicubic": cv2.resize(crops[index], (size, size), interpolation=cv2.INTER_CUBIC),
            "per frame": single,
            "temporal": temporal[index],
        }
        top = (size - args.crop) // 2
        rows.append(np.concatenate([label_tile(np.ascontiguousarray(t[top:top + args.crop, top:top + args.crop]), name)
                                    for name, t in tiles.items()], axis=1))  # fmt: skip
    write_image(args.output, np.concatenate(rows))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
