"""Helpers shared by the tests: where the golden vectors are, and a tiny random model."""

from pathlib import Path

import torch

from refface_core import RefFaceRestorer
from refface_core.model import refldm_unet_config, refldm_vq_config

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "refldm"


def weights_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.startswith(("golden.", "cache."))}


def tiny_restorer(seed: int = 0, sample_size: int = 16) -> RefFaceRestorer:
    """A small random model (VQ factor 2, so 2·sample_size pixels) with a sharp init, so references matter."""
    torch.manual_seed(seed)
    model = RefFaceRestorer(
        refldm_unet_config(32, (1, 2), (False, True), 1, 8, sample_size=sample_size),
        refldm_vq_config(32, (1, 2), 1, 8, 8, 64),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()
