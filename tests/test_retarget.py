"""Default motion transfer (metaportrait.motion.retarget_motion, neutral_frame): synthetic driving sequences built
from the astronaut's real landmarks with `edit_landmarks`, so the answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from metaportrait import motion
from metaportrait.eval.metrics import following


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """Real MediaPipe landmarks of scikit-image's astronaut (mouth closed, eyes open), (478, 2) pixels."""
    from skimage import data

    from metaportrait.data.landmarks import landmarks_of_image

    return landmarks_of_image(data.astronaut(), "astronaut").astype(np.float64)


@pytest.fixture(scope="module")
def smiling(face) -> np.ndarray:
    """Another 'person': the astronaut with a wider mouth, smaller eyes and the face 20 % larger, tilted 8°."""
    other = motion.edit_landmarks(face, eyes=0.7, mouth=0.05).astype(np.float64)
    corners = other[[61, 291]].mean(axis=0)
    other[[61, 291, 78, 308]] += (other[[61, 291, 78, 308]] - corners) * 0.15
    return motion.edit_landmarks(other, roll=8.0).astype(np.float64) * 1.2


def talking(face: np.ndarray, openness: np.ndarray, eyes: np.ndarray | None = None) -> np.ndarray:
    """(T, 478, 2): ``face`` with the mouth openness and eye factors of each frame."""
    eyes = np.ones_like(openness) if eyes is None else eyes
    return np.stack([motion.edit_landmarks(face, eyes=e, mouth=m) for m, e in zip(openness, eyes)]).astype(np.float64)


OPENNESS = np.array([0.6, 0.5, 0.3, 0.0, 0.1, 0.3, 0.0, 0.2, 0.45, 0.05])  # starts wide open, closes at frame 3


def test_neutral_frame_is_the_closed_mouth_open_eyes_upright_frame(face):
    assert motion.neutral_frame(talking(face, OPENNESS)) == 3  # first frame with the mouth closed
    eyes = np.array([0.0, 0.1, 1.0, 1.0, 0.2, 1.0])
    assert motion.neutral_frame(talking(face, np.zeros(6), eyes)) == 2  # starts with the eyes shut
    driving = np.stack([motion.edit_landmarks(face, roll=r) for r in (25.0, 12.0, 0.0, -15.0)])
    assert motion.neutral_frame(driving) == 2  # upright


def test_resolve_reference(face):
    driving = talking(face, OPENNESS)
    assert motion.resolve_reference("auto", driving) == 3
    assert motion.resolve_reference("first", driving) == 0
    assert motion.resolve_reference(7, driving) == 7
    assert motion.resolve_reference("4", driving) == 4
    with pytest.raises(ValueError, match="outside the driving clip's 10 frames"):
        motion.resolve_reference(10, driving)
    with pytest.raises(ValueError, match="auto, first or a frame number"):
        motion.resolve_reference("middle", driving)


def test_driver_starting_open_mouthed_is_followed_and_lips_never_cross(face, smiling):
    driving = talking(face, OPENNESS)
    targets = motion.retarget_motion(smiling, driving, motion.resolve_reference("auto", driving))
    source_open = motion.mouth_openness(smiling)
    # The portrait's own openness plus the driver's change from its closed frame: the driver's openness, exactly
    # up to the source's tiny lip gap and the gap-vs-projection difference of a tilted face.
    np.testing.assert_allclose(motion.mouth_openness(targets), OPENNESS + source_open, atol=0.01)
    # The first-frame reference of plain relative motion inverts this driver: its lips cross.
    plain = motion.retarget_motion(smiling, driving, 0, regions=False)
    down = motion.FaceFrame.of(smiling).down
    upper, lower = list(motion.LIPS_INNER_UPPER[1:-1]), list(motion.LIPS_INNER_LOWER[1:-1])
    assert ((plain[:, lower] - plain[:, upper]) @ down).min() < -2.0
    retargeted_first = motion.retarget_motion(smiling, driving, 0)  # even from a bad reference: never crossed
    own_overlap = min(((smiling[lower] - smiling[upper]) @ down).min(), 0.0)
    assert ((retargeted_first[:, lower] - retargeted_first[:, upper]) @ down).min() >= own_overlap - 1e-3  # float32 output


def test_driver_starting_with_closed_eyes_blinks_the_portrait(face, smiling):
    eyes = np.array([0.0, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0])
    driving = talking(face, np.zeros(7), eyes)
    targets = motion.retarget_motion(smiling, driving, motion.resolve_reference("auto", driving))
    ratio = motion.eye_openness(targets) / motion.eye_openness(smiling)
    np.testing.assert_allclose(ratio[[2, 3, 6]], 1.0, atol=0.02)  # open frames: the portrait's own eyes
    assert np.all(ratio[[0, 1, 5]] < 0.02)  # the driver's full blink closes the portrait's eyes
    assert 0.3 < ratio[4] < 0.6  # half closed


def test_rigid_head_move_moves_the_source_rigidly(face, smiling):
    driving = np.stack([face, motion.edit_landmarks(face, roll=10.0), face + np.array([15.0, -5.0])])
    targets = motion.retarget_motion(smiling, driving, 0)
    np.testing.assert_allclose(targets[0], smiling, atol=1e-3)
    a, _ = motion.fit_similarity(smiling, targets[1])
    assert np.degrees(np.angle(a)) == pytest.approx(10.0, abs=0.05)
    assert abs(a) == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(motion.mouth_openness(targets), motion.mouth_openness(smiling), atol=1e-3)


def test_expression_scale(face, smiling):
    driving = talking(face, OPENNESS)
    still = motion.retarget_motion(smiling, driving, 3, expression_scale=0.0)
    np.testing.assert_allclose(motion.mouth_openness(still), motion.mouth_openness(smiling), atol=1e-3)
    half = motion.retarget_motion(smiling, driving, 3, expression_scale=0.5)
    np.testing.assert_allclose(motion.mouth_openness(half), 0.5 * OPENNESS + motion.mouth_openness(smiling),
                               atol=0.01)
    with pytest.raises(ValueError, match="expression_scale"):
        motion.retarget_motion(smiling, driving, 3, expression_scale=-1.0)


def test_following_metrics(face):
    driving = talking(face, OPENNESS, np.linspace(1.0, 0.2, len(OPENNESS)))
    perfect = following(driving, driving)
    assert perfect == pytest.approx({"mouth_corr": 1.0, "mouth_range": 1.0, "eye_corr": 1.0})
    inverted = following(talking(face, OPENNESS.max() - OPENNESS), driving)
    assert inverted["mouth_corr"] == pytest.approx(-1.0, abs=1e-3)
    frozen = following(np.repeat(face[None], len(OPENNESS), 0), driving)
    assert np.isnan(frozen["mouth_corr"]) and frozen["mouth_range"] == 0.0
    assert np.isnan(following(driving, np.repeat(face[None], len(OPENNESS), 0))["mouth_corr"])  # still driver
