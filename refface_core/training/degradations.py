"""ReF-LDM's synthetic degradation: blur, downscale, noise, JPEG, then resize back, with seeded randomness.

Training pairs and the FFHQ benchmark sets are made the same way, so the model sees at test time the kind of damage
it learnt to undo. Every random draw comes from the caller's ``numpy.random.Generator``: same seed, same output.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..errors import RefFaceError
from ..files import write_atomic
from ..images import IMAGE_SUFFIXES, load_image


@dataclass(frozen=True)
class Degradation:
    """Ranges (low, high) each parameter is drawn from, uniformly; sigmas are on the 0-255 scale, scale is a factor."""

    blur_sigma: tuple[float, float]
    scale: tuple[float, float]
    noise_sigma: tuple[float, float]
    jpeg_quality: tuple[int, int]
    kernel_size: int = 41

    def __post_init__(self) -> None:
        checks = {
            "blur_sigma": (self.blur_sigma, 0.0, math.inf),
            "scale": (self.scale, 1.0, math.inf),
            "noise_sigma": (self.noise_sigma, 0.0, math.inf),
            "jpeg_quality": (self.jpeg_quality, 1, 100),
        }
        for name, ((low, high), least, most) in checks.items():
            if not least <= low <= high <= most:
                raise RefFaceError(f"degradation {name} range must satisfy {least} <= low <= high <= {most}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise RefFaceError(f"blur kernel size must be a positive odd number, got {self.kernel_size}")


# ReF-LDM's training options, and the two levels its FFHQ test images were made with.
PRESETS: dict[str, Degradation] = {
    "train": Degradation(blur_sigma=(0.0, 16.0), scale=(1.0, 32.0), noise_sigma=(0.0, 20.0), jpeg_quality=(30, 100)),
    "moderate": Degradation(blur_sigma=(0.0, 8.0), scale=(1.0, 8.0), noise_sigma=(0.0, 15.0), jpeg_quality=(60, 100)),
    "severe": Degradation(blur_sigma=(8.0, 16.0), scale=(8.0, 32.0), noise_sigma=(0.0, 20.0), jpeg_quality=(30, 100)),
}


def sample_parameters(degradation: Degradation, rng: np.random.Generator) -> dict[str, float | int | str]:
    """Draw one set of parameters, so they can be logged or tested apart from the pixels.

    As in ReF-LDM, the kernel is isotropic or anisotropic with equal odds; an anisotropic one draws sigma_x and
    sigma_y independently from the blur range and a rotation in [-pi, pi).
    """
    anisotropic = bool(rng.random() < 0.5)
    sigma_x = float(rng.uniform(*degradation.blur_sigma))
    sigma_y = float(rng.uniform(*degradation.blur_sigma)) if anisotropic else sigma_x
    rotation = float(rng.uniform(-math.pi, math.pi)) if anisotropic else 0.0
    return {
        "kernel": "aniso" if anisotropic else "iso",
        "sigma_x": sigma_x,
        "sigma_y": sigma_y,
        "rotation": rotation,
        "scale": float(rng.uniform(*degradation.scale)),
        "noise_sigma": float(rng.uniform(*degradation.noise_sigma)),
        "jpeg_quality": int(rng.integers(degradation.jpeg_quality[0], degradation.jpeg_quality[1] + 1)),
    }


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, rotation: float) -> np.ndarray:
    """A size×size Gaussian with axes sigma_x, sigma_y turned by ``rotation`` radians, summing to 1.

    A sigma of 0 gives the identity kernel (the tiny floor only avoids dividing by zero).
    """
    half = size // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    cos, sin = math.cos(rotation), math.sin(rotation)
    u, v = cos * x + sin * y, -sin * x + cos * y
    sx, sy = max(sigma_x, 1e-6), max(sigma_y, 1e-6)
    kernel = np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    return kernel / kernel.sum()


def degrade(image: np.ndarray, degradation: Degradation, rng: np.random.Generator | int) -> np.ndarray:
    """Blur, downscale, add noise, JPEG-compress and resize back: an H×W×3 RGB uint8 image of the same size.

    Bilinear resizing both ways and colour (per-channel) noise follow ReF-LDM, so the results match its training
    and test images in kind. An int ``rng`` is taken as a seed.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise RefFaceError(f"degrade expects an H×W×3 RGB uint8 array, got a {what}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    p = sample_parameters(degradation, rng)
    h, w = image.shape[:2]

    x = image.astype(np.float32) / 255.0
    kernel = gaussian_kernel(degradation.kernel_size, p["sigma_x"], p["sigma_y"], p["rotation"])
    x = cv2.filter2D(x, -1, kernel.astype(np.float32))  # reflect-101 borders, as ReF-LDM
    small = (max(1, int(w / p["scale"])), max(1, int(h / p["scale"])))
    x = cv2.resize(x, small, interpolation=cv2.INTER_LINEAR)
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(p["noise_sigma"] / 255.0)
    x8 = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)  # JPEG codes 8-bit pixels
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(x8[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, p["jpeg_quality"]])
    if not ok:
        raise RefFaceError("JPEG encoding failed while degrading an image")
    x8 = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
    out = cv2.resize(x8.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def file_rng(seed: int, name: str) -> np.random.Generator:
    """A generator from (seed, file name) alone, so adding or removing other files changes nothing for this one."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def degrade_folder(
    src: Path,
    dst: Path,
    preset: str,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Degrade every image in ``src`` into ``dst`` as ``<stem>.png``, reproducibly, never overwriting a file.

    All checks run before any work; if an image turns out unreadable midway, the files this call wrote are removed
    again, so a corrected rerun is not blocked by leftovers.
    """
    src, dst = Path(src), Path(dst)
    if preset not in PRESETS:
        raise RefFaceError(f"unknown degradation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not src.is_dir():
        raise RefFaceError(f"input folder not found: {src}")
    if dst.resolve() == src.resolve():
        raise RefFaceError(f"the output folder must differ from the input folder: {dst}")
    if dst.exists() and not dst.is_dir():
        raise RefFaceError(f"output path exists and is not a folder: {dst}")
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RefFaceError(f"no images ({' '.join(IMAGE_SUFFIXES)}) found in {src}")
    targets = [dst / f"{p.stem}.png" for p in files]
    stems: dict[Path, Path] = {}
    for source, target in zip(files, targets, strict=True):
        if target in stems:
            raise RefFaceError(f"{stems[target].name} and {source.name} would both be written as {target.name}")
        stems[target] = source
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise RefFaceError(f"refusing to overwrite existing files, e.g. {existing[0]} ({len(existing)} in all)")

    degradation = PRESETS[preset]
    dst.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for k, (source, target) in enumerate(zip(files, targets, strict=True), start=1):
            out = degrade(np.asarray(load_image(source)), degradation, file_rng(seed, source.name))
            write_atomic(target, lambda tmp, out=out: Image.fromarray(out).save(tmp, format="PNG"))
            written.append(target)
            if progress is not None:
                progress(k, len(files))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
