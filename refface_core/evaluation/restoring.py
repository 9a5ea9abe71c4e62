"""Restoring a benchmark set over a grid of settings (a sweep), batched, resumable and split across processes.

Each face's seed comes from (seed, face id) alone, and ``restore_batch`` makes a face's result independent of what it
is batched with, so neither the batch size, a resume, nor the number of processes changes any image.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..choices import GUIDANCES, SOLVERS, SPACINGS, SWEEPABLE
from ..errors import RefFaceError
from ..files import write_atomic
from ..model.restorer import CompositeContext, RefFaceRestorer
from .sets import EvalFace, EvalSet

NAMED = {"guidance": GUIDANCES, "solver": SOLVERS, "spacing": SPACINGS}

Cell = dict[str, Any]  # one grid point: the settings it overrides
ContextOf = Callable[[list[np.ndarray], list[str]], CompositeContext]  # reference crops (and names) -> context


def parse_sweep(items: Sequence[str]) -> list[Cell]:
    """``KEY=V1,V2,...`` items -> every combination (one empty cell when there is no sweep)."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SWEEPABLE:
            raise RefFaceError(f"--sweep {item!r}: write KEY=V1,V2,... with KEY one of {', '.join(SWEEPABLE)}")
        if key in axes:
            raise RefFaceError(f"--sweep names {key} twice; give all its values in one: {key}=V1,V2,...")
        parsed = []
        for value in values.split(","):
            try:
                parsed.append(SWEEPABLE[key](value.strip()))
            except ValueError:
                kind = "whole number" if SWEEPABLE[key] is int else "number"
                raise RefFaceError(f"--sweep {key}: {value.strip()!r} is not a {kind}") from None
            if key in NAMED and parsed[-1] not in NAMED[key]:
                raise RefFaceError(f"--sweep {key}: {parsed[-1]!r} is not one of {', '.join(NAMED[key])}")
        if len(set(parsed)) != len(parsed):
            raise RefFaceError(f"--sweep {key} lists a value twice: {values}")
        axes[key] = parsed
    return [dict(zip(axes, combination, strict=True)) for combination in itertools.product(*axes.values())]


def cell_name(cell: Cell) -> str:
    """The cell's folder under images/ and its label in the report."""
    return ",".join(f"{key}={value}" for key, value in cell.items()) or "default"


def face_seed(seed: int, face_id: str) -> int:
    """The face's noise seed, from (seed, face id) alone."""
    return int.from_bytes(hashlib.sha256(f"noise/{seed}/{face_id}".encode()).digest()[:8], "little") >> 1


def restored_path(run_dir: Path, cell: Cell, face: EvalFace) -> Path:
    return run_dir / "images" / cell_name(cell) / f"{face.id}.png"


@dataclass
class Restored:
    images: int = 0  # written by this process now
    seconds: float = 0.0  # spent on them, reading and writing included


def restore_set(
    model: RefFaceRestorer,
    eval_set: EvalSet,
    run_dir: Path,
    cells: list[Cell],
    options: dict[str, Any],
    context_of: ContextOf,
    seed: int,
    batch_size: int,
    shard: tuple[int, int] = (0, 1),
    progress: Callable[[int, int], None] | None = None,
) -> Restored:
    """Restore this process's share of the set in every cell, skipping what is written; ``progress(done, total)``
    counts images. The set is cut into batches in its own order and the processes take every ``shard[1]``-th batch
    from ``shard[0]``; a batch with any image missing is sampled whole. So each face is always sampled with the same
    companions, and neither a resume nor the number of processes changes a bit of any image (the batch size does,
    by float rounding, which is why a run records it)."""
    index, count = shard
    batches = [eval_set.faces[start : start + batch_size] for start in range(0, len(eval_set.faces), batch_size)]
    todo = [
        (faces, cell)
        for faces in batches[index::count]
        for cell in cells
        if not all(restored_path(run_dir, cell, face).is_file() for face in faces)
    ]
    total, done = sum(len(faces) for faces, _ in todo), 0
    result = Restored()
    if progress is not None:
        progress(0, total)
    contexts: dict[tuple[str, int], CompositeContext] = {}  # the batch's, by (face, number of references)
    for k, (faces, cell) in enumerate(todo):
        began = time.perf_counter()
        if k and faces is not todo[k - 1][0]:
            contexts = {}
        for face in faces:
            references = eval_set.references(face, cell.get("refs"))
            if (face.id, len(references)) not in contexts:
                crops = [eval_set.read(path) for path in references]
                contexts[face.id, len(references)] = context_of(crops, [str(path) for path in references])
        images = model.restore_batch(
            [eval_set.lq(face) for face in faces],
            [contexts[face.id, len(eval_set.references(face, cell.get("refs")))] for face in faces],
            [face_seed(seed, face.id) for face in faces],
            batch_size=batch_size,
            **{**options, **{k: v for k, v in cell.items() if k != "refs"}},
        )
        for face, image in zip(faces, images, strict=True):
            path = restored_path(run_dir, cell, face)
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, lambda tmp, image=image: Image.fromarray(image).save(tmp, format="PNG"))
        done += len(faces)
        result.images += len(faces)
        result.seconds += time.perf_counter() - began
        if progress is not None:
            progress(done, total)
    return result
