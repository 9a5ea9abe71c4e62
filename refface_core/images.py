"""Image files: photos read upright as RGB, results written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .errors import RefFaceError
from .files import write_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what folders of photos may hold


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open a photo as 8-bit RGB, upright per its EXIF orientation."""
    path = Path(path)
    if not path.is_file():
        raise RefFaceError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = Image.fromarray((np.asarray(im, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8))
            return im.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise RefFaceError(f"not a readable image: {path} ({e})") from None


def check_output_path(path: str | os.PathLike) -> str:
    """Fail early, before any work, on an output path that cannot be written; returns the PIL format."""
    path = Path(path)
    if not path.parent.is_dir():
        raise RefFaceError(f"output folder does not exist: {path.parent}")
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt not in Image.SAVE or fmt in ("XBM", "PALM", "PDF", "EPS"):
        raise RefFaceError(f"unknown image extension {path.suffix!r} for {path}; use .png or .jpg")
    return fmt


def save_image(image: Image.Image, path: str | os.PathLike, provenance: dict[str, Any] | None = None) -> None:
    """Write next to the target and rename, so an existing file is never left half-written. ``provenance``, how the
    image was made, goes into the file as JSON: a PNG text chunk "refface", or EXIF's ImageDescription."""
    fmt = check_output_path(path)
    options: dict[str, Any] = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    if provenance is not None:
        text = json.dumps(provenance, ensure_ascii=True)
        if fmt == "PNG":
            options["pnginfo"] = PngInfo()
            options["pnginfo"].add_text("Software", provenance.get("software", "RefFace"))
            options["pnginfo"].add_text("refface", text)
        elif fmt in ("JPEG", "WEBP", "TIFF"):
            exif = Image.Exif()
            exif[0x0131] = provenance.get("software", "RefFace")  # Software
            exif[0x010E] = text  # ImageDescription
            options["exif"] = exif
    write_atomic(Path(path), lambda tmp: image.save(tmp, format=fmt, **options))
