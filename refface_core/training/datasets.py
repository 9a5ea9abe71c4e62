"""Training data: (HQ target, LQ input, references) samples from FFHQ-Ref or from one folder of photos per person.

Both datasets give the same sample, a dict of float32 tensors in [-1, 1]:

- ``hq`` [3, S, S]: the target, an FFHQ-aligned face crop;
- ``lq`` [3, S, S]: the target degraded online (or the CSV's given LQ image, when asked for);
- ``refs`` [N, 3, S, S]: other photos of the same person, shuffled and repeated to fill N slots as ReF-LDM did.

All randomness comes from a generator seeded with (seed, epoch, index), so a sample can be reproduced exactly
and each epoch (``set_epoch``) sees fresh degradations, reference picks and augmentations, in any worker.
Bad input (a missing file, a reference that does not exist, no face found) is found while the dataset is built:
``on_bad="skip"`` drops it and records a message naming the file in ``problems``; ``"abort"`` raises at once.
"""

from __future__ import annotations

import ast
import csv as csv_module
import hashlib
import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import RefFaceError, listing
from ..faces import FaceAnalysis, align_face
from ..files import write_atomic
from ..images import IMAGE_SUFFIXES, load_image
from .degradations import PRESETS, Degradation, degrade

ON_BAD = ("skip", "abort")

# ReF-LDM's reference augmentation (torchvision in its code; the same ranges here, in numpy/OpenCV).
JITTER = 0.2  # brightness, contrast and saturation factors in [1 - 0.2, 1 + 0.2]
HUE = 0.02  # hue shift, as a fraction of the colour circle
DEGREES = 2.0  # rotation in [-2, 2] degrees
TRANSLATE = 0.05  # shift up to 5 % of the width / height
SCALE = (0.95, 1.05)
DISTORTION = 0.2  # perspective: each corner moves inwards by up to 20 % of the half-width / half-height


@dataclass(frozen=True)
class Entry:
    """One training target: its image, the images its references are drawn from, and a given LQ image if any."""

    name: str  # what to call it in messages: the CSV's gt_image, or the source photo
    target: Path
    references: tuple[Path, ...]
    lq: Path | None = None


