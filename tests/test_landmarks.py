"""Dense landmarks (MediaPipe Face Mesh), One-Euro smoothing, the `landmarks` and `demo` commands."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from metaportrait.cli import main
from metaportrait.cli.demo import write_landmark_demo
from metaportrait.data.face import detect_face
from metaportrait.data.landmarks import (
    NUM_LANDMARKS,
    NUM_MESH_POINTS,
    FaceMeshTracker,
    OneEuroFilter,
    iter_tracked,
    landmarks_of_image,
    track_frames,
)
from metaportrait.errors import InputError, NoFaceError
from metaportrait.io.image import read_image, write_image
from metaportrait.io.video import VideoReader, write_video

# Where the astronaut's face is in skimage.data.astronaut() (512x512), measured by hand.
ASTRONAUT_FACE = (178, 72, 272, 175)  # x0, y0, x1, y1
MARGIN = 8
# MediaPipe indices used for plausibility checks (image-left eye = subject's right eye).
EYE_IMAGE_LEFT = [33, 133, 159, 145]
EYE_IMAGE_RIGHT = [362, 263, 386, 374]
NOSE_TIP, UPPER_LIP, LOWER_LIP, CHIN = 4, 0, 17, 152  # outer lip top and bottom centre


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def astronaut_landmarks(astronaut) -> np.ndarray:
    return landmarks_of_image(astronaut, "astronaut")


def _assert_face_layout(points: np.ndarray) -> None:
    """Anatomical order in the image: eyes above nose above mouth above chin, image-left eye on the left."""
    left_eye, right_eye = points[EYE_IMAGE_LEFT].mean(0), points[EYE_IMAGE_RIGHT].mean(0)
    eyes_y = (left_eye[1] + right_eye[1]) / 2
    assert left_eye[0] < points[NOSE_TIP, 0] < right_eye[0]
    assert eyes_y < points[NOSE_TIP, 1] < points[UPPER_LIP, 1] < points[LOWER_LIP, 1] < points[CHIN, 1]


def test_astronaut_landmarks_inside_face_box(astronaut_landmarks):
    points = astronaut_landmarks
    assert points.shape == (NUM_LANDMARKS, 2) and points.dtype == np.float32
    x0, y0, x1, y1 = ASTRONAUT_FACE
    mesh = points[:NUM_MESH_POINTS]
    assert (mesh[:, 0] > x0 - MARGIN).all() and (mesh[:, 0] < x1 + MARGIN).all()
    assert (mesh[:, 1] > y0 - MARGIN).all() and (mesh[:, 1] < y1 + MARGIN).all()
    # The mesh spans most of the box (not a collapsed detection).
    assert np.ptp(mesh[:, 0]) > 0.8 * (x1 - x0) and np.ptp(mesh[:, 1]) > 0.8 * (y1 - y0)
    _assert_face_layout(points)
    # Irises (468..477) sit inside the eye openings.
    iris_left, iris_right = points[468], points[473]
    assert np.linalg.norm(iris_left - points[EYE_IMAGE_LEFT].mean(0)) < 6
    assert np.linalg.norm(iris_right - points[EYE_IMAGE_RIGHT].mean(0)) < 6


@pytest.mark.parametrize("name", ["lp_d12.jpg", "fomm_01.png", "lia_macron.png", "sadtalker_sad1.png"])
def test_real_photo_landmarks_match_face_detection(shared_data, name):
    image = read_image(shared_data / "sources" / name)
    points = landmarks_of_image(image, name)
    detection = detect_face(image)
    assert detection is not None and detection.score > 0.5
    # MediaPipe's detection box spans brows to chin; the inner face (eyes, nose, mouth) must lie inside it.
    pad = 0.1 * (detection.x1 - detection.x0)
    inner = points[EYE_IMAGE_LEFT + EYE_IMAGE_RIGHT + [NOSE_TIP, UPPER_LIP, LOWER_LIP]]
    assert (inner[:, 0] > detection.x0 - pad).all() and (inner[:, 0] < detection.x1 + pad).all()
    assert (inner[:, 1] > detection.y0 - pad).all() and (inner[:, 1] < detection.y1 + pad).all()
    _assert_face_layout(points)


def test_no_face_raises_with_name():
    grey = np.full((128, 128, 3), 128, dtype=np.uint8)
    with pytest.raises(NoFaceError) as caught:
        landmarks_of_image(grey, "grey.png")
    assert caught.value.path == "grey.png" and "no face" in caught.value.problem


def test_tracker_rejects_bad_frames():
    with FaceMeshTracker() as tracker:
        with pytest.raises(ValueError, match="uint8 RGB"):
            tracker(np.zeros((32, 32, 3), dtype=np.float32))
        with pytest.raises(ValueError, match="uint8 RGB"):
            tracker(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(RuntimeError, match="closed"):
        tracker(np.zeros((32, 32, 3), dtype=np.uint8))


def test_track_frames_fills_missing_frames(astronaut):
    grey = np.full((256, 256, 3), 128, dtype=np.uint8)
    face = np.ascontiguousarray(astronaut[:256, 96:352])  # the face, centred
    frames = [grey, face, face, grey, face]
    landmarks, present = track_frames(frames, smooth=False, fps=25, name="synthetic")
    assert landmarks.shape == (5, NUM_LANDMARKS, 2) and landmarks.dtype == np.float32
    np.testing.assert_array_equal(present, [False, True, True, False, True])
    np.testing.assert_array_equal(landmarks[0], landmarks[1])  # leading gap: first good landmarks
    np.testing.assert_array_equal(landmarks[3], landmarks[2])  # gap: last good landmarks
    # The generator form hands back the very frames it was given, in order.
    yielded = [frame for frame, _, _ in iter_tracked(frames, smooth=True, fps=25)]
    assert all(a is b for a, b in zip(yielded, frames)) and len(yielded) == len(frames)


def test_track_frames_without_face_or_frames():
    grey = np.full((64, 64, 3), 90, dtype=np.uint8)
    with pytest.raises(NoFaceError, match="any of 3 frames"):
        track_frames([grey] * 3, name="grey clip")
    with pytest.raises(InputError, match="no frames"):
        track_frames([], name="empty clip")


def test_one_euro_reduces_jitter_and_follows_a_step():
    rng = np.random.default_rng(0)
    fps, frames = 30.0, 120
    noise = rng.normal(0.0, 1.0, size=(frames, 478, 2))
    smoother = OneEuroFilter(fps, min_cutoff=1.0, beta=0.2)
    smoothed = np.stack([smoother(100.0 + n) for n in noise])
    # Jitter = frame-to-frame change; at least 3x smaller after the start-up.
    raw_jitter = np.abs(np.diff(noise[30:], axis=0)).mean()
    smooth_jitter = np.abs(np.diff(smoothed[30:], axis=0)).mean()
    assert smooth_jitter < raw_jitter / 3
    assert abs(smoothed[30:].mean() - 100.0) < 0.1  # no bias

    # A clean step of 50 px: the filter reaches it within a quarter second and does not overshoot.
    step = OneEuroFilter(fps, min_cutoff=1.0, beta=0.2)
    track = np.array([step(np.array([0.0 if t < 10 else 50.0]))[0] for t in range(40)])
    assert track[9] == 0.0 and track[10] > 5.0
    assert abs(track[10 + int(0.25 * fps)] - 50.0) < 1.0
    assert track.max() <= 50.0 + 1e-9

    step.reset()
    np.testing.assert_array_equal(step(np.array([7.0])), [7.0])  # passes through after a reset
    with pytest.raises(ValueError, match="shape"):
        step(np.zeros(3))
    with pytest.raises(ValueError, match="fps"):
        OneEuroFilter(0.0)


# --- command line ---------------------------------------------------------------------------------------------


def _run_cli(capfd, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capfd.readouterr().err


def test_cli_image(tmp_path, capfd, astronaut):
    source = tmp_path / "astronaut.png"
    write_image(source, astronaut)
    capfd.readouterr()
    code, _ = _run_cli(
        capfd, "landmarks", str(source), "--output", str(tmp_path / "a.npz"), "--overlay", str(tmp_path / "a.png")
    )
    assert code == 0
    result = np.load(tmp_path / "a.npz")
    assert result["landmarks"].shape == (1, NUM_LANDMARKS, 2) and result["landmarks"].dtype == np.float32
    assert result["present"].tolist() == [True] and float(result["fps"]) == 0.0
    assert result["image_size"].tolist() == [512, 512]
    overlay = read_image(tmp_path / "a.png")
    assert overlay.shape == astronaut.shape and (overlay != astronaut).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "a.png", "astronaut.png"]  # no temp files left


def test_cli_video_one_row_per_frame(tmp_path, capfd, astronaut):
    # A 6-frame clip of the astronaut's face drifting right, written with the project's video writer.
    frames = [np.ascontiguousarray(astronaut[:256, 90 + 4 * k : 346 + 4 * k]) for k in range(6)]
    clip = tmp_path / "clip.mp4"
    write_video(clip, frames, fps=25)
    code, _ = _run_cli(
        capfd, "landmarks", str(clip), "-o", str(tmp_path / "c.npz"), "--overlay", str(tmp_path / "c.mp4")
    )
    assert code == 0
    result = np.load(tmp_path / "c.npz")
    assert result["landmarks"].shape == (6, NUM_LANDMARKS, 2) and result["present"].all()
    assert float(result["fps"]) == 25.0
    nose_x = result["landmarks"][:, NOSE_TIP, 0]
    assert (np.diff(nose_x) < 0).all()  # the crop window moves right, so the face moves left
    with VideoReader(tmp_path / "c.mp4") as reader:
        assert sum(1 for _ in reader) == 6

    code, _ = _run_cli(capfd, "landmarks", str(clip), "-o", str(tmp_path / "d.npz"), "--max-frames", "3", "--no-smooth")
    assert code == 0 and np.load(tmp_path / "d.npz")["landmarks"].shape == (3, NUM_LANDMARKS, 2)


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capfd):
    text_as_jpg = tmp_path / "notes.jpg"
    text_as_jpg.write_text("this is not an image\n")
    grey = tmp_path / "grey.png"
    write_image(grey, np.full((96, 96, 3), 128, dtype=np.uint8))
    capfd.readouterr()
    cases = [(tmp_path / "missing.jpg", "file not found"), (text_as_jpg, "not an image"), (grey, "no face")]
    for source, problem in cases:
        output, overlay = tmp_path / "out.npz", tmp_path / "o.png"
        code, err = _run_cli(capfd, "landmarks", str(source), "--output", str(output), "--overlay", str(overlay))
        assert code == 2
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {source}: ") and problem in lines[0], err
        assert not output.exists() and not overlay.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.png", "notes.jpg"]  # nothing else written


def test_cli_rejects_wrong_output_suffix(tmp_path, capfd, astronaut):
    source = tmp_path / "a.png"
    write_image(source, astronaut)
    capfd.readouterr()
    code, err = _run_cli(capfd, "landmarks", str(source), "--output", str(tmp_path / "a.txt"))
    assert code == 2 and "must end with .npz" in err


def test_landmark_demo_writes_overlay_and_landmarks(tmp_path):
    # The landmark half of `metaportrait demo` (the animation half is tested with the pipeline).
    (tmp_path / "demo").mkdir()
    written = write_landmark_demo(tmp_path / "demo")
    assert sorted(p.name for p in written) == ["astronaut_landmarks.npz", "astronaut_landmarks.png"]
    result = np.load(tmp_path / "demo" / "astronaut_landmarks.npz")
    mesh = result["landmarks"][0, :NUM_MESH_POINTS]
    x0, y0, x1, y1 = ASTRONAUT_FACE
    assert mesh[:, 0].min() > x0 - MARGIN and mesh[:, 0].max() < x1 + MARGIN
    assert mesh[:, 1].min() > y0 - MARGIN and mesh[:, 1].max() < y1 + MARGIN
    assert read_image(tmp_path / "demo" / "astronaut_landmarks.png").shape == (512, 512, 3)


@pytest.mark.slow
def test_cli_real_clip(shared_data, tmp_path, capfd):
    clip = shared_data / "driving" / "lp_d1.mp4"  # 16 frames, 512x512, 30 fps
    code, _ = _run_cli(
        capfd, "landmarks", str(clip), "-o", str(tmp_path / "d1.npz"), "--overlay", str(tmp_path / "d1.mp4")
    )
    assert code == 0
    result = np.load(tmp_path / "d1.npz")
    assert result["landmarks"].shape == (16, NUM_LANDMARKS, 2) and result["present"].all()
    assert float(result["fps"]) == 30.0
    for points in result["landmarks"]:
        _assert_face_layout(points)
