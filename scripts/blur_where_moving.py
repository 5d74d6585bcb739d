"""How much PSNR a plain blur buys: the perception-distortion check behind docs/model_card.md, "What is missing".

Runs the self-reconstruction protocol of `metaportrait eval self` (first frame the source, every ``--stride``-th
frame a target) and blurs each generated crop with a Gaussian of sigma ``s`` where the model moves the source
(weight 1 - `metaportrait.pipeline.stillness`; still pixels stay sharp), before the paste-back. Prints one JSON
line per sigma: mean PSNR and ST-LPIPS over the clips, and the PSNR margin over the face-masked mesh warp::

    D=../shared/data/driving
    python scripts/blur_where_moving.py --checkpoint default --sigma 0 0.8 1.0 1.3 --videos \\
        $D/hdtf_RD_Radio2_000.mp4 $D/hdtf_WDA_BobMenendez_000.mp4 $D/hdtf_WDA_KatieHill_000.mp4 $D/lp_d0.mp4 \\
        $D/lp_d3.mp4 $D/lp_d5.mp4 $D/lp_d9.mp4 $D/lp_d10.mp4 $D/lp_d11.mp4 $D/lp_d14.mp4 $D/lp_d19.mp4 $D/lp_d20.mp4

Reproduces the margins +0.90 / +0.98 / +0.99 / +0.97 dB and ST-LPIPS 0.100 / 0.134 / 0.153 / 0.184 at sigma
0 / 0.8 / 1.0 / 1.3 (docs/experiments.md, "2026-11-25: the face-masked prior ..."; the card's "blur tops out at
+0.99 dB").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metaportrait import pipeline
from metaportrait.eval import metrics
from metaportrait.eval.features import STLPIPS
from metaportrait.eval.protocols import BASELINES, ModelMethod, _lpips_mean, load_self_clip

PLAIN = pipeline.Animator._generator_result


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(B, 3, H, W)`` blurred by a separable Gaussian (edges replicated)."""
    radius = int(3 * sigma + 1)
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, K)
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), kernel, groups=3)
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="replicate"), kernel.transpose(2, 3), groups=3)


def blurring_generator(sigma: float):
    """`Animator._generator_result` with the output blurred where it moves (the source's own reconstruction in
    `prepare_source` is left sharp: its residual goes back only where the model is still)."""

    def generator_result(self, source, targets):
        result = PLAIN(self, source, targets)
        if source.residual is not None:  # per-frame calls; prepare_source's own call comes before it is set
            moving = 1 - pipeline.stillness(result, self.config)[:, None]
            result["output"] = result["output"] + moving * (gaussian_blur(result["output"], sigma) - result["output"])
        return result

    return generator_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, nargs="+", required=True, help="self-reconstruction clips")
    parser.add_argument("--checkpoint", default="default", help="model folder, or 'default' for the bundled one")
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.0, 0.8, 1.0, 1.3], help="blur sigmas (px)")
    parser.add_argument("--max-frames", type=int, default=10)
    parser.add_argument("--stride", type=int, default=10)
    args = parser.parse_args()

    clips = [load_self_clip(path, 256, args.max_frames, args.stride) for path in args.videos]
    mesh = np.mean([metrics.psnr(BASELINES["mesh-warp"](c.frames[0], c.targets[0], c.frames[1:], c.targets[1:]),
                                 c.frames[1:]) for c in clips])  # fmt: skip
    lpips = STLPIPS("alex")
    for sigma in args.sigma:
        pipeline.Animator._generator_result = blurring_generator(sigma) if sigma > 0 else PLAIN
        method = ModelMethod(None if args.checkpoint == "default" else args.checkpoint)
        psnr, st_lpips = [], []
        for clip in clips:
            output = method(clip.frames[0], clip.targets[0], clip.frames[1:], clip.targets[1:])
            psnr.append(metrics.psnr(output, clip.frames[1:]))
            st_lpips.append(_lpips_mean(lpips, output, clip.frames[1:]))
        row = {"sigma": sigma, "psnr": float(np.mean(psnr)), "margin_over_mesh_warp": float(np.mean(psnr) - mesh),
               "st_lpips": float(np.mean(st_lpips))}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
