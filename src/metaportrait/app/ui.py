"""The Gradio page: one tab per task over one `Animator`; the work itself is in `metaportrait.app.jobs`.

Each tab is one function that lays out its components and wires their events (`animate_tab`, `edit_tab`); a new
tab is one more such function called from `build_app`. Every event that runs the model shares one queue slot
(`MODEL_QUEUE`), so jobs run one at a time. A bad upload shows a line in the tab's status box
(`error_message`), never a traceback. Import this module only after `metaportrait.app.server` has pointed
Gradio's temporary folder into the run folder.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np

from metaportrait.app.jobs import (
    BUNDLED_MODEL,
    DRIVING,
    PORTRAIT,
    AnimateJob,
    AnimateOptions,
    Cancelled,
    Limits,
    Models,
    PersonalizeJob,
    Portrait,
    RunFolder,
    check_driving,
    edit,
    load_portrait,
)
from metaportrait.errors import InputError
from metaportrait.motion import MAX_YAW_PITCH_DEGREES, Controls, mouth_openness
from metaportrait.pipeline import MOTIONS, Animator

MODEL_QUEUE = "model"  # concurrency id of every event that runs the model (limit 1)
BUILT_IN_MOTION = "built-in scripted motion (4 s)"
UPLOADED_MOTION = "uploaded driving video"
MAX_EYES = 2.0  # eye-openness factor slider range [0, MAX_EYES]
MAX_MOUTH = 1.5  # mouth-openness slider range [0, MAX_MOUTH] (inner-lip gap / mouth width)
MAX_ROLL_DEGREES = 45.0
STATUS_SECONDS = 0.5  # an animation's status line changes at most this often (so Cancel acts within about that)


@dataclass(frozen=True)
class AppContext:
    """What every tab shares: the model, the run folder, the limits, and the portrait a first visit starts with."""

    animator: Animator  # the bundled model (Edit)
    folder: RunFolder
    limits: Limits
    example: Portrait  # scikit-image's astronaut
    example_path: Path  # the same image as a file, shown in the portrait upload box
    models: Models  # what Animate can use: the bundled model, and the models personalised in this run


def error_message(error: InputError) -> str:
    """The status line for a bad upload: ``⚠ portrait: no face found``."""
    return f"⚠ **{error.path}**: {error.problem}"


def build_app(context: AppContext) -> gr.Blocks:
    """The whole page; call ``.launch()`` on it (`metaportrait.app.server.serve` does)."""
    limits = context.limits
    with gr.Blocks(title="metaportrait", analytics_enabled=False) as blocks:
        gr.Markdown(
            "# metaportrait\nA portrait photo made to follow a driving video (Animate), or given another "
            f"expression and head pose (Edit). Uploads up to {limits.max_upload_bytes / 2**20:g} MB, driving "
            f"videos up to {limits.max_seconds:g} s; one job runs at a time, the others wait in line."
        )
        with gr.Tabs():
            with gr.Tab("Animate", id="animate"):
                model = animate_tab(context)
            with gr.Tab("Edit", id="edit"):
                edit_tab(context)
            with gr.Tab("Personalize", id="personalize"):
                personalize_tab(context, model)
        # A page opened later offers the models personalised since the app started.
        blocks.load(lambda: gr.Dropdown(choices=context.models.names()), outputs=model)
    blocks.queue(default_concurrency_limit=1)
    return blocks


def portrait_input(context: AppContext, prefix: str) -> tuple[gr.State, gr.Markdown, gr.events.Dependency]:
    """An upload box for the portrait, its preview and a status line; the checked `Portrait` goes in the state.
    Also returns the upload's event, for a tab to chain its own steps after it with ``.then``.

    The upload is a file box rather than an image box, so that a file that is not an image reaches our own
    check (and its message) instead of failing inside Gradio.
    """
    upload = gr.File(value=str(context.example_path), label="Portrait (image file)", file_types=["image"],
                     elem_id=f"{prefix}-portrait-upload")  # fmt: skip
    preview = gr.Image(value=context.example.image, label="Portrait", interactive=False, height=256,
                       elem_id=f"{prefix}-portrait-preview")  # fmt: skip
    status = gr.Markdown(elem_id=f"{prefix}-status")
    state = gr.State(context.example)

    def on_upload(path: str | None) -> tuple[Portrait | None, np.ndarray | None, str]:
        if path is None:
            return None, None, ""
        try:
            portrait = load_portrait(path, context.limits)
        except InputError as error:
            return None, None, error_message(error)
        return portrait, portrait.image, "Portrait ready."

    event = upload.change(on_upload, inputs=upload, outputs=[state, preview, status])
    return state, status, event


def control_sliders(prefix: str, mouth_default: float | None) -> tuple[gr.Slider, ...]:
    """Eyes, (mouth), yaw, pitch and roll sliders (`metaportrait.motion.edit_landmarks`), with element ids
    ``<prefix>-eyes`` and so on; no mouth slider when ``mouth_default`` is None."""
    sliders = [gr.Slider(0.0, MAX_EYES, value=1.0, step=0.05, label="eyes (1 unchanged, 0 closed)",
                         elem_id=f"{prefix}-eyes")]  # fmt: skip
    if mouth_default is not None:
        sliders.append(gr.Slider(0.0, MAX_MOUTH, value=mouth_default, step=0.02, elem_id=f"{prefix}-mouth",
                                 label="mouth openness (0 closed, 0.3 talking, 0.6 open jaw)"))  # fmt: skip
    for name, limit, label in (("yaw", MAX_YAW_PITCH_DEGREES, "yaw ° (head turn)"),
                               ("pitch", MAX_YAW_PITCH_DEGREES, "pitch ° (nod)"),
                               ("roll", MAX_ROLL_DEGREES, "roll ° (tilt)")):  # fmt: skip
        sliders.append(gr.Slider(-limit, limit, value=0.0, step=1.0, label=label, elem_id=f"{prefix}-{name}"))
    return tuple(sliders)


class TabJobs:
    """Each browser tab's job (Gradio's per-tab session hash -> job with a ``cancel()``), for its Cancel button.

    Every status message of a job, "Cancelled." included, comes from the job's own event, so they arrive in order:
    Cancel only asks the job to stop, and the job's event ends with "Cancelled." A click is marked when it enters
    Gradio's queue (`submit`, a step before the job's event); a Cancel after that mark stops the job whenever it
    comes: before the job starts (`cancelled_before_start`), while it is being set up (`start`), or while it runs.
    """

    def __init__(self):
        self.running: dict[str, object] = {}
        self.waiting: dict[str, float] = {}  # tab -> when its click was queued, until its job ends
        self.cancelled: dict[str, float] = {}  # tab -> when its Cancel was last clicked

    def submit(self, request: gr.Request) -> None:
        self.waiting[request.session_hash] = time.monotonic()

    def cancelled_before_start(self, request: gr.Request) -> bool:
        tab = request.session_hash
        return self.cancelled.get(tab, -math.inf) > self.waiting.get(tab, math.inf)

    def check_not_cancelled(self, request: gr.Request) -> None:
        """Raises `Cancelled` if the tab's Cancel came before its job's event started (the job's first step)."""
        if self.cancelled_before_start(request):
            raise Cancelled

    def start(self, request: gr.Request, job) -> None:
        """Register the tab's job; a Cancel that came while it was set up stops it at once."""
        self.running[request.session_hash] = job
        if self.cancelled_before_start(request):
            job.cancel()

    def finish(self, request: gr.Request) -> None:
        self.running.pop(request.session_hash, None)
        self.waiting.pop(request.session_hash, None)

    def stop(self, request: gr.Request):
        """Cancel's handler: stop the tab's running job (its event then says "Cancelled."), or the queued one."""
        self.cancelled[request.session_hash] = time.monotonic()
        if (job := self.running.get(request.session_hash)) is not None:
            job.cancel()
            return gr.skip()
        return "Cancelled." if request.session_hash in self.waiting else gr.skip()


def wire_job(start: gr.Button, cancel: gr.Button, run, jobs: TabJobs, status: gr.Markdown, **click) -> None:
    """``start`` runs ``run`` (a generator of status updates; see `TabJobs`), ``cancel`` stops it."""
    start.click(jobs.submit, queue=False).then(run, **click)
    cancel.click(jobs.stop, outputs=status, queue=False)


# --- Animate ---------------------------------------------------------------------------------------------------

def animate_tab(context: AppContext) -> gr.Dropdown:
    """The Animate tab; returns its model choice, which the Personalize tab adds to."""
    with gr.Row():
        with gr.Column():
            portrait, status, _ = portrait_input(context, "animate")
            source = gr.Radio([BUILT_IN_MOTION, UPLOADED_MOTION], value=BUILT_IN_MOTION, label="Motion from",
                              elem_id="animate-source")  # fmt: skip
            driving = gr.Video(label="Driving video", sources=["upload"], format=None, include_audio=True,
                               height=256, elem_id="animate-driving")  # fmt: skip
            model = gr.Dropdown(context.models.names(), value=BUNDLED_MODEL, label="Model",
                                elem_id="animate-model")  # fmt: skip
            with gr.Accordion("Options", open=False):
                motion = gr.Radio(list(MOTIONS), value="relative", label="motion (uploaded video)",
                                  info="relative keeps the portrait's face shape; absolute copies the driver's")
                paste_back = gr.Checkbox(value=True, label="paste the face back into the whole photo")
                eyes, yaw, pitch, roll = control_sliders("animate", mouth_default=None)
                fix_mouth = gr.Checkbox(value=False, label="fix the mouth openness (instead of the driver's)")
                mouth = gr.Slider(0.0, MAX_MOUTH, value=0.3, step=0.02, label="fixed mouth openness")
            with gr.Row():
                start = gr.Button("Animate", variant="primary", elem_id="animate-button")
                cancel = gr.Button("Cancel", elem_id="animate-cancel")
        with gr.Column():
            result = gr.Video(label="Result", format=None, interactive=False, buttons=["download"], height=384,
                              elem_id="animate-result")  # fmt: skip
            side = gr.Video(label="Side by side", format=None, interactive=False, buttons=["download"],
                            elem_id="animate-side-by-side")  # fmt: skip
            files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="animate-files")

    def on_driving(path: str | None) -> tuple[str, str]:
        if path is None:
            return BUILT_IN_MOTION, ""
        try:
            info = check_driving(path, context.limits)
        except InputError as error:
            return UPLOADED_MOTION, error_message(error)
        return UPLOADED_MOTION, f"Driving video ready: {info.duration:.1f} s at {info.fps:g} frames/s."

    jobs = TabJobs()

    def run(portrait: Portrait | None, model: str, source: str, driving: str | None, motion: str,
            paste_back: bool, eyes: float, yaw: float, pitch: float, roll: float, fix_mouth: bool, mouth: float,
            request: gr.Request, progress: gr.Progress = gr.Progress()):  # noqa: B008 (Gradio's progress bar)
        """A generator: each yield is a message to the page. Cancel (`TabJobs.stop`) makes `AnimateJob.run` raise
        `Cancelled` at its next frame, and the last message says so."""
        controls = Controls(eyes=eyes, mouth=mouth if fix_mouth else None, yaw=yaw, pitch=pitch, roll=roll)
        options = AnimateOptions(motion=motion, paste_back=paste_back, controls=controls)
        try:
            jobs.check_not_cancelled(request)
            if portrait is None:
                raise InputError(PORTRAIT, "upload a portrait with one face first")
            if source == UPLOADED_MOTION and driving is None:
                raise InputError(DRIVING, "upload one, or choose the built-in motion")
            job = AnimateJob(context.models.animator(model), portrait, driving if source == UPLOADED_MOTION else None,
                             options, context.folder, context.limits)  # fmt: skip
            jobs.start(request, job)
            progress(0.0, desc="starting")

            def on_read(count: int) -> None:
                progress((count, job.total), desc="tracking the driving video", unit="frames")

            shown = time.monotonic()
            for done in job.run(on_read):
                progress((done, job.total), desc="animating", unit="frames")
                if time.monotonic() - shown >= STATUS_SECONDS:
                    shown = time.monotonic()
                    yield gr.skip(), gr.skip(), gr.skip(), f"Animating: frame {done} of about {job.total}."
        except InputError as error:
            yield None, None, None, error_message(error)
            return
        except Cancelled:
            yield gr.skip(), gr.skip(), gr.skip(), "Cancelled."
            return
        finally:
            jobs.finish(request)
        finished = job.result
        paths = [str(finished.video), str(finished.side_by_side)]
        yield paths[0], paths[1], paths, f"Done: {finished.summary()}."

    driving.change(on_driving, inputs=driving, outputs=[source, status])
    inputs = [portrait, model, source, driving, motion, paste_back, eyes, yaw, pitch, roll, fix_mouth, mouth]
    wire_job(start, cancel, run, jobs, status, inputs=inputs, outputs=[result, side, files, status],
             show_progress_on=[result], concurrency_id=MODEL_QUEUE, concurrency_limit=1)  # fmt: skip
    return model


