"""ComfyUI glue: model folders, offloadable models, IMAGE tensors <-> arrays, progress with previews, Cancel."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy.cli_args import LatentPreviewMethod, args
from PIL import Image

from refface_core import RefFaceError, RefFaceRestorer
from refface_core.faces import is_warning
from refface_core.model import DTYPES
from refface_core.model.tensors import check_finite, from_model_tensor
from refface_core.weights import MODEL_NAME, download_model

log = logging.getLogger("refface")

# our own models/<folder>/ -> the file endings its dropdowns list
MODEL_FOLDERS = {
    "refface": {".json"},  # a model is a folder: <name>/config.json + model.safetensors
    "farl": {".pth", ".pt", ".ckpt", ".safetensors"},
}
INSIGHTFACE = "insightface"  # packs in models/insightface/models/<name>/, shared with InstantID and IPAdapter
HOW_TO_GET = {
    "refface": f"choose {MODEL_NAME!r}, which Load RefFace Model downloads on first use, or convert checkpoints you "
    "have into it with `python -m refface_core convert`",
    "farl": "download FaRL-Base-Patch16-LAIONFace20M-ep64.pth into it",
    "insightface": "put an insightface pack such as antelopev2 or buffalo_l in models/insightface/models/<name>/",
}


def register_model_folders() -> None:
    for name, extensions in MODEL_FOLDERS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        folder_paths.folder_names_and_paths[name] = (folder_paths.get_folder_paths(name), extensions)
    # other packs may own this one: add our path, leave their file-ending list alone
    folder_paths.add_model_folder_path(INSIGHTFACE, os.path.join(folder_paths.models_dir, INSIGHTFACE))


def available(folder: str) -> list[str]:
    """What a loader's dropdown lists: model folders in refface/ (ReF-LDM's even before it is on disk: the loader
    downloads it), packs in insightface/models/, files in farl/."""
    if folder == INSIGHTFACE:
        roots = [os.path.join(base, "models") for base in folder_paths.get_folder_paths(INSIGHTFACE)]
        return sorted(
            {
                name
                for root in roots
                if os.path.isdir(root)
                for name in os.listdir(root)
                if os.path.isdir(os.path.join(root, name))
                and any(f.endswith(".onnx") for f in os.listdir(os.path.join(root, name)))
            }
        )
    files = folder_paths.get_filename_list(folder)
    if folder == "refface":
        return sorted(
            {MODEL_NAME}
            | {os.path.dirname(f) for f in files if os.path.basename(f) == "config.json" and os.path.dirname(f)}
        )
    return files


def model_path(folder: str, name: str) -> str:
    """Where the listed model ``name`` is, or an error naming the folder to put it in."""
    paths = folder_paths.get_folder_paths(folder)
    if name in available(folder):
        relative = os.path.join("models", name) if folder == INSIGHTFACE else name
        for base in paths:
            if os.path.exists(os.path.join(base, relative)):
                return os.path.join(base, relative)
    raise RefFaceError(f"{name!r} is not in models/{folder}/ (looked in {', '.join(paths)}); {HOW_TO_GET[folder]}")


def found(folder: str, name: str) -> bool | str:
    """``validate_inputs`` answer: True, or the missing-model message (clearer than 'value not in list')."""
    try:
        model_path(folder, name)
    except RefFaceError as e:
        return str(e)
    return True


def restorer_path(name: str) -> str:
    """The model folder ``name``; ReF-LDM's is downloaded and converted into the first models/refface/ folder when it
    is not there, the same folder `refface download --dir` fills, so the CLI can share that one copy."""
    if name != MODEL_NAME or found("refface", name) is True:
        return model_path("refface", name)
    folder = Path(folder_paths.get_folder_paths("refface")[0])
    return str(download_model(folder, log.info, DownloadProgress))


class DownloadProgress:
    """A file's download on ComfyUI's progress bar, in bytes, sent once per percent (chunks are 64 KiB), and in the
    log every 10%; Cancel stops it between chunks, keeping the part file to resume next time."""

    def __init__(self, name: str) -> None:
        self.name, self.shown = name, -1
        self.bar: comfy.utils.ProgressBar | None = None

    def __call__(self, done: int, total: int | None) -> None:
        mm.throw_exception_if_processing_interrupted()
        if not total:  # no length announced: nothing to measure against
            return
        percent = done * 100 // total
        if percent == self.shown:
            return
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(done, total)
        if percent // 10 != self.shown // 10:
            log.info("%s: %d%% of %.1f MB", self.name, percent, total / 1e6)
        self.shown = percent


def model_dtype(name: str) -> torch.dtype:
    """ "auto" follows ComfyUI's choice for the device: bf16, else fp16, else fp32."""
    if name != "auto":
        return DTYPES[name]
    device = mm.get_torch_device()
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if mm.should_use_fp16(device) else torch.float32


