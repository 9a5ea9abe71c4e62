"""The identity losses: ReF-LDM's preprocessing (golden), the ONNX ArcFace in torch against onnxruntime, HID."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from support import export_iresnet, insightface_stand_ins
from torch import nn

from refface_core.errors import RefFaceError
from refface_core.training.identity import ArcFace, hid_loss, identity_loss, identity_preprocess


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arcface")
    export_iresnet(folder / "iresnet.onnx", normalises_input=False)
    export_iresnet(folder / "iresnet_norm.onnx", normalises_input=True, seed=1)
    insightface_stand_ins(folder)  # AveragePool + Reshape + MatMul, the pipeline tests' recogniser
    return {"iresnet": folder / "iresnet.onnx", "iresnet_norm": folder / "iresnet_norm.onnx"} | {
        "stand_in": folder / "w600k_r50.onnx",
        "detector": folder / "det_10g.onnx",
    }


@pytest.fixture(scope="module")
def arcface(models):
    return ArcFace.from_onnx(models["iresnet"])


def faces(n: int = 3, size: int = 112, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1
    noise = 0.2 * torch.randn(n, 3, size, size, generator=gen)
    return (nn.functional.interpolate(low, size=(size, size), mode="bilinear") + noise).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["image_u8", "extra200.image_u8"])
def test_preprocessing_matches_refldm_golden(golden, key):
    tensors = golden("identity_preproc")
    images = tensors[f"golden.{key}"].to(torch.float32) / 127.5 - 1
    expected = tensors[f"golden.{key.replace('image_u8', 'preprocessed')}"]
    out = identity_preprocess(images)
    assert out.shape == expected.shape == (images.shape[0], 3, 112, 112)
    assert (out - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name, raw_pixels", [("iresnet", False), ("iresnet_norm", True), ("stand_in", False)])
def test_arcface_matches_onnxruntime(models, name, raw_pixels):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    path = models[name]
    reference = ArcFaceONNX(str(path))  # insightface's own reading of the input normalisation
    assert (reference.input_mean, reference.input_std) == ((0.0, 1.0) if raw_pixels else (127.5, 127.5))

    model = ArcFace.from_onnx(path)
    assert model.raw_pixels == raw_pixels
    pixels = torch.randint(0, 256, (3, 3, 112, 112), generator=torch.Generator().manual_seed(7)).float()
    blob = ((pixels - reference.input_mean) / reference.input_std).numpy()  # as insightface's get_feat, RGB
    expected = reference.session.run(None, {reference.input_name: blob})[0]
    with torch.no_grad():
        ours = model(pixels / 127.5 - 1).numpy()
    assert ours.shape == expected.shape
    scale = np.abs(expected).max()
    diff = np.abs(ours - expected).max()
    assert diff <= 1e-5 * max(scale, 1.0), (diff, scale)
    cos = (ours * expected).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 1 - 1e-6


@pytest.mark.parametrize("opset", [11, 13])
def test_other_ops_match_onnxruntime(tmp_path, opset):
    """The remaining ops (older exports' Shape/Gather/Unsqueeze/Concat flatten, pools, Transpose, Div, Relu)."""
    rng = np.random.default_rng(0)
    const = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "two": np.array(2.0, np.float32),
        "zero": np.array(0, np.int64), "minus1": np.array([-1], np.int64), "axes": np.array([0], np.int64),
        "proj": rng.standard_normal((4 * 28 * 28, 16)).astype(np.float32),
    }  # fmt: skip
    axes = {"axes": [0]} if opset < 13 else {}
    unsqueeze_inputs = ["batch"] if opset < 13 else ["batch", "axes"]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["data", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Div", ["m", "two"], ["d"]),
            helper.make_node("Transpose", ["d"], ["t"], perm=[0, 1, 3, 2]),
            helper.make_node("Shape", ["t"], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
            helper.make_node("Unsqueeze", unsqueeze_inputs, ["batch1"], **axes),
            helper.make_node("Concat", ["batch1", "minus1"], ["flat_shape"], axis=0),
            helper.make_node("Reshape", ["t", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "proj"], ["e"]),
            helper.make_node("GlobalAveragePool", ["data"], ["g"]),
            helper.make_node("Flatten", ["g"], ["gf"]),
            helper.make_node("Concat", ["e", "gf"], ["fc1"], axis=1),
        ],
        "ops",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 19])],
        [onnx.numpy_helper.from_array(v, k) for k, v in const.items() if opset >= 13 or k != "axes"],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(tmp_path / "ops.onnx"))
    x = faces(2)
    expected = ort.InferenceSession(str(tmp_path / "ops.onnx")).run(None, {"data": x.numpy()})[0]
    with torch.no_grad():
        ours = ArcFace.from_onnx(tmp_path / "ops.onnx")(x).numpy()
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()


def test_arcface_is_frozen_and_passes_gradients(arcface):
    assert list(arcface.parameters()) == [] and not arcface.training
    assert all(not b.requires_grad for b in arcface.buffers())
    assert arcface.state_dict() == {}  # weights come from the ONNX file, never from a checkpoint
    arcface.train()
    assert not arcface.training
    x = faces(2).requires_grad_()
    arcface(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    restored = faces(2, size=128, seed=1).requires_grad_()
    hid_loss(arcface, restored, faces(2, size=128, seed=2), faces(2, size=96, seed=3)).sum().backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0


def test_hid_loss(arcface):
    restored, hq, reference = faces(3, 128, seed=1), faces(3, 128, seed=2), faces(3, 160, seed=3)
    with torch.no_grad():
        l_hq, l_ref = identity_loss(arcface, hq, restored), identity_loss(arcface, reference, restored)
        assert l_hq.shape == (3,) and (l_hq > 1e-3).all() and (l_ref > 1e-3).all()
        assert torch.equal(hid_loss(arcface, restored, hq, reference, lam=0.0), l_hq)
        assert torch.equal(hid_loss(arcface, restored, hq, reference, lam=1.0), l_ref)
        torch.testing.assert_close(hid_loss(arcface, restored, hq, reference, lam=0.3), 0.7 * l_hq + 0.3 * l_ref)
        torch.testing.assert_close(hid_loss(arcface, restored, hq, reference), 0.5 * (l_hq + l_ref))
        assert identity_loss(arcface, hq, hq).abs().max() < 1e-6
        assert hid_loss(arcface, hq, hq, hq, lam=0.4).abs().max() < 1e-6
    with pytest.raises(RefFaceError, match="lambda"):
        hid_loss(arcface, restored, hq, reference, lam=1.5)


def test_clear_errors(models, tmp_path):
    with pytest.raises(RefFaceError, match="not found"):
        ArcFace.from_onnx(tmp_path / "missing" / "w600k_r50.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(RefFaceError, match="not a readable ONNX file"):
        ArcFace.from_onnx(tmp_path / "junk.onnx")
    with pytest.raises(RefFaceError, match="not an ONNX face recognition model"):
        ArcFace.from_onnx(models["detector"])

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["data"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Erf", ["flat"], ["fc1"], name="odd_activation"),
        ],
        "unsupported",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "erf.onnx"))
    with pytest.raises(RefFaceError, match=r"Erf \(node 'odd_activation'\)"):
        ArcFace.from_onnx(tmp_path / "erf.onnx")

    with pytest.raises(RefFaceError, match=r"\[B,3,112,112\]"):
        ArcFace.from_onnx(models["iresnet"])(torch.zeros(1, 3, 128, 128))
