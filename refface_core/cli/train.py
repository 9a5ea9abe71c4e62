"""`refface train`: fine-tuning with Composite Context and the HID loss."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_to(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="fine-tune with Composite Context and the HID loss (several GPUs: accelerate launch)"
    )
    train.add_argument("--config", required=True, type=Path, help="training config (YAML; see README)")
    train.add_argument(
        "--resume", nargs="?", const="latest", metavar="CHECKPOINT", help="continue from the latest checkpoint (or one)"
    )
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training.config import load_config
    from ..training.trainer import train

    final = train(load_config(args.config), resume=args.resume)
    if final is not None:  # the main process
        print(f"wrote {final}")
    return 0
