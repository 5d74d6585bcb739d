"""Training curves as evaluation results: validation PSNR and face-region L1 against the training step.

`training_curves` reads each run folder's ``val.jsonl`` (written by `metaportrait.train.base`: one JSON object
per validation, ``{"step": 500, "psnr": 26.4, "l1": 0.037, "face_l1": 0.033, ...}``; the step-0 line also holds
the training-free baselines ``copy_*``, the source itself, and, for mesh-prior models, ``prior_*``) and returns
a results document whose ``series`` (format: `metaportrait.eval.protocols.ProtocolResult`) holds one curve per
run and the baselines as flat dashed lines. Runs validated on different pairs are not comparable: give runs
trained and validated on the same split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from metaportrait.errors import InputError

VALIDATION_LOG = "val.jsonl"
# series name -> (val.jsonl field, y label, lower is better)
CURVE_METRICS: dict[str, tuple[str, str, bool]] = {
    "PSNR": ("psnr", "PSNR (dB)", False),
    "face L1": ("face_l1", "face-region L1", True),
}
# baseline prefix in the step-0 line -> curve label
BASELINES: dict[str, str] = {"copy_": "source copy", "prior_": "mesh prior"}


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_validation_log(path: str | Path) -> list[dict]:
    """The validation records of one run, in file order.

    Each line must be a JSON object with an integer ``step`` and numeric ``psnr`` and ``face_l1``; steps must
    increase strictly (a resumed run's log is cut back to the checkpoint's step, so this always holds).

    Raises:
        InputError: the file is missing, empty, or a line is not such a record (the message gives the line).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "not found: not a training run folder (no validation log)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(path, f"line {number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise InputError(path, f"line {number}: expected a JSON object, got {type(record).__name__}")
        if not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool):
            raise InputError(path, f"line {number}: 'step' must be an integer, got {record.get('step')!r}")
        for field, _, _ in CURVE_METRICS.values():
            if not _number(record.get(field)):
                raise InputError(path, f"line {number}: {field!r} must be a number, got {record.get(field)!r}")
        if records and record["step"] <= records[-1]["step"]:
            raise InputError(path, f"line {number}: step {record['step']} does not follow {records[-1]['step']}")
        records.append(record)
    if not records:
        raise InputError(path, "no validation records")
    return records


def _finite_or_none(value: float) -> float | None:
    # JSON has no inf / nan (the results are written with allow_nan=False); a diverged validation is a gap.
    return float(value) if math.isfinite(value) else None


def training_curves(run_dirs: Sequence[str | Path]) -> dict:
    """Results document with the validation curves of ``run_dirs`` (curve name = folder name).

    Returns:
        ``{"protocol": "curve", "runs": {name: folder}, "methods": {}, "series": {...}}``: one series per metric
        of `CURVE_METRICS`, x = training step. Baselines (``copy_*`` / ``prior_*`` of a run's first record) are
        flat dashed curves over the run's steps, named "source copy" / "mesh prior", with the run's name added
        when runs disagree on the value (different validation pairs).

    Raises:
        InputError: two runs with the same folder name, or a bad validation log.
    """
    runs: dict[str, list[dict]] = {}
    folders: dict[str, str] = {}
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        if run_dir.name in runs:
            raise InputError(run_dir, "two runs have the same folder name; curves are named by it")
        runs[run_dir.name] = read_validation_log(run_dir / VALIDATION_LOG)
        folders[run_dir.name] = str(run_dir)

    series = {}
    for series_name, (field, y_label, lower_is_better) in CURVE_METRICS.items():
        curves = {
            name: {"x": [r["step"] for r in records], "y": [_finite_or_none(r[field]) for r in records]}
            for name, records in runs.items()
        }
        for prefix, label in BASELINES.items():
            levels = {name: records[0][prefix + field] for name, records in runs.items()
                      if _number(records[0].get(prefix + field))}
            if len(set(levels.values())) == 1:  # same validation pairs: one line over all runs' steps
                steps = [r["step"] for name in levels for r in runs[name]]
                level = next(iter(levels.values()))
                curves[label] = {"x": [min(steps), max(steps)], "y": [_finite_or_none(level)] * 2, "baseline": True}
                continue
            for name, level in levels.items():
                steps = [r["step"] for r in runs[name]]
                curves[f"{label} ({name})"] = {"x": [steps[0], steps[-1]], "y": [_finite_or_none(level)] * 2,
                                               "baseline": True}
        series[series_name] = {"x_label": "training step", "y_label": y_label, "lower_is_better": lower_is_better,
                               "curves": curves}
    return {"protocol": "curve", "runs": folders, "methods": {}, "series": series}
