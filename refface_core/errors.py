"""The errors RefFace reports to its users, and the checks that raise them."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from .choices import MAX_SEED


class RefFaceError(Exception):
    """A problem with the user's input or files: the message says what is wrong and how to fix it."""


class Cancelled(RefFaceError):
    """Sampling was stopped by the cancel hook."""


def check_number(name: str, value: float, low: float = -math.inf, high: float = math.inf) -> None:
    """A finite number from ``low`` to ``high``: NaN or inf would give black faces, silently."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise RefFaceError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        bounds = f"from {low:g} to {high:g}" if math.isfinite(high) else f"at least {low:g}"
        raise RefFaceError(f"{name} must be {bounds}, got {value:g}")


def check_seeds(seeds: Sequence[int]) -> None:
    if not seeds:
        raise RefFaceError("at least one seed is needed")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
            raise RefFaceError(f"seed must be a whole number from 0 to {MAX_SEED} (2**63 - 1), got {seed!r}")


def listing(title: str, items: list[str], limit: int = 30) -> str:
    """A multi-line message naming every item (up to ``limit``)."""
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n  " + "\n  ".join(items[:limit]) + more
