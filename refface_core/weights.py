"""ReF-LDM's public weights: downloaded (resumably) and converted once into a RefFace model folder, the default one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import RefFaceError
from .files import check_writable_folder, write_folder_atomic

if TYPE_CHECKING:
    import requests

RELEASE_URL = "https://github.com/ChiWeiHsiao/ref-ldm/releases/download/1.0.0"
CHECKPOINTS = ("refldm.ckpt", "vqgan.ckpt")  # the UNet (with its EMA copy) and the VQ autoencoder
MODEL_NAME = "refldm"
LICENCE = (
    "ReF-LDM's weights (github.com/ChiWeiHsiao/ref-ldm) are provided for non-commercial research purposes only; "
    "any commercial use is prohibited. Downloading them means accepting that licence."
)
CHUNK = 1 << 16  # what a dropped connection can lose of the part file

ByteProgress = Callable[[int, "int | None"], None]  # (bytes so far, total bytes or None)


def refface_home() -> Path:
    """Where RefFace keeps its models: $REFFACE_HOME, default ~/.cache/refface."""
    return Path(os.environ.get("REFFACE_HOME") or "~/.cache/refface").expanduser()


def default_model_dir() -> Path:
    """The model `refface restore` uses without --model: $REFFACE_HOME/models/refldm."""
    return refface_home() / "models" / MODEL_NAME


def download_base() -> str:
    """ReF-LDM's GitHub release, or $REFFACE_DOWNLOAD_BASE (a mirror, or a local server in tests)."""
    return (os.environ.get("REFFACE_DOWNLOAD_BASE") or RELEASE_URL).rstrip("/")


AGAIN = "run again (the command, or the workflow in ComfyUI)"  # both front ends call the download


def download(url: str, target: Path, progress: ByteProgress | None = None) -> None:
    """Fetch ``url`` into ``target`` through ``target.part``, which an interrupted run leaves behind to be resumed:
    a 206 answer with Content-Range appends to it, a 200 starts it again, and a part file the server cannot resume
    (416, e.g. longer than the file) is started again. Redirects are followed, and the result must have the length
    the server announced."""
    import requests

    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={have}-"} if have else {})
    try:
        with requests.get(url, headers=headers, stream=True, timeout=(15, 60)) as response:
            if response.status_code == 416 and have:
                if _content_range_total(response) == have:  # the part file is already complete
                    os.replace(part, target)
                    return
                part.unlink()
                return download(url, target, progress)
            if response.status_code not in (200, 206):
                raise RefFaceError(f"download of {url} failed: HTTP {response.status_code} {response.reason}")
            if response.status_code == 206:
                total = _content_range_total(response, start=have)
            else:
                have, length = 0, response.headers.get("Content-Length", "")
                total = int(length) if length.isdigit() else None
            with open(part, "ab" if have else "wb") as file:
                for chunk in response.iter_content(CHUNK):
                    file.write(chunk)
                    have += len(chunk)
                    if progress is not None:
                        progress(have, total)
    except requests.RequestException as e:
        raise RefFaceError(
            f"download of {url} stopped after {have:,} bytes ({type(e).__name__}); {AGAIN} to resume"
        ) from None
    except OSError as e:  # after requests' errors, which are OSErrors too
        raise RefFaceError(f"cannot write {part}: {e.strerror or e}") from None
    if total is not None and have != total:
        raise RefFaceError(f"download of {url} is incomplete ({have:,} of {total:,} bytes); {AGAIN} to resume")
    try:
        os.replace(part, target)
    except OSError as e:
        raise RefFaceError(f"cannot move {part} to {target}: {e.strerror}") from None


def _content_range_total(response: requests.Response, start: int | None = None) -> int | None:
    """The whole file's length from "Content-Range: bytes a-b/total" (None if absent); a 206 must start at ``start``."""
    unit, _, spec = response.headers.get("Content-Range", "").partition(" ")
    span, _, size = spec.partition("/")
    if unit != "bytes" or not size.isdigit():
        if start is None:
            return None
        raise RefFaceError(f"the server sent a bad Content-Range {response.headers.get('Content-Range')!r}")
    if start is not None and span.partition("-")[0] != str(start):
        raise RefFaceError(f"the server resumed at the wrong place ({span}, expected {start}-)")
    return int(size)


def download_model(
    folder: Path | None = None,
    log: Callable[[str], None] = print,
    progress_for: Callable[[str], ByteProgress] | None = None,
) -> Path:
    """Download ReF-LDM's checkpoints into ``folder`` (default $REFFACE_HOME/models) and convert them into the RefFace
    model ``folder/refldm``; returns it. Files already complete are not fetched again, nor a converted model made
    again. The model folder appears whole or not at all."""
    folder = Path(folder) if folder is not None else refface_home() / "models"
    model_dir = folder / MODEL_NAME
    check_writable_folder(folder)
    if (model_dir / "config.json").is_file():
        log(f"{model_dir} is already there")
        return model_dir
    if model_dir.exists():
        raise RefFaceError(f"{model_dir} exists but is not a RefFace model; move it away and run this again")
    folder.mkdir(parents=True, exist_ok=True)
    log(LICENCE)
    base = download_base()
    fetched = []
    for name in CHECKPOINTS:
        if (folder / name).is_file():
            continue
        log(f"downloading {base}/{name} into {folder}")
        download(f"{base}/{name}", folder / name, progress_for(name) if progress_for else None)
        fetched.append(name)
    log(f"converting the checkpoints into {model_dir}")
    _convert_atomically(folder, model_dir, fetched)
    return model_dir


def _convert_atomically(folder: Path, model_dir: Path, fetched: list[str]) -> None:
    from .model import convert_refldm, load_checkpoint

    states = []
    for name in CHECKPOINTS:
        try:
            states.append(load_checkpoint(folder / name))
        except RefFaceError as e:
            if name not in fetched:
                raise RefFaceError(f"{e} Delete it and {AGAIN} to fetch it.") from None
            (folder / name).unlink()  # damaged in transit: removed, so that the next run fetches it again
            raise RefFaceError(f"{e} It was removed: {AGAIN} to fetch it.") from None
    try:
        model = convert_refldm(*states)
    except RefFaceError as e:  # not ReF-LDM's checkpoints
        raise RefFaceError(f"{e} (checkpoints from {download_base()} in {folder})") from None
    write_folder_atomic(model_dir, model.save_pretrained)
