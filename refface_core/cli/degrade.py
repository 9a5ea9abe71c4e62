"""`refface degrade`: a reproducible low-quality test set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_to(commands: argparse._SubParsersAction) -> None:
    degrade = commands.add_parser("degrade", help="write a reproducible low-quality test set from HQ images")
    degrade.add_argument("--input", required=True, type=Path, help="folder of HQ images")
    degrade.add_argument("--out", required=True, type=Path, help="folder for the LQ images (PNG, same names)")
    degrade.add_argument("--preset", default="moderate", help="moderate, severe or train (default moderate)")
    degrade.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default 0)")
    degrade.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..training.degradations import degrade_folder

    with tqdm(unit="image", file=sys.stderr, disable=None) as bar:  # no bar when not a terminal

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        written = degrade_folder(args.input, args.out, args.preset, args.seed, progress)
    print(f"wrote {len(written)} images to {args.out} ({args.preset}, seed {args.seed})")
    return 0
