"""ReF-LDM's VQ-f8 first stage as a diffusers VQModel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def refldm_vq_config(
    channels: int = 128,
    channel_mult: Sequence[int] = (1, 1, 2, 4),
    num_res_blocks: int = 2,
    z_channels: int = 8,
    embed_dim: int = 8,
    num_embeddings: int = 8192,
    in_channels: int = 3,
    out_channels: int = 3,
) -> dict[str, Any]:
    """VQModel settings that reproduce taming's VQ autoencoder (the defaults are ReF-LDM's vqgan.yaml)."""
    levels = len(channel_mult)
    return dict(
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(channels * m for m in channel_mult),
        layers_per_block=num_res_blocks,
        act_fn="silu",
        latent_channels=z_channels,
        vq_embed_dim=embed_dim,
        num_vq_embeddings=num_embeddings,
        norm_num_groups=32,
        scaling_factor=1.0,
        sample_size=512,
    )
