"""Base-model training: training pairs (augmentation, mirroring, sampling) and `train_base` end to end on a tiny
synthetic prepared dataset (scikit-image's astronaut moved around), with exact resume and 2-process DDP."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from metaportrait.data.pairs import (
    LEFT_EYE_POINTS,
    MIRROR_INDEX,
    NO_AUGMENT,
    RIGHT_EYE_POINTS,
    AugmentConfig,
    FixedPairs,
    PairOptions,
    RandomPairs,
    StepSampler,
    _Draw,
    _geometry,
    box_crops,
    box_masks,
    flip_landmarks,
    make_pair,
    region_boxes,
)

CLIP_SIZE = 64
FRAMES = 6


@pytest.fixture(scope="module")
def astronaut_face():
    """scikit-image's astronaut (512²) and its MediaPipe landmarks in image pixels."""
    from skimage.data import astronaut

    from metaportrait.data.landmarks import landmarks_of_image

    image = astronaut()
    return image, landmarks_of_image(image, "astronaut")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, astronaut_face) -> Path:
    """A prepared dataset (docs/contracts.md layout): 3 clips x 6 frames of 64², two identities.

    Each frame crops the astronaut with a slightly moved and zoomed box, so the face moves in the crop and the
    landmarks move with it. Identity "blue" is the astronaut with red and blue swapped (a different-looking face
    for the validation split). One frame of clip 0 has no face (``present`` False).
    """
    from metaportrait.data.face import CropBox, crop, points_to_crop

    image, points = astronaut_face
    root = tmp_path_factory.mktemp("prepared")
    base = CropBox.from_landmarks(points)
    rng = np.random.default_rng(0)
    clips = [("astro_0", "astro", image), ("astro_1", "astro", image), ("blue_0", "blue", image[..., ::-1].copy())]
    manifest = []
    for number, (name, identity, picture) in enumerate(clips):
        folder = root / "clips" / name
        folder.mkdir(parents=True)
        frames, landmarks = [], []
        for _ in range(FRAMES):
            dx, dy = rng.uniform(-0.06, 0.06, 2) * base.side
            box = CropBox(base.cx + dx, base.cy + dy, base.side * rng.uniform(0.92, 1.08))
            frames.append(crop(picture, box, CLIP_SIZE))
            landmarks.append(points_to_crop(points, box, CLIP_SIZE))
        present = np.ones(FRAMES, dtype=bool)
        if number == 0:
            present[2] = False
        np.save(folder / "frames.npy", np.stack(frames).astype(np.uint8))
        np.save(folder / "landmarks.npy", np.stack(landmarks).astype(np.float32))
        np.save(folder / "present.npy", present)
        manifest.append(
            {"clip": name, "identity": identity, "source_video": f"{name}.mp4", "frames": FRAMES, "fps": 25.0,
             "size": CLIP_SIZE, "crop": base.to_list()}  # fmt: skip
        )
    (root / "manifest.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in manifest))
    return root


# ----------------------------------------------------------------------------------------------------------------
# Pairs


def test_mirror_index_is_the_face_mesh_symmetry(astronaut_face):
    assert (MIRROR_INDEX[MIRROR_INDEX] == np.arange(478)).all()
    assert sorted(MIRROR_INDEX[list(RIGHT_EYE_POINTS)]) == sorted(LEFT_EYE_POINTS)
    # MediaPipe on the mirrored photo finds (nearly) the mirrored landmarks, point by point.
    from metaportrait.data.landmarks import landmarks_of_image

    image, points = astronaut_face
    measured = landmarks_of_image(np.ascontiguousarray(image[:, ::-1]), "mirrored astronaut")
    predicted = flip_landmarks(points, image.shape[1])
    error = np.linalg.norm(measured - predicted, axis=-1)
    # Wrong pairs would be off by the distance between the two eyes (~50 px here).
    assert np.median(error) < 2.0 and error.max() < 8.0, (np.median(error), error.max())
    naive = points.copy()  # mirrored coordinates without swapping the indices
    naive[:, 0] = image.shape[1] - naive[:, 0]
    assert np.median(np.linalg.norm(measured - naive, axis=-1)) > 10


@pytest.mark.parametrize("flip", [False, True])
def test_geometry_moves_image_and_landmarks_together(flip):
    """A bright dot drawn at a landmark ends where the transformed landmark says, after flip, resize, zoom, shift."""
    size = 64
    landmarks = np.zeros((2, 478, 2), np.float32)
    landmarks[:, :] = [40.0, 50.0]
    landmarks[:, 33] = [30.5, 60.5]  # right eye corner: pixel (30, 60) of the 128-px frame
    frames = np.zeros((2, 128, 128, 3), np.uint8)
    frames[:, 59:62, 29:32] = 255  # 3x3 dot centred on the pixel (30, 60)
    draw = _Draw(flip=flip, scale=1.1, shift=(0.05, -0.03), brightness=1.0, contrast=1.0, saturation=1.0)
    out_frames, out_landmarks = _geometry(frames, landmarks, draw, size)
    assert out_frames.shape == (2, size, size, 3)
    point = out_landmarks[0, 263 if flip else 33]  # a flip makes the right eye corner the left one
    weights = out_frames[0, ..., 0].astype(np.float64)
    centres = np.arange(size) + 0.5
    centroid = np.array([(weights.sum(0) * centres).sum(), (weights.sum(1) * centres).sum()]) / weights.sum()
    assert np.abs(centroid - point).max() < 0.2, (centroid, point)


def test_pairs_are_deterministic_and_consistent(dataset_dir):
    from metaportrait.data.dataset import PreparedDataset

    dataset = PreparedDataset(dataset_dir)
    options = PairOptions(size=64, prior_size=64)
    pairs = RandomPairs(list(dataset), options, AugmentConfig(), seed=3)
    first, again, other = pairs[5], pairs[5], pairs[6]
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first["driving"], other["driving"])
    assert first["source"].shape == (3, 64, 64) and first["source"].dtype == torch.float32
    assert first["prior_grid"].shape == (64, 64, 2) and first["boxes"].shape == (3, 4)
    # The line image is drawn from the landmarks that come with the sample.
    from metaportrait.data.drawing import draw_landmark_image

    lines = draw_landmark_image(first["driving_landmarks"].numpy(), 64, 64)
    assert torch.equal(first["driving_lines"], torch.from_numpy(lines).permute(2, 0, 1).float() / 255)
    # Frames without a face are never used: frame 2 of clip 0 is the only one with these exact pixels.
    hidden = torch.from_numpy(np.array(dataset[0].frames[2])).permute(2, 0, 1).float() / 255
    fixed = FixedPairs(list(dataset), PairOptions(size=64), per_clip=3)
    assert all(not torch.equal(fixed[i]["driving"], hidden) and not torch.equal(fixed[i]["source"], hidden)
               for i in range(len(fixed)))  # fmt: skip
    assert [p[1] for p in fixed.pairs if p[0] == 0] == [0, 0, 0]


