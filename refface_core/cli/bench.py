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
    bench.add_argument(
        "--baseline",
        metavar="GITREF",
        help="compare with the code at this commit, branch or tag: both run the same benchmark in turns",
    )
    bench.add_argument("--repeat", type=int, default=2, help="--baseline: rounds of baseline, current (default 2)")
    bench.add_argument(
        "--timeout", type=float, default=3600, help="--baseline: seconds each run may take (default 3600)"
    )
    bench.add_argument(
        "--suite",
        choices=["gpu", "cpu"],
        help="time a grid of precisions, compile modes, references, guidance, batches",
    )
    bench.add_argument("--dry-run", action="store_true", help="--suite: walk the grid with a tiny model on the CPU")
    add_sampling_options(bench, steps=100, spacing="uniform")
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.json and not args.json.parent.is_dir():
        raise RefFaceError(f"folder for --json does not exist: {args.json.parent}")
    if args.suite:
        return run_suite(args)
    if args.dry_run:
        raise RefFaceError("--dry-run goes with --suite")
    if args.baseline:
        if args.compile:
            raise RefFaceError("--baseline compares eager runs (a baseline may have no --compile); drop --compile")
        return run_baseline(args)

    from ..bench import format_table, run_bench
    from ..model import RefFaceRestorer, pick_device

    device, dtype = pick_device(args.device, args.dtype)
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
    model.set_compile(args.compile)
    warmup = 1 if args.warmup is None and args.compile else args.warmup  # the timed run should not compile
    options = sampling_options(args)
    result = run_bench(model, refs=args.refs, batch=args.batch, warmup=warmup, farl=farl, **options)
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


def run_baseline(args: argparse.Namespace) -> int:
    """Both sides run in processes of their own; this one only directs them, without torch."""
    from ..bench_baseline import baseline_argv, compare, format_comparison

    if args.train:
        raise RefFaceError("--baseline compares restores; it cannot be combined with --train")
    result = compare(args.baseline, baseline_argv(vars(args)), args.repeat, args.timeout)
    return print_report(format_comparison(result), result, args.json)


def run_suite(args: argparse.Namespace) -> int:
    """Rows are printed, and the JSON rewritten, as cells finish: a run stopped at its time limit keeps its figures."""
    import json

    from ..bench_suite import format_suite_footer, format_suite_header, format_suite_row, run_suite
    from ..files import write_atomic

    if args.baseline or args.train or args.model:
        raise RefFaceError("--suite times its own grid on random weights; it takes no --baseline, --train or --model")

    def show(result: dict) -> None:
        if len(result["cells"]) == 1:
            print(format_suite_header(result))
        print(format_suite_row(result["cells"][-1]), flush=True)
        if args.json:
            write_atomic(args.json, lambda f: Path(f).write_text(json.dumps(result, indent=2)))

    result = run_suite(args.suite, args.dry_run, show)
    if args.json:
        write_atomic(args.json, lambda f: Path(f).write_text(json.dumps(result, indent=2)))
    print(format_suite_footer(result))
    if failed := [c for c in result["cells"] if "error" in c]:
        raise RefFaceError(f"{len(failed)} cell(s) failed, the first with {failed[0]['error']} (tracebacks in --json)")
    return 0
