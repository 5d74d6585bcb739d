"""Mesh warp: identity, translation, grid conventions, face masking, speed."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaportrait.prior import mouth as prior_mouth
from metaportrait.prior.masks import face_mask, prior_masks
from metaportrait.prior.topology import mesh_topology
from metaportrait.prior.warp import apply_grid, identity_grid, mesh_warp_grid, mesh_warp_image

SIZE = 128


@pytest.fixture(scope="module")
def face():
    """A real face (scikit-image's astronaut) cropped to 128 px, with its MediaPipe landmarks in crop pixels."""
    from skimage.data import astronaut

    from metaportrait.data.face import CropBox, crop, points_to_crop
    from metaportrait.data.landmarks import landmarks_of_image

    image = astronaut()
    points = landmarks_of_image(image)
    box = CropBox.from_landmarks(points)
    return crop(image, box, SIZE), points_to_crop(points, box, SIZE)


def _hull_mask(landmarks: np.ndarray, grow: float) -> np.ndarray:
    """Hard face-oval hull grown by ``grow`` px (negative shrinks), as bool (H, W)."""
    soft = face_mask(landmarks, SIZE, SIZE, dilate_px=max(grow, 0.0), feather_sigma=0.0) > 0.5
    if grow >= 0:
        return soft
    import cv2

    return cv2.erode(soft.astype(np.uint8), np.ones((2 * int(-grow) + 1,) * 2, np.uint8)).astype(bool)


def test_topology_is_a_consistent_mesh():
    topology = mesh_topology()
    assert topology.face.shape == (852, 3)
    assert topology.holes.shape == (46, 3)  # mouth 18 + 2 eyes x 14
    assert topology.irises.shape == (8, 3)
    assert topology.oval.shape == (36,)
    # Consistent winding: every interior directed edge appears once, never twice in the same direction.
    directed = [(t[i], t[(i + 1) % 3]) for t in topology.face.tolist() for i in range(3)]
    assert len(directed) == len(set(directed))


def test_identical_landmarks_give_the_identity(face):
    image, landmarks = face
    for masked in (False, True):
        grid = mesh_warp_grid(landmarks, landmarks, SIZE, SIZE, face_masked=masked)
        assert grid.shape == (SIZE, SIZE, 2) and grid.dtype == np.float32
        np.testing.assert_allclose(grid, identity_grid(SIZE, SIZE), atol=1e-5)
        # Sampling at exact pixel centres returns the source unchanged.
        assert np.abs(apply_grid(image, grid).astype(int) - image).max() <= 1


def test_identity_grid_matches_grid_sample_convention():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grid = identity_grid(5, 7)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    sampled = F.grid_sample(tensor, torch.from_numpy(grid)[None], align_corners=False)
    np.testing.assert_allclose(sampled[0].permute(1, 2, 0).numpy(), image, atol=1e-3)


def test_translation_moves_the_face(face):
    image, landmarks = face
    shift = np.array([6.0, -4.0], dtype=np.float32)
    driving = landmarks + shift
    grid = mesh_warp_grid(landmarks, driving, SIZE, SIZE)
    # Inside the driving face (shrunk by 2 px, away from triangle seams with the outer band) every pixel
    # samples the source at its own position minus the shift.
    inside = _hull_mask(driving, -2)
    assert inside.sum() > 1000
    expected = identity_grid(SIZE, SIZE) - 2 * shift / SIZE
    np.testing.assert_allclose(grid[inside], expected[inside], atol=1e-4)
    warped = mesh_warp_image(image, landmarks, driving, face_masked=False)
    moved = np.roll(image, shift=(-4, 6), axis=(0, 1))  # integer shift: output(y, x) = source(y + 4, x - 6)
    assert np.abs(warped[inside].astype(int) - moved[inside]).max() <= 1
    # The fixed border points keep the image corners (nearly) in place.
    corners = grid[[0, 0, -1, -1], [0, -1, 0, -1]]
    np.testing.assert_allclose(corners, identity_grid(SIZE, SIZE)[[0, 0, -1, -1], [0, -1, 0, -1]], atol=0.03)


def test_grid_stays_in_range_for_moderate_motion(face):
    _, landmarks = face
    rng = np.random.default_rng(0)
    centre = landmarks.mean(0)
    angle = np.deg2rad(8.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=np.float32)
    driving = (landmarks - centre) @ rotation.T * 1.05 + centre + rng.normal(0, 0.5, landmarks.shape)
    grid = mesh_warp_grid(landmarks, driving.astype(np.float32), SIZE, SIZE)
    assert np.isfinite(grid).all()
    assert grid.min() > -1.1 and grid.max() < 1.1
    # The face moved, so the grid is not the identity inside the face.
    inside = _hull_mask(driving, -2)
    assert np.abs(grid - identity_grid(SIZE, SIZE))[inside].max() > 0.05


def test_face_masked_is_identity_away_from_the_face(face):
    _, landmarks = face
    driving = landmarks + np.array([5.0, 3.0], dtype=np.float32)
    full = mesh_warp_grid(landmarks, driving, SIZE, SIZE, face_masked=False)
    masked = mesh_warp_grid(landmarks, driving, SIZE, SIZE, face_masked=True)
    identity = identity_grid(SIZE, SIZE)
    # Dilation 8 px + cv2's Gaussian kernel radius (4 sigma = 12 px) at 128 px: beyond 20 px the mask is 0.
    far = ~(_hull_mask(driving, 21) | _hull_mask(landmarks, 21))  # beyond the driving and the source face
    assert far.sum() > 1000
    np.testing.assert_allclose(masked[far], identity[far], atol=1e-5)
    assert np.abs(full[far] - identity[far]).max() > 1e-3  # the unmasked warp does move the background
    inside = _hull_mask(driving, -2)
    np.testing.assert_allclose(masked[inside], full[inside], atol=1e-3)


def test_face_mask_range_and_shape(face):
    _, landmarks = face
    mask = face_mask(landmarks, SIZE, SIZE, dilate_px=6, feather_sigma=2)
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.float32
    assert mask.min() >= 0 and mask.max() <= 1
    hull = _hull_mask(landmarks, 0)
    assert mask[hull].min() > 0.99
    assert mask[~_hull_mask(landmarks, 14)].max() < 1e-3


def test_prior_masks_cover_the_face_and_the_mouth_opening_the_source_lacks(face):
    _, landmarks = face
    masks = prior_masks(landmarks, landmarks, SIZE, SIZE)
    assert masks.shape == (2, SIZE, SIZE) and masks.dtype == np.float32
    assert masks.min() >= 0 and masks.max() <= 1
    assert masks[0][_hull_mask(landmarks, -3)].min() > 0.9 and masks[0][~_hull_mask(landmarks, 8)].max() < 1e-3
    assert masks[1].max() == 0  # the same mouth: everything in it can be warped from the source
    # Open the mouth: the lower half of the inner-lip contour moves down 6 px.
    topology = mesh_topology()
    lips = np.unique(topology.holes[~topology.eye_holes])
    lower = lips[landmarks[lips, 1] > landmarks[lips, 1].mean()]
    opened = landmarks.copy()
    opened[lower, 1] += 6.0
    opening = prior_masks(landmarks, opened, SIZE, SIZE)[1]
    lip_width = np.ptp(landmarks[lips, 0])
    assert opening.sum() > 0.3 * 6.0 * lip_width and opening.max() < 1  # the source's own opening is subtracted
    assert opening[~_hull_mask(landmarks, 0)].max() < 1e-3  # the mouth lies inside the face
    assert prior_masks(opened, landmarks, SIZE, SIZE)[1].max() == 0  # closing needs no synthesis


def test_mouth_template_puts_teeth_under_the_lips_and_the_cavity_between(face):
    from metaportrait.prior.mouth import mouth_template

    _, landmarks = face
    topology = mesh_topology()
    closed = landmarks.copy()
    closed[topology.mouth_lower] = closed[topology.mouth_upper]
    assert mouth_template(closed, SIZE, SIZE).max() < 1e-6  # nothing to show in a closed mouth
    opened = landmarks.copy()
    opened[topology.mouth_lower[1:-1], 1] += 12.0
    template = mouth_template(opened, SIZE, SIZE)
    assert template.shape == (2, SIZE, SIZE) and template.dtype == np.float32
    assert template.min() >= 0 and template.max() <= 1
    column = int(round(opened[13, 0]))  # the lip centre: upper teeth, then cavity, then lower teeth, downwards
    top, bottom = opened[13, 1], opened[14, 1]
    rows = np.arange(SIZE) + 0.5
    teeth, cavity = template[0, :, column], template[1, :, column]
    upper = (rows > top + 1) & (rows < top + 3)
    middle = np.abs(rows - (top + 0.6 * (bottom - top))) < 1
    assert teeth[upper].min() > 0.8 and cavity[middle].min() > 0.8 and teeth[middle].max() < 0.2
    assert template[:, ~_hull_mask(opened, 0)].max() < 1e-3
    masks = prior_masks(landmarks, opened, SIZE, SIZE, mouth="upper_lip", template=True)
    assert masks.shape == (4, SIZE, SIZE)
    np.testing.assert_array_equal(masks[2:], template)


def test_upper_lip_fill_keeps_the_source_interior_unstretched(face):
    _, landmarks = face
    for masked in (False, True):
        grid = mesh_warp_grid(landmarks, landmarks, SIZE, SIZE, face_masked=masked, mouth="upper_lip")
        np.testing.assert_allclose(grid, identity_grid(SIZE, SIZE), atol=1e-5)
    assert prior_masks(landmarks, landmarks, SIZE, SIZE, mouth="upper_lip")[1].max() == 0
    # Open the mouth: the lower inner lip moves down 6 px; the astronaut smiles, so her opening shows teeth.
    topology = mesh_topology()
    opened = landmarks.copy()
    opened[topology.mouth_lower[1:-1], 1] += 6.0
    gap = landmarks[14, 1] - landmarks[13, 1]  # her opening at the lip centre, px
    assert gap > 2
    column, row = int(landmarks[13, 0]), int(landmarks[13, 1] + gap - 1)  # inside her own opening
    read_y = {mouth: (mesh_warp_grid(landmarks, opened, SIZE, SIZE, mouth=mouth)[row, column, 1] + 1) * SIZE / 2
              for mouth in ("stretch", "upper_lip")}  # fmt: skip
    assert abs(read_y["upper_lip"] - (row + 0.5)) < 0.3  # the teeth stay where they were under the upper lip
    assert read_y["stretch"] < row + 0.5 - 1.0  # the stretching mesh pulls them down
    # Synthesis is asked for exactly in the 6-px band the source lacks, fully (not weighted by a ratio).
    below = prior_masks(landmarks, opened, SIZE, SIZE, mouth="upper_lip")[1]
    lip_width = np.ptp(landmarks[topology.mouth_upper, 0])
    assert 0.5 * 6.0 * lip_width < below.sum() < 1.2 * 6.0 * lip_width and below.max() > 0.9
    assert below[: row - 1, column].max() < 0.05  # at the lip centre, nothing above the source's own opening depth
    with pytest.raises(ValueError, match="mouth"):
        mesh_warp_grid(landmarks, opened, SIZE, SIZE, mouth="sideways")
    # The model config names the same fills (it does not import this module, which needs OpenCV and SciPy).
    from typing import get_args

    from metaportrait.config import MouthFill

    assert get_args(MouthFill) == prior_mouth.MOUTH_FILLS == get_args(prior_mouth.MouthFill)


def test_rejects_bad_landmarks(face):
    _, landmarks = face
    with pytest.raises(ValueError, match="478"):
        mesh_warp_grid(landmarks[:468], landmarks, SIZE, SIZE)
    bad = landmarks.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        mesh_warp_grid(landmarks, bad, SIZE, SIZE)


def test_apply_grid_matches_grid_sample():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    grid = rng.uniform(-1.2, 1.2, (16, 18, 2)).astype(np.float32)  # another size, some points outside
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    expected = F.grid_sample(tensor, torch.from_numpy(grid)[None], padding_mode="border", align_corners=False)
    expected = expected[0].permute(1, 2, 0).numpy()
    # cv2.remap interpolates with 5-bit fixed-point weights: within ~1 grey level of the float result
    assert np.abs(apply_grid(image, grid).astype(float) - expected).max() <= 2.0
