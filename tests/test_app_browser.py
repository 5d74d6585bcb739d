"""End to end in a real browser: `metaportrait app` on a free localhost port, driven by headless Chromium.

Needs Debian's ``chromium`` (``apt-get install chromium``) and Playwright's Python package (the ``browser``
extra); Playwright is pointed at the system's Chromium and never downloads a browser. Without either, the tests
are skipped with the reason. With ``METAPORTRAIT_APP_SCREENSHOT=docs/images/app.png`` the first test also saves
its screenshot of the page with a finished result there (the README's picture).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from metaportrait.io.image import write_image
from metaportrait.io.video import VideoWriter, read_video

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("METAPORTRAIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a quiet, offline, throw-away Chromium (the profile folder is a fresh temporary one per run).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CLIP_FRAMES = 10
CLIP_FPS = 25.0
START_SECONDS = 120  # the app loads the model and Gradio before it listens
JOB_SECONDS = 300


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    """A Playwright browser context on the system's Chromium, or a skip that says what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        pytest.skip(f"Playwright is not installed ({error}); pip install -e '.[browser]'")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set METAPORTRAIT_CHROMIUM)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 1000}, accept_downloads=True,
        )
        yield context
        context.close()


@dataclass(frozen=True)
class App:
    url: str
    folder: Path  # the app's run folder


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """`metaportrait app` on a free port (an `App`); stopped with SIGTERM afterwards, and its run folder must be
    gone then."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    command = [sys.executable, "-c", "import sys; from metaportrait.cli import main; sys.exit(main())", "app",
               "--port", str(port), "--max-seconds", "20"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer within {START_SECONDS} s:\n{log_path.read_text()}")
            time.sleep(1)
        folder = re.search(r"uploads and results of this run: (\S+)", log_path.read_text())
        assert folder is not None, log_path.read_text()
        yield App(url, Path(folder.group(1)))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert "Traceback" not in log, log
    assert not Path(folder.group(1)).exists(), "the run folder outlived the app"


def write_inputs(folder: Path, frames: int = CLIP_FRAMES) -> tuple[Path, Path]:
    """The astronaut as a JPEG, and a driving clip of her drifting right and down (and back, in long clips)."""
    portrait = folder / "astronaut.jpg"
    write_image(portrait, data.astronaut())
    clip = folder / "driving.mp4"
    small = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    with VideoWriter(clip, CLIP_FPS) as writer:
        for index in range(frames):
            step = 10 - abs(index % 20 - 10)  # 0, 1, ..., 10, 9, ...: within the frame however long the clip
            shift = np.float32([[1, 0, 2 * step], [0, 1, step]])
            writer.write(cv2.warpAffine(small, shift, (256, 256), borderMode=cv2.BORDER_REFLECT))
    return portrait, clip


def open_page(context, url: str):
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#animate-button", timeout=60_000)
    return page


def upload_portrait(page, path: Path) -> None:
    """Replace the page's example portrait with ``path``, as a person would: clear the box, then upload."""
    box = page.locator("#animate-portrait-upload")
    box.get_by_role("button", name="Clear").click()
    box.locator("input[type=file]").set_input_files(str(path))


def test_animate_in_the_browser_returns_a_playable_video(browser_context, app, tmp_path):
    portrait, clip = write_inputs(tmp_path)
    page = open_page(browser_context, app.url)
    status = page.locator("#animate-status")

    upload_portrait(page, portrait)
    status.get_by_text("Portrait ready.").wait_for(timeout=60_000)
    page.locator("#animate-driving input[type=file]").set_input_files(str(clip))
    status.get_by_text("Driving video ready").wait_for(timeout=60_000)
    assert page.locator("#animate-source input[type=radio]:checked").input_value() == "uploaded driving video"

    page.locator("#animate-button").click()
    status.get_by_text("Done:").wait_for(timeout=JOB_SECONDS * 1000)
    assert f"{CLIP_FRAMES} frames" in status.inner_text()

    # Playable in the page: the browser's own decoder loads the result's metadata.
    video = page.locator("#animate-result video")
    video.wait_for(timeout=30_000)
    page.wait_for_function("document.querySelector('#animate-result video').readyState >= 1", timeout=30_000)
    duration = video.evaluate("element => element.duration")
    assert duration == pytest.approx(CLIP_FRAMES / CLIP_FPS, abs=0.1)

    # Downloadable: both files, fetched as the browser would, decode to the expected frames.
    links = page.locator("#animate-files a[href]")
    assert links.count() == 2
    shapes = {}
    for index in range(2):
        href = links.nth(index).get_attribute("href")
        response = page.request.get(href if href.startswith("http") else app.url.rstrip("/") + href)
        assert response.ok
        name = "side_by_side" if "side_by_side" in href else "result"
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(response.body())
        frames, fps = read_video(path)
        assert fps == CLIP_FPS
        shapes[name] = frames.shape
    assert shapes == {"result": (CLIP_FRAMES, 512, 512, 3), "side_by_side": (CLIP_FRAMES, 256, 512, 3)}

    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    if target := os.environ.get("METAPORTRAIT_APP_SCREENSHOT"):
        shutil.copyfile(tmp_path / "app.png", target)
    page.close()


