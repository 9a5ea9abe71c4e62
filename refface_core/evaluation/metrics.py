"""The metrics of a restored face, each from the weights file its public release ships, in one folder.

ReF-LDM's eval defines them (its scripts/eval.py): IDS is ArcFace cosine (``insightface_webface_r50.onnx``, on the
centre crop area-resized to 112); LPIPS the VGG variant; FID against FFHQ-512 trainval70k statistics; PSNR and SSIM as
pyiqa computes them. IDS against the references (the first one, as the paper) is RefFace's addition. A metric whose
file is missing is skipped, with a line naming the file and where to get it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RefFaceError


@dataclass(frozen=True)
class WeightsFile:
    name: str  # the file's public name, looked for in the metrics folder
    source: str  # where to get it


ARCFACE = WeightsFile(
    "insightface_webface_r50.onnx", "ReF-LDM's ArcFace R50 (WebFace), linked from ChiWeiHsiao/ref-ldm's README"
)
LPIPS_VGG = WeightsFile("vgg16-397923af.pth", "torchvision's ImageNet VGG16: download.pytorch.org/models/")
LPIPS_LINEAR = WeightsFile("vgg.pth", "the lpips package's lpips/weights/v0.1/vgg.pth (`pip download lpips`)")
INCEPTION = WeightsFile(
    "pt_inception-2015-12-05-6726825d.pth", "pytorch-fid's FID Inception weights (its GitHub release fid_weights)"
)
FID_STATISTICS = WeightsFile("ffhq_clean_trainval70k_512.npz", "clean-fid's FFHQ 512 trainval70k statistics")
NIQE_MODEL = WeightsFile(
    "niqe_modelparameters.mat", "the NIQE authors' niqe_release.zip (LIVE, UT Austin), as pyiqa's 'niqe' loads it"
)

FEW_FOR_FID = 2048  # below the feature count, the faces' covariance is singular and FID is biased upwards
# Columns of metrics.csv, and whether higher is better.
HIGHER_IS_BETTER = {"ids": True, "ids_ref": True, "lpips": False, "psnr": True, "ssim": True, "niqe": False}


def default_metrics_dir() -> Path:
    """$REFFACE_HOME/metrics."""
    from ..weights import refface_home

    return refface_home() / "metrics"


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 -> [1,3,H,W] float32 in [-1, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1


class Scorer:
    """Per-face metrics and per-cell FID, with what the metrics folder holds."""

    def __init__(self, folder: str | os.PathLike, device: torch.device, say: Callable[[str], None] = print) -> None:
        self.folder, self.say = Path(folder), say
        self.device = torch.device("cpu") if device.type == "mps" else device  # the metrics compute in float64
        self.notes: list[str] = []
        if not self.folder.is_dir():
            self._note(f"the metrics folder {self.folder} does not exist: only PSNR and SSIM are scored")
        self.arcface = self._load("IDS", [ARCFACE], self._arcface)
        self.lpips = self._load("LPIPS", [LPIPS_VGG, LPIPS_LINEAR], self._lpips)
        self.inception = self._load("FID", [INCEPTION, FID_STATISTICS], self._inception)
        self.niqe = self._load("NIQE", [NIQE_MODEL], self._niqe)

    def _note(self, line: str) -> None:
        self.notes.append(line)
        self.say(line)

    def _load(self, metric: str, files: list[WeightsFile], load: Callable[..., object]) -> object | None:
        paths = [self.folder / f.name for f in files]
        missing = [f for f, path in zip(files, paths, strict=True) if not path.is_file()]
        if missing:
            wanted = "; ".join(f"{self.folder / f.name} ({f.source})" for f in missing)
            self._note(f"{metric} skipped: not found: {wanted}")
            return None
        return load(*paths)

    def _arcface(self, path: Path) -> object:
        from ..training.identity import ArcFace

        return ArcFace.from_onnx(path).to(self.device)

    def _lpips(self, backbone: Path, linear: Path) -> object:
        from .lpips import LPIPS

        return LPIPS.from_files(backbone, linear).to(self.device)

    def _inception(self, weights: Path, statistics: Path) -> object:
        from .fid import InceptionFeatures, load_statistics

        self.fid_statistics = load_statistics(statistics)
        return InceptionFeatures.from_file(weights).to(self.device)

    def _niqe(self, parameters: Path) -> object:
        from .no_reference import NIQE

        return NIQE.from_file(parameters)

    @torch.no_grad()
    def embed(self, images: list[np.ndarray]) -> torch.Tensor:
        """ArcFace embeddings [N, D] of ReF-LDM's preprocessed crops."""
        from ..training.identity import identity_preprocess

        batch = torch.cat([to_tensor(image) for image in images]).to(self.device)
        return self.arcface(identity_preprocess(batch))

    @torch.no_grad()
    def face(self, restored: np.ndarray, hq: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        """One face's scores against its ground truth and its first reference."""
        from .fidelity import psnr, ssim

        out, gt = to_tensor(restored).to(self.device), to_tensor(hq).to(self.device)
        scores = {"psnr": float(psnr(out, gt)[0]), "ssim": float(ssim(out, gt)[0])}
        if self.arcface is not None:
            e_out, e_gt, e_ref = self.embed([restored, hq, reference])
            scores["ids"] = float(F.cosine_similarity(e_out, e_gt, dim=0))
            scores["ids_ref"] = float(F.cosine_similarity(e_out, e_ref, dim=0))
        if self.lpips is not None:
            scores["lpips"] = float(self.lpips(out, gt)[0])
        if self.niqe is not None:
            from .no_reference import BLOCK

            if min(restored.shape[:2]) >= BLOCK:
                scores["niqe"] = float(self.niqe(out)[0])
            elif not any(line.startswith("NIQE") for line in self.notes):
                self._note(f"NIQE skipped: it needs faces of {BLOCK} px at least, these are {len(restored)}")
        return scores

    @torch.no_grad()
    def fid(self, images: list[np.ndarray], label: str) -> float | None:
        """FID of these restored faces against the statistics file; None when skipped or not defined (it needs 2
        faces at least; with few, the covariance's square root can fail)."""
        if self.inception is None or len(images) < 2:
            return None
        from .fid import frechet_distance, statistics

        features = torch.cat([self.inception(to_tensor(image).to(self.device)).cpu() for image in images])
        if len(images) < FEW_FOR_FID and not any(line.startswith("FID from") for line in self.notes):
            self._note(f"FID from {len(images)} faces per cell: biased upwards below a few thousand; compare it only "
                       "between runs of the same size")  # fmt: skip
        try:
            return frechet_distance(*statistics(features), *self.fid_statistics)
        except RefFaceError as e:
            self._note(f"FID of {label}: not computed: {e}")
            return None


def check_metrics_dir(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise RefFaceError(f"--metrics {folder} is a file; give the folder that holds the metrics' weights files")
