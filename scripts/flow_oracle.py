"""How much of the self-reconstruction error a better motion could remove, and where: flow oracles by region.

On the evaluation protocol's clips (`metaportrait eval self`: frame 0 is the source, every ``--stride``-th frame a
target, crops with one stable box), the source crop is warped by motions measured on the *real* target frame,
which no driver can give. Each region of the driving frame (the face hull, a 40-px band around it: hair, ears,
neck; the rest) in turn comes from a method, the other two from the face-masked mesh warp, so each column says
what that method buys in that region alone:

* ``model``: the checkpoint through the inference pipeline, as `metaportrait eval self` runs it;
* ``band similarity``: the one rotation + scale + shift that best fits the real flow over the band (a rigid 2D
  motion of hair and neck); ``face similarity``: the one that maps the target landmarks onto the source's;
* ``flow``: the real DIS optical flow (target -> source), averaged onto a 64² grid (the warp network's).

::

    python scripts/flow_oracle.py --checkpoint default --videos ../shared/data/driving/lp_d0.mp4 ...

Reproduces the flow-oracle table by region (shipped model +0.68 dB in the band, band similarity +1.00, face
similarity -1.93, flow +2.77 over the masked mesh warp) in docs/experiments.md, "2026-12-05: shading and the gain
map ...", run on the 12 evaluation clips of docs/results.md, "Self-reconstruction".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from metaportrait.eval.protocols import ModelMethod, load_self_clip
from metaportrait.prior.masks import face_mask
from metaportrait.prior.warp import mesh_warp_image

BAND_AT_256 = 40  # px around the face hull, as scripts/error_by_region.py
FLOW_GRID = 64  # the lite warp network's flow resolution at 256²
REGIONS = ("face", "band", "rest")


def psnr(image: np.ndarray, real: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (as `metaportrait.eval.metrics.psnr`, per frame)."""
    error = np.mean((image.astype(np.float64) - real.astype(np.float64)) ** 2) / 255.0**2
    return float(-10 * np.log10(error))


def real_flow(source: np.ndarray, real: np.ndarray) -> np.ndarray:
    """DIS flow ``(S, S, 2)`` float32: the target pixel ``p`` shows the source at ``p + flow(p)``."""
    grey = [cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in (real, source)]
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(grey[0], grey[1], None)


def warp_by_flow(source: np.ndarray, flow: np.ndarray, grid: int) -> np.ndarray:
    """``source(p + flow(p))`` with the flow first averaged onto a ``grid``² grid and upsampled bilinearly."""
    size = flow.shape[0]
    coarse = cv2.resize(flow, (grid, grid), interpolation=cv2.INTER_AREA)
    flow = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)
    xs, ys = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    return cv2.remap(source, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def warp_by_similarity(source: np.ndarray, target_points: np.ndarray, source_points: np.ndarray) -> np.ndarray:
    """The source under the similarity transform that best maps ``target_points`` onto ``source_points``."""
    matrix, _ = cv2.estimateAffinePartial2D(target_points.astype(np.float32), source_points.astype(np.float32),
                                            method=cv2.LMEDS)  # fmt: skip
    size = source.shape[1], source.shape[0]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP  # the matrix maps output pixels to source pixels
    return cv2.warpAffine(source, matrix, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)


def region_masks(landmarks: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Boolean ``(S, S, 1)`` masks of the face hull, the band around it and the rest (they partition the frame)."""
    face = face_mask(landmarks, size, size, 0, 0) > 0.5
    band = (face_mask(landmarks, size, size, BAND_AT_256 * size / 256, 0) > 0.5) & ~face
    return {"face": face[..., None], "band": band[..., None], "rest": ~(face | band)[..., None]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, nargs="+", required=True, help="self-reconstruction clips")
    parser.add_argument("--checkpoint", default="default", help="model folder, or 'default' (the bundled one)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--max-frames", type=int, default=10)
    parser.add_argument("--stride", type=int, default=10)
    args = parser.parse_args()

    model = ModelMethod(None if args.checkpoint == "default" else args.checkpoint)
    columns = ["mesh warp", "model", "flow"] + [f"{region}: {method}" for region in REGIONS
                                               for method in ("model", "band similarity", "face similarity", "flow")]
    per_clip = {}
    for path in args.videos:
        clip = load_self_clip(path, args.size, args.max_frames, args.stride)
        source, source_points = clip.frames[0], clip.landmarks[0]
        outputs = model(source, source_points, clip.frames, clip.targets)
        rows = []
        for t in range(1, len(clip.frames)):
            real, target_points = clip.frames[t], clip.targets[t]
            mesh = mesh_warp_image(source, source_points, target_points)
            flow = real_flow(source, real)
            masks = region_masks(target_points, args.size)
            ys, xs = np.nonzero(masks["band"][..., 0])
            band_points = np.stack([xs, ys], axis=1).astype(np.float32)
            pick = np.random.default_rng(t).choice(len(band_points), min(4000, len(band_points)), replace=False)
            band_points = band_points[pick]
            methods = {
                "model": outputs[t],
                "band similarity": warp_by_similarity(source, band_points, band_points + flow[ys[pick], xs[pick]]),
                "face similarity": warp_by_similarity(source, target_points, source_points),
                "flow": warp_by_flow(source, flow, FLOW_GRID),
            }
            row = [psnr(mesh, real), psnr(outputs[t], real), psnr(methods["flow"], real)]
            for region in REGIONS:
                row += [psnr(np.where(masks[region], image, mesh), real) for image in methods.values()]
            rows.append(row)
        per_clip[clip.name] = np.mean(rows, axis=0)
        print(f"{clip.name}: " + ", ".join(f"{c} {v:.2f}" for c, v in zip(columns, per_clip[clip.name])), flush=True)
    mean = dict(zip(columns, np.mean(list(per_clip.values()), axis=0)))
    base = mean["mesh warp"]
    print(f"\nPSNR over the face-masked mesh warp ({base:.2f} dB), mean over {len(per_clip)} clips, when only that "
          "region comes from the method (the rest from the mesh warp)\n")
    names = ("model", "band similarity", "face similarity", "flow")
    print("| region | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for region in REGIONS:
        print(f"| {region} | " + " | ".join(f"{mean[f'{region}: {n}'] - base:+.2f}" for n in names) + " |")
    print(f"| whole frame | {mean['model'] - base:+.2f} | | | {mean['flow'] - base:+.2f} |")


if __name__ == "__main__":
    main()
