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
from diffusers.models.resnet import ResnetBlock2D
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

    def attend(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.layers[name] = (k, v)
        return F.scaled_dot_product_attention(q, k, v)

    def gather(self, slots: torch.Tensor) -> CacheKV:
        """Lay out the recorded passes for a main batch: row r attends to passes ``slots[r, 0..S-1]``."""
        return CacheKV(self.layers, slots)


class CacheKV:
    """Reference keys and values per attention layer, laid out per main-batch row.

    A row attends to its own tokens, then to those of its reference slots. S slots holding the same pass count
    once with a +ln S bias on their logits: softmax gives S identical keys S times the weight, so this is exact (up
    to the rounding of ln S in bf16/fp16, as for any logit), and a CFG row's S copies of ∅ cost one. Rows are
    grouped into runs with the same number of distinct passes; each run has one preallocated [rows, heads, own +
    reference tokens, d] buffer per layer with the reference part in place, so a step writes only its own tokens.
    With autograd, inside torch.compile (no mutated inputs, so CUDA graphs stay possible) or for a main pass of
    another size, they are concatenated instead."""

    def __init__(self, layers: dict[str, KV], slots: torch.Tensor) -> None:
        self.rows = len(slots)
        self.runs = _runs_of_distinct_passes(slots)
        self.layers = {
            name: [_laid_out(k, v, passes, counts) for _, passes, counts in self.runs]
            for name, (k, v) in layers.items()
        }

    def attend(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if len(k) != self.rows:
            raise ValueError(f"a main pass of {len(k)} rows, but the references are laid out for {self.rows}")
        own, outs = k.shape[2], []
        for (rows, _, _), (keys, values, room, ref_bias) in zip(self.runs, self.layers[name], strict=True):
            if own == room and not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
                keys[:, :, :own].copy_(k[rows])
                values[:, :, :own].copy_(v[rows])
            else:
                keys = torch.cat([k[rows], keys[:, :, room:]], dim=2)
                values = torch.cat([v[rows], values[:, :, room:]], dim=2)
            bias = None if ref_bias is None else F.pad(ref_bias, (own, 0))[:, None, None]  # own tokens: unbiased
            outs.append(F.scaled_dot_product_attention(q[rows], keys, values, attn_mask=bias))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _runs_of_distinct_passes(slots: torch.Tensor) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Split the rows into runs of consecutive rows with the same number U of distinct passes in their slots:
    (rows, passes [rows, U], how often each appears [rows, U])."""
    distinct = [torch.unique(row, return_counts=True) for row in slots.cpu()]
    runs, start = [], 0
    for end in range(1, len(distinct) + 1):
        if end == len(distinct) or len(distinct[end][0]) != len(distinct[start][0]):
            passes = torch.stack([d[0] for d in distinct[start:end]])
            counts = torch.stack([d[1] for d in distinct[start:end]])
            runs.append((slice(start, end), passes, counts))
            start = end
    return runs


def _laid_out(
    k: torch.Tensor, v: torch.Tensor, passes: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """Recorded [passes, heads, tokens, d] -> buffers [rows, heads, tokens + U·tokens, d] whose first ``tokens`` are
    room for the row's own keys or values, then those of its U passes; the room; the reference tokens' ln(count)
    bias [rows, U·tokens] (None if every count is 1)."""
    rows, count = passes.shape
    _, heads, tokens, dim = k.shape

    def buffer(t: torch.Tensor) -> torch.Tensor:
        out = t.new_empty(rows, heads, (1 + count) * tokens, dim)
        refs = out[:, :, tokens:].view(rows, heads, count, tokens, dim)
        refs.copy_(t[passes.flatten().to(t.device)].view(rows, count, heads, tokens, dim).transpose(1, 2))
        return out

    bias = None
    if (counts > 1).any():
        bias = counts.to(k.device, k.dtype).log().repeat_interleave(tokens, dim=1)
    return buffer(k), buffer(v), tokens, bias


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

        q, k, v = (split(t) for t in fused_qkv(attn, x).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v) if cache_kv is None else cache_kv.attend(self.name, q, k, v)
        out = attn.to_out[0](join(attended))
        if context is not None and self.has_context:
            tokens, scale = context
            cross = F.scaled_dot_product_attention(q, split(self.to_k_ctx(tokens)), split(self.to_v_ctx(tokens)))
            out = out + scale * self.to_out_ctx(join(cross))
        return hidden_states + out.transpose(1, 2).unflatten(2, (h, w))  # one strided read, not a copy first


def fused_qkv(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """q, k and v in one matmul: faster than three on CPU. The weights are concatenated per call (3·c² copied against
    a tokens·3·c² matmul), so training, ``.to()`` and offloading never leave a fused copy stale."""
    projections = (attn.to_q, attn.to_k, attn.to_v)  # diffusers gives all three a bias or none
    bias = None if attn.to_q.bias is None else torch.cat([p.bias for p in projections])
    return F.linear(x, torch.cat([p.weight for p in projections]), bias)


def install_reference_attention(unet: UNet2DModel, context_width: int | None = None) -> None:
    """Give every attention layer a ReferenceAttnProcessor (with fresh context layers if ``context_width``)."""
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            module.set_processor(ReferenceAttnProcessor(name, module.to_q.out_features, context_width))


def has_lean_form(resnet: ResnetBlock2D) -> bool:
    """SiLU, the time embedding added, no resampling: what ``lean_resnet`` computes (other configs run diffusers')."""
    plain = resnet.upsample is None and resnet.downsample is None and resnet.time_embedding_norm == "default"
    return plain and isinstance(resnet.nonlinearity, nn.SiLU) and not resnet.skip_time_act


def lean_resnet(resnet: ResnetBlock2D, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
    """ResnetBlock2D's forward for ReF-LDM's blocks (``has_lean_form``) without autograd: activations and additions
    in place, and no divide by an ``output_scale_factor`` of 1. ``emb_act`` = SiLU(emb)."""
    h = resnet.conv1(F.silu(resnet.norm1(x), inplace=True))
    h += resnet.time_emb_proj(emb_act)[:, :, None, None]
    h = resnet.conv2(resnet.dropout(F.silu(resnet.norm2(h), inplace=True)))
    h += x if resnet.conv_shortcut is None else resnet.conv_shortcut(x)
    return h if resnet.output_scale_factor == 1 else h.div_(resnet.output_scale_factor)


def unet_forward(
    unet: UNet2DModel,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    cache_kv: KVRecorder | CacheKV | None = None,
    context: Context | None = None,
    gradient_checkpointing: bool = False,
    rows: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """UNet2DModel's forward, with the CacheKV object and the context tokens handed to every attention layer.
    ``gradient_checkpointing`` recomputes the ResNet blocks in the backward pass instead of storing them. A reference
    pass (a KVRecorder) returns None once the last attention layer has recorded: nothing after it is used.
    ``rows`` gives each row of the batch as an index into ``sample``: rows with the same input (CFG's branches share
    x and the LQ latent) are computed once until the first attention layer, where their references first differ."""
    unrecorded = sum(isinstance(m, Attention) for m in unet.modules()) if isinstance(cache_kv, KVRecorder) else -1

    def attend(attn: Attention, h: torch.Tensor) -> torch.Tensor:
        nonlocal unrecorded, rows, emb, emb_act
        if rows is not None:
            h, emb, emb_act = h[rows], emb[rows], emb_act[rows]
            skips[:] = [skip[rows] for skip in skips]
            rows = None
        unrecorded -= 1
        return attn.processor(attn, h, cache_kv=cache_kv, context=context)

    def run(resnet: ResnetBlock2D, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and has_lean_form(resnet):
            return lean_resnet(resnet, h, emb_act)
        h = h.contiguous()  # a channels-last input crashes torch 2.13's CPU convolution backward (seen in training)
        if gradient_checkpointing:
            return torch.utils.checkpoint.checkpoint(resnet, h, emb, use_reentrant=False)
        return resnet(h, emb)

    emb = unet.time_embedding(unet.time_proj(timesteps).to(unet.dtype))
    emb_act = F.silu(emb)  # every block's time projection takes SiLU(emb)
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

    out = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return out if rows is None else out[rows]  # a UNet without attention layers
