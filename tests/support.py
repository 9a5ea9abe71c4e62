"""Helpers shared by the tests: where the golden vectors are, a tiny random model, and a bounded run of a command
that starts processes of its own."""

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from refface_core import RefFaceRestorer
from refface_core.model import refldm_unet_config, refldm_vq_config

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "refldm"


def run_bounded(command: list[str], timeout: float, **popen) -> subprocess.CompletedProcess:
    """Run ``command`` to its end or for ``timeout`` seconds, its stdout and stderr together in ``stdout``. On timeout,
    the command and every process it started are killed, and the test fails showing their output: a hung worker can
    neither hang the test run nor outlive it. Killing the command's process group is not enough for `accelerate
    launch`: torch starts each worker in a session of its own."""
    import psutil

    with tempfile.TemporaryFile() as log:  # a file, not a pipe: nothing waits for a killed worker's end of a pipe
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)
        try:
            process.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            started = []
            with contextlib.suppress(psutil.NoSuchProcess):  # listed first: once the command dies, they are orphans
                started = psutil.Process(process.pid).children(recursive=True)
            os.killpg(process.pid, signal.SIGKILL)
            for child in started:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            process.wait()
            timed_out = True
        log.seek(0)
        output = log.read().decode(errors="replace")
    if timed_out:
        pytest.fail(f"{' '.join(command)} ran past {timeout:g} s and was killed, with its processes:\n{output[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output)


def weights_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.startswith(("golden.", "cache."))}


def tiny_restorer(seed: int = 0, sample_size: int = 16) -> RefFaceRestorer:
    """A small random model (VQ factor 2, so 2·sample_size pixels) with a sharp init, so references matter."""
    torch.manual_seed(seed)
    model = RefFaceRestorer(
        refldm_unet_config(32, (1, 2), (False, True), 1, 8, sample_size=sample_size),
        refldm_vq_config(32, (1, 2), 1, 8, 8, 64),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def insightface_stand_ins(folder) -> None:
    """Write a tiny SCRFD-style detector and ArcFace-style recogniser in insightface's ONNX layout.

    insightface's router takes a model with >= 5 outputs for a detector and one with a square input of
    at least 112 (divisible by 16) for ArcFace. The detector fires, at stride 32, on bright 32×32 cells.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], {}
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride in (8, 16, 32):
            name = f"{kind}_{stride}"
            weight = np.zeros((2 * width, 3, stride, stride), np.float32)
            bias = np.zeros(2 * width, np.float32)
            if kind == "score":
                weight[:] = 12.0 / (3 * stride * stride) if stride == 32 else 0.0
                bias[:] = -9.0 if stride == 32 else -50.0  # sigmoid(12·mean − 9): bright cells only
            elif kind == "bbox":
                bias[:] = 1.0  # one stride on every side of the cell centre
            else:
                bias[:] = np.tile([-0.3, -0.2, 0.3, -0.2, 0.0, 0.1, -0.25, 0.4, 0.25, 0.4], 2)
            inits += [numpy_helper.from_array(weight, f"{name}_w"), numpy_helper.from_array(bias, f"{name}_b")]
            conv = [f"{name}_conv"]
            nodes.append(helper.make_node("Conv", ["input.1", f"{name}_w", f"{name}_b"], conv, strides=[stride] * 2))
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", conv, [f"{name}_sig"]))
                conv = [f"{name}_sig"]
            nodes.append(helper.make_node("Transpose", conv, [f"{name}_t"], perm=[0, 2, 3, 1]))
            inits.append(numpy_helper.from_array(np.array([-1, width], np.int64), f"{name}_shape"))
            nodes.append(helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [name]))
            outputs[name] = width
    graph = helper.make_graph(
        nodes, "scrfd_stand_in",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["A", w]) for n, w in outputs.items()],
        inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(folder / "det_10g.onnx"))

    projection = numpy_helper.from_array(rng.standard_normal((3 * 4 * 4, 512)).astype(np.float32), "proj")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "flat")
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[28, 28], strides=[28, 28]),
            helper.make_node("Reshape", ["pooled", "flat"], ["flat_pooled"]),
            helper.make_node("MatMul", ["flat_pooled", "proj"], ["fc1"]),
        ],
        "arcface_stand_in",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 512])],
        [projection, shape],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(folder / "w600k_r50.onnx"))


def farl_state_dict(width: int = 64, layers: int = 2, seed: int = 0) -> dict:
    """Random weights in FaRL's public layout (OpenAI-CLIP names; image tower under visual.*, text tower beside)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    state = {
        "visual.class_embedding": rand(width),
        "visual.positional_embedding": rand(197, width),
        "visual.conv1.weight": rand(width, 3, 16, 16),
        "visual.ln_pre.weight": 1 + rand(width), "visual.ln_pre.bias": rand(width),
        "visual.ln_post.weight": 1 + rand(width), "visual.ln_post.bias": rand(width),
        "visual.proj": rand(width, 32),
        "token_embedding.weight": rand(10, 32), "ln_final.weight": rand(32), "logit_scale": rand(()),
    }  # fmt: skip
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        state |= {
            p + "ln_1.weight": 1 + rand(width), p + "ln_1.bias": rand(width),
            p + "attn.in_proj_weight": rand(3 * width, width), p + "attn.in_proj_bias": rand(3 * width),
            p + "attn.out_proj.weight": rand(width, width), p + "attn.out_proj.bias": rand(width),
            p + "ln_2.weight": 1 + rand(width), p + "ln_2.bias": rand(width),
            p + "mlp.c_fc.weight": rand(4 * width, width), p + "mlp.c_fc.bias": rand(4 * width),
            p + "mlp.c_proj.weight": rand(width, 4 * width), p + "mlp.c_proj.bias": rand(width),
        }  # fmt: skip
    return state


