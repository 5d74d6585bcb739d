"""Eyelid band: where a closing driving eye needs synthesised lid skin, and its place in the prior masks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from metaportrait.config import PRESETS, ModelConfig
from metaportrait.prior.eyelids import BROWS, EYES, eyelid_band
from metaportrait.prior.masks import face_mask, prior_masks
from metaportrait.prior.topology import mesh_topology
from metaportrait.prior.warp import apply_grid, mesh_warp_grid

SIZE = 256  # the eyes open ~9 px here, room for the band's 2-px feather


@pytest.fixture(scope="module")
def face():
    """The astronaut's MediaPipe landmarks in a 256-px crop (open eyes)."""
    from skimage.data import astronaut

    from metaportrait.data.face import CropBox, points_to_crop
    from metaportrait.data.landmarks import landmarks_of_image

    points = landmarks_of_image(astronaut())
    return points_to_crop(points, CropBox.from_landmarks(points), SIZE)


def _close_eyes(landmarks: np.ndarray, amount: float) -> np.ndarray:
    """Move each upper-lid point ``amount`` (0..1) of the way down to its lower-lid point."""
    closed = landmarks.copy()
    for _, upper, _, lower in EYES.values():
        closed[list(upper)] += amount * (landmarks[list(lower)] - landmarks[list(upper)])
    return closed


def test_eye_contours_are_the_boundaries_of_the_mesh_eye_holes():
    topology = mesh_topology()
    hole_points = set(np.unique(topology.holes[topology.eye_holes]).tolist())
    contour_points = {p for a, upper, b, lower in EYES.values() for p in (a, b, *upper, *lower)}
    assert contour_points == hole_points


def test_band_covers_the_lowered_lid_only_when_the_eye_closes(face):
    assert eyelid_band(face, face, SIZE, SIZE).max() == 0  # the same eyes: the source's lids are warped
    assert eyelid_band(face, _close_eyes(face, 0.2), SIZE, SIZE).max() == 0  # a narrower eye keeps its iris
    assert eyelid_band(_close_eyes(face, 0.9), face, SIZE, SIZE).max() == 0  # opening needs no lid
    closed = _close_eyes(face, 1.0)
    band = eyelid_band(face, closed, SIZE, SIZE)
    assert band.shape == (SIZE, SIZE) and band.dtype == np.float32 and 0 <= band.min() and band.max() <= 1
    for _, upper, _, lower in EYES.values():
        # Above the closed lid, up to where the open upper lid was, the band is full; below the eye, empty.
        centre = upper[3]
        x = int(face[centre, 0])
        lid_now, lid_before = closed[centre, 1], face[centre, 1]
        assert lid_now - lid_before > 6
        rows = np.arange(SIZE) + 0.5
        inside = np.abs(rows - (lid_before + lid_now) / 2) < 0.25 * (lid_now - lid_before)
        assert band[inside, x].min() > 0.8  # (the 2-px feather reaches in from both edges)
        assert band[rows > lid_now + 6, x].max() < 0.01
    # The band lies inside the face and weighs about the eyes' hidden lid area.
    assert band[~(face_mask(closed, SIZE, SIZE, 0.0, 0.0) > 0.5)].max() < 1e-3
    half = eyelid_band(face, _close_eyes(face, 0.55), SIZE, SIZE)  # halfway between CLOSING and CLOSED
    assert 0.2 < half.max() < 0.8


