"""The templates' example photos and video, copied into ComfyUI's input folder: a template's LoadImage or LoadVideo can
only name a file there, and a fresh install has none. Into the folder itself, not a subfolder: LoadImage lists only the
folder's own files, and the frontend marks a value outside that list as a missing input. The album template reads a
folder, ALBUM, which holds the example photos again."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import folder_paths

from refface_core.files import write_atomic

PHOTOS = Path(__file__).resolve().parents[1] / "workflows" / "photos"  # refface_*, named as the templates name them
ALBUM = "refface_album"
log = logging.getLogger("refface")


def install_examples() -> None:
    """Copy each example not yet in the input folder, and the photos into its ALBUM folder. A file already there,
    maybe the user's own, is never replaced; a failure is one log line, so the pack still loads."""
    target = Path(folder_paths.get_input_directory())
    photos = sorted(PHOTOS.glob("refface_*.jpg"))
    try:
        (target / ALBUM).mkdir(parents=True, exist_ok=True)
        copied = [f.name for f in [*photos, *PHOTOS.glob("refface_*.mp4")] if _copy_if_absent(f, target / f.name)]
        copied += [f"{ALBUM}/{f.name}" for f in photos if _copy_if_absent(f, target / ALBUM / f.name)]
    except OSError as error:
        log.warning("RefFace: examples not copied into %s: %s", target, error)
        return
    if copied:
        log.info("RefFace: copied the examples %s into %s", ", ".join(copied), target)


def _copy_if_absent(source: Path, destination: Path) -> bool:
    """Copy whole or not at all, and only under a free name: a file made meanwhile by someone else is kept."""
    if os.path.lexists(destination):
        return False
    return write_atomic(destination, lambda tmp: shutil.copyfile(source, tmp), replace=False)
