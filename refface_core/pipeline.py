"""Whole photos: find the faces, check the references, restore the person's faces and paste them back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import RefFaceError
from .faces import Face, FaceAnalysis, align_face, paste_back
from .faces.references import ReferenceReport, rank_references, sharpness
from .model import CompositeContext, RefFaceRestorer

if TYPE_CHECKING:
    from .context.farl import FaRLEncoder

MIN_EYE_DISTANCE = 32  # px; smaller faces carry too little to restore from
SELECT_MODES = ("matching", "largest", "all")
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


def face_similarity(embeddings: np.ndarray, identity: np.ndarray) -> np.ndarray:
    """Cosine similarity of each face embedding [F, dim] to a person's mean identity [N, dim] or [dim]."""
    mean = identity.reshape(-1, embeddings.shape[1]).mean(0)
    return embeddings @ (mean / np.linalg.norm(mean).clip(1e-12))


def choose_faces(
    faces: Sequence[Face],
    similarity: np.ndarray | None,
    select: str | int,
    threshold: float,
    log: Callable[[str], None] = print,
) -> list[int]:
    """Which faces (largest first) to restore: "matching" the person (by ``similarity``), "largest", "all", or
    one index; faces too small to restore are left out with a log line."""
    if not faces:
        raise RefFaceError("no face found in the photo")
    if isinstance(select, int):
        if not 0 <= select < len(faces):
            raise RefFaceError(f"face {select} does not exist: the photo has {len(faces)} (0..{len(faces) - 1})")
        targets = [select]
    elif select == "all":
        targets = list(range(len(faces)))
    elif select == "largest":
        targets = [0]
    elif select == "matching":
        if similarity is None:
            raise RefFaceError("choosing the matching faces needs the person's identity")
        targets = [i for i in range(len(faces)) if similarity[i] >= threshold]
        if not targets:
            raise RefFaceError(
                f"no face in the photo matches the references (best similarity {similarity.max():.3f}, "
                f"threshold {threshold:.3f}); restore all faces or pick one instead (CLI: --all-faces, --face N)"
            )
    else:
        raise ValueError(f"select must be one of {SELECT_MODES} or a face index, got {select!r}")
    for i in [i for i in targets if faces[i].eye_distance < MIN_EYE_DISTANCE]:
        log(f"face {i}: skipped, too small to restore ({faces[i].eye_distance:.0f}px between the eyes)")
    targets = [i for i in targets if faces[i].eye_distance >= MIN_EYE_DISTANCE]
    if not targets:
        raise RefFaceError(f"no face restored: every chosen face is under {MIN_EYE_DISTANCE}px between the eyes")
    return targets


def restore_photo(
    restorer: RefFaceRestorer,
    analysis: FaceAnalysis,
    photo: np.ndarray,
    reference_photos: Sequence[np.ndarray],
    reference_names: Sequence[str] | None = None,
    select: str | int = "matching",
    keep: int | None = None,
    threshold: float | None = None,
    farl: FaRLEncoder | None = None,
    log: Callable[[str], None] = print,
    **sample_options: Any,
) -> np.ndarray:
    """Restore the faces of ``photo`` chosen by ``select`` (see ``choose_faces``) and paste them back.
    Composite Context models also need ``farl``; the references' identity comes from ``analysis``."""
    faces = analysis.detect(photo)
    if not faces:
        raise RefFaceError("no face found in the photo (for an aligned face crop, use --aligned)")
    threshold = analysis.same_person_threshold if threshold is None else threshold
    embeddings = analysis.embed(photo, faces)

    # everything but "matching" is decided before any reference work, so a wrong choice fails at once
    targets = None if select == "matching" else choose_faces(faces, None, select, threshold, log)
    single = targets[0] if targets is not None and len(targets) == 1 else (0 if len(faces) == 1 else None)
    lq_embedding = None
    if single is not None and faces[single].eye_distance >= USABLE_LQ_EYE_DISTANCE:
        lq_embedding = embeddings[single]
    names = reference_names or [f"reference {i}" for i in range(len(reference_photos))]
    refs = prepare_references(analysis, reference_photos, restorer.image_size, names, keep, threshold, lq_embedding)
    for report in refs.reports:
        log(f"{names[report.index]}: {report.describe()}")
    if not refs.crops:
        raise RefFaceError("every reference was flagged as another person; check the reference photos")
    similarity = face_similarity(embeddings, refs.embeddings)
    if targets is None:
        targets = choose_faces(faces, similarity, select, threshold, log)
    context = restorer.encode_context(refs.crops, refs.embeddings, farl)  # once for every face of the person
    return restore_faces(restorer, photo, faces, targets, context, similarity, log, **sample_options)


def restore_faces(
    restorer: RefFaceRestorer,
    photo: np.ndarray,
    faces: Sequence[Face],
    targets: Sequence[int],
    context: CompositeContext,
    similarity: np.ndarray | None = None,
    log: Callable[[str], None] = print,
    **sample_options: Any,
) -> np.ndarray:
    """Align, restore and paste back the ``targets`` among ``faces`` of ``photo`` with one person's ``context``."""
    restored = photo
    for i in targets:
        note = "" if similarity is None else f" (similarity to the references {similarity[i]:.3f})"
        log(f"face {i}: restoring{note}")
        crop, affine = align_face(photo, faces[i].landmarks, restorer.image_size)
        restored = paste_back(restored, restorer.restore(crop, context, **sample_options), affine)
    return restored
