"""Series plots (`metaportrait.eval.plots`) and training curves (`metaportrait eval curve`)."""

from __future__ import annotations

import json

import pytest

from metaportrait.errors import InputError
from metaportrait.eval.curves import read_validation_log, training_curves
from metaportrait.eval.plots import plot_series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _series() -> dict:
    return {
        "PSNR": {"x_label": "fine-tuning steps", "y_label": "PSNR (dB)", "lower_is_better": False,
                 "curves": {"model": {"x": [0, 10, 20], "y": [24.0, 25.5, None]},
                            "source copy": {"x": [0, 20], "y": [23.0, 23.0], "baseline": True}}},
        "face L1": {"x_label": "fine-tuning steps", "y_label": "face-region L1", "lower_is_better": True,
                    "curves": {"model": {"x": [0, 10, 20], "y": [0.05, 0.04, 0.035]}}},
    }


def test_plot_series_writes_a_png(tmp_path):
    path = tmp_path / "series.png"
    plot_series({"series": _series()}, path)
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["series.png"]  # no temporary file left behind


def test_plot_series_rejects_malformed_series(tmp_path):
    with pytest.raises(ValueError, match="no series"):
        plot_series({"series": {}}, tmp_path / "empty.png")
    bad = _series()
    bad["PSNR"]["curves"]["model"]["y"] = [1.0]
    with pytest.raises(ValueError, match="'PSNR', curve 'model': x and y"):
        plot_series({"series": bad}, tmp_path / "bad.png")
    del bad["face L1"]["lower_is_better"]
    with pytest.raises(ValueError, match="missing 'lower_is_better'"):
        plot_series({"series": {"face L1": bad["face L1"]}}, tmp_path / "bad.png")
    assert not list(tmp_path.iterdir())


def _write_run(folder, lines: list[dict | str]):
    folder.mkdir()
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (folder / "val.jsonl").write_text(text)
    return folder


BASELINES = {"copy_psnr": 23.0, "copy_l1": 0.05, "copy_face_l1": 0.07, "prior_psnr": 24.5, "prior_l1": 0.04,
             "prior_face_l1": 0.03}


@pytest.fixture
def runs(tmp_path):
    first = _write_run(tmp_path / "lite_full", [
        {"step": 0, "psnr": 24.9, "l1": 0.047, "face_l1": 0.038, **BASELINES, "pairs": 8, "best": True},
        {"step": 500, "psnr": 26.7, "l1": 0.036, "face_l1": 0.032, "pairs": 8, "best": True},
        {"step": 1000, "psnr": 26.6, "l1": 0.036, "face_l1": 0.033, "pairs": 8, "best": False},
    ])
    second = _write_run(tmp_path / "masks_full", [
        {"step": 0, "psnr": 24.0, "l1": 0.05, "face_l1": 0.04, **BASELINES, "pairs": 8, "best": True},
        {"step": 500, "psnr": 27.0, "l1": 0.034, "face_l1": 0.030, "pairs": 8, "best": True},
    ])
    return first, second


def test_training_curves(runs):
    results = training_curves(runs)
    assert results["protocol"] == "curve" and set(results["runs"]) == {"lite_full", "masks_full"}
    psnr = results["series"]["PSNR"]
    assert psnr["x_label"] == "training step" and psnr["lower_is_better"] is False
    assert psnr["curves"]["lite_full"] == {"x": [0, 500, 1000], "y": [24.9, 26.7, 26.6]}
    assert psnr["curves"]["masks_full"] == {"x": [0, 500], "y": [24.0, 27.0]}
    # both runs were validated on the same pairs: one flat line per baseline over all steps
    assert psnr["curves"]["source copy"] == {"x": [0, 1000], "y": [23.0, 23.0], "baseline": True}
    assert psnr["curves"]["mesh prior"] == {"x": [0, 1000], "y": [24.5, 24.5], "baseline": True}
    face = results["series"]["face L1"]
    assert face["lower_is_better"] is True and face["curves"]["masks_full"]["y"] == [0.04, 0.030]


def test_training_curves_baselines_per_run_when_they_differ(tmp_path):
    a = _write_run(tmp_path / "a", [{"step": 0, "psnr": 20.0, "face_l1": 0.1, "copy_psnr": 19.0, "copy_face_l1": 0.2}])
    b = _write_run(tmp_path / "b", [{"step": 0, "psnr": 21.0, "face_l1": 0.1, "copy_psnr": 18.0, "copy_face_l1": 0.2},
                                    {"step": 10, "psnr": 22.0, "face_l1": 0.09}])
    curves = training_curves([a, b])["series"]["PSNR"]["curves"]
    assert curves["source copy (a)"]["y"] == [19.0, 19.0] and curves["source copy (b)"]["x"] == [0, 10]
    assert "mesh prior" not in curves and "mesh prior (a)" not in curves  # no prior_* values: no line
    # the face L1 baselines agree, so they share one line
    assert training_curves([a, b])["series"]["face L1"]["curves"]["source copy"]["y"] == [0.2, 0.2]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "line 2: not JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"step": "500", "psnr": 26.0, "face_l1": 0.03}', "line 2: 'step' must be an integer"),
        ('{"step": 500, "face_l1": 0.03}', "line 2: 'psnr' must be a number, got None"),
        ('{"step": 0, "psnr": 26.0, "face_l1": 0.03}', "line 2: step 0 does not follow 0"),
    ],
)
def test_bad_validation_line_names_the_file(tmp_path, line, problem):
    run = _write_run(tmp_path / "run", [{"step": 0, "psnr": 25.0, "face_l1": 0.04}, line])
    with pytest.raises(InputError) as caught:
        read_validation_log(run / "val.jsonl")
    assert caught.value.path == str(run / "val.jsonl") and caught.value.problem.startswith(problem)


def test_cli_curve(runs, tmp_path, capsys):
    from metaportrait.cli import main

    output = tmp_path / "curve.json"
    assert main(["eval", "curve", "--runs", *map(str, runs), "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["command"].startswith("metaportrait eval curve --runs ")
    assert set(results["series"]) == {"PSNR", "face L1"}
    assert (tmp_path / "curve_series.png").read_bytes()[:8] == PNG_MAGIC

    _write_run(tmp_path / "broken", [{"step": 0, "psnr": 25.0, "face_l1": 0.04}, "oops"])
    assert main(["eval", "curve", "--runs", str(tmp_path / "broken"), "--output", str(output)]) == 2
    assert f"error: {tmp_path / 'broken' / 'val.jsonl'}: line 2: not JSON" in capsys.readouterr().err
    assert main(["eval", "curve", "--runs", str(tmp_path / "absent"), "--output", str(output)]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert main(["eval", "curve", "--runs", str(tmp_path), "--output", str(output)]) == 2
    assert "no validation log" in capsys.readouterr().err
