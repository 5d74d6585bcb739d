"""Property-based tests (hypothesis) of the geometry and of the files we write (issue 24).

- crop then paste-back of an unchanged crop gives the image back (exactly for a pixel-aligned box, within
  two grey levels for any box on a smooth image);
- the identity motion (a driving clip that is its reference frame repeated) leaves the portrait's landmarks
  unchanged, for `relative_motion` and for the default `retarget_motion`;
- a rigid head move of the driver (rotation, scale, shift) gives the portrait that same move;
- landmark files, crop boxes and model/training configs round-trip through their files.

The landmarks are the astronaut's (measured once), placed by random similarity transforms.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from metaportrait.cli.landmarks import write_landmark_file
from metaportrait.config import PRESETS, ModelConfig
from metaportrait.data.face import CropBox, crop, paste_back
from metaportrait.motion import fit_similarity, relative_motion, retarget_motion
from metaportrait.train.config import TrainConfig, recipe

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """The astronaut's 478 landmarks, centred on the origin, about 100 px across (float64)."""
    from skimage import data

    from metaportrait.data.landmarks import landmarks_of_image

    points = landmarks_of_image(data.astronaut(), "astronaut").astype(np.float64)
    return points - points[:468].mean(axis=0)


def _similarity(points: np.ndarray, angle_degrees: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """``points`` rotated by ``angle`` about the origin, scaled and shifted (``(..., 2)``)."""
    angle = math.radians(angle_degrees)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return points @ rotation.T + np.asarray(shift)


angles = st.floats(-30, 30)
scales = st.floats(0.5, 2.0)
shifts = st.tuples(st.floats(100, 400), st.floats(100, 400))


# --- crop and paste back -------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    image=arrays(np.uint8, st.tuples(st.integers(8, 48), st.integers(8, 48), st.just(3))),
    x0=st.integers(-10, 40),
    y0=st.integers(-10, 40),
    side=st.integers(4, 40),
    feather=st.floats(0, 0.5),
)
def test_paste_back_of_a_pixel_aligned_crop_is_exact(image, x0, y0, side, feather):
    box = CropBox(x0 + side / 2, y0 + side / 2, side)
    np.testing.assert_array_equal(paste_back(image, crop(image, box, side), box, feather), image)


@PROPERTY_SETTINGS
@given(
    cx=st.floats(-20, 120),
    cy=st.floats(-20, 120),
    side=st.floats(8, 200),
    size=st.integers(16, 96),
    slope=st.tuples(st.floats(-0.4, 0.4), st.floats(-0.4, 0.4)),
)
def test_paste_back_of_any_crop_of_a_smooth_image_gives_it_back(cx, cy, side, size, slope):
    # A ramp: bilinear resampling reproduces linear functions, so only rounding and the border remain.
    y, x = np.mgrid[0:100, 0:100]
    ramp = 128 + slope[0] * (x - 50) + slope[1] * (y - 50)
    image = np.repeat(np.rint(ramp).astype(np.uint8)[..., None], 3, axis=2)
    box = CropBox(cx, cy, side)
    back = paste_back(image, crop(image, box, size), box)
    assert np.abs(back.astype(int) - image).max() <= 2


# --- motion --------------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(source_pose=st.tuples(angles, scales, shifts), reference_pose=st.tuples(angles, scales, shifts),
       frames=st.integers(1, 5), reference=st.integers(0, 4), scale=st.floats(0, 3))  # fmt: skip
def test_identity_motion_leaves_the_landmarks_unchanged(face, source_pose, reference_pose, frames, reference, scale):
    source = _similarity(face, *source_pose)
    driver = _similarity(face * (1.0, 1.1), *reference_pose)  # another face shape: a longer face
    driving = np.repeat(driver[None], frames, axis=0)
    np.testing.assert_allclose(relative_motion(source, driving, driver), np.repeat(source[None], frames, 0), atol=1e-3)
    moved = retarget_motion(source, driving, min(reference, frames - 1), expression_scale=scale)
    np.testing.assert_allclose(moved, np.repeat(source[None], frames, axis=0), atol=1e-3)


