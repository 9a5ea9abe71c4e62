"""The `refface` command line (also `python -m refface_core`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import RefFaceError
from .sampling import GUIDANCES, SOLVERS, SPACINGS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (RefFaceError, ValueError) as e:  # the library raises ValueError for out-of-range options
        print(f"refface: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("refface: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refface", description="Reference-guided face restoration.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    convert = commands.add_parser("convert", help="convert ReF-LDM's refldm.ckpt + vqgan.ckpt into a RefFace model")
    convert.add_argument("--refldm-unet", required=True, type=Path, help="refldm.ckpt (or .safetensors)")
    convert.add_argument("--refldm-vq", required=True, type=Path, help="vqgan.ckpt (or .safetensors)")
    convert.add_argument("--num-head-channels", type=int, default=32, help="attention head size (default 32)")
    convert.add_argument("--no-ema", action="store_true", help="use the raw UNet weights instead of the EMA ones")
    convert.add_argument("--out", required=True, type=Path, help="output model folder")
    convert.set_defaults(run=run_convert)

    restore = commands.add_parser("restore", help="restore an aligned face crop using reference faces")
    restore.add_argument("--model", required=True, type=Path, help="RefFace model folder (from `refface convert`)")
    restore.add_argument("--input", required=True, type=Path, help="low-quality aligned face crop")
    restore.add_argument("--ref", required=True, action="append", type=Path, help="aligned reference face (repeat)")
    restore.add_argument("--out", required=True, type=Path, help="output image (.png, .jpg, ...)")
    add_sampling_options(restore)
    restore.add_argument("--seed", type=int, default=2024, help="noise seed (default 2024, as ReF-LDM)")
    restore.set_defaults(run=run_restore)

    bench = commands.add_parser("bench", help="time a restore stage by stage (random weights unless --model)")
    bench.add_argument("--model", type=Path, help="RefFace model folder (default: full-size ReF-LDM, random)")
    bench.add_argument("--refs", type=int, default=5, help="references per face (default 5)")
    bench.add_argument("--batch", type=int, default=1, help="faces per batch (default 1)")
    bench.add_argument("--warmup", type=int, help="warm-up runs (default 1 on CUDA, 0 on CPU)")
    bench.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    add_sampling_options(bench, steps=100, spacing="uniform")
    bench.set_defaults(run=run_bench)
    return parser


def add_sampling_options(parser: argparse.ArgumentParser, steps: int = 50, spacing: str = "uniform_trailing") -> None:
    parser.add_argument("--steps", type=int, default=steps, help=f"sampling steps (default {steps})")
    parser.add_argument("--spacing", choices=SPACINGS, default=spacing, help=f"timestep spacing (default {spacing})")
    parser.add_argument("--solver", choices=SOLVERS, default="ddim", help="ddim (ReF-LDM's) or dpmpp_2m")
    parser.add_argument(
        "--guidance",
        choices=GUIDANCES,
        default="refldm",
        help="refldm: CFG on the references; multi_reference: the paper's N-reference guidance",
    )
    parser.add_argument("--scale", type=float, default=1.5, help="refldm guidance scale (default 1.5)")
    parser.add_argument("--s-i", type=float, default=1.2, help="multi_reference LQ-image scale s_i (default 1.2)")
    parser.add_argument("--s-c", type=float, default=1.2, help="multi_reference reference scale s_c (default 1.2)")
    parser.add_argument("--ref-slots", type=int, help="repeat references to fill this many slots per branch")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=[*DTYPES, "auto"], default="auto", help="default bf16 on CUDA, else fp32")


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RefFaceError(f"unknown device {args.device!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RefFaceError("--device cuda was asked for, but this torch build sees no CUDA GPU")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, DTYPES[dtype]


def sampling_options(args: argparse.Namespace) -> dict:
    return dict(
        steps=args.steps,
        spacing=args.spacing,
        solver=args.solver,
        guidance=args.guidance,
        scale=args.scale,
        s_i=args.s_i,
        s_c=args.s_c,
        ref_slots=args.ref_slots,
    )


def run_convert(args: argparse.Namespace) -> int:
    from .model import convert_refldm, load_checkpoint

    model = convert_refldm(
        load_checkpoint(args.refldm_unet), load_checkpoint(args.refldm_vq), args.num_head_channels, not args.no_ema
    )
    model.save_pretrained(args.out)
    unet_params = sum(p.numel() for p in model.unet.parameters())
    vq_params = sum(p.numel() for p in model.vq.parameters())
    weights = "raw" if args.no_ema else "EMA"
    print(f"wrote {args.out} (UNet {unet_params:,} parameters, {weights} weights; VQ {vq_params:,} parameters)")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from . import RefFaceRestorer
    from .images import check_output_path, load_image, save_image

    check_output_path(args.out)
    lq = load_image(args.input)
    refs = [load_image(path) for path in args.ref]
    device, dtype = resolve_device(args)
    model = RefFaceRestorer.from_pretrained(args.model, device=device, dtype=dtype)
    with tqdm(total=args.steps, desc="restoring", unit="step", disable=None) as bar:

        def progress(step: int, total: int, *_: object) -> None:
            bar.total = total
            bar.update(step - bar.n)

        restored = model.restore(lq, refs, seed=args.seed, callback=progress, **sampling_options(args))
    save_image(restored, args.out)
    print(f"wrote {args.out}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from . import RefFaceRestorer
    from .bench import format_table, run_bench

    device, dtype = resolve_device(args)
    if args.model:
        model = RefFaceRestorer.from_pretrained(args.model, device=device, dtype=dtype)
    else:
        model = RefFaceRestorer().to(device=device, dtype=dtype).eval()
    result = run_bench(model, refs=args.refs, batch=args.batch, warmup=args.warmup, **sampling_options(args))
    print(format_table(result))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0