def test_open_mouth_weight_draws_open_mouths_as_driving_frames(astronaut_face):
    """`--open-mouth-weight`: driving frames with open mouths come up more often; source and driving differ."""
    from metaportrait.motion import Controls, mouth_openness

    _, points = astronaut_face
    openings = np.linspace(0.0, 0.8, 9)  # frame i opens the mouth openings[i] (a still clip otherwise)
    landmarks = np.stack([Controls(mouth=float(o)).apply(points) for o in openings])
    clip = dataclasses.make_dataclass("Clip", ["identity", "usable_frames", "landmarks"])(
        "astro", np.arange(9), landmarks
    )
    measured = mouth_openness(landmarks)
    options = PairOptions(size=64)

    def driving_openings(weight: float) -> np.ndarray:
        pairs = RandomPairs([clip], options, NO_AUGMENT, seed=0, open_mouth_weight=weight)
        chosen = [pairs.choose_frames(0, np.random.default_rng([0, i])) for i in range(2000)]
        assert all(source != driving for source, driving in chosen)
        return measured[[driving for _, driving in chosen]]

    uniform, weighted = driving_openings(0.0), driving_openings(10.0)
    assert abs(uniform.mean() - measured.mean()) < 0.03
    # Weight 1 + 10 x opening: the expected opening of a drawn frame is sum(o (1 + 10 o)) / sum(1 + 10 o).
    expected = (measured * (1 + 10 * measured)).sum() / (1 + 10 * measured).sum()
    assert abs(weighted.mean() - expected) < 0.03 and weighted.mean() > uniform.mean() + 0.1
    with pytest.raises(ValueError, match="open_mouth_weight"):
        RandomPairs([clip], options, NO_AUGMENT, seed=0, open_mouth_weight=-1.0)


def test_closed_eye_weight_draws_blinks_as_driving_frames(astronaut_face):
    """`--closed-eye-weight`: driving frames with closed eyes come up more often."""
    from metaportrait.motion import Controls

    _, points = astronaut_face
    openness = np.array([1.0] * 6 + [0.0] * 2)  # a clip of open eyes with two blink frames
    landmarks = np.stack([Controls(eyes=float(o)).apply(points) for o in openness])
    clip = dataclasses.make_dataclass("Clip", ["identity", "usable_frames", "landmarks"])(
        "astro", np.arange(len(openness)), landmarks
    )
    options = PairOptions(size=64)

    def blink_share(weight: float) -> float:
        pairs = RandomPairs([clip], options, NO_AUGMENT, seed=0, closed_eye_weight=weight)
        chosen = [pairs.choose_frames(0, np.random.default_rng([0, i])) for i in range(2000)]
        return float(np.mean([openness[driving] == 0 for _, driving in chosen]))

    # Weight 1 + 3 x closure: each blink frame weighs 4, each open one 1: 8 / 14 of the draws are blinks.
    assert abs(blink_share(0.0) - 2 / 8) < 0.04 and abs(blink_share(3.0) - 8 / 14) < 0.04
    with pytest.raises(ValueError, match="closed_eye_weight"):
        RandomPairs([clip], options, NO_AUGMENT, seed=0, closed_eye_weight=-1.0)


def test_boxes_cover_the_eyes_and_mouth(astronaut_face):
    _, points = astronaut_face
    boxes = region_boxes(points * 0.25, 128)  # 512 -> 128
    masks = box_masks(torch.from_numpy(boxes)[None], 128, 128, 128)[0]
    for region, point in zip(range(3), (468, 473, 13)):  # iris centres, upper inner lip
        x, y = (points[point] * 0.25).astype(int)
        assert masks[region, y, x] == 1
    assert 0 < masks.sum() < 0.1 * 128 * 128
    # Half resolution: the same boxes scaled.
    half = box_masks(torch.from_numpy(boxes)[None], 64, 64, 128)[0]
    assert abs(half.sum().item() * 4 - masks.sum().item()) < 0.15 * masks.sum().item()


def test_pairs_draw_lines_of_the_given_width(dataset_dir):
    from metaportrait.data.dataset import PreparedDataset

    clip = next(iter(PreparedDataset(dataset_dir)))
    frames, landmarks = np.stack([clip.frames[0], clip.frames[1]]), np.stack([clip.landmarks[0], clip.landmarks[1]])
    thin = make_pair(frames, landmarks, PairOptions(size=64), NO_AUGMENT, np.random.default_rng(0))
    thick = make_pair(frames, landmarks, PairOptions(size=64, line_thickness=2), NO_AUGMENT, np.random.default_rng(0))
    assert thick["driving_lines"].sum() > 1.3 * thin["driving_lines"].sum()
    torch.testing.assert_close(thick["driving"], thin["driving"])


def test_box_crops_cut_square_crops_around_boxes():
    images = torch.rand(2, 3, 32, 32)
    # A box over the whole image, not grown, at the image's size: the image itself.
    whole = torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2)
    torch.testing.assert_close(box_crops(images, whole, 32, 32, grow=1.0), images)
    # A 4 x 2 px box grown to a 8 px square at 8 px: exactly the pixels of rows 10..17, columns 4..11.
    box = torch.tensor([[6.0, 13.0, 10.0, 15.0], [6.0, 13.0, 10.0, 15.0]])
    torch.testing.assert_close(box_crops(images, box, 32, 8, grow=2.0), images[:, :, 10:18, 4:12])
    # Boxes of a 64-px image applied to its 32-px version: the same crop.
    torch.testing.assert_close(box_crops(images, box * 2, 64, 8, grow=2.0), images[:, :, 10:18, 4:12])


def test_step_sampler_splits_ranks_and_resumes():
    straight = list(StepSampler(0, 4, 3))
    assert straight == list(StepSampler(0, 2, 3)) + list(StepSampler(2, 4, 3)) == list(range(12))
    rank0, rank1 = list(StepSampler(1, 3, 2, 0, 2)), list(StepSampler(1, 3, 2, 1, 2))
    assert rank0 == [4, 5, 8, 9] and rank1 == [6, 7, 10, 11]


