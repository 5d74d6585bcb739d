"""`metaportrait train sr` (train/sr.py): degradation, run folder, exact resume, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metaportrait.cli import main
from metaportrait.io.checkpoint import load_sr_model
from metaportrait.train.sr import SRTrainConfig, degrade, train_sr

FRAMES, SIZE = 6, 64


@pytest.fixture(scope="module")
def sr_dataset(tmp_path_factory) -> Path:
    """Two identities x one clip of 6 smooth moving 64² frames (the tiny preset's output size)."""
    root = tmp_path_factory.mktemp("sr_prepared")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    manifest = []
    for name in ("a", "b"):
        folder = root / "clips" / name
        folder.mkdir(parents=True)
        phase = rng.uniform(0, 6, 3)
        frames = np.stack([
            np.stack([127 + 100 * np.sin(6 * xx + 4 * yy + p + 0.3 * t) for p in phase], -1) for t in range(FRAMES)
        ]).astype(np.uint8)
        np.save(folder / "frames.npy", frames)
        np.save(folder / "landmarks.npy", np.zeros((FRAMES, 478, 2), np.float32))
        np.save(folder / "present.npy", np.ones(FRAMES, bool))
        manifest.append({"clip": name, "identity": name, "source_video": f"{name}.mp4", "frames": FRAMES, "fps": 25.0,
                         "size": SIZE, "crop": [0, 0, SIZE]})
    (root / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in manifest))
    return root


def _cfg(**changes) -> SRTrainConfig:
    settings = dict(preset="tiny", frames=3, steps=4, log_every=2, checkpoint_every=2, val_every=2,
                    val_identities=("b",))
    return SRTrainConfig(**{**settings, **changes})


