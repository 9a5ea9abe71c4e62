"""Fréchet Inception Distance as pyiqa's ``fid`` metric computes it, the FID that ReF-LDM reports.

pyiqa (``create_metric('fid')``, default mode "clean") reads each restored PNG as 8-bit RGB, resizes every channel
as a float image with PIL's antialiased bicubic to 299×299 (clean-fid's "clean" resize), clips to [0, 255], maps
with (x - 128) / 128 and takes the 2048-d average-pool features of pytorch-fid's FID Inception
(``pt_inception-2015-12-05-6726825d.pth``, the TensorFlow 2015-12-05 graph as a PyTorch state dict). The reference
statistics (``ffhq_clean_trainval70k_512.npz``: ``mu`` [2048], ``sigma`` [2048, 2048]) are clean-fid's. The distance
is d² = |mu1 - mu2|² + Tr(S1 + S2 - 2 sqrtm(S1 S2)), the square root taken by scipy as pytorch-fid and pyiqa do.

clean-fid computed those statistics with its own port of the same TensorFlow graph (a TorchScript file,
``inception-2015-12-05.pt``, not loadable as weights); pyiqa, and so ReF-LDM, takes the restored faces' features
from pytorch-fid's port, as here, so the small gap between the two ports is part of ReF-LDM's figures too.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from ..errors import RefFaceError

INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FFHQ_STATISTICS = "ffhq_clean_trainval70k_512.npz"
FEATURES = 2048
SIZE = 299


class _Conv(nn.Module):
    """Convolution without bias, batch norm (TensorFlow's eps 1e-3) and ReLU: the state dict's ``conv`` and ``bn``."""

    def __init__(
        self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _average3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3×3 average pool leaves the padding out of the mean
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """35×35 block: 1×1, 5×5, double 3×3 and pooled branches."""

    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        five = self.branch5x5_2(self.branch5x5_1(x))
        return torch.cat([self.branch1x1(x), five, double, self.branch_pool(_average3(x))], 1)


class _ReductionB(nn.Module):
    """35×35 -> 17×17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedC(nn.Module):
    """17×17 block with factorised 7×7 convolutions."""

    def __init__(self, cin: int, mid: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, mid, 1)
        self.branch7x7_2 = _Conv(mid, mid, **row)
        self.branch7x7_3 = _Conv(mid, 192, **col)
        self.branch7x7dbl_1 = _Conv(cin, mid, 1)
        self.branch7x7dbl_2 = _Conv(mid, mid, **col)
        self.branch7x7dbl_3 = _Conv(mid, mid, **row)
        self.branch7x7dbl_4 = _Conv(mid, mid, **col)
        self.branch7x7dbl_5 = _Conv(mid, 192, **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(_average3(x))], 1)


class _ReductionD(nn.Module):
    """17×17 -> 8×8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = layer(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):
    """8×8 block with split 1×3 / 3×1 outputs; the FID graph's last block pools by max, not by average."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _average3(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(three),
                self.branch3x3_2b(three),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            1,
        )


def cubic_kernel(x: np.ndarray) -> np.ndarray:
    """The bicubic kernel (a = -0.5) of PIL's resize and MATLAB's imresize."""
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _pil_weights(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] weights of PIL's antialiased bicubic resize along one axis (its support widens when shrinking)."""
    scale = size_in / size_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        centre = (i + 0.5) * scale
        first = max(int(np.floor(centre - support + 0.5)), 0)
        last = min(int(np.floor(centre + support + 0.5)), size_in)
        taps = np.arange(first, last)
        w = cubic_kernel((taps - centre + 0.5) / stretch)
        weights[i, first:last] = w / w.sum()
    return weights


