"""Images to and from the model's tensors: PIL, numpy or tensor in; [1, 3, H, W] in [-1, 1] out."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import RefFaceError

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]


def to_model_tensor(image: ImageLike, size: int) -> torch.Tensor:
    """[1, 3, size, size] float32 in [-1, 1] from a square RGB image.

    Tensors are [3, H, W] or [1, 3, H, W] in [0, 1]; arrays are H×W×3 (uint8 or float in [0, 1]).
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise RefFaceError(f"expected an H×W×3 RGB array, got shape {image.shape}")
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise RefFaceError(f"expected uint8 pixels or floats in [0, 1], got {image.dtype}")
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: PIL-backed arrays are read-only
    if not isinstance(image, torch.Tensor):
        raise RefFaceError(f"expected a PIL image, an H×W×3 array or a tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise RefFaceError(f"expected uint8 pixels or floats in [0, 1], got {image.dtype}")
    x = check_finite(image.float() / 255.0 if image.dtype == torch.uint8 else image.float())
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[:2] != (1, 3):
        raise RefFaceError(f"expected one RGB image, got shape {tuple(image.shape)}")
    h, w = x.shape[-2:]
    if h == 0:
        raise RefFaceError("the image is empty (0×0)")
    if h != w:
        raise RefFaceError(f"expected a square, aligned face crop, got {w}×{h}")
    if h != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1) * 2 - 1


def check_finite(pixels: torch.Tensor) -> torch.Tensor:
    """Refuse NaN and inf pixels: they would pass the clamps as black or white and give black faces."""
    if not torch.isfinite(pixels).all():
        raise RefFaceError("the image holds NaN or infinite values; check the node or code that made it")
    return pixels


def from_model_tensor(x: torch.Tensor, like: ImageLike) -> ImageLike:
    """Map a [1, 3, H, W] model output in [-1, 1] back to the kind of image ``like`` is."""
    x01 = ((x[0].float() + 1) / 2).clamp(0, 1)
    if isinstance(like, torch.Tensor):
        return x01.to(like.device)[None] if like.dim() == 4 else x01.to(like.device)
    array = x01.permute(1, 2, 0).cpu().numpy()
    if isinstance(like, np.ndarray) and like.dtype != np.uint8:
        return array
    u8 = (array * 255).round().astype(np.uint8)
    return u8 if isinstance(like, np.ndarray) else Image.fromarray(u8)
