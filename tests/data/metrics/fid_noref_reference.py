"""Reference vectors for tests/test_eval_fid.py and tests/test_eval_no_reference.py, made by pyiqa 0.1.16 (whose
'fid' and 'niqe' ReF-LDM's eval uses) and pytorch-fid 0.3.0 in a throwaway venv: they need torchvision, which the
dev venv must never get. The tests import the input and weight helpers from here (numpy and PIL only).

Rerun (a CPU torch 2.13.0 first, so pip never replaces it; the registry's torchvision is a CUDA build, so its _C*.so
goes and main() declares the ops it registers): python3.11 -m venv /tmp/ref && cd /tmp/ref && bin/pip install
torch==2.13.0 numpy==2.4.6 scipy==1.17.1 pillow==13.0.0 opencv-python-headless huggingface_hub tqdm requests pyyaml
addict && bin/pip install --no-deps torchvision==0.28.0 pyiqa==0.1.16 pytorch-fid==0.3.0 && rm
lib/python3.11/site-packages/torchvision/_C*.so && cd - && /tmp/ref/bin/python tests/data/metrics/fid_noref_reference.py
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

HERE = Path(__file__).resolve().parent
FACES = HERE.parent / "faces"
FID_REFERENCE = HERE / "fid_reference.npz"
NIQE_REFERENCE = HERE / "noref_niqe_reference.npz"
NIQE_PARAMS = HERE / "noref_niqe_params.mat"
SEED = 20250607


def face(name: str, size: int | None) -> np.ndarray:
    """A test photo, centre-cropped to a square and resized with PIL's bicubic (None: the photo as it is)."""
    image = Image.open(FACES / f"{name}.jpg").convert("RGB")
    if size is None:
        return np.asarray(image)
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return np.asarray(image.resize((size, size), Image.BICUBIC, box=box))


def blurred(image: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, image.shape)
    return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)