def tiny_context_config(identity_encoder: str = "sface", identity_dim: int = 128) -> dict:
    from refface_core.context import composite_context_config

    return composite_context_config(
        width=32, identity_encoder=identity_encoder, identity_dim=identity_dim, identity_tokens=2,
        appearance_encoder="farl-tiny", appearance_width=64, appearance_layers=(1, 2), appearance_grid=2,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# A tiny insightface-style iresnet (IBasicBlock: BN, conv, BN, PReLU, conv, BN, plus a strided 1x1 shortcut; head:
# BN, dropout, flatten, linear, BatchNorm1d), exported with torch's TorchScript ONNX exporter.


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.prelu = nn.PReLU(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.down is None else self.down(x))


class TinyIResNet(nn.Module):
    def __init__(self, normalises_input: bool, dim: int = 64):
        super().__init__()
        self.normalises_input = normalises_input
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8))
        self.layers = nn.Sequential(Block(8, 16, 2), Block(16, 16, 1), Block(16, 24, 2), Block(24, 32, 2))
        self.bn2, self.dropout = nn.BatchNorm2d(32), nn.Dropout(0.4)
        self.fc, self.features = nn.Linear(32 * 14 * 14, dim), nn.BatchNorm1d(dim)

    def forward(self, x):
        if self.normalises_input:  # the mxnet models' own (x - 127.5) / 128
            x = (x - 127.5) * 0.0078125
        x = self.dropout(self.bn2(self.layers(self.stem(x))))
        return self.features(self.fc(torch.flatten(x, 1)))


def export_iresnet(path, normalises_input: bool = False, seed: int = 0, dim: int = 64) -> None:
    """An ArcFace-like recognition ONNX file, as insightface exports them (``dim``-d embeddings)."""
    torch.manual_seed(seed)
    model = TinyIResNet(normalises_input, dim)
    with torch.no_grad():  # random statistics and affine parameters, so every BatchNorm matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
                m.running_mean.copy_(0.1 * torch.randn_like(m.running_mean))
                m.running_var.copy_(1 + 0.5 * torch.rand_like(m.running_var))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.25 + 0.1 * torch.randn_like(m.weight))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), torch.zeros(1, 3, 112, 112), str(path), dynamo=False,
            input_names=["input.1"], output_names=["fc1"], dynamic_axes={"input.1": {0: "N"}, "fc1": {0: "N"}},
        )  # fmt: skip
    if normalises_input:  # name the leading Sub/Mul as mxnet-converted insightface models do
        graph = onnx.load(str(path))
        names = {"Sub": "_minusscalar0", "Mul": "_mulscalar0"}
        for node in graph.graph.node[:8]:
            node.name = names.get(node.op_type, node.name)
        onnx.save(graph, str(path))


# ---------------------------------------------------------------------------------------------------------------------
# A tiny FFHQ-Ref-format benchmark set from the real photos in tests/data/faces.


