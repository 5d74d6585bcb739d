"""Dataset preparation (`metaportrait prepare`) and reading the prepared layout back."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.data import astronaut

from metaportrait.cli import main
from metaportrait.data.dataset import MANIFEST_KEYS, PreparedDataset, split_by_identity
from metaportrait.data.face import CropBox, crop, points_to_crop
from metaportrait.data.landmarks import track_frames
from metaportrait.data.prepare import (
    PrepareConfig,
    clip_id,
    parse_manifest_identity,
    plan_jobs,
    prepare_dataset,
)
from metaportrait.errors import InputError
from metaportrait.io.image import write_image
from metaportrait.io.video import read_video, write_video

SIZE = 64


def _astronaut_clip(count: int = 10) -> list[np.ndarray]:
    """The astronaut photo drifting right and zooming in slightly: a 160 px video of a real face."""
    image = astronaut()
    frames = []
    for i in range(count):
        scale = 0.45 + 0.01 * i
        matrix = np.array([[scale, 0, 2 * i - 40], [0, scale, -i]], dtype=np.float32)
        frames.append(cv2.warpAffine(image, matrix, (160, 160), borderMode=cv2.BORDER_REFLECT))
    return frames


def _make_input(root: Path) -> Path:
    (root / "person_a").mkdir(parents=True)
    (root / "noise").mkdir()
    write_video(root / "person_a" / "astro.mp4", _astronaut_clip(), fps=25)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(10)]
    write_video(root / "noise" / "static.mp4", noise, fps=25)
    (root / "person_a" / "notes.txt").write_text("not a video")
    write_image(root / "person_a" / "still.png", _astronaut_clip(1)[0])  # stills are not clips
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(input folder, dataset folder) after one `prepare_dataset` run on the synthetic input."""
    root = tmp_path_factory.mktemp("prepare")
    input_dir = _make_input(root / "input")
    output_dir = root / "dataset"
    summary = prepare_dataset(input_dir, output_dir, PrepareConfig(size=SIZE))
    assert (summary.prepared, summary.skipped, summary.already_done, summary.already_skipped) == (1, 1, 0, 0)
    return input_dir, output_dir


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_layout_matches_contract(prepared):
    input_dir, output_dir = prepared
    (entry,) = _lines(output_dir / "manifest.jsonl")
    assert set(entry) == set(MANIFEST_KEYS)
    assert entry["clip"] == "person_a__astro" and entry["identity"] == "person_a"
    assert entry["source_video"] == str((input_dir / "person_a" / "astro.mp4").resolve())
    assert (entry["frames"], entry["fps"], entry["size"]) == (10, 25.0, SIZE)
    assert len(entry["crop"]) == 3 and entry["crop"][2] > 0
    folder = output_dir / "clips" / "person_a__astro"
    assert sorted(p.name for p in folder.iterdir()) == ["frames.npy", "landmarks.npy", "present.npy"]
    frames = np.load(folder / "frames.npy", mmap_mode="r")
    assert isinstance(frames, np.memmap) and frames.dtype == np.uint8 and frames.shape == (10, SIZE, SIZE, 3)
    landmarks, present = np.load(folder / "landmarks.npy"), np.load(folder / "present.npy")
    assert landmarks.dtype == np.float32 and landmarks.shape == (10, 478, 2)
    assert present.dtype == np.bool_ and present.shape == (10,) and present.all()
    assert [p.name for p in (output_dir / "clips").iterdir()] == ["person_a__astro"]  # no temporary folder left
    (skip,) = _lines(output_dir / "skipped.jsonl")
    assert set(skip) == {"source_video", "reason"}
    assert skip["source_video"].endswith("noise/static.mp4") and "no face" in skip["reason"]


def test_frames_and_landmarks_are_in_crop_coordinates(prepared):
    """The stored frames are the manifest's crop of the source, and the landmarks fall on them."""
    input_dir, output_dir = prepared
    clip = PreparedDataset(output_dir).clip("person_a__astro")
    box = CropBox.from_list(clip.crop)
    source, _ = read_video(input_dir / "person_a" / "astro.mp4")
    direct = np.stack([crop(frame, box, SIZE) for frame in source])
    assert np.abs(direct.astype(np.int16) - clip.frames.astype(np.int16)).mean() < 4.0
    # Landmarks measured on the full frames, mapped into the crop, agree with the ones measured on the crop.
    full, _ = track_frames(iter(source), smooth=False)
    error = np.linalg.norm(points_to_crop(full, box, SIZE) - clip.landmarks, axis=-1)
    assert np.median(error) < 1.0  # pixels of the 64 px crop
    face_centre = clip.landmarks[:, :468].mean(axis=1)
    assert np.all(np.abs(face_centre - SIZE / 2) < SIZE / 4)


