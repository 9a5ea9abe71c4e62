"""PSNR and SSIM exactly as pyiqa's default ``psnr`` and ``ssim`` metrics define them, which ReF-LDM's eval reports.

pyiqa 0.1.16, read from its source: ``psnr`` is on RGB in [0, 1] (data range 1), the MSE over all pixels and channels
plus 1e-8, no border crop. ``ssim`` is on the luma Y = 0.299 R + 0.587 G + 0.114 B (the Y of YIQ, no offset, not
BT.601's 16-235 YCbCr) scaled to 0-255 and rounded to integers, as MATLAB's uint8 images are; an 11x11 Gaussian window,
sigma 1.5, 'valid' filtering (no padding), no downsampling, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, the contrast-
structure term clamped at 0, and the mean of the SSIM map. Both are computed here in float64 (pyiqa's SSIM is float64
too), one score per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import RefFaceError

_LUMA = (0.299, 0.587, 0.114)
_WINDOW, _SIGMA = 11, 1.5
_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def check_image_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two batches of RGB images of one shape in [-1, 1]: a [0, 255] or mismatched pair would give silent nonsense."""
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
        shapes = f"{list(a.shape)} and {list(b.shape)}"
        raise RefFaceError(f"expected two [B, 3, H, W] image batches of one shape, got {shapes}")
    for image in (a, b):
        low, high = float(image.min()), float(image.max())
        if low < -1 - 1e-4 or high > 1 + 1e-4:
            raise RefFaceError(f"images must be in [-1, 1], got values from {low:g} to {high:g}")


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> float64 [0, 1], pyiqa's input range."""
    return (x.to(torch.float64) + 1) / 2


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB [B] of two [B, 3, H, W] batches in [-1, 1]; identical images give 80 dB (pyiqa's 1e-8), not inf."""
    check_image_pair(a, b)
    mse = (_unit(a) - _unit(b)).square().mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / (mse + 1e-8))


def _luma_255(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 1, H, W] integer luma 0-255 (float64), rounded half to even as pyiqa."""
    weights = torch.tensor(_LUMA, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    return ((_unit(x) * weights).sum(dim=1, keepdim=True) * 255).round()


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """The normalised 11x11 Gaussian (sigma 1.5) of MATLAB's fspecial, as a [1, 1, 11, 11] float64 kernel."""
    t = torch.arange(_WINDOW, dtype=torch.float64, device=device) - (_WINDOW - 1) / 2
    g = torch.exp(-(t**2) / (2 * _SIGMA**2))
    window = g[:, None] * g[None, :]
    return (window / window.sum()).view(1, 1, _WINDOW, _WINDOW)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM [B] of two [B, 3, H, W] batches in [-1, 1] (both sides 11 px at least), on their rounded luma."""
    check_image_pair(a, b)
    if min(a.shape[-2:]) < _WINDOW:
        raise RefFaceError(f"SSIM needs images of {_WINDOW}x{_WINDOW} pixels at least, got {a.shape[-1]}x{a.shape[-2]}")
    x, y = _luma_255(a), _luma_255(b)
    # the five local moments in one grouped convolution
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    window = _gaussian_window(a.device).expand(5, 1, _WINDOW, _WINDOW)
    mu_x, mu_y, xx, yy, xy = F.conv2d(moments, window, groups=5).unbind(dim=1)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + _C1) / (mu_x**2 + mu_y**2 + _C1)
    contrast_structure = ((2 * cov + _C2) / (var_x + var_y + _C2)).clamp(min=0)
    return (luminance * contrast_structure).mean(dim=(1, 2))
