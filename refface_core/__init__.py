"""RefFace: reference-guided identity-preserving face restoration."""

from .errors import Cancelled, RefFaceError
from .model import RefFaceRestorer

__all__ = ["Cancelled", "RefFaceError", "RefFaceRestorer"]
__version__ = "0.1.0"
