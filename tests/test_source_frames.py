"""Source frames (metaportrait.source_frames): the chooser's hysteresis, the Animator animating the chosen frame with
a cross-fade at a switch, the framing check, and `eval personalize --source-frames`. A tiny untrained model: these
check the plumbing; the measured effect is in docs/results.md, "Personalization"."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metaportrait.config import PRESETS
from metaportrait.errors import InputError
from metaportrait.models.generator import Generator
from metaportrait.pipeline import Animator
from metaportrait.source_frames import FADE_SECONDS, SourceChooser, SourceFrames, appearance_differences, frames_at

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def astronaut() -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    from metaportrait.data.landmarks import landmarks_of_image

    image = data.astronaut()
    return image, landmarks_of_image(image, "astronaut")


def test_chooser_switches_only_to_a_clearly_nearer_frame_and_stays():
    portrait = np.random.default_rng(0).uniform(100, 300, (478, 2)).astype(np.float32)
    frames = SourceFrames(np.zeros((2, 8, 8, 3), np.uint8), np.stack([portrait + 10, portrait + 30]))
    chooser = SourceChooser(frames, portrait, margin=0.3, min_stay=3)
    assert chooser(portrait + 1) == -1  # the portrait is nearest
    assert chooser(portrait + 5.5) == -1  # frame 0 is nearer (4.5 against 5.5) but not 30 % nearer
    assert chooser(portrait + 9) == 0  # now it is
    assert chooser(portrait + 30) == 0 and chooser(portrait + 30) == 0  # frame 1 is best, but 3 frames must pass
    assert chooser(portrait + 30) == 1 and chooser.switches == 2
    assert chooser(portrait) == 1  # just switched: stays
    np.testing.assert_allclose(chooser.distances(portrait)[[0, -1]], [10 * np.sqrt(2), 0], rtol=1e-5)


def test_chooser_counts_a_frame_unlike_the_portrait_as_farther():
    portrait = np.random.default_rng(0).uniform(100, 300, (478, 2)).astype(np.float32)
    frames = SourceFrames(np.zeros((2, 8, 8, 3), np.uint8), np.stack([portrait + 10, portrait + 30]))
    chooser = SourceChooser(frames, portrait, margin=0.3, min_stay=1, appearance=np.float32([0, 40]),
                            appearance_scale=20)
    np.testing.assert_allclose(chooser.distances(portrait + 24), np.sqrt(2) * np.array([14, 6 * 3, 24]), rtol=1e-5)
    assert chooser(portrait + 24) == 0  # frame 1 is nearer in landmarks, but looks unlike the portrait
    assert chooser(portrait + 29) == 1  # 1 x 3 against 19: now it is nearer all the same
    with pytest.raises(ValueError, match="appearance"):
        SourceChooser(frames, portrait, appearance=np.zeros(3))


def test_appearance_difference_looks_outside_the_faces_only(astronaut):
    image, points = astronaut
    face_changed = image.copy()
    (x0, y0), (x1, y1) = points[:468].min(0) + 40, points[:468].max(0) - 40  # well inside the face
    face_changed[int(y0):int(y1), int(x0):int(x1)] = 0
    background_changed = image.copy()
    background_changed[:, :100] = 255 - background_changed[:, :100]  # the left fifth, far from the face
    frames = SourceFrames(np.stack([image, face_changed, background_changed]), np.stack([points] * 3))
    same, face, background = appearance_differences(frames, image, points)
    assert same == 0 and face == 0
    assert background > 20  # about a fifth of the pixels, inverted


def test_animator_animates_the_chosen_frame_and_cross_fades_at_the_switch(astronaut):
    image, points = astronaut
    torch.manual_seed(0)
    animator = Animator(Generator(TINY), TINY, batch_size=3)
    other = image.copy()
    # Far below the face: what shows there is the source frame's own pixels (a small patch, so that the frame
    # still looks like the portrait: `appearance_differences`).
    other[-40:, :64] = 255 - other[-40:, :64]
    shift = np.float32([12, 0])
    frames = SourceFrames(other[None], (points + shift)[None], "other.mp4")
    targets = [points] * 2 + [points + shift] * 8
    out = list(animator.animate_landmarks(image, targets, source_landmarks=points, source_frames=frames, fps=25))
    fade = frames_at(FADE_SECONDS, 25)
    assert fade == 4
    assert len(out) == 10 and animator.stats.source_switches == 1 and animator.stats.sources_used == 2
    bottom = [frame[-40:].astype(np.float32) for frame in out]
    np.testing.assert_array_equal(bottom[0], image[-40:])  # the portrait until the targets move
    np.testing.assert_array_equal(bottom[1], image[-40:])
    for k in range(fade):  # the switch at frame 2 fades from the portrait to the other frame
        weight = (fade - k) / (fade + 1)
        expected = np.rint(weight * image[-40:] + (1 - weight) * other[-40:].astype(np.float32))
        np.testing.assert_allclose(bottom[2 + k], expected, atol=1)
    for frame in bottom[2 + fade:]:
        np.testing.assert_array_equal(frame, other[-40:])
    # Without source frames the same call is the plain animation, frame for frame.
    plain = list(animator.animate_landmarks(image, targets[:2], source_landmarks=points))
    np.testing.assert_array_equal(plain[1], out[1])


def test_only_a_few_prepared_source_frames_are_kept(astronaut, monkeypatch):
    import metaportrait.pipeline as pipeline

    image, points = astronaut
    monkeypatch.setattr(pipeline, "PREPARED_SOURCE_FRAMES", 2)
    torch.manual_seed(0)
    animator = Animator(Generator(TINY), TINY, batch_size=2)
    shifts = [np.float32([8 * (k + 1), 0]) for k in range(4)]  # frame k is nearest to the target moved by shift k
    frames = SourceFrames(np.stack([image] * 4), np.stack([points + d for d in shifts]))
    targets = [points + d for d in shifts for _ in range(3)] + [points + shifts[0]] * 3
    prepared = []
    prepare = animator.prepare_source
    monkeypatch.setattr(animator, "prepare_source", lambda *a: prepared.append(a[1]) or prepare(*a))
    out = list(animator.animate_landmarks(image, targets, source_landmarks=points, source_frames=frames, fps=1))
    assert len(out) == 15 and animator.stats.source_switches == 5 and animator.stats.sources_used == 5
    # The portrait, frames 0-3, then frame 0 again: it was dropped when frame 2 came in.
    assert prepared == ["<source>", *[f"<source frames>[{k}]" for k in (0, 1, 2, 3, 0)]]


def test_source_frames_must_share_the_portraits_framing(astronaut):
    image, points = astronaut
    frames = SourceFrames(np.zeros((1, 100, 120, 3), np.uint8), points[None], "clip.mp4")
    animator = Animator(Generator(TINY), TINY)
    with pytest.raises(InputError, match=r"clip.mp4: source frames are 120x100 but the portrait is 512x512"):
        animator.animate_landmarks(image, [points], source_landmarks=points, source_frames=frames)
    with pytest.raises(ValueError, match="landmarks"):
        SourceFrames(np.zeros((2, 8, 8, 3), np.uint8), points[None])


def test_source_frames_from_a_video_keep_the_frames_with_a_face(astronaut, tmp_path):
    from metaportrait.io.video import write_video

    image, points = astronaut
    blank = np.zeros_like(image)
    write_video(tmp_path / "clip.mp4", [image, blank, image, blank, image], 25)
    frames = SourceFrames.from_video(tmp_path / "clip.mp4", max_frames=3)  # every 2nd frame: 0, 2, 4
    assert len(frames) == 3 and frames.images.shape == (3, *image.shape)
    assert np.abs(frames.landmarks - points).mean() < 3  # video coding moves the landmarks a little
    with pytest.raises(InputError, match="no face in any of the 3 sampled frames"):
        write_video(tmp_path / "blank.mp4", [blank] * 5, 25)
        SourceFrames.from_video(tmp_path / "blank.mp4", max_frames=3)


def test_animate_source_frames_without_a_video_is_one_error_line(astronaut, tmp_path, capsys):
    from metaportrait.cli import main
    from metaportrait.io.image import write_image

    image, _ = astronaut
    write_image(tmp_path / "me.png", image)
    argv = ["animate", "-s", str(tmp_path / "me.png"), "--source-frames", "-d", str(tmp_path / "d.mp4"),
            "-o", str(tmp_path / "out.mp4")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'me.png'}: --source-frames without a video needs " \
                                              "--source to be a video"
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.slow
def test_animate_with_source_frames_on_a_real_video(shared_data, tmp_path):
    """The bundled model, a new person's 1080x1920 video as portrait and source frames, another person driving."""
    from metaportrait.cli import main
    from metaportrait.io.video import VideoReader

    video = shared_data / "hires" / "latentsync_demo2_video.mp4"
    driving = shared_data / "personal" / "obama" / "edtalk_uncrop_Obama.mp4"
    out = tmp_path / "out.mp4"
    argv = ["animate", "-s", str(video), "--source-frames", "-d", str(driving), "-o", str(out), "--max-frames", "40"]
    assert main(argv) == 0
    with VideoReader(out) as result, VideoReader(video) as source:
        assert (result.width, result.height) == (source.width, source.height)
        assert sum(1 for _ in result) == 40
