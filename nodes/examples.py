"""The templates' example photos, copied into ComfyUI's input folder: a template's LoadImage can only name a file there,
and a fresh install has none. Into the folder itself, not a subfolder: LoadImage lists only the folder's own files, and
the frontend marks a value outside that list as a missing input."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import folder_paths

from refface_core.files import write_atomic

PHOTOS = Path(__file__).resolve().parents[1] / "workflows" / "photos"  # refface_*.jpg, named as the templates name them
log = logging.getLogger("refface")


def install_examples() -> None:
    """Copy each example photo not yet in the input folder. A file already there, maybe the user's own, is never
    replaced; a failure is one log line, so the pack still loads."""
    target = Path(folder_paths.get_input_directory())
    try:
        target.mkdir(parents=True, exist_ok=True)
        copied = [f.name for f in sorted(PHOTOS.glob("refface_*.jpg")) if _copy_if_absent(f, target / f.name)]
    except OSError as error:
        log.warning("RefFace: example photos not copied into %s: %s", target, error)
        return
    if copied:
        log.info("RefFace: copied the example photos %s into %s", ", ".join(copied), target)


def _copy_if_absent(source: Path, destination: Path) -> bool:
    """Copy whole or not at all, and only under a free name: a file made meanwhile by someone else is kept."""
    if os.path.lexists(destination):
        return False
    return write_atomic(destination, lambda tmp: shutil.copyfile(source, tmp), replace=False)
