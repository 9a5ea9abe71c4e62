"""`refface convert`: ReF-LDM's checkpoints into a RefFace model folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_to(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser("convert", help="convert ReF-LDM's refldm.ckpt + vqgan.ckpt into a RefFace model")
    convert.add_argument("--refldm-unet", required=True, type=Path, help="refldm.ckpt (or .safetensors)")
    convert.add_argument("--refldm-vq", required=True, type=Path, help="vqgan.ckpt (or .safetensors)")
    convert.add_argument("--num-head-channels", type=int, default=32, help="attention head size (default 32)")
    convert.add_argument("--no-ema", action="store_true", help="use the raw UNet weights instead of the EMA ones")
    convert.add_argument("--out", required=True, type=Path, help="output model folder (a new one)")
    convert.add_argument(
        "--add-composite-context",
        action="store_true",
        help="add zero-initialised Composite Context layers (ArcFace + FaRL ViT-B/16), ready for fine-tuning",
    )
    convert.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import RefFaceError
    from ..files import check_writable_folder, path_kind, write_folder_atomic
    from ..model import convert_refldm, load_checkpoint
    from ..model.convert import check_head_channels

    check_head_channels(args.num_head_channels)
    if path_kind(args.out) != "missing":  # checked before the slow part
        raise RefFaceError(f"--out {args.out} exists; move it away or give a new folder for the model")
    check_writable_folder(args.out.parent)
    model = convert_refldm(
        load_checkpoint(args.refldm_unet), load_checkpoint(args.refldm_vq), args.num_head_channels, not args.no_ema
    )
    if args.add_composite_context:
        from ..context import composite_context_config

        model.add_composite_context(composite_context_config())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_folder_atomic(args.out, model.save_pretrained)
    unet_params = sum(p.numel() for p in model.unet.parameters())
    vq_params = sum(p.numel() for p in model.vq.parameters())
    weights = "raw" if args.no_ema else "EMA"
    context = "" if model.context_encoder is None else ", with zero-initialised Composite Context layers"
    print(
        f"wrote {args.out} (UNet {unet_params:,} parameters, {weights} weights; VQ {vq_params:,} parameters{context})"
    )
    return 0
