import os
import tempfile

import pytest
import torch
from safetensors.torch import load_file
from support import GOLDEN, weights_of

# Face tests use the offline default models, whatever insightface packs this machine has.
os.environ["INSIGHTFACE_HOME"] = tempfile.mkdtemp(prefix="refface-no-insightface-")
os.environ.pop("REFFACE_FACE_MODELS", None)

from refface_core import RefFaceRestorer
from refface_core.model import convert_refldm


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
