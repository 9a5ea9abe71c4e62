"""RefFace: reference-guided identity-preserving face restoration."""

from typing import TYPE_CHECKING, Any

from .errors import Cancelled, RefFaceError

if TYPE_CHECKING:
    from .model import RefFaceRestorer

__all__ = ["Cancelled", "RefFaceError", "RefFaceRestorer"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """RefFaceRestorer is imported on first use: it brings torch and diffusers, which a CLI's --help does not need."""
    if name == "RefFaceRestorer":
        from .model import RefFaceRestorer

        return RefFaceRestorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
