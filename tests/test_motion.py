"""Motion transfer and landmark edits (metaportrait.motion): known answers on the astronaut's real landmarks."""

from __future__ import annotations

import numpy as np
import pytest

from metaportrait import motion


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """Real MediaPipe landmarks of scikit-image's astronaut, (478, 2) pixels of the 512x512 photo."""
    from skimage import data

    from metaportrait.data.landmarks import landmarks_of_image

    return landmarks_of_image(data.astronaut(), "astronaut").astype(np.float64)


def similarity(points: np.ndarray, angle_degrees: float = 0.0, scale: float = 1.0, shift=(0.0, 0.0),
               centre=None) -> np.ndarray:
    """Rotate (clockwise on screen for positive angles), scale about ``centre`` and shift (N, 2) points."""
    centre = points.mean(axis=0) if centre is None else np.asarray(centre, dtype=np.float64)
    t = np.radians(angle_degrees)
    rotation = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return (points - centre) @ rotation.T * scale + centre + np.asarray(shift)


def test_identical_driving_leaves_source_unchanged(face):
    reference = similarity(face, 25.0, 1.7, (40.0, -13.0))  # the driver: another size, position and roll
    out = motion.relative_motion(face, reference, reference)
    assert out.dtype == np.float32 and out.shape == (478, 2)
    np.testing.assert_allclose(out, face, atol=1e-3)


def test_rotated_driver_rotates_source_by_the_same_angle(face):
    reference = similarity(face, -20.0, 0.6, (100.0, 50.0))
    driving = np.stack([reference, similarity(reference, 10.0)])  # frame 1: the reference turned by 10°
    out = motion.relative_motion(face, driving, reference)
    assert out.shape == (2, 478, 2)
    np.testing.assert_allclose(out[0], face, atol=1e-3)
    # The source turns by 10° about the source point corresponding to the driver's rotation centre (its mean).
    np.testing.assert_allclose(out[1], similarity(face, 10.0), atol=1e-3)
    a, _ = motion.fit_similarity(face, out[1], tuple(range(478)))
    assert np.degrees(np.angle(a)) == pytest.approx(10.0, abs=1e-4) and abs(a) == pytest.approx(1.0, abs=1e-5)


def test_driver_translation_is_rescaled_to_the_source(face):
    reference = similarity(face, 0.0, 2.0)  # the driver's face is twice as big
    out = motion.relative_motion(face, similarity(reference, shift=(10.0, -4.0)), reference)
    np.testing.assert_allclose(out, face + np.array([5.0, -2.0]), atol=1e-3)


def test_expression_keeps_source_shape_and_follows_pose(face):
    # Driver = a posed copy of the source; driving frame = that copy with an open mouth and closed eyes, turned.
    reference = similarity(face, 30.0, 1.5, (20.0, 20.0))
    expressive = motion.edit_landmarks(reference.astype(np.float32), eyes=0.0, mouth=0.6)
    driving = similarity(expressive.astype(np.float64), 8.0, centre=reference.mean(axis=0))
    out = motion.relative_motion(face, driving, reference)
    expected = similarity(motion.edit_landmarks(face.astype(np.float32), eyes=0.0, mouth=0.6).astype(np.float64),
                          8.0, centre=face.mean(axis=0))
    np.testing.assert_allclose(out, expected, atol=1e-2)
    assert motion.mouth_openness(out) == pytest.approx(0.6, abs=1e-3)


def test_absolute_motion_rescales_between_crops(face):
    out = motion.absolute_motion(face, driving_size=512, target_size=256)
    np.testing.assert_allclose(out, face / 2, atol=1e-4)
    with pytest.raises(ValueError):
        motion.absolute_motion(face, 0, 256)


def test_mouth_edit_sets_the_lip_gap(face):
    before = motion.mouth_openness(face)
    opened = motion.edit_landmarks(face, mouth=0.6)
    assert opened.dtype == np.float32
    assert motion.mouth_openness(opened) == pytest.approx(0.6, abs=1e-3) and 0.6 > before
    closed = motion.edit_landmarks(opened, mouth=0.0)
    assert motion.mouth_openness(closed) < 0.01
    # The upper lip and the eyes stay; the chin moves down.
    frame = motion.FaceFrame.of(face)
    np.testing.assert_allclose(opened[list(motion.LIPS_OUTER_UPPER[1:-1])], face[list(motion.LIPS_OUTER_UPPER[1:-1])],
                               atol=1e-4)
    np.testing.assert_allclose(opened[[33, 263, 468, 473]], face[[33, 263, 468, 473]], atol=1e-4)
    assert (opened[152] - face[152]) @ frame.down > 0.3 * np.linalg.norm(face[291] - face[61])


