"""Landmark line images: topologies, colour tables, the exact official drawing, the 68-point subset."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np
import pytest
from skimage import data

from metaportrait.data.drawing import (
    GROUP_HUES,
    SPARSE68_INDEX,
    SPARSE68_PARTS,
    TOPOLOGIES,
    draw_landmark_image,
    draw_landmarks_on,
    mediapipe478_table,
)
from metaportrait.data.landmarks import landmarks_of_image
from metaportrait.io.image import read_image


@pytest.fixture(scope="module")
def astronaut_landmarks() -> np.ndarray:
    return landmarks_of_image(data.astronaut(), "astronaut")


def _official_table(official_reference) -> np.ndarray:
    """(616, 5) rows p0, p1, r, g, b of the shared reference listing."""
    rows = [
        line.split("\t")
        for line in (official_reference / "ldmk_line_edges_and_colors.tsv").read_text().splitlines()
        if line and not line.startswith("#") and not line.startswith("edge")
    ]
    return np.array([[int(v) for v in row[1:]] for row in rows])


def test_official669_table_matches_reference(official_reference):
    table = _official_table(official_reference)
    topology = TOPOLOGIES["official669"]
    assert table.shape == (616, 5)
    np.testing.assert_array_equal(topology.edges, table[:, :2])
    np.testing.assert_array_equal(topology.colors, table[:, 2:])
    assert topology.num_points == 669 and not topology.subpixel


def test_official669_drawing_hand_checked():
    # Every point in the bottom-right corner except edge 0's ends (points 54 and 55, colour (203, 116, 0)):
    # a horizontal line across the middle, which no other edge crosses at x = 128.
    points = np.full((669, 2), 0.99)
    points[54], points[55] = (0.1, 0.5015), (0.9, 0.5015)  # y * 256 = 128.38 -> row 128 (truncated)
    image = draw_landmark_image(points, 256, 256, "official669", normalized=True)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    reference = np.zeros_like(image)
    cv2.line(reference, (25, 128), (230, 128), (203, 116, 0), 1, cv2.LINE_AA)  # int(0.1*256)=25, int(0.9*256)=230
    np.testing.assert_array_equal(image[100:160, 100:200], reference[100:160, 100:200])
    column = image[:, 128].astype(int)
    assert column[:, 0].argmax() == 128 and column[128, 2] == 0  # RGB order: red channel holds 203
    assert column[128, 0] / column[128, 1] == pytest.approx(203 / 116, rel=0.03)
    # Truncation, not rounding: y * 256 = 127.97 draws on row 127.
    points[54, 1] = points[55, 1] = 0.4999
    low = draw_landmark_image(points, 256, 256, "official669", normalized=True)
    assert low[:, 128, 0].argmax() == 127
    # Pixel input gives the same picture as normalised input.
    pixels = draw_landmark_image(points * 256, 256, 256, "official669")
    np.testing.assert_array_equal(pixels, low)


def test_official669_drawing_matches_reference_loop(official_reference):
    # The official procedure written out directly from the shared listing, on random points.
    table = _official_table(official_reference)
    points = np.random.default_rng(3).uniform(0.05, 0.95, size=(669, 2))
    expected = np.zeros((256, 256, 3), dtype=np.uint8)
    for p0, p1, r, g, b in table.tolist():
        start = (int(points[p0, 0] * 256), int(points[p0, 1] * 256))
        end = (int(points[p1, 0] * 256), int(points[p1, 1] * 256))
        cv2.line(expected, start, end, (r, g, b), 1, cv2.LINE_AA)
    np.testing.assert_array_equal(draw_landmark_image(points, 256, 256, "official669", normalized=True), expected)


def test_mediapipe478_asset_matches_mediapipe():
    edges, groups, colors = mediapipe478_table()
    topology = TOPOLOGIES["mediapipe478"]
    np.testing.assert_array_equal(topology.edges, edges)
    assert list(topology.groups) == groups
    np.testing.assert_array_equal(topology.colors, colors)
    assert len(edges) == 1330 and len({tuple(e) for e in edges.tolist()}) == 1330


@pytest.mark.parametrize("name", ["mediapipe478", "sparse68", "official669"])
def test_every_edge_has_its_own_colour(name):
    colors = TOPOLOGIES[name].colors
    assert len({tuple(c) for c in colors.tolist()}) == len(colors)


def test_colour_rule_separates_groups():
    topology = TOPOLOGIES["mediapipe478"]
    groups = np.array(topology.groups)
    mesh = topology.colors[groups == "mesh"]
    assert mesh.min() >= 16 and mesh.max() <= 112  # dim
    for group, hue in GROUP_HUES.items():
        if hue is None:
            continue
        colors = topology.colors[groups == group].astype(float) / 255
        assert len(colors) > 0
        assert colors.max(axis=1).min() >= 160 / 255 - 1e-6  # brighter than every mesh edge
        hues = [colorsys.rgb_to_hsv(*c)[0] * 360 for c in colors]
        assert all(min(abs(h - hue), 360 - abs(h - hue)) < 3 for h in hues), group
    # Groups are drawn in GROUP_HUES order, irises last (on top).
    order = list(dict.fromkeys(topology.groups))
    assert order == list(GROUP_HUES)


def test_sparse68_layout():
    assert SPARSE68_INDEX.shape == (68,) and len(set(SPARSE68_INDEX.tolist())) == 68
    assert [len(v) for v in SPARSE68_PARTS.values()] == [17, 5, 5, 4, 5, 6, 6, 12, 8]
    # 16 jaw + 2x4 brows + 3 + 4 nose + 2x6 eyes + 12 + 8 lips
    assert len(TOPOLOGIES["sparse68"].edges) == 63


@pytest.mark.parametrize("source", ["astronaut", "lia_macron.png", "fomm_01.png"])
def test_sparse68_points_land_in_the_right_regions(source, shared_data, astronaut_landmarks):
    if source == "astronaut":
        points = astronaut_landmarks[SPARSE68_INDEX]
    else:
        points = landmarks_of_image(read_image(shared_data / "sources" / source), source)[SPARSE68_INDEX]
    jaw, right_brow, left_brow = points[0:17], points[17:22], points[22:27]
    bridge, nose_base, right_eye, left_eye = points[27:31], points[31:36], points[36:42], points[42:48]
    mouth = points[48:68]
    # iBUG order: everything "right" (subject's) is on the image's left.
    assert jaw[0, 0] < jaw[8, 0] < jaw[16, 0] and jaw[8, 1] == jaw[:, 1].max()  # chin is the lowest jaw point
    assert right_eye[:, 0].mean() < left_eye[:, 0].mean() and right_brow[:, 0].mean() < left_brow[:, 0].mean()
    assert right_brow[:, 1].mean() < right_eye[:, 1].mean() and left_brow[:, 1].mean() < left_eye[:, 1].mean()
    assert right_eye[:, 0].max() < bridge[:, 0].mean() < left_eye[:, 0].min()
    assert (np.diff(bridge[:, 1]) > 0).all() and (np.diff(nose_base[:, 0]) > 0).all()  # down, left to right
    assert nose_base[:, 1].max() < mouth[:, 1].min() and mouth[:, 1].max() < jaw[8, 1]  # between nose and chin
    assert mouth[0, 0] < mouth[3, 0] < mouth[6, 0]  # left corner, top centre, right corner
    # outer top above the inner lips (which meet when the mouth is closed), above the outer bottom
    assert mouth[3, 1] < mouth[14, 1] < mouth[18, 1] + 1 and mouth[18, 1] < mouth[9, 1]
    # Eye polygons: corners at the ends, upper lid above lower lid.
    for eye in (right_eye, left_eye):
        assert eye[0, 0] == eye[:, 0].min() and eye[3, 0] == eye[:, 0].max()
        assert eye[1:3, 1].mean() < eye[4:6, 1].mean()


def test_drawing_basics(astronaut_landmarks):
    points = astronaut_landmarks
    image = draw_landmark_image(points, 512, 512)
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    drawn = image.any(axis=2)
    ys, xs = np.nonzero(drawn)
    assert 170 < xs.min() and xs.max() < 280 and 65 < ys.min() and ys.max() < 185  # only around the face
    thick = draw_landmark_image(points, 512, 512, "sparse68", thickness=2)
    thin = draw_landmark_image(points, 512, 512, "sparse68")
    assert thick.any(axis=2).sum() > 1.5 * thin.any(axis=2).sum()
    # Sub-pixel endpoints: a quarter-pixel move changes the MediaPipe drawings.
    assert (draw_landmark_image(points + 0.25, 512, 512) != image).any()
    overlay = draw_landmarks_on(data.astronaut(), points)
    assert overlay.shape == (512, 512, 3) and (overlay[drawn] != data.astronaut()[drawn]).any()
    with pytest.raises(ValueError, match="478"):
        draw_landmark_image(points[:468], 512, 512)
    with pytest.raises(ValueError, match="official669"):
        draw_landmark_image(points, 512, 512, "dense")
    with pytest.raises(ValueError, match="NaN"):
        draw_landmark_image(np.full((478, 2), np.nan), 64, 64)
