"""Where a checkpoint's self-reconstruction error lies: the driving face hull, a band around it, the rest.

On the fixed validation pairs of a prepared dataset (held-out identities, first frame -> evenly spaced frames),
pooled squared error per region, for the model, its warped image, the face-masked mesh warp and the source copy::

    python scripts/error_by_region.py --data datasets/shared256 --checkpoint default --size 256

Reproduces the table "Where the error lies" (squared error x 1e4 by region; shipped run 11: whole 52.93, PSNR of
the pooled error 22.76 dB) in docs/experiments.md, "2026-11-25: the bundled models side by side"; with
``--per-clip 8`` its 160-pair and, with ``--size 128``, its 128² comparisons.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from metaportrait.data.dataset import PreparedDataset, parse_identities, split_by_identity
from metaportrait.data.pairs import FixedPairs, PairOptions
from metaportrait.io.checkpoint import load_model
from metaportrait.pipeline import bundled_checkpoint, dlib_identity_encoder
from metaportrait.prior.masks import face_mask
from metaportrait.prior.warp import mesh_warp_grid

BAND_AT_256 = 40  # px around the face hull: hair, ears, neck


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="`metaportrait prepare` output")
    parser.add_argument("--checkpoint", default="default", help="model folder, or 'default' (the bundled one)")
    parser.add_argument("--identities", type=Path, default=Path("docs/splits/val_identities.txt"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--per-clip", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    _, clips = split_by_identity(PreparedDataset(args.data), parse_identities(args.identities))
    generator, cfg = load_model(bundled_checkpoint() if args.checkpoint == "default" else args.checkpoint)
    generator.eval()
    size = args.size
    pairs = FixedPairs(clips[: args.clips], PairOptions.for_model(cfg, size), args.per_clip)
    encoder = dlib_identity_encoder() if cfg.use_identity else None
    band = BAND_AT_256 * size / 256
    errors: dict[tuple[str, str], list[float]] = {}
    for batch in DataLoader(pairs, batch_size=6):
        identity = None if encoder is None else encoder.embed(batch["source"], batch["source_landmarks"])
        with torch.no_grad():
            out = generator(batch["source"], batch["source_lines"], batch["driving_lines"], identity=identity,
                            prior_grid=batch["prior_grid"], prior_masks=batch.get("prior_masks"))
        masked = np.stack([mesh_warp_grid(s.numpy(), d.numpy(), size, size, face_masked=True)
                           for s, d in zip(batch["source_landmarks"], batch["driving_landmarks"])])
        mesh = F.grid_sample(batch["source"], torch.from_numpy(masked), padding_mode="border", align_corners=False)
        images = {"model": out["output"], "warped": out["warped"], "mesh-warp": mesh, "source-copy": batch["source"]}
        for i, target in enumerate(batch["driving"]):
            landmarks = batch["driving_landmarks"][i].numpy()
            face = face_mask(landmarks, size, size, 0, 0) > 0.5
            ring = (face_mask(landmarks, size, size, band, 0) > 0.5) & ~face
            regions = {"face": face, "band": ring, "rest": ~(face | ring)}
            for method, image in images.items():
                squared = ((image[i].clamp(0, 1) - target) ** 2).mean(0).numpy()
                for region, mask in regions.items():
                    errors.setdefault((method, region), []).append(float(squared[mask].sum() / squared.size))
    print(f"{len(pairs)} pairs at {size}²; mean squared error x 1e4 by region (sums to the whole frame's)")
    print("| method | face | band | rest | whole | PSNR of the pooled error |\n|---|---|---|---|---|---|")
    for method in images:
        parts = [np.mean(errors[(method, region)]) for region in ("face", "band", "rest")]
        whole = sum(parts)
        cells = " | ".join(f"{1e4 * v:.2f}" for v in (*parts, whole))
        print(f"| {method} | {cells} | {10 * np.log10(1 / whole):.2f} |")


if __name__ == "__main__":
    main()
