"""The animate pipeline (metaportrait.pipeline), the scripted demo motion and the animate / edit / demo CLIs.

A freshly built ``tiny`` model (64x64) saved to a temporary folder stands in for the bundled checkpoint, so
these tests check plumbing, shapes, streaming, audio and error handling, not image quality.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from metaportrait.cli import main
from metaportrait.config import PRESETS
from metaportrait.data.face import CropBox, crop
from metaportrait.demo_motion import scripted_motion
from metaportrait.errors import InputError, NoFaceError
from metaportrait.io.image import write_image
from metaportrait.io.video import VideoReader
from metaportrait.models.generator import Generator
from metaportrait.motion import Controls
from metaportrait.pipeline import Animator, bundled_checkpoint
from metaportrait.prior.warp import identity_grid, mesh_warp_grid

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def astronaut() -> tuple[np.ndarray, np.ndarray]:
    """The photo, uint8 (512, 512, 3), and its landmarks (478, 2)."""
    from skimage import data

    from metaportrait.data.landmarks import landmarks_of_image

    image = data.astronaut()
    return image, landmarks_of_image(image, "astronaut")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from metaportrait.io.checkpoint import save_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_model")
    save_model(folder, Generator(TINY), TINY)
    return folder


@pytest.fixture(scope="module")
def animator() -> Animator:
    torch.manual_seed(0)
    return Animator(Generator(TINY), TINY, batch_size=2)


def driving_frames(astronaut_image: np.ndarray, count: int, size: int = 128) -> list[np.ndarray]:
    """A synthetic talking-head clip: the astronaut's face drifting inside a square crop."""
    frames = []
    for k in range(count):
        phase = 2 * np.pi * k / 12
        frames.append(crop(astronaut_image, CropBox(225 + 10 * np.sin(phase), 125 + 5 * np.cos(phase), 260), size))
    return frames


def write_clip(path: Path, frames: list[np.ndarray], fps: int, audio: bool) -> None:
    """An H.264 mp4 of ``frames``, with a 440 Hz AAC tone as long as the video when ``audio``."""
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=16000) if audio else None
        if sound is not None:
            sound.layout = "mono"
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode(None))
        if sound is not None:
            samples = int(16000 * len(frames) / fps)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 16000)).astype(np.float32)[None]
            chunk = 1024
            for start in range(0, samples, chunk):
                piece = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start:start + chunk]), format="flt",
                                                   layout="mono")
                piece.sample_rate, piece.pts, piece.time_base = 16000, start, Fraction(1, 16000)
                container.mux(sound.encode(piece))
            container.mux(sound.encode(None))


@pytest.fixture(scope="module")
def media(tmp_path_factory, astronaut) -> dict[str, Path]:
    """Input files: the portrait as PNG, a driving clip with audio, one without any face."""
    folder = tmp_path_factory.mktemp("media")
    image, _ = astronaut
    write_image(folder / "astronaut.png", image)
    write_image(folder / "grey.png", np.full((96, 96, 3), 128, np.uint8))
    write_clip(folder / "driving.mp4", driving_frames(image, 6), fps=10, audio=True)
    write_clip(folder / "faceless.mp4", [np.full((64, 64, 3), 90, np.uint8)] * 3, fps=10, audio=False)
    return {p.stem: p for p in folder.iterdir()}


def count_frames(path: Path) -> tuple[int, tuple[int, int], bool]:
    """(decoded frames, (height, width), has audio) of a video file."""
    with VideoReader(path) as reader:
        frames = list(reader)
        return len(frames), frames[0].shape[:2], reader.has_audio


# --- the pipeline object ------------------------------------------------------------------------------------


def test_scripted_motion_starts_at_the_photo_and_moves(astronaut):
    _, points = astronaut
    targets = scripted_motion(points, 100)
    assert targets.shape == (100, 478, 2) and targets.dtype == np.float32
    np.testing.assert_allclose(targets[0], points, atol=1e-4)
    assert np.abs(targets - points).max(axis=(1, 2)).max() > 10  # a head turn moves points by many pixels


