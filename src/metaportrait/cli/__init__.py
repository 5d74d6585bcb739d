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
    "animate": ("animate", "animate a portrait with a driving video"),
    "edit": ("edit", "change expression or head pose of a single portrait"),
    "upscale": ("upscale", "super-resolve the face of a video to 512 (temporal SR), pasted back at full resolution"),
    "eval": ("evaluate", "evaluation protocols (self-reconstruction, cross-reenactment) and training curves"),
    "bench": ("bench", "speed benchmarks (landmarks, rendering, identity, model, end to end)"),
}


def _load(name: str):
    return importlib.import_module(f"metaportrait.cli.{COMMANDS[name][0]}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaportrait", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args._run(args) or 0)
    except InputError as error:
        print(f"error: {error.path}: {error.problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
