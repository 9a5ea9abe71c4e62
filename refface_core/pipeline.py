"""Whole photos: find the faces, check the references, restore the person's faces and paste them back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import RefFaceError
from .faces import FaceAnalysis, align_face, paste_back
from .faces.references import ReferenceReport, rank_references, sharpness
from .model import RefFaceRestorer

if TYPE_CHECKING:
    from .context.farl import FaRLEncoder

MIN_EYE_DISTANCE = 32  # px; smaller faces carry too little to restore from
USABLE_LQ_EYE_DISTANCE = 48  # px; below this the LQ face's embedding is too unreliable to rank references by


@dataclass
class References:
    crops: list[np.ndarray]  # aligned, best first, flagged ones left out
    embeddings: np.ndarray  # of ``crops``
    reports: list[ReferenceReport]  # every reference, best first


def prepare_references(
    analysis: FaceAnalysis,
    photos: Sequence[np.ndarray],
    size: int,
    names: Sequence[str] | None = None,
    keep: int | None = None,
    threshold: float | None = None,
    lq_embedding: np.ndarray | None = None,
) -> References:
    """Align the main (largest) face of each reference photo, rank them, and drop likely other people."""
    if keep is not None and keep < 1:
        raise RefFaceError(f"keeping {keep} references leaves none; keep at least 1")
    names = names or [f"reference {i}" for i in range(len(photos))]
    crops, embeddings, eye_distances = [], [], []
    for photo, name in zip(photos, names, strict=True):
        face = analysis.main_face(photo, name)
        crops.append(align_face(photo, face.landmarks, size)[0])
        embeddings.append(analysis.embed(photo, [face])[0])
        eye_distances.append(face.eye_distance)
    embeddings = np.stack(embeddings)
    threshold = analysis.same_person_threshold if threshold is None else threshold
    reports = rank_references(embeddings, eye_distances, [sharpness(c) for c in crops], threshold, lq_embedding)
    used = [r.index for r in reports if not r.flagged][:keep]
    return References([crops[i] for i in used], embeddings[used], reports)


def main_face_embeddings(analysis: FaceAnalysis, images: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
    """Identity embedding of the main (largest) face of each image [len(images), dim]."""
    return np.stack(
        [analysis.embed(image, [analysis.main_face(image, name)])[0] for image, name in zip(images, names, strict=True)]
    )


def restore_photo(
    restorer: RefFaceRestorer,
    analysis: FaceAnalysis,
    photo: np.ndarray,
    reference_photos: Sequence[np.ndarray],
    reference_names: Sequence[str] | None = None,
    all_faces: bool = False,
    face_index: int | None = None,
    keep: int | None = None,
    threshold: float | None = None,
    farl: FaRLEncoder | None = None,
    log: Callable[[str], None] = print,
    **sample_options: Any,
) -> np.ndarray:
    """Restore the faces of ``photo`` that match the references (or all, or one by index) and paste them back.
    Composite Context models also need ``farl``; the references' identity comes from ``analysis``."""
    faces = analysis.detect(photo)
    if not faces:
        raise RefFaceError("no face found in the photo (for an aligned face crop, use --aligned)")
    if face_index is not None and not 0 <= face_index < len(faces):
        raise RefFaceError(f"face {face_index} does not exist: the photo has {len(faces)} (0..{len(faces) - 1})")
    threshold = analysis.same_person_threshold if threshold is None else threshold
    embeddings = analysis.embed(photo, faces)

    single = face_index if face_index is not None else (0 if len(faces) == 1 else None)
    lq_embedding = None
    if single is not None and faces[single].eye_distance >= USABLE_LQ_EYE_DISTANCE:
        lq_embedding = embeddings[single]
    names = reference_names or [f"reference {i}" for i in range(len(reference_photos))]
    refs = prepare_references(analysis, reference_photos, restorer.image_size, names, keep, threshold, lq_embedding)
    for report in refs.reports:
        log(f"{names[report.index]}: {report.describe()}")
    if not refs.crops:
        raise RefFaceError("every reference was flagged as another person; check the reference photos")

    identity = refs.embeddings.mean(0)
    similarity = embeddings @ (identity / np.linalg.norm(identity))
    if face_index is not None:
        targets = [face_index]
    elif all_faces:
        targets = list(range(len(faces)))
    else:
        targets = [i for i in range(len(faces)) if similarity[i] >= threshold]
        if not targets:
            raise RefFaceError(
                f"no face in the photo matches the references (best similarity {similarity.max():.3f}, "
                f"threshold {threshold:.3f}); use --all-faces or --face N to restore anyway"
            )
    for i in [i for i in targets if faces[i].eye_distance < MIN_EYE_DISTANCE]:
        log(f"face {i}: skipped, too small to restore ({faces[i].eye_distance:.0f}px between the eyes)")
    targets = [i for i in targets if faces[i].eye_distance >= MIN_EYE_DISTANCE]
    if not targets:
        raise RefFaceError(f"no face restored: every chosen face is under {MIN_EYE_DISTANCE}px between the eyes")
    context = restorer.encode_context(refs.crops, refs.embeddings, farl)  # once for every face of the person
    restored = photo
    for i in targets:
        log(f"face {i}: restoring (similarity to the references {similarity[i]:.3f})")
        crop, affine = align_face(photo, faces[i].landmarks, restorer.image_size)
        restored = paste_back(restored, restorer.restore(crop, context, **sample_options), affine)
    return restored
