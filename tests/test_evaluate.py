"""Evaluation runner: protocols on a tiny synthetic clip, report helpers, and the `metaportrait eval` CLI."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from metaportrait.eval import protocols, report

SIZE = 128


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """A 6-frame, 160 px clip of scikit-image's astronaut turning and sliding a little."""
    from skimage.data import astronaut

    from metaportrait.data.face import CropBox, crop
    from metaportrait.data.landmarks import landmarks_of_image
    from metaportrait.io.video import write_video

    image = astronaut()
    face = crop(image, CropBox.from_landmarks(landmarks_of_image(image), expand=2.0), 160)
    frames = []
    for t in range(6):
        matrix = cv2.getRotationMatrix2D((80.0, 80.0), 2.0 * t, 1.0)
        matrix[:, 2] += (1.5 * t, -1.0 * t)
        frames.append(cv2.warpAffine(face, matrix, (160, 160), borderMode=cv2.BORDER_REFLECT))
    path = tmp_path_factory.mktemp("clips") / "astronaut_turn.mp4"
    write_video(path, frames, fps=25.0)
    return path


class _TinyFeatures(torch.nn.Module):
    """8-d stand-in for the MobileNetV2 features: the real ones make each FD a 1280-d matrix square root (~8 s).
    Only the FD plumbing is tested here; the network has its own tests."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def models(lpips_weight_files):
    """The real ST-LPIPS and identity networks; LPIPS with random weights in the official layout (the real files
    are not available offline); 8-d stand-ins for the MobileNetV2 and Inception features (FD / FID plumbing)."""
    from metaportrait.eval.reference_nets import LPIPSAlex

    real = protocols.MetricModels.load()
    torch.manual_seed(0)
    return protocols.MetricModels(real.lpips, real.identity, _TinyFeatures(), reference_lpips=LPIPSAlex(
        *lpips_weight_files), inception=_TinyFeatures())


def _real_frames(source_image, source_landmarks, driving_frames, target_landmarks):
    """An oracle 'method' that returns the ground truth: pins down what a perfect method scores."""
    return driving_frames.copy()


@pytest.fixture(scope="module")
def self_result(clip_path, models):
    methods = {**protocols.BASELINES, "oracle": _real_frames}
    return protocols.evaluate_self([clip_path], methods, models, size=SIZE, max_frames=6, stride=1)


def test_self_protocol_known_answers(self_result):
    results = self_result.results
    assert results["protocol"] == "self"
    assert set(results["methods"]) == {"source-copy", "mesh-warp", "mesh-warp-whole", "oracle"}
    oracle, copy, mesh = (results["methods"][m] for m in ("oracle", "source-copy", "mesh-warp"))
    assert set(oracle["l1"]["per_clip"]) == {"astronaut_turn"}
    # the oracle is the ground truth: zero error, identical landmarks, the real video's own warping error
    assert oracle["l1"]["mean"] == 0.0 and oracle["psnr"]["mean"] is None  # inf PSNR is stored as null
    assert oracle["ssim"]["mean"] == pytest.approx(1.0)
    assert oracle["st_lpips"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert oracle["akd"]["mean"] == pytest.approx(0.0, abs=1e-4)
    assert oracle["e_warp"]["mean"] == pytest.approx(results["reference"]["e_warp_real"]["mean"])
    assert oracle["fd_mobilenetv2"]["mean"] == pytest.approx(0.0, abs=1e-3)
    assert oracle["lpips"]["mean"] == 0.0  # identical frames: exactly zero
    assert oracle["fid"]["mean"] == pytest.approx(0.0, abs=1e-6)  # identical feature sets
    assert copy["lpips"]["mean"] > 0 and copy["fid"]["mean"] > 1e-5
    assert set(copy["lpips"]["per_clip"]) == {"astronaut_turn"} and copy["fid"]["per_clip"] == {}
    # the mesh warp follows the motion; the copy does not
    assert mesh["face_l1"]["mean"] < copy["face_l1"]["mean"]
    assert mesh["akd"]["mean"] < copy["akd"]["mean"]
    # E_warp uses the real video's flow (Lai et al.), so a still output that ignores the motion is penalised
    assert copy["e_warp"]["mean"] > 2 * oracle["e_warp"]["mean"]
    assert copy["id_distance"]["mean"] < 0.1  # the source itself (dlib: same person below 0.6)
    for values in results["methods"].values():
        assert values["face_found"]["mean"] == 1.0
        for metric in values.values():
            assert metric["mean"] is None or math.isfinite(metric["mean"])


def test_report_outputs(self_result):
    visuals = self_result.visuals
    assert visuals.clips == ["astronaut_turn"] and visuals.driving[0].shape == (5, SIZE, SIZE, 3)
    grid = report.comparison_grid(visuals, steps=3, tile=64)
    assert grid.shape == (64 * 5, 64 * 4, 3) and grid.dtype == np.uint8  # rows: driving + 4 methods
    frames = list(report.side_by_side_frames(visuals))
    assert len(frames) == 5 and frames[0].shape == (SIZE, SIZE * 6, 3)  # source, driving, 4 methods
    table = report.markdown_table(self_result.results)
    assert table.splitlines()[0].startswith("| method | FID ↓ | LPIPS ↓ | FD-MNv2 ↓ | ST-LPIPS ↓")
    oracle_row = next(line for line in table.splitlines() if line.startswith("| oracle |"))
    assert oracle_row.split(" | ")[2] == "**0.0000**"  # best (zero) LPIPS in bold
    assert oracle_row.split(" | ")[4] == "**0.0000**"  # best (zero) ST-LPIPS in bold


def test_markdown_table_marks_the_best():
    results = {"methods": {"a": {"psnr": {"mean": 20.0}, "l1": {"mean": 0.1}},
                           "b": {"psnr": {"mean": 25.0}, "l1": {"mean": None}}}}
    lines = report.markdown_table(results).splitlines()
    assert lines[0] == "| method | L1 ↓ | PSNR ↑ |"
    assert lines[2] == "| a | **0.1000** | 20.00 |"
    assert lines[3] == "| b | – | **25.00** |"


def test_cli_cross(clip_path, tmp_path, lpips_weight_files):
    from skimage.data import astronaut

    from metaportrait.cli import main
    from metaportrait.io.image import write_image

    source = tmp_path / "astronaut.png"
    write_image(source, astronaut())
    output = tmp_path / "cross.json"
    alexnet, linear = lpips_weight_files
    status = main(["eval", "cross", "--sources", str(source), "--driving", str(clip_path), "--output", str(output),
                   "--size", str(SIZE), "--max-frames", "3", "--stride", "1", "--lpips-alexnet", str(alexnet),
                   "--lpips-linear", str(linear)])
    assert status == 0
    results = json.loads(output.read_text())
    assert results["protocol"] == "cross" and results["checkpoints"] == {} and results["series"] == {}
    command = results["command"]
    assert command.startswith("metaportrait eval cross --sources ") and "--motion relative" in command
    assert f"--lpips-alexnet {alexnet} --lpips-linear {linear}" in command
    pair = "astronaut<-astronaut_turn"
    for method in ("source-copy", "mesh-warp"):
        values = results["methods"][method]
        assert set(values) >= {"id_distance", "id_loss", "akd", "aed", "apd", "aed_driver", "apd_driver", "e_warp"}
        assert pair in values["akd"]["per_clip"]
        assert values["fd_mobilenetv2"]["mean"] is None  # one source image: no covariance
        assert "lpips" not in values  # no ground truth in cross-reenactment
        assert "fid" not in values  # no --fid-inception: absent, never estimated
    # the mesh warp reaches the transferred target landmarks, the copy stays where the source was
    assert results["methods"]["mesh-warp"]["akd"]["mean"] < results["methods"]["source-copy"]["akd"]["mean"]
    for suffix in (".md", ".png", ".mp4"):
        assert output.with_suffix(suffix).stat().st_size > 0
    assert not (tmp_path / "cross_series.png").exists()  # no series, no plot


def test_cli_rejects_bad_arguments(clip_path, tmp_path, capsys):
    from metaportrait.cli import main

    assert main(["eval", "self", "--videos", str(clip_path), "--output", str(tmp_path / "r.txt")]) == 2
    assert "must end in .json" in capsys.readouterr().err
    missing = tmp_path / "missing.mp4"
    assert main(["eval", "self", "--videos", str(missing), "--output", str(tmp_path / "r.json")]) == 2
    assert "file not found" in capsys.readouterr().err
    args = ["eval", "self", "--videos", str(clip_path), "--output", str(tmp_path / "r.json"), "--compare", "mesh-warp=x"]
    assert main(args) == 2
    assert "method name used twice" in capsys.readouterr().err
    weights = tmp_path / "alexnet.pth"
    args = ["eval", "self", "--videos", str(clip_path), "--output", str(tmp_path / "r.json"), "--lpips-alexnet",
            str(weights)]
    assert main(args) == 2
    assert f"error: {weights}: --lpips-alexnet needs --lpips-linear too" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_self_protocol_on_real_clips(shared_data, models):
    """On real talking-head clips the face-masked mesh warp beats copying the source on the face."""
    clips = [shared_data / "driving" / name for name in ("lp_d14.mp4", "lp_d11.mp4")]
    result = protocols.evaluate_self(clips, dict(protocols.BASELINES), models, size=256, max_frames=12, stride=8)
    copy, mesh = (result.results["methods"][m] for m in ("source-copy", "mesh-warp"))
    for clip in ("lp_d14", "lp_d11"):
        assert mesh["face_l1"]["per_clip"][clip] < copy["face_l1"]["per_clip"][clip]
        assert mesh["akd"]["per_clip"][clip] < copy["akd"]["per_clip"][clip]
    assert mesh["psnr"]["mean"] > copy["psnr"]["mean"]
    assert copy["id_distance"]["mean"] < 0.6  # dlib's same-person threshold


@pytest.mark.slow
def test_bundled_model_on_held_out_clips(shared_data, models):
    """The shipped lite model, on people it never saw, beats copying the source and the face-masked mesh warp
    (whole frame and face) and keeps the identity."""
    clips = [shared_data / "driving" / name for name in ("lp_d3.mp4", "hdtf_WDA_BobMenendez_000.mp4")]
    methods = {**protocols.BASELINES, "model": protocols.ModelMethod(None)}  # None: the bundled checkpoint
    result = protocols.evaluate_self(clips, methods, models, size=256, max_frames=8, stride=12)
    copy, mesh, model = (result.results["methods"][m] for m in ("source-copy", "mesh-warp", "model"))
    assert model["psnr"]["mean"] > copy["psnr"]["mean"] + 1.0
    assert model["psnr"]["mean"] > mesh["psnr"]["mean"] + 0.2
    assert model["face_l1"]["mean"] < mesh["face_l1"]["mean"]
    assert model["face_l1"]["mean"] < 0.6 * copy["face_l1"]["mean"]
    assert model["akd"]["mean"] < copy["akd"]["mean"]
    assert max(model["id_distance"]["per_clip"].values()) < 0.6
