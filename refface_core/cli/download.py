"""`refface download`: ReF-LDM's weights, fetched and converted into the default model folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_to(commands: argparse._SubParsersAction) -> None:
    download = commands.add_parser(
        "download", help="download ReF-LDM's weights (non-commercial research licence) and convert them"
    )
    download.add_argument(
        "--dir",
        type=Path,
        help="folder for the checkpoints and the converted model DIR/refldm (default $REFFACE_HOME/models, "
        "$REFFACE_HOME defaulting to ~/.cache/refface); an interrupted download resumes",
    )
    download.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..progress import Progress
    from ..weights import download_model

    progress = Progress()
    model_dir = download_model(args.dir, progress, progress.download)
    print(f"model ready: {model_dir}")
    return 0
