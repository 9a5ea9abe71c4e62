from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refface_core import RefFaceRestorer
from refface_core.model import convert_refldm, refldm_unet_config, refldm_vq_config

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "refldm"


@pytest.fixture(scope="session")
def golden():
    """Loader for ../shared/golden/refldm/<name>.safetensors (skips where the folder is absent)."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN} (they sit in ../shared beside the checkout)")
    cache = {}

    def load(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            cache[name] = load_file(GOLDEN / f"{name}.safetensors")
        return cache[name]

    return load


def weights_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.startswith(("golden.", "cache."))}


@pytest.fixture(scope="session")
def golden_model(golden):
    """The tiny golden UNet ('tiny' or 'sharp' init) with the tiny golden VQ, converted."""
    models = {}

    def get(init: str) -> RefFaceRestorer:
        if init not in models:
            unet = weights_of(golden("unet_tiny" if init == "tiny" else "unet_tiny_sharp"))
            models[init] = convert_refldm(unet, weights_of(golden("vq_tiny")), head_channels=8, use_ema=False)
        return models[init]

    return get


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