def test_animate_landmarks_output_sizes(animator, astronaut):
    image, points = astronaut
    targets = scripted_motion(points, 3)
    frames = list(animator.animate_landmarks(image, targets, source_landmarks=points))
    assert len(frames) == 3 and all(f.shape == image.shape and f.dtype == np.uint8 for f in frames)
    assert animator.stats.frames == 3 and animator.stats.lost_frames == 0
    # Far from the face the portrait is untouched by the paste-back.
    np.testing.assert_array_equal(frames[1][-40:], image[-40:])

    crops = list(animator.animate_landmarks(image, targets, paste_back=False, source_landmarks=points))
    assert [c.shape for c in crops] == [(TINY.image_size, TINY.image_size, 3)] * 3
    close_ups = list(animator.animate_landmarks(image, targets, crop_output=True, source_landmarks=points))
    for close_up, face_crop in zip(close_ups, crops):
        np.testing.assert_array_equal(close_up, face_crop)


def test_controls_change_the_model_input(animator, astronaut):
    image, points = astronaut
    source = animator.prepare_source(image, landmarks=points)
    plain = animator._generate(source, [source.crop_landmarks])
    edited = animator._generate(source, [Controls(mouth=0.7, yaw=15).apply(source.crop_landmarks)])
    assert plain.shape == (1, TINY.image_size, TINY.image_size, 3)
    assert np.abs(plain.astype(int) - edited).max() > 0


def test_a_model_with_the_eyelid_band_is_given_it_when_the_eyes_close(astronaut):
    image, points = astronaut
    seen = []  # the prior masks each generator is called with
    for eyelids, reads_band in ((False, False), (True, False), (True, True)):
        cfg = TINY.replace(prior_eyelids=eyelids, refine=dataclasses.replace(TINY.refine, eyelid_band=reads_band))
        generator = Generator(cfg)
        generator.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["prior_masks"]), with_kwargs=True)
        animator = Animator(generator, cfg)
        source = animator.prepare_source(image, landmarks=points, pasted=False)  # one generator call: the frame
        animator._generate(source, [Controls(eyes=0.0).apply(source.crop_landmarks)])
    synthesis = {eyelids: masks[0, 1] for eyelids, masks in zip((False, True), seen[:2], strict=True)}
    assert torch.all(synthesis[True] >= synthesis[False]) and synthesis[True].sum() > synthesis[False].sum() + 2
    # A model that reads the band also gets it alone, as the last channel.
    assert seen[2].shape[1] == seen[1].shape[1] + 1
    torch.testing.assert_close(seen[2][:, :-1], seen[1])
    assert torch.all(seen[2][0, -1] <= synthesis[True]) and seen[2][0, -1].sum() > 2
    # A model with the lid fill gets the filled prior grid.
    grids, source, closed = _prior_grids(astronaut, [TINY, TINY.replace(prior_eyelid_fill=True)], Controls(eyes=0.0))
    size = grids[0].shape[1]
    expected = mesh_warp_grid(source.crop_landmarks, closed, size, size, mouth=TINY.prior_mouth, eyelids=True)
    torch.testing.assert_close(grids[1][0], torch.from_numpy(expected))
    assert not torch.equal(grids[0], grids[1])


def test_the_portrait_detail_is_prepared_only_for_a_paste_back(animator, astronaut):
    image, points = astronaut
    pasted = animator.prepare_source(image, landmarks=points)
    assert pasted.detail is not None and pasted.detail.shape == image.shape and pasted.detail.dtype == np.int16
    assert animator.prepare_source(image, landmarks=points, pasted=False).detail is None