def test_rerun_skips_finished_and_skipped_videos(prepared):
    input_dir, output_dir = prepared
    before = (output_dir / "clips" / "person_a__astro" / "frames.npy").stat().st_mtime_ns
    summary = prepare_dataset(input_dir, output_dir, PrepareConfig(size=SIZE))
    assert (summary.prepared, summary.skipped, summary.already_done, summary.already_skipped) == (0, 0, 1, 1)
    assert len(_lines(output_dir / "manifest.jsonl")) == 1 and len(_lines(output_dir / "skipped.jsonl")) == 1
    assert (output_dir / "clips" / "person_a__astro" / "frames.npy").stat().st_mtime_ns == before
    with pytest.raises(InputError, match="size"):
        prepare_dataset(input_dir, output_dir, PrepareConfig(size=SIZE * 2))


def test_interrupted_run_is_finished_cleanly(tmp_path):
    """Left-overs of a crash (a temporary folder, a finished folder without manifest line) are redone."""
    input_dir = tmp_path / "input"
    (input_dir / "person_a").mkdir(parents=True)
    write_video(input_dir / "person_a" / "astro.mp4", _astronaut_clip(8), fps=25)
    clips = tmp_path / "dataset" / "clips"
    (clips / ".tmp-person_a__astro").mkdir(parents=True)
    (clips / ".tmp-person_a__astro" / "frames.npy").write_bytes(b"half")
    (clips / "person_a__astro").mkdir()
    (clips / "person_a__astro" / "frames.npy").write_bytes(b"stale")
    summary = prepare_dataset(input_dir, tmp_path / "dataset", PrepareConfig(size=SIZE))
    assert summary.prepared == 1
    assert [p.name for p in clips.iterdir()] == ["person_a__astro"]
    assert PreparedDataset(tmp_path / "dataset")[0].frames.shape == (8, SIZE, SIZE, 3)


def test_too_few_face_frames_is_skipped(tmp_path):
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    write_video(input_dir / "short.mp4", _astronaut_clip(4), fps=25)
    summary = prepare_dataset(input_dir, tmp_path / "dataset", PrepareConfig(size=SIZE, min_frames=8))
    assert (summary.prepared, summary.skipped) == (0, 1)
    (skip,) = _lines(tmp_path / "dataset" / "skipped.jsonl")
    assert skip["reason"] == "only 4 of 4 frames have a face (need 8)"
    assert not (tmp_path / "dataset" / "manifest.jsonl").exists()


def test_unreadable_video_is_skipped(tmp_path):
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    (input_dir / "broken.mp4").write_text("not a video\n" * 20)
    summary = prepare_dataset(input_dir, tmp_path / "dataset", PrepareConfig(size=SIZE))
    assert summary.skipped == 1
    (skip,) = _lines(tmp_path / "dataset" / "skipped.jsonl")
    assert skip["reason"].startswith("unreadable video")


def test_manifest_identity_parser():
    notes = "identity: GRID speaker (man, grey hair) = pwij3p; 2.98 s, audio; GRID 360x288"
    assert parse_manifest_identity(notes) == "GRID speaker (man, grey hair)"
    assert parse_manifest_identity("identity: Barack Obama; 20.0 s, audio") == "Barack Obama"
    assert parse_manifest_identity("identity: Kristi Noem") == "Kristi Noem"  # no ';' at all
    assert parse_manifest_identity("256 crop, no audio") is None
    assert parse_manifest_identity("identity: ; 3 s") is None


