"""Known-answer tests for the evaluation metrics."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from metaportrait.eval import metrics


@pytest.fixture(scope="module")
def face():
    """scikit-image's astronaut cropped to 128 px, with MediaPipe landmarks in crop pixels."""
    from skimage.data import astronaut

    from metaportrait.data.face import CropBox, crop, points_to_crop
    from metaportrait.data.landmarks import landmarks_of_image

    image = astronaut()
    points = landmarks_of_image(image)
    box = CropBox.from_landmarks(points)
    return crop(image, box, 128), points_to_crop(points, box, 128)


def _similarity(points: np.ndarray, angle_degrees: float, scale: float, shift, centre=None) -> np.ndarray:
    centre = points.mean(axis=-2) if centre is None else np.asarray(centre)
    angle = np.radians(angle_degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return ((points - centre) @ rotation.T * scale + centre + np.asarray(shift)).astype(np.float32)


# --- pixel metrics ---------------------------------------------------------------------------------------------


def test_identical_images():
    image = np.random.default_rng(0).random((2, 32, 32, 3))
    assert metrics.l1(image, image) == 0.0
    assert metrics.psnr(image, image) == np.inf
    assert metrics.ssim(image, image) == pytest.approx(1.0)


def test_constant_offset():
    a = np.full((16, 16, 3), 0.5)
    b = a + 0.1
    assert metrics.psnr(a, b) == pytest.approx(20.0)
    assert metrics.l1(a, b) == pytest.approx(0.1)
    # uint8 input is read as value / 255
    assert metrics.l1(np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 51, np.uint8)) == pytest.approx(0.2)