def test_a_text_file_named_jpg_gets_a_message_not_a_traceback(browser_context, app, tmp_path):
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is a text file, not a photo\n")
    page = open_page(browser_context, app.url)
    upload_portrait(page, fake)
    message = page.locator("#animate-status").get_by_text("portrait")
    message.wait_for(timeout=60_000)
    assert "portrait: not an image file" in page.locator("#animate-status").inner_text()

    # Animate without a usable portrait says so too.
    page.locator("#animate-button").click()
    page.locator("#animate-status").get_by_text("upload a portrait").wait_for(timeout=60_000)
    assert "Traceback" not in page.content()
    page.close()


def test_edit_preview_follows_the_sliders(browser_context, app, tmp_path):
    page = open_page(browser_context, app.url)
    page.get_by_role("tab", name="Edit").click()
    preview = page.locator("#edit-preview img")
    preview.wait_for(timeout=60_000)
    before = preview.get_attribute("src")

    mouth = page.locator("#edit-mouth input[type=number]")
    mouth.fill("0.7")
    mouth.press("Enter")
    page.wait_for_function(f"document.querySelector('#edit-preview img').src !== {before!r}", timeout=60_000)
    after = preview.get_attribute("src")

    images = []
    for source in (before, after):
        response = page.request.get(source)
        assert response.ok
        images.append(cv2.imdecode(np.frombuffer(response.body(), np.uint8), cv2.IMREAD_COLOR))
    assert images[0].shape == images[1].shape == (512, 512, 3)
    # The astronaut's mouth (x 180-260, y 150-230) opened; the far corner of the photo did not change.
    assert np.abs(images[1][150:230, 180:260].astype(int) - images[0][150:230, 180:260].astype(int)).max() > 40
    assert np.abs(images[1][400:, 400:].astype(int) - images[0][400:, 400:].astype(int)).max() <= 2
    page.close()


def test_cancel_stops_the_job_and_the_next_one_runs(browser_context, app, tmp_path):
    page = open_page(browser_context, app.url)  # first visit: the astronaut and the built-in motion (4 s)
    status = page.locator("#animate-status")
    # A 15-s driving clip, so that the job is still running when Cancel arrives (the 4-s built-in motion can end
    # first on a fast machine).
    _, clip = write_inputs(tmp_path, frames=int(15 * CLIP_FPS))
    page.locator("#animate-driving input[type=file]").set_input_files(str(clip))
    status.get_by_text("Driving video ready").wait_for(timeout=60_000)
    before = set(os.listdir(app.folder / "results"))
    page.locator("#animate-button").click()
    status.get_by_text("Animating").wait_for(timeout=60_000)
    page.locator("#animate-cancel").click()
    status.get_by_text("Cancelled.").wait_for(timeout=10_000)
    # Longer than a status interval and a batch of frames: by then the job has stopped and removed its
    # unfinished files; a job still running would have them still, or would finish its result.
    time.sleep(3)
    assert set(os.listdir(app.folder / "results")) == before
    assert status.inner_text().strip() == "Cancelled."  # a running job would have put its progress there
    assert page.locator("#animate-files a[href]").count() == 0

    # The queue is free again: the next job (here the scripted motion, 100 frames) runs to the end.
    page.locator("#animate-source").get_by_text("built-in scripted motion").click()
    page.locator("#animate-button").click()
    status.get_by_text("Done:").wait_for(timeout=JOB_SECONDS * 1000)
    assert "100 frames" in status.inner_text()
    page.close()


def test_personalize_tab_reports_a_bad_video(browser_context, app, tmp_path):
    fake = tmp_path / "me.mp4"
    fake.write_text("this is a text file, not a video\n")
    page = open_page(browser_context, app.url)
    page.get_by_role("tab", name="Personalize").click()
    page.locator("#personalize-videos input[type=file]").set_input_files(str(fake))
    page.locator("#personalize-videos").get_by_text("me.mp4").wait_for(timeout=30_000)
    page.locator("#personalize-button").click()
    status = page.locator("#personalize-status")
    status.get_by_text("videos of the person").wait_for(timeout=60_000)
    assert "videos of the person: not a readable video" in status.inner_text()
    page.close()
