"""ReF-LDM's denoiser as a diffusers UNet2DModel, with CacheKV reference attention.

CacheKV: each reference runs once through the UNet at t=0 on [reference latent, zeros]; every attention
layer records its keys and values. The main pass then attends to its own tokens plus those of its references.
The recorded keys and values travel in an explicit object passed through the forward call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]
Context = tuple[torch.Tensor, float]  # Composite Context tokens [rows, L, D] and the context scale


def refldm_unet_config(
    model_channels: int = 160,
    channel_mult: Sequence[int] = (1, 2, 2, 4),
    attention_levels: Sequence[bool] = (False, True, True, True),
    num_res_blocks: int = 2,
    head_channels: int = 32,
    in_channels: int = 16,
    out_channels: int = 8,
    sample_size: int = 64,
) -> dict[str, Any]:
    """UNet2DModel settings that reproduce ReF-LDM's openaimodel UNet (the defaults are the full model)."""
    return dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(model_channels * m for m in channel_mult),
        layers_per_block=num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)),
        attention_head_dim=head_channels,
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        time_embedding_type="positional",
    )


class KVRecorder:
    """Collects each attention layer's keys and values during a reference pass."""

    def __init__(self) -> None:
        self.layers: dict[str, KV] = {}

    def extend(self, name: str, k: torch.Tensor, v: torch.Tensor) -> KV:
        self.layers[name] = (k, v)
        return k, v

    def gather(self, slots: torch.Tensor) -> CacheKV:
        """Lay out the recorded passes for a main batch: row r attends to passes ``slots[r, 0..S-1]``."""
        rows, count = slots.shape

        def pick(t: torch.Tensor) -> torch.Tensor:
            _, heads, tokens, dim = t.shape
            return (
                t[slots.flatten()]
                .view(rows, count, heads, tokens, dim)
                .transpose(1, 2)
                .reshape(rows, heads, count * tokens, dim)
            )

        return CacheKV({name: (pick(k), pick(v)) for name, (k, v) in self.layers.items()})


class CacheKV:
    """Reference keys and values per attention layer, already laid out per main-batch row."""

    def __init__(self, layers: dict[str, KV]) -> None:
        self.layers = layers

    def extend(self, name: str, k: torch.Tensor, v: torch.Tensor) -> KV:
        ref_k, ref_v = self.layers[name]
        return torch.cat([k, ref_k], dim=2), torch.cat([v, ref_v], dim=2)


class ReferenceAttnProcessor(nn.Module):
    """Self-attention (SDPA) whose keys and values can be recorded or extended by a CacheKV object, plus,
    when ``context_width`` is set, decoupled cross-attention from the same queries to Composite Context tokens.

    The context projections have no bias and the output one starts at zero, so a fresh layer, or all-zero
    (dropped) context tokens, leave the backbone exactly as it was.
    """

    def __init__(self, name: str, channels: int | None = None, context_width: int | None = None) -> None:
        super().__init__()
        self.name = name
        self.has_context = context_width is not None
        if self.has_context:
            self.to_k_ctx = nn.Linear(context_width, channels, bias=False)
            self.to_v_ctx = nn.Linear(context_width, channels, bias=False)
            self.to_out_ctx = nn.Linear(channels, channels, bias=False)
            nn.init.zeros_(self.to_out_ctx.weight)

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        cache_kv: KVRecorder | CacheKV | None = None,
        context: Context | None = None,
    ) -> torch.Tensor:
        b, c, h, w = hidden_states.shape
        x = attn.group_norm(hidden_states).view(b, c, h * w).transpose(1, 2)
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, heads, c // heads).transpose(1, 2)

        def join(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).reshape(b, h * w, c)

        q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
        if cache_kv is not None:
            k, v = cache_kv.extend(self.name, k, v)
        out = attn.to_out[0](join(F.scaled_dot_product_attention(q, k, v)))
        if context is not None and self.has_context:
            tokens, scale = context
            cross = F.scaled_dot_product_attention(q, split(self.to_k_ctx(tokens)), split(self.to_v_ctx(tokens)))
            out = out + scale * self.to_out_ctx(join(cross))
        return out.transpose(1, 2).reshape(b, c, h, w) + hidden_states


def install_reference_attention(unet: UNet2DModel, context_width: int | None = None) -> None:
    """Give every attention layer a ReferenceAttnProcessor (with fresh context layers if ``context_width``)."""
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            module.set_processor(ReferenceAttnProcessor(name, module.to_q.out_features, context_width))


def unet_forward(
    unet: UNet2DModel,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    cache_kv: KVRecorder | CacheKV | None = None,
    context: Context | None = None,
    gradient_checkpointing: bool = False,
) -> torch.Tensor | None:
    """UNet2DModel's forward, with the CacheKV object and the context tokens handed to every attention layer.
    ``gradient_checkpointing`` recomputes the ResNet blocks in the backward pass instead of storing them. A reference
    pass (a KVRecorder) returns None once the last attention layer has recorded: nothing after it is used."""
    unrecorded = sum(isinstance(m, Attention) for m in unet.modules()) if isinstance(cache_kv, KVRecorder) else -1

    def attend(attn: Attention, h: torch.Tensor) -> torch.Tensor:
        nonlocal unrecorded
        unrecorded -= 1
        return attn.processor(attn, h, cache_kv=cache_kv, context=context)

    def run(resnet: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = h.contiguous()  # a channels-last input crashes torch 2.13's CPU convolution backward (seen in training)
        if gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(resnet, h, emb, use_reentrant=False)
        return resnet(h, emb)

    emb = unet.time_embedding(unet.time_proj(timesteps).to(unet.dtype))
    h = unet.conv_in(sample)
    skips = [h]
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None)
        for i, resnet in enumerate(block.resnets):
            h = run(resnet, h, emb)
            if attentions is not None:
                h = attend(attentions[i], h)
                if unrecorded == 0:
                    return None
            skips.append(h)
        if block.downsamplers is not None:
            h = block.downsamplers[0](h)
            skips.append(h)

    mid = unet.mid_block
    h = run(mid.resnets[0], h, emb)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        h = attend(attn, h)
        if unrecorded == 0:
            return None
        h = run(resnet, h, emb)

    for block in unet.up_blocks:
        attentions = getattr(block, "attentions", None)
        for i, resnet in enumerate(block.resnets):
            h = run(resnet, torch.cat([h, skips.pop()], dim=1), emb)
            if attentions is not None:
                h = attend(attentions[i], h)
                if unrecorded == 0:
                    return None
        if block.upsamplers is not None:
            h = block.upsamplers[0](h)

    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
