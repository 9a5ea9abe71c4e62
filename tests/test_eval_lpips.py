"""LPIPS (VGG, v0.1), loaded from the two public file formats, against the lpips package's own output (reference
values: tests/data/metrics/lpips_fidelity_reference.npz, whose script also checked that pyiqa's lpips-vgg agrees)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from refface_core.errors import RefFaceError
from refface_core.evaluation.lpips import LPIPS

METRICS = Path(__file__).parent / "data" / "metrics"
LINEAR = METRICS / "lpips_vgg_v0.1.pth"


def _reference_script():
    spec = importlib.util.spec_from_file_location("lpips_fidelity_reference", METRICS / "lpips_fidelity_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """N×H×W×3 uint8 -> [N,3,H,W] float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(METRICS / "lpips_fidelity_reference.npz"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, reference):
    """The reference's random VGG16 trunk saved as torchvision's file is (a classifier key included, to be ignored)."""
    state = _reference_script().random_vgg16()
    sums = np.array([float(v.double().abs().sum()) for v in state.values()])
    # the same seeded weights as when the reference was made (a NumPy that changed its normal stream would show here)
    np.testing.assert_allclose(sums, reference["backbone_abs_sums"], rtol=1e-12)
    state["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("lpips") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def model(backbone):
    return LPIPS.from_files(backbone, LINEAR)


def test_matches_the_lpips_package(model, reference):
    pred, gt = to_tensor(reference["pred"]), to_tensor(reference["clean"][reference["gt_index"]])
    distances = model(pred, gt)
    assert distances.shape == (len(pred),)
    np.testing.assert_allclose(distances.numpy(), reference["lpips"], rtol=1e-5, atol=0)
    # inverted colours are far, compression and blur near, as the metric is meant to say
    assert distances[2::3].min() > 5 * distances[0::3].max()


def test_identical_images_give_zero_and_order_does_not_matter(model, reference):
    pred = to_tensor(reference["pred"][:2, :32, :32])  # 32x32 corners: a quicker test
    gt = to_tensor(reference["clean"][reference["gt_index"][:2], :32, :32])
    assert model(gt, gt).tolist() == [0.0, 0.0]
    torch.testing.assert_close(model(pred, gt), model(gt, pred), rtol=1e-6, atol=0)


def test_is_frozen_in_eval_mode(model):
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_a_missing_file_names_it_and_what_was_expected(tmp_path, backbone):
    missing = tmp_path / "vgg16-397923af.pth"
    with pytest.raises(RefFaceError, match=r"not found: .*vgg16-397923af\.pth \(expected torchvision's VGG16"):
        LPIPS.from_files(missing, LINEAR)
    with pytest.raises(RefFaceError, match=r"not found: .*nowhere\.pth \(expected lpips' v0\.1 linear layers"):
        LPIPS.from_files(backbone, tmp_path / "nowhere.pth")


def _one_line_error(backbone, linear) -> str:
    with pytest.raises(RefFaceError) as raised:
        LPIPS.from_files(backbone, linear)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_files_of_the_wrong_format_are_refused_in_one_line(tmp_path, backbone):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    assert _one_line_error(garbage, LINEAR) == f"{garbage} is not a PyTorch state dict: expected " + (
        "torchvision's VGG16 ImageNet state dict (vgg16-397923af.pth)"
    )
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    assert "is not a state dict of tensors" in _one_line_error(backbone, tensor)
    # the two files swapped: the linear layers' file has no trunk
    assert _one_line_error(LINEAR, backbone) == (
        f"{LINEAR} has no features.0.weight: expected torchvision's VGG16 ImageNet state dict (vgg16-397923af.pth)"
    )
    linear = torch.load(LINEAR, map_location="cpu", weights_only=True)
    linear["lin2.model.1.weight"] = torch.zeros(1, 128, 1, 1)
    torch.save(linear, tmp_path / "alex.pth")
    assert "lin2.model.1.weight has shape [1, 128, 1, 1] instead of [1, 256, 1, 1]: expected lpips' v0.1" in (
        _one_line_error(backbone, tmp_path / "alex.pth")
    )


def test_a_batch_normalised_vgg_is_refused(tmp_path):
    state = {"features.0.weight": torch.zeros(64, 3, 3, 3), "features.1.running_mean": torch.zeros(64)}
    torch.save(state, tmp_path / "vgg16_bn.pth")
    assert "unexpected key features.1.running_mean" in _one_line_error(tmp_path / "vgg16_bn.pth", LINEAR)


def test_inputs_are_checked(model):
    image = torch.arange(3 * 32 * 32, dtype=torch.float32).view(1, 3, 32, 32) % 256  # 0-255, not -1 to 1
    with pytest.raises(RefFaceError, match=r"one shape, got \[1, 3, 32, 32\] and \[1, 3, 32, 16\]"):
        model(image, image[..., :16])
    with pytest.raises(RefFaceError, match=r"must be in \[-1, 1\], got values from 0 to 255"):
        model(image / 127.5 - 1, image)