def ffhq_ref_set(folder, size: int = 64, seed: int = 0) -> dict:
    """FFHQ-Ref's layout under ``folder``: images/ (aligned HQ crops of each photo and its mirror image),
    reference_mapping/test_references.csv (each image's references: the person's images from other photos, or its
    own mirror for a person with one photo) and test_images/severe_degrad/ (the HQ crops degraded with the severe
    preset and a fixed seed). Four people, twelve faces."""
    import csv

    from PIL import Image

    from refface_core.faces import align_face, load_face_analysis
    from refface_core.images import load_image
    from refface_core.training.degradations import degrade_folder

    analysis = load_face_analysis()
    images, people = folder / "images", {}
    images.mkdir(parents=True)
    for photo in sorted((Path(__file__).parent / "data" / "faces").glob("*.jpg")):
        pixels = np.asarray(load_image(photo))
        crop = align_face(pixels, analysis.main_face(pixels, str(photo)).landmarks, size)[0]
        for name, image in ((f"{photo.stem}.png", crop), (f"{photo.stem}m.png", crop[:, ::-1])):
            Image.fromarray(np.ascontiguousarray(image)).save(images / name)
            people.setdefault(photo.stem.split("_")[0], []).append((photo.stem, name))
    degrade_folder(images, folder / "test_images" / "severe_degrad", "severe", seed)
    (folder / "reference_mapping").mkdir()
    with open(folder / "reference_mapping" / "test_references.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["gt_image", "lq_image", "ref_image"])
        for images_of in people.values():
            for photo, name in images_of:
                refs = [n for p, n in images_of if p != photo] or [n for p, n in images_of if n != name]
                writer.writerow([name, name, repr(refs)])
    return {"data": folder, "images": images, "people": {k: [n for _, n in v] for k, v in people.items()}}


def metrics_folder(folder, hq_images: list) -> None:
    """Every metric's weights file in its public format, the learned ones random (seeded, as the metric tests make
    them), lpips' real linear layers, and FID statistics of ``hq_images`` (H×W×3 uint8) under that Inception."""
    import importlib.util

    from refface_core.evaluation.fid import InceptionFeatures, statistics

    metrics = Path(__file__).parent / "data" / "metrics"

    def script(name):
        spec = importlib.util.spec_from_file_location(name, metrics / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    folder.mkdir(parents=True, exist_ok=True)
    export_iresnet(folder / "insightface_webface_r50.onnx")
    torch.save(script("lpips_fidelity_reference").random_vgg16(), folder / "vgg16-397923af.pth")
    shutil.copy(metrics / "lpips_vgg_v0.1.pth", folder / "vgg.pth")
    shutil.copy(metrics / "noref_niqe_params.mat", folder / "niqe_modelparameters.mat")
    fid = script("fid_noref_reference")
    with np.load(fid.FID_REFERENCE) as data:
        sizes = np.split(data["dims"], np.cumsum(data["ndims"])[:-1])
        state = fid.random_inception_state([str(n) for n in data["names"]], [tuple(int(d) for d in s) for s in sizes])
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, folder / "pt_inception-2015-12-05-6726825d.pth")
    inception = InceptionFeatures.from_file(folder / "pt_inception-2015-12-05-6726825d.pth")
    with torch.no_grad():
        features = torch.cat([inception(torch.from_numpy(i.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1)
                              for i in hq_images])  # fmt: skip
    mu, sigma = statistics(features)
    np.savez(folder / "ffhq_clean_trainval70k_512.npz", mu=mu, sigma=sigma)


FACES = Path(__file__).parent / "data" / "faces"


def small_scan(name: str, eyes: float, quality: int) -> np.ndarray:
    """An old small scan: the photo shrunk to ``eyes`` px between the eyes (its face has about 93), as JPEG."""
    photo = np.asarray(Image.open(FACES / name).convert("RGB"))
    small = cv2.resize(photo, None, fx=eyes / 93, fy=eyes / 93, interpolation=cv2.INTER_AREA)
    _, data = cv2.imencode(".jpg", small[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]


def album_photos(folder: Path) -> Path:
    """Ardern, Macron and Obama each in a sharp photo and a degraded one; Sunak only degraded (no reference)."""
    from refface_core.training.degradations import PRESETS, degrade

    for name in ("ardern_1", "macron_2", "obama"):
        shutil.copy(FACES / f"{name}.jpg", folder / f"{name}.jpg")
    degraded = {
        "ardern_2": small_scan("ardern_2.jpg", 16, 40),
        "macron_1": degrade(np.asarray(Image.open(FACES / "macron_1.jpg").convert("RGB")), PRESETS["moderate"], 3),
        "obama_old": small_scan("obama.jpg", 12, 40),
        "sunak": small_scan("sunak.jpg", 14, 40),
    }
    for name, pixels in degraded.items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


FRAMES = 8  # of the synthetic video
SIZE = (176, 144)  # upright width, height


def face_path(t):
    """Where the face is in frame ``t``: its centre drifts right and down while it grows by a quarter."""
    return 70 + 3 * t, 66 + t, 1 + t / 36


def synthetic_frames():
    """The upright frames: macron_1's face, 24 px between the eyes at the start, moved and zoomed, then degraded
    (downscaled ×2, blurred, JPEG 40), each frame with its own seeded JPEG noise as a scanned tape would have."""
    from refface_core.faces import load_face_analysis
    from refface_core.images import load_image

    photo = np.asarray(load_image(FACES / "macron_1.jpg"))
    face = load_face_analysis().detect(photo)[0]
    centre = face.landmarks.mean(0)
    frames = []
    for t in range(FRAMES):
        x, y, zoom = face_path(t)
        scale = 24 / face.size * zoom
        affine = np.array([[scale, 0, x - scale * centre[0]], [0, scale, y - scale * centre[1]]])
        frame = cv2.warpAffine(photo, affine, SIZE, flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT_101)
        small = cv2.resize(frame, (SIZE[0] // 2, SIZE[1] // 2), interpolation=cv2.INTER_AREA)
        frame = cv2.GaussianBlur(cv2.resize(small, SIZE, interpolation=cv2.INTER_CUBIC), (0, 0), 0.8)
        _, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 40])
        frames.append(cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED))
    return frames
