"""The prior's entry point: `build_prior` gives exactly the arrays the pipeline, the training pairs and the mesh-warp
baseline computed before the prior had its own package, for the lite model and its prior options."""

from __future__ import annotations

import dataclasses
import hashlib

import cv2
import numpy as np
import pytest

from metaportrait.config import PRESETS
from metaportrait.eval.protocols import mesh_warp
from metaportrait.prior import Prior, PriorOptions, build_prior
from metaportrait.prior.eyelids import EYES
from metaportrait.prior.topology import mesh_topology

SIZE = 128
_LITE = PRESETS["lite"]
_EVERYTHING = _LITE.replace(prior_eyelids=True, prior_eyelid_fill=True, prior_face_masked=True,
                            refine=dataclasses.replace(_LITE.refine, mouth_template=True, eyelid_band=True))
CONFIGS = {
    "lite": _LITE,
    "lite_stretch": _LITE.replace(prior_mouth="stretch"),
    "everything": _EVERYTHING,
    "everything_stretch": _EVERYTHING.replace(prior_mouth="stretch"),
    "grid_only": _LITE.replace(prior_masks=False),
}
# sha256 (first 16 hex digits) of the grid and masks bytes, computed with the code before the move (commit c082ded:
# `data.mesh_warp.mesh_warp_grid` and `prior_masks` called as `Animator._generator_result` called them).
EXPECTED = {
    ("lite", "open"): ("1b364c52ae13a533", "62b5b785cd0ab48c"),
    ("lite_stretch", "open"): ("e6e018a0ac4b4c1f", "a65ea8d153eb3ccf"),
    ("everything", "open"): ("1b364c52ae13a533", "17af52f2e4545b09"),
    ("everything_stretch", "open"): ("e6e018a0ac4b4c1f", "df7f7a64acdfea74"),
    ("grid_only", "open"): ("1b364c52ae13a533", None),
    ("lite", "blink"): ("34bdaae9b710c1f9", "1509e6d9fab2c28f"),
    ("lite_stretch", "blink"): ("34bdaae9b710c1f9", "1509e6d9fab2c28f"),
    ("everything", "blink"): ("39aab073a5483850", "4edab85ec978eafe"),
    ("everything_stretch", "blink"): ("39aab073a5483850", "4edab85ec978eafe"),
    ("grid_only", "blink"): ("34bdaae9b710c1f9", None),
    ("lite", "turned"): ("4f47a82566c985b1", "e1c8009dc99f662a"),
    ("lite_stretch", "turned"): ("ef5f60b20534df46", "63a15135165dffb9"),
    ("everything", "turned"): ("9f24843f076e7be3", "99b27c915968bd2f"),
    ("everything_stretch", "turned"): ("b9a2a4fbd184a2b7", "3cbd0d612836b54c"),
    ("grid_only", "turned"): ("4f47a82566c985b1", None),
}
# The same for the baseline's uint8 frames (`data.mesh_warp.mesh_warp_image`), face-masked and whole-frame.
EXPECTED_BASELINE = {
    (True, "open"): "90b9af9739d6b830",
    (False, "open"): "90b9af9739d6b830",
    (True, "blink"): "b9412df675d71aba",
    (False, "blink"): "b9412df675d71aba",
    (True, "turned"): "074f4f8910df0618",
    (False, "turned"): "ddc2a7292221deb4",
}


