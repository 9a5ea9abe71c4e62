"""The sampling loop: a short function of (denoiser, x_T, solver)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import Cancelled
from .solvers import Solver

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]  # (step, total, x, pred_x0)


def run_sampler(
    denoise: Denoiser,
    x_T: torch.Tensor,
    solver: Solver,
    callback: StepCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Integrate from x_T over ``solver.timesteps``; ``cancel`` is polled before every step."""
    x = x_T
    total = len(solver.timesteps)
    for i, t in enumerate(solver.timesteps):
        if cancel is not None and cancel():
            raise Cancelled(f"sampling cancelled at step {i} of {total}")
        x, pred_x0 = solver.step(x, denoise(x, t), i)
        if callback is not None:
            callback(i + 1, total, x, pred_x0)
    return x
