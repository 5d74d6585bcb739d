"""Dataset preparation: a folder of talking-head videos -> fixed face crops, dense landmarks and identity labels.

For each video (recursively; see `VIDEO_SUFFIXES`), in one worker process:

1. decode it streaming and resample it to the dataset frame rate (``--fps``);
2. pass 1: track MediaPipe landmarks on the full frames and take one square crop for the whole clip (median of
   the per-frame face boxes, `metaportrait.data.face.clip_box`), so the head moves inside a still frame;
3. pass 2: decode again, cut every frame to that crop and measure the landmarks again **on the crop** (at
   least 256 px, then scaled to ``--size``). Measuring on the crop is what inference does and is more
   accurate for small faces than mapping full-frame points. Landmarks are not smoothed: each frame's points
   describe that frame, with no filter lag.

Frames where the face is lost stay in the clip with ``present = False`` (their landmarks repeat the last good
ones, see `metaportrait.data.landmarks.iter_tracked`); the training sampler filters on ``present``.

Output layout (docs/contracts.md): ``manifest.jsonl`` (one line per finished clip), ``skipped.jsonl``,
``clips/<clip>/{frames,landmarks,present}.npy`` and ``prepare.json`` (the settings, checked on reruns). A clip
is written to ``clips/.tmp-<clip>`` and renamed when complete; its manifest line is appended after that, so
an interrupted run leaves no half clip and a rerun continues where it stopped (a manifest line cut off by the
interruption is dropped). Run one `prepare` per dataset folder at a time.

Identity of a clip, first rule that applies:

1. ``identities`` file (TSV ``relative/path<TAB>identity``, paths relative to the input folder);
2. ``manifest`` file (the shared data's ``MANIFEST.tsv``: columns ``file`` relative to the manifest's own
   folder, and ``notes`` starting ``identity: <name>; ...``, see `parse_manifest_identities`);
3. only when neither file is given: the folder the video sits in, as a path relative to the input folder (one
   folder per person, the VoxCeleb layout ``<person>/<clip>.mp4``); a video directly in the input folder is
   its own identity (its file name without suffix).

When a file is given, every video must get an identity from rule 1 or 2; a video missing from both is an error.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from metaportrait.data.dataset import CLIPS, MANIFEST, SKIPPED, read_jsonl
from metaportrait.data.face import DEFAULT_EXPAND, DEFAULT_SHIFT, clip_box, crop
from metaportrait.data.landmarks import NUM_LANDMARKS, iter_tracked, track_frames
from metaportrait.errors import InputError, NoFaceError
from metaportrait.io.atomic import write_text_atomic
from metaportrait.io.image import VIDEO_SUFFIXES
from metaportrait.io.video import VideoReader, resample_fps

logger = logging.getLogger(__name__)

SETTINGS = "prepare.json"
TMP_PREFIX = ".tmp-"
# Landmarks are measured on a crop at least this large: MediaPipe's mesh is less accurate on tiny faces.
MIN_LANDMARK_SIZE = 256


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of a prepared dataset; a rerun into the same folder must use the same values."""

    size: int = 256  # side of the square crops, pixels
    fps: float = 25.0  # every clip is resampled to this frame rate
    max_frames: int | None = None  # keep at most this many (resampled) frames per clip; None = all
    min_frames: int = 8  # a clip needs at least this many frames with a face, else it is skipped
    expand: float = DEFAULT_EXPAND  # crop side / face-mesh box side
    shift: float = DEFAULT_SHIFT  # vertical crop offset, fraction of the side (negative = up)

    def __post_init__(self):
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {self.max_frames}")
        if self.min_frames < 1:
            raise ValueError(f"min_frames must be at least 1, got {self.min_frames}")


@dataclass(frozen=True)
class VideoJob:
    """One input video to turn into a clip."""

    source: Path  # absolute path of the video
    clip: str  # clip id: the sanitised path relative to the input folder
    identity: str


@dataclass(frozen=True)
class PrepareSummary:
    """What one `prepare_dataset` run did (counts of videos)."""

    prepared: int  # clips finished in this run
    skipped: int  # videos skipped in this run (reasons in skipped.jsonl)
    already_done: int  # clips found in the manifest from an earlier run
    already_skipped: int  # videos found in skipped.jsonl from an earlier run