@pytest.fixture(scope="module")
def faces():
    """The astronaut's 128-px crop and landmarks, and three driving faces: mouth open, a blink, and both with the
    head turned and moved."""
    from skimage.data import astronaut

    from metaportrait.data.face import CropBox, points_to_crop
    from metaportrait.data.landmarks import landmarks_of_image

    points = landmarks_of_image(astronaut())
    source = points_to_crop(points, CropBox.from_landmarks(points), SIZE).astype(np.float32)
    opened = source.copy()
    opened[mesh_topology().mouth_lower[1:-1], 1] += 6.0
    blink = source.copy()
    lids = [p for _, upper, _, _ in EYES.values() for p in upper]
    for _, upper, _, lower in EYES.values():
        blink[list(upper)] += 0.9 * (source[list(lower)] - source[list(upper)])
    both = opened.copy()
    both[lids] = blink[lids]
    angle = np.deg2rad(6.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = source.mean(0)
    turned = ((both - centre) @ rotation.T + centre + [3.0, -2.0]).astype(np.float32)
    image = cv2.resize(astronaut(), (SIZE, SIZE), interpolation=cv2.INTER_AREA)  # any uint8 picture will do
    return image, source, {"open": opened, "blink": blink, "turned": turned}


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize(("config", "driving"), list(EXPECTED))
def test_build_prior_gives_the_arrays_of_the_code_before_the_move(faces, config, driving):
    _, source, drivings = faces
    cfg = CONFIGS[config]
    prior = build_prior(source, drivings[driving], SIZE, cfg)
    grid_digest, masks_digest = EXPECTED[config, driving]
    assert prior.grid.shape == (SIZE, SIZE, 2) and prior.grid.dtype == np.float32
    assert _digest(prior.grid) == grid_digest
    if masks_digest is None:
        assert prior.masks is None
    else:
        assert prior.masks.shape == (cfg.prior_mask_channels(), SIZE, SIZE) and prior.masks.dtype == np.float32
        assert _digest(prior.masks) == masks_digest


@pytest.mark.parametrize(("face_masked", "driving"), list(EXPECTED_BASELINE))
def test_the_mesh_warp_baseline_gives_the_frames_of_the_code_before_the_move(faces, face_masked, driving):
    image, source, drivings = faces
    frames = mesh_warp(image, source, None, drivings[driving][None], face_masked=face_masked)
    assert frames.shape == (1, SIZE, SIZE, 3) and frames.dtype == np.uint8
    assert _digest(frames[0]) == EXPECTED_BASELINE[face_masked, driving]


def test_model_options_and_checks(faces):
    _, source, drivings = faces
    options = PriorOptions.for_model(CONFIGS["everything"])
    assert options == PriorOptions(mouth="upper_lip", eyelid_fill=True, face_masked=True, masks=True, template=True,
                                   eyelids=True, eyelid_channel=True)  # fmt: skip
    by_options = build_prior(source, drivings["turned"], SIZE, options)
    by_model = build_prior(source, drivings["turned"], SIZE, CONFIGS["everything"])
    np.testing.assert_array_equal(by_options.grid, by_model.grid)
    np.testing.assert_array_equal(by_options.masks, by_model.masks)
    assert isinstance(by_model, Prior) and by_model.warp(faces[0]).shape == (SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="no mesh prior"):
        build_prior(source, source, SIZE, PRESETS["official"])
    with pytest.raises(ValueError, match="mouth must be one of"):
        PriorOptions(mouth="sideways")
    with pytest.raises(ValueError, match="template needs masks"):
        PriorOptions(template=True)
    with pytest.raises(ValueError, match="eyelid_channel needs eyelids"):
        PriorOptions(masks=True, eyelid_channel=True)


def test_training_pairs_hold_the_prior_of_their_model(faces):
    from metaportrait.data.pairs import NO_AUGMENT, PairOptions, make_pair

    image, source, drivings = faces
    cfg = CONFIGS["everything"]
    options = PairOptions.for_model(cfg, 64)
    assert options.prior == PriorOptions.for_model(cfg) and options.prior_size == 64
    assert PairOptions.for_model(PRESETS["official"], 64).prior_size is None
    frames = np.stack([image, image])
    sample = make_pair(frames, np.stack([source, drivings["turned"]]), options, NO_AUGMENT, np.random.default_rng(0))
    prior = build_prior(sample["source_landmarks"].numpy(), sample["driving_landmarks"].numpy(), 64, cfg)
    np.testing.assert_array_equal(sample["prior_grid"].numpy(), prior.grid)
    np.testing.assert_array_equal(sample["prior_masks"].numpy(), prior.masks)
