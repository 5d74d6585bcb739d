"""`metaportrait train sr`: train the temporal super-resolution network (256 -> 512) on a 512 prepared dataset.

Examples::

    metaportrait prepare videos512/ --output datasets/sr512 --size 512
    metaportrait train sr --data datasets/sr512 --out runs/sr --preset lite --frames 3 \\
        --val-identities docs/splits/sr_val_identities.txt --threads 1
    metaportrait train sr --data datasets/sr512 --out runs/sr --resume --steps 40000
    # fine-tune the bundled network on the base model's own output, with the patch critic
    metaportrait train sr --data datasets/sr512 --out runs/sr_ft --init default --generated 0.5 --gan 0.05 \
        --val-identities docs/splits/sr_val_identities.txt --threads 1

Under ``torchrun --nproc_per_node N "$(which metaportrait)" train sr ...`` (gloo on CPU) every process trains on
``--clips`` clips of its own a step and the gradients are averaged (N processes = one with N times the clips).

Inputs are made on the fly from the 512 frames (`metaportrait.train.sr.degrade`). With ``--resume`` the run's
saved settings are used; only ``--steps``, ``--lr``, ``--ema-decay`` and the runtime flags may change (the lr
schedule is a function of the step, ``--lr`` and ``--steps``: a new ``--steps`` moves the end of its cosine decay).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metaportrait.config import SR_PRESETS
from metaportrait.errors import InputError

_FLAGS = ("preset", "frames", "clips", "steps", "lr", "threads", "seed", "log_every", "checkpoint_every", "val_every",
          "temporal", "ema_decay", "warmup", "rgb_init", "edge", "perceptual", "crop", "clean", "grad_clip", "pyramid",
          "shift", "generated", "generator", "init", "gan", "critic_lr")


def add_parser(sub) -> None:
    sr = sub.add_parser("sr", help="the temporal super-resolution network (256 -> 512)", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sr.add_argument("--data", type=Path, required=True, metavar="DATASET_DIR", help="`prepare --size 512` output")
    sr.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder (created)")
    sr.add_argument("--preset", choices=sorted(SR_PRESETS), help="network preset (default: lite)")
    sr.add_argument("--frames", type=int, help="consecutive frames per training clip (default 3)")
    sr.add_argument("--clips", type=int, help="clips per step (default 1)")
    sr.add_argument("--steps", type=int, help="train up to this step (default 20000)")
    sr.add_argument("--lr", type=float, help="peak Adam learning rate (default 4e-4; warm-up, then cosine to lr/10)")
    sr.add_argument("--warmup", type=int, help="steps of linear lr warm-up (default 100)")
    sr.add_argument("--grad-clip", type=float, help="max global gradient norm (default 1; 0 = off)")
    sr.add_argument("--ema-decay", type=float, help="decay of the exported weight average (default 0.995; "
                    "changing it on --resume restarts the average from the current weights)")
    sr.add_argument("--temporal", type=float, help="weight of the frame-difference loss (default 2; 0 = off)")
    sr.add_argument("--edge", type=float, help="weight of the image-gradient L1 (default 1; 0 = off)")
    sr.add_argument("--perceptual", type=float, help="weight of the MobileNetV2 perceptual loss (default 0.1)")
    sr.add_argument("--crop", type=int, help="side of the random patch the perceptual loss sees (default 256; "
                    "0 = the whole frame)")
    sr.add_argument("--rgb-init", type=float, help="residual presets: decoder RGB heads drawn at this x their "
                    "default scale before training (default 0.01; 0 = zero, the plain upsampling)")
    sr.add_argument("--pyramid", type=float, help="weight of the U-Net's RGB pyramid L1 (default 1; 0 = off)")
    sr.add_argument("--clean", type=float, help="share of clips only downscaled, no other degradation (default 0.3)")
    sr.add_argument("--shift", type=float,
                    help="largest per-frame input misalignment in input pixels (default 0.6; 0 = aligned)")
    sr.add_argument("--generated", type=float, help="share of clips whose input is the base model's own 256 "
                    "reconstruction of the window (default 0)")
    sr.add_argument("--generator", metavar="CHECKPOINT", help="the base model that makes those inputs: default "
                    "(bundled) or a model folder")
    sr.add_argument("--init", metavar="SR_MODEL", help="start from this SR model folder (\"default\": the bundled "
                    "sr_lite) instead of from scratch")
    sr.add_argument("--gan", type=float, help="weight of the patch critic's LSGAN term (default 0 = no critic)")
    sr.add_argument("--critic-lr", type=float, help="the critic's Adam learning rate (default 1e-4)")
    sr.add_argument("--val-identities", help="held-out identities: a file (one per line) or a comma list")
    sr.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint")
    sr.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    sr.add_argument("--seed", type=int)
    sr.add_argument("--log-every", type=int)
    sr.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 50)")
    sr.add_argument("--val-every", type=int)


def run(args: argparse.Namespace) -> int:
    from metaportrait.data.dataset import parse_identities
    from metaportrait.train.sr import SRTrainConfig, train_sr

    given = {flag: getattr(args, flag) for flag in _FLAGS if getattr(args, flag) is not None}
    if args.val_identities:
        given["val_identities"] = parse_identities(args.val_identities)
    try:
        if args.resume:
            saved = args.out / "train_config.json"
            if not saved.is_file():
                raise InputError(saved, "not found: there is no run to resume here")
            cfg = SRTrainConfig.from_dict(json.loads(saved.read_text(encoding="utf-8"))).replace(**given)
        else:
            cfg = SRTrainConfig(**given)
    except ValueError as error:
        raise InputError(args.out, f"invalid settings: {error}") from None
    print(json.dumps(cfg.to_dict(), indent=2), flush=True)
    record = train_sr(cfg, args.data, args.out, resume=args.resume)
    print(f"done: step {record.get('step')}; model: {args.out / 'model'}")
    return 0
