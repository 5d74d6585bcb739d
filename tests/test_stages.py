"""Overlapping stages (metaportrait.stages) and the animator's overlapped path against its sequential one."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from metaportrait.config import PRESETS
from metaportrait.errors import InputError
from metaportrait.models.generator import Generator
from metaportrait.pipeline import Animator
from metaportrait.stages import WriteBehind, prefetch

TINY = PRESETS["tiny"]


def _stage_threads() -> list[threading.Thread]:
    """Threads of `prefetch` / `WriteBehind` still alive (the names given here and in the pipeline)."""
    names = ("metaportrait-stage", "metaportrait-writer", "metaportrait-decode", "metaportrait-landmarks",
             "metaportrait-encode", "metaportrait-test")
    return [t for t in threading.enumerate() if t.name.startswith(names)]


# --- prefetch and WriteBehind -------------------------------------------------------------------------------


def test_prefetch_keeps_the_order_and_reads_a_bounded_amount_ahead():
    produced = []

    def numbers():
        for n in range(100):
            produced.append(n)
            yield n

    items = prefetch(numbers(), depth=3)
    assert next(items) == 0
    time.sleep(0.2)
    assert len(produced) <= 1 + 3 + 1  # the one taken, a full queue, one waiting to be put
    assert list(items) == list(range(1, 100))
    assert _stage_threads() == []


def test_prefetch_raises_the_producers_error_after_its_items():
    error = InputError("clip.mp4", "ends early")

    def failing():
        yield 1
        yield 2
        raise error

    items = prefetch(failing(), depth=1)
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(InputError) as raised:
        next(items)
    assert raised.value is error and _stage_threads() == []


def test_closing_a_chain_early_stops_every_stage_and_closes_the_source():
    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                n += 1
                yield n
        finally:
            closed.set()

    cancel = threading.Event()
    first = prefetch(endless(), 2, cancel, "metaportrait-test-a")
    second = prefetch((n * 10 for n in first), 2, cancel, "metaportrait-test-b")
    # As in the pipeline, only the chain holds the first stage: closing the second then finalises (and joins) it.
    # Kept here, it would only stop at its next poll of `cancel`, after close() returned (a race under load).
    del first
    assert next(second) == 10
    second.close()
    assert closed.is_set() and _stage_threads() == []


def test_write_behind_writes_everything_in_order_and_raises_the_writers_error():
    written = []
    with WriteBehind(written.append, depth=2) as behind:
        for n in range(50):
            behind.put(n)
    assert written == list(range(50))

    error = OSError(28, "No space left on device")

    def write(n):
        if n == 3:
            raise error
        written.append(n)

    written.clear()
    with pytest.raises(OSError) as raised:
        with WriteBehind(write, depth=2) as behind:
            for n in range(1000):
                behind.put(n)
    assert raised.value is error and written == [0, 1, 2] and _stage_threads() == []


# --- the animator: overlapped and sequential give the same frames -------------------------------------------


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    from metaportrait.data.landmarks import landmarks_of_image

    image = data.astronaut()
    return image, landmarks_of_image(image, "astronaut")


@pytest.fixture(scope="module")
def clip(astronaut):
    from test_pipeline import driving_frames

    frames = driving_frames(astronaut[0], 11)
    frames[5] = np.full_like(frames[5], 128)  # one frame without a face
    return frames


def _animators() -> tuple[Animator, Animator]:
    torch.manual_seed(0)
    generator = Generator(TINY)
    return (Animator(generator, TINY, batch_size=3, overlap=False),
            Animator(generator, TINY, batch_size=3, overlap=True, queue_frames=2))


@pytest.mark.parametrize("options", [{}, {"reference": "running"}, {"motion": "absolute"},
                                     {"reference": 2, "paste_back": False}])
def test_overlapped_stages_give_the_sequential_frames_bit_for_bit(options, astronaut, clip):
    image, points = astronaut
    sequential, overlapped = _animators()
    expected = list(sequential(image, iter(clip), driving_fps=10, source_landmarks=points, **options))
    got = list(overlapped(image, iter(clip), driving_fps=10, source_landmarks=points, **options))
    assert len(got) == len(expected) == len(clip)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    for field in ("frames", "lost_frames", "reference_frame", "reference_changes"):
        assert getattr(overlapped.stats, field) == getattr(sequential.stats, field), field
    assert set(overlapped.stats.stage_seconds) == set(sequential.stats.stage_seconds)
    assert _stage_threads() == []


def test_overlapped_running_reference_streams_with_bounded_read_ahead(astronaut, clip):
    image, points = astronaut
    _, overlapped = _animators()
    consumed = []

    def lazily():
        for frame in clip * 3:
            consumed.append(frame)
            yield frame

    frames = overlapped(image, lazily(), reference="running", driving_fps=10, source_landmarks=points)
    next(frames)
    time.sleep(0.5)  # let the background stages run as far ahead as they may
    assert len(consumed) < 3 * len(clip)  # the first output came before the clip was read, and reading is bounded
    frames.close()  # stopping early ends every stage
    assert _stage_threads() == []


def test_an_error_in_a_background_stage_is_raised_unchanged(astronaut, clip):
    image, points = astronaut
    error = InputError("driving.mp4", "the file ends early (damaged after frame 4)")

    def damaged():
        yield from clip[:4]
        raise error

    for animator in _animators():
        for reference in ("auto", "running"):
            with pytest.raises(InputError) as raised:
                list(animator(image, damaged(), reference=reference, driving_fps=10, source_landmarks=points))
            assert raised.value is error
    assert _stage_threads() == []


def test_cli_animate_with_and_without_overlap_writes_the_same_video(tmp_path, astronaut, clip):
    from test_pipeline import write_clip

    from metaportrait.cli import main
    from metaportrait.io.checkpoint import save_model
    from metaportrait.io.image import write_image
    from metaportrait.io.video import read_video

    torch.manual_seed(0)
    model = save_model(tmp_path / "model", Generator(TINY), TINY)
    write_image(tmp_path / "portrait.png", astronaut[0])
    write_clip(tmp_path / "driving.mp4", clip, fps=10, audio=False)
    videos = []
    for flags in ([], ["--no-overlap", "--threads", "1"]):
        out = tmp_path / f"out{len(videos)}.mp4"
        assert main(["animate", "-s", str(tmp_path / "portrait.png"), "-d", str(tmp_path / "driving.mp4"),
                     "-o", str(out), "--checkpoint", str(model), *flags]) == 0
        videos.append(read_video(out)[0])
    assert videos[0].shape == videos[1].shape and np.array_equal(videos[0], videos[1])


# --- landmarks of large frames ------------------------------------------------------------------------------


def test_large_frames_are_tracked_on_a_crop_close_to_full_resolution(astronaut):
    import cv2

    from test_pipeline import driving_frames

    from metaportrait.data.face import CropBox
    from metaportrait.data.landmarks import iter_tracked

    frames = [cv2.resize(f, (1200, 1200), interpolation=cv2.INTER_CUBIC)
              for f in driving_frames(astronaut[0], 6, size=256)]
    full = [p for _, p, _ in iter_tracked(frames, smooth=False)]
    large = [p for _, p, _ in iter_tracked(frames, smooth=False, max_side=640)]
    for a, b in zip(full, large):
        at_256 = np.linalg.norm(a - b, axis=1).mean() * 256 / CropBox.from_landmarks(a).side
        assert at_256 < 1.5, at_256
