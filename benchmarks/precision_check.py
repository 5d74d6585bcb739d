"""bf16 against fp32: the same portrait / driving pairs animated with both `Animator` precisions (bundled model).

    python benchmarks/precision_check.py --threads 1 --frames 100 --crop-output [--sr] \
        PORTRAIT DRIVING [PORTRAIT DRIVING ...]

Per pair: PSNR of the bf16 frames against the fp32 ones (pasted back, or the 256² face crops with
``--crop-output``), the largest pixel difference, and the generator step per frame of each. With ``--sr`` (and
``--crop-output``) also the super-resolution network alone: the fp32 face crops upscaled by the bundled SR network
(`StreamingSR`) in both precisions, PSNR of the bf16 512 crops against the fp32 ones. Prints one JSON line per
pair.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from metaportrait.cli.animate import read_source
from metaportrait.eval.metrics import psnr
from metaportrait.io.video import VideoReader
from metaportrait.pipeline import Animator
from metaportrait.upscale import StreamingSR, load_sr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", nargs="+", type=Path, metavar="PORTRAIT DRIVING")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--crop-output", action="store_true", help="compare the generated face crops")
    parser.add_argument("--sr", action="store_true", help="also compare the bundled SR network in both precisions")
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give portrait / driving pairs")
    if args.sr and not args.crop_output:
        parser.error("--sr upscales the face crops: add --crop-output")
    torch.set_num_threads(args.threads)
    animators = {p: Animator.from_pretrained(precision=p) for p in ("fp32", "bf16")}
    sr_model = load_sr("default") if args.sr else None
    for portrait_path, driving_path in zip(args.pairs[::2], args.pairs[1::2]):
        portrait = read_source(portrait_path)
        outputs, model_ms = {}, {}
        for precision, animator in animators.items():
            with VideoReader(driving_path) as reader:
                frames = animator(portrait, itertools.islice(reader, args.frames), driving_fps=reader.fps,
                                  crop_output=args.crop_output)
                outputs[precision] = np.stack(list(frames))
            model_ms[precision] = round(animator.stats.stage_seconds["model"] / animator.stats.frames * 1000, 1)
        difference = np.abs(outputs["bf16"].astype(int) - outputs["fp32"])
        result = {"portrait": str(portrait_path), "driving": str(driving_path),
                  "psnr_bf16_vs_fp32": round(psnr(outputs["bf16"], outputs["fp32"]), 2),
                  "max_abs_difference": int(difference.max()), "model_ms_per_frame": model_ms}
        if args.sr:
            crops = list(outputs["fp32"])
            upscaled = {p: np.stack(list(StreamingSR(sr_model, precision=p).upscale(crops))) for p in ("fp32", "bf16")}
            result["sr_psnr_bf16_vs_fp32"] = round(psnr(upscaled["bf16"], upscaled["fp32"]), 2)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
