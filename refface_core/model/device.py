"""Where a restore runs, and in which weight precision."""

from __future__ import annotations

import torch

from ..choices import DTYPE_NAMES
from ..errors import RefFaceError

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16), strict=True))


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto`` takes CUDA, then Apple's MPS, then the CPU. The automatic precision is bf16 on CUDA (fp16 on GPUs
    without bf16) and on CPUs with AMX (``fast_cpu_bf16``); fp32 on other CPUs and on MPS (bf16 only from macOS 14)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise RefFaceError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RefFaceError(f"device {device} was asked for, but this torch build sees no CUDA GPU")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise RefFaceError(f"there is no {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise RefFaceError(f"device {device} was asked for, but MPS is not available (it needs an Apple-silicon Mac)")
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise RefFaceError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if dtype == "auto":
        dtype = "fp32"
        if chosen.type == "cuda":
            dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif chosen.type == "cpu" and fast_cpu_bf16():
            dtype = "bf16"
    if dtype not in DTYPES:
        raise RefFaceError(f"unknown precision {dtype!r}; use auto, {', '.join(DTYPES)}")
    return chosen, DTYPES[dtype]


def fast_cpu_bf16() -> bool:
    """Whether this CPU has AMX tiles (Xeon Sapphire Rapids and later), where a full-size UNet call ran 3.6× faster
    in bf16 than in fp32. Asked at run time: without AMX (AVX-512 bf16 alone, or AVX2) bf16 was not measured faster."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(is_amx and is_amx())
