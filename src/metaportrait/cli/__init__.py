"""The `metaportrait` console script: one subcommand per module in this package.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; its one-line help is here.
Modules are imported only when their subcommand runs, so `metaportrait landmarks` never imports torch
training code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from metaportrait.errors import InputError

# subcommand name -> (module under metaportrait.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "animate the built-in example (scikit-image's astronaut) and write demo videos"),
    "landmarks": ("landmarks", "dense MediaPipe landmarks (478 points) of an image or video, with an overlay"),
    "prepare": ("prepare", "turn a folder of videos into a training dataset (crops, landmarks, identities)"),
    "identity": ("identity", "identity distance between the faces of two images (dlib ResNet, ported)"),
    "train": ("train", "train the base model (warp stage, then full)"),
    "personalize": ("personalize", "fine-tune a model on videos of one person (a checkpoint folder for animate)"),
    "animate": ("animate", "animate a portrait with a driving video"),
    "edit": ("edit", "change expression or head pose of a single portrait"),
    "live": ("live", "animate a portrait live from a camera or a file played in real time"),
    "export-onnx": ("export_onnx", "export the generator (and the SR network) for ONNX Runtime"),
    "upscale": ("upscale", "super-resolve the face of a video to 512 (temporal SR), pasted back at full resolution"),
    "eval": ("evaluate", "evaluation protocols (self-reconstruction, cross-reenactment) and training curves"),
    "bench": ("bench", "speed benchmarks (landmarks, rendering, identity, model, end to end)"),
    "app": ("app", "web app in the browser: animate and edit portraits (Gradio)"),
}


def _load(name: str):
    return importlib.import_module(f"metaportrait.cli.{COMMANDS[name][0]}")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line ``error: <command>: <problem>`` (exit 2), like a bad file.

    Subcommand parsers are made by ``add_parser`` with the parent's class, so every level behaves the same.
    """

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="metaportrait", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line (allowed anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only import the module of the chosen subcommand; list the others by name.
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = _load(name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # --debug is taken from anywhere on the line (before a "--"), so it works after the subcommand's options too.
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.debug = debug
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.debug:
        return int(args._run(args) or 0)
    try:
        return int(args._run(args) or 0)
    except InputError as error:
        _print_error(f"error: {error.path}: {error.problem}")
        return 2
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 130
    except OSError as error:  # the disk is full, a folder is not writable, ...: the system's words and the file
        where = f"{error.filename}: " if error.filename else ""
        _print_error(f"error: {where}{error.strerror or error}")
        return 1
    except Exception as error:  # noqa: BLE001 - a bug: one line here, the traceback with --debug
        _print_error(f"error: {type(error).__name__}: {_first_line(error)} (run with --debug for the traceback)")
        return 1


def _print_error(line: str) -> None:
    """Print ``line`` to stderr on a line of its own: progress bars the error interrupted are ended first."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(line, file=sys.stderr)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


if __name__ == "__main__":
    sys.exit(main())