def test_colour_jitter_is_shared_by_source_and_driving():
    frames = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8).repeat(2, axis=0)
    frames[1, :20] = 30  # the driving frame differs from the source only in its top rows
    landmarks = np.tile(np.array([32.0, 32.0], np.float32), (2, 478, 1))
    strong = AugmentConfig(flip=0.0, scale=0.0, translate=0.0, brightness=0.5, contrast=0.5, saturation=0.5)
    sample = make_pair(frames, landmarks, PairOptions(size=64), strong, np.random.default_rng(1))
    plain = make_pair(frames, landmarks, PairOptions(size=64), NO_AUGMENT, np.random.default_rng(1))
    assert not torch.allclose(sample["source"], plain["source"])
    # Same colour map on both: where the frames were equal they still are.
    assert torch.equal(sample["source"][:, 20:], sample["driving"][:, 20:])
    assert not torch.equal(sample["source"][:, :20], sample["driving"][:, :20])


# ----------------------------------------------------------------------------------------------------------------
# train_base


def _tiny(stage: str, steps: int, **changes):
    from metaportrait.train.config import recipe

    # One thread: the test machine is shared, and two busy-waiting OpenMP threads stall badly under load.
    return recipe("tiny", stage, steps).replace(val_identities=("blue",), threads=1, **changes)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _weights(generator: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in generator.state_dict().items()}


@pytest.fixture(scope="module")
def warp_run(dataset_dir, tmp_path_factory) -> Path:
    from metaportrait.train.base import train_base

    out = tmp_path_factory.mktemp("runs") / "warp"
    result = train_base(_tiny("warp", 3), dataset_dir, out, progress=False)
    assert result.step == 3
    return out


