"""Face detection, crop boxes, cropping, point mapping and pasting back (metaportrait.data.face)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from metaportrait.data.face import (
    BoxSmoother,
    CropBox,
    clip_box,
    crop,
    crop_matrix,
    detect_face,
    paste_back,
    points_from_crop,
    points_to_crop,
    uncrop_map,
    uncrop_matrix,
)
from metaportrait.data.landmarks import landmarks_of_image

ASTRONAUT_FACE = (178, 72, 272, 175)  # x0, y0, x1, y1 in skimage.data.astronaut(), by hand


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


def _rectangle_landmarks(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """478 points whose 468 mesh points span exactly the given rectangle (irises far outside, to be ignored)."""
    rng = np.random.default_rng(1)
    points = np.column_stack([rng.uniform(x0, x1, 478), rng.uniform(y0, y1, 478)]).astype(np.float32)
    points[:4] = [(x0, y0), (x1, y0), (x0, y1), (x1, y1)]
    points[468:] = (-1000.0, 5000.0)
    return points


def test_crop_box_from_landmarks():
    points = _rectangle_landmarks(100, 200, 200, 250)  # 100 wide, 50 high, centre (150, 225)
    box = CropBox.from_landmarks(points)  # defaults: expand 1.6, shift -0.08
    assert box.side == pytest.approx(160.0)
    assert (box.cx, box.cy) == pytest.approx((150.0, 225.0 - 0.08 * 160.0))
    custom = CropBox.from_landmarks(points, expand=2.0, shift=0.0)
    assert (custom.cx, custom.cy, custom.side) == pytest.approx((150.0, 225.0, 200.0))
    assert CropBox.from_list(box.to_list()) == pytest.approx(box)
    assert box.to_list() == pytest.approx([150 - 80, 225 - 12.8 - 80, 160])
    with pytest.raises(ValueError):
        CropBox(0.0, 0.0, -1.0)
    with pytest.raises(ValueError, match="478"):
        CropBox.from_landmarks(points[:68])


def test_clip_box_is_median_of_present_frames():
    frames = np.stack([_rectangle_landmarks(100 + d, 100, 200 + d, 200) for d in (0, 2, 4, 500)])
    present = np.array([True, True, True, False])  # the outlier frame has no face
    box = clip_box(frames, present, expand=1.0, shift=0.0)
    assert (box.cx, box.cy, box.side) == pytest.approx((152.0, 150.0, 100.0))
    with pytest.raises(ValueError, match="at least one"):
        clip_box(frames, np.zeros(4, dtype=bool))


def test_matrices_and_point_round_trip():
    box = CropBox(cx=300.5, cy=-20.25, side=377.0)  # partly above the image
    forward, backward = crop_matrix(box, 256), uncrop_matrix(box, 256)
    composed = np.vstack([forward, [0, 0, 1]]) @ np.vstack([backward, [0, 0, 1]])
    np.testing.assert_allclose(composed, np.eye(3), atol=1e-12)
    points = np.random.default_rng(0).uniform(-50, 600, size=(3, 478, 2)).astype(np.float32)
    in_crop = points_to_crop(points, box, 256)
    assert in_crop.shape == points.shape and in_crop.dtype == np.float32
    np.testing.assert_allclose(points_from_crop(in_crop, box, 256), points, atol=1e-3)
    # Box corners map to crop corners.
    corners = np.array([[box.x0, box.y0], [box.x0 + box.side, box.y0 + box.side]])
    np.testing.assert_allclose(points_to_crop(corners, box, 256), [[0, 0], [256, 256]], atol=1e-4)


@pytest.mark.parametrize("side", [40.0, 90.0, 180.0, 700.0])  # strong and mild upscaling, downscaling
def test_crop_puts_image_content_where_points_go(side):
    # A bright 4x4 square centred on the continuous point (231, 157) of a dark image.
    image = np.full((400, 500, 3), 20, dtype=np.uint8)
    image[155:159, 229:233] = 240
    target = np.array([231.0, 157.0])
    box = CropBox(240.3, 150.7, side)
    size = 128
    out = crop(image, box, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    weights = out[..., 0].astype(np.float64) - 20
    ys, xs = np.mgrid[:size, :size] + 0.5  # pixel centres, continuous convention
    centroid = np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()
    np.testing.assert_allclose(centroid, points_to_crop(target, box, size), atol=0.15)


def test_crop_beyond_the_image_replicates_the_border():
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    image[:, :50] = 200  # left half bright
    out = crop(image, CropBox(-40.0, 50.0, 100.0), 64)  # mostly left of the image
    assert (out[:, :20] == 200).all()  # replicated left border, not black


def test_paste_back_restores_the_frame(astronaut):
    points = landmarks_of_image(astronaut, "astronaut")
    box = CropBox.from_landmarks(points)
    face = crop(astronaut, box, 256)
    in_crop = points_to_crop(points, box, 256)
    assert (in_crop > 0).all() and (in_crop < 256).all()
    restored = paste_back(astronaut, face, box, feather=0.1)
    assert restored.shape == astronaut.shape and restored.dtype == np.uint8
    x0, y0, x1, y1 = ASTRONAUT_FACE
    error = np.abs(restored.astype(int) - astronaut.astype(int))
    assert error[y0:y1, x0:x1].mean() < 3.0  # two resamplings of the face only
    # Outside the box nothing changes.
    outside = np.ones(astronaut.shape[:2], dtype=bool)
    top, left = max(0, int(box.y0)), max(0, int(box.x0))
    outside[top : int(box.y0 + box.side) + 1, left : int(box.x0 + box.side) + 1] = False
    assert (error[outside] == 0).all()


def test_paste_back_feathers_the_edge():
    frame = np.zeros((300, 300, 3), dtype=np.uint8)
    white = np.full((100, 100, 3), 255, dtype=np.uint8)
    box = CropBox(150.0, 150.0, 200.0)  # crop pixels are 2 frame pixels wide
    soft = paste_back(frame, white, box, feather=0.2)[150, :, 0].astype(int)
    assert soft[150] == 255 and soft[49] == 0 and soft[251] == 0
    assert 0 < soft[60] < 255  # the 40-px ramp from x=50 to x=90
    assert (np.diff(soft[50:150]) >= 0).all() and (np.diff(soft[150:250]) <= 0).all()
    hard = paste_back(frame, white, box, feather=0.0)[150, :, 0]
    assert (hard[50:250] == 255).all() and (hard[:50] == 0).all()
    # A box hanging off the frame only writes inside it.
    corner = paste_back(frame, white, CropBox(0.0, 0.0, 100.0), feather=0.0)
    assert (corner[:50, :50] == 255).all() and (corner[50:, :] == 0).all()
    with pytest.raises(ValueError, match="feather"):
        paste_back(frame, white, box, feather=0.7)


def test_uncrop_map_puts_crop_values_where_the_crop_came_from():
    box = CropBox(100.0, 80.0, 100.0)  # x 50-150, y 30-130; crop pixels are 2 frame pixels wide
    ones = uncrop_map(np.ones((50, 50), np.float32), box, 200, 300)
    assert ones.shape == (200, 300) and ones.dtype == np.float32
    assert (ones[35:125, 55:145] == 1).all() and (ones[:29] == 0).all() and (ones[:, 151:] == 0).all()
    spot = np.zeros((50, 50), np.float32)
    spot[10, 20] = 1.0  # crop pixel centre (20.5, 10.5)
    x, y = points_from_crop(np.array([[20.5, 10.5]]), box, 50)[0]
    moved = uncrop_map(spot, box, 200, 300)
    # (x, y) = (91, 51) is a frame pixel corner: the four pixels around it share the spot, nothing else.
    assert (x, y) == (91.0, 51.0) and (moved[50:52, 90:92] == moved.max()).all() and moved.max() > 0.5
    assert moved.sum() == pytest.approx(4.0, rel=0.01)  # 2 x 2 frame pixels per crop pixel
    with pytest.raises(ValueError, match="square"):
        uncrop_map(np.ones((5, 6), np.float32), box, 200, 300)


def test_box_smoother_steadies_a_jittery_box():
    rng = np.random.default_rng(0)
    smoother = BoxSmoother(fps=30)
    raw = [CropBox(200 + rng.normal(0, 2), 180 + rng.normal(0, 2), 300 + rng.normal(0, 2)) for _ in range(90)]
    smooth = [smoother(box) for box in raw]
    raw_cx = np.array([b.cx for b in raw[30:]])
    smooth_cx = np.array([b.cx for b in smooth[30:]])
    assert np.abs(np.diff(smooth_cx)).mean() < np.abs(np.diff(raw_cx)).mean() / 5
    assert abs(smooth_cx.mean() - 200) < 1.0


def test_detect_face(astronaut):
    detection = detect_face(astronaut)
    assert detection is not None and detection.score > 0.8
    x0, y0, x1, y1 = ASTRONAUT_FACE
    assert abs(detection.x0 - x0) < 15 and abs(detection.x1 - x1) < 15
    assert y0 - 5 < detection.y0 < (y0 + y1) / 2 < detection.y1 < y1 + 15
    assert detect_face(np.full((128, 128, 3), 128, dtype=np.uint8)) is None
