"""`metaportrait export-onnx`: the generator (and the super-resolution network) exported for ONNX Runtime.

Examples::

    metaportrait export-onnx --output exported/                           # the bundled model
    metaportrait export-onnx --checkpoint models/me --sr default --output exported_me/
    metaportrait animate -s me.jpg -d talk.mp4 -o out.mp4 --backend onnx --onnx-folder exported/

The folder holds ``generator.onnx`` (the per-frame step, any batch), ``source.onnx`` (the portrait's feature
pyramid, run once per portrait) and ``onnx.json`` (the checkpoint's SHA-256: a folder exported from another
checkpoint is refused), and with ``--sr`` the SR network's export in ``sr/`` (``sr.onnx``, any number of
frames). Inputs, outputs and shapes: `metaportrait.onnx_backend`. The folder is written whole or not at all.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="default",
                        help="default (the bundled lite model), meta (the meta-learned start), a checkpoint folder "
                             "(model.safetensors + config.json) or a training run folder")
    parser.add_argument("--sr", default=None, metavar="default|PATH",
                        help="also export a super-resolution network: the bundled one (default) or a folder / file")
    parser.add_argument("--output", "-o", type=Path, required=True, help="the folder to write (must not exist)")


def run(args: argparse.Namespace) -> int:
    from metaportrait.cli.personalize import resolve_checkpoint
    from metaportrait.errors import InputError
    from metaportrait.io.atomic import atomic_folder
    from metaportrait.io.checkpoint import checkpoint_sha256, load_model
    from metaportrait.onnx_backend import SR_FOLDER, check_exportable, export, export_sr
    from metaportrait.upscale import load_sr, sr_weights

    if args.output.exists():
        raise InputError(args.output, "already exists; choose a new folder")
    if not args.output.parent.is_dir():
        raise InputError(args.output, "its parent folder does not exist")
    checkpoint = resolve_checkpoint(str(args.checkpoint))
    if not checkpoint.is_dir():
        raise InputError(checkpoint, "checkpoint folder not found")
    generator, config = load_model(checkpoint)
    try:
        check_exportable(config)
    except ValueError as error:
        raise InputError(checkpoint, str(error)) from None
    sr_model = sr_sha = None
    if args.sr is not None:  # loaded (and checked) before the long export starts
        sr_model = load_sr(args.sr)
        sr_sha = checkpoint_sha256(sr_weights(args.sr))
    logger.info("exporting %s (about a minute) ...", checkpoint)
    with atomic_folder(args.output) as staging:
        part = export(generator, config, staging / "generator", checkpoint_sha256(checkpoint))
        for file in part.iterdir():  # the generator's files at the top of the folder
            file.rename(staging / file.name)
        part.rmdir()
        if sr_model is not None:
            logger.info("exporting the super-resolution network ...")
            export_sr(sr_model, staging / SR_FOLDER, sr_sha)
    logger.info("wrote %s", args.output)
    return 0