class ClipSkipped(Exception):
    """A video that cannot become a clip (no face, too few frames with a face, unreadable); `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- finding videos and naming clips ------------------------------------------------------------------------


def find_videos(input_dir: Path) -> list[Path]:
    """Video files under ``input_dir`` (recursive, sorted), by suffix; hidden files and folders are ignored."""
    videos = []
    for path in sorted(input_dir.rglob("*")):
        relative = path.relative_to(input_dir)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
            videos.append(path)
    return videos


def clip_id(relative_path: str | Path) -> str:
    """Clip id for a video path relative to the input folder: ``train_pool/vox_256/fomm_04.mp4`` ->
    ``train_pool__vox_256__fomm_04`` (folders joined by ``__``, suffix dropped, other characters -> ``_``)."""
    parts = list(Path(relative_path).with_suffix("").parts)
    return "__".join(re.sub(r"[^A-Za-z0-9_.-]", "_", part) for part in parts)


# --- identities ---------------------------------------------------------------------------------------------


def parse_manifest_identity(notes: str) -> str | None:
    """The identity in a shared-data MANIFEST ``notes`` field, or None if it has none.

    The identity is the text after ``identity:`` up to the first ``;``. A trailing ``= <other clip>`` (the
    manifest's way of saying two clips show one person) is dropped, so both clips get the same label:
    ``identity: GRID speaker (man, grey hair) = pwij3p; 2.98 s`` -> ``GRID speaker (man, grey hair)``.
    """
    match = re.search(r"identity:\s*([^;]*)", notes)
    if match is None:
        return None
    identity = match.group(1).split(" = ")[0].strip()
    return identity or None


def parse_manifest_identities(manifest: Path) -> dict[Path, str]:
    """Absolute video path -> identity for every row of a shared-data ``MANIFEST.tsv`` whose notes name one.

    The ``file`` column is relative to the manifest's folder.
    """
    if not manifest.is_file():
        raise InputError(manifest, "file not found")
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if reader.fieldnames is None or not {"file", "notes"} <= set(reader.fieldnames):
            raise InputError(manifest, f"expected a TSV with 'file' and 'notes' columns, got {reader.fieldnames}")
        identities = {}
        for row in reader:
            identity = parse_manifest_identity(row["notes"] or "")
            if identity is not None:
                identities[(manifest.parent / row["file"]).resolve()] = identity
    return identities


def read_identities_file(path: Path, input_dir: Path) -> dict[Path, str]:
    """Absolute video path -> identity from a TSV of ``relative/path<TAB>identity`` lines (relative to
    ``input_dir``). Blank lines and lines starting with ``#`` are ignored."""
    if not path.is_file():
        raise InputError(path, "file not found")
    identities = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise InputError(path, f"line {number}: expected 'relative/path<TAB>identity', got {line!r}")
        identities[(input_dir / fields[0].strip()).resolve()] = fields[1].strip()
    return identities


def identity_from_folder(relative_path: Path) -> str:
    """Folder rule: the video's folder relative to the input folder, or its stem for a top-level video."""
    parent = relative_path.parent
    return relative_path.stem if parent == Path(".") else parent.as_posix()


def plan_jobs(
    input_dir: Path, identities_file: Path | None = None, manifest: Path | None = None
) -> list[VideoJob]:
    """Find the videos under ``input_dir`` and give each a clip id and an identity (rules in the module doc).

    Raises:
        InputError: the folder is missing or holds no video, two videos map to one clip id, or an identity
            file was given and does not name some video.
    """
    input_dir = input_dir.resolve()
    if not input_dir.is_dir():
        raise InputError(input_dir, "input folder not found")
    videos = find_videos(input_dir)
    if not videos:
        raise InputError(input_dir, f"no video files ({', '.join(VIDEO_SUFFIXES)}) found")
    known: dict[Path, str] = {}
    if manifest is not None:
        known.update(parse_manifest_identities(manifest))
    if identities_file is not None:
        known.update(read_identities_file(identities_file, input_dir))  # overrides the manifest
    use_folders = identities_file is None and manifest is None

    jobs, missing, by_clip = [], [], {}
    for video in videos:
        relative = video.relative_to(input_dir)
        identity = identity_from_folder(relative) if use_folders else known.get(video.resolve())
        if identity is None:
            missing.append(relative.as_posix())
            continue
        clip = clip_id(relative)
        if clip in by_clip:
            raise InputError(video, f"gives the same clip id {clip!r} as {by_clip[clip]}; rename one of them")
        by_clip[clip] = video
        jobs.append(VideoJob(source=video.resolve(), clip=clip, identity=identity))
    if missing:
        sources = " / ".join(str(p) for p in (identities_file, manifest) if p is not None)
        raise InputError(sources, f"no identity for {len(missing)} video(s): {', '.join(missing[:10])}")
    return jobs


# --- one clip -----------------------------------------------------------------------------------------------


def _resampled_frames(reader: VideoReader, config: PrepareConfig) -> Iterator[np.ndarray]:
    frames = resample_fps(reader, reader.fps, config.fps)
    return itertools.islice(frames, config.max_frames)


def prepare_clip(job: VideoJob, config: PrepareConfig, clips_dir: Path) -> dict:
    """Turn one video into ``clips_dir/<clip>/`` and return its manifest entry.

    Raises:
        ClipSkipped: unreadable video, no face, or fewer than ``config.min_frames`` frames with a face.
    """
    # Pass 1: landmarks on the full frames, only to place one crop for the whole clip.
    try:
        with VideoReader(job.source) as reader:
            landmarks, present = track_frames(
                _resampled_frames(reader, config), smooth=False, fps=config.fps, name=job.source
            )
    except NoFaceError:
        raise ClipSkipped("no face found") from None
    except InputError as error:
        raise ClipSkipped(f"unreadable video: {error.problem}") from None
    _require_faces(present, config.min_frames, "frames")
    box = clip_box(landmarks, present, config.expand, config.shift)

    # Pass 2: cut every frame to that box and measure the landmarks again on the crop.
    frame_count = len(present)
    landmark_size = max(config.size, MIN_LANDMARK_SIZE)
    tmp_dir, final_dir = clips_dir / f"{TMP_PREFIX}{job.clip}", clips_dir / job.clip
    shutil.rmtree(tmp_dir, ignore_errors=True)  # left over from an interrupted run
    tmp_dir.mkdir(parents=True)
    try:
        frames = np.lib.format.open_memmap(
            tmp_dir / "frames.npy", mode="w+", dtype=np.uint8, shape=(frame_count, config.size, config.size, 3)
        )
        crop_landmarks = np.empty((frame_count, NUM_LANDMARKS, 2), dtype=np.float32)
        crop_present = np.zeros(frame_count, dtype=bool)
        scale = config.size / landmark_size
        with VideoReader(job.source) as reader:
            large_crops = (crop(frame, box, landmark_size) for frame in _resampled_frames(reader, config))
            tracked = iter_tracked(large_crops, smooth=False, fps=config.fps, name=job.source)
            count = 0
            for index, (large, points, found) in enumerate(tracked):
                if index >= frame_count:
                    raise RuntimeError(f"{job.source}: second decoding gave more than {frame_count} frames")
                # The landmark crop and the stored frame cover the same box, so scaling maps points exactly.
                frames[index] = large if scale == 1 else _shrink(large, config.size)
                crop_landmarks[index] = points * scale
                crop_present[index] = found
                count = index + 1
        if count != frame_count:
            raise RuntimeError(f"{job.source}: second decoding gave {count} frames, the first {frame_count}")
        frames.flush()
        del frames
        _require_faces(crop_present, config.min_frames, "cropped frames")
        np.save(tmp_dir / "landmarks.npy", crop_landmarks)
        np.save(tmp_dir / "present.npy", crop_present)
        if final_dir.exists():  # finished by a run that stopped before writing its manifest line
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
    except NoFaceError:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise ClipSkipped("no face found in the cropped frames") from None
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return {
        "clip": job.clip,
        "identity": job.identity,
        "source_video": str(job.source),
        "frames": frame_count,
        "fps": float(config.fps),
        "size": config.size,
        "crop": box.to_list(),
    }


def _shrink(image: np.ndarray, size: int) -> np.ndarray:
    """Area-average a square crop down to ``size`` x ``size``; edges map onto edges, so points scale linearly."""
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def _require_faces(present: np.ndarray, min_frames: int, what: str) -> None:
    found = int(present.sum())
    if found < min_frames:
        raise ClipSkipped(f"only {found} of {len(present)} {what} have a face (need {min_frames})")


def _run_job(job: VideoJob, config: PrepareConfig, clips_dir: Path) -> tuple[VideoJob, dict | None, str | None]:
    """Worker entry point: (job, manifest entry, None) or (job, None, skip reason)."""
    try:
        return job, prepare_clip(job, config, clips_dir), None
    except ClipSkipped as skipped:
        return job, None, skipped.reason


# --- the whole dataset --------------------------------------------------------------------------------------


def _append_jsonl(path: Path, entry: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())  # the line marks the clip finished; it must survive a crash right after


def _drop_torn_line(path: Path) -> None:
    """Cut a ``.jsonl`` file back to its last complete line (each line is written whole with its newline, so a
    file not ending in one was interrupted while appending)."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):
        logger.warning("%s: dropping an incomplete last line left by an interrupted run", path)
        write_text_atomic(path, text[: text.rfind("\n") + 1])


def _check_settings(output_dir: Path, input_dir: Path, config: PrepareConfig) -> None:
    """Write ``prepare.json`` on the first run; on a rerun, insist on the same input folder and settings."""
    settings = {"input_dir": str(input_dir), **dataclasses.asdict(config)}
    path = output_dir / SETTINGS
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = {key: (previous.get(key), value) for key, value in settings.items() if previous.get(key) != value}
        if changed:
            details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise InputError(output_dir, f"dataset was prepared with other settings ({details}); use a new folder")
        return
    write_text_atomic(path, json.dumps(settings, indent=2) + "\n")


def prepare_dataset(
    input_dir: Path,
    output_dir: Path,
    config: PrepareConfig = PrepareConfig(),
    workers: int = 1,
    identities_file: Path | None = None,
    manifest: Path | None = None,
) -> PrepareSummary:
    """Prepare every video under ``input_dir`` into ``output_dir`` (layout in the module doc and docs/contracts.md).

    Clips already in ``manifest.jsonl`` and videos already in ``skipped.jsonl`` are not redone. With
    ``workers > 1`` clips are processed in that many processes (each with its own MediaPipe graph).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    input_dir = input_dir.resolve()
    jobs = plan_jobs(input_dir, identities_file, manifest)
    output_dir.mkdir(parents=True, exist_ok=True)
    clips_dir = output_dir / CLIPS
    clips_dir.mkdir(exist_ok=True)
    _check_settings(output_dir, input_dir, config)

    for name in (MANIFEST, SKIPPED):
        _drop_torn_line(output_dir / name)
    done = {entry["clip"] for entry in read_jsonl(output_dir / MANIFEST)}
    skipped_before = {entry["source_video"] for entry in read_jsonl(output_dir / SKIPPED)}
    todo = [job for job in jobs if job.clip not in done and str(job.source) not in skipped_before]
    already_done = sum(job.clip in done for job in jobs)
    already_skipped = len(jobs) - len(todo) - already_done
    logger.info(
        "%d videos under %s: %d to prepare, %d already prepared, %d skipped before",
        len(jobs), input_dir, len(todo), already_done, already_skipped,
    )

    prepared = skipped = 0
    progress = tqdm(total=len(todo), unit="clip", desc="prepare")

    def record(job: VideoJob, entry: dict | None, reason: str | None) -> None:
        nonlocal prepared, skipped
        if entry is not None:
            _append_jsonl(output_dir / MANIFEST, entry)
            prepared += 1
            logger.debug("%s: %d frames, identity %r", job.clip, entry["frames"], job.identity)
        else:
            _append_jsonl(output_dir / SKIPPED, {"source_video": str(job.source), "reason": reason})
            skipped += 1
            logger.warning("skipped %s: %s", job.source, reason)
        progress.set_postfix(prepared=prepared, skipped=skipped)
        progress.update()

    try:
        if workers == 1:
            for job in todo:
                record(*_run_job(job, config, clips_dir))
        else:
            # "spawn": each worker starts clean, without MediaPipe/thread state copied from this process.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = [pool.submit(_run_job, job, config, clips_dir) for job in todo]
                try:
                    for future in as_completed(futures):
                        record(*future.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        progress.close()
    return PrepareSummary(prepared, skipped, already_done, already_skipped)
