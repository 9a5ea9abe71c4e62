"""Guidance as weighted branches: each branch is one way of conditioning the denoiser.

Guided eps = sum(weight · eps(branch)). All branches run in one batched UNet call.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import cycle, islice

from ..choices import GUIDANCES, MAX_REF_SLOTS
from ..errors import RefFaceError, check_number


@dataclass(frozen=True)
class Branch:
    weight: float
    use_lq: bool  # False: the LQ latent is zeroed (∅)
    refs: tuple[int, ...] | None  # reference index per slot; None: zeroed reference latents (∅)


def refldm_branches(num_refs: int, scale: float, slots: int | None = None) -> list[Branch]:
    """ReF-LDM's CFG, e_u + s·(e_c − e_u), with e_u from zeroed reference latents."""
    refs = tuple(islice(cycle(range(num_refs)), slots or num_refs))
    return _nonzero([Branch(1.0 - scale, True, None), Branch(scale, True, refs)])


def multi_reference_branches(num_refs: int, s_i: float, s_c: float, slots: int | None = None) -> list[Branch]:
    """The paper's guidance: (1−s_i)·ε(∅,∅) + (s_i−s_c)·ε(lq,∅) + (s_c/N)·Σ_i ε(lq,c_i).

    ``slots`` repeats each reference, so a branch can see as many reference tokens as training did.
    """
    per_ref = [Branch(s_c / num_refs, True, (i,) * (slots or 1)) for i in range(num_refs)]
    return _nonzero([Branch(1.0 - s_i, False, None), Branch(s_i - s_c, True, None), *per_ref])


def make_branches(
    guidance: str, num_refs: int, scale: float, s_i: float, s_c: float, slots: int | None = None
) -> list[Branch]:
    if num_refs < 1:
        raise RefFaceError("guidance needs at least one reference")
    if slots is not None and not 1 <= slots <= MAX_REF_SLOTS:
        raise RefFaceError(f"reference slots must be between 1 and {MAX_REF_SLOTS}, got {slots}")
    for name, value in (("guidance scale", scale), ("s_i", s_i), ("s_c", s_c)):
        check_number(name, value)
    if guidance == "refldm":
        return refldm_branches(num_refs, scale, slots)
    if guidance == "multi_reference":
        return multi_reference_branches(num_refs, s_i, s_c, slots)
    raise RefFaceError(f"guidance must be one of {GUIDANCES}, got {guidance!r}")


def _nonzero(branches: list[Branch]) -> list[Branch]:
    return [b for b in branches if b.weight != 0.0]