def test_the_filled_lid_reads_the_skin_above_it_instead_of_the_lash_line(face):
    from skimage.data import astronaut

    from metaportrait.data.face import CropBox, crop, points_to_crop
    from metaportrait.data.landmarks import landmarks_of_image

    image = astronaut()
    points = landmarks_of_image(image)
    box = CropBox.from_landmarks(points)
    portrait, face = crop(image, box, SIZE), points_to_crop(points, box, SIZE)
    open_grid = mesh_warp_grid(face, face, SIZE, SIZE)
    np.testing.assert_array_equal(mesh_warp_grid(face, face, SIZE, SIZE, eyelids=True), open_grid)
    closed = _close_eyes(face, 1.0)
    plain = mesh_warp_grid(face, closed, SIZE, SIZE)
    filled = mesh_warp_grid(face, closed, SIZE, SIZE, eyelids=True)
    band = eyelid_band(face, closed, SIZE, SIZE)
    np.testing.assert_array_equal(filled[band == 0], plain[band == 0])  # only the band changes
    inside = band > 0.9
    moved_up = (plain[..., 1] - filled[..., 1])[inside] * SIZE / 2  # px; the face is upright: up is -y
    assert moved_up.min() > 0.0 and moved_up.mean() > 0.5
    # The lash line is dark, the lid skin above it bright: the filled lid is mostly skin.
    luma = np.array([0.299, 0.587, 0.114])
    brightness = {name: (apply_grid(portrait, grid) @ luma)[inside].mean()
                  for name, grid in (("plain", plain), ("filled", filled))}  # fmt: skip
    assert brightness["filled"] > brightness["plain"] + 10
    # Brows lowered onto the lids leave no skin to bring down: the fill reads less far up.
    frowning = closed.copy()
    for brow in BROWS.values():
        frowning[list(brow)] += [0.0, 5.0]  # px down
    frown_filled = mesh_warp_grid(face, frowning, SIZE, SIZE, eyelids=True)
    frown_plain = mesh_warp_grid(face, frowning, SIZE, SIZE)
    frown_moved = (frown_plain[..., 1] - frown_filled[..., 1])[inside] * SIZE / 2
    assert frown_moved.mean() < 0.7 * moved_up.mean()


def test_prior_masks_add_the_band_to_the_synthesis_channel_when_asked(face):
    closed = _close_eyes(face, 1.0)
    plain = prior_masks(face, closed, SIZE, SIZE, mouth="upper_lip", template=True)
    with_lids = prior_masks(face, closed, SIZE, SIZE, mouth="upper_lip", template=True, eyelids=True)
    assert with_lids.shape == plain.shape == (4, SIZE, SIZE)
    np.testing.assert_array_equal(with_lids[[0, 2, 3]], plain[[0, 2, 3]])  # face trust and mouth template unchanged
    np.testing.assert_array_equal(with_lids[1], np.maximum(plain[1], eyelid_band(face, closed, SIZE, SIZE)))
    assert with_lids[1].sum() > plain[1].sum() + 10


def test_prior_masks_append_the_band_alone_for_a_model_that_reads_it(face):
    closed = _close_eyes(face, 1.0)
    merged = prior_masks(face, closed, SIZE, SIZE, mouth="upper_lip", template=True, eyelids=True)
    both = prior_masks(face, closed, SIZE, SIZE, "upper_lip", True, eyelids=True, eyelid_channel=True)
    assert both.shape == (5, SIZE, SIZE)
    np.testing.assert_array_equal(both[:4], merged)  # the channels before it are unchanged
    np.testing.assert_array_equal(both[4], eyelid_band(face, closed, SIZE, SIZE))
    assert both[4].sum() > 10
    assert prior_masks(face, face, SIZE, SIZE, eyelids=True, eyelid_channel=True)[2].max() == 0
    with pytest.raises(ValueError, match="eyelid_channel needs eyelids"):
        prior_masks(face, closed, SIZE, SIZE, eyelid_channel=True)


def test_the_model_config_carries_the_option_and_older_configs_load_without_it():
    cfg = PRESETS["lite"].replace(prior_eyelids=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = PRESETS["lite"].to_dict()
    del old["prior_eyelids"]
    assert ModelConfig.from_dict(old).prior_eyelids is False
    with pytest.raises(ValueError, match="prior_eyelids needs prior_masks"):
        PRESETS["lite"].replace(prior_masks=False, prior_eyelids=True)
    lids = PRESETS["lite"].replace(prior_eyelids=True)
    reading = lids.replace(refine=dataclasses.replace(lids.refine, eyelid_band=True))
    assert reading.prior_mask_channels() == lids.prior_mask_channels() + 1
    assert ModelConfig.from_dict(reading.to_dict()) == reading
    with pytest.raises(ValueError, match="refine.eyelid_band needs prior_eyelids"):
        PRESETS["lite"].replace(refine=dataclasses.replace(lids.refine, eyelid_band=True))
    filling = PRESETS["lite"].replace(prior_eyelid_fill=True)
    assert ModelConfig.from_dict(filling.to_dict()) == filling
    with pytest.raises(ValueError, match="prior_eyelid_fill needs use_mesh_prior"):
        PRESETS["official"].replace(prior_eyelid_fill=True)
