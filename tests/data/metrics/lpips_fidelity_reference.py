"""Reference vectors for tests/test_eval_lpips.py and tests/test_eval_fidelity.py: LPIPS (VGG, v0.1) by lpips 0.1.4
(checked against pyiqa 0.1.16's lpips-vgg), PSNR and SSIM by pyiqa 0.1.16's defaults, on small face crops. They need
torchvision, which the dev venv must never get. The tests import ``random_vgg16`` from here: the random VGG16 trunk is
made from a seeded NumPy generator rather than committed (59 MB); only numpy and torch are imported at module level.

Rerun: python3.11 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 numpy==2.4.6 scipy==1.17.1 pillow==13.0.0
opencv-python-headless huggingface_hub tqdm requests pyyaml addict && /tmp/ref/bin/pip install --no-deps
torchvision==0.28.0 lpips==0.1.4 pyiqa==0.1.16 && /tmp/ref/bin/python tests/data/metrics/lpips_fidelity_reference.py
"""

from __future__ import annotations

import io
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
FACES = HERE.parent / "faces"
SEED = 20240
SIZE = 64
# torchvision's vgg16().features: (index, in channels, out channels) of each 3x3 convolution
VGG16_CONVS = (
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
)
# public-domain photos only (see ../faces/CREDITS.md), with a square box around each face
CROPS = {"macron_2": (90, 30, 430, 370), "ardern_2": (80, 20, 420, 360), "obama": (110, 60, 430, 380)}


def random_vgg16(seed: int = SEED) -> dict[str, torch.Tensor]:
    """A VGG16 ``features`` state dict in torchvision's key layout, He-scaled so activations stay near unit size."""
    rng = np.random.default_rng(seed)
    state = {}
    for index, cin, cout in VGG16_CONVS:
        weight = rng.standard_normal((cout, cin, 3, 3), dtype=np.float32) * np.float32(np.sqrt(2.0 / (cin * 9)))
        state[f"features.{index}.weight"] = torch.from_numpy(weight)
        state[f"features.{index}.bias"] = torch.from_numpy(rng.standard_normal(cout, dtype=np.float32) * 0.1)
    return state


def _inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clean crops, the images compared with them (JPEG, blur + noise, colour-inverted) and each one's clean index."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(SEED)
    clean, pred, gt_index = [], [], []
    for i, (name, box) in enumerate(CROPS.items()):
        image = Image.open(FACES / f"{name}.jpg").convert("RGB").crop(box).resize((SIZE, SIZE), Image.BICUBIC)
        clean.append(np.asarray(image))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=15)
        jpeg = np.asarray(Image.open(buffer).convert("RGB"))
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float64)
        noisy = np.clip(np.round(blurred + rng.normal(0.0, 8.0, blurred.shape)), 0, 255).astype(np.uint8)
        pred += [jpeg, noisy, 255 - clean[-1]]
        gt_index += [i, i, i]
    return np.stack(clean), np.stack(pred), np.array(gt_index)


def _import_torchvision() -> None:
    """The registry's torchvision is a CUDA build whose ops fail to load on a CPU-only torch; its Python side only
    needs the schemas of the two ops it registers fake kernels for."""
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_torchvision.lib = lib  # keep the definitions alive
    import torchvision  # noqa: F401


def main() -> None:
    _import_torchvision()
    import lpips
    import pyiqa
    import torchvision.models._api as tv_api

    clean, pred, gt_index = _inputs()
    to_unit = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    x, y = to_unit(pred), to_unit(clean[gt_index])
    backbone = random_vgg16()
    linear = HERE / "lpips_vgg_v0.1.pth"

    # lpips: random trunk (not torchvision's download), the committed v0.1 linear layers
    model = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, model_path=str(linear), verbose=False)
    slices = [range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30)]
    slice_of = {i: n + 1 for n, indices in enumerate(slices) for i in indices}
    renamed = {f"net.slice{slice_of[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v for k, v in backbone.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("net.")], (missing, unexpected)
    with torch.no_grad():
        lpips_ref = model(x, y, normalize=True).flatten()

    # pyiqa's lpips-vgg, whose torchvision weight download returns the same random trunk
    classifier = {"0": (4096, 25088), "3": (4096, 4096), "6": (1000, 4096)}
    full = dict(backbone)  # the classifier torchvision loads too: zeros, expanded (no 0.5 GB allocated)
    for index, (cout, cin) in classifier.items():
        full[f"classifier.{index}.weight"] = torch.zeros(1, 1).expand(cout, cin)
        full[f"classifier.{index}.bias"] = torch.zeros(1).expand(cout)
    tv_api.load_state_dict_from_url = lambda *args, **kwargs: full
    metric = pyiqa.create_metric("lpips-vgg", device="cpu", pretrained_model_path=str(linear))
    lpips_pyiqa = metric(x, y).flatten()
    assert torch.allclose(lpips_pyiqa, lpips_ref, rtol=1e-6, atol=0), (lpips_pyiqa, lpips_ref)

    psnr = pyiqa.create_metric("psnr", device="cpu")(x, y).flatten()
    ssim = pyiqa.create_metric("ssim", device="cpu")(x, y).flatten()
    probe = np.array([float(v.double().abs().sum()) for v in backbone.values()])
    np.savez_compressed(
        HERE / "lpips_fidelity_reference.npz",
        clean=clean,
        pred=pred,
        gt_index=gt_index,
        lpips=lpips_ref.numpy(),
        psnr=psnr.numpy(),
        ssim=ssim.numpy(),
        backbone_abs_sums=probe,
    )
    print(f"lpips {lpips_ref.numpy()}\npsnr {psnr.numpy()}\nssim {ssim.numpy()}")
    print(f"versions: torch {torch.__version__}, lpips {version('lpips')}, pyiqa {version('pyiqa')}")


if __name__ == "__main__":
    main()
