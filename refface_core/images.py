"""Image files: photos read upright with their depth, colour profile and EXIF; results written atomically."""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .errors import RefFaceError
from .files import check_writable_folder, path_kind, write_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what folders of photos may hold
DEEP_FORMATS = ("PNG", "TIFF")  # formats that keep 16 bits per channel
MIN_SIDE = 16  # px: the smallest photo that can hold a face (5 px between the eyes)
EXIF_ORIENTATION, EXIF_DESCRIPTION, EXIF_SOFTWARE, EXIF_IFD, EXIF_MAKER_NOTE = 0x0112, 0x010E, 0x0131, 0x8769, 0x927C
JPEG_EXIF_LIMIT = 65_000  # a JPEG's EXIF segment holds at most 64 KB
READ_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError)


@dataclass
class Photo:
    """A photo as read from its file: upright RGB pixels and what the result should carry over."""

    pixels: np.ndarray  # H×W×3, uint8, or uint16 for a 16-bit PNG or TIFF
    exif: Image.Exif | None = None  # the file's EXIF, orientation reset: the pixels are upright
    icc: bytes | None = None  # the colour profile the pixel values are in


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open a photo as 8-bit RGB, upright per its EXIF orientation."""
    return Image.fromarray(to_8bit(load_photo(path).pixels))


def load_photo(path: str | os.PathLike) -> Photo:
    """Read a photo upright, keeping 16 bits per channel where the file has them."""
    if not isinstance(path, (str, os.PathLike)):
        raise RefFaceError(f"expected an image file's path, got {type(path).__name__}")
    path = Path(path)
    kind = path_kind(path)
    if kind == "folder":
        raise RefFaceError(f"{path} is a folder, not an image")
    if kind != "file":
        raise RefFaceError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL on damaged EXIF: the pixels are still good
            return _read(path)
    except READ_ERRORS as e:
        raise RefFaceError(f"not a readable image: {path} ({e})") from None


def _read(path: Path) -> Photo:
    with Image.open(path) as im:
        deep = im.format in DEEP_FORMATS and _is_deep(im)  # before the pixels load, while PIL tells how it reads them
        upright = ImageOps.exif_transpose(im)
        exif, icc = upright.getexif(), im.info.get("icc_profile")
        if icc and icc[16:20] != b"RGB ":  # a grey or CMYK file's profile does not describe the RGB pixels read
            icc = None
        pixels = _deep_pixels(path) if deep else None
        if pixels is None:
            if upright.mode in ("I;16", "I;16B", "I;16L", "I"):
                upright = Image.fromarray((np.asarray(upright, np.float32) / 257).clip(0, 255).astype(np.uint8))
            pixels = np.asarray(upright.convert("RGB"))
    exif.pop(EXIF_ORIENTATION, None)
    return Photo(pixels, exif or None, icc)


def _is_deep(im: Image.Image) -> bool:
    args = im.tile[0].args if im.tile else None
    rawmode = args[0] if isinstance(args, tuple) else args  # e.g. "RGB;16B": PIL reads such a file as 8-bit RGB
    return im.mode.startswith("I;16") or ";16" in str(rawmode)


def _deep_pixels(path: Path) -> np.ndarray | None:
    """A 16-bit PNG or TIFF as upright uint16 RGB (PIL reads 16-bit colour as 8 bits); None for an 8-bit file."""
    import cv2

    flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH  # decoding applies the EXIF orientation
    bgr = cv2.imdecode(np.fromfile(path, np.uint8), flags)
    return None if bgr is None or bgr.dtype != np.uint16 else np.ascontiguousarray(bgr[..., ::-1])


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels for the models; 16-bit ones scaled."""
    if pixels.dtype == np.uint8:
        return pixels
    return (pixels.astype(np.float32) / 257).round().astype(np.uint8)


def check_photo(image: Any, name: str = "the image") -> np.ndarray:
    """The photo as an H×W×3 uint8 (or uint16) RGB array, or a RefFaceError saying what it is instead."""
    if not isinstance(image, np.ndarray):
        raise RefFaceError(f"{name} must be an H×W×3 RGB array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise RefFaceError(
            f"{name} must be an H×W×3 RGB array, got shape {image.shape}; convert grey or RGBA images to RGB first"
        )
    if image.dtype not in (np.uint8, np.uint16):
        raise RefFaceError(f"{name} must hold uint8 (or uint16) pixels, got {image.dtype}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise RefFaceError(
            f"{name} is {image.shape[1]}×{image.shape[0]} px: too small to hold a face (at least {MIN_SIDE} px "
            "each way)"
        )
    return image


