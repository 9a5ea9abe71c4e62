from .guidance import GUIDANCES, Branch, make_branches
from .sampler import run_sampler
from .schedule import SPACINGS, ddim_timesteps, refldm_alphas_cumprod, refldm_betas
from .solvers import DDIM, SOLVERS, make_solver

__all__ = [
    "DDIM",
    "GUIDANCES",
    "SOLVERS",
    "SPACINGS",
    "Branch",
    "ddim_timesteps",
    "make_branches",
    "make_solver",
    "refldm_alphas_cumprod",
    "refldm_betas",
    "run_sampler",
]