def test_degrade_shapes_and_determinism():
    frames = np.random.default_rng(1).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    a = degrade(frames, 32, np.random.default_rng(5))
    b = degrade(frames, 32, np.random.default_rng(5))
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_run_folder_and_exact_resume(sr_dataset, tmp_path):
    straight = tmp_path / "straight"
    train_sr(_cfg(), sr_dataset, straight)
    for name in ("train_config.json", "log.jsonl", "val.jsonl", "checkpoint.pt", "model/config.json"):
        assert (straight / name).is_file(), name
    assert [json.loads(line)["step"] for line in (straight / "log.jsonl").read_text().splitlines()] == [2, 4]
    val = json.loads((straight / "val.jsonl").read_text().splitlines()[-1])
    assert {"psnr", "psnr_upsampled"} <= set(val)

    resumed = tmp_path / "resumed"
    train_sr(_cfg(steps=2), sr_dataset, resumed)
    (resumed / ".checkpoint.pt.killed.tmp").write_bytes(b"half")  # as a run killed while writing leaves it
    train_sr(_cfg(steps=4), sr_dataset, resumed, resume=True)
    assert not list(resumed.glob("*.tmp")), "the killed run's temporary file was not removed"
    a, _, meta = load_sr_model(straight / "model")
    b, _, _ = load_sr_model(resumed / "model")
    assert meta["step"] == 4
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_cli_errors_are_one_line(sr_dataset, tmp_path, capsys):
    assert main(["train", "sr", "--data", str(sr_dataset), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["train", "sr", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "manifest.jsonl" in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    from metaportrait.train.sr import learning_rate

    cfg = SRTrainConfig(lr=1e-3, warmup=10, steps=110)
    assert learning_rate(cfg, 1) == pytest.approx(1e-4)
    assert learning_rate(cfg, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 60) == pytest.approx(0.55e-3)
    assert learning_rate(cfg, 110) == pytest.approx(1e-4)


def test_rgb_init_gives_every_weight_a_gradient_and_stays_near_the_upsampling():
    from metaportrait.config import SR_PRESETS
    from metaportrait.models.sr import TemporalSR, upsample
    from metaportrait.train.sr import init_rgb_heads

    torch.manual_seed(0)
    model = TemporalSR(SR_PRESETS["tiny"])
    frames = torch.rand(3, 3, 32, 32)
    plain = upsample(frames, model.cfg).clamp(0, 1)
    torch.testing.assert_close(model(frames), plain, atol=1e-5, rtol=0)  # zero heads: no gradient upstream
    init_rgb_heads(model, 0.01, torch.Generator().manual_seed(0))
    out = model(frames)
    assert 0 < (out - plain).abs().max() < 0.05
    (out - torch.rand_like(out)).abs().mean().backward()
    for name in ("conv_body_first.weight", "final_linear.weight", "condition_shift.0.0.weight",
                 "window_down.0.conv2.weight", "stylegan_decoder.style_convs.0.modulated_conv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_clean_share_is_a_plain_area_downscale():
    import cv2

    frames = np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    out = degrade(frames, 32, np.random.default_rng(0), clean=1.0)
    expected = np.stack([cv2.resize(f, (32, 32), interpolation=cv2.INTER_AREA) for f in frames])
    np.testing.assert_array_equal(out, expected)


def test_losses_have_every_term_and_the_patch_is_deterministic():
    from metaportrait.losses.perceptual import MobileNetV2Features, PerceptualPyramidLoss
    from metaportrait.train.sr import sr_losses

    perceptual = PerceptualPyramidLoss(MobileNetV2Features(), scales=(1.0,), layer_weights=(1.0,) * 5)
    out, gt = torch.rand(1, 3, 3, 64, 64), torch.rand(1, 3, 3, 64, 64)
    cfg = _cfg(crop=32)
    a, b = sr_losses(out, gt, cfg, perceptual, 7), sr_losses(out, gt, cfg, perceptual, 7)
    assert set(a) == {"l1", "edge", "perceptual", "temporal"}
    assert all(float(a[k]) == float(b[k]) > 0 for k in a)
    assert set(sr_losses(out, gt, _cfg(edge=0, temporal=0), perceptual, 7)) == {"l1", "perceptual"}


def test_pyramid_loss_is_zero_for_the_resized_ground_truth():
    import torch.nn.functional as F

    from metaportrait.train.sr import pyramid_loss

    gt = torch.rand(1, 2, 3, 32, 32)
    levels = [F.interpolate(gt[0] * 2 - 1, size=s, mode="bilinear", align_corners=False, antialias=True)
              for s in (8, 16)]
    rgbs = [levels + [gt[0] * 2 - 1]]
    assert float(pyramid_loss(rgbs, gt)) < 1e-6
    assert float(pyramid_loss([[r + 0.5 for r in rgbs[0]]], gt)) == pytest.approx(0.5, abs=1e-5)


def test_eval_sr_reports_table_2_on_held_out_clips(sr_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    train_sr(_cfg(steps=2), sr_dataset, run)
    output = tmp_path / "sr.json"
    argv = ["eval", "sr", "--data", str(sr_dataset), "--identities", "b", "--sr", str(run / "model"),
            "--frames", "5", "--lpips-every", "2", "--grid-clips", "0", "--threads", "1", "--output", str(output)]
    assert main(argv) == 0
    results = json.loads(output.read_text())
    assert results["clips"] == ["b"] and results["inputs"] == "downscaled"
    methods = results["methods"]
    assert set(methods) == {"bicubic", "per_frame", "temporal", "real"}
    for row in ("bicubic", "per_frame", "temporal"):
        assert {"e_warp", "psnr", "st_lpips", "sharpness", "fd_mobilenetv2"} <= set(methods[row])
        assert 15 < methods[row]["psnr"]["mean"] < 60
    assert methods["real"]["sharpness"]["mean"] == 1.0 and methods["real"]["st_lpips"]["mean"] < 1e-6
    assert "| temporal |" in output.with_suffix(".md").read_text() and output.with_suffix(".jpg").is_file()
    assert main([*argv[:3], str(tmp_path / "nothing"), *argv[4:]]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err


def test_critic_run_resumes_exactly_and_checkpoints_the_critic(sr_dataset, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_sr(_cfg(gan=0.1, crop=0), sr_dataset, straight)
    train_sr(_cfg(gan=0.1, crop=0, steps=2), sr_dataset, resumed)
    train_sr(_cfg(gan=0.1, crop=0), sr_dataset, resumed, resume=True)
    state = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert {"critic", "critic_optimizer"} <= set(state)
    log = json.loads((straight / "log.jsonl").read_text().splitlines()[-1])
    assert log["gan"] > 0 and log["critic"] > 0
    other = torch.load(resumed / "checkpoint.pt", weights_only=True)
    for name, value in state["critic"].items():
        torch.testing.assert_close(value, other["critic"][name], rtol=0, atol=0, msg=name)
    for name, value in state["model"].items():
        torch.testing.assert_close(value, other["model"][name], rtol=0, atol=0, msg=name)


def test_init_starts_from_a_model_and_refuses_another_preset(sr_dataset, tmp_path):
    from metaportrait.errors import InputError
    from metaportrait.train.sr import initial_model

    train_sr(_cfg(steps=2), sr_dataset, tmp_path / "first")
    cfg = _cfg(init=str(tmp_path / "first" / "model"))
    model = initial_model(cfg, cfg.model_config())
    saved, _, _ = load_sr_model(tmp_path / "first" / "model")
    for (name, x), y in zip(model.state_dict().items(), saved.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    lite = _cfg(preset="lite", init=str(tmp_path / "first" / "model"))
    with pytest.raises(InputError, match="not a 'lite' SR model"):
        initial_model(lite, lite.model_config())


def test_generated_inputs_come_from_the_animator_and_flip_with_the_ground_truth(sr_dataset):
    """With ``generated=1`` every input is the animator's render of the window (here a stand-in that records
    the call and returns the source frame it was given), flipped together with the ground truth."""
    from metaportrait.data.dataset import PreparedDataset
    from metaportrait.train.sr import make_batch

    clips = [c for c in PreparedDataset(sr_dataset) if c.identity == "a"]
    frames = np.asarray(clips[0].frames)

    class Recorder:
        def __init__(self):
            self.calls = []

        def animate_landmarks(self, source, landmarks, paste_back, source_landmarks, fps):
            self.calls.append((source, landmarks.shape, paste_back))
            return iter([source] * len(landmarks))

    cfg = _cfg(generated=1.0)
    recorder = Recorder()
    flips = set()
    for step in range(1, 9):
        lq, gt = make_batch(clips, cfg, cfg.model_config(), step, recorder)
        assert lq.shape == (1, 3, 3, 32, 32) and gt.shape == (1, 3, 3, 64, 64)
        first = (gt[0, 0].permute(1, 2, 0) * 255).round().numpy().astype(np.uint8)
        flipped = not any(np.array_equal(first, f) for f in frames)
        assert not flipped or any(np.array_equal(first, f[:, ::-1]) for f in frames)
        source = recorder.calls[-1][0]
        expected = source[:, ::-1] if flipped else source
        np.testing.assert_array_equal((lq[0, 0].permute(1, 2, 0) * 255).round().numpy().astype(np.uint8), expected)
        flips.add(flipped)
    assert flips == {False, True}  # both orientations were drawn
    assert len(recorder.calls) == 8
    assert all(src.shape == (32, 32, 3) and shape == (3, 478, 2) and paste for src, shape, paste in recorder.calls)


def test_two_process_training_matches_one_process_with_both_clips(sr_dataset, tmp_path):
    """torchrun with 2 CPU processes (gloo), one clip each, gradients of the network and the critic averaged:
    the weights of 1 process with 2 clips a step (to float rounding of the summation order)."""
    import subprocess
    import sys
    import textwrap

    from test_train import _free_port

    from metaportrait.train.sr import initial_model

    settings = dict(steps=3, warmup=0, log_every=1, checkpoint_every=3, val_every=3, gan=0.1, crop=0)
    train_sr(_cfg(clips=2, **settings), sr_dataset, tmp_path / "single")
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train_sr import _cfg
        from metaportrait.train.sr import train_sr
        train_sr(_cfg(clips=1, **{settings!r}), {str(sr_dataset)!r}, {str(tmp_path / "ddp")!r})
    """))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(worker)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    single = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    for part in ("model", "critic"):
        for name, value in single[part].items():
            torch.testing.assert_close(ddp[part][name], value, rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")
    torch.manual_seed(_cfg().seed)  # as train_sr does before building the network
    start = initial_model(_cfg(), _cfg().model_config()).state_dict()
    assert any(not torch.allclose(start[k], v) for k, v in single["model"].items())  # the weights moved
