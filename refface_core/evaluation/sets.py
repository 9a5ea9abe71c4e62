"""Benchmark sets: FFHQ-Ref test (severe, moderate), CelebA-Test-Ref, or a folder of people degraded on the fly.

Every set gives the same faces: an id, the ground truth, the references in the set's order (at most ``max_refs``,
never repeated, as ReF-LDM tested) and the LQ input, the set's own or the ground truth degraded with a fixed seed.
The files are checked as training checks them: what is missing is counted and reported, not fatal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..choices import EVAL_SETS
from ..errors import RefFaceError
from ..training.datasets import FFHQRefDataset, PersonFolderDataset, _ReferenceDataset
from ..training.degradations import PRESETS, degrade, file_rng

# Where each set's files are inside --data (the layouts of the FFHQ-Ref and CelebA-Test-Ref releases).
FFHQ_REF_CSV = "reference_mapping/test_references.csv"
FFHQ_REF_SPLIT = "id_based_ffhq_split/test_image.txt"
FFHQ_REF_LQ = "test_images/{level}_degrad"
CELEBA_CSV = "test_references.csv"
CELEBA_LQ = "celeba_test_images"


@dataclass(frozen=True)
class EvalFace:
    id: str  # unique in the set; the restored image is images/<cell>/<id>.png
    hq: Path
    references: tuple[Path, ...]
    lq: Path | None  # None: the ground truth degraded on the fly


@dataclass
class EvalSet:
    name: str
    faces: list[EvalFace]
    problems: list[str]  # files left out, one message each
    reader: _ReferenceDataset  # reads the crops and resizes them to its size
    preset: str | None  # the on-the-fly degradation
    seed: int
    max_refs: int  # the references a face gets unless a sweep says otherwise

    @property
    def size(self) -> int:
        return self.reader.size

    @size.setter
    def size(self, pixels: int) -> None:
        """The model's crop size, known once it is loaded (the set is checked before that, at 512)."""
        self.reader.size = pixels

    def lq(self, face: EvalFace) -> np.ndarray:
        """The LQ input, size×size uint8 RGB: the set's file, or the ground truth degraded with (seed, face id)."""
        if face.lq is not None:
            return self.reader.read(face.lq)
        return degrade(self.reader.read(face.hq), PRESETS[self.preset], file_rng(self.seed, face.id))

    def read(self, path: Path) -> np.ndarray:
        return self.reader.read(path)

    def references(self, face: EvalFace, refs: int | None = None) -> tuple[Path, ...]:
        """The face's first ``refs`` references (default ``max_refs``), never repeated: fewer where it has fewer."""
        return face.references[: refs or self.max_refs]


def open_set(
    name: str,
    data: Path,
    images: Path | None = None,
    lq_dir: Path | None = None,
    size: int = 512,
    max_refs: int = 5,
    preset: str = "moderate",
    seed: int = 0,
    face_models: Path | None = None,
    cache: Path | None = None,
    most_refs: int | None = None,
) -> EvalSet:
    """The set ``name`` (one of EVAL_SETS) under ``data``: faces with up to ``most_refs`` references (a sweep's
    largest count; default ``max_refs``). FFHQ-Ref and CelebA-Test-Ref name their ground truths and references
    relative to ``images`` (FFHQ's, CelebA-HQ's); a folder set aligns each photo's main face once into ``cache``."""
    data = Path(data)
    if name not in EVAL_SETS:
        raise RefFaceError(f"unknown set {name!r}; choose one of {', '.join(EVAL_SETS)}")
    if not data.is_dir():
        raise RefFaceError(f"--data {data}: no such folder")
    if max_refs < 1:
        raise RefFaceError(f"--max-refs must be at least 1, got {max_refs}")
    keep = max(max_refs, most_refs or 0)
    if name == "folder":
        if preset not in PRESETS:
            raise RefFaceError(f"unknown degradation preset {preset!r}; choose one of {', '.join(PRESETS)}")
        if cache is None:
            raise RefFaceError("a folder set needs a cache folder for its aligned faces")
        from ..faces import load_face_analysis

        reader = PersonFolderDataset(data, load_face_analysis(face_models), cache, size, augment=False, seed=seed)
        faces = [
            EvalFace(_folder_id(reader.source_of[e.target], data), e.target, e.references[:keep], None)
            for e in reader.entries
        ]
        eval_set = EvalSet(
            f"{data.name} ({preset}, seed {seed})", faces, reader.problems, reader, preset, seed, max_refs
        )
    else:
        if images is None:
            raise RefFaceError(f"--set {name} needs --images: the folder of the HQ images its CSV names")
        if name == "celeba-test-ref":
            csv, split, lq_root = data / CELEBA_CSV, None, lq_dir or data / CELEBA_LQ
        else:
            csv, split = data / FFHQ_REF_CSV, data / FFHQ_REF_SPLIT
            lq_root = lq_dir or data / FFHQ_REF_LQ.format(level=name.removeprefix("ffhq-ref-"))
            split = split if split.is_file() else None  # the CSV is the test set already; the split only narrows it
        if not lq_root.is_dir():
            raise RefFaceError(f"the LQ test images are not in {lq_root}; give their folder with --lq-dir")
        reader = FFHQRefDataset(
            csv, images, size, use_lq_images=True, augment=False, split=split, seed=seed, lq_root=lq_root
        )
        faces = [EvalFace(Path(e.name).stem, e.target, e.references[:keep], e.lq) for e in reader.entries]
        eval_set = EvalSet(name, faces, reader.problems, reader, None, seed, max_refs)
    twice = sorted(i for i, n in Counter(face.id for face in faces).items() if n > 1)
    if twice:
        raise RefFaceError(f"{data}: several faces would be called {', '.join(twice[:5])}; each face needs its own "
                           "name (e.g. a.jpg and a.png in one folder): rename them")  # fmt: skip
    return eval_set


def _folder_id(photo: Path, root: Path) -> str:
    """person/photo, from the photo's path under the set's folder."""
    return photo.relative_to(root).with_suffix("").as_posix()
