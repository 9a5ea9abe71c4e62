"""Whole photos: find the faces, choose the person's, restore them with the person's references, paste them back."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from .errors import RefFaceError
from .faces import Face, FaceAnalysis, align_face, choose_faces, find_faces, paste_back, scale_affine
from .faces.tone import is_grayscale, match_tone
from .images import check_photo, to_8bit

if TYPE_CHECKING:
    from .model import CompositeContext, RefFaceRestorer

# The automatic --upscale: the smallest whole factor that brings every restored face to USEFUL_FACE_SIZE px between
# the eyes. That is half the resolution of the restored 512 px crop (its template has 126 px between the eyes), so
# about half of what was restored shows; pasted into the photo's own size, a 20 px face keeps a sixth.
USEFUL_FACE_SIZE = 64.0
MAX_AUTO_UPSCALE = 4
MAX_AUTO_PIXELS = 16_000_000  # the automatic factor stays within this output size (a 4000×4000 photo)
MAX_UPSCALE = 8.0  # for a factor the user gives
MAX_PIXELS = 64_000_000  # for a factor the user gives: bounds memory (the paste works on the output's pixels)


@dataclass
class RestoredPhoto:
    images: list[np.ndarray]  # the restored photo, one per seed
    faces: list[int]  # which faces (largest first) were restored
    upscale: float  # the output's size over the photo's


def auto_upscale(shape: tuple[int, ...], face_sizes: Sequence[float]) -> int:
    """The smallest whole factor giving every face USEFUL_FACE_SIZE, within MAX_AUTO_UPSCALE and MAX_AUTO_PIXELS."""
    wanted = math.ceil(USEFUL_FACE_SIZE / min(face_sizes) - 1e-6) if face_sizes else 1
    affordable = math.floor(math.sqrt(MAX_AUTO_PIXELS / (shape[0] * shape[1])))
    return max(1, min(wanted, MAX_AUTO_UPSCALE, affordable))


def check_upscale(shape: tuple[int, ...], factor: float) -> None:
    """A factor the user gives: at least 1 (1 keeps any photo), at most MAX_UPSCALE and MAX_PIXELS of output."""
    if not (math.isfinite(factor) and 1 <= factor <= MAX_UPSCALE):
        raise RefFaceError(f"upscale must be between 1 and {MAX_UPSCALE:g}, got {factor:g}")
    h, w = round(shape[0] * factor), round(shape[1] * factor)
    if factor > 1 and h * w > MAX_PIXELS:
        raise RefFaceError(
            f"upscale {factor:g} would make a {w}×{h} image ({h * w / 1e6:.0f} MP, the most is {MAX_PIXELS / 1e6:.0f}"
            " MP); use a smaller factor, or 1"
        )


def restore_photo(
    restorer: RefFaceRestorer,
    analysis: FaceAnalysis,
    photo: np.ndarray,
    identity: np.ndarray,
    context: CompositeContext,
    select: str | int = "matching",
    threshold: float | None = None,
    upscale: float | None = None,
    tone: bool = True,
    seeds: Sequence[int] = (2024,),
    log: Callable[[str], None] = print,
    **sample_options: Any,
) -> RestoredPhoto:
    """Restore the faces of ``photo`` chosen by ``select`` (see ``choose_faces``; ``identity``: the references'
    embeddings) with the person's ``context``, once per seed, and paste them into the photo upscaled by ``upscale``
    (None: ``auto_upscale``). ``tone`` gives the restored faces the photo's tone (see ``match_tone``). A 16-bit
    ``photo`` gives 16-bit results: only the restored faces are 8-bit."""
    found = find_faces(analysis, photo, identity)
    threshold = analysis.same_person_threshold if threshold is None else threshold
    targets = choose_faces(found, select, threshold, log)
    return restore_faces(restorer, photo, found.faces, targets, context, upscale, tone, seeds, log, **sample_options)


def restore_faces(
    restorer: RefFaceRestorer,
    photo: np.ndarray,
    faces: Sequence[Face],
    targets: Sequence[int],
    context: CompositeContext,
    upscale: float | None = None,
    tone: bool = True,
    seeds: Sequence[int] = (2024,),
    log: Callable[[str], None] = print,
    **sample_options: Any,
) -> RestoredPhoto:
    """Restore the ``targets`` among ``faces`` of ``photo`` as ``restore_photo`` does: all of them, and all seeds,
    sampled together (see ``restore_crops``), then pasted back one by one."""
    base = check_photo(photo)
    photo = to_8bit(base)
    if upscale is None:
        upscale = auto_upscale(photo.shape, [faces[i].size for i in targets])
    check_upscale(photo.shape, upscale)
    if upscale != 1:
        size = (round(photo.shape[1] * upscale), round(photo.shape[0] * upscale))
        base = cv2.resize(base, size, interpolation=cv2.INTER_LANCZOS4)
        log(f"upscaling the photo {upscale:g}× to {size[0]}×{size[1]} (Lanczos)")
    factors = (base.shape[1] / photo.shape[1], base.shape[0] / photo.shape[0])  # as rounded to whole pixels
    grayscale = None if tone and is_grayscale(photo) else False  # a grey photo: each face's crop confirms it
    aligned = [align_face(photo, faces[i].landmarks, restorer.image_size) for i in targets]
    if targets:
        log(f"restoring {len(targets)} face(s)" + (f", {len(seeds)} candidates each" if len(seeds) > 1 else ""))
    crops = restore_crops(restorer, [crop for crop, _ in aligned], context, seeds, tone, grayscale, **sample_options)
    restored = [base] * len(seeds)
    for i, (_, affine), versions in zip(targets, aligned, crops, strict=True):
        log(f"face {i}: restored, pasting it back")
        affine = scale_affine(affine, *factors)
        restored = [paste_back(image, face, affine) for image, face in zip(restored, versions, strict=True)]
    return RestoredPhoto(restored, list(targets), upscale)


def restore_crops(
    restorer: RefFaceRestorer,
    crops: Sequence[np.ndarray],
    context: CompositeContext,
    seeds: Sequence[int] = (2024,),
    tone: bool = True,
    grayscale: bool | None = None,
    **sample_options: Any,
) -> list[list[np.ndarray]]:
    """Aligned face crops of one person, each restored once per seed, all in one ``restore_batch``, and each in its
    crop's tone (``grayscale``: None decides from each crop)."""
    restored = restorer.restore_batch(
        [crop for crop in crops for _ in seeds], context, [seed for _ in crops for seed in seeds], **sample_options
    )
    per_crop = []
    for k, crop in enumerate(crops):
        faces = restored[k * len(seeds) : (k + 1) * len(seeds)]
        gray = (tone and is_grayscale(crop)) if grayscale is None else grayscale
        per_crop.append([match_tone(face, crop, gray) if tone else face for face in faces])
    return per_crop
