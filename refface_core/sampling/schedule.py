"""ReF-LDM's noise schedule and DDIM timestep spacing."""

from __future__ import annotations

import torch

from ..choices import SPACINGS
from ..errors import RefFaceError

TRAIN_STEPS = 1000


def refldm_betas(linear_start: float = 0.0015, linear_end: float = 0.0155) -> torch.Tensor:
    """float64 betas of the 'linear' schedule: linspace in sqrt-space, squared."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, TRAIN_STEPS, dtype=torch.float64) ** 2


def refldm_alphas_cumprod() -> torch.Tensor:
    """Alpha-bar as the model uses it: cumprod in float64, stored as float32."""
    return torch.cumprod(1.0 - refldm_betas(), dim=0).float()


def ddim_timesteps(steps: int, spacing: str) -> torch.Tensor:
    """Ascending DDIM timesteps, ReF-LDM's 'uniform' (1, c+1, ...) or 'uniform_trailing' (..., 999), c = 1000 // steps.

    Where ``steps`` does not divide 1000, ReF-LDM yields an extra step (or a timestep of 1000, out of range);
    here the count is always ``steps``. The two agree whenever ``steps`` divides 1000.
    """
    if not 0 < steps <= TRAIN_STEPS:
        raise RefFaceError(f"steps must be in 1..{TRAIN_STEPS}, got {steps}")
    offsets = torch.arange(steps) * (TRAIN_STEPS // steps)
    if spacing == "uniform":
        if steps == TRAIN_STEPS:
            raise RefFaceError(f"'uniform' spacing allows at most {TRAIN_STEPS - 1} steps (it starts at t=1)")
        return offsets + 1
    if spacing == "uniform_trailing":
        return (TRAIN_STEPS - offsets).flip(0) - 1
    raise RefFaceError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