def test_where_the_model_leaves_the_source_still_the_crop_is_the_source(animator, astronaut):
    """The source driven by its own landmarks: the untrained model's reconstruction is far from the crop; the
    residual puts the source's pixels back in proportion to how still the model leaves it (the untrained
    model's occlusion is about 0.88 everywhere, so is its stillness)."""
    from metaportrait.pipeline import stillness

    image, points = astronaut
    kept = animator.prepare_source(image, landmarks=points)
    plain = animator.prepare_source(image, landmarks=points, pasted=False)
    assert kept.residual.shape == kept.tensor.shape and plain.residual is None
    own = [kept.crop_landmarks]
    result = animator._generator_result(kept, own)
    still = stillness(result, animator.config)[0].numpy()
    assert still.min() > 0.5
    faces = {name: animator._generate(source, own)[0].astype(int) for name, source in (("kept", kept), ("plain", plain))}
    error = {name: np.abs(face - kept.crop).mean(-1) for name, face in faces.items()}  # (S, S) grey levels
    assert error["plain"].mean() > 5
    assert np.all(error["kept"] <= (1 - still) * error["plain"] + 1.5)  # (+ uint8 rounding of both)
    # A target that moves the face: where it moves, no residual.
    moved = [kept.crop_landmarks + np.float32([6.0, 0.0])]
    moving = stillness(animator._generator_result(kept, moved), animator.config)[0].numpy() == 0
    assert moving.mean() > 0.2
    np.testing.assert_array_equal(animator._generate(kept, moved)[0][moving], animator._generate(plain, moved)[0][moving])


def test_source_lines_have_the_width_the_model_was_trained_with(astronaut):
    image, points = astronaut
    thin = Animator(Generator(TINY), TINY).prepare_source(image, landmarks=points).lines
    wide_cfg = TINY.replace(line_reference_size=32)  # 2-px lines at the 64² image size
    wide = Animator(Generator(wide_cfg), wide_cfg).prepare_source(image, landmarks=points).lines
    assert wide.sum() > 1.3 * thin.sum()


def test_bundled_model_keeps_the_source_teeth_under_the_upper_lip(astronaut):
    """The astronaut smiles with her upper teeth showing. Opening her mouth wider must keep those teeth under the
    upper lip (the mesh prior's "upper_lip" fill), not stretch or repaint them: the output just below the upper
    lip's centre is as bright as her teeth (the previous, stretching weights gave 179 against 227, once, by hand)."""
    image, points = astronaut
    animator = Animator.from_pretrained()
    assert animator.config.prior_mouth == "upper_lip"
    source = animator.prepare_source(image, landmarks=points)

    def under_upper_lip(crop: np.ndarray, landmarks: np.ndarray, depth: float) -> float:
        x, y = int(landmarks[13, 0]), int(landmarks[13, 1] + depth)  # 13: centre of the upper inner lip
        return float(crop[y - 1 : y + 2, x - 3 : x + 4].mean())

    depth = 0.4 * (source.crop_landmarks[14, 1] - source.crop_landmarks[13, 1])  # inside her own opening
    teeth = under_upper_lip(source.crop, source.crop_landmarks, depth)
    assert teeth > 200
    for mouth in (0.6, 0.9):
        target = Controls(mouth=mouth).apply(source.crop_landmarks)
        (frame,) = animator._generate(source, [target])
        assert abs(under_upper_lip(frame, target, depth) - teeth) < 20, mouth


