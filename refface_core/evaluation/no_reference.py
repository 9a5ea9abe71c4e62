"""No-reference quality: NIQE, as pyiqa's ``niqe`` metric computes it (the NIQE that ReF-LDM reports).

NIQE (Mittal, Soundararajan and Bovik, 2013) fits a Gaussian to 36 natural-scene statistics of 96×96 blocks (18 at
full size, 18 at half size: generalised-Gaussian fits of the locally normalised luminance and of its products with
four neighbours) and measures its distance to a "pristine" Gaussian fitted on clean photos. Lower is better. The
pristine model is the authors' ``niqe_modelparameters.mat`` (``mu_prisparam`` [1, 36], ``cov_prisparam`` [36, 36]),
the file pyiqa's ``niqe`` loads; the user supplies it.

pyiqa's steps, kept here: the luminance is YIQ's Y of the 8-bit image, 0..255, rounded; the image is cropped to
whole blocks; the rest is float64, except where pyiqa's arithmetic decides a score's last digits and is kept as it
is: the 7×7 Gaussian window (sigma 7/6) of the local normalisation has float32 weights, which sets the signs in
flat, saturated areas; the half-size image (MATLAB's antialiased bicubic imresize, symmetric borders) is float32; so
are the shape table's steps. Blocks with an undefined statistic drop out of the covariance but keep their defined
ones in the mean.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RefFaceError
from .fid import cubic_kernel

NIQE_PARAMETERS = "niqe_modelparameters.mat"
NIQE_SOURCE = "the NIQE authors' release (LIVE, UT Austin: niqe_release.zip), the file pyiqa's 'niqe' metric downloads"
BLOCK = 96

# The AGGD shape search table, 0.2 to 10 in steps of 0.001 as the authors' code has it, its steps in float32 as
# pyiqa's are (float64 steps would move a block's fitted shape by 0.001 where its ratio falls between two entries).
_SHAPES = torch.arange(0.2, 10.0005, 0.001, dtype=torch.float32).double()
_RATIOS = torch.exp(2 * torch.lgamma(2 / _SHAPES) - torch.lgamma(1 / _SHAPES) - torch.lgamma(3 / _SHAPES))
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])


def _gaussian_window(size: int = 7, sigma: float = 7 / 6) -> torch.Tensor:
    offsets = np.arange(size) - (size - 1) / 2
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    window /= window.sum()
    return torch.from_numpy(window.astype(np.float32)).double()[None, None]


_WINDOW = _gaussian_window()


def _filter(y: torch.Tensor) -> torch.Tensor:
    """``y`` [B,1,H,W] correlated with the window, borders replicated. Tap by tap, since float64 conv2d is slow on CPU;
    on the full-size (integer) luminance every product and sum is exact in float64, whatever the order."""
    pad = _WINDOW.shape[-1] // 2
    padded = F.pad(y, (pad,) * 4, mode="replicate")
    h, w = y.shape[-2:]
    out = torch.zeros_like(y)
    for (i, j), weight in np.ndenumerate(_WINDOW[0, 0].numpy()):
        out.add_(padded[..., i : i + h, j : j + w], alpha=float(weight))
    return out


def _normalise(y: torch.Tensor) -> torch.Tensor:
    """Mean-subtracted, contrast-normalised luminance (y - mu) / (sigma + 1), [B,1,H,W] float64."""
    mu = _filter(y)
    sigma = torch.sqrt((_filter(y * y) - mu * mu).abs() + torch.finfo(torch.float64).eps)
    return (y - mu) / (sigma + 1)


def _aggd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric generalised Gaussian fit of each row of [N, P]: shape, left and right scale (NaN when undefined)."""
    square = x * x
    negative, positive = x < 0, x > 0
    left_std = torch.sqrt(square.where(negative, 0).sum(1) / negative.sum(1))
    right_std = torch.sqrt(square.where(positive, 0).sum(1) / positive.sum(1))
    gamma = left_std / right_std
    r_hat = x.abs().mean(1) ** 2 / square.mean(1)
    r_norm = r_hat * (gamma**3 + 1) * (gamma + 1) / (gamma**2 + 1) ** 2
    # the table's nearest ratio (it increases with the shape), the lower one on a tie; an undefined ratio (a block
    # without negative or positive values) takes the first shape, as MATLAB's min over all-NaN differences does
    shapes, ratios = _SHAPES.to(x.device), _RATIOS.to(x.device)
    above = torch.searchsorted(ratios, r_norm.nan_to_num()).clamp(1, len(ratios) - 1)
    below_nearer = (r_norm - ratios[above - 1]).abs() <= (ratios[above] - r_norm).abs()
    alpha = torch.where(r_norm.isnan(), shapes[0], shapes[above - below_nearer.long()])
    scale = torch.exp(torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)).sqrt()
    return alpha, left_std * scale, right_std * scale