def check_output_path(path: str | os.PathLike) -> str:
    """Fail early, before any work, on an output path that cannot be written; returns the PIL format."""
    path = Path(path)
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt not in Image.SAVE or fmt in ("XBM", "PALM", "PDF", "EPS"):
        raise RefFaceError(f"unknown image extension {path.suffix!r} for {path}; use .png or .jpg")
    if path_kind(path) == "folder":
        raise RefFaceError(f"{path} is a folder; give a file name for the image")
    if path_kind(path.parent) == "missing":
        raise RefFaceError(f"output folder does not exist: {path.parent}")
    check_writable_folder(path.parent)
    return fmt


def save_image(
    image: Image.Image | np.ndarray,
    path: str | os.PathLike,
    provenance: dict[str, Any] | None = None,
    exif: Image.Exif | None = None,
    icc: bytes | None = None,
) -> None:
    """Write next to the target and rename, so an existing file is never left half-written. ``provenance``, how the
    image was made, goes into the file as JSON: a PNG text chunk "refface", and EXIF's ImageDescription. ``exif``
    and ``icc`` are the source photo's, carried over. uint16 pixels stay 16-bit in PNG and TIFF."""
    path = Path(path)
    fmt = check_output_path(path)
    pixels = np.asarray(image)
    if pixels.dtype == np.uint16 and fmt not in DEEP_FORMATS:
        pixels = to_8bit(pixels)
    text = None if provenance is None else json.dumps(provenance, ensure_ascii=True)
    software = "RefFace" if provenance is None else provenance.get("software", "RefFace")
    exif = _exif_with(exif, software, text)
    if fmt == "JPEG" and len(exif.tobytes()) > JPEG_EXIF_LIMIT:  # a camera's MakerNote can fill the EXIF segment
        exif.get_ifd(EXIF_IFD).pop(EXIF_MAKER_NOTE, None)
        if len(exif.tobytes()) > JPEG_EXIF_LIMIT:
            exif = _exif_with(None, software, text)
    if pixels.dtype == np.uint16:
        write = _deep_writer(pixels, fmt, exif, icc, text, software)
    else:
        options: dict[str, Any] = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
        if len(exif) and fmt in ("JPEG", "WEBP", "TIFF", "PNG"):
            options["exif"] = exif
        if icc and fmt in ("JPEG", "WEBP", "TIFF", "PNG"):
            options["icc_profile"] = icc
        if text is not None and fmt == "PNG":
            options["pnginfo"] = PngInfo()
            options["pnginfo"].add_text("Software", software)
            options["pnginfo"].add_text("refface", text)
        picture = image if isinstance(image, Image.Image) else Image.fromarray(pixels)

        def write(tmp: str) -> None:
            picture.save(tmp, format=fmt, **options)

    try:
        write_atomic(path, write)
    except OSError as e:
        raise RefFaceError(f"cannot write {path}: {e.strerror or e}") from None


def _exif_with(exif: Image.Exif | None, software: str, text: str | None) -> Image.Exif:
    """A copy of ``exif`` (the caller's stays as it is) recording the provenance ``text``."""
    copy = Image.Exif()
    if exif is not None:
        copy.load(exif.tobytes())
    if text is not None:
        copy[EXIF_SOFTWARE], copy[EXIF_DESCRIPTION] = software, text
    return copy


def _deep_writer(
    pixels: np.ndarray, fmt: str, exif: Image.Exif, icc: bytes | None, text: str | None, software: str
) -> Any:
    """Writes 16-bit RGB, which PIL cannot: OpenCV encodes it, and the metadata goes in as PNG chunks or TIFF tags."""
    import cv2

    if fmt == "TIFF":
        import tifffile

        return lambda tmp: tifffile.imwrite(
            tmp,
            pixels,
            photometric="rgb",
            compression="zlib",
            description=text,
            software=software,
            iccprofile=icc,
            metadata=None,
        )
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(pixels[..., ::-1]))
    if not ok:
        raise RefFaceError("OpenCV could not encode the 16-bit PNG")
    chunks = []
    if icc:
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(icc)))
    if len(exif):
        chunks.append(_png_chunk(b"eXIf", exif.tobytes().removeprefix(b"Exif\0\0")))  # PNG's has no header
    if text is not None:
        chunks.append(_png_chunk(b"tEXt", b"Software\0" + software.encode("latin-1", "replace")))
        chunks.append(_png_chunk(b"tEXt", b"refface\0" + text.encode("ascii")))
    data = encoded.tobytes()
    header_end = 8 + 8 + 13 + 4  # signature, then IHDR (length, type, 13 bytes, CRC): the chunks go right after it
    return lambda tmp: Path(tmp).write_bytes(data[:header_end] + b"".join(chunks) + data[header_end:])


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