def test_warp_stage_writes_logs_checkpoint_model_and_samples(warp_run):
    from metaportrait.io.checkpoint import load_model
    from metaportrait.io.image import read_image
    from metaportrait.train.config import TrainConfig

    log = _read_jsonl(warp_run / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(np.isfinite(r["perceptual_warped"]) and r["s_per_step"] > 0 for r in log)
    assert "perceptual_output" not in log[0] and log[0]["lr_warp"] == log[0]["lr"]  # warp at full lr
    assert log[-1]["lr"] == pytest.approx(2e-5)  # milestone at 3/4 of the steps
    val = _read_jsonl(warp_run / "val.jsonl")
    assert [r["step"] for r in val] == [0, 2, 3] and val[0]["best"] and 5 < val[1]["psnr"] < 60
    # Step 0 also measures the training-free baselines; the untrained warp is the mesh prior itself.
    assert val[0]["psnr"] == pytest.approx(val[0]["prior_psnr"], abs=0.05) and "copy_face_l1" in val[0]
    state = torch.load(warp_run / "checkpoint.pt", weights_only=True)  # tensors and primitives only
    assert state["step"] == 3 and "discriminator" not in state
    assert TrainConfig.from_dict(json.loads((warp_run / "train_config.json").read_text())).stage == "warp"
    generator, cfg = load_model(warp_run / "model")
    assert cfg.image_size == 64
    assert all(torch.equal(v, state["generator"][k]) for k, v in generator.state_dict().items())
    load_model(warp_run / "best")
    sample = read_image(warp_run / "samples" / "step_0000002.png")
    assert sample.shape == (2 * 64, 4 * 64, 3)  # 2 rows (batch 2); source | lines | warped | driving


def test_full_stage_from_warp_run(warp_run, dataset_dir, tmp_path):
    from metaportrait.io.checkpoint import load_model
    from metaportrait.train.base import train_base

    result = train_base(_tiny("full", 2, init=str(warp_run)), dataset_dir, tmp_path / "full", progress=False)
    log = _read_jsonl(tmp_path / "full" / "log.jsonl")
    expected = {"perceptual_warped", "perceptual_output", "l1_output", "eye", "mouth", "identity", "gan_g", "gan_d",
                "feature_matching", "grad_norm_d"}  # fmt: skip
    assert expected <= set(log[0]) and all(np.isfinite(log[-1][k]) for k in expected)
    assert log[0]["lr_warp"] == pytest.approx(0.1 * log[0]["lr"])
    # The warp network started from the warp run (then moved a little); R started fresh.
    warp_generator, _ = load_model(warp_run / "model")
    start = warp_generator.state_dict()
    key = next(k for k in start if k.startswith("dense_motion_network") and k.endswith("weight"))
    change = (result.generator.state_dict()[key] - start[key]).abs().max()
    assert 0 < change < 0.01
    assert read_sample_width(tmp_path / "full") == 5 * 64


def test_full_stage_continues_a_full_model(warp_run, dataset_dir, tmp_path):
    from metaportrait.errors import InputError
    from metaportrait.io.checkpoint import load_model, save_model
    from metaportrait.train.base import train_base

    with pytest.raises(InputError, match="full-stage"):
        train_base(_tiny("full", 1, init=str(warp_run), init_refine=True), dataset_dir, tmp_path / "x", progress=False)
    first = train_base(_tiny("full", 2, init=str(warp_run)), dataset_dir, tmp_path / "first", progress=False)
    # A model folder (not a run folder) is accepted; with init_refine the refinement network is loaded too.
    second = train_base(_tiny("full", 1, init=str(tmp_path / "first" / "model"), init_refine=True, lr=1e-9),
                        dataset_dir, tmp_path / "second", progress=False)  # fmt: skip
    start, start_cfg = load_model(tmp_path / "first" / "model")
    for key, value in start.state_dict().items():
        torch.testing.assert_close(second.generator.state_dict()[key], value, atol=1e-5, rtol=0)
    assert first.generator is not second.generator
    # init_refine_from: the warp network of one model under the refinement network of another.
    third = train_base(_tiny("full", 1, init=str(warp_run), init_refine_from=str(tmp_path / "first"), lr=1e-9),
                       dataset_dir, tmp_path / "third", progress=False)  # fmt: skip
    warp_start, _ = load_model(warp_run / "model")
    for key, value in third.generator.state_dict().items():
        source = warp_start if key.split(".")[0] in ("ladder_network", "dense_motion_network") else start
        torch.testing.assert_close(value, source.state_dict()[key], atol=1e-5, rtol=0)
    # freeze_refine_steps: R keeps the loaded weights exactly while W trains.
    frozen = train_base(_tiny("full", 2, init=str(warp_run), init_refine_from=str(tmp_path / "first"),
                              freeze_refine_steps=2), dataset_dir, tmp_path / "frozen", progress=False)  # fmt: skip
    warp_moved = False
    for key, value in frozen.generator.state_dict().items():
        if key.split(".")[0] in ("ladder_network", "dense_motion_network"):
            warp_moved |= not torch.equal(value, warp_start.state_dict()[key])
        else:
            torch.testing.assert_close(value, start.state_dict()[key], atol=0, rtol=0)
    assert warp_moved
    # A refinement trained without the mouth template loads into one with it and computes the same images.
    from metaportrait.models.generator import Generator, example_inputs
    from metaportrait.train.base import _load_init

    templated_cfg = start_cfg.replace(refine=dataclasses.replace(start_cfg.refine, mouth_template=True))
    templated = Generator(templated_cfg)
    _load_init(templated, templated_cfg, tmp_path / "first", "all")
    inputs = example_inputs(templated_cfg, size=64)
    plain_inputs = {**inputs, "prior_masks": inputs["prior_masks"][:, :2]}
    assert templated_cfg.prior_mask_channels() == 4 and inputs["prior_masks"].shape[1] == 4
    with torch.no_grad():
        torch.testing.assert_close(templated.eval()(**inputs)["output"], start(**plain_inputs)["output"])
    save_model(tmp_path / "templated", templated, templated_cfg, extra_meta={"stage": "full"})
    with pytest.raises(InputError, match="differs"):  # the way back would drop trained inputs: refused
        train_base(_tiny("full", 1, init=str(warp_run), init_refine_from=str(tmp_path / "templated")),
                   dataset_dir, tmp_path / "z", progress=False)  # fmt: skip
    with pytest.raises(InputError, match="full-stage"):
        train_base(_tiny("full", 1, init=str(warp_run), init_refine_from=str(warp_run)), dataset_dir,
                   tmp_path / "y", progress=False)  # fmt: skip
    # warp.subtract_source_flow adds no weights: a model trained without it starts one that trains with it.
    subtracting = train_base(_tiny("full", 1, init=str(warp_run), init_refine_from=str(tmp_path / "first"),
                                   subtract_source_flow=True), dataset_dir, tmp_path / "sf", progress=False)  # fmt: skip
    assert math.isfinite(subtracting.log["total_g"])
    assert load_model(tmp_path / "sf" / "model")[1].warp.subtract_source_flow
    # Nor does refine.smooth_upscale.
    smoothing = train_base(_tiny("full", 1, init=str(warp_run), init_refine_from=str(tmp_path / "first"),
                                 smooth_upscale=True), dataset_dir, tmp_path / "su", progress=False)  # fmt: skip
    assert math.isfinite(smoothing.log["total_g"])
    assert load_model(tmp_path / "su" / "model")[1].refine.smooth_upscale
    # Nor do prior_eyelids (it changes what prior-mask channel 1 covers) and prior_eyelid_fill (the prior grid).
    lids = train_base(_tiny("full", 1, init=str(warp_run), init_refine_from=str(tmp_path / "first"),
                            prior_eyelids=True, prior_eyelid_fill=True), dataset_dir, tmp_path / "lids",
                      progress=False)  # fmt: skip
    assert math.isfinite(lids.log["total_g"])
    assert load_model(tmp_path / "lids" / "model")[1].prior_eyelids
    assert load_model(tmp_path / "lids" / "model")[1].prior_eyelid_fill
    # The eyelid-band input is added at zero weight, after the template: the same images at the start.
    reading = train_base(_tiny("full", 1, init=str(tmp_path / "templated"), init_refine=True,
                               prior_eyelids=True, eyelid_condition=True, mouth_template=True, lr=1e-9,
                               loss=dataclasses.replace(_tiny("full", 1).loss, eyelid_pixel=2.0)),
                         dataset_dir, tmp_path / "reading", progress=False)  # fmt: skip
    assert math.isfinite(reading.log["total_g"])
    reading_model, reading_cfg = load_model(tmp_path / "reading" / "model")
    assert reading_cfg.refine.eyelid_band and reading_cfg.prior_mask_channels() == 5
    lid_inputs = {**inputs, "prior_masks": torch.cat([inputs["prior_masks"], inputs["prior_masks"][:, 1:2]], 1)}
    with torch.no_grad():
        torch.testing.assert_close(reading_model(**lid_inputs)["output"], templated(**inputs)["output"],
                                   atol=1e-4, rtol=0)  # fmt: skip
    # The gain map's head is added at zero weight: the same images at the start, and it trains.
    gaining = train_base(_tiny("full", 2, init=str(tmp_path / "templated"), init_refine=True, mouth_template=True,
                               gain_map_grid=4), dataset_dir, tmp_path / "gain", progress=False)  # fmt: skip
    assert math.isfinite(gaining.log["total_g"])
    gain_model, gain_cfg = load_model(tmp_path / "gain" / "model")
    assert gain_cfg.refine.gain_map_grid == 4 and gain_model.SPDAE_G.conv_gain.weight.abs().max() > 0
    gain_start = Generator(gain_cfg).eval()
    _load_init(gain_start, gain_cfg, tmp_path / "templated", "all")
    with torch.no_grad():
        torch.testing.assert_close(gain_start(**inputs)["output"], templated(**inputs)["output"], rtol=0, atol=0)
    with pytest.raises(InputError, match="differs"):  # dropping a trained gain map is refused
        _load_init(Generator(templated_cfg), templated_cfg, tmp_path / "gain", "all")
    lids_only = reading_cfg.replace(refine=dataclasses.replace(reading_cfg.refine, mouth_template=False))
    save_model(tmp_path / "lids_only", Generator(lids_only), lids_only, extra_meta={"stage": "full"})
    with pytest.raises(InputError, match="mouth template"):  # it would go between trained inputs: refused
        _load_init(Generator(reading_cfg), reading_cfg, tmp_path / "lids_only", "all")


def read_sample_width(run: Path) -> int:
    from metaportrait.io.image import read_image

    return read_image(sorted((run / "samples").glob("*.png"))[-1]).shape[1]


def test_resume_gives_the_same_weights(dataset_dir, tmp_path):
    from metaportrait.train.base import train_base

    cfg = _tiny("full", 4)
    straight = train_base(cfg, dataset_dir, tmp_path / "straight", progress=False).generator
    train_base(cfg.replace(steps=2), dataset_dir, tmp_path / "resumed", progress=False)
    resumed = train_base(cfg, dataset_dir, tmp_path / "resumed", resume=True, progress=False).generator
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _read_jsonl(tmp_path / "resumed" / "log.jsonl")] == [1, 2, 3, 4]
    # Runs and checks that refuse.
    from metaportrait.errors import InputError

    with pytest.raises(InputError, match="already holds"):
        train_base(cfg, dataset_dir, tmp_path / "straight", progress=False)
    with pytest.raises(InputError, match="differ"):
        train_base(cfg.replace(lr=1e-3), dataset_dir, tmp_path / "resumed", resume=True, progress=False)


