"""`metaportrait personalize` on synthetic videos (scikit-image's astronaut, matplotlib's Grace Hopper, moved
around) with a tiny model: the held-out split, the front-end cache, the refusals, and the checkpoint that
`animate` loads. The real measurements are in docs/experiments.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

SIZE = 256  # video frame side
FPS = 25


def _moving_face_video(path: Path, picture: np.ndarray, frames: int, seed: int = 0) -> Path:
    """A video of ``picture`` cut with a slowly moving, zooming box around its face."""
    from metaportrait.data.face import CropBox, crop
    from metaportrait.data.landmarks import landmarks_of_image
    from metaportrait.io.video import write_video

    base = CropBox.from_landmarks(landmarks_of_image(picture, "picture"))
    rng = np.random.default_rng(seed)
    shifts = np.cumsum(rng.uniform(-0.01, 0.01, (frames, 3)), axis=0)
    boxes = [CropBox(base.cx + dx * base.side, base.cy + dy * base.side, base.side * 1.6 * (1 + dz))
             for dx, dy, dz in shifts]  # fmt: skip
    write_video(path, (crop(picture, box, SIZE) for box in boxes), FPS)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    import matplotlib.cbook
    from PIL import Image
    from skimage.data import astronaut

    root = tmp_path_factory.mktemp("videos")
    hopper_path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    hopper = np.asarray(Image.open(hopper_path).convert("RGB"))
    return {
        "astronaut": _moving_face_video(root / "astronaut.mp4", astronaut(), 4 * FPS),
        "astronaut_short": _moving_face_video(root / "astronaut_short.mp4", astronaut(), FPS, seed=1),
        "hopper": _moving_face_video(root / "hopper.mp4", hopper, 2 * FPS),
        "mostly_faceless": _mostly_faceless_video(root / "mostly_faceless.mp4", astronaut()),
    }


def _mostly_faceless_video(path: Path, picture: np.ndarray) -> Path:
    """4 s: the face for the first second, then a grey wall."""
    from metaportrait.io.video import read_video, write_video

    face, _ = read_video(_moving_face_video(path.with_name("face_second.mp4"), picture, FPS))
    wall = np.full((3 * FPS, *face.shape[1:]), 128, np.uint8)
    write_video(path, iter(np.concatenate([face, wall])), FPS)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from metaportrait.config import PRESETS
    from metaportrait.io.checkpoint import save_model
    from metaportrait.models.generator import Generator

    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    return save_model(tmp_path_factory.mktemp("model") / "tiny", Generator(cfg), cfg, {"stage": "full"})


def _run(argv: list[str]) -> int:
    from metaportrait.cli import main

    return main(argv)


def test_personalize_writes_a_checkpoint_that_animate_loads(videos, tiny_checkpoint, tmp_path, capsys):
    from metaportrait.io.checkpoint import load_model
    from metaportrait.pipeline import Animator

    out, cache = tmp_path / "me", tmp_path / "cache"
    argv = [str(videos["astronaut"]), "--output", str(out), "--checkpoint", str(tiny_checkpoint), "--steps", "3",
            "--holdout-seconds", "1", "--threads", "1", "--cache", str(cache), "--batch-size", "1", "--part", "refine"]
    assert _run(["personalize", *argv]) == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "report.json", "report.png"}
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["steps"] == 3
    assert report["front_end"]["videos_cached"] == 0 and report["front_end"]["frames"] == 4 * FPS
    # The held-out tail is the last second: 25 frames, and training never saw them (`split_holdout` test below).
    assert report["heldout"]["first_frame"] == 3 * FPS and report["heldout"]["frames"] == FPS
    for method in ("one-shot", "personalised"):
        assert {"psnr", "face_l1", "st_lpips", "id_distance", "e_warp"} <= set(report["methods"][method])
    assert set(report["worse_than_oneshot"]) <= {"PSNR", "ST-LPIPS", "identity distance"}
    assert report["methods"]["real"]["e_warp"] >= 0  # the flicker reference: the real tail's own warping error
    assert [p["step"] for p in report["curve"]][0] == 0 and report["curve"][-1]["step"] == 3
    # The checkpoint is the tiny model with changed refinement weights and the same warping network.
    tuned, cfg = load_model(out)
    start, start_cfg = load_model(tiny_checkpoint)
    assert cfg == start_cfg
    before, after = start.state_dict(), tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("ladder_network."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("SPDAE_G."))
    assert Animator.from_pretrained(out).config == cfg
    # A rerun finds the front-end in the cache; an existing output needs --overwrite.
    capsys.readouterr()
    assert _run(["personalize", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"error: {out}: already exists; pass --overwrite to replace it"
    assert _run(["personalize", *argv, "--overwrite"]) == 0
    assert json.loads((out / "report.json").read_text())["front_end"]["videos_cached"] == 1
    assert not list(tmp_path.glob(".me.*"))


@pytest.mark.parametrize("case", ["short", "two_people", "missing", "interrupted", "faceless", "official"])
def test_personalize_refuses_bad_input_with_one_line(case, videos, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "me"
    inputs = {"short": [videos["astronaut_short"]], "two_people": [videos["astronaut"], videos["hopper"]],
              "missing": [tmp_path / "nothing.mp4"], "interrupted": [videos["astronaut"]],
              "faceless": [videos["mostly_faceless"]], "official": [videos["astronaut"]]}[case]
    checkpoint = tiny_checkpoint
    if case == "official":  # a model drawn from the official 669-point landmarks, which the front-end cannot give
        import dataclasses

        from metaportrait.io.checkpoint import load_model, save_model

        generator, cfg = load_model(tiny_checkpoint)
        official = dataclasses.replace(cfg, landmark_topology="official669")
        checkpoint = save_model(tmp_path / "official", generator, official, {"stage": "full"})
    if case == "interrupted":
        import metaportrait.personalize as module

        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(module, "tail_report", interrupt)  # Ctrl-C after training, before the checkpoint
    argv = ["personalize", *map(str, inputs), "--output", str(out), "--checkpoint", str(checkpoint),
            "--steps", "1", "--holdout-seconds", "1", "--threads", "1", "--cache", str(tmp_path / "cache")]
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bar also writes to stderr
    assert [line for line in err if line.startswith("error: ")] == err[-1:]
    expected = {"short": "too little video", "two_people": "shows another person", "missing": "file not found",
                "interrupted": "interrupted", "faceless": "no face in 75 of 100 frames",
                "official": "cannot be personalised"}[case]
    assert expected in err[-1]
    assert not out.exists() and not list(tmp_path.glob(".me.*"))


def test_heldout_summary_names_what_got_worse():
    from metaportrait.personalize import heldout_summary

    oneshot = {"psnr": 21.5, "st_lpips": 0.1318, "id_distance": 0.261}
    better = {"psnr": 22.1, "st_lpips": 0.1360, "id_distance": 0.270}  # ST-LPIPS +3 %, identity +0.009: within
    line, worse = heldout_summary({"one-shot": oneshot, "personalised": better})
    assert worse == []
    assert line == ("held-out tail, one-shot -> personalised: PSNR 21.50 -> 22.10 dB (+0.60), "
                    "ST-LPIPS 0.1318 -> 0.1360, identity distance 0.261 -> 0.270")
    drifted = {"psnr": 21.4, "st_lpips": 0.1396, "id_distance": 0.279}
    assert heldout_summary({"one-shot": oneshot, "personalised": drifted})[1] == [
        "PSNR", "ST-LPIPS", "identity distance"]


def test_split_holdout_keeps_the_tail_out_of_training(videos, tmp_path):
    from metaportrait.config import PRESETS
    from metaportrait.data.pairs import NO_AUGMENT, PairOptions, RandomPairs
    from metaportrait.errors import InputError
    from metaportrait.personalize import PersonalizeConfig, front_end, split_holdout

    frontend = front_end([videos["astronaut_short"], videos["astronaut"]], 64, tmp_path / "cache")
    assert [c.frame_count for c in frontend.clips] == [FPS, 4 * FPS] and frontend.cached == 0
    train, tail = split_holdout(frontend.clips, PersonalizeConfig(steps=1, holdout_seconds=1.5))
    cut = 4 * FPS - round(1.5 * FPS)
    assert list(tail.usable_frames) == list(range(cut, 4 * FPS))
    assert train[-1].usable_frames.max() == cut - 1 and len(train[0].usable_frames) == FPS
    pairs = RandomPairs(train, PairOptions.for_model(PRESETS["tiny"], 64), NO_AUGMENT, seed=0)
    drawn = [pairs.choose_frames(1, np.random.default_rng(i)) for i in range(200)]
    assert max(max(pair) for pair in drawn) < cut
    with pytest.raises(InputError, match="too little video"):
        split_holdout(frontend.clips, PersonalizeConfig(steps=1, holdout_seconds=3.5))
    assert front_end([videos["astronaut"]], 64, tmp_path / "cache").cached == 1


def test_fine_tune_keeps_the_weight_average_and_augments(videos, tiny_checkpoint, tmp_path):
    """With ``average_decay`` the generator ends at the average of its steps (not the last step), which the
    held-out checks also saw; ``augment`` draws augmented pairs (a different run from the same seed)."""
    import dataclasses

    from metaportrait.data.pairs import AugmentConfig
    from metaportrait.io.checkpoint import load_model
    from metaportrait.models.identity import IdentityEncoder
    from metaportrait.personalize import PersonalizeConfig, fine_tune, front_end, split_holdout

    encoder = IdentityEncoder.from_dlib()
    frontend = front_end([videos["astronaut"]], 64, tmp_path / "cache")
    cfg = PersonalizeConfig(steps=4, seconds=None, holdout_seconds=1, eval_every=1e-9, eval_pairs=2)
    train, tail = split_holdout(frontend.clips, cfg)
    finals = {}
    for name, design in [("plain", cfg), ("averaged", dataclasses.replace(cfg, average_decay=0.9)),
                         ("augmented", dataclasses.replace(cfg, augment=AugmentConfig(flip=0.0)))]:
        torch.manual_seed(0)
        generator, model_cfg = load_model(tiny_checkpoint)
        start = [p.detach().clone() for p in generator.parameters()]
        seen = []
        result = fine_tune(generator, model_cfg, train, tail, design, encoder,
                           on_step=lambda *_: seen.append([p.detach().clone() for p in generator.parameters()]))
        assert result.adapt.steps == 4 and len(result.curve) == 5
        finals[name] = [p.detach().clone() for p in generator.parameters()]
        if name == "averaged":  # the same steps as "plain"; what on_step saw and what is kept is their average
            expected = start
            for n, weights in enumerate(plain_steps):
                d = min(0.9, (1 + n) / (10 + n))
                expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
            assert all(torch.allclose(f, e, atol=1e-6) for f, e in zip(finals[name], expected))
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(seen[-1], expected))
        plain_steps = seen if name == "plain" else plain_steps
    assert not all(torch.equal(a, b) for a, b in zip(finals["plain"], finals["augmented"]))


def test_eval_personalize_writes_curves_per_init(videos, tiny_checkpoint, tmp_path):
    output = tmp_path / "curves.json"
    argv = ["eval", "personalize", "--video", str(videos["astronaut"]), "--inits", f"a={tiny_checkpoint}",
            f"b={tiny_checkpoint}", "--at", "0.3", "0.6", "--holdout-seconds", "1", "--threads", "1",
            "--output", str(output), "--cache", str(tmp_path / "cache")]
    assert _run(argv) == 0
    results = json.loads(output.read_text())
    assert results["protocol"] == "personalize" and set(results["points"]) == {"a", "b"}
    for curve in results["points"].values():
        assert [p["seconds"] for p in curve] == [0.0, 0.3, 0.6]
        assert curve[0]["steps"] == 0 < curve[1]["steps"] <= curve[2]["steps"]
    # The same start, the same pairs and seed: the 0-s points agree, and every series has both curves.
    assert results["points"]["a"][0]["psnr"] == results["points"]["b"][0]["psnr"]
    assert set(results["series"]["psnr_vs_seconds"]["curves"]) == {"a", "b"}
    assert (tmp_path / "curves_series.png").stat().st_size > 0
    # Marks in steps: the same points whatever the load; the same start and seed give the same curve.
    argv = [*argv[:argv.index("--at")], "--at", "1", "3", "--unit", "steps", *argv[argv.index("--holdout-seconds"):]]
    assert _run([*argv[:-4], "--output", str(tmp_path / "steps.json"), *argv[-2:]]) == 0
    results = json.loads((tmp_path / "steps.json").read_text())
    assert [p["steps"] for p in results["points"]["a"]] == [0, 1, 3]
    assert results["points"]["a"][2]["psnr"] == results["points"]["b"][2]["psnr"]
    assert "--unit steps" in results["command"] and results["settings"]["design"]["steps"] == 3
    assert _run([*argv[:argv.index("--at")], "--unit", "steps", *argv[argv.index("--holdout-seconds"):]]) == 2


def test_eval_personalize_reports_source_frames_of_the_tails_video(videos, tiny_checkpoint, tmp_path):
    from metaportrait.personalize import PersonalizeConfig, front_end, split_holdout, tail_source_frames

    clips = front_end([videos["hopper"], videos["astronaut"]], 64, tmp_path / "cache").clips
    train, tail = split_holdout(clips, PersonalizeConfig(holdout_seconds=1))
    frames = tail_source_frames(train, tail, max_frames=10)
    # Only the tail's own video (the same crop box, so the same framing), its training part, spread evenly.
    assert len(frames) == 10 and frames.images.shape[1:] == (64, 64, 3)
    np.testing.assert_array_equal(frames.images[0], clips[1].frames[0])
    np.testing.assert_array_equal(frames.images[-1], clips[1].frames[tail.first_frame - 1])
    output = tmp_path / "frames.json"
    argv = ["eval", "personalize", "--video", str(videos["astronaut"]), "--inits", f"a={tiny_checkpoint}",
            "--at", "1", "--unit", "steps", "--holdout-seconds", "1", "--threads", "1", "--source-frames",
            "--output", str(output), "--cache", str(tmp_path / "cache")]
    assert _run(argv) == 0
    results = json.loads(output.read_text())
    assert set(results["points"]) == {"a", "a+frames"} and "--source-frames" in results["command"]
    plain, framed = results["points"]["a"], results["points"]["a+frames"]
    assert [p["steps"] for p in framed] == [0, 1] and [p["loss"] for p in framed] == [p["loss"] for p in plain]
    assert all(np.isfinite(p["psnr"]) for p in framed)


@pytest.mark.slow
def test_personalize_on_a_real_video_of_a_new_person(shared_data, tmp_path, capsys):
    """The bundled model on a person it never saw (hires/): a few steps, then the checkpoint animates."""
    from metaportrait.io.video import read_video
    from metaportrait.pipeline import Animator

    video = shared_data / "hires" / "mimictalk_German_20s.mp4"
    out = tmp_path / "german"
    argv = ["personalize", str(video), "--output", str(out), "--steps", "4", "--threads", "1",
            "--cache", str(tmp_path / "cache")]
    assert _run(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["front_end"]["frames"] == 500 and report["heldout"]["first_frame"] == 250
    assert report["training"]["steps"] == 4
    assert report["methods"]["personalised"]["psnr"] > 20 and report["methods"]["one-shot"]["psnr"] > 20
    frame = read_video(video, max_frames=1)[0][0]
    animator = Animator.from_pretrained(out)
    output = next(iter(animator.animate_landmarks(frame, [animator.prepare_source(frame).landmarks])))
    assert output.shape == frame.shape


def test_the_shipped_meta_start_loads_with_the_bundled_models_architecture():
    """`--checkpoint meta` is the `train meta` result shipped in the package: same config as the bundled model
    (so `personalize` and `animate` take it as they are), different weights."""
    from metaportrait.cli.personalize import resolve_checkpoint
    from metaportrait.io.checkpoint import load_config, load_model

    meta, meta_cfg = load_model(resolve_checkpoint("meta"))
    base, base_cfg = load_model(resolve_checkpoint("default"))
    assert meta_cfg == base_cfg and load_config(resolve_checkpoint("meta"))[1]["meta_step"] > 0
    differs = [name for name, value in meta.state_dict().items() if not torch.equal(value, base.state_dict()[name])]
    assert differs, "the meta-learned start has the bundled model's weights"
