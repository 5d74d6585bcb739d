"""`metaportrait train sr`: train the temporal super-resolution network (256 -> 512) on a 512 prepared dataset.

Examples::

    metaportrait prepare videos512/ --output datasets/sr512 --size 512
    metaportrait train sr --data datasets/sr512 --out runs/sr --preset lite --frames 3 \\
        --val-identities docs/splits/sr_val_identities.txt --threads 1
    metaportrait train sr --data datasets/sr512 --out runs/sr --resume --steps 40000

Inputs are made on the fly from the 512 frames (`metaportrait.train.sr.degrade`). With ``--resume`` the run's
saved settings are used; only ``--steps``, ``--lr``, ``--ema-decay`` and the runtime flags may change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metaportrait.config import SR_PRESETS
from metaportrait.errors import InputError

_FLAGS = ("preset", "frames", "clips", "steps", "lr", "threads", "seed", "log_every", "checkpoint_every", "val_every",
          "temporal", "ema_decay")


def add_parser(sub) -> None:
    sr = sub.add_parser("sr", help="the temporal super-resolution network (256 -> 512)", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sr.add_argument("--data", type=Path, required=True, metavar="DATASET_DIR", help="`prepare --size 512` output")
    sr.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder (created)")
    sr.add_argument("--preset", choices=sorted(SR_PRESETS), help="network preset (default: lite)")
    sr.add_argument("--frames", type=int, help="consecutive frames per training clip (default 3)")
    sr.add_argument("--clips", type=int, help="clips per step (default 1)")
    sr.add_argument("--steps", type=int, help="train up to this step (default 20000)")
    sr.add_argument("--lr", type=float, help="Adam learning rate (default 2e-4)")
    sr.add_argument("--ema-decay", type=float, help="decay of the exported weight average (default 0.999; "
                    "changing it on --resume restarts the average from the current weights)")
    sr.add_argument("--temporal", type=float, help="weight of the frame-difference loss (default 2; 0 = off)")
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