def test_averaged_weights_are_saved_and_resume_exactly(dataset_dir, tmp_path):
    """ema_decay > 0: model/ holds the moving average of the weights (not the last step's), resumable exactly."""
    from metaportrait.io.checkpoint import load_model
    from metaportrait.train.base import _update_average, train_base

    cfg = _tiny("full", 4, ema_decay=0.5)
    straight = train_base(cfg, dataset_dir, tmp_path / "straight", progress=False).generator
    state = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    saved, _ = load_model(tmp_path / "straight" / "model")
    averaged, trained = _weights(saved), state["generator"]
    assert all(torch.equal(averaged[k], state["averaged_generator"][k]) for k in averaged)
    assert all(torch.equal(averaged[k], v) for k, v in _weights(straight).items())
    assert any(not torch.equal(averaged[k], trained[k]) for k in averaged)
    train_base(cfg.replace(steps=2), dataset_dir, tmp_path / "resumed", progress=False)
    resumed = train_base(cfg, dataset_dir, tmp_path / "resumed", resume=True, progress=False).generator
    b = _weights(resumed)
    assert all(torch.equal(averaged[k], b[k]) for k in averaged)
    # The update itself: mean <- decay * mean + (1 - decay) * current.
    mean, current = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    expected = 0.75 * mean.weight.detach() + 0.25 * current.weight.detach()
    _update_average(mean, current, 0.75)
    assert torch.allclose(mean.weight, expected)
    with pytest.raises(ValueError, match="ema_decay"):
        cfg.replace(ema_decay=1.0)


def test_synthesis_pixel_weight_scales_only_the_synthesised_band(dataset_dir, tmp_path):
    from metaportrait.train.base import train_base
    from metaportrait.train.losses import synthesis_pixel_weight

    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0] = 1.0  # the face channel must not matter
    masks[0, 1, 1:3, 1:3] = 1.0
    masks[0, 1, 0, 0] = 0.5  # feathered edge
    weight = synthesis_pixel_weight(masks, 0.2)
    assert weight.shape == (1, 1, 4, 4)
    assert weight[0, 0, 1, 1] == pytest.approx(0.2) and weight[0, 0, 0, 0] == pytest.approx(0.6)
    assert weight[0, 0, 3, 3] == 1.0
    cfg = _tiny("full", 2)
    cfg = cfg.replace(loss=dataclasses.replace(cfg.loss, synthesis_pixel=0.0, l2_output=5.0))
    result = train_base(cfg, dataset_dir, tmp_path / "run", progress=False)
    assert math.isfinite(result.log["l1_output"])
    assert 0 < result.log["l2_output"] < 5  # squared error of images in [0, 1]; the band is a small part
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["loss"]["synthesis_pixel"] == 0.0
    # With the eyelid band as the last channel, it gets its own weight; the mouth part of channel 1 keeps 0.2.
    lids = torch.zeros(1, 3, 4, 4)
    lids[0, 1, 1:3, 1:3] = 1.0  # mouth
    lids[0, 1, 0, 3] = lids[0, 2, 0, 3] = 1.0  # lid
    weight = synthesis_pixel_weight(lids, 0.2, 3.0)
    assert weight[0, 0, 1, 1] == pytest.approx(0.2) and weight[0, 0, 0, 3] == pytest.approx(3.0)
    assert weight[0, 0, 3, 3] == 1.0
    with pytest.raises(ValueError, match="eyelid-band input"):
        train_base(cfg.replace(loss=dataclasses.replace(cfg.loss, eyelid_pixel=1.0)), dataset_dir, tmp_path / "no",
                   progress=False)  # fmt: skip


def test_mouth_critic_can_judge_only_the_synthesised_band(dataset_dir, tmp_path):
    from metaportrait.train.base import train_base
    from metaportrait.train.losses import critic_loss as _critic_loss
    from metaportrait.train.losses import patch_mean as _patch_mean

    values = torch.arange(16.0).view(1, 1, 4, 4)
    assert _patch_mean(values, None) == values.mean()
    assert _patch_mean(values, torch.ones(1, 1, 8, 8)) == pytest.approx(values.mean().item())
    region = torch.zeros(1, 1, 8, 8)
    region[..., :2, :2] = 1.0  # covers patch (0, 0) only
    assert _patch_mean(values, region) == pytest.approx(0.0)
    assert _patch_mean(values, torch.zeros(1, 1, 8, 8)) == 0.0  # no band in the batch: no critic term
    real, fake = [([], torch.ones(1, 1, 4, 4))], [([], torch.zeros(1, 1, 4, 4))]
    fake[0][1][..., 3, 3] = 1.0  # one fooled patch, outside the region
    assert _critic_loss(real, fake, region) == pytest.approx(0.0)
    assert _critic_loss(real, fake) == pytest.approx(1 / 16)
    cfg = _tiny("full", 2)
    cfg = cfg.replace(loss=dataclasses.replace(cfg.loss, mouth_gan=1.0, mouth_feature_matching=1.0))
    cfg = cfg.replace(mouth_critic_region="synthesised")
    result = train_base(cfg, dataset_dir, tmp_path / "run", progress=False)
    assert math.isfinite(result.log["mouth_gan_d"]) and math.isfinite(result.log["mouth_gan_g"])
    with pytest.raises(ValueError, match="mouth_critic_region"):
        cfg.replace(mouth_critic_region="lips")
    with pytest.raises(ValueError, match="mouth_gan > 0"):  # no critic: the choice would do nothing
        cfg.replace(loss=dataclasses.replace(cfg.loss, mouth_gan=0.0))
    with pytest.raises(ValueError, match="stage 'full'"):
        _tiny("warp", 2).replace(mouth_critic_region="synthesised")