def test_identity_rules(tmp_path):
    input_dir = tmp_path / "data"
    for relative in ("train/vox/a.mp4", "personal/obama/b.mp4", "top.mp4"):
        (input_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (input_dir / relative).write_bytes(b"")  # planning looks at names only
    (input_dir / ".hidden").mkdir()
    (input_dir / ".hidden" / "c.mp4").write_bytes(b"")
    # Folder rule.
    jobs = {job.clip: job.identity for job in plan_jobs(input_dir)}
    assert jobs == {"personal__obama__b": "personal/obama", "top": "top", "train__vox__a": "train/vox"}
    # A MANIFEST.tsv one level up (paths relative to it), overridden per file by an identities TSV.
    manifest = tmp_path / "MANIFEST.tsv"
    manifest.write_text(
        "file\tkind\tnotes\n"
        "data/train/vox/a.mp4\tclip\tidentity: Person A; 3 s\n"
        "data/personal/obama/b.mp4\tclip\tidentity: Barack Obama; 20 s\n"
        "data/top.mp4\tclip\tidentity: Person T = a; 1 s\n"
    )
    jobs = {job.clip: job.identity for job in plan_jobs(input_dir, manifest=manifest)}
    assert jobs == {"personal__obama__b": "Barack Obama", "top": "Person T", "train__vox__a": "Person A"}
    overrides = tmp_path / "ids.tsv"
    overrides.write_text("# comment\ntop.mp4\tPerson A\n")
    jobs = {job.clip: job.identity for job in plan_jobs(input_dir, identities_file=overrides, manifest=manifest)}
    assert jobs["top"] == "Person A" and jobs["train__vox__a"] == "Person A"
    # An identities file alone must name every video.
    with pytest.raises(InputError, match="no identity for 2 video"):
        plan_jobs(input_dir, identities_file=overrides)
    overrides.write_text("top.mp4 Person A\n")
    with pytest.raises(InputError, match="line 1"):
        plan_jobs(input_dir, identities_file=overrides)


def test_clip_ids():
    assert clip_id("train_pool/vox_256/fomm_04.mp4") == "train_pool__vox_256__fomm_04"
    assert clip_id("a b/c(1).mov") == "a_b__c_1_"


def test_clip_id_collision_fails(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"")
    (tmp_path / "x.mov").write_bytes(b"")
    with pytest.raises(InputError, match="same clip id"):
        plan_jobs(tmp_path)


def test_prepared_dataset_reader(prepared, tmp_path):
    _, output_dir = prepared
    dataset = PreparedDataset(output_dir)
    assert len(dataset) == 1 and dataset.total_frames == 10
    assert list(dataset.identities) == ["person_a"]
    clip = dataset[0]
    assert clip.frames.shape == (10, SIZE, SIZE, 3) and list(clip.usable_frames) == list(range(10))
    train, val = split_by_identity(dataset, ["person_a"])
    assert train == [] and val == [clip]
    assert split_by_identity(dataset, []) == ([clip], [])
    with pytest.raises(ValueError, match="no clip"):
        split_by_identity(dataset, ["nobody"])
    with pytest.raises(InputError, match="manifest.jsonl"):
        PreparedDataset(tmp_path)


def test_prepared_dataset_checks_array_shapes(prepared, tmp_path):
    _, output_dir = prepared
    (entry,) = _lines(output_dir / "manifest.jsonl")
    entry["frames"] = 11  # disagrees with the arrays on disk
    (tmp_path / "clips").symlink_to(output_dir / "clips")
    (tmp_path / "manifest.jsonl").write_text(json.dumps(entry) + "\n")
    with pytest.raises(InputError, match="expected uint8"):
        PreparedDataset(tmp_path)[0].frames


def test_cli_prepare(tmp_path):
    input_dir = tmp_path / "input"
    (input_dir / "someone").mkdir(parents=True)
    write_video(input_dir / "someone" / "astro.mp4", _astronaut_clip(20), fps=30)
    output_dir = tmp_path / "dataset"
    assert main(["prepare", str(input_dir), "--output", str(output_dir), "--size", str(SIZE), "--fps", "15"]) == 0
    (entry,) = _lines(output_dir / "manifest.jsonl")
    assert entry["frames"] == 10 and entry["fps"] == 15.0  # 20 frames at 30 fps = 10 frames at 15 fps
    assert main(["prepare", str(tmp_path / "missing"), "--output", str(output_dir)]) == 2


@pytest.mark.slow
def test_prepare_real_clips(shared_data, tmp_path):
    """Two real clips (a 30 fps mp4 with audio, a 360x288 MPEG-1 GRID clip), two workers, identities from MANIFEST."""
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    (input_dir / "lp_d1.mp4").symlink_to(shared_data / "driving" / "lp_d1.mp4")
    (input_dir / "grid_bbaf2n.mpg").symlink_to(shared_data / "train_pool" / "grid" / "grid_bbaf2n.mpg")
    output_dir = tmp_path / "dataset"
    argv = ["prepare", str(input_dir), "--output", str(output_dir), "--workers", "2", "--max-frames", "20"]
    assert main([*argv, "--manifest", str(shared_data / "MANIFEST.tsv")]) == 0
    dataset = PreparedDataset(output_dir)
    clips = {clip.clip: clip for clip in dataset}
    assert set(clips) == {"lp_d1", "grid_bbaf2n"}
    assert clips["lp_d1"].identity == "blond man"
    assert clips["grid_bbaf2n"].identity == "GRID speaker (man, dark hair, denim shirt)"
    assert clips["lp_d1"].frame_count == 13  # 16 frames at 30 fps -> 13 at 25 fps
    assert clips["grid_bbaf2n"].frame_count == 20  # --max-frames
    for clip in dataset:
        assert clip.frames.shape == (clip.frame_count, 256, 256, 3)
        assert clip.present.all()
        centre = clip.landmarks[:, :468].mean(axis=1)
        assert np.all(np.abs(centre - 128) < 40)  # the face sits in the middle of its crop