def test_ssim_matches_skimage():
    rng = np.random.default_rng(1)
    a = rng.random((48, 40, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    smooth = np.clip(np.cumsum(rng.normal(0, 0.05, (48, 40, 3)), axis=1) % 1.0, 0, 1)
    for x, y in ((a, b), (a, smooth), (b, smooth)):
        expected = structural_similarity(
            x, y, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert metrics.ssim(x, y) == pytest.approx(expected, abs=1e-3)
    # a batch is the mean of its images
    batch = metrics.ssim(np.stack([a, a]), np.stack([b, smooth]))
    assert batch == pytest.approx((metrics.ssim(a, b) + metrics.ssim(a, smooth)) / 2)


def test_face_region_l1_only_counts_the_mask():
    a = np.zeros((8, 8, 3))
    b = np.zeros((8, 8, 3))
    b[:, 4:] = 1.0  # differ on the right half only
    mask = np.zeros((8, 8))
    mask[:, :4] = 1.0
    assert metrics.face_region_l1(a, b, mask) == 0.0
    mask[:, 4:6] = 1.0  # half of the masked pixels differ by 1
    assert metrics.face_region_l1(a, b, mask) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="empty"):
        metrics.face_region_l1(a, b, np.zeros((8, 8)))


def test_rejects_out_of_range_and_mismatched():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.l1(np.full((4, 4, 3), 2.0), np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="differ"):
        metrics.psnr(np.zeros((4, 4, 3)), np.zeros((5, 4, 3)))


# --- landmark metrics ------------------------------------------------------------------------------------------


def test_akd_known_translation(face):
    _, landmarks = face
    assert metrics.akd(landmarks, landmarks) == 0.0
    assert metrics.akd(landmarks, landmarks + np.array([3.0, 4.0], np.float32)) == pytest.approx(5.0, abs=1e-4)


def test_head_pose_frontal_and_roll(face):
    _, landmarks = face
    yaw, pitch, roll = metrics.head_pose(landmarks, image_size=128)
    assert abs(roll) < 10 and abs(yaw) < 20 and abs(pitch) < 25  # the astronaut faces the camera, upright
    centre = (64.0, 64.0)  # rotate about the principal point: a pure roll
    for angle in (-20.0, 7.0, 25.0):
        rotated = _similarity(landmarks, angle, 1.0, (0, 0), centre)
        difference = metrics.head_pose(rotated, image_size=128) - metrics.head_pose(landmarks, image_size=128)
        assert difference[2] == pytest.approx(angle, abs=1.0)
        assert np.abs(difference[:2]).max() < 1.0
        # APD is the mean over (yaw, pitch, roll) of the absolute differences
        assert metrics.apd(rotated, landmarks, image_size=128) == pytest.approx(abs(angle) / 3, abs=0.7)
    assert metrics.apd(landmarks, landmarks) == 0.0
    # batched input gives per-frame angles
    assert metrics.head_pose(np.stack([landmarks] * 3)).shape == (3, 3)


def test_aed_is_similarity_invariant_and_sees_expression(face):
    _, landmarks = face
    assert metrics.aed(landmarks, landmarks) == pytest.approx(0.0, abs=1e-6)
    moved = _similarity(landmarks, 15.0, 1.3, (5.0, -7.0))
    assert metrics.aed(landmarks, moved) == pytest.approx(0.0, abs=1e-5)
    assert metrics.aed(moved, landmarks) == pytest.approx(0.0, abs=1e-5)

    from metaportrait.motion import edit_landmarks

    open_mouth = edit_landmarks(landmarks, mouth=1.0)
    expression = metrics.aed(landmarks, open_mouth)
    assert expression > 0.005
    # the same expression change seen under another pose and scale gives the same AED
    assert metrics.aed(_similarity(landmarks, -10, 0.8, (3, 3)), _similarity(open_mouth, 20, 1.2, (-4, 1))) == (
        pytest.approx(expression, rel=1e-4)
    )


# --- warping error ---------------------------------------------------------------------------------------------


def _textured(size: int = 64, seed: int = 0) -> np.ndarray:
    import cv2

    noise = np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)
    return (cv2.GaussianBlur(noise, (0, 0), 2.0) * 255).clip(0, 255).astype(np.uint8)


def test_warping_error_static_video_is_zero():
    frames = np.stack([_textured()] * 4)
    assert metrics.warping_error(frames) == pytest.approx(0.0, abs=1e-6)


def test_warping_error_tracks_motion_but_punishes_flicker():
    import cv2

    base = _textured(96)
    # A smooth 1-px-per-frame pan: flow explains it, small error.
    panning = np.stack([cv2.warpAffine(base, np.float32([[1, 0, t], [0, 1, 0]]), (96, 96)) for t in range(4)])
    panning = panning[:, 16:-16, 16:-16]
    flow = metrics.temporal_flow(panning)
    assert flow.backward.shape == (3, 64, 64, 2) and flow.valid.shape == (3, 64, 64)
    assert flow.valid.mean() > 0.5
    np.testing.assert_allclose(np.median(flow.backward[..., 0]), -1.0, atol=0.2)  # frame t-1 shows p at x - 1
    smooth_error = metrics.warping_error(panning, flow)
    # The same motion with the brightness flickering frame to frame.
    flicker = np.stack([np.clip(f.astype(int) + (20 if t % 2 else -20), 0, 255).astype(np.uint8)
                        for t, f in enumerate(panning)])
    flicker_error = metrics.warping_error(flicker, flow)
    assert smooth_error < 2e-3
    assert flicker_error > 10 * smooth_error and flicker_error == pytest.approx((40 / 255) ** 2, rel=0.3)


# --- identity ---------------------------------------------------------------------------------------------------


def test_identity_metrics_zero_for_the_source_itself(face):
    import torch

    from metaportrait.models.identity import DlibFaceResNet, IdentityEncoder

    image, landmarks = face
    torch.manual_seed(0)
    encoder = IdentityEncoder(DlibFaceResNet())  # random weights: only the plumbing is tested here
    same = metrics.identity_metrics(np.stack([image, image]), np.stack([landmarks] * 2), image, landmarks, encoder)
    assert same["id_distance"] == pytest.approx(0.0, abs=1e-4) and same["id_loss"] == pytest.approx(0.0, abs=1e-5)
    other = np.ascontiguousarray(image[:, ::-1])  # mirrored pixels, same landmarks: a different chip
    assert metrics.id_distance(other[None], landmarks[None], image, landmarks, encoder) > 1e-3
