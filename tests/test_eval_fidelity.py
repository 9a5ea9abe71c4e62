"""PSNR and SSIM against pyiqa 0.1.16's default ``psnr`` and ``ssim``, the figures ReF-LDM's eval reports (reference
values: tests/data/metrics/lpips_fidelity_reference.npz)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from refface_core.errors import RefFaceError
from refface_core.evaluation.fidelity import psnr, ssim

REFERENCE = Path(__file__).parent / "data" / "metrics" / "lpips_fidelity_reference.npz"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """N×H×W×3 uint8 -> [N,3,H,W] float32 in [-1, 1], as the evaluation reads images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def pairs():
    reference = np.load(REFERENCE)
    pred, gt = to_tensor(reference["pred"]), to_tensor(reference["clean"][reference["gt_index"]])
    return pred, gt, reference["psnr"], reference["ssim"]


def test_psnr_matches_pyiqa(pairs):
    pred, gt, expected, _ = pairs
    scores = psnr(pred, gt)
    assert scores.shape == (len(pred),)
    # pyiqa computes in float32: its figures near 25 dB carry about 2e-6 dB of rounding
    np.testing.assert_allclose(scores.numpy(), expected, rtol=0, atol=1e-5)


def test_ssim_matches_pyiqa(pairs):
    pred, gt, _, expected = pairs
    scores = ssim(pred, gt)
    assert scores.shape == (len(pred),)
    # Luma x 255 is rounded to integers; for 8-bit RGB about 1 pixel in 2,500 lies exactly on a .5, which pyiqa's
    # float32 arithmetic breaks either way by rounding noise (3 of 36,864 pixels here round the other way than ours):
    # up to 1.1e-5 on these 64x64 crops, hence 3e-5. Every pair's figure differs from the others by far more.
    np.testing.assert_allclose(scores.numpy(), expected, rtol=0, atol=3e-5)
    # the colour-inverted pairs: their contrast-structure term is negative almost everywhere, clamped at 0 as pyiqa
    # does (without the clamp these would be about -0.55 to -0.61)
    assert (scores[2::3] > 0).all() and (scores[2::3] < 0.05).all()


def test_identical_images(pairs):
    _, gt, _, _ = pairs
    assert psnr(gt, gt).tolist() == pytest.approx([80.0] * len(gt))  # pyiqa's 1e-8 on the MSE, not inf
    assert ssim(gt, gt).tolist() == pytest.approx([1.0] * len(gt), abs=1e-12)


def test_each_image_is_scored_alone(pairs):
    pred, gt, _, _ = pairs
    torch.testing.assert_close(psnr(pred[4:5], gt[4:5]), psnr(pred, gt)[4:5])
    torch.testing.assert_close(ssim(pred[4:5], gt[4:5]), ssim(pred, gt)[4:5])


def test_ssim_sees_luma_only(pairs):
    """A change of colour that keeps Y = 0.299 R + 0.587 G + 0.114 B leaves SSIM at 1 (PSNR, on RGB, sees it)."""
    _, gt, _, _ = pairs
    base = gt[:1] / 2  # within [-0.5, 0.5]: the shift below does not clip
    shifted = base + torch.tensor([0.114, 0.0, -0.299]).view(1, 3, 1, 1) * 0.4  # red up, blue down: the same luma
    assert float(ssim(shifted, base)) > 0.999
    assert float(psnr(shifted, base)) < 30


def test_inputs_are_checked():
    image = torch.zeros(1, 3, 16, 16)
    with pytest.raises(RefFaceError, match=r"one shape, got \[1, 3, 16, 16\] and \[1, 1, 16, 16\]"):
        psnr(image, image[:, :1])
    with pytest.raises(RefFaceError, match=r"must be in \[-1, 1\], got values from 0 to 255"):
        ssim(image, torch.full_like(image, 255).index_fill(3, torch.tensor([0]), 0))
    with pytest.raises(RefFaceError, match="SSIM needs images of 11x11 pixels at least, got 10x16"):
        ssim(image[..., :10], image[..., :10])