# --- Edit ------------------------------------------------------------------------------------------------------

def edit_tab(context: AppContext) -> None:
    with gr.Row():
        with gr.Column():
            portrait, _, uploaded = portrait_input(context, "edit")
            eyes, mouth, yaw, pitch, roll = control_sliders("edit", float(mouth_openness(context.example.landmarks)))
            paste_back = gr.Checkbox(value=True, label="paste the face back into the whole photo")
        with gr.Column():
            preview = gr.Image(value=edit(context.animator, context.example, Controls()), label="Edited",
                               interactive=False, buttons=["download"], format="png",
                               elem_id="edit-preview")  # fmt: skip

    controls = [eyes, mouth, yaw, pitch, roll, paste_back]

    def render(portrait: Portrait | None, eyes: float, mouth: float, yaw: float, pitch: float, roll: float,
               paste_back: bool) -> np.ndarray | None:
        if portrait is None:
            return None
        return edit(context.animator, portrait, Controls(eyes, mouth, yaw, pitch, roll), paste_back)

    def reset_mouth(portrait: Portrait | None) -> float:
        """A new portrait starts at its own mouth openness, so the preview starts as the photo."""
        return gr.skip() if portrait is None else float(mouth_openness(portrait.landmarks))

    # A slider fires while it is dragged: "always_last" drops the stale requests and keeps the latest one.
    for control in controls:
        control.change(render, inputs=[portrait, *controls], outputs=preview, concurrency_id=MODEL_QUEUE,
                       concurrency_limit=1, trigger_mode="always_last", show_progress="minimal")  # fmt: skip
    uploaded.then(reset_mouth, inputs=portrait, outputs=mouth).then(
        render, inputs=[portrait, *controls], outputs=preview, concurrency_id=MODEL_QUEUE, concurrency_limit=1
    )