def test_band_losses_are_refused_without_prior_masks(dataset_dir, tmp_path, monkeypatch):
    from metaportrait.config import PRESETS
    from metaportrait.train.base import train_base

    # No trainable preset lacks prior masks today; a tiny one without them stands in for a future one.
    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(PRESETS["tiny"], prior_masks=False))
    cfg = _tiny("full", 1)
    with pytest.raises(ValueError, match="need a model with prior masks"):
        train_base(cfg.replace(loss=dataclasses.replace(cfg.loss, synthesis_pixel=0.5)), dataset_dir, tmp_path / "a")
    critic = cfg.replace(loss=dataclasses.replace(cfg.loss, mouth_gan=1.0)).replace(mouth_critic_region="synthesised")
    with pytest.raises(ValueError, match="need a model with prior masks"):
        train_base(critic, dataset_dir, tmp_path / "b")
    assert not (tmp_path / "a" / "train_config.json").exists()  # refused before anything was written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mouth_critic_trains_and_resumes_exactly(dataset_dir, tmp_path):
    from metaportrait.train.base import train_base
    from metaportrait.train.config import LossWeights

    cfg = _tiny("full", 4)
    cfg = cfg.replace(loss=dataclasses.replace(cfg.loss, mouth_gan=1.0, mouth_feature_matching=1.0, mouth_perceptual=1.0))
    straight = train_base(cfg, dataset_dir, tmp_path / "straight", progress=False).generator
    log = _read_jsonl(tmp_path / "straight" / "log.jsonl")
    assert {"mouth_gan_g", "mouth_gan_d", "mouth_feature_matching", "mouth_perceptual", "grad_norm_mouth_d"} <= set(log[-1])
    assert log[-1]["grad_norm_mouth_d"] > 0
    state = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert "mouth_discriminator" in state and "optimizer_mouth_discriminator" in state
    train_base(cfg.replace(steps=2), dataset_dir, tmp_path / "resumed", progress=False)
    resumed = train_base(cfg, dataset_dir, tmp_path / "resumed", resume=True, progress=False).generator
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="mouth_gan"):
        LossWeights(mouth_feature_matching=1.0)


def test_two_process_ddp_ends_with_identical_weights(dataset_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank trains on its own pairs, gradients are averaged."""
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train import _tiny
        from metaportrait.train.base import train_base
        result = train_base(_tiny("warp", 2), {str(dataset_dir)!r}, {str(tmp_path / "run")!r}, progress=False)
        torch.save(result.generator.state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
    """))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(worker)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    log = _read_jsonl(tmp_path / "run" / "log.jsonl")
    assert [r["world_size"] for r in log] == [2, 2]
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["generator"]
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)
    # The weights moved away from the initial ones (same seed on both ranks), so equality is not trivial.
    from metaportrait.config import PRESETS
    from metaportrait.models.generator import Generator

    torch.manual_seed(0)
    fresh = Generator(PRESETS["tiny"]).state_dict()
    assert any(not torch.equal(fresh[k], rank0[k]) for k in rank0)


