"""Solvers: ReF-LDM's exact DDIM, and DPM-Solver++ from diffusers on the same betas."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

from ..choices import SOLVERS
from ..errors import RefFaceError, check_number
from .schedule import TRAIN_STEPS, ddim_timesteps, refldm_alphas_cumprod, refldm_betas


class Solver(Protocol):
    timesteps: list[int]  # in sampling order (descending)

    def step(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step i of len(timesteps): returns (x_prev, pred_x0)."""
        ...


class DDIM:
    """DDIM as ReF-LDM's DDIMSampler does it, float32 constants and the last step to alpha-bar[0]."""

    def __init__(self, steps: int, spacing: str, eta: float = 0.0, generator: torch.Generator | None = None) -> None:
        ac = refldm_alphas_cumprod()
        ascending = ddim_timesteps(steps, spacing)
        self.alphas = ac[ascending]
        self.alphas_prev = torch.cat([ac[:1], ac[ascending[:-1]]])
        # numpy's float32 sqrt, as the original: torch's differs in the last bit for some values
        self.sqrt_one_minus_alphas = torch.from_numpy(np.sqrt(1.0 - self.alphas.numpy()))
        a, a_prev = self.alphas.double(), self.alphas_prev.double()
        self.sigmas = (eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()).float()
        self.timesteps = ascending.flip(0).tolist()
        self.generator = generator

    def step(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = len(self.timesteps) - 1 - i  # tables are ascending
        a_t, a_prev = self.alphas[index], self.alphas_prev[index]
        sigma = self.sigmas[index]
        pred_x0 = (x - self.sqrt_one_minus_alphas[index] * eps) / a_t.sqrt()
        x_prev = a_prev.sqrt() * pred_x0 + (1.0 - a_prev - sigma**2).sqrt() * eps
        if sigma > 0:
            noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)
            x_prev = x_prev + sigma * noise
        return x_prev, pred_x0


class DPMSolverPP:
    """diffusers' DPM-Solver++(2M) configured with ReF-LDM's betas and spacing."""

    def __init__(self, steps: int, spacing: str) -> None:
        self.scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=TRAIN_STEPS,
            trained_betas=refldm_betas().numpy(),
            solver_order=2,
            algorithm_type="dpmsolver++",
        )
        self.scheduler.set_timesteps(timesteps=ddim_timesteps(steps, spacing).flip(0).tolist())
        self.timesteps = self.scheduler.timesteps.tolist()
        self.alphas_cumprod = refldm_alphas_cumprod()

    def step(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a_t = self.alphas_cumprod[self.timesteps[i]]
        pred_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return self.scheduler.step(eps, self.timesteps[i], x).prev_sample, pred_x0


def make_solver(
    name: str, steps: int, spacing: str, eta: float = 0.0, generator: torch.Generator | None = None
) -> Solver:
    check_number("eta", eta, low=0)
    if name == "ddim":
        return DDIM(steps, spacing, eta, generator)
    if name == "dpmpp_2m":
        if eta != 0:
            raise RefFaceError("eta applies to the ddim solver only")
        return DPMSolverPP(steps, spacing)
    raise RefFaceError(f"solver must be one of {SOLVERS}, got {name!r}")
