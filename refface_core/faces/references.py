"""Reference checks: which references show the person, and which are best.

The person is the largest group of references connected by matches (cosine ≥ threshold); a reference outside that
group is flagged as probably someone else. The photo being restored takes no part: its faces are often too degraded
for their identity to be trusted (see ``faces.matching``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import RefFaceError, check_number
from ..images import check_photo, load_image, to_8bit
from .align import align_face
from .analysis import FaceAnalysis

MIN_REFERENCE_SIZE = 8.0  # px between the eyes (Face.size): smaller faces are no reference for a 512 px restore


@dataclass
class ReferenceReport:
    index: int  # position among the usable references
    score: float  # higher is better: identity agreement, plus a little for size and sharpness
    agreement: float | None  # mean similarity to the rest of the identity group (None: nothing to compare)
    size: float  # Face.size, px between the eyes
    sharpness: float
    flagged: bool  # probably another person

    def describe(self) -> str:
        parts = [f"{self.size:.0f} px between the eyes, sharpness {self.sharpness:.0f}"]
        if self.agreement is not None:
            parts.append(f"agreement with the others {self.agreement:.3f}")
        if self.flagged:
            parts.append("FLAGGED: probably another person")
        return ", ".join(parts)


@dataclass
class References:
    """One person's references, prepared once for any number of photos."""

    crops: list[np.ndarray]  # aligned, best first; flagged and skipped ones left out
    embeddings: np.ndarray  # identity of ``crops`` [len(crops), dim]
    names: list[str]  # of ``crops``
    lines: list[str]  # the report: a line per reference, best first, then skipped ones and warnings


def prepare_references(
    analysis: FaceAnalysis,
    sources: Sequence[np.ndarray | str | os.PathLike],
    size: int,
    names: Sequence[str] | None = None,
    keep: int | None = None,
    threshold: float | None = None,
) -> References:
    """Align the main (largest) face of each reference photo (an array, or a file read here), rank them, and drop
    likely other people. A reference that cannot be read or has no usable face is skipped with a report line, as
    long as one usable reference remains."""
    if not sources:
        raise RefFaceError("no reference photos given: at least one good photo of the person is needed")
    if keep is not None and keep < 1:
        raise RefFaceError(f"keeping {keep} references leaves none; keep at least 1")
    names = list(names or [f"reference {i}" for i in range(len(sources))])
    threshold = analysis.same_person_threshold if threshold is None else threshold
    check_threshold(threshold)
    usable, crops, embeddings, sizes, skipped = [], [], [], [], []
    for source, name in zip(sources, names, strict=True):
        try:
            photo = to_8bit(check_photo(source if isinstance(source, np.ndarray) else np.asarray(load_image(source))))
            faces = analysis.detect(photo)
        except RefFaceError as e:
            skipped.append(f"{name}: skipped: {e}")
            continue
        if not faces or faces[0].size < MIN_REFERENCE_SIZE:
            why = "no face found" if not faces else f"its face is too small ({faces[0].size:.0f} px between the eyes)"
            skipped.append(f"{name}: skipped: {why}")
            continue
        usable.append(name)
        crops.append(align_face(photo, faces[0].landmarks, size)[0])
        embeddings.append(analysis.embed(photo, faces[:1])[0])
        sizes.append(faces[0].size)
    if not crops:
        raise RefFaceError("no usable reference: " + "; ".join(line.replace(": skipped:", ":") for line in skipped))
    embeddings = np.stack(embeddings)
    reports = rank_references(embeddings, sizes, [sharpness(c) for c in crops], threshold)
    used = [r.index for r in reports if not r.flagged][:keep]
    lines = [f"{usable[r.index]}: {r.describe()}" for r in reports] + skipped
    pairs = embeddings[used] @ embeddings[used].T
    best_pair = float(pairs[~np.eye(len(used), dtype=bool)].max()) if len(used) > 1 else 1.0
    if best_pair < threshold:  # with two references, or more that all disagree, no majority says who is the person
        lines.append(
            f"warning: the references may show different people: no two of them match (best similarity "
            f"{best_pair:.3f}, same person above {threshold:.3f}); check them, or add another photo of the person"
        )
    return References([crops[i] for i in used], embeddings[used], [usable[i] for i in used], lines)


def is_warning(line: str) -> bool:
    """A report line the user must see: a warning, a reference flagged as another person, one skipped, or a photo
    where no face was found or none matches."""
    return any(mark in line for mark in ("warning:", "FLAGGED", ": skipped", "no face"))


def check_threshold(threshold: float) -> None:
    check_number("the same-person threshold", threshold, -1, 1)  # a cosine similarity


def sharpness(face_crop: np.ndarray) -> float:
    """Variance of the Laplacian of an aligned crop: low for blurry (or upscaled small) faces."""
    return float(cv2.Laplacian(cv2.cvtColor(face_crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def rank_references(
    embeddings: np.ndarray, sizes: list[float], sharpnesses: list[float], threshold: float
) -> list[ReferenceReport]:
    """Reports for every reference, best first, flagged ones last."""
    n = len(embeddings)
    similarity = embeddings @ embeddings.T
    group = _largest_match_group(similarity >= threshold)
    reports = []
    for i in range(n):
        others = [j for j in group if j != i] if i in group else []
        agreement = float(similarity[i, others].mean()) if others else None
        other_refs = [j for j in range(n) if j != i]
        identity = agreement if agreement is not None else float(similarity[i, other_refs].mean() if other_refs else 0)
        size_bonus = 0.05 * min(sizes[i] / 64.0, 1.0)  # 64 px between the eyes: full detail at 512
        sharp_bonus = 0.05 * min(sharpnesses[i] / 500.0, 1.0)
        reports.append(
            ReferenceReport(
                index=i,
                score=identity + size_bonus + sharp_bonus,
                agreement=agreement,
                size=sizes[i],
                sharpness=sharpnesses[i],
                flagged=len(group) > 1 and i not in group,
            )
        )
    return sorted(reports, key=lambda r: (r.flagged, -r.score))


def _largest_match_group(matches: np.ndarray) -> set[int]:
    """Connected components of the match graph; the largest (ties: lowest index) wins."""
    n = len(matches)
    unseen, best = set(range(n)), set()
    while unseen:
        stack, component = [unseen.pop()], set()
        while stack:
            i = stack.pop()
            component.add(i)
            for j in np.flatnonzero(matches[i]):
                if j in unseen:
                    unseen.remove(j)
                    stack.append(int(j))
        if len(component) > len(best) or (len(component) == len(best) and min(component) < min(best)):
            best = component
    return best
