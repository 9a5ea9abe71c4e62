"""Convert the public ReF-LDM checkpoints (refldm.ckpt, vqgan.ckpt) into a RefFaceRestorer.

The architecture is read off the tensor shapes; only the attention head size is not in them.
Every source tensor is either converted or belongs to a known group that inference does not use.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

from ..checkpoints import weight_problems
from ..errors import RefFaceError, listing
from .config import UNET, weight_value_problems
from .restorer import RefFaceRestorer
from .unet import refldm_unet_config
from .vq import refldm_vq_config

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema.diffusion_model"
# Tensors a ReF-LDM or taming checkpoint carries that inference does not use.
IGNORED = re.compile(
    r"^(model_ema\.(decay|num_updates)|first_stage_model\..*|cond_stage_model\..*|perceptual_loss\..*|loss\..*|logvar"
    r"|betas|alphas_cumprod(_prev)?|sqrt_(recip_|recipm1_|one_minus_)?alphas_cumprod|log_one_minus_alphas_cumprod"
    r"|posterior_(variance|log_variance_clipped|mean_coef1|mean_coef2))$"
)
UNET_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
VQ_RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VQ_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

Converted = dict[str, tuple[str, torch.Tensor]]  # target name -> (source name, tensor)


def convert_refldm(
    unet_state: dict[str, torch.Tensor],
    vq_state: dict[str, torch.Tensor],
    head_channels: int = 32,
    use_ema: bool = True,
) -> RefFaceRestorer:
    """Build a RefFaceRestorer from ReF-LDM's UNet state dict and the VQ autoencoder's state dict."""
    check_head_channels(head_channels)
    unet_src = {k[len(UNET_PREFIX) :]: v for k, v in unet_state.items() if k.startswith(UNET_PREFIX)}
    if not unet_src:
        raise RefFaceError(f"no {UNET_PREFIX}* tensors found: is this ReF-LDM's refldm.ckpt?")
    vq_src = vq_state
    if any(k.startswith("first_stage_model.") for k in vq_state):
        vq_src = {k[len("first_stage_model.") :]: v for k, v in vq_state.items() if k.startswith("first_stage_model.")}
    unet_config = _infer_unet_config(unet_src, head_channels)
    vq_config = _infer_vq_config(vq_src)

    values = unet_src
    if use_ema:
        values = {}
        for name in unet_src:
            ema_name = EMA_PREFIX + name.replace(".", "")
            if ema_name in unet_state:
                values[name] = unet_state[ema_name]
        absent = [EMA_PREFIX + n.replace(".", "") for n in unet_src if n not in values]
        if absent:
            raise RefFaceError(listing("EMA weights missing (use --no-ema for the raw weights)", absent))

    target: Converted = {}
    unexpected = _convert(values, _unet_rule(unet_config), "unet.", UNET_PREFIX, target)
    unexpected += _convert(vq_src, _vq_rule(len(vq_config["block_out_channels"])), "vq.", "", target)
    vq_used = {src for src, _ in target.values() if not src.startswith(UNET_PREFIX)}
    unexpected += [
        k
        for k in unet_state
        if not k.startswith((UNET_PREFIX, EMA_PREFIX)) and not IGNORED.match(k) and k not in vq_used
    ]
    unexpected += [k for k in vq_state if k not in vq_used and not IGNORED.match(k) and k not in unet_state]

    with torch.device("meta"):
        model = RefFaceRestorer(unet_config, vq_config)
    weights = {k: t for k, (_, t) in target.items()}
    problems = [f"unexpected: {k}" for k in sorted(set(unexpected))]
    problems += weight_problems(model.state_dict(), weights, name=lambda k: target[k][0])
    problems += weight_value_problems(weights, name=lambda k: target[k][0])
    if problems:  # a legacy qkv tensor feeds q, k and v: name it once
        raise RefFaceError(listing("the checkpoints do not convert cleanly", list(dict.fromkeys(problems))))
    model.load_state_dict({k: t.float().contiguous() for k, t in weights.items()}, strict=True, assign=True)
    return model.eval()


def check_head_channels(head_channels: int) -> None:
    """Refuse a head size no layer could be split into, before any checkpoint is read."""
    if problem := UNET["attention_head_dim"](head_channels):
        raise RefFaceError(f"--num-head-channels {problem} (ReF-LDM's is 32)")


Rule = Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]] | None]


def _convert(source: dict[str, torch.Tensor], rule: Rule, prefix: str, src_prefix: str, out: Converted) -> list[str]:
    """Apply ``rule`` to every source tensor; return the names it does not recognise."""
    unknown = []
    for name, tensor in source.items():
        mapped = rule(name, tensor)
        if mapped is None:
            if not IGNORED.match(name):
                unknown.append(src_prefix + name)
            continue
        for target_name, value in mapped:
            out[prefix + target_name] = (src_prefix + name, value)
    return unknown


# -- UNet (openaimodel -> diffusers UNet2DModel) ------------------------------------------------------


def _infer_unet_config(src: dict[str, torch.Tensor], head_channels: int) -> dict:
    try:
        conv_in = src["input_blocks.0.0.weight"]
        model_channels, in_channels = conv_in.shape[:2]
        out_channels = src["out.2.weight"].shape[0]
        n_in = 1 + max(int(m.group(1)) for k in src if (m := re.match(r"input_blocks\.(\d+)\.", k)))
        downsamples = sorted(int(m.group(1)) for k in src if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
        num_res_blocks = downsamples[0] - 1 if downsamples else n_in - 1
        levels = n_in // (num_res_blocks + 1)
        firsts = [1 + level * (num_res_blocks + 1) for level in range(levels)]
        channel_mult = [src[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // model_channels for i in firsts]
    except KeyError as e:
        raise RefFaceError(f"cannot infer the UNet architecture from the checkpoint (no tensor {e})") from None
    except (ValueError, IndexError):
        raise RefFaceError("cannot infer the UNet architecture: the checkpoint has no input_blocks") from None
    attention = [f"input_blocks.{i}.1.qkv.weight" in src for i in firsts]
    for k, v in src.items():
        if k.endswith("qkv.weight") and (v.shape[1] % head_channels):
            raise RefFaceError(f"--num-head-channels {head_channels} does not divide the {v.shape[1]} channels of {k}")
    return refldm_unet_config(
        model_channels, channel_mult, attention, num_res_blocks, head_channels, in_channels, out_channels
    )


def _unet_rule(config: dict) -> Rule:
    per_level, head_channels = config["layers_per_block"] + 1, config["attention_head_dim"]

    def rule(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        module, _, param = name.rpartition(".")
        if module in UNET_FIXED:
            return [(f"{UNET_FIXED[module]}.{param}", t)]
        if m := re.match(r"input_blocks\.(\d+)\.(\d)\.(.+)$", name):
            level, j = divmod(int(m.group(1)) - 1, per_level)
            base = f"down_blocks.{level}"
            if j == per_level - 1:
                return [(f"{base}.downsamplers.0.conv.{m.group(3)[3:]}", t)] if m.group(3).startswith("op.") else None
            return _unet_part(base, j, m.group(2), m.group(3), t, head_channels)
        if m := re.match(r"middle_block\.(\d)\.(.+)$", name):
            index = int(m.group(1))
            if index == 1:
                return _attention("mid_block.attentions.0", m.group(2), t, head_channels)
            return _resblock(f"mid_block.resnets.{index // 2}", m.group(2), t)
        if m := re.match(r"output_blocks\.(\d+)\.(\d)\.(.+)$", name):
            level, j = divmod(int(m.group(1)), per_level)
            base = f"up_blocks.{level}"
            rest = m.group(3)
            if rest.startswith("conv."):
                return [(f"{base}.upsamplers.0.{rest}", t)]
            return _unet_part(base, j, m.group(2), rest, t, head_channels)
        return None

    return rule


def _unet_part(base: str, j: int, sub: str, rest: str, t: torch.Tensor, head_channels: int):
    if sub == "0":
        return _resblock(f"{base}.resnets.{j}", rest, t)
    if sub == "1":
        return _attention(f"{base}.attentions.{j}", rest, t, head_channels)
    return None


def _resblock(base: str, rest: str, t: torch.Tensor):
    module, _, param = rest.rpartition(".")
    return [(f"{base}.{RESBLOCK[module]}.{param}", t)] if module in RESBLOCK else None


def _attention(base: str, rest: str, t: torch.Tensor, head_channels: int):
    """Legacy layout: one qkv conv whose 3C channels are split per head first, then into q, k, v."""
    module, _, param = rest.rpartition(".")
    if module == "norm":
        return [(f"{base}.group_norm.{param}", t)]
    if module == "proj_out":
        return [(f"{base}.to_out.0.{param}", t.flatten(1) if param == "weight" else t)]
    if module == "qkv":
        channels = t.shape[0] // 3
        if t.shape[0] % (3 * head_channels):
            return [(f"{base}.to_q.{param}", t)]  # reported as mis-shaped
        per_head = t.reshape(channels // head_channels, 3, head_channels, -1)
        return [
            (f"{base}.to_{name}.{param}", per_head[:, i].reshape(channels, -1).squeeze(-1))
            for i, name in enumerate("qkv")
        ]
    return None


# -- VQ autoencoder (taming -> diffusers VQModel) -------------------------------------------------------


def _infer_vq_config(src: dict[str, torch.Tensor]) -> dict:
    try:
        channels, in_channels = src["encoder.conv_in.weight"].shape[:2]
        levels = 1 + max(int(m.group(1)) for k in src if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        num_res_blocks = 1 + max(
            int(m.group(1)) for k in src if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))
        )
        channel_mult = [src[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // channels for i in range(levels)]
        z_channels = src["encoder.conv_out.weight"].shape[0]
        embed_dim = src["quant_conv.weight"].shape[0]
        num_embeddings = src["quantize.embedding.weight"].shape[0]
        out_channels = src["decoder.conv_out.weight"].shape[0]
    except KeyError as e:
        raise RefFaceError(f"cannot infer the VQ architecture from the checkpoint (no tensor {e})") from None
    except ValueError:
        raise RefFaceError("cannot infer the VQ architecture: the checkpoint has no encoder.down blocks") from None
    if any(re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k) for k in src):
        raise RefFaceError("unsupported VQ autoencoder: attention inside the down/up levels (ReF-LDM's has none)")
    return refldm_vq_config(
        channels, channel_mult, num_res_blocks, z_channels, embed_dim, num_embeddings, in_channels, out_channels
    )


def _vq_rule(levels: int) -> Rule:
    def rule(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        if name in ("quantize.embedding.weight",) or name.startswith(("quant_conv.", "post_quant_conv.")):
            return [(name, t)]
        if m := re.match(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)$", name):
            module = "conv_norm_out" if m.group(2) == "norm_out" else m.group(2)
            return [(f"{m.group(1)}.{module}.{m.group(3)}", t)]
        if m := re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(\w+)\.(weight|bias)$", name):
            coder, part, module, param = m.groups()
            if part == "attn_1":
                if module not in VQ_ATTN:
                    return None
                return [
                    (f"{coder}.mid_block.attentions.0.{VQ_ATTN[module]}.{param}", t.flatten(1) if t.dim() == 4 else t)
                ]
            return _vq_resblock(f"{coder}.mid_block.resnets.{int(part[-1]) - 1}", module, param, t)
        if m := re.match(r"encoder\.down\.(\d+)\.(block\.(\d+)\.(\w+)|downsample\.conv)\.(weight|bias)$", name):
            base = f"encoder.down_blocks.{m.group(1)}"
            if m.group(3) is None:
                return [(f"{base}.downsamplers.0.conv.{m.group(5)}", t)]
            return _vq_resblock(f"{base}.resnets.{m.group(3)}", m.group(4), m.group(5), t)
        if m := re.match(r"decoder\.up\.(\d+)\.(block\.(\d+)\.(\w+)|upsample\.conv)\.(weight|bias)$", name):
            base = f"decoder.up_blocks.{levels - 1 - int(m.group(1))}"
            if m.group(3) is None:
                return [(f"{base}.upsamplers.0.conv.{m.group(5)}", t)]
            return _vq_resblock(f"{base}.resnets.{m.group(3)}", m.group(4), m.group(5), t)
        return None

    return rule


def _vq_resblock(base: str, module: str, param: str, t: torch.Tensor):
    return [(f"{base}.{VQ_RESBLOCK[module]}.{param}", t)] if module in VQ_RESBLOCK else None