def test_stillness_is_one_where_the_source_stays_and_zero_from_one_pixel_of_motion():
    from metaportrait.models.blocks import make_coordinate_grid
    from metaportrait.pipeline import stillness

    assert TINY.use_mesh_prior  # its deformation is a sampling grid on pixel centres
    identity = make_coordinate_grid(8, 8, "centers")[None].repeat(3, 1, 1, 1)
    deformation = identity.clone()
    deformation[1, ..., 0] += 2 / 8  # one pixel to the right
    deformation[2, ..., 1] += 1 / 8  # half a pixel down (a pixel is 2 / 8 in grid units)
    occlusion = torch.ones(3, 1, 8, 8)
    occlusion[0, :, :4] = 0.25  # the top half mostly synthesised
    still = stillness({"deformation": deformation, "occlusion": occlusion}, TINY)
    assert still.shape == (3, 8, 8)
    torch.testing.assert_close(still[0, 4:], torch.ones(4, 8))
    torch.testing.assert_close(still[0, :4], torch.full((4, 8), 0.25))
    torch.testing.assert_close(still[1], torch.zeros(8, 8))
    torch.testing.assert_close(still[2], torch.full((8, 8), 0.5))


def test_bundled_model_keeps_the_portrait_where_nothing_moves(astronaut):
    """Driven by its own landmarks, the pasted-back frame keeps the portrait's pixels (`keep_source_detail`)
    instead of the face crop resampled to 256² and back."""
    image, points = astronaut
    x0, y0, x1, y1 = 150, 40, 350, 250  # hair, forehead, eyes: still when the target is the source itself

    def error(keep: bool) -> float:
        animator = Animator.from_pretrained(keep_source_detail=keep)
        (frame,) = animator.animate_landmarks(image, [points], source_landmarks=points)
        np.testing.assert_array_equal(frame[-20:], image[-20:])  # outside the crop box: the portrait
        return float(np.abs(frame[y0:y1, x0:x1].astype(int) - image[y0:y1, x0:x1]).mean())

    kept, resampled = error(True), error(False)
    assert kept < 0.85 * resampled, (kept, resampled)  # measured: 1.55 against 2.10


def test_video_driving_tracks_and_counts_lost_frames(animator, astronaut):
    image, points = astronaut
    clip = driving_frames(image, 5)
    clip[3] = np.full_like(clip[3], 128)  # the driver's face disappears for one frame
    frames = list(animator(image, clip, driving_fps=10, source_landmarks=points))
    assert len(frames) == 5 and frames[0].shape == image.shape
    assert animator.stats.frames == 5 and animator.stats.lost_frames == 1
    assert animator.stats.reference_frame is not None and 0 <= animator.stats.reference_frame < 5
    list(animator(image, clip, reference=2, driving_fps=10, source_landmarks=points))
    assert animator.stats.reference_frame == 2
    with pytest.raises(ValueError, match="reference must be"):
        animator(image, clip, reference="middle", source_landmarks=points)


def test_still_driver_relative_keeps_source_absolute_copies_driver(animator, astronaut):
    import cv2

    from metaportrait.data.face import points_to_crop
    from metaportrait.data.landmarks import landmarks_of_image

    image, _ = astronaut
    # The source is the photo turned by 20°; the driver holds still, upright.
    tilted = cv2.warpAffine(image, cv2.getRotationMatrix2D((256, 160), 20, 1.0), (512, 512),
                            borderMode=cv2.BORDER_REPLICATE)
    source = animator.prepare_source(tilted, "tilted")
    still = driving_frames(image, 1)[0]
    relative = [t for t, _ in animator._driving_targets(source, [still] * 3, "relative", "auto", 1.0, 25.0, "still")]
    absolute = [t for t, _ in animator._driving_targets(source, [still] * 3, "absolute", "auto", 1.0, 25.0, "still")]
    driver = landmarks_of_image(still, "still")
    driver_crop = points_to_crop(driver, CropBox.from_landmarks(driver), TINY.image_size)
    tolerance = 0.5 * TINY.image_size / 64  # MediaPipe's tracking jitters a little even on identical frames
    for target in relative:  # no motion relative to the first frame: the source, tilted, as it is
        np.testing.assert_allclose(target, source.crop_landmarks, atol=tolerance)
    for target in absolute:  # the driver's own upright landmarks
        np.testing.assert_allclose(target, driver_crop, atol=2 * tolerance)
    assert np.abs(driver_crop - source.crop_landmarks).max() > 10 * tolerance  # the two modes really differ