def test_cli_resolves_the_config(tmp_path, capsys, warp_run, dataset_dir):
    from metaportrait.cli import main

    ids = tmp_path / "ids.txt"
    ids.write_text("# held out\nblue\n\n")
    argv = ["train", "base", "--stage", "full", "--preset", "tiny", "--data", str(dataset_dir), "--out",
            str(tmp_path / "run"), "--val-identities", str(ids), "--steps", "8", "--init", str(warp_run),
            "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["val_identities"] == ["blue"] and printed["steps"] == 8 and printed["lr_milestones"] == [6]
    assert printed["init"] == str(warp_run) and printed["warp_lr_scale"] == 0.1
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    assert main(argv + ["--lr-milestones", "5", "7", "--init-refine", "--open-mouth-weight", "10"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lr_milestones"] == [5, 7] and printed["init_refine"] is True and printed["open_mouth_weight"] == 10
    # --loss NAME=WEIGHT overrides single loss weights of the recipe; unknown names and bad values are refused.
    assert main(argv + ["--loss", "mouth_gan=0.5", "--loss", "mouth=12", "--loss", "l2_output=800"]) == 0
    printed = json.loads(capsys.readouterr().out)["loss"]
    assert printed["mouth_gan"] == 0.5 and printed["mouth"] == 12 and printed["eye"] == 10
    assert printed["l2_output"] == 800
    assert main(argv + ["--loss", "mouth_gun=1"]) == 2
    assert "mouth_gun=1" in capsys.readouterr().err
    assert main(argv + ["--loss", "mouth_gan=0"]) == 2  # the recipe's mouth feature matching needs the critic
    assert "needs loss.mouth_gan" in capsys.readouterr().err
    # A step count the recipe cannot schedule is one error line too; a single step is a valid run.
    assert main(argv[:-3] + ["--steps", "-5", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().endswith("invalid settings: steps must be >= 1, got -5")
    assert main(argv[:-4] + ["1", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["lr_milestones"] == [1]
    # A resumed run keeps its settings: changing the learning rate is refused with a one-line error.
    resume = ["train", "base", "--stage", "warp", "--data", str(dataset_dir), "--out", str(warp_run), "--resume"]
    assert main(resume + ["--lr", "0.1"]) == 2
    assert "cannot change ['lr']" in capsys.readouterr().err
    assert main(resume + ["--steps", "5", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 5
    # The length and the schedule may change: extending a run, or decaying the learning rate sooner.
    assert main(resume + ["--steps", "9", "--lr-milestones", "7", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 9 and printed["lr_milestones"] == [7]


def test_ablation_flags_change_the_model_config(tmp_path, capsys):
    """`--landmark-topology sparse68 --no-identity` reach the model config (paper Table 3 ablations); a model
    option the config refuses is one error line."""
    from metaportrait.cli import main

    args = ["train", "base", "--stage", "full", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
            "--preset", "tiny", "--landmark-topology", "sparse68", "--no-identity", "--dry-run"]  # fmt: skip
    assert main(args) == 0
    from metaportrait.cli.train import build_config, add_arguments
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = build_config(parser.parse_args(args[1:]))
    model = cfg.model_config()
    assert model.landmark_topology == "sparse68" and model.use_identity is False
    assert model.prior_mouth == "upper_lip"  # the preset's
    stretch = build_config(parser.parse_args(args[1:] + ["--prior-mouth", "stretch"])).model_config()
    assert stretch.prior_mouth == "stretch" and stretch.replace(prior_mouth="upper_lip") == model
    assert cfg.replace(landmark_topology=None, use_identity=None).model_config().use_identity is True
    gained = build_config(parser.parse_args(args[1:] + ["--gain-map", "8"])).model_config()
    assert gained.refine.gain_map_grid == 8 and gained.replace(refine=model.refine) == model
    capsys.readouterr()
    assert main(args[:-1] + ["--gain-map", "-1", "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "gain_map_grid" in error and str(tmp_path / "run") in error


def test_capacity_flags_widen_the_warping_hourglass(tmp_path, capsys):
    """`--warp-width` / `--warp-max-features` reach `WarpConfig`, and a bad width is one error line."""
    import argparse

    from metaportrait.cli import main
    from metaportrait.cli.train import add_arguments, build_config
    from metaportrait.config import PRESETS
    from metaportrait.models.generator import Generator

    args = ["train", "base", "--stage", "warp", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
            "--preset", "tiny", "--warp-width", "4", "--warp-max-features", "16", "--dry-run"]  # fmt: skip
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    model = build_config(parser.parse_args(args[1:])).model_config()
    tiny = PRESETS["tiny"]
    assert (model.warp.block_expansion, model.warp.max_features) == (4, 16)
    assert model.replace(warp=tiny.warp) == tiny  # nothing else changes
    widths = [b.conv.out_channels for b in Generator(model).dense_motion_network.hourglass.encoder.down_blocks]
    assert widths == [8, 16, 16, 16]
    assert main(args[:-1] + ["--warp-width", "0", "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "warp_block_expansion" in error and str(tmp_path / "run") in error


def test_warp_stage_fine_tunes_a_warp_network_with_the_face_masked_prior(warp_run, dataset_dir, tmp_path):
    """`--init` in stage warp starts from that run's warp network; `--prior-face-masked` changes no weights, so
    a ring-prior run starts it, and its samples get the identity prior outside the faces."""
    from metaportrait.data.pairs import PairOptions
    from metaportrait.io.checkpoint import load_model
    from metaportrait.train.base import train_base

    result = train_base(_tiny("warp", 1, init=str(warp_run), lr=1e-9, prior_face_masked=True), dataset_dir,
                        tmp_path / "masked", progress=False)  # fmt: skip
    start, _ = load_model(warp_run / "model")
    for key, value in start.state_dict().items():
        torch.testing.assert_close(result.generator.state_dict()[key], value, atol=1e-6, rtol=0)
    model_cfg = load_model(tmp_path / "masked" / "model")[1]
    assert model_cfg.prior_face_masked
    options = PairOptions.for_model(model_cfg, 64)
    assert options.face_masked and not PairOptions.for_model(model_cfg.replace(prior_face_masked=False), 64).face_masked
    with pytest.raises(ValueError, match="only apply to stage 'full'"):
        _tiny("warp", 1, init=str(warp_run), init_refine=True)


# Logged losses of `_tiny("full", 2, loss=... all terms on ...)` computed with train_base before its generator loss
# was moved into `metaportrait.train.losses.GeneratorLoss` (commit 3f1ffeb): the extraction must not change a number.
_LOSSES_BEFORE_EXTRACTION = {
    "warp": [
        {"step": 1, "face_warped": 0.48564, "grad_norm_g": 13.052493, "l1_warped": 0.794908,
         "perceptual_warped": 3.199966, "total_g": 4.480514, "lr": 0.0002, "lr_warp": 0.0002, "world_size": 1},
        {"step": 2, "face_warped": 0.353942, "grad_norm_g": 3.450593, "l1_warped": 1.162755,
         "perceptual_warped": 3.859989, "total_g": 5.376687, "lr": 2e-05, "lr_warp": 2e-05, "world_size": 1},
    ],
    "full": [
        {"step": 1, "eye": 0.269559, "face_output": 1.356203, "face_warped": 0.48564, "feature_matching": 0.04055,
         "gan_d": 0.149335, "gan_g": 0.144942, "grad_norm_d": 0.240946, "grad_norm_g": 43.527176,
         "grad_norm_mouth_d": 5.57539, "identity": 0.010903, "l1_output": 4.885899, "l1_warped": 0.794908,
         "l2_output": 0.022945, "mouth": 0.437486, "mouth_feature_matching": 0.015406, "mouth_gan_d": 1.249289,
         "mouth_gan_g": 1.23564, "mouth_perceptual": 1.007804, "perceptual_output": 3.602739,
         "perceptual_warped": 3.199966, "total_g": 17.51059, "lr": 0.0002, "lr_warp": 2e-05, "world_size": 1},
        {"step": 2, "eye": 0.20532, "face_output": 1.238419, "face_warped": 0.353742, "feature_matching": 0.0442,
         "gan_d": 0.148596, "gan_g": 0.14405, "grad_norm_d": 0.240338, "grad_norm_g": 25.672451,
         "grad_norm_mouth_d": 4.611754, "identity": 0.006523, "l1_output": 6.232958, "l1_warped": 1.162361,
         "l2_output": 0.042173, "mouth": 0.421358, "mouth_feature_matching": 0.015023, "mouth_gan_d": 0.986559,
         "mouth_gan_g": 0.990684, "mouth_perceptual": 0.8897, "perceptual_output": 4.246376,
         "perceptual_warped": 3.863129, "total_g": 19.856018, "lr": 2e-05, "lr_warp": 2.0000000000000003e-06,
         "world_size": 1},
    ],
}  # fmt: skip


def _assert_same_numbers(actual, expected, rel: float = 2e-5, where: str = "") -> None:
    """``actual == expected`` for nested dicts and lists, with floats (and large integers, e.g. pixel sums) equal
    to a relative ``rel``: the pinned numbers were recorded on one CPU, and another CPU's kernels may round the
    last printed digit differently, while any change to the computation moves them by far more."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), f"{where}: keys differ"
        for key in expected:
            _assert_same_numbers(actual[key], expected[key], rel, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: lengths differ"
        for index, (a, e) in enumerate(zip(actual, expected)):
            _assert_same_numbers(a, e, rel, f"{where}[{index}]")
    elif isinstance(expected, (int, float)) and not isinstance(expected, bool):
        assert actual == pytest.approx(expected, rel=rel, abs=1e-6), f"{where}: {actual} != {expected}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("stage", ["warp", "full"])
def test_generator_loss_extraction_keeps_base_training_numbers(dataset_dir, tmp_path, stage):
    from metaportrait.train.base import train_base

    loss = dataclasses.replace(_tiny(stage, 2).loss, l2_output=3.0, synthesis_pixel=0.5)
    cfg = _tiny(stage, 2, loss=loss)
    train_base(cfg, dataset_dir, tmp_path / "run", progress=False)
    log = _read_jsonl(tmp_path / "run" / "log.jsonl")
    numbers = [{k: v for k, v in r.items() if k != "s_per_step"} for r in log]
    _assert_same_numbers(numbers, _LOSSES_BEFORE_EXTRACTION[stage])


def _run_summary(run: Path) -> dict:
    """What a run folder records, timings left out: validation and log lines, the checkpoint's keys, step, best
    PSNR and learning rates, sums of its weights (float64, to catch any change), the files written and the pixel
    sums of the samples."""
    from metaportrait.io.image import read_image

    state = torch.load(run / "checkpoint.pt", weights_only=True)

    def weight_sum(weights: dict) -> float:
        return round(sum(float(v.double().abs().sum()) for v in weights.values() if v.is_floating_point()), 5)

    optimizers = sorted(k for k in state if k.startswith("optimizer_"))
    return {
        "val": _read_jsonl(run / "val.jsonl"),
        "log": [{k: v for k, v in r.items() if k != "s_per_step"} for r in _read_jsonl(run / "log.jsonl")],
        "checkpoint": sorted(state),
        "rng": sorted(state["rng"]),
        "step": state["step"],
        "best_psnr": state["best_psnr"],
        "lr": {k: [g["lr"] for g in state[k]["param_groups"]] for k in optimizers},
        "weights": {k: weight_sum(state[k]) for k in sorted(state) if k.endswith(("generator", "discriminator"))
                    and not k.startswith("optimizer_")},  # fmt: skip
        "meta": {k: json.loads((run / k / "config.json").read_text())["meta"] for k in ("model", "best")},
        "files": sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()),
        "samples": {p.name: int(read_image(p).astype(np.int64).sum()) for p in sorted((run / "samples").glob("*.png"))},
    }


def _pinned_run(dataset_dir: Path, out: Path) -> dict:
    """A tiny 2-step full-stage run with the mouth critic (all its terms) and the averaged generator on."""
    from metaportrait.train.base import train_base

    cfg = _tiny("full", 2, ema_decay=0.5)
    cfg = cfg.replace(loss=dataclasses.replace(cfg.loss, mouth_gan=1.0, mouth_feature_matching=1.0, mouth_perceptual=1.0))
    train_base(cfg, dataset_dir, out, progress=False)
    return _run_summary(out)


# What `_pinned_run` wrote with train_base as one ~330-line function (commit 9ff17d4), before it was split into
# named helpers; printed by `PYTHONPATH=src OMP_NUM_THREADS=1 python tests/test_train.py /tmp/pin` (below).
_PINNED_RUN = {
    "val": [
        {"step": 0, "psnr": 21.111, "l1": 0.05178, "face_l1": 0.032284, "copy_psnr": 13.3764, "copy_l1": 0.131497,
         "copy_face_l1": 0.132315, "prior_psnr": 21.5282, "prior_l1": 0.033177, "prior_face_l1": 0.014798,
         "pairs": 2, "best": True},
        {"step": 2, "psnr": 21.1136, "l1": 0.051756, "face_l1": 0.032249, "pairs": 2, "best": True},
    ],
    "log": [
        {"step": 1, "eye": 0.269559, "face_output": 1.356203, "face_warped": 0.48564, "feature_matching": 0.04055,
         "gan_d": 0.149335, "gan_g": 0.144942, "grad_norm_d": 0.240946, "grad_norm_g": 43.086811,
         "grad_norm_mouth_d": 5.57539, "identity": 0.010903, "l1_output": 4.885899, "l1_warped": 0.794908,
         "mouth": 0.437486, "mouth_feature_matching": 0.007703, "mouth_gan_d": 1.249289, "mouth_gan_g": 1.23564,
         "mouth_perceptual": 0.503902, "perceptual_output": 3.602739, "perceptual_warped": 3.199966,
         "total_g": 16.97604, "lr": 0.0002, "lr_warp": 2e-05, "world_size": 1},
        {"step": 2, "eye": 0.205316, "face_output": 1.238373, "face_warped": 0.353742, "feature_matching": 0.044199,
         "gan_d": 0.148596, "gan_g": 0.14405, "grad_norm_d": 0.240338, "grad_norm_g": 24.929029,
         "grad_norm_mouth_d": 4.611753, "identity": 0.006525, "l1_output": 6.232922, "l1_warped": 1.162361,
         "mouth": 0.421334, "mouth_feature_matching": 0.007511, "mouth_gan_d": 0.986559, "mouth_gan_g": 0.990683,
         "mouth_perceptual": 0.444897, "perceptual_output": 4.246419, "perceptual_warped": 3.863129,
         "total_g": 19.361462, "lr": 2e-05, "lr_warp": 2.0000000000000003e-06, "world_size": 1},
    ],
    "checkpoint": ["averaged_generator", "best_psnr", "discriminator", "generator", "model_config",
        "mouth_discriminator", "optimizer_discriminator", "optimizer_generator", "optimizer_mouth_discriminator", "rng",
        "scaler", "step", "train_config", "version"],
    "rng": ["numpy", "python", "torch"],
    "step": 2,
    "best_psnr": 21.1136,
    "lr": {"optimizer_discriminator": [2e-05], "optimizer_generator": [2e-05, 2.0000000000000003e-06],
        "optimizer_mouth_discriminator": [2e-05]},
    "weights": {"averaged_generator": 10306.91321, "discriminator": 188.02395, "generator": 10306.91224,
        "mouth_discriminator": 5270.74871},
    "meta": {"model": {"stage": "full", "step": 2}, "best": {"face_l1": 0.032249, "l1": 0.051756, "pairs": 2,
        "psnr": 21.1136, "stage": "full", "step": 2}},
    "files": ["best/config.json", "best/model.safetensors", "checkpoint.pt", "log.jsonl", "model/config.json",
        "model/model.safetensors", "samples/step_0000002.png", "train_config.json", "val.jsonl"],
    "samples": {"step_0000002.png": 13734435},
}  # fmt: skip


def test_training_loop_split_keeps_the_run(dataset_dir, tmp_path):
    """train_base split into named helpers writes exactly what the single function wrote."""
    _assert_same_numbers(_pinned_run(dataset_dir, tmp_path / "run"), _PINNED_RUN)


if __name__ == "__main__":
    # Print `_pinned_run`'s summary with the code on PYTHONPATH: python tests/test_train.py EMPTY_FOLDER
    from skimage.data import astronaut

    from metaportrait.data.landmarks import landmarks_of_image

    class _Folders:  # pytest's tmp_path_factory, for the dataset fixture
        def mktemp(self, name: str) -> Path:
            (Path(sys.argv[1]) / name).mkdir(parents=True)
            return Path(sys.argv[1]) / name

    picture = astronaut()
    prepared = dataset_dir.__wrapped__(_Folders(), (picture, landmarks_of_image(picture, "astronaut")))
    print(json.dumps(_pinned_run(prepared, Path(sys.argv[1]) / "run")))