# --- Personalize -----------------------------------------------------------------------------------------------

def personalize_tab(context: AppContext, model: gr.Dropdown) -> None:
    """Fine-tune the bundled model on videos of one person; the result joins Animate's ``model`` choices."""
    gr.Markdown(
        "Upload videos of one person (in all, at least 12 s with the face visible). The last 10 s of the last "
        "video are held out: at the end, the one-shot and the personalised model both reconstruct them, and the "
        "table compares the two. The personalised model is then offered in Animate until the app stops."
    )
    with gr.Row():
        with gr.Column():
            videos = gr.File(label="Videos of one person", file_count="multiple", file_types=["video"],
                             elem_id="personalize-videos")  # fmt: skip
            seconds = gr.Slider(10, 600, value=60, step=10, label="fine-tuning time budget (seconds)",
                                elem_id="personalize-seconds")  # fmt: skip
            with gr.Row():
                start = gr.Button("Personalize", variant="primary", elem_id="personalize-button")
                cancel = gr.Button("Cancel", elem_id="personalize-cancel")
        with gr.Column():
            status = gr.Markdown(elem_id="personalize-status")
            table = gr.Markdown(elem_id="personalize-table")

    jobs = TabJobs()

    def run(videos: list[str] | None, seconds: float, request: gr.Request,
            progress: gr.Progress = gr.Progress()):  # noqa: B008 (Gradio's progress bar)
        try:
            jobs.check_not_cancelled(request)
            job = PersonalizeJob(videos or [], seconds, context.folder, context.limits)
            jobs.start(request, job)
            progress(0.0, desc="finding the face in every frame")
            for trained in job.run():
                if trained is not None:
                    progress((min(trained, seconds), seconds), desc="fine-tuning", unit="s")
                    yield gr.skip(), gr.skip(), f"Fine-tuning: {trained:.0f} of {seconds:g} s."
        except InputError as error:
            yield gr.skip(), "", error_message(error)
            return
        except Cancelled:
            yield gr.skip(), gr.skip(), "Cancelled."
            return
        finally:
            jobs.finish(request)
        name = f"personalised #{job.number}"
        context.models.add(name, job.result.model)
        yield (gr.Dropdown(choices=context.models.names(), value=name), job.result.table(),
               f"Done: **{name}** is now a model in Animate. {job.result.caution()}".strip())

    wire_job(start, cancel, run, jobs, status, inputs=[videos, seconds], outputs=[model, table, status],
             show_progress_on=[table], concurrency_id=MODEL_QUEUE, concurrency_limit=1)  # fmt: skip
