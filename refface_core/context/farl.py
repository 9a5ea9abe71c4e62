"""FaRL's image tower (a CLIP ViT) on transformers' CLIPVisionModel, loaded from the public checkpoint format:
an OpenAI-CLIP state dict under ``state_dict`` with the image tower under ``visual.*``."""

from __future__ import annotations

import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ..checkpoints import load_checkpoint, weight_problems
from ..errors import RefFaceError, listing

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
         "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
TOP = {"ln_pre": "vision_model.pre_layrnorm", "ln_post": "vision_model.post_layernorm"}


class FaRLEncoder(nn.Module):
    """Frozen ViT whose hidden states at several depths feed the appearance tokens."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.model = CLIPVisionModelWithProjection(config).eval().requires_grad_(False)

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def hidden_states(self, faces: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Aligned faces [B,3,H,W] in [-1,1] -> the hidden states [B, 1+patches, width] after each of ``layers``."""
        size = self.model.config.image_size
        x = F.interpolate((faces + 1) / 2, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        x = ((x.clamp(0, 1) - mean) / std).to(self.model.dtype)
        states = self.model(pixel_values=x, output_hidden_states=True).hidden_states
        return [states[layer].float() for layer in layers]

    @classmethod
    def from_openai_state_dict(cls, state: dict[str, torch.Tensor]) -> FaRLEncoder:
        visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        if not visual:
            raise RefFaceError("no visual.* tensors: not a FaRL / OpenAI-CLIP checkpoint")
        try:
            width, _, patch, _ = visual["conv1.weight"].shape
            layers = 1 + max(int(m.group(1)) for k in visual if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)))
            config = CLIPVisionConfig(
                hidden_size=width,
                intermediate_size=visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=layers,
                num_attention_heads=width // 64,
                image_size=patch * math.isqrt(visual["positional_embedding"].shape[0] - 1),
                patch_size=patch,
                projection_dim=visual["proj"].shape[1],
                hidden_act="quick_gelu",
            )
        except (KeyError, ValueError) as e:
            raise RefFaceError(f"cannot read the FaRL architecture from the checkpoint (looked for {e})") from None
        encoder = cls(config)
        mapped, unknown = {}, []
        for name, tensor in visual.items():
            target = _hf_name(name)
            if target is None:
                unknown.append(f"visual.{name}")
            elif name.startswith("transformer.") and name.endswith(("in_proj_weight", "in_proj_bias")):
                for part, chunk in zip(("q", "k", "v"), tensor.chunk(3), strict=True):
                    mapped[target.replace("{qkv}", part)] = chunk
            else:
                mapped[target] = tensor.t() if name == "proj" else tensor
        problems = [f"unexpected: {k}" for k in unknown] + weight_problems(encoder.model.state_dict(), mapped)
        if problems:
            raise RefFaceError(listing("the FaRL checkpoint does not match a CLIP ViT", problems))
        encoder.model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True)
        return encoder


def _hf_name(name: str) -> str | None:
    """transformers' name for an OpenAI-CLIP ``visual.*`` tensor ({qkv} marks a fused projection)."""
    fixed = {
        "class_embedding": "vision_model.embeddings.class_embedding",
        "positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "proj": "visual_projection.weight",
    }
    if name in fixed:
        return fixed[name]
    module, _, param = name.rpartition(".")
    if module in TOP:
        return f"{TOP[module]}.{param}"
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", name)
    if m is None:
        return None
    base, rest = f"vision_model.encoder.layers.{m.group(1)}", m.group(2)
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        return f"{base}.self_attn.{{qkv}}_proj.{rest.rpartition('_')[2]}"
    module, _, param = rest.rpartition(".")
    return f"{base}.{BLOCK[module]}.{param}" if module in BLOCK else None


def load_farl(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> FaRLEncoder:
    """A FaRL checkpoint file (.pth/.ckpt via weights_only, or .safetensors) -> FaRLEncoder."""
    return FaRLEncoder.from_openai_state_dict(load_checkpoint(path)).to(device=device, dtype=dtype)