def test_no_face_errors_name_the_file(animator, astronaut):
    image, points = astronaut
    with pytest.raises(NoFaceError, match="portrait.png"):
        animator(np.full((96, 96, 3), 128, np.uint8), [], source_name="portrait.png")
    frames = animator(image, [np.full((64, 64, 3), 128, np.uint8)] * 3, driving_name="drv.mp4",
                      source_landmarks=points)
    with pytest.raises(NoFaceError, match="drv.mp4"):
        next(frames)
    with pytest.raises(ValueError, match="motion"):
        animator(image, [], motion="sideways")


def test_from_pretrained_missing_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        Animator.from_pretrained(tmp_path / "nowhere")


def test_default_checkpoint_is_the_bundled_one():
    if (bundled_checkpoint() / "model.safetensors").is_file():
        assert Animator.from_pretrained(None).size == 256
    else:
        with pytest.raises(InputError, match="bundled"):
            Animator.from_pretrained("default")


# --- the CLI ------------------------------------------------------------------------------------------------


def test_cli_animate_writes_video_with_audio(media, tiny_checkpoint, tmp_path):
    out = tmp_path / "result.mp4"
    code = main(["animate", "-s", str(media["astronaut"]), "-d", str(media["driving"]), "-o", str(out),
                 "--checkpoint", str(tiny_checkpoint), "--mouth", "0.3"])
    assert code == 0
    assert count_frames(out) == (6, (512, 512), True)
    assert [p.name for p in tmp_path.iterdir()] == ["result.mp4"]  # no temporary file left behind


def test_cli_animate_fps_max_frames_and_crop(media, tiny_checkpoint, tmp_path):
    out = tmp_path / "crop.mp4"
    code = main(["animate", "-s", str(media["driving"]), "-d", str(media["driving"]), "-o", str(out),
                 "--checkpoint", str(tiny_checkpoint), "--fps", "5", "--max-frames", "2", "--no-paste-back"])
    assert code == 0
    frames, size, has_audio = count_frames(out)
    assert (frames, size, has_audio) == (2, (64, 64), True)
    with av.open(str(out)) as container:
        assert float(container.streams.video[0].average_rate) == pytest.approx(5.0)


def test_cli_edit_writes_one_image(media, tiny_checkpoint, tmp_path):
    from metaportrait.io.image import read_image

    out = tmp_path / "edited.png"
    argv = ["edit", "-s", str(media["astronaut"]), "--mouth", "0.6", "--yaw", "10", "-o", str(out),
            "--checkpoint", str(tiny_checkpoint)]  # fmt: skip
    assert main(argv) == 0
    assert read_image(out).shape == (512, 512, 3)
    whole = tmp_path / "whole_crop.png"
    assert main(argv[:-3] + [str(whole), "--checkpoint", str(tiny_checkpoint), "--no-source-detail"]) == 0
    assert np.abs(read_image(whole).astype(int) - read_image(out)).max() > 0  # the portrait's detail is not kept
    # --eyelid-fill changes closing eyes only: the same edit with open eyes is the same image.
    for eyes, changed in (("0", True), ("1", False)):
        plain, filled = tmp_path / f"plain{eyes}.png", tmp_path / f"filled{eyes}.png"
        base = ["edit", "-s", str(media["astronaut"]), "--eyes", eyes, "--checkpoint", str(tiny_checkpoint), "-o"]
        assert main(base + [str(plain)]) == 0 and main(base + [str(filled), "--eyelid-fill"]) == 0
        assert (np.abs(read_image(filled).astype(int) - read_image(plain)).max() > 0) == changed


