"""LPIPS, VGG variant, version 0.1: the perceptual distance ReF-LDM reports (pyiqa's ``lpips-vgg``, which is the lpips
package's model).

Read from lpips 0.1.4 and pyiqa 0.1.16: images in [-1, 1] are shifted and scaled per channel (the ScalingLayer: v0.1;
v0.0 skipped it), run through torchvision's ImageNet VGG16 ``features``, tapped after relu1_2, relu2_2, relu3_3, relu4_3
and relu5_3; each tap is divided by its channel-wise L2 norm (+1e-10) at each pixel, the squared difference of the two
images' taps weighted per channel by a learned 1x1 convolution (no bias), averaged over the pixels, and the five layers
summed. The weights come from the two public files; no torchvision import is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import RefFaceError
from .fidelity import check_image_pair

# torchvision's vgg16().features up to relu5_3: channels of each 3x3 convolution, "M" a 2x2 max-pool
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CHANNELS = (64, 128, 256, 512, 512)
# lpips' ScalingLayer: (x - shift) / scale maps [-1, 1] images onto ImageNet's normalisation
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_BACKBONE_FILE = "torchvision's VGG16 ImageNet state dict (vgg16-397923af.pth)"
_LINEAR_FILE = "lpips' v0.1 linear layers (lpips/weights/v0.1/vgg.pth)"


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS distance [B] between two [B, 3, H, W] batches in [-1, 1]; frozen, in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, backbone: str | os.PathLike, linear: str | os.PathLike) -> LPIPS:
        """The model from torchvision's ``vgg16-397923af.pth`` (its ``classifier`` keys are ignored) and lpips'
        ``weights/v0.1/vgg.pth`` (keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``)."""
        model = cls()
        features = _load(backbone, _BACKBONE_FILE)
        wanted = {f"features.{k}": v for k, v in model.features.state_dict().items()}
        unexpected = sorted(k for k in features if k.startswith("features.") and k not in wanted)
        if unexpected:
            raise RefFaceError(f"{backbone} is not {_BACKBONE_FILE}: unexpected key {unexpected[0]}")
        picked = _pick(features, wanted, backbone, _BACKBONE_FILE)
        model.features.load_state_dict({k[len("features.") :]: v for k, v in picked.items()})
        wanted = {f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(model.lins)}
        picked = _pick(_load(linear, _LINEAR_FILE), wanted, linear, _LINEAR_FILE)
        model.lins.load_state_dict({f"{i}.weight": picked[k] for i, k in enumerate(wanted)})
        return model

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _TAPS:
                taps.append(x)
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        check_image_pair(a, b)
        both = (torch.cat([a, b]).to(self.shift.dtype) - self.shift) / self.scale  # one pass through the trunk
        distance = torch.zeros(a.shape[0], dtype=self.shift.dtype, device=a.device)
        for tap, lin in zip(self._taps(both), self.lins, strict=True):
            unit = tap / (tap.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fa, fb = unit.chunk(2)
            distance = distance + lin((fa - fb).square()).mean(dim=(1, 2, 3))
        return distance


def _load(path: str | os.PathLike, expected: str) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a torch file, or a one-line RefFaceError naming the file and what it should be."""
    if not Path(path).is_file():
        raise RefFaceError(f"LPIPS weights not found: {path} (expected {expected})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # lpips' file holds CUDA tensors
    except Exception as error:  # a torch file of another kind, or no torch file at all
        raise RefFaceError(f"{path} is not a PyTorch state dict: expected {expected}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RefFaceError(f"{path} is not a state dict of tensors: expected {expected}")
    return state


def _pick(
    state: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor], path: str | os.PathLike, expected: str
) -> dict[str, torch.Tensor]:
    """``wanted``'s keys from ``state`` as float32, each of the shape of its ``wanted`` tensor."""
    picked = {}
    for key, like in wanted.items():
        if key not in state:
            raise RefFaceError(f"{path} has no {key}: expected {expected}")
        if state[key].shape != like.shape:
            shapes = f"{list(state[key].shape)} instead of {list(like.shape)}"
            raise RefFaceError(f"{path}: {key} has shape {shapes}: expected {expected}")
        picked[key] = state[key].float()
    return picked
