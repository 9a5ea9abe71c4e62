"""Which faces of a photo are the person in the references, decided so that degraded photos work.

A face recogniser is weak on the faces RefFace exists for. On real photos degraded as old photos are, the same
person's similarity to another, sharp photo of them falls to 0.1-0.4 with SFace, often under its published
threshold (0.363), while different people stay lower still. So a face is chosen by the threshold, else by a clear
margin over the photo's other faces, and a low similarity is taken as a warning only where the face is big and
sharp enough for its similarity to mean something.

The numbers below were measured with the bundled SFace on the real photos of tests/data and three more photos of
Obama: each photo of a person (8) degraded 8 ways per preset (ReF-LDM's moderate and severe, and small JPEG scans
with 8, 11, 16 and 22 px between the eyes) and compared with *another* photo of that person; for group photos it
stood beside two other people (Sunak, Biden, insightface's t1.jpg) and the three were degraded together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import RefFaceError
from ..images import check_photo, to_8bit
from .analysis import Face, FaceAnalysis
from .references import check_threshold, sharpness

SELECT_MODES = ("matching", "largest", "all")
# px between the eyes (Face.size). ReF-LDM's severe benchmark restores faces of a few pixels between the eyes. On
# the small scans with 8 px between the eyes, the faces measured 5.5-8.6 px (landmark noise): this floor keeps all.
MIN_FACE_SIZE = 5.0
# Among several faces, none reaching the threshold, the best one is the person when it beats the next by the margin
# and reaches the floor. In 768 degraded group photos this chose 69 rightly and 1 wrongly (a 0.15 margin: 95 and
# 2). Different people reached at most 0.311 there (1,320 faces), under the threshold.
CHOICE_MARGIN = 0.20
CHOICE_FLOOR = 0.20
# A face's similarity is trusted ("usable") from this size and sharpness (Laplacian variance of the recogniser's
# 112 px crop, low for blurred faces and for small ones, upscaled into it). Of 706 degraded same-person photos,
# 41% were usable and 2.8% (7% of the usable) warned wrongly; 41% of different-person pairs were warned of.
USABLE_SIZE = 12.0
USABLE_SHARPNESS = 15.0
UNSURE_DETECTION = 0.8  # YuNet scores real faces about 0.9-0.96, even small and degraded ones


@dataclass(frozen=True)
class Wording:
    """How a front end names the settings that fix a face-choice problem: the rule stays here, in one place."""

    choose_face: str  # restore one chosen face
    all_faces: str  # restore every face
    aligned: str  # the input is already an aligned face crop


CLI_WORDING = Wording("--face N, faces listed largest first", "--all-faces", "--aligned")


@dataclass
class PhotoFaces:
    """A photo's faces and how much each looks like the person."""

    faces: list[Face]  # largest first
    similarity: np.ndarray | None  # per face, to the person's mean identity (None: no person given)
    usable: np.ndarray  # per face: big and sharp enough for its similarity to be trusted


def face_similarity(embeddings: np.ndarray, identity: np.ndarray) -> np.ndarray:
    """Cosine similarity of each face embedding [F, dim] to a person's mean identity [N, dim] or [dim]."""
    mean = identity.reshape(-1, embeddings.shape[1]).mean(0)
    return embeddings @ (mean / np.linalg.norm(mean).clip(1e-12))


def find_faces(analysis: FaceAnalysis, photo: np.ndarray, identity: np.ndarray | None = None) -> PhotoFaces:
    """Detect the faces of ``photo`` and, given the person's identity embeddings, compare each with it."""
    photo = to_8bit(check_photo(photo))
    faces = analysis.detect(photo)
    crops = analysis.identity_crops(photo, faces)
    usable = [f.size >= USABLE_SIZE and sharpness(c) >= USABLE_SHARPNESS for f, c in zip(faces, crops, strict=True)]
    similarity = None if identity is None else face_similarity(analysis.embed_crops(crops), identity)
    return PhotoFaces(faces, similarity, np.array(usable, dtype=bool))


def choose_faces(
    found: PhotoFaces,
    select: str | int,
    threshold: float,
    log: Callable[[str], None] = print,
    wording: Wording = CLI_WORDING,
) -> list[int]:
    """Which faces (largest first) to restore: "matching" the person, "largest", "all", or one index. Every face
    gets a report line; faces too small to restore are left out, and a face chosen as the person that clearly looks
    like someone else gets a warning."""
    check_threshold(threshold)
    faces, similarity = found.faces, found.similarity
    if not faces:
        raise RefFaceError(f"no face found in the photo (for an aligned face crop: {wording.aligned})")
    if select == "matching" and similarity is None:
        raise RefFaceError("choosing the matching faces needs the person's identity")
    figures = _figures(found)
    for i, figure in enumerate(figures):
        log(f"face {i}: {figure}")
    if isinstance(select, int):
        if not 0 <= select < len(faces):
            raise RefFaceError(f"face {select} does not exist: the photo has {len(faces)} (0..{len(faces) - 1})")
        targets = [select]
    elif select == "all":
        targets = list(range(len(faces)))
    elif select == "largest":
        targets = [0]
    elif select == "matching":
        targets = _matching(similarity, threshold, wording)
    else:
        raise RefFaceError(f"select must be one of {SELECT_MODES} or a face index, got {select!r}")
    for i in targets if select != "all" else []:
        if similarity is not None and found.usable[i] and similarity[i] < threshold:
            log(
                f"warning: face {i} may not be the person in the references (similarity {similarity[i]:.3f}, same "
                f"person above {threshold:.3f}, and the face is clear enough to judge); check the references"
            )
    small = [i for i in targets if faces[i].size < MIN_FACE_SIZE]
    for i in small:
        log(f"face {i}: skipped, too small to restore (under {MIN_FACE_SIZE:.0f} px between the eyes)")
    targets = [i for i in targets if i not in small]
    if not targets:
        raise RefFaceError(f"no face restored: every chosen face is under {MIN_FACE_SIZE:.0f} px between the eyes")
    return targets


def _matching(similarity: np.ndarray, threshold: float, wording: Wording) -> list[int]:
    """The faces above the threshold; else the best by a clear margin; else a refusal naming the choice to make."""
    if len(similarity) == 1:
        return [0]
    clear = [i for i, s in enumerate(similarity) if s >= threshold]
    if clear:
        return clear
    best, second = np.argsort(-similarity)[:2]
    if similarity[best] >= CHOICE_FLOOR and similarity[best] - similarity[second] >= CHOICE_MARGIN:
        return [int(best)]
    raise RefFaceError(
        f"no face clearly matches the references (best similarity {similarity[best]:.3f}, next "
        f"{similarity[second]:.3f}; same person above {threshold:.3f}, or best by {CHOICE_MARGIN:.2f}): choose the "
        f"face ({wording.choose_face}) or restore all ({wording.all_faces})"
    )


def _figures(found: PhotoFaces) -> list[str]:
    """Each face's size and, with a person, its similarity (flagged where the face is too degraded to judge)."""
    figures = []
    for i, face in enumerate(found.faces):
        figure = f"{face.size:.0f} px between the eyes"
        if face.score < UNSURE_DETECTION:
            figure += f" (the detector is unsure, score {face.score:.2f}: its alignment may be off)"
        if found.similarity is not None:
            figure += f", similarity {found.similarity[i]:.3f}"
            if not found.usable[i]:
                figure += " (too small or blurred to judge)"
        figures.append(figure)
    return figures
