"""Reading checkpoint files and checking state dicts against a model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import RefFaceError


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from .safetensors, or .ckpt loaded with weights_only (Lightning's
    ``state_dict`` entry unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise RefFaceError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as e:  # a damaged file fails anywhere in the unpickler (IndexError, KeyError, ...)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RefFaceError(
            f"cannot load {path} as a checkpoint ({first_line}). "
            "RefFace reads .safetensors, or .ckpt files that torch.load opens with weights_only=True."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RefFaceError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == b"PK"


def weight_problems(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], name: Callable[[str], str] = str
) -> list[str]:
    """Missing, unexpected and mis-shaped tensors of ``given``; ``name`` says what to call a given key."""
    problems = [f"missing: {k}" for k in expected if k not in given]
    problems += [f"unexpected: {name(k)}" for k in given if k not in expected]
    problems += [
        f"shape of {name(k)}: {tuple(t.shape)}, expected {tuple(expected[k].shape)}"
        for k, t in given.items()
        if k in expected and t.shape != expected[k].shape
    ]
    return problems