def _block_features(image: torch.Tensor, block: int) -> torch.Tensor:
    """[B,1,H,W] normalised luminance, H and W whole blocks -> [B, blocks, 18]."""
    b, _, h, w = image.shape
    blocks = image.reshape(b, h // block, block, w // block, block).permute(0, 1, 3, 2, 4).reshape(-1, block, block)
    products = [blocks * torch.roll(blocks, shift, dims=(1, 2)) for shift in _SHIFTS]
    alpha, left, right = (v.reshape(5, -1) for v in _aggd(torch.cat([blocks, *products]).flatten(1)))
    mean = (right - left) * torch.exp(torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha))
    features = [alpha[0], (left[0] + right[0]) / 2]
    for k in range(1, 5):
        features += [alpha[k], mean[k], left[k], right[k]]
    return torch.stack(features, 1).reshape(b, -1, 18)


# MATLAB's imresize(..., 0.5, 'bicubic') weighs 8 inputs per output (antialiased: the kernel stretched twice); the
# weights are short binary fractions, exact in float32, and sum to 1.
_HALF_TAPS = torch.from_numpy(cubic_kernel((np.arange(8) - 3.5) / 2) / 2).float()


def _half(y: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W] (H, W even) -> half size, as MATLAB's imresize with symmetric borders, and in pyiqa's arithmetic:
    float32 from float32(y / 255), each axis (rows first) a sum of the taps in order, so scores equal pyiqa's to the
    last digits (exact float64 would move them by ~1e-4 where a block's fitted shape lands on the table's next step)."""
    x = (y / 255).float()
    taps = _HALF_TAPS.to(x.device)
    for dim in (-2, -1):
        size = x.shape[dim]
        mirror = torch.cat([torch.arange(size), torch.arange(size).flip(0)]).to(x.device)
        first = 2 * torch.arange(size // 2, device=x.device) - 3
        out = x.index_select(dim, mirror[first % (2 * size)]) * taps[0]
        for k in range(1, len(taps)):
            out = out + x.index_select(dim, mirror[(first + k) % (2 * size)]) * taps[k]
        x = out
    return x.double() * 255


def _luminance(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1, 1] -> [B,1,H,W] float64: YIQ's Y of the 8-bit image (the PNG pyiqa reads), 0..255, rounded."""
    rgb = ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 255
    yiq = rgb.permute(0, 2, 3, 1) @ _YIQ.T.to(rgb.device)
    return (yiq[..., :1] * 255).round().permute(0, 3, 1, 2).double()


class NIQE:
    """NIQE scores with a pristine model: ``NIQE.from_file(path)(images)`` -> [B] float64, lower is better."""

    def __init__(self, mu: np.ndarray | torch.Tensor, cov: np.ndarray | torch.Tensor) -> None:
        self.mu = torch.as_tensor(np.asarray(mu), dtype=torch.float64).reshape(-1)
        self.cov = torch.as_tensor(np.asarray(cov), dtype=torch.float64)
        if self.mu.numel() != 36 or self.cov.shape != (36, 36):
            raise RefFaceError(
                f"NIQE needs a 36-d pristine mean and 36×36 covariance, not {self.mu.numel()}, {tuple(self.cov.shape)}"
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> NIQE:
        """The pristine model of ``niqe_modelparameters.mat`` (MATLAB file with mu_prisparam and cov_prisparam)."""
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError

        path = Path(path)
        if not path.is_file():
            raise RefFaceError(f"{path}: not found; NIQE needs {NIQE_PARAMETERS}, from {NIQE_SOURCE}")
        try:
            params = loadmat(path)
            mu, cov = params["mu_prisparam"], params["cov_prisparam"]
        except (OSError, ValueError, KeyError, MatReadError) as error:
            raise RefFaceError(
                f"{path}: not NIQE parameters ({error}); expected {NIQE_PARAMETERS} with mu_prisparam and "
                f"cov_prisparam, from {NIQE_SOURCE}"
            ) from None
        return cls(mu, cov)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1, 1], at least 96×96 -> [B] NIQE, NaN for a flat image (on the device of ``images``)."""
        if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < BLOCK:
            raise RefFaceError(f"NIQE needs [B,3,H,W] images of {BLOCK}×{BLOCK} at least, got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        y = _luminance(images)[..., : h // BLOCK * BLOCK, : w // BLOCK * BLOCK]
        features = torch.cat(
            [_block_features(_normalise(y), BLOCK), _block_features(_normalise(_half(y)), BLOCK // 2)], 2
        )
        mu_pristine, cov_pristine = self.mu.to(y.device), self.cov.to(y.device)
        scores = []
        for rows in features:
            finite = rows[~rows.isnan().any(1)]
            if not len(finite):  # a flat image: no block has every statistic (pyiqa fails on it)
                scores.append(torch.tensor(torch.nan, dtype=torch.float64, device=y.device))
                continue
            cov = torch.cov(finite.T, correction=1 if len(finite) > 1 else 0)
            diff = mu_pristine - rows.nanmean(0)
            scores.append(torch.sqrt(diff @ torch.linalg.pinv((cov_pristine + cov) / 2) @ diff))
        return torch.stack(scores)
