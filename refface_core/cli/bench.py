"""`refface bench`: a restore (or a training step) timed stage by stage."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RefFaceError
from .options import add_sampling_options, print_report, sampling_options

if TYPE_CHECKING:
    import torch

    from ..context.farl import FaRLEncoder
    from ..model import RefFaceRestorer


def add_to(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="time a restore stage by stage (random weights unless --model)")
    bench.add_argument("--model", type=Path, help="RefFace model folder (default: full-size ReF-LDM, random)")
    bench.add_argument("--refs", type=int, default=5, help="references per face (default 5)")
    bench.add_argument("--batch", type=int, default=1, help="faces per batch (default 1)")
    bench.add_argument("--warmup", type=int, help="warm-up runs (default 1 on CUDA, 0 on CPU)")
    bench.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    bench.add_argument("--composite-context", action="store_true", help="add Composite Context layers (random)")
    bench.add_argument("--farl", type=Path, help="FaRL checkpoint (default for context models: random ViT-B/16)")
    bench.add_argument("--train", action="store_true", help="time training steps instead of a restore")
    bench.add_argument(
        "--freeze", choices=["context", "context_attention", "full"], default="context", help="--train: what trains"
    )
    bench.add_argument("--gradient-checkpointing", action="store_true", help="--train: recompute in backward")
    bench.add_argument("--arcface", type=Path, help="--train: ArcFace ONNX for the HID loss (default: a tiny stand-in)")
    add_sampling_options(bench, steps=100, spacing="uniform")
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import format_table, run_bench
    from ..model import RefFaceRestorer, pick_device

    device, dtype = pick_device(args.device, args.dtype)
    if args.json and not args.json.parent.is_dir():
        raise RefFaceError(f"folder for --json does not exist: {args.json.parent}")
    if args.model:
        model = RefFaceRestorer.from_pretrained(args.model, device=device, dtype=dtype)
    else:
        model = RefFaceRestorer().to(device=device, dtype=dtype).eval()
    if args.composite_context and model.context_encoder is None:
        from ..context import composite_context_config

        model.add_composite_context(composite_context_config())
    farl = None
    if args.farl:
        from ..context.farl import load_farl

        farl = load_farl(args.farl, device=device, dtype=dtype)
    if args.train:
        return run_train(args, model.float(), farl, dtype)
    options = sampling_options(args)
    result = run_bench(model, refs=args.refs, batch=args.batch, warmup=args.warmup, farl=farl, **options)
    return print_report(format_table(result), result, args.json)


def run_train(args: argparse.Namespace, model: RefFaceRestorer, farl: FaRLEncoder | None, dtype: torch.dtype) -> int:
    """Training keeps fp32 weights; --dtype bf16/fp16 becomes mixed precision."""
    import torch

    from ..bench import random_farl
    from ..training.bench import format_train_table, run_train_bench
    from ..training.identity import ArcFace

    if model.context_encoder is not None and farl is None:
        farl = random_farl().to(model.device)
    arcface = ArcFace.from_onnx(args.arcface) if args.arcface else None
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    result = run_train_bench(
        model, farl, arcface, args.freeze, args.batch, args.refs, args.gradient_checkpointing, precision
    )
    return print_report(format_train_table(result), result, args.json)
