"""Start the web app: a run folder, the model, the page, and clean-up when the server stops.

Gradio reads its temporary folder from the environment when it is imported, so `serve` points it into the run
folder first and imports Gradio (`metaportrait.app.ui`) only then: uploads and results of a run all live in one
folder, removed when the app exits (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

from metaportrait.app.jobs import Limits, Models, RunFolder, portrait_of
from metaportrait.io.image import write_image
from metaportrait.pipeline import Animator

logger = logging.getLogger(__name__)


def serve(host: str = "127.0.0.1", port: int = 7860, limits: Limits = Limits(),
          checkpoint: str | Path | None = None) -> None:
    """Serve the app on ``host:port`` until interrupted; the run folder is removed on the way out.

    Raises:
        CannotListen: ``host:port`` cannot be listened on (in use, not an address of this machine), found
            before anything is loaded.
    """
    check_address(host, port)
    animator = Animator.from_pretrained(checkpoint, precision="auto")  # a bad checkpoint fails before anything starts
    with RunFolder() as folder:
        os.environ["GRADIO_TEMP_DIR"] = str(folder.uploads)
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        from skimage import data  # the first visit's portrait ships with scikit-image

        from metaportrait.app.ui import AppContext, build_app

        example_path = folder.uploads / "astronaut.png"
        write_image(example_path, data.astronaut())
        context = AppContext(animator, folder, limits, portrait_of(data.astronaut()), example_path, Models(animator))
        blocks = build_app(context)
        # SIGTERM ends the server like Ctrl-C does, so that the run folder is removed then too.
        signal.signal(signal.SIGTERM, _interrupt)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up checks, one line each
        logger.info("uploads and results of this run: %s (removed at exit)", folder.path)
        blocks.launch(server_name=host, server_port=port, max_file_size=limits.max_upload_bytes, share=False,
                      inbrowser=False, show_error=False, ssr_mode=False, footer_links=[], allowed_paths=[],
                      theme=_offline_theme())  # fmt: skip


class CannotListen(Exception):
    """The app's address cannot be listened on; the message says why."""


def check_address(host: str, port: int) -> None:
    """Raise `CannotListen` unless a server could listen on ``host:port`` now."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself does
            probe.bind(address)
    except OSError as error:  # socket.gaierror (unknown host) is one too
        raise CannotListen(f"cannot listen on {host}:{port} ({error.strerror or error})") from None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _offline_theme():
    """Gradio's default look with the system's fonts: the default theme fetches web fonts from the internet."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])  # fmt: skip