def pixelated(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((w // factor, h // factor), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def saturated(image: np.ndarray) -> np.ndarray:
    """Overexposed: the left 150 columns flat white, where only float32 rounding decides the normalised signs."""
    out = image.copy()
    out[:, :150] = 255
    return out


def fid_inputs() -> list[np.ndarray]:
    """Two clean crops shrunk to 299 (as ReF-LDM's 512² faces are), a blurred one, and a small non-square photo."""
    return [face("obama", 384), face("sunak", 384), blurred(face("ardern_2", 384), 2.5), face("macron_1", None)]


def niqe_inputs() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Six clean faces (the pristine model's photos), and degraded ones: not whole blocks, partly flat."""
    names = ["ardern_1", "ardern_2", "macron_2", "obama", "sunak"]
    clean = [face(name, 512) for name in names] + [face("macron_1", 320)]
    degraded = [
        blurred(clean[0], 3),
        noisy(clean[1], 12, SEED),
        pixelated(clean[2], 4),
        noisy(blurred(clean[3], 1.5), 6, SEED + 1)[:300, :420],
        face("macron_1", None),
        saturated(clean[4]),
    ]
    return clean, degraded


def digest(images: list[np.ndarray]) -> str:
    """Fingerprint of the inputs, so a test can tell a changed input (another Pillow) from a changed metric."""
    sha = hashlib.sha256()
    for image in images:
        sha.update(str(image.shape).encode())
        sha.update(np.ascontiguousarray(image).tobytes())
    return sha.hexdigest()


def random_inception_state(names: list[str], shapes: list[tuple[int, ...]], seed: int = SEED) -> dict[str, np.ndarray]:
    """Random weights in the public FID Inception layout from a seeded numpy generator, scaled (He, near-identity
    batch norm) so activations neither vanish nor explode through the 40-odd layers."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in zip(names, shapes, strict=True):
        if name.startswith("fc."):
            value = np.zeros(shape)
        elif name.endswith("conv.weight"):
            value = rng.standard_normal(shape) * math.sqrt(2 / math.prod(shape[1:]))
        elif name.endswith("bn.weight") or name.endswith("running_var"):
            value = rng.uniform(0.8, 1.2, shape)
        elif name.endswith("bn.bias") or name.endswith("running_mean"):
            value = rng.normal(0, 0.1, shape)
        elif name.endswith("num_batches_tracked"):
            state[name] = np.zeros(shape, np.int64)
            continue
        else:
            raise ValueError(f"unexpected key {name}")
        state[name] = value.astype(np.float32)
    return state


def gaussian_sets() -> list[tuple[np.ndarray, np.ndarray]]:
    """Feature pairs for the Fréchet distance: full-rank 16-d sets, and 12 samples of 32-d (singular, as FID of a
    small set against FFHQ is)."""
    rng = np.random.default_rng(SEED)
    full_a = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16)) * 0.5 + rng.normal(0, 1, 16)
    full_b = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16)) * 0.7 + rng.normal(0, 1, 16)
    few_a = np.abs(rng.standard_normal((12, 32))) ** 1.5
    few_b = np.abs(rng.standard_normal((12, 32)) + 0.3)
    return [(full_a, full_b), (few_a, few_b)]


def main() -> None:  # pragma: no cover - runs in the throwaway venv only
    import tempfile

    import scipy.io
    import torch

    # registry torchvision is a CUDA build: declare its compiled ops' schemas, so its Python side imports on a
    # CPU torch (its _C*.so deleted beforehand)
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import pyiqa.archs.inception as pyiqa_inception
    from pyiqa.archs.fid_arch import FID, frechet_distance, get_folder_features
    from pyiqa.archs.func_util import normalize_img_with_gauss
    from pyiqa.archs.niqe_arch import NIQE, compute_feature
    from pyiqa.matlab_utils import blockproc, imresize
    from pyiqa.utils.color_util import to_y_channel
    from pytorch_fid.fid_score import calculate_frechet_distance

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        # FID: pytorch-fid's Inception inside pyiqa's FID, random weights saved in the public file format
        pyiqa_inception.load_pretrained_network = lambda net, path, *args, **kwargs: None
        layout = pyiqa_inception.fid_inception_v3().state_dict()
        names, shapes = list(layout), [tuple(v.shape) for v in layout.values()]
        state = random_inception_state(names, shapes)
        weights = Path(tmp) / "pt_inception-2015-12-05-6726825d.pth"
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, weights)

        def load(net: torch.nn.Module, path: str, *args: object, **kwargs: object) -> None:
            net.load_state_dict(torch.load(weights, weights_only=True), strict=True)

        pyiqa_inception.load_pretrained_network = load
        model = FID().model.eval()
        folder = Path(tmp) / "fid"
        folder.mkdir()
        images = fid_inputs()
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i}.png")
        features = get_folder_features(
            str(folder), model, num_workers=0, batch_size=2, device=torch.device("cpu"), mode="clean", verbose=False
        )
        distances = []
        for a, b in gaussian_sets():
            stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
            distances.append(frechet_distance(*stats))
            assert np.isclose(distances[-1], calculate_frechet_distance(*stats), rtol=1e-12)
        np.savez_compressed(
            FID_REFERENCE,
            features=features.astype(np.float32),
            digest=digest(images),
            names=np.array(names),
            ndims=np.array([len(s) for s in shapes]),
            dims=np.array([d for s in shapes for d in s]),
            frechet=np.array(distances),
        )
        print("features", features.shape, "mean", features.mean(), "std", features.std(), "FID", distances)

        # NIQE: a pristine model from pyiqa's block features of the clean faces, then pyiqa's scores with it
        clean, degraded = niqe_inputs()

        def batch(image: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None] / 255

        rows = []
        for image in clean:
            y = to_y_channel(batch(image), 255, "yiq").double()
            y = y[..., : y.shape[-2] // 96 * 96, : y.shape[-1] // 96 * 96]
            scales = []
            for scale in (1, 2):
                scales.append(
                    blockproc(normalize_img_with_gauss(y, padding="replicate"), [96 // scale] * 2, compute_feature)
                )
                y = imresize(y / 255.0, scale=0.5, antialiasing=True) * 255.0
            rows.append(torch.cat(scales, -1)[0].numpy())
        rows = np.concatenate(rows)
        rows = rows[~np.isnan(rows).any(1)]
        scipy.io.savemat(NIQE_PARAMS, {"mu_prisparam": rows.mean(0)[None], "cov_prisparam": np.cov(rows, rowvar=False)})
        niqe = NIQE(pretrained_model_path=str(NIQE_PARAMS))
        scores = np.array([float(niqe(batch(image))) for image in clean + degraded])
        np.savez_compressed(NIQE_REFERENCE, scores=scores, digest=digest(clean + degraded))
        print("NIQE", scores)


if __name__ == "__main__":
    main()