def clean_resize(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """[B,C,H,W] float 0..255 -> [B,C,size,size], as PIL resizes a float ("F") image with BICUBIC: width first,
    each pass summed in float64 and stored as float32, then clipped to [0, 255] (clean-fid's "clean" resize)."""
    height, width = images.shape[-2:]
    rows = torch.from_numpy(_pil_weights(height, size)).to(images.device)
    cols = torch.from_numpy(_pil_weights(width, size)).to(images.device)
    x = images.double()
    if width != size:
        x = (x @ cols.T).float().double()
    if height != size:
        x = (rows @ x).float().double()
    return x.float().clamp(0, 255)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1, 1] -> the Inception input: 8-bit levels (the PNGs pyiqa reads), clean resize, (x-128)/128."""
    levels = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    return (clean_resize(levels) - 128) / 128


class InceptionFeatures(nn.Module):
    """pytorch-fid's FID Inception-v3 (the TensorFlow graph's pooling quirks) up to its 2048-d average pool.

    Module names follow the public state dict, so its weights load as they are; its classifier (``fc``) is unused.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _MixedA(192, 32)
        self.Mixed_5c = _MixedA(256, 64)
        self.Mixed_5d = _MixedA(288, 64)
        self.Mixed_6a = _ReductionB(288)
        self.Mixed_6b = _MixedC(768, 128)
        self.Mixed_6c = _MixedC(768, 160)
        self.Mixed_6d = _MixedC(768, 160)
        self.Mixed_6e = _MixedC(768, 192)
        self.Mixed_7a = _ReductionD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> InceptionFeatures:
        """The network with the weights of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a state dict)."""
        path = Path(path)
        expected = f"pytorch-fid's FID Inception state dict ({INCEPTION_WEIGHTS})"
        if not path.is_file():
            raise RefFaceError(
                f"{path}: not found; FID needs {expected}, from pytorch-fid's GitHub release fid_weights"
            )
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if any(name.endswith("constants.pkl") for name in archive.namelist()):
                    raise RefFaceError(f"{path} is a TorchScript model (clean-fid's?); FID needs {expected}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            reason = str(error).strip().splitlines()[0][:120]
            raise RefFaceError(f"{path}: not a PyTorch state dict ({reason}); FID needs {expected}") from None
        if not isinstance(state, dict):
            raise RefFaceError(f"{path} holds a {type(state).__name__}, not a state dict; FID needs {expected}")
        model = cls()
        wanted = model.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        for key in wanted:  # absent in state dicts saved before PyTorch 0.4.1, unused in inference
            if key.endswith("num_batches_tracked"):
                state.setdefault(key, wanted[key])
        missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
        wrong = [k for k in wanted if k in state and tuple(state[k].shape) != tuple(wanted[k].shape)]
        if missing or unexpected or wrong:
            problems = [f"{len(missing)} missing ({', '.join(missing[:3])})"] if missing else []
            problems += [f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})"] if unexpected else []
            problems += [f"{len(wrong)} of another shape ({', '.join(wrong[:3])})"] if wrong else []
            raise RefFaceError(f"{path}: not {expected}: keys {'; '.join(problems)}")
        model.load_state_dict(state)
        return model

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """The network alone: a preprocessed [B,3,299,299] batch -> [B, 2048]."""
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = getattr(self, name)(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{block}")(x)
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1, 1] (any size) -> [B, 2048] float32 features, as pyiqa computes them from the PNGs."""
        weight = self.Conv2d_1a_3x3.conv.weight
        return self.pool_features(preprocess(images.to(weight.device)).to(weight.dtype))


def statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of [N, D] features, N >= 2: one Gaussian per image set."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise RefFaceError(f"FID statistics need [N, D] features of 2 images at least, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a clean-fid / pytorch-fid statistics file (.npz with ``mu`` [D] and ``sigma`` [D, D])."""
    path = Path(path)
    expected = f"an .npz with mu [{FEATURES}] and sigma [{FEATURES}, {FEATURES}] such as clean-fid's {FFHQ_STATISTICS}"
    if not path.is_file():
        raise RefFaceError(f"{path}: not found; FID needs {expected}")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise RefFaceError(f"{path}: cannot read FID statistics ({error}); expected {expected}") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise RefFaceError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match; expected {expected}")
    return mu, sigma


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed as pytorch-fid and pyiqa do.

    A product whose square root is not finite is retried with ``eps`` on both diagonals; an imaginary part left by
    rounding is dropped unless the diagonal's exceeds 1e-3, which means the inputs are not covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise RefFaceError(
            f"FID: the Gaussians do not match: mu {mu1.shape} and {mu2.shape}, sigma {sigma1.shape} and {sigma2.shape}"
        )
    with warnings.catch_warnings():  # fewer images than dimensions make the product singular, as expected
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(root).all():
            offset = np.eye(sigma1.shape[0]) * eps
            root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise RefFaceError(
                f"FID: sqrtm(sigma1 sigma2) has an imaginary part of {np.abs(root.imag).max():.3g}; "
                "the statistics are not valid covariances"
            )
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))
