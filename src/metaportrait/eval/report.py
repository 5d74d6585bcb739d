"""Reports of an evaluation (`metaportrait.eval.protocols`): the markdown table of Table 1, the comparison grid
(PNG) and the side-by-side video frames, and `label_tile` for other figures."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from metaportrait.eval.protocols import Visuals


# metric -> (column title, lower is better, decimals); also fixes the column order. FID and LPIPS (the published
# networks) appear only when their weight files were given.
TABLE_COLUMNS: dict[str, tuple[str, bool, int]] = {
    "fid": ("FID", True, 2),
    "lpips": ("LPIPS", True, 4),
    "fd_mobilenetv2": ("FD-MNv2", True, 2),
    "st_lpips": ("ST-LPIPS", True, 4),
    "id_distance": ("ID dist", True, 4),
    "id_loss": ("ID loss", True, 4),
    "akd": ("AKD px", True, 3),
    "aed": ("AED", True, 4),
    "apd": ("APD °", True, 3),
    "aed_driver": ("AED drv", True, 4),
    "apd_driver": ("APD drv °", True, 3),
    "e_warp": ("E_warp", True, 6),
    "l1": ("L1", True, 4),
    "psnr": ("PSNR", False, 2),
    "ssim": ("SSIM", False, 4),
    "face_l1": ("face L1", True, 4),
    "mouth_corr": ("mouth corr", False, 3),
    "mouth_range": ("mouth range", False, 2),
    "eye_corr": ("eye corr", False, 3),
    "face_found": ("face found", False, 3),
    "sharpness": ("sharpness", False, 3),
}
TARGET_ONE = {"mouth_range", "sharpness"}  # best at 1, not at an extreme: marked "≈1", never bold


def markdown_table(results: dict) -> str:
    """Table 1-style markdown: one row per method, the protocol's metrics as columns, best value in bold."""
    methods = results["methods"]
    present = [m for m in TABLE_COLUMNS if any(m in values for values in methods.values())]
    arrows = {m: "≈1" if m in TARGET_ONE else "↓" if TABLE_COLUMNS[m][1] else "↑" for m in present}
    header = "| method | " + " | ".join(f"{TABLE_COLUMNS[m][0]} {arrows[m]}" for m in present) + " |"
    lines = [header, "|---" * (len(present) + 1) + "|"]
    best = {}
    for metric in present:
        values = [v[metric]["mean"] for v in methods.values() if v.get(metric, {}).get("mean") is not None]
        if values and metric not in TARGET_ONE:
            best[metric] = min(values) if TABLE_COLUMNS[metric][1] else max(values)
    for name, values in methods.items():
        cells = []
        for metric in present:
            mean = values.get(metric, {}).get("mean")
            if mean is None:
                cells.append("–")
                continue
            text = f"{mean:.{TABLE_COLUMNS[metric][2]}f}"
            cells.append(f"**{text}**" if len(methods) > 1 and mean == best.get(metric) else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def label_tile(tile: np.ndarray, text: str, on_image: bool = True) -> np.ndarray:
    """``tile`` with ``text`` in its top-left corner: white with a dark outline over an image, else black."""
    tile = tile.copy()
    scale = max(tile.shape[0] / 256, 0.4)
    origin = (4, int(18 * scale) + 2)
    font = cv2.FONT_HERSHEY_SIMPLEX
    if on_image:
        cv2.putText(tile, text, origin, font, 0.5 * scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, origin, font, 0.5 * scale, (255, 255, 255) if on_image else (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def comparison_grid(visuals: Visuals, steps: int = 5, tile: int = 128) -> np.ndarray:
    """``uint8`` image: per clip a block whose first row is the source then the driving frames at ``steps``
    evenly spaced times, and one row per method (its name in the first column) at the same times."""
    def small(image: np.ndarray) -> np.ndarray:
        return cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA)

    blank = np.full((tile, tile, 3), 255, np.uint8)
    blocks = []
    for clip, source, driving, outputs in zip(visuals.clips, visuals.sources, visuals.driving, visuals.outputs):
        times = np.linspace(0, len(driving) - 1, steps).round().astype(int)
        rows = [[label_tile(small(source), clip[:20])] + [label_tile(small(driving[t]), f"driving {t + 1}") for t in times]]
        rows += [[label_tile(blank, name, on_image=False)] + [small(frames[t]) for t in times]
                 for name, frames in outputs.items()]
        blocks.append(np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0))
    gap = np.full((4, blocks[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([part for block in blocks for part in (block, gap)][:-1], axis=0)


def side_by_side_frames(visuals: Visuals):
    """Yields ``uint8`` frames: [source | driving | each method], every kept clip one after another."""
    for source, driving, outputs in zip(visuals.sources, visuals.driving, visuals.outputs):
        for t in range(len(driving)):
            tiles = [label_tile(source, "source"), label_tile(driving[t], "driving")]
            tiles += [label_tile(frames[t], name) for name, frames in outputs.items()]
            yield np.concatenate(tiles, axis=1)
