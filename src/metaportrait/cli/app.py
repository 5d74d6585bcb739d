"""`metaportrait app`: the web app (Gradio) for animating and editing portraits in a browser.

Examples::

    metaportrait app                                  # http://127.0.0.1:7860, this machine only
    metaportrait app --host 0.0.0.0 --port 8080       # reachable from the network
    metaportrait app --max-upload-mb 20 --max-seconds 30

Needs the ``app`` extra (``pip install 'metaportrait[app]'``). Uploads and results live in a temporary folder of
the run, removed when the app stops (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from metaportrait.cli.arguments import positive_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=positive_int, default=7860, help="port to listen on")
    parser.add_argument("--max-upload-mb", type=positive_float, default=50.0, help="largest upload, in MB")
    parser.add_argument("--max-seconds", type=positive_float, default=60.0, help="longest driving video, in seconds")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint folder (model.safetensors + config.json); default: the bundled lite model")


def run(args: argparse.Namespace) -> int:
    from metaportrait.app.jobs import Limits
    from metaportrait.app.server import CannotListen, serve

    if importlib.util.find_spec("gradio") is None:
        print("error: the web app needs Gradio: pip install 'metaportrait[app]'", file=sys.stderr)
        return 2
    limits = Limits(max_upload_bytes=round(args.max_upload_mb * 2**20), max_seconds=args.max_seconds)
    try:
        serve(args.host, args.port, limits, args.checkpoint)
    except CannotListen as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
