"""`refface comfy-queue`: restore a photo through a running ComfyUI server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import RefFaceError


def add_to(commands: argparse._SubParsersAction) -> None:
    queue = commands.add_parser(
        "comfy-queue", help="restore a photo through a running ComfyUI server with an API-format workflow"
    )
    queue.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL (default http://127.0.0.1:8188)")
    queue.add_argument("--workflow", required=True, type=Path, help="API-format workflow, e.g. workflows/api/*.json")
    queue.add_argument("--input", required=True, type=Path, help="the photo to restore")
    queue.add_argument("--ref", required=True, action="append", type=Path, help="photo of the same person (repeat)")
    queue.add_argument("--out", type=Path, default=Path("."), help="folder for the results (default: here)")
    queue.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..comfy_queue import queue_restore

    bar = tqdm(total=0, unit="step", file=sys.stderr)

    def progress(event: dict) -> None:
        data = event["data"]
        if event["type"] == "progress":
            bar.set_description(f"node {data['node']}")
            bar.total, bar.n = data["max"], data["value"]
            bar.refresh()
        elif event["type"] == "execution_cached" and data.get("nodes"):
            bar.write(f"cached: nodes {', '.join(data['nodes'])}", file=sys.stderr)

    try:
        paths, texts = queue_restore(args.server, args.workflow, args.input, args.ref, args.out, progress)
    finally:
        bar.close()
    for text in texts:
        print(text)
    for path in paths:
        print(f"wrote {path}")
    if not paths:
        raise RefFaceError("the workflow finished without saving an image (add a SaveImage node)")
    return 0
