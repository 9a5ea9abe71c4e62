"""Build Composite Context: one person's references prepared once, reused by every restore downstream."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .runtime import Offloadable, load_on_device, to_arrays
from .types import ContextType, FaRLModel, Identity, IdentityType, RefFaceModel


class BuildCompositeContext(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceBuildContext",
            display_name="Build Composite Context",
            category="RefFace",
            description="Encodes the reference faces for the restorer: their latents (CacheKV) and, for models with "
            "Composite Context, ArcFace identity and FaRL appearance tokens. ComfyUI caches it, so one person's "
            "references are prepared once for many photos.",
            inputs=[
                RefFaceModel.Input("model", tooltip="From Load RefFace Model."),
                io.Image.Input("references", tooltip="Aligned reference crops, from Load Reference Faces."),
                FaRLModel.Input("farl", optional=True, tooltip="Composite Context models only: Load FaRL Encoder."),
                IdentityType.Input(
                    "identity",
                    optional=True,
                    tooltip="Composite Context models only: one ArcFace embedding per reference (insightface pack).",
                ),
            ],
            outputs=[ContextType.Output(display_name="context")],
        )

    @classmethod
    def execute(
        cls,
        model: Offloadable,
        references: torch.Tensor,
        farl: Offloadable | None = None,
        identity: Identity | None = None,
    ) -> io.NodeOutput:
        restorer, *encoder = load_on_device(model, *([farl] if farl is not None else []))
        embeddings = identity.embeddings if identity is not None else None
        return io.NodeOutput(restorer.encode_context(to_arrays(references), embeddings, *encoder))