def test_eye_edit_closes_and_widens(face):
    assert motion.eye_openness(face) > 0.2
    closed = motion.edit_landmarks(face, eyes=0.0)
    for upper, lower in motion.RIGHT_EYE_LID_PAIRS + motion.LEFT_EYE_LID_PAIRS:
        assert np.linalg.norm(closed[upper] - closed[lower]) < 1e-4
    half = motion.edit_landmarks(face, eyes=0.5)
    assert motion.eye_openness(half) == pytest.approx(0.5 * motion.eye_openness(face), rel=1e-4)
    wide = motion.edit_landmarks(face, eyes=1.4)
    assert motion.eye_openness(wide) == pytest.approx(1.4 * motion.eye_openness(face), rel=1e-4)
    # Eye corners and the mouth do not move.
    np.testing.assert_allclose(closed[[33, 133, 362, 263, 13, 14]], face[[33, 133, 362, 263, 13, 14]], atol=1e-4)


def test_no_controls_is_the_identity(face):
    np.testing.assert_allclose(motion.edit_landmarks(face), face, atol=1e-4)
    np.testing.assert_allclose(motion.edit_landmarks(face, eyes=1.0), face, atol=1e-4)
    assert motion.Controls().is_identity and motion.Controls(eyes=1.0).is_identity
    assert not motion.Controls(yaw=5.0).is_identity


def test_roll_is_an_exact_rotation(face):
    rolled = motion.edit_landmarks(face, roll=10.0)
    a, _ = motion.fit_similarity(face, rolled, tuple(range(478)))
    assert np.degrees(np.angle(a)) == pytest.approx(10.0, abs=1e-4) and abs(a) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(motion.edit_landmarks(rolled, roll=-10.0), face, atol=1e-3)


def test_yaw_and_pitch_move_the_nose_and_foreshorten(face):
    width = np.linalg.norm(face[263] - face[33])
    turned = motion.edit_landmarks(face, yaw=20.0)
    nose_shift = turned[motion.NOSE_TIP] - face[motion.NOSE_TIP]
    assert nose_shift[0] > 0.1 * width and abs(nose_shift[1]) < 0.05 * width
    oval = list(motion.FACE_OVAL)
    assert np.ptp(turned[oval, 0]) < np.ptp(face[oval, 0])  # the face narrows as it turns
    nodded = motion.edit_landmarks(face, pitch=15.0)
    nose_shift = nodded[motion.NOSE_TIP] - face[motion.NOSE_TIP]
    assert nose_shift[1] > 0.1 * width and abs(nose_shift[0]) < 0.05 * width
    # Opposite angles mirror the nose shift (up to the nose's small offset from the face's centre line).
    back = motion.edit_landmarks(face, yaw=-20.0)[motion.NOSE_TIP] - face[motion.NOSE_TIP]
    assert back[0] == pytest.approx(-(turned[motion.NOSE_TIP] - face[motion.NOSE_TIP])[0], rel=0.01)


def test_batched_edit_matches_single(face):
    batch = np.stack([face, similarity(face, 15.0)])
    out = motion.Controls(eyes=0.3, mouth=0.4, yaw=10.0, roll=-5.0).apply(batch)
    assert out.shape == (2, 478, 2)
    np.testing.assert_allclose(out[1], motion.edit_landmarks(batch[1], 0.3, 0.4, 10.0, 0.0, -5.0), atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(eyes=-0.1), dict(mouth=-1.0), dict(yaw=60.0), dict(pitch=-46.0)])
def test_out_of_range_controls_fail(face, kwargs):
    with pytest.raises(ValueError):
        motion.edit_landmarks(face, **kwargs)


def test_bad_shapes_fail(face):
    with pytest.raises(ValueError, match="478"):
        motion.relative_motion(face[:468], face, face)
    with pytest.raises(ValueError, match="non-finite"):
        motion.edit_landmarks(np.full((478, 2), np.nan))


def test_neutral_scores_measured_in_chunks_are_the_same(monkeypatch):
    rng = np.random.default_rng(0)
    face = rng.uniform(100, 300, (478, 2))
    driving = face[None] + rng.normal(0, 2, (10, 478, 2))
    whole = motion.neutral_scores(driving)
    monkeypatch.setattr(motion, "SCORE_CHUNK", 3)  # chunks of 3, 3, 3 and 1 frames
    np.testing.assert_array_equal(motion.neutral_scores(driving), whole)