@PROPERTY_SETTINGS
@given(source_pose=st.tuples(angles, scales, shifts), reference_pose=st.tuples(angles, scales, shifts),
       move=st.tuples(angles, st.floats(0.7, 1.4), st.tuples(st.floats(-40, 40), st.floats(-40, 40))))  # fmt: skip
def test_relative_motion_of_a_rigid_head_move_is_that_move(face, source_pose, reference_pose, move):
    reference = _similarity(face * (1.0, 1.1), *reference_pose)  # the driver: a longer face than the portrait's
    centre = reference[:468].mean(axis=0)
    angle, scale, shift = move
    driving = _similarity(reference - centre, angle, scale, tuple(centre + shift))  # turned, scaled, shifted
    # A portrait of the driver's own shape, placed by a similarity A, moves exactly as A(driving).
    same_shape = _similarity(reference, *source_pose)
    np.testing.assert_allclose(relative_motion(same_shape, driving, reference), _similarity(driving, *source_pose),
                               atol=1e-2)  # fmt: skip
    # Any portrait: its landmarks move by a similarity with the driver's rotation and scale, and keep their shape.
    source = _similarity(face, *source_pose)
    for moved in (relative_motion(source, driving, reference), retarget_motion(source, np.stack([reference, driving]),
                                                                               0)[1]):  # fmt: skip
        a, b = fit_similarity(source, moved, tuple(range(478)))  # moved ≈ a * source + b, points as complex numbers
        fitted = a * (source[:, 0] + 1j * source[:, 1]) + b
        np.testing.assert_allclose(np.stack([fitted.real, fitted.imag], axis=-1), moved, atol=1e-2)
        assert abs(a) == pytest.approx(scale, rel=1e-4)
        assert math.degrees(np.angle(a)) == pytest.approx(angle, abs=1e-3)


# --- files and configs ---------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    landmarks=st.integers(1, 4).flatmap(
        lambda t: arrays(np.float32, (t, 478, 2), elements=st.floats(-1e4, 1e4, width=32))
    ),
    fps=st.floats(0, 240),
    size=st.tuples(st.integers(1, 8000), st.integers(1, 8000)),
    data=st.data(),
)
def test_landmark_files_round_trip(tmp_path, landmarks, fps, size, data):
    present = data.draw(arrays(bool, (len(landmarks),)))
    path = tmp_path / "points.npz"
    write_landmark_file(path, landmarks, present, fps, size)
    with np.load(path) as stored:
        np.testing.assert_array_equal(stored["landmarks"], landmarks)
        np.testing.assert_array_equal(stored["present"], present)
        assert float(stored["fps"]) == fps and tuple(stored["image_size"]) == size
    assert [p.name for p in tmp_path.iterdir()] == ["points.npz"]
    path.unlink()


@PROPERTY_SETTINGS
@given(cx=st.floats(-1e4, 1e4), cy=st.floats(-1e4, 1e4), side=st.floats(1e-3, 1e4))
def test_crop_boxes_round_trip(cx, cy, side):
    box = CropBox(cx, cy, side)
    again = CropBox.from_list(json.loads(json.dumps(box.to_list())))
    assert again.side == pytest.approx(side) and again.cx == pytest.approx(cx, abs=1e-6 * side + 1e-9)
    assert again.cy == pytest.approx(cy, abs=1e-6 * side + 1e-9)


@PROPERTY_SETTINGS
@given(preset=st.sampled_from(sorted(PRESETS)), changes=st.fixed_dictionaries(
    {}, optional={"use_identity": st.booleans(), "prior_eyelid_fill": st.booleans(), "spectral_norm": st.booleans()}))
def test_model_configs_round_trip_through_json(preset, changes):
    try:
        config = PRESETS[preset].replace(**changes)
    except ValueError:  # an invalid combination (e.g. an eyelid fill without the mesh prior): not a config
        assume(False)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@PROPERTY_SETTINGS
@given(preset=st.sampled_from(sorted(PRESETS)), stage=st.sampled_from(["warp", "full"]),
       steps=st.integers(1, 10**6), seed=st.integers(0, 2**31 - 1),
       ema=st.sampled_from([0.0, 0.99, 0.999]))  # fmt: skip
def test_train_configs_round_trip_through_json(preset, stage, steps, seed, ema):
    config = recipe(preset, stage, steps).replace(seed=seed, ema_decay=ema)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
