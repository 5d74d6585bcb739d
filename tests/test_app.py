"""The web app's work, called directly (no server, no browser): upload checks, animation jobs, edits, the run
folder, the page's wiring. The browser test is tests/test_app_browser.py."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from metaportrait.app.jobs import (
    BUNDLED_MODEL,
    DRIVING,
    PERSON_VIDEOS,
    PORTRAIT,
    AnimateJob,
    AnimateOptions,
    Cancelled,
    Limits,
    Models,
    PersonalizeJob,
    PersonalizeResult,
    RunFolder,
    check_driving,
    edit,
    error_problem,
    load_portrait,
    portrait_of,
    training_seconds,
)
from metaportrait.errors import InputError
from metaportrait.io.image import write_image
from metaportrait.io.video import VideoWriter, read_video
from metaportrait.motion import Controls
from metaportrait.pipeline import Animator

CLIP_FRAMES = 6
CLIP_FPS = 25.0


@pytest.fixture(scope="module")
def animator() -> Animator:
    return Animator.from_pretrained()


@pytest.fixture(scope="module")
def portrait():
    return portrait_of(data.astronaut())


@pytest.fixture
def folder(tmp_path):
    with RunFolder(tmp_path) as run_folder:
        yield run_folder


def write_clip(path, frames: int = CLIP_FRAMES, fps: float = CLIP_FPS):
    """A driving clip: the astronaut at 256², drifting a few pixels right and down, back to the start every 20
    frames (so that a long clip keeps her in the picture)."""
    image = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    with VideoWriter(path, fps) as writer:
        for index in range(frames):
            step = index % 20
            shift = np.float32([[1, 0, 2 * step], [0, 1, step]])
            writer.write(cv2.warpAffine(image, shift, (256, 256), borderMode=cv2.BORDER_REFLECT))
    return path


# --- uploads ---------------------------------------------------------------------------------------------------

def test_portrait_upload_is_read_by_content(tmp_path):
    path = tmp_path / "upload with a strange name.webp"  # the suffix lies: the bytes are a PNG
    write_image(tmp_path / "real.png", data.astronaut())
    (tmp_path / "real.png").rename(path)
    portrait = load_portrait(path, Limits())
    assert portrait.image.shape == (512, 512, 3)
    assert portrait.landmarks.shape == (478, 2)


@pytest.mark.parametrize("case, problem", [
    ("nothing", "nothing uploaded"),
    ("text renamed .jpg", "not an image"),
    ("too large", "this app takes at most"),
    ("too many pixels", "4097 x 8 pixels; this app takes at most 4096"),
    ("no face", "no face found"),
])  # fmt: skip
def test_bad_portrait_uploads_name_the_portrait_and_the_problem(tmp_path, case, problem):
    limits = Limits()
    path = None
    if case == "text renamed .jpg":
        path = tmp_path / "photo.jpg"
        path.write_text("this is not an image\n")
    elif case == "too large":
        path = tmp_path / "photo.png"
        write_image(path, data.astronaut())
        limits = Limits(max_upload_bytes=path.stat().st_size - 1)
    elif case == "too many pixels":
        path = tmp_path / "photo.png"
        write_image(path, np.zeros((8, 4097, 3), np.uint8))
    elif case == "no face":
        path = tmp_path / "photo.png"
        write_image(path, np.full((128, 128, 3), 128, np.uint8))
    with pytest.raises(InputError) as caught:
        load_portrait(path, limits)
    assert caught.value.path == PORTRAIT
    assert problem in caught.value.problem
    assert str(tmp_path) not in caught.value.problem  # the temporary path means nothing to the user


@pytest.mark.parametrize("case, problem", [
    ("text renamed .mp4", "not a readable video"),
    ("still image", "still image"),
    ("too long", "s long; this app takes at most 0.1 s"),
])  # fmt: skip
def test_bad_driving_uploads_name_the_video_and_the_problem(tmp_path, case, problem):
    limits = Limits()
    if case == "text renamed .mp4":
        path = tmp_path / "talk.mp4"
        path.write_text("this is not a video\n")
    elif case == "still image":
        path = tmp_path / "talk.png"
        write_image(path, data.astronaut())
    else:
        path = write_clip(tmp_path / "talk.mp4")  # 0.24 s
        limits = Limits(max_seconds=0.1)
    with pytest.raises(InputError) as caught:
        check_driving(path, limits)
    assert caught.value.path == DRIVING
    assert problem in caught.value.problem


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        Limits(max_upload_bytes=0)
    with pytest.raises(ValueError):
        Limits(max_seconds=0.0)


# --- animate ---------------------------------------------------------------------------------------------------

def test_animate_with_an_uploaded_clip_writes_the_result_and_the_side_by_side(animator, portrait, folder, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4")
    job = AnimateJob(animator, portrait, clip, AnimateOptions(), folder, Limits())
    assert job.total == CLIP_FRAMES
    read = []
    assert list(job.run(read.append)) == list(range(1, CLIP_FRAMES + 1))
    assert read == list(range(1, CLIP_FRAMES + 1))  # every driving frame read was reported
    result = job.result
    assert result.frames == CLIP_FRAMES and result.lost_frames == 0
    # Result files are named by the run's counter, in the run folder, never after an upload.
    assert result.video.parent == folder.results and re.fullmatch(r"\d{4}-result\.mp4", result.video.name)
    video, fps = read_video(result.video)
    side, _ = read_video(result.side_by_side)
    assert fps == CLIP_FPS
    assert video.shape == (CLIP_FRAMES, 512, 512, 3)  # pasted back into the whole portrait
    assert side.shape == (CLIP_FRAMES, 256, 512, 3)  # [driving | result], both scaled to 256 rows
    # The face follows the driver: the result changes over the clip, and only around the face.
    change = np.abs(video[-1].astype(int) - video[0].astype(int)).sum(axis=-1)
    assert change.max() > 30
    assert change[:, :100].max() < 30  # the left edge of the photo (flag, background) stays


def test_animate_options_reach_the_animator(animator, portrait, folder, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", frames=2)
    options = AnimateOptions(motion="absolute", paste_back=False, controls=Controls(yaw=10.0))
    job = AnimateJob(animator, portrait, clip, options, folder, Limits())
    list(job.run())
    video, _ = read_video(job.result.video)
    assert video.shape == (2, 256, 256, 3)  # without paste-back: the model's face crop


def test_scripted_motion_needs_no_upload_and_respects_the_length_limit(animator, portrait, folder):
    job = AnimateJob(animator, portrait, None, AnimateOptions(), folder, Limits(max_seconds=0.6))
    assert job.total == 15  # 0.6 s at 25 frames/s, not the script's 4 s
    assert list(job.run())[-1] == 15
    video, _ = read_video(job.result.video)
    side, _ = read_video(job.result.side_by_side)
    assert video.shape == (15, 512, 512, 3) and side.shape == (15, 256, 512, 3)
    assert np.abs(video[-1].astype(int) - video[0].astype(int)).max() > 30  # the script moves the face


def test_no_face_in_the_driving_video_is_an_input_error(animator, portrait, folder, tmp_path):
    clip = tmp_path / "blank.mp4"
    with VideoWriter(clip, CLIP_FPS) as writer:
        for _ in range(3):
            writer.write(np.full((64, 64, 3), 90, np.uint8))
    job = AnimateJob(animator, portrait, clip, AnimateOptions(), folder, Limits())
    with pytest.raises(InputError) as caught:
        list(job.run())
    assert caught.value.path == DRIVING and "no face found" in caught.value.problem
    assert list(folder.results.iterdir()) == []


def test_a_closed_job_leaves_no_file(animator, portrait, folder):
    job = AnimateJob(animator, portrait, None, AnimateOptions(), folder, Limits(max_seconds=0.4))
    frames = job.run()
    assert next(frames) == 1
    frames.close()  # what Gradio's cancel does: the job is not iterated any further
    assert job.result is None
    assert list(folder.results.iterdir()) == []


def test_cancel_stops_a_job_while_it_writes(animator, portrait, folder):
    job = AnimateJob(animator, portrait, None, AnimateOptions(), folder, Limits(max_seconds=0.4))
    frames = job.run()
    assert next(frames) == 1
    job.cancel()
    with pytest.raises(Cancelled):
        next(frames)
    assert job.result is None
    assert list(folder.results.iterdir()) == []


def test_cancel_stops_a_job_while_it_tracks_the_driving_video(animator, portrait, folder, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4")
    job = AnimateJob(animator, portrait, clip, AnimateOptions(), folder, Limits())
    read = []

    def on_read(count: int) -> None:
        read.append(count)
        if count == 2:
            job.cancel()

    with pytest.raises(Cancelled):
        list(job.run(on_read))
    assert read == [1, 2]  # stopped at the next frame read, before the clip was tracked to its end
    assert list(folder.results.iterdir()) == []


def test_run_folder_numbers_jobs_and_is_removed(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.path.parent == tmp_path and folder.uploads.is_dir()
    first, second = folder.new_job(), folder.new_job()
    assert folder.result_path(first, "result.mp4").name == "0001-result.mp4"
    assert second == first + 1
    (folder.uploads / "x.png").write_bytes(b"x")
    folder.close()
    assert not folder.path.exists()
    folder.close()  # twice is fine


# --- edit ------------------------------------------------------------------------------------------------------

def test_edit_changes_the_face_only_as_asked(animator, portrait):
    unchanged = edit(animator, portrait, Controls())
    opened = edit(animator, portrait, Controls(mouth=0.6))
    assert unchanged.shape == opened.shape == (512, 512, 3)
    # Mouth region of the astronaut (x 180-260, y 150-230 in the photo) changes; the far corner does not.
    mouth = np.abs(opened[150:230, 180:260].astype(int) - unchanged[150:230, 180:260].astype(int))
    assert mouth.max() > 40
    assert np.array_equal(opened[400:, 400:], unchanged[400:, 400:])
    assert edit(animator, portrait, Controls(yaw=15.0), paste_back=False).shape == (256, 256, 3)


# --- the page --------------------------------------------------------------------------------------------------

def test_page_runs_every_model_event_in_one_queue_slot(animator, portrait, folder, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder.uploads))  # as `metaportrait app` does: nothing in /tmp/gradio
    from metaportrait.app.ui import MODEL_QUEUE, AppContext, build_app, error_message

    example_path = folder.uploads / "astronaut.png"
    write_image(example_path, data.astronaut())
    blocks = build_app(AppContext(animator, folder, Limits(), portrait, example_path, Models(animator)))
    model_events = [fn for fn in blocks.fns.values() if fn.name in ("run", "render")]
    assert len([fn for fn in model_events if fn.name == "run"]) == 2  # Animate and Personalize
    for fn in model_events:
        assert fn.concurrency_id == MODEL_QUEUE and fn.concurrency_limit == 1
    assert error_message(InputError(PORTRAIT, "no face found")) == "⚠ **portrait**: no face found"


def test_cli_rejects_bad_limits():
    from metaportrait.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["app", "--max-upload-mb", "-1"])
    assert caught.value.code == 2


def test_cli_says_when_the_port_is_taken(capsys):
    import socket

    from metaportrait.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", "--port", str(port)]) == 2
    assert f"error: cannot listen on 127.0.0.1:{port} (Address already in use)" in capsys.readouterr().err


def test_cli_says_when_gradio_is_missing(capsys, monkeypatch):
    import importlib.util

    from metaportrait.cli import main

    find_spec = importlib.util.find_spec

    def without_gradio(name, *rest):
        return None if name == "gradio" else find_spec(name, *rest)

    monkeypatch.setattr(importlib.util, "find_spec", without_gradio)
    assert main(["app"]) == 2
    assert "needs Gradio: pip install 'metaportrait[app]'" in capsys.readouterr().err


# --- personalize -----------------------------------------------------------------------------------------------

def test_models_offer_the_bundled_model_then_added_ones(animator, tmp_path):
    models = Models(animator)
    assert models.names() == [BUNDLED_MODEL] and models.animator(BUNDLED_MODEL) is animator
    with pytest.raises(InputError, match="no model named"):
        models.animator("personalised #1")
    models.add("personalised #1", tmp_path / "missing")
    assert models.names() == [BUNDLED_MODEL, "personalised #1"]
    with pytest.raises(ValueError):
        models.add("personalised #1", tmp_path)
    with pytest.raises(InputError, match="checkpoint folder not found"):
        models.animator("personalised #1")  # loaded when first asked for


def test_personalize_progress_and_errors_are_read_from_its_output():
    log = ("front-end: 2.0 s\npersonalize: 3step [00:10, loss=0.120, heldout_psnr=nan, s=4]"
           "\rpersonalize: 9step [00:21, loss=0.090, heldout_psnr=24.10, s=15]")  # fmt: skip
    assert training_seconds("front-end: 2.0 s\n") is None
    assert training_seconds(log) == 15.0
    upload = Path("/tmp/run/uploads/abc/me.mp4")
    assert error_problem(f"error: {upload}: no face found in any of 40 frames\n", [upload]) == (
        "no face found in any of 40 frames")
    crash = "Traceback ...\nRuntimeError: boom\n"
    assert error_problem(crash, [upload]) == "personalisation failed (RuntimeError: boom)"


def test_personalize_checks_its_uploads_first(folder, tmp_path):
    with pytest.raises(InputError) as caught:
        PersonalizeJob([], 10.0, folder, Limits())
    assert caught.value.path == PERSON_VIDEOS and caught.value.problem == "nothing uploaded"
    fake = tmp_path / "me.mp4"
    fake.write_text("not a video\n")
    with pytest.raises(InputError, match="not a readable video"):
        PersonalizeJob([fake], 10.0, folder, Limits())


def test_personalize_result_table():
    report = {"methods": {"one-shot": {"psnr": 24.123456, "face_l1": 0.05},
                          "personalised": {"psnr": 25.5, "face_l1": 0.04}}}  # fmt: skip
    assert PersonalizeResult(Path("m"), report).table().splitlines() == [
        "| method | PSNR ↑ | face L1 ↓ |", "|---|---|---|", "| one-shot | 24.12 | 0.0500 |",
        "| personalised | **25.50** | **0.0400** |"]
    assert PersonalizeResult(Path("m"), report).caution() == ""
    report["worse_than_oneshot"] = ["ST-LPIPS", "identity distance"]
    assert "worse than the model it started from in ST-LPIPS, identity distance" in \
        PersonalizeResult(Path("m"), report).caution()


@pytest.mark.slow
def test_personalize_job_makes_a_model_animate_can_use(animator, portrait, folder, tmp_path):
    """The real `metaportrait personalize` in a child process, on a 14 s clip, with a 5 s budget."""
    clip = write_clip(tmp_path / "me.mp4", frames=14 * 25)
    job = PersonalizeJob([clip], 5.0, folder, Limits())
    progress = list(job.run())
    assert progress and job.result is not None
    assert (job.result.model / "model.safetensors").is_file() and job.result.model.parent.parent == folder.path
    assert set(job.result.report["methods"]) == {"one-shot", "personalised", "real"}  # real: the flicker reference
    assert "| personalised |" in job.result.table()
    models = Models(animator)
    models.add("personalised #1", job.result.model)
    animate = AnimateJob(models.animator("personalised #1"), portrait, None, AnimateOptions(), folder,
                         Limits(max_seconds=0.12))  # fmt: skip
    assert list(animate.run()) == [1, 2, 3]


@pytest.mark.slow
def test_personalize_job_can_be_cancelled(folder, tmp_path):
    clip = write_clip(tmp_path / "me.mp4", frames=14 * 25)
    job = PersonalizeJob([clip], 60.0, folder, Limits())
    steps = job.run(poll_seconds=0.2)
    next(steps)
    job.cancel()
    with pytest.raises(Cancelled):
        list(steps)
    assert job.result is None and not (job.output / "model.safetensors").exists()


def test_cancel_reaches_a_queued_click_and_a_running_job_but_not_a_later_click():
    import types

    from metaportrait.app.ui import TabJobs

    def fake_job():
        job = types.SimpleNamespace(cancelled=False)
        job.cancel = lambda: setattr(job, "cancelled", True)
        return job

    tab, other = types.SimpleNamespace(session_hash="a"), types.SimpleNamespace(session_hash="b")
    jobs = TabJobs()
    # A click still in the queue when Cancel comes: it gives up when it starts; the other tab's does not.
    jobs.submit(tab)
    jobs.submit(other)
    assert jobs.stop(tab) == "Cancelled."
    assert jobs.cancelled_before_start(tab) and not jobs.cancelled_before_start(other)
    with pytest.raises(Cancelled):  # what the tab's event does first
        jobs.check_not_cancelled(tab)
    jobs.check_not_cancelled(other)
    jobs.finish(tab)
    # A later click runs; Cancel while its job is being set up stops the job as it registers.
    jobs.submit(tab)
    assert not jobs.cancelled_before_start(tab)
    jobs.stop(tab)
    early = fake_job()
    jobs.start(tab, early)
    assert early.cancelled
    jobs.finish(tab)
    # Cancel while the job runs stops it; the job's own event reports it.
    jobs.submit(tab)
    job = fake_job()
    jobs.start(tab, job)
    assert not job.cancelled
    assert jobs.stop(tab) != "Cancelled." and job.cancelled  # gr.skip(): the job's event says it
    jobs.finish(tab)
    # Cancel with nothing queued or running changes nothing, and does not reach the next click.
    assert jobs.stop(tab) != "Cancelled."
    jobs.submit(tab)
    assert not jobs.cancelled_before_start(tab)
