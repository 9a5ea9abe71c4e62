"""Options that several commands share, and how they are read."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..choices import DEVICE_NAMES, DTYPE_NAMES, GUIDANCES, SOLVERS, SPACINGS
from ..errors import RefFaceError

if TYPE_CHECKING:
    from accelerate import PartialState


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        help="RefFace model folder (default $REFFACE_HOME/models/refldm, fetched by `refface download` on first use)",
    )


def add_face_models_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--face-models",
        type=Path,
        metavar="DIR",
        help="insightface model folder (e.g. buffalo_l) or OpenCV Zoo folder (default: $REFFACE_FACE_MODELS, else a "
        "pack in ~/.insightface/models, else the bundled YuNet + SFace)",
    )


def add_colorize_option(parser: argparse.ArgumentParser, source: str = "photo") -> None:
    parser.add_argument(
        "--colorize", action="store_true", help=f"keep the model's colours (default: the {source}'s tone, e.g. sepia)"
    )


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help=f"{', '.join(DEVICE_NAMES)} or cuda:N (default auto: cuda, then mps, then cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default="auto",
        help="auto: bf16 on CUDA and on CPUs with AMX, else fp32 (default)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet: faster steps after a first call that compiles (minutes at full size)",
    )


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
    add_device_options(parser)


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
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


def print_report(table: str, result: dict, json_path: Path | None) -> int:
    """A benchmark's table and its JSON, also written to ``json_path``."""
    text = json.dumps(result, indent=2)
    print(f"{table}\n{text}")
    if json_path:
        json_path.write_text(text)
    return 0


def process_state(args: argparse.Namespace) -> PartialState:
    """This process's accelerate state, `accelerate launch --cpu` read as Accelerator reads it, with a day's wait
    at the collectives (the other processes wait while the main one fetches the model or reads an album). Under
    several processes each runs on its own device: --device auto becomes it, another --device is refused."""
    from datetime import timedelta

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timedelta(days=1))
    device = "cpu" if state.device.type == "cpu" else str(state.device)  # not "cpu:0", which torch refuses
    if state.num_processes > 1:
        if args.device not in ("auto", device):
            raise RefFaceError(f"under accelerate each process runs on its own device ({device} here): leave "
                               f"--device at auto, not {args.device}")  # fmt: skip
        args.device = device
    return state
