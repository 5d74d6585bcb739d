"""How well checkpoints synthesise the mouth opening the source lacks, on held-out pairs, with a picture.

From the fixed validation pairs of a prepared dataset (held-out identities, first frame -> evenly spaced frames),
keep the pairs where the driving mouth is open clearly wider than the source's (the prior masks' mouth channel
exceeds ``--min-need``): there the output has to paint teeth and the dark interior. On 64² crops around the
driving mouth box, per method: L1, ST-LPIPS (alex) and the crop's standard deviation relative to the real
crop's (contrast: 1 = as contrasted as the real mouth, below = a flat average); inside the driving mouth
opening itself (weighted by what the source lacks there), the L1 and the brightness bias (output minus real
mean luma, in [0, 1] units: above 0 = a lighter interior than the real teeth, tongue and dark cavity) and the
finest-scale energy (mean absolute response of the [1, -2, 1] x [1, -2, 1] filter on luma, relative to the
real frames': 1 = as much as the real mouths; it peaks on a period-2 checkerboard but also counts real edges
and noise). The PNG shows the widest
openings, one row per held-out person (the widest of each clip): real | mesh warp | each checkpoint::

    python scripts/mouth_metrics.py --data datasets/shared256 --checkpoint shipped=default \\
        --checkpoint candidate=runs/x/model --output results/mouth_heldout.png

With ``--region eyes`` the same is measured on closing eyes instead: the pairs where the driving eyes close
past the source's (the `metaportrait.prior.eyelids.eyelid_band` exceeds ``--min-need``), on both eye crops side
by side, and inside that band (the lid skin the source hides) instead of the mouth opening.

Last column, "reads as": how open the region looks to a face tracker. MediaPipe is run on each whole output
frame and on the real frame; the column is the mean absolute difference of their `motion.mouth_openness`
(``--region eyes``: `motion.eye_openness`), over the pairs where both have a face: a blink the tracker still
sees as open, or a mouth it sees shut, scores high.

The picture shows crops of real people from the shared data: keep it out of the repository.

Reproduces the mouth-crop table of docs/model_card.md, "Evaluation on held-out people" (shipped: L1 0.0477,
ST-LPIPS 0.1499, contrast 0.992 on 232 of 492 pairs), the mouth and eye tables of docs/experiments.md ("Mouth"
of the side-by-side entry; the eyelid-band and lid-fill entries of 2026-11-25, with ``--region eyes``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from metaportrait.config import PRESETS
from metaportrait.data.dataset import PreparedDataset, parse_identities, split_by_identity
from metaportrait.data.landmarks import landmarks_of_image
from metaportrait.data.pairs import REGIONS, FixedPairs, PairOptions, box_crops
from metaportrait.errors import NoFaceError
from metaportrait.eval.features import STLPIPS
from metaportrait.eval.report import label_tile
from metaportrait.io.checkpoint import load_model
from metaportrait.io.image import to_uint8_frames, write_image
from metaportrait.motion import eye_openness, mouth_openness
from metaportrait.pipeline import bundled_checkpoint, dlib_identity_encoder
from metaportrait.prior.eyelids import eyelid_band
from metaportrait.prior.warp import mesh_warp_grid

CROP = 64
TILE = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="`metaportrait prepare` output")
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                        help="a model folder ('default' = the bundled one); repeat for several")  # fmt: skip
    parser.add_argument("--identities", type=Path, default=Path("docs/splits/val_identities.txt"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--per-clip", type=int, default=24, help="pairs per clip before the open-mouth filter")
    parser.add_argument("--region", choices=("mouth", "eyes"), default="mouth")
    parser.add_argument("--min-need", type=float, default=0.3, help="mouth-mask (eyelid-band) maximum that marks a pair")
    parser.add_argument("--rows", type=int, default=6, help="pairs in the picture")
    parser.add_argument("--output", type=Path, help="PNG of the widest openings")
    args = parser.parse_args()
    torch.set_num_threads(1)

    _, clips = split_by_identity(PreparedDataset(args.data), parse_identities(args.identities))
    models = {}
    for item in args.checkpoint:
        name, _, path = item.partition("=")
        models[name] = load_model(bundled_checkpoint() if path == "default" else path)
    size = args.size

    def pairs_for(cfg) -> FixedPairs:
        """The same pairs, with the prior and the lines each model was trained with (one set per kind)."""
        options = PairOptions.for_model(cfg, size)
        if options not in pair_sets:
            pair_sets[options] = FixedPairs(clips, options, args.per_clip)
        return pair_sets[options]

    # Open-mouth pairs: where the stretching mesh cannot fill the opening (its mask weighs what the source lacks).
    pair_sets: dict[PairOptions, FixedPairs] = {}
    pairs = pairs_for(PRESETS["lite"].replace(prior_mouth="stretch"))
    model_pairs = {name: pairs_for(cfg) for name, (_, cfg) in models.items()}
    def need_map(sample: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(1, 1, S, S)``: where the output must be synthesised in this region (what the source lacks)."""
        if args.region == "mouth":
            return sample["prior_masks"][:, 1:2]
        band = eyelid_band(sample["source_landmarks"][0].numpy(), sample["driving_landmarks"][0].numpy(), size, size)
        return torch.from_numpy(band)[None, None]

    def region_crops(images: torch.Tensor, sample: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(1, 3, CROP, CROP)`` around the mouth, or ``(1, 3, CROP, 2 CROP)``: both eyes side by side."""
        if args.region == "mouth":
            return box_crops(images, sample["boxes"][:, REGIONS.index("mouth")], size, CROP)
        eyes = [box_crops(images, sample["boxes"][:, REGIONS.index(eye)], size, CROP)
                for eye in ("right_eye", "left_eye")]  # fmt: skip
        return torch.cat(eyes, dim=3)

    needed = {i: need_map({k: v[None] for k, v in pairs[i].items()}) for i in range(len(pairs))}
    chosen = [i for i in range(len(pairs)) if float(needed[i].max()) > args.min_need]
    if not chosen:
        raise SystemExit(f"no held-out pair needs synthesis in the {args.region} past --min-need {args.min_need}")
    encoder = dlib_identity_encoder()
    metric = STLPIPS("alex")

    crops: dict[str, list[torch.Tensor]] = {"real": [], "mesh-warp": [], **{name: [] for name in models}}
    needs = []
    openings: list[torch.Tensor] = []  # (1, 1, S, S) weight of each pair's driving opening
    frames: dict[str, list[torch.Tensor]] = {"real": [], "mesh-warp": [], **{name: [] for name in models}}
    for index in chosen:
        sample = {k: v[None] for k, v in pairs[index].items()}
        needs.append(float(needed[index].max()))
        crops["real"].append(region_crops(sample["driving"], sample))
        openings.append(needed[index])
        frames["real"].append(sample["driving"])
        grid = mesh_warp_grid(sample["source_landmarks"][0].numpy(), sample["driving_landmarks"][0].numpy(), size,
                              size, face_masked=True)  # fmt: skip
        mesh = F.grid_sample(sample["source"], torch.from_numpy(grid)[None], padding_mode="border",
                             align_corners=False)  # fmt: skip
        crops["mesh-warp"].append(region_crops(mesh, sample))
        frames["mesh-warp"].append(mesh)
        identity = encoder.embed(sample["source"], sample["source_landmarks"])
        for name, (generator, cfg) in models.items():
            own = {k: v[None] for k, v in model_pairs[name][index].items()}
            with torch.no_grad():
                out = generator.eval()(own["source"], own["source_lines"], own["driving_lines"],
                                       identity=identity if cfg.use_identity else None,
                                       prior_grid=own["prior_grid"], prior_masks=own["prior_masks"])  # fmt: skip
            crops[name].append(region_crops(out["output"].clamp(0, 1), sample))
            frames[name].append(out["output"].clamp(0, 1))
    stacked = {name: torch.cat(values) for name, values in crops.items()}
    real = stacked["real"]
    print(f"{len(chosen)} of {len(pairs)} held-out pairs need synthesis in the {args.region} past {args.min_need}; "
          f"{tuple(crops['real'][0].shape[2:])} crops")
    weight = torch.cat(openings)
    weight = weight / weight.sum()
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    whole = {name: torch.cat(values) for name, values in frames.items()}
    nyquist = torch.tensor([1.0, -2.0, 1.0])
    nyquist = torch.outer(nyquist, nyquist).view(1, 1, 3, 3)

    def finest(images: torch.Tensor) -> float:
        response = F.conv2d((images * luma).sum(1, keepdim=True), nyquist, padding=1).abs()
        return (response * weight).sum().item()

    openness = eye_openness if args.region == "eyes" else mouth_openness

    def tracked_openness(images: torch.Tensor) -> np.ndarray:
        """``(N,)`` openness of the region as MediaPipe sees it in each frame; NaN where it finds no face."""
        values = []
        for frame in to_uint8_frames(images):
            try:
                values.append(float(openness(landmarks_of_image(frame))))
            except NoFaceError:
                values.append(float("nan"))
        return np.array(values)

    real_openness = tracked_openness(whole["real"])
    real_finest = finest(whole["real"])
    band = "opening" if args.region == "mouth" else "lid band"
    print(f"| method | L1 ↓ | ST-LPIPS ↓ | contrast (std / real std) → 1 | {band} L1 ↓ | {band} brightness bias → 0 "
          f"| {band} finest-scale energy → 1 | reads as (openness error) ↓ |")
    print("|---|---|---|---|---|---|---|---|")
    for name in list(stacked)[1:]:
        image = stacked[name]
        l1 = (image - real).abs().mean().item()
        with torch.no_grad():
            lpips = metric(image, real).mean().item()
        contrast = (image.flatten(1).std(1) / real.flatten(1).std(1).clamp_min(1e-3)).mean().item()
        opening_l1 = ((whole[name] - whole["real"]).abs().mean(1, keepdim=True) * weight).sum().item()
        bias = (((whole[name] - whole["real"]) * luma).sum(1, keepdim=True) * weight).sum().item()
        reads_as = np.abs(tracked_openness(whole[name]) - real_openness)  # NaN where a face was not found
        print(f"| {name} | {l1:.4f} | {lpips:.4f} | {contrast:.3f} | {opening_l1:.4f} | {bias:+.4f} "
              f"| {finest(whole[name]) / real_finest:.2f} | {np.nanmean(reads_as):.4f} "
              f"({int(np.isfinite(reads_as).sum())} pairs) |")

    if args.output:
        # The widest opening of each clip, widest clips first (one person per row).
        per_clip: dict[int, int] = {}
        for k in np.argsort(needs)[::-1]:
            per_clip.setdefault(pairs.pairs[chosen[k]][0], int(k))
        widest = list(per_clip.values())[: args.rows]
        rows = []
        for k in widest:
            tiles = [to_uint8_frames(stacked[name][k : k + 1])[0] for name in stacked]
            rows.append(np.concatenate([label_tile(cv2.resize(t, (TILE * t.shape[1] // t.shape[0], TILE),
                                                              interpolation=cv2.INTER_CUBIC), name)
                                        for t, name in zip(tiles, stacked)], axis=1))  # fmt: skip
        write_image(args.output, np.concatenate(rows, axis=0))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
