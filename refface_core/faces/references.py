"""Reference checks: which references show the person, and which are best.

The person is the largest group of faces connected by matches (cosine ≥ threshold), the LQ face included
when it is usable. A reference outside that group is flagged as probably someone else.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class ReferenceReport:
    index: int  # position in the caller's list
    score: float  # higher is better: identity agreement, plus a little for size and sharpness
    agreement: float | None  # mean similarity to the rest of the identity group (None: nothing to compare)
    similarity_to_lq: float | None
    eye_distance: float
    sharpness: float
    flagged: bool  # probably another person

    def describe(self) -> str:
        parts = [f"score {self.score:.3f}"]
        if self.agreement is not None:
            parts.append(f"agreement {self.agreement:.3f}")
        if self.similarity_to_lq is not None:
            parts.append(f"similarity to the input {self.similarity_to_lq:.3f}")
        parts.append(f"eye distance {self.eye_distance:.0f}px, sharpness {self.sharpness:.0f}")
        if self.flagged:
            parts.append("FLAGGED: probably another person")
        return ", ".join(parts)


def sharpness(face_crop: np.ndarray) -> float:
    """Variance of the Laplacian of an aligned crop: low for blurry faces."""
    return float(cv2.Laplacian(cv2.cvtColor(face_crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def rank_references(
    embeddings: np.ndarray,
    eye_distances: list[float],
    sharpnesses: list[float],
    threshold: float,
    lq_embedding: np.ndarray | None = None,
) -> list[ReferenceReport]:
    """Reports for every reference, best first, flagged ones last."""
    n = len(embeddings)
    nodes = embeddings if lq_embedding is None else np.vstack([embeddings, lq_embedding[None]])
    similarity = nodes @ nodes.T
    group = _largest_match_group(similarity >= threshold)
    reports = []
    for i in range(n):
        others = [j for j in group if j != i] if i in group else []
        agreement = float(similarity[i, others].mean()) if others else None
        other_refs = [j for j in range(n) if j != i]
        identity = agreement if agreement is not None else float(similarity[i, other_refs].mean() if other_refs else 0)
        size_bonus = 0.05 * min(eye_distances[i] / 64.0, 1.0)  # 64 px between the eyes: full detail at 512
        sharp_bonus = 0.05 * min(sharpnesses[i] / 500.0, 1.0)
        reports.append(
            ReferenceReport(
                index=i,
                score=identity + size_bonus + sharp_bonus,
                agreement=agreement,
                similarity_to_lq=None if lq_embedding is None else float(similarity[i, n]),
                eye_distance=eye_distances[i],
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