def test_eyelid_fill_needs_a_mesh_prior(tmp_path):
    from metaportrait.io.checkpoint import save_model

    no_prior = TINY.replace(use_mesh_prior=False, prior_masks=False)
    save_model(tmp_path / "no_prior", Generator(no_prior), no_prior)
    assert not Animator.from_pretrained(tmp_path / "no_prior", eyelid_fill=False).config.prior_eyelid_fill
    with pytest.raises(InputError, match="no mesh prior"):
        Animator.from_pretrained(tmp_path / "no_prior", eyelid_fill=True)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("grey_source", "grey.png: no face found"),
        ("faceless_driving", "faceless.mp4: no face found"),
        ("missing_source", "missing.png: file not found"),
        ("missing_driving", "missing.mp4: file not found"),
        ("missing_folder", "no_such_folder/out.mp4: output folder"),
        ("bad_suffix", "out.gif: output must end with"),
        ("reference_beyond_clip", "is outside the driving clip's"),
    ],
)
def test_cli_animate_bad_inputs(case, expected, media, tiny_checkpoint, tmp_path, capsys):
    source, driving, out = media["astronaut"], media["driving"], tmp_path / "out.mp4"
    if case == "grey_source":
        source = media["grey"]
    elif case == "faceless_driving":
        driving = media["faceless"]
    elif case == "missing_source":
        source = tmp_path / "missing.png"
    elif case == "missing_driving":
        driving = tmp_path / "missing.mp4"
    elif case == "missing_folder":
        out = tmp_path / "no_such_folder" / "out.mp4"
    elif case == "bad_suffix":
        out = tmp_path / "out.gif"
    extra = ["--reference", "999"] if case == "reference_beyond_clip" else []
    capsys.readouterr()
    code = main(["animate", "-s", str(source), "-d", str(driving), "-o", str(out),
                 "--checkpoint", str(tiny_checkpoint), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_cli_error_in_a_fresh_process(tmp_path):
    """The installed console entry: exit status 2 and a single stderr line, no traceback."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "metaportrait"), "animate", "-s", str(tmp_path / "nope.jpg"),
         "-d", str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "out.mp4")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.jpg'}: file not found"]
    assert list(tmp_path.iterdir()) == []


def test_bench_finds_the_benchmark_scripts(monkeypatch, tmp_path):
    import inspect

    from metaportrait.cli import bench

    assert (bench.benchmarks_dir() / "bench_animate.py").is_file()
    module = bench.load_benchmark("animate")
    assert "threads" in inspect.signature(module.run).parameters
    assert "cases" in inspect.signature(module.run).parameters and "clip_256" in module.CASES
    assert "peak_rss_mb" in inspect.getsource(module._case)  # memory per case
    personalize = bench.load_benchmark("personalize")  # slow: runs only when asked for (--only personalize)
    assert "steps" in inspect.signature(personalize.run).parameters and "personalize" in bench.ON_REQUEST
    assert bench.peak_rss_mb() > 0
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path)
    with pytest.raises(InputError, match="source checkout"):
        bench.load_benchmark("animate")


# --- slow end-to-end checks ---------------------------------------------------------------------------------


def _demo_checkpoint(tiny_checkpoint: Path) -> Path:
    """The bundled lite model: the end-to-end checks run what users get."""
    bundled = bundled_checkpoint()
    assert (bundled / "model.safetensors").is_file(), f"the bundled checkpoint is missing from {bundled}"
    return bundled


@pytest.mark.slow
def test_demo_on_the_astronaut(tiny_checkpoint, tmp_path):
    from metaportrait.cli.demo import write_animation_demo

    checkpoint = _demo_checkpoint(tiny_checkpoint)
    paths, distances = write_animation_demo(tmp_path, Animator.from_pretrained(checkpoint))
    assert [p.name for p in paths] == ["demo.mp4", "demo_side_by_side.mp4"]
    assert count_frames(paths[0]) == (100, (512, 512), False)
    assert count_frames(paths[1])[:2] == (100, (512, 1536))
    assert len(distances) == 4 and distances[0][0] == 0 and distances[-1][0] == 99
    # the trained model keeps the astronaut recognisable
    assert all(d is not None and d < 0.6 for _, d in distances), distances


@pytest.mark.slow
def test_animate_real_clip_with_audio(shared_data, tiny_checkpoint, tmp_path):
    checkpoint = _demo_checkpoint(tiny_checkpoint)
    out = tmp_path / "real.mp4"
    code = main(["animate", "-s", str(shared_data / "sources" / "fomm_01.png"),
                 "-d", str(shared_data / "driving" / "lp_d1.mp4"), "-o", str(out), "--checkpoint", str(checkpoint)])
    assert code == 0
    frames, _, has_audio = count_frames(out)
    assert frames == 16 and has_audio


def test_a_model_with_the_face_masked_prior_gets_the_identity_outside_the_face(astronaut):
    configs = [TINY, TINY.replace(prior_face_masked=True)]
    grids, source, turned = _prior_grids(astronaut, configs, Controls(yaw=20.0, mouth=0.6))
    size = grids[0].shape[1]
    expected = mesh_warp_grid(source.crop_landmarks, turned, size, size, mouth=TINY.prior_mouth, face_masked=True)
    torch.testing.assert_close(grids[1][0], torch.from_numpy(expected))
    # Around the face the ring prior moves hair and background with the head; the masked one leaves them still.
    identity = torch.from_numpy(identity_grid(size, size))
    still = [int(((grid[0] - identity).abs().amax(-1) < 1e-6).sum()) for grid in grids]
    assert still[1] > still[0] + size * size // 10


def _prior_grids(astronaut, configs, controls: Controls):
    """The prior grid each config's (untrained) model is given for the astronaut under ``controls``; with the
    prepared source and the target landmarks."""
    image, points = astronaut
    grids = []
    for cfg in configs:
        generator = Generator(cfg)
        generator.register_forward_pre_hook(lambda _, args, kwargs: grids.append(kwargs["prior_grid"]), with_kwargs=True)
        animator = Animator(generator, cfg)
        source = animator.prepare_source(image, landmarks=points, pasted=False)
        target = controls.apply(source.crop_landmarks)
        animator._generate(source, [target])
    return grids, source, target


# --- streaming and live -------------------------------------------------------------------------------------------


def test_running_reference_streams_and_matches_auto_on_a_still_driver(animator, astronaut):
    image, points = astronaut
    # Long enough that the background stages' bounded read-ahead (two batches per queue) cannot hold all of it.
    clip = driving_frames(image, 4) * 6
    consumed = []

    def lazily():
        for frame in clip:
            consumed.append(frame)
            yield frame

    frames = animator(image, lazily(), reference="running", driving_fps=10, source_landmarks=points)
    next(frames)
    assert len(consumed) < len(clip)  # the first output came before the whole clip was read
    rest = list(frames)
    assert len(rest) == len(clip) - 1 and animator.stats.reference_frame is None


def test_motion_transferred_in_chunks_gives_the_whole_clips_frames(animator, astronaut, monkeypatch):
    import metaportrait.pipeline as pipeline

    image, points = astronaut
    clip = driving_frames(image, 7)
    whole = np.stack(list(animator(image, iter(clip), driving_fps=10, source_landmarks=points)))
    monkeypatch.setattr(pipeline, "RETARGET_CHUNK", 3)  # chunks of 3, 3 and 1 frames
    chunked = np.stack(list(animator(image, iter(clip), driving_fps=10, source_landmarks=points)))
    np.testing.assert_array_equal(chunked, whole)


def test_running_reference_moves_only_to_a_clearly_more_neutral_frame(astronaut):
    from metaportrait.motion import RunningReference, edit_landmarks

    _, points = astronaut
    running = RunningReference(window=10)
    open_mouth = edit_landmarks(points, mouth=0.5)
    assert np.array_equal(running(open_mouth), open_mouth)  # the first frame is the first reference
    assert np.array_equal(running(edit_landmarks(points, mouth=0.45)), open_mouth)  # not clearly better
    closed = running(points)
    assert np.allclose(closed, points) and running.changes == 1


def test_cli_live_plays_a_file_in_real_time(media, tiny_checkpoint, tmp_path, capsys):
    import json

    out = tmp_path / "live.mp4"
    capsys.readouterr()
    code = main(["live", "-s", str(media["astronaut"]), "-d", str(media["driving"]), "-o", str(out),
                 "--checkpoint", str(tiny_checkpoint)])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["offered"] == 6 and report["processed"] + report["dropped"] == 6
    assert report["processed"] >= 1 and report["latency_p95_ms"] >= report["latency_p50_ms"] > 0
    # Dropped frames are repeated, so the output keeps the input's length up to the frames still in flight.
    frames, size, _ = count_frames(out)
    assert 1 <= frames <= 6 and size == (512, 512)


def test_cli_live_bad_camera_is_one_error_line(tmp_path, media, capsys):
    capsys.readouterr()
    code = main(["live", "-s", str(media["astronaut"]), "-d", "97"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: camera 97: could not be opened"), err


def test_bf16_precision_is_close_to_fp32_and_auto_follows_the_cpu(astronaut, monkeypatch):
    import metaportrait.pipeline as pipeline

    image, points = astronaut
    targets = scripted_motion(points, 3)
    torch.manual_seed(0)
    generator = Generator(TINY)
    frames = {p: np.stack(list(Animator(generator, TINY, precision=p).animate_landmarks(
        image, targets, paste_back=False, source_landmarks=points))) for p in ("fp32", "bf16")}
    difference = np.abs(frames["bf16"].astype(int) - frames["fp32"])
    assert 0 < difference.mean() < 1.5 and frames["bf16"].dtype == np.uint8
    monkeypatch.setattr(pipeline, "cpu_has_bf16", lambda: False)
    assert Animator(generator, TINY, precision="auto").precision == "fp32"
    monkeypatch.setattr(pipeline, "cpu_has_bf16", lambda: True)
    assert Animator(generator, TINY, precision="auto").precision == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        Animator(generator, TINY, precision="fp16")


@pytest.mark.parametrize("height, width, box", [(300, 500, (10.2, 20.1, 240.0)), (256, 256, (128.0, 128.0, 256.0)),
                                                (400, 400, (200.5, 180.25, 420.0)), (200, 200, (900.0, 900.0, 100.0))])
def test_compose_frame_equals_pasting_back_then_adding_the_detail(height, width, box):
    """Step 4 in one pass over the box's region gives the frame of the two steps it fuses, bit for bit: the crop
    pasted back (rounded to 8 bits), then the portrait's detail weighted by the stillness map, rounded again."""
    from types import SimpleNamespace

    from metaportrait.data.face import box_region, paste_back, uncrop_map
    from metaportrait.pipeline import PASTE_FEATHER, compose_frame

    rng = np.random.default_rng(height + width)
    source = SimpleNamespace(image=rng.integers(0, 256, (height, width, 3), dtype=np.uint8), box=CropBox(*box),
                             detail=rng.integers(-200, 200, (height, width, 3)).astype(np.int16))
    face = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    still = rng.random((64, 64), dtype=np.float32)
    expected = paste_back(source.image, face, source.box, feather=PASTE_FEATHER)
    region = box_region(source.box, height, width)
    if region is not None:
        left, top, right, bottom = region
        weight = uncrop_map(still, source.box, height, width)[top:bottom, left:right, None]
        kept = expected[top:bottom, left:right] + weight * source.detail[top:bottom, left:right]
        expected[top:bottom, left:right] = np.clip(np.rint(kept), 0, 255).astype(np.uint8)
    assert np.array_equal(compose_frame(source, face, still=still), expected)
    assert np.array_equal(compose_frame(source, face), paste_back(source.image, face, source.box, PASTE_FEATHER))
