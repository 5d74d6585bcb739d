"""Super-resolution evidence on held-out clips: real 512 frames downscaled to 256, then upscaled back.

    PYTHONPATH=src python benchmarks/eval_sr.py --data /work/datasets/sr512 --sr runs/sr_lite/model \\
        --identities docs/splits/sr_val_identities.txt --frames 40 --threads 1

Rows: bicubic; the network per frame (a window of one frame: every frame alone); the temporal network (streamed
sliding window, `metaportrait.upscale.StreamingSR`, chunk 16, context 4). Columns, averaged over clips:

* E_warp (x1e-3): Lai et al.'s warping error with DIS flow and occlusion measured on the *real* 512 frames
  (`metaportrait.eval.metrics.warping_error`); the real frames' own value is printed as a reference;
* PSNR (dB) against the real frames;
* ST-LPIPS (alex) against the real frames, on every ``--lpips-every``-th frame;
* FD-MobileNetV2 between all upscaled frames and all real frames (small N: compare rows only);
* sharpness: variance of the Laplacian of the grey image, relative to the real frames' (1 = as sharp as real).

Prints a markdown table and one JSON line. ``--grid FILE`` also writes a picture: one row per ``--grid-clips`` clip
(the middle evaluated frame), columns bicubic | per frame | temporal | real, a ``--grid-crop``-px centre patch of
the 512 face at its own resolution.
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np
import torch

from metaportrait.data.dataset import PreparedDataset, parse_identities
from metaportrait.eval.features import STLPIPS, fd_mobilenetv2
from metaportrait.eval.metrics import psnr, temporal_flow, warping_error
from metaportrait.upscale import StreamingSR, load_sr


def sharpness(frames: np.ndarray) -> float:
    return float(np.mean([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for f in frames]))


def as_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a `prepare --size 512` dataset")
    parser.add_argument("--sr", default="default", help="SR weights (folder or official .pth; default: bundled)")
    parser.add_argument("--identities", required=True, help="held-out identities (file or comma list)")
    parser.add_argument("--frames", type=int, default=40, help="frames per clip (from its start)")
    parser.add_argument("--lpips-every", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--context", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", help="also write a picture grid (PNG or JPEG) here")
    parser.add_argument("--grid-clips", default="0,2,5", help="indices of the clips in the grid (comma list)")
    parser.add_argument("--grid-crop", type=int, default=224, help="side of the centre patch in the grid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)

    model = load_sr(args.sr)
    size_in, size_out = model.cfg.input_size, model.cfg.output_size
    held_out = set(parse_identities(args.identities))
    clips = [c for c in PreparedDataset(args.data) if c.identity in held_out]
    lpips = STLPIPS("alex")
    rows = ("bicubic", "per_frame", "temporal")
    per_clip = {row: {"ewarp": [], "psnr": [], "stlpips": [], "sharpness": []} for row in (*rows, "real")}
    pooled = {row: [] for row in (*rows, "real")}
    grid_clips = {int(i) for i in args.grid_clips.split(",")} if args.grid else set()
    grid_rows = []
    start = time.time()
    for clip in clips:
        real = np.ascontiguousarray(clip.frames[: args.frames])
        if real.shape[1] != size_out:
            real = np.stack([cv2.resize(f, (size_out, size_out), interpolation=cv2.INTER_AREA) for f in real])
        low = np.stack([cv2.resize(f, (size_in, size_in), interpolation=cv2.INTER_AREA) for f in real])
        outputs = {"bicubic": np.stack([cv2.resize(f, (size_out, size_out), interpolation=cv2.INTER_CUBIC)
                                        for f in low])}
        with torch.no_grad():
            single = [(model(as_tensor(f[None])).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()[0]
                      for f in low]
        outputs["per_frame"] = np.stack(single)
        outputs["temporal"] = np.stack(list(StreamingSR(model, args.chunk, args.context).upscale(list(low))))
        outputs["real"] = real
        if len(grid_rows) < len(grid_clips) and clips.index(clip) in grid_clips:
            middle, half = len(real) // 2, args.grid_crop // 2
            y, x = size_out // 2 - half, size_out // 2 - half
            grid_rows.append(np.concatenate([outputs[row][middle, y:y + 2 * half, x:x + 2 * half]
                                             for row in (*rows, "real")], axis=1))
        flow = temporal_flow(real)
        real_sharpness = sharpness(real)
        for row, frames in outputs.items():
            per_clip[row]["ewarp"].append(warping_error(frames, flow))
            per_clip[row]["psnr"].append(float(np.mean([psnr(a, b) for a, b in zip(frames, real)])) if row != "real"
                                         else float("inf"))
            picked = slice(None, None, args.lpips_every)
            with torch.no_grad():
                distance = lpips(as_tensor(frames[picked]), as_tensor(real[picked])).mean()
            per_clip[row]["stlpips"].append(float(distance))
            per_clip[row]["sharpness"].append(sharpness(frames) / real_sharpness)
            pooled[row].append(frames[::2])
        print(f"{clip.clip}: done ({time.time() - start:.0f} s)", flush=True)

    real_pool = as_tensor(np.concatenate(pooled["real"]))
    result = {"clips": [c.clip for c in clips], "frames_per_clip": args.frames, "sr": str(args.sr)}
    print("\n| rows | E_warp (x1e-3) | PSNR (dB) | ST-LPIPS | FD-MobileNetV2 | sharpness (real = 1) |")
    print("|---|---|---|---|---|---|")
    for row in (*rows, "real"):
        values = {k: float(np.mean(v)) for k, v in per_clip[row].items()}
        values["fd"] = fd_mobilenetv2(as_tensor(np.concatenate(pooled[row])), real_pool) if row != "real" else 0.0
        result[row] = values
        print(f"| {row} | {1e3 * values['ewarp']:.3f} | {values['psnr']:.2f} | {values['stlpips']:.4f} | "
              f"{values['fd']:.2f} | {values['sharpness']:.3f} |")
    print(json.dumps(result))
    if args.grid:
        cv2.imwrite(args.grid, cv2.cvtColor(np.concatenate(grid_rows), cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 92])


if __name__ == "__main__":
    main()
