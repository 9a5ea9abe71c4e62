"""FID: pytorch-fid's Inception as pyiqa runs it, checked against vectors pyiqa 0.1.16 made (random weights in the
public file format, real photos), the Fréchet distance against pyiqa / pytorch-fid and closed forms."""

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refface_core.errors import RefFaceError
from refface_core.evaluation.fid import (
    INCEPTION_WEIGHTS,
    InceptionFeatures,
    clean_resize,
    frechet_distance,
    load_statistics,
    preprocess,
    statistics,
)

_SCRIPT = Path(__file__).parent / "data" / "metrics" / "fid_noref_reference.py"
_spec = importlib.util.spec_from_file_location("fid_noref_reference", _SCRIPT)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

RERUN = f"inputs differ from the reference script's (another Pillow or numpy?): rerun {_SCRIPT.name}"


def to_input(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def expected() -> dict:
    with np.load(reference.FID_REFERENCE) as data:
        return {key: data[key] for key in data.files}


def random_weights(expected: dict) -> dict[str, torch.Tensor]:
    """The reference's random Inception state dict, rebuilt from its recorded layout and seed."""
    sizes = np.split(expected["dims"], np.cumsum(expected["ndims"])[:-1])
    names = [str(name) for name in expected["names"]]
    state = reference.random_inception_state(names, [tuple(int(d) for d in size) for size in sizes])
    return {name: torch.from_numpy(value) for name, value in state.items()}


def test_features_match_pyiqa_with_the_public_file_format(tmp_path, expected):
    state = random_weights(expected)
    torch.save(state, tmp_path / INCEPTION_WEIGHTS)
    model = InceptionFeatures.from_file(tmp_path / INCEPTION_WEIGHTS)
    images = reference.fid_inputs()
    assert reference.digest(images) == str(expected["digest"]), RERUN
    features = torch.cat([model(to_input(image)) for image in images]).numpy()
    assert features.shape == (4, 2048)
    assert features.std() > 0.1  # the random network is alive, not a constant
    np.testing.assert_allclose(features, expected["features"], rtol=1e-4, atol=1e-4)

    # a file without BN step counters (older PyTorch) or the unused classifier loads to the same network
    lean = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    torch.save(lean, tmp_path / "lean.pth")
    other = InceptionFeatures.from_file(tmp_path / "lean.pth")
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("size", [(384, 384), (244, 204), (299, 299), (512, 320)])
def test_preprocess_is_pils_float_bicubic_on_the_8_bit_image(size):
    """clean-fid's "clean" resize, as pyiqa reads each PNG: PIL resizes each channel as a float image, then clips."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    channels = [
        np.asarray(Image.fromarray(image[..., c].astype(np.float32)).resize((299, 299), Image.BICUBIC))
        for c in range(3)
    ]
    want = (np.clip(np.stack(channels), 0, 255) - 128) / 128
    got = preprocess(to_input(image) + 0.3 / 255)[0].numpy()  # off by less than half a level: the same PNG
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_clean_resize_keeps_what_pil_keeps():
    x = torch.rand(2, 3, 40, 50, dtype=torch.float64) * 300 - 20
    out = clean_resize(x, size=17)
    assert out.shape == (2, 3, 17, 17) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255
    flat = clean_resize(torch.full((1, 1, 40, 50), 77.0), size=17)
    torch.testing.assert_close(flat, torch.full_like(flat, 77.0))


def test_frechet_distance_matches_pyiqa_and_pytorch_fid(expected):
    for (a, b), want in zip(reference.gaussian_sets(), expected["frechet"], strict=True):
        assert frechet_distance(*statistics(a), *statistics(b)) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    root = rng.normal(size=(8, 8))
    sigma = root @ root.T + np.eye(8)
    # equal covariances: the trace terms cancel, leaving the squared distance of the means
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)
    assert frechet_distance(mu1, sigma, mu1, sigma) == pytest.approx(0, abs=1e-8)
    # diagonal covariances: a sum over independent 1-d Gaussians, (sqrt(a) - sqrt(b))² each
    a, b = rng.uniform(0.1, 4, 8), rng.uniform(0.1, 4, 8)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    assert frechet_distance(mu2, np.diag(b), mu1, np.diag(a)) == pytest.approx(want, rel=1e-10)


def test_statistics_and_the_statistics_file(tmp_path):
    features = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    mu, sigma = statistics(features)
    np.testing.assert_allclose(mu, features.double().mean(0).numpy())
    np.testing.assert_allclose(sigma, np.cov(features.double().numpy(), rowvar=False))
    np.savez(tmp_path / "stats.npz", mu=mu.astype(np.float32), sigma=sigma)
    loaded = load_statistics(tmp_path / "stats.npz")
    assert loaded[0].dtype == np.float64 and loaded[1].shape == (6, 6)
    np.testing.assert_allclose(loaded[1], sigma)
    with pytest.raises(RefFaceError, match="2 images at least"):
        statistics(features[:1])


def test_bad_files_say_what_was_expected(tmp_path):
    with pytest.raises(RefFaceError, match=f"missing.pth: not found; FID needs .*{INCEPTION_WEIGHTS}"):
        InceptionFeatures.from_file(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RefFaceError, match="junk.pth: not a PyTorch state dict"):
        InceptionFeatures.from_file(tmp_path / "junk.pth")
    torch.save(
        {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "head.weight": torch.zeros(2)}, tmp_path / "x.pth"
    )
    with pytest.raises(RefFaceError, match=r"x.pth: not .* keys \d+ missing .*; 1 unexpected \(head.weight\)"):
        InceptionFeatures.from_file(tmp_path / "x.pth")
    with zipfile.ZipFile(tmp_path / "inception-2015-12-05.pt", "w") as archive:  # how a TorchScript archive starts
        archive.writestr("inception/constants.pkl", b"")
        archive.writestr("inception/code/__torch__.py", b"")
    with pytest.raises(RefFaceError, match="TorchScript"):
        InceptionFeatures.from_file(tmp_path / "inception-2015-12-05.pt")

    with pytest.raises(RefFaceError, match="stats.npz: not found; FID needs an .npz with mu"):
        load_statistics(tmp_path / "stats.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4))
    with pytest.raises(RefFaceError, match="stats.npz: cannot read FID statistics"):
        load_statistics(tmp_path / "stats.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(RefFaceError, match="do not match"):
        load_statistics(tmp_path / "stats.npz")


def test_frechet_distance_rejects_what_is_not_a_pair_of_gaussians():
    with pytest.raises(RefFaceError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    # a "covariance" with a negative eigenvalue has no real square root
    with pytest.raises(RefFaceError, match="imaginary part"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