def augment_reference(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ReF-LDM's reference augmentation, so the model learns to use a reference that is not pixel-aligned with the
    target: colour jitter, a small affine, a perspective warp (both in one resampling) and a horizontal flip.

    ``image`` is H×W×3 uint8 RGB; the result has the same shape and dtype, and depends only on ``rng``'s state.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise RefFaceError(f"augment_reference expects an H×W×3 uint8 RGB image, got {image.dtype} {image.shape}")
    x = image.astype(np.float32) / 255.0
    for op in rng.permutation(4):  # torchvision's ColorJitter applies its four changes in a random order
        if op == 0:
            x = x * rng.uniform(1 - JITTER, 1 + JITTER)
        elif op == 1:
            grey = float(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean())
            x = (x - grey) * rng.uniform(1 - JITTER, 1 + JITTER) + grey
        elif op == 2:
            grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
            x = (x - grey) * rng.uniform(1 - JITTER, 1 + JITTER) + grey
        else:
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float input: hue in degrees [0, 360)
            hsv[..., 0] = (hsv[..., 0] + 360.0 * rng.uniform(-HUE, HUE)) % 360.0
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        x = np.clip(x, 0.0, 1.0)

    h, w = image.shape[:2]
    angle = rng.uniform(-DEGREES, DEGREES)
    scale = rng.uniform(*SCALE)
    shift = rng.uniform(-TRANSLATE, TRANSLATE, 2) * (w, h)
    affine = np.vstack([cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, scale), [0, 0, 1]])
    affine[:2, 2] += shift
    corners = np.float32([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])
    inward = np.float32([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    reach = np.float32([DISTORTION * w / 2, DISTORTION * h / 2])
    moved = corners + inward * reach * rng.uniform(0, 1, (4, 2)).astype(np.float32)
    warp = cv2.getPerspectiveTransform(corners, moved) @ affine
    x = cv2.warpPerspective(x, warp, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    if rng.random() < 0.5:
        x = x[:, ::-1]
    return np.ascontiguousarray(np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8))


class _ReferenceDataset(Dataset):
    """What both layouts share: entries, seeded sampling, reading and resizing, and the skip/abort policy."""

    def __init__(
        self,
        size: int,
        num_refs: int,
        degradation: Degradation | None,
        augment: bool,
        seed: int,
        on_bad: str,
    ) -> None:
        if on_bad not in ON_BAD:
            raise RefFaceError(f"on_bad must be one of {', '.join(ON_BAD)}, got {on_bad!r}")
        if size < 8:
            raise RefFaceError(f"the training image size must be at least 8 pixels, got {size}")
        if num_refs < 1:
            raise RefFaceError(f"each sample needs at least 1 reference, got num_refs={num_refs}")
        self.size, self.num_refs, self.augment, self.seed, self.on_bad = size, num_refs, augment, seed, on_bad
        self.degradation = PRESETS["train"] if degradation is None else degradation
        self.epoch = 0
        self.entries: list[Entry] = []
        self.problems: list[str] = []

    def _bad(self, message: str) -> None:
        """Abort: raise now. Skip: remember the message, so the trainer can report what was left out."""
        if self.on_bad == "abort":
            raise RefFaceError(message)
        self.problems.append(message)

    def _check_not_empty(self, where: str) -> None:
        if not self.entries:
            detail = listing("\nproblems", self.problems) if self.problems else ""
            raise RefFaceError(f"no usable training samples in {where}{detail}")

    def set_epoch(self, epoch: int) -> None:
        """Fresh but reproducible randomness per epoch; call before each epoch's DataLoader pass."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def _generators(self, index: int) -> list[np.random.Generator]:
        """Independent streams for (references, augmentation, degradation), so changing one leaves the others."""
        sequence = np.random.SeedSequence([self.seed, self.epoch, index])
        return [np.random.default_rng(s) for s in sequence.spawn(3)]

    def references_for(self, index: int) -> list[Path]:
        """The ``num_refs`` references sample ``index`` uses this epoch: shuffled, then repeated to fill the slots
        (ReF-LDM trained with its references shuffled and repeated up to 5)."""
        pool = self.entries[index].references
        order = [pool[i] for i in self._generators(index)[0].permutation(len(pool))]
        return (order * math.ceil(self.num_refs / len(order)))[: self.num_refs]

    def read(self, path: Path) -> np.ndarray:
        """An aligned square crop, resized to ``size``; anything else is an error naming the file."""
        image = np.asarray(load_image(path))
        h, w = image.shape[:2]
        if h != w:
            raise RefFaceError(f"{path} is {w}×{h}: training images must be square, aligned face crops")
        if h != self.size:
            image = cv2.resize(
                image, (self.size, self.size), interpolation=cv2.INTER_AREA if h > self.size else cv2.INTER_CUBIC
            )
        return image

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index``; with on_bad="skip", a file found unreadable only now gives way to the next sample."""
        for offset in range(len(self)):
            try:
                return self._sample((index + offset) % len(self))
            except RefFaceError as e:
                if self.on_bad == "abort":
                    raise
                print(f"refface: skipped a sample: {e}", file=sys.stderr)  # in a DataLoader worker: no shared list
        raise RefFaceError("no training sample can be read")

    def _sample(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.entries[index]
        augment_rng, degrade_rng = self._generators(index)[1:]
        hq = self.read(entry.target)
        lq = self.read(entry.lq) if entry.lq is not None else None
        refs = [self.read(path) for path in self.references_for(index)]
        if self.augment:
            refs = [augment_reference(ref, augment_rng) for ref in refs]
            if augment_rng.random() < 0.5:  # ReF-LDM also flipped target, LQ and references together
                hq, refs = hq[:, ::-1], [ref[:, ::-1] for ref in refs]
                lq = None if lq is None else lq[:, ::-1]
        if lq is None:
            lq = degrade(np.ascontiguousarray(hq), self.degradation, degrade_rng)
        return {"hq": _to_tensor(hq), "lq": _to_tensor(lq), "refs": torch.stack([_to_tensor(r) for r in refs])}


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1] (a copy: arrays from PIL are read-only)."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def _find(root: Path, name: str) -> Path:
    """``root/name``, or FFHQ's own sub-folder layout (``images1024x1024/12000/12345.png``) when that is where it is."""
    path = root / name
    if not path.is_file():
        nested = root / f"{Path(name).stem[:2]}000" / name
        if nested.is_file():
            return nested
    return path


class FFHQRefDataset(_ReferenceDataset):
    """FFHQ-Ref (ReF-LDM's data set): a CSV with ``gt_image``, ``lq_image`` and ``ref_image`` columns, where
    ``ref_image`` is a Python list literal of file names; the names are relative to ``root`` (FFHQ's images).

    ``split`` is one of FFHQ-Ref's identity-based split files (one image name a line); only rows whose target it
    lists are kept. ReF-LDM trained on online degradations; ``use_lq_images`` takes the CSV's ``lq_image`` instead
    (its val/test CSVs name the LQ test images, found under ``lq_root``, by default ``root``).
    """

    def __init__(
        self,
        csv: Path,
        root: Path,
        size: int = 512,
        num_refs: int = 1,
        degradation: Degradation | None = None,
        use_lq_images: bool = False,
        augment: bool = True,
        split: Path | None = None,
        seed: int = 0,
        on_bad: str = "skip",
        lq_root: Path | None = None,
    ) -> None:
        super().__init__(size, num_refs, degradation, augment, seed, on_bad)
        csv, root = Path(csv), Path(root)
        lq_root = root if lq_root is None else Path(lq_root)
        if not csv.is_file():
            raise RefFaceError(f"FFHQ-Ref CSV not found: {csv}")
        if not root.is_dir():
            raise RefFaceError(f"image folder not found: {root}")
        keep = _read_split(Path(split)) if split is not None else None
        columns, rows = _read_csv(csv)
        needed = ["gt_image", "ref_image"] + (["lq_image"] if use_lq_images else [])
        missing = [c for c in needed if c not in columns]
        if missing:
            raise RefFaceError(f"{csv} lacks the column(s) {', '.join(missing)}; it has {columns}")
        for line, row in rows:
            where = f"{csv.name} line {line}"
            gt = (row["gt_image"] or "").strip()
            if keep is not None and gt not in keep and Path(gt).name not in keep:
                continue
            entry = self._entry(row, where, root, lq_root if use_lq_images else None)
            if entry is not None:
                self.entries.append(entry)
        if keep is not None and not self.entries and not self.problems:
            raise RefFaceError(f"no target image of {csv} is listed in the split file {split}")
        self._check_not_empty(str(csv))

    def _entry(self, row: dict[str, str], where: str, root: Path, lq_root: Path | None) -> Entry | None:
        """The row as an Entry, or None (after ``_bad``) when a file is missing, outside its folder, or the reference
        list is malformed."""
        gt = (row["gt_image"] or "").strip()
        if not gt:
            self._bad(f"{where}: empty gt_image")
            return None
        try:
            names = ast.literal_eval((row["ref_image"] or "").strip())  # a list literal: data, never code
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            names = None
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
            self._bad(f"{where} ({gt}): ref_image is not a non-empty list of file names: {row['ref_image']!r}")
            return None
        lq_name = (row.get("lq_image") or "").strip()
        named = [("gt_image", gt, root), *(("ref_image", n, root) for n in names)]
        if lq_root is not None and lq_name:
            named.append(("lq_image", lq_name, lq_root))
        for column, name, folder in named:
            if not _within(name):
                self._bad(
                    f"{where} ({gt}): {column} {name!r} is not inside {folder}; the CSV names files relative to "
                    "data.root (lq_image: data.lq_root), so put the images there and name them relative to it"
                )
                return None
        target = _find(root, gt)
        if not target.is_file():
            self._bad(f"{where}: target image not found: {target}")
            return None
        refs = [_find(root, n) for n in names]
        absent = [str(p) for p in refs if not p.is_file()]
        if absent:
            self._bad(f"{where} ({gt}): reference not found: {', '.join(absent)}")
            return None
        lq = None
        if lq_root is not None:
            lq = lq_root / lq_name
            if not lq_name or not lq.is_file():
                self._bad(f"{where} ({gt}): LQ image not found: {lq}")
                return None
        return Entry(gt, target, tuple(refs), lq)


def _within(name: str) -> bool:
    """Whether a file name from the CSV stays inside the folder it is relative to: neither absolute nor climbing out
    with ``..``. Symbolic links inside the folder are the user's own and are followed."""
    normal = os.path.normpath(name)
    return not os.path.isabs(normal) and normal != os.pardir and not normal.startswith(os.pardir + os.sep)


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The CSV's columns and its rows with their line numbers; a file that is not UTF-8 text, or that the csv module
    cannot parse, is an error naming the line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RefFaceError(f"cannot read the FFHQ-Ref CSV {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RefFaceError(f"{path} line {line} is not UTF-8 text ({e.reason}); save the CSV as UTF-8") from None
    reader = csv_module.DictReader(io.StringIO(text, newline=""))
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv_module.Error as e:  # e.g. a field past the size limit, most often from a quote left open
        line = reader.line_num + 1  # DictReader's is the last line of the last row it read: the bad row starts next
        raise RefFaceError(f"{path} line {line} is not readable CSV ({e}); check that its quotes are closed") from None
    return list(reader.fieldnames or []), rows


def _read_split(path: Path) -> set[str]:
    """The image names of an identity-based split file: one name a line."""
    if not path.is_file():
        raise RefFaceError(f"split file not found: {path}")
    try:
        names = {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    except UnicodeDecodeError as e:
        raise RefFaceError(f"split file {path} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    if not names:
        raise RefFaceError(f"split file lists no images: {path}")
    return names


class PersonFolderDataset(_ReferenceDataset):
    """The user's own photos, one folder per person (``root/<person>/<photos>``): each photo is a target whose
    references are that person's other photos, so a person needs at least 2 usable photos.

    Each photo's main (largest) face is aligned to the FFHQ template at ``size`` once and cached in ``cache`` as a
    PNG keyed by the photo's path, modification time and size (photos with no face are remembered too), so later
    runs detect nothing. ``analysis`` is only used here, never stored: the dataset stays picklable for workers.
    """

    def __init__(
        self,
        root: Path,
        analysis: FaceAnalysis,
        cache: Path,
        size: int = 512,
        num_refs: int = 1,
        degradation: Degradation | None = None,
        augment: bool = True,
        seed: int = 0,
        on_bad: str = "skip",
    ) -> None:
        super().__init__(size, num_refs, degradation, augment, seed, on_bad)
        root, cache = Path(root), Path(cache)
        if not root.is_dir():
            raise RefFaceError(f"photo folder not found: {root}")
        cache.mkdir(parents=True, exist_ok=True)
        self.source_of: dict[Path, Path] = {}  # aligned crop -> the photo it was made from
        loose = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if loose:
            self._bad(f"{root} has photos outside any person folder, not used: {', '.join(loose)}")
        people = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for person in people:
            photos = sorted(p for p in person.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            crops = [crop for photo in photos if (crop := self._aligned(photo, analysis, cache)) is not None]
            if len(crops) < 2:
                self._bad(
                    f"{person}: {len(crops)} usable photo(s); a person needs at least 2 (a target and a reference)"
                )
                continue
            for crop in crops:
                name = str(self.source_of[crop])
                self.entries.append(Entry(name, crop, tuple(c for c in crops if c != crop)))
        self._check_not_empty(str(root))

    def _aligned(self, photo: Path, analysis: FaceAnalysis, cache: Path) -> Path | None:
        """The cached aligned crop of ``photo``'s main face, made if needed; None (after ``_bad``) when it has none."""
        stat = photo.stat()
        key = hashlib.sha256(f"{photo.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{self.size}".encode()).hexdigest()
        crop = cache / f"{photo.stem[:40]}-{key[:20]}.png"
        failed = crop.with_suffix(".noface")
        if not crop.is_file() and not failed.is_file():
            try:
                image = np.asarray(load_image(photo))
                face = analysis.main_face(image, str(photo))
                aligned = align_face(image, face.landmarks, self.size)[0]
            except RefFaceError as e:
                message = str(e)
                if "no face found" in message:  # remembered, so the next run does not detect it again
                    write_atomic(failed, lambda tmp: Path(tmp).write_text(message, encoding="utf-8"))
                self._bad(message)
                return None
            write_atomic(crop, lambda tmp: Image.fromarray(aligned).save(tmp, format="PNG"))
        elif failed.is_file():
            self._bad(failed.read_text(encoding="utf-8"))
            return None
        self.source_of[crop] = photo
        return crop
