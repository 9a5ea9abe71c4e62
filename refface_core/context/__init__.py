"""Composite Context: identity (ArcFace) and appearance (FaRL, in ``context.farl``) tokens per reference."""

from .encoder import CompositeContextEncoder, composite_context_config

__all__ = ["CompositeContextEncoder", "composite_context_config"]
