"""The paper's Figure 7 on our data: several `metaportrait eval personalize` results (one per video, any number of
inits each) merged into one PNG of held-out PSNR and ST-LPIPS against fine-tuning steps, one panel per video and
metric, plus a Markdown table (docs/results.md, "Personalization")::

    H=../shared/data/hires
    for v in mimictalk_German_20s latentsync_demo2_video skyreelsa1_driving_2; do
        metaportrait eval personalize --video $H/$v.mp4 --inits base=default meta=runs/meta_v2 \\
            --at 5 10 20 30 45 --unit steps --holdout-seconds 10 --threads 1 --output results/fig7_$v.json
    done
    python scripts/figure7.py results/fig7_*.json --png docs/images/figure7_personalize.png

With ``--axis seconds`` (for results whose marks are in seconds, `eval personalize`'s default unit) the x axis and
the table's columns are fine-tuning seconds instead. Results of the same video given in several files (e.g. one
init per run) are merged by init name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metaportrait.eval.plots import plot_series

METRICS = (("psnr", "PSNR (dB)", False), ("st_lpips", "ST-LPIPS", True), ("id_distance", "identity distance", True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="eval personalize JSON files")
    parser.add_argument("--png", type=Path, required=True, help="the merged figure")
    parser.add_argument("--axis", choices=("steps", "seconds"), default="steps", help="x axis and table columns")
    args = parser.parse_args()

    videos: dict[str, dict[str, list[dict]]] = {}  # video name -> init -> points
    for path in args.results:
        results = json.loads(path.read_text(encoding="utf-8"))
        if results.get("protocol") != "personalize":
            raise SystemExit(f"error: {path}: not an `eval personalize` result")
        video = Path(results["settings"]["video"]).stem
        videos.setdefault(video, {}).update(results["points"])

    series = {}
    for video, inits in videos.items():
        for metric, label, lower in METRICS[:2]:
            series[f"{video}_{metric}"] = {
                "x_label": f"fine-tuning {args.axis} ({video})", "y_label": f"held-out {label}",
                "lower_is_better": lower,
                "curves": {init: {"x": [p[args.axis] for p in points], "y": [p[metric] for p in points]}
                           for init, points in inits.items()},
            }  # fmt: skip
    plot_series({"series": series}, args.png)

    marks = sorted({p[args.axis] for inits in videos.values() for points in inits.values() for p in points})
    print("| video | init | metric | " + " | ".join(f"{m:g} {args.axis}" for m in marks) + " |")
    print("| --- | --- | --- |" + " ---: |" * len(marks))
    for video, inits in videos.items():
        for init, points in inits.items():
            by_mark = {p[args.axis]: p for p in points}
            for metric, label, _ in METRICS:
                digits = 2 if metric == "psnr" else 4 if metric == "st_lpips" else 3
                cells = [f"{by_mark[m][metric]:.{digits}f}" if m in by_mark else "" for m in marks]
                print(f"| {video} | {init} | {label} | " + " | ".join(cells) + " |")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