class Offloadable:
    """A torch model that ComfyUI's memory management moves between its load and offload devices."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        holder = torch.nn.ModuleDict({"model": model})  # ComfyUI sets `.device` on what it manages
        self.patcher = comfy.model_patcher.CoreModelPatcher(
            holder,
            load_device=mm.get_torch_device(),
            offload_device=mm.unet_offload_device(),
            size=mm.module_size(holder),
        )


def load_on_device(*models: Offloadable) -> list[torch.nn.Module]:
    """Load these models together, whole (plain torch layers cannot run half on the GPU, half off it)."""
    mm.load_models_gpu([m.patcher for m in models], force_full_load=True)
    return [m.model for m in models]


def report(lines: list[str], warnings: list[bool] | None = None) -> dict[str, list]:
    """A node's report: shown on the node by web/refface.js, the warnings marked, and logged to the server console.
    ``warnings``: which lines to mark (default: the core's rule, ``is_warning``)."""
    warnings = [is_warning(line) for line in lines] if warnings is None else warnings
    for line, warning in zip(lines, warnings, strict=True):
        log.log(logging.WARNING if warning else logging.INFO, "%s", line)
    return {"text": lines, "refface_warnings": warnings}


def to_arrays(images: torch.Tensor) -> list[np.ndarray]:
    """IMAGE [B,H,W,C] floats in 0..1 -> RGB uint8 arrays."""
    if images.dim() != 4 or not images.numel() or images.shape[-1] < 3:
        raise RefFaceError(f"expected a batch of RGB images [B,H,W,3], got shape {tuple(images.shape)}")
    return list(check_finite(images)[..., :3].clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy())


def to_image(arrays: list[np.ndarray]) -> torch.Tensor:
    """Equal-sized RGB uint8 arrays -> IMAGE [B,H,W,3] on ComfyUI's intermediate device."""
    batch = torch.from_numpy(np.stack(arrays)).to(mm.intermediate_device(), mm.intermediate_dtype())
    return batch / 255


class SamplingProgress:
    """Sampling callback: one progress tick per step of each face (a step of a batch of faces counts once per face),
    a decoded preview about ten times per batch (unless previews are off), and the Cancel button checked after every
    step."""

    def __init__(self, restorer: RefFaceRestorer, faces: int, steps: int) -> None:
        self.restorer, self.every, self.done = restorer, max(1, steps // 10), 0
        self.bar = comfy.utils.ProgressBar(faces * steps)

    def __call__(self, step: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        mm.throw_exception_if_processing_interrupted()
        self.done += len(x)
        preview = None
        if args.preview_method != LatentPreviewMethod.NoPreviews and (step % self.every == 0 or step == total):
            face = from_model_tensor(self.restorer.decode(x0[:1]), like=np.zeros((1, 1, 3), np.uint8))
            preview = ("JPEG", Image.fromarray(face), args.preview_size)
        self.bar.update_absolute(self.done, preview=preview)
