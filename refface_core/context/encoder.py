"""The Composite Context encoder: one reference's identity and appearance as a fixed-length token sequence.

The third, low-level part of the context, the reference's VQ latent, reaches the UNet through CacheKV.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RefFaceError

IDENTITY, APPEARANCE = 0, 1  # token types


def composite_context_config(
    width: int = 512,
    identity_encoder: str = "arcface",
    identity_dim: int = 512,
    identity_tokens: int = 4,
    appearance_encoder: str = "farl-vit-b16",
    appearance_width: int = 768,
    appearance_layers: tuple[int, ...] = (4, 8, 12),
    appearance_grid: int = 4,
) -> dict[str, Any]:
    """Settings of a CompositeContextEncoder (the defaults: ArcFace 512-d and FaRL ViT-B/16)."""
    return dict(
        width=width, identity_encoder=identity_encoder, identity_dim=identity_dim, identity_tokens=identity_tokens,
        appearance_encoder=appearance_encoder, appearance_width=appearance_width,
        appearance_layers=list(appearance_layers), appearance_grid=appearance_grid,
    )  # fmt: skip


class CompositeContextEncoder(nn.Module):
    """Identity tokens (MLP on the L2-normalised embedding) + appearance tokens (CLS and pooled patches of
    several ViT depths, projected), with type and position embeddings."""

    def __init__(
        self,
        width: int,
        identity_encoder: str,
        identity_dim: int,
        identity_tokens: int,
        appearance_encoder: str,
        appearance_width: int,
        appearance_layers: list[int],
        appearance_grid: int,
    ) -> None:
        super().__init__()
        self.identity_encoder, self.identity_dim, self.identity_tokens = identity_encoder, identity_dim, identity_tokens
        self.appearance_encoder, self.appearance_layers = appearance_encoder, list(appearance_layers)
        self.grid = appearance_grid
        self.identity = nn.Sequential(
            nn.Linear(identity_dim, 2 * width), nn.GELU(), nn.Linear(2 * width, identity_tokens * width)
        )
        self.identity_norm = nn.LayerNorm(width)
        self.appearance = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(appearance_width), nn.Linear(appearance_width, width)) for _ in appearance_layers
        )
        self.type_embedding = nn.Embedding(2, width)
        self.num_tokens = identity_tokens + len(appearance_layers) * (1 + appearance_grid**2)
        self.position = nn.Parameter(torch.randn(self.num_tokens, width) * 0.02)

    @property
    def width(self) -> int:
        return self.position.shape[1]

    def check_identity(self, embeddings: torch.Tensor) -> None:
        if embeddings.shape[-1] != self.identity_dim:
            raise RefFaceError(
                f"identity embeddings are {embeddings.shape[-1]}-d, but this model's context expects "
                f"{self.identity_encoder} {self.identity_dim}-d ones (use a matching face model, e.g. an "
                "insightface pack for ArcFace)"
            )

    def forward(self, identity: torch.Tensor, appearance: list[torch.Tensor]) -> torch.Tensor:
        """identity [R, identity_dim]; appearance: ViT hidden states [R, 1+patches, width] per layer -> [R, L, D]."""
        self.check_identity(identity)
        rows = identity.shape[0]
        identity = F.normalize(identity.float(), dim=-1).to(self.position.dtype)
        tokens = [self.identity_norm(self.identity(identity).view(rows, self.identity_tokens, -1))]
        types = [IDENTITY] * self.identity_tokens
        for project, hidden in zip(self.appearance, appearance, strict=True):
            side = int((hidden.shape[1] - 1) ** 0.5)
            patches = hidden[:, 1:].transpose(1, 2).reshape(rows, -1, side, side)
            pooled = F.adaptive_avg_pool2d(patches, self.grid).flatten(2).transpose(1, 2)
            tokens.append(project(torch.cat([hidden[:, :1], pooled], dim=1).to(self.position.dtype)))
            types += [APPEARANCE] * (1 + self.grid**2)
        type_ids = torch.tensor(types, device=self.position.device)
        return torch.cat(tokens, dim=1) + self.type_embedding(type_ids) + self.position
