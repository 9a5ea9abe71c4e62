"""Albums: every face of a photo collection grouped into people, and each person's degraded faces restored with
that person's own best photos as references.

Faces are grouped in two passes, because a recogniser is only reliable on clear faces (DESIGN §5b):

1. the *core*, faces large and sharp enough for their identity to be trusted, is clustered with scikit-learn's
   agglomerative clustering (average linkage on cosine distance); a cluster holding two faces of one photo keeps
   the one most like its faces from other photos, and the others are clustered again, so that a person has at
   most one core face per photo;
2. every other face joins the person whose core it is most like, only when that similarity reaches a low floor
   and beats the next person's by a margin, and only when that person has no face in its photo yet. Degraded
   same-person similarities of 0.1-0.4 are normal, so an absolute threshold alone would leave the faces that most
   need restoring in no person.

The thresholds were tuned with the bundled SFace on photos outside tests/data: insightface's t1.jpg (six people)
and face_recognition 1.3.0's obama.jpg, obama2.jpg, obama3.jpg and biden.jpg, each also degraded (ReF-LDM's
moderate and severe presets, and small JPEG scans with 24, 16 and 10 px between the eyes).

``OUT/people.json`` records every face, person, reference and decision. The user may edit which faces make each
person (merge, split, move a face) and exclude references; a rerun keeps those edits, and every restored face is
cached under a key of its inputs, so only what an edit changed is sampled again (and an interrupted run resumes).
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image

from .choices import ALBUM_KEEP_SHARP as KEEP_SHARP
from .choices import ALBUM_MAX_REFERENCES as MAX_REFERENCES
from .errors import RefFaceError, check_number, check_seeds
from .faces import Face, FaceAnalysis, align_face, paste_back, scale_affine
from .faces.matching import CHOICE_FLOOR as JOIN_FLOOR
from .faces.matching import CHOICE_MARGIN as JOIN_MARGIN
from .faces.matching import MIN_FACE_SIZE, UNSURE_DETECTION
from .faces.references import MIN_REFERENCE_SIZE, rank_references, sharpness
from .faces.tone import is_grayscale, match_tone
from .files import path_kind, write_atomic
from .images import IMAGE_SUFFIXES, Photo, load_photo, save_image, to_8bit

if TYPE_CHECKING:
    from accelerate import PartialState

    from .model import RefFaceRestorer

PEOPLE_JSON = "people.json"
CONTACT_SHEET = "album.html"
CACHE = ".refface-album"  # inside OUT: detections, restored faces and thumbnails, reused by reruns
FORMAT = 1  # of people.json: a newer one is refused, as its edits might mean something this version ignores
# Core faces: the detector is sure, the face has CORE_SIZE px between the eyes and its 112 px identity crop a
# Laplacian variance of CORE_SHARPNESS. Tuned: sharp faces measured 144-1900 and small scans with 24 px between the
# eyes 89-186 (their identity still held), blurred (severe) faces 2-21.
CORE_SIZE = 20.0
CORE_SHARPNESS = 80.0
# Core faces merge while their average cosine similarity reaches this (SFace: same person 0.62-0.84 on clear
# photos, different people at most 0.30 on the tuning photos).
CORE_SIMILARITY = 0.45
# A degraded face joins the best person when its similarity to that person's core reaches JOIN_FLOOR and beats the
# next person's by JOIN_MARGIN (with one person, beats 0 by it): faces.matching's CHOICE_FLOOR and CHOICE_MARGIN,
# measured on 768 degraded group photos. A looser 0.18 / 0.10 kept every degraded face of the tuning photos, but let
# a small scan of a person with no sharp photo (0.26 to a stranger, 0.10 ahead of the next) join that stranger.
# KEEP_SHARP and MAX_REFERENCES (the CLI's defaults too) live in choices.py, importable without cv2.
PHOTOS_IN_MEMORY = 8  # decoded photos kept while restoring and pasting: a scanned album may not fit in memory
CROPS_IN_MEMORY = 64  # aligned crops kept (see aligned_crops)
FRONTAL_WEIGHT = 0.05  # as much as size or sharpness weighs in rank_references
THUMB = 96


@dataclass
class AlbumFace:
    """One detected face and what decides its fate."""

    id: str  # "<photo file name>#<k>", k counting the photo's faces largest first: stable across reruns
    photo: str
    face: Face
    embedding: np.ndarray
    sharpness: float  # Laplacian variance of the 112 px identity crop: can its identity be trusted
    detail: float  # Laplacian variance of the 512 px aligned crop: does it need restoring

    @property
    def core(self) -> bool:
        return self.face.score >= UNSURE_DETECTION and self.face.size >= CORE_SIZE and self.sharpness >= CORE_SHARPNESS

    @property
    def frontal(self) -> float:
        """1 for a frontal face, towards 0 as the nose and mouth move off the line between the eyes' midpoint."""
        eyes = self.face.landmarks[1] - self.face.landmarks[0]
        middle = self.face.landmarks[:2].mean(0)
        lengthwise = [abs(float((p - middle) @ eyes)) / max(float(eyes @ eyes), 1e-6) for p in
                      (self.face.landmarks[2], self.face.landmarks[3:].mean(0))]  # fmt: skip
        return max(0.0, 1.0 - sum(lengthwise))


@dataclass
class Person:
    id: str
    faces: list[str]  # face ids
    exclude: list[str] = field(default_factory=list)  # face ids the user took out of the references
    references: list[str] = field(default_factory=list)


@dataclass
class AlbumSettings:
    max_refs: int = MAX_REFERENCES
    keep_sharp: float = KEEP_SHARP
    seed: int = 2024
    upscale: float | None = 1.0  # None: restore's automatic factor per photo
    tone: bool = True
    batch_size: int = 8
    sample_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if isinstance(self.max_refs, bool) or not isinstance(self.max_refs, int) or self.max_refs < 1:
            raise RefFaceError(f"--max-refs must be a whole number of at least 1, got {self.max_refs!r}")
        check_number("--keep-sharp", self.keep_sharp, 0)
        check_seeds([self.seed])


@dataclass
class Grouping:
    """An album's faces grouped into people, with each person's references and each face's fate."""

    faces: dict[str, AlbumFace]
    people: list[Person]
    decisions: dict[str, str]  # face id -> restored | kept sharp | reference | unmatched | too small | no reference

    def to_restore(self) -> list[tuple[str, Person]]:
        return [(face_id, p) for p in self.people for face_id in p.faces if self.decisions[face_id] == "restored"]


@dataclass
class Album(Grouping):
    outputs: dict[str, dict[str, str]]  # photo -> {"output": file name in OUT, "key": what it was made from}
    sampled: int  # faces sampled in this run (the rest came from the cache)


def photo_files(folder: Path) -> list[Path]:
    """The album's photos: image files directly in ``folder``, sorted."""
    if path_kind(folder) != "folder":
        raise RefFaceError(f"photo folder not found: {folder}")
    photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise RefFaceError(f"no photos ({' '.join(IMAGE_SUFFIXES)}) in {folder}")
    return photos


def check_out(photos_dir: Path, out: Path) -> None:
    """``out`` must be a folder other than the photo folder (quick: the CLI checks it before the model loads)."""
    if out.resolve() == photos_dir.resolve():
        raise RefFaceError(f"--out {out} is the photo folder; give another folder (no photo there is overwritten)")
    if path_kind(out) not in ("folder", "missing"):
        raise RefFaceError(f"--out {out} is a file; give a folder")


def check_restorer(restorer: RefFaceRestorer) -> None:
    if restorer.context_encoder is not None:
        raise RefFaceError("this model has Composite Context: albums do not support it yet; use a ReF-LDM model")


def scan_photos(
    analysis: FaceAnalysis,
    photos: Sequence[Path],
    cache: Path,
    update: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, AlbumFace]:
    """Detect and embed every face of every photo. Each photo's result is cached by its bytes and the face models,
    so a rerun or a resumed run detects only new or changed photos."""
    cache.mkdir(parents=True, exist_ok=True)
    faces: dict[str, AlbumFace] = {}
    for done, path in enumerate(photos):
        stored = cache / f"{_digest(path.read_bytes(), analysis.name.encode())}.npz"
        if stored.is_file():
            data = dict(np.load(stored))
        else:
            data = _analyse(analysis, to_8bit(load_photo(path).pixels))
            write_atomic(stored, lambda tmp, data=data: _save_npz(tmp, data))
        faces |= _album_faces(path.name, data)
        update(done + 1, len(photos))
    return faces


def find_album_faces(
    analysis: FaceAnalysis, photos: dict[str, np.ndarray], update: Callable[[int, int], None] = lambda d, t: None
) -> dict[str, AlbumFace]:
    """``scan_photos`` for photos in memory (name -> RGB pixels), uncached: the ComfyUI nodes' album."""
    faces: dict[str, AlbumFace] = {}
    for done, (name, pixels) in enumerate(photos.items()):
        faces |= _album_faces(name, _analyse(analysis, to_8bit(pixels)))
        update(done + 1, len(photos))
    return faces


def _analyse(analysis: FaceAnalysis, pixels: np.ndarray) -> dict[str, np.ndarray]:
    found = analysis.detect(pixels)
    crops = analysis.identity_crops(pixels, found)
    return {
        "boxes": np.array([f.bbox for f in found]).reshape(-1, 4),
        "landmarks": np.array([f.landmarks for f in found]).reshape(-1, 5, 2),
        "scores": np.array([f.score for f in found]),
        "embeddings": analysis.embed_crops(crops),
        "sharpness": np.array([sharpness(c) for c in crops]),
        "detail": np.array([sharpness(align_face(pixels, f.landmarks, 512)[0]) for f in found]),
    }


def _album_faces(photo: str, data: dict[str, np.ndarray]) -> dict[str, AlbumFace]:
    faces = {}
    for k in range(len(data["scores"])):
        face = Face(data["boxes"][k], data["landmarks"][k], float(data["scores"][k]))
        faces[f"{photo}#{k}"] = AlbumFace(f"{photo}#{k}", photo, face, data["embeddings"][k],
                                          float(data["sharpness"][k]), float(data["detail"][k]))  # fmt: skip
    return faces


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file, as np.savez would add ".npz" to a name
        np.savez(f, **arrays)


def cluster_faces(faces: Sequence[AlbumFace]) -> tuple[list[list[int]], list[int]]:
    """People (lists of indices into ``faces``, largest first) and the faces in none: the core clustered (see
    ``cluster_core``), then every other face joined by ranking and margin (see ``join_faces``)."""
    core = [i for i, f in enumerate(faces) if f.core]
    people = sorted(cluster_core(faces, core), key=lambda g: (-len(g), g[0]))
    rest = [i for i in range(len(faces)) if i not in set(core)]
    joined = join_faces(faces, people, rest)
    for i, person in joined.items():
        people[person].append(i)
    return [sorted(p) for p in people], [i for i in rest if i not in joined]


def cluster_core(faces: Sequence[AlbumFace], core: Sequence[int]) -> list[list[int]]:
    """The core faces (indices into ``faces``) grouped into people with average linkage on cosine distance, merging
    while the average similarity reaches CORE_SIMILARITY. Two faces of one photo are never one person: their
    distance is set to the largest, and as average linkage can still merge them, a group holding two faces of one
    photo keeps the one most like the group's faces from other photos; the others are grouped again."""
    if len(core) < 2:
        return [list(core)] if core else []
    from sklearn.cluster import AgglomerativeClustering

    embeddings = np.stack([faces[i].embedding for i in core])
    similarity = embeddings @ embeddings.T
    photos = np.array([faces[i].photo for i in core])
    same_photo = photos[:, None] == photos[None, :]
    distance = np.clip(1 - similarity, 0, 2)
    distance[same_photo & ~np.eye(len(core), dtype=bool)] = 2
    labels = AgglomerativeClustering(
        n_clusters=None, metric="precomputed", linkage="average", distance_threshold=1 - CORE_SIMILARITY
    ).fit(distance).labels_  # fmt: skip
    groups: list[list[int]] = []
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        keep, spill = [], []
        for photo in dict.fromkeys(photos[members].tolist()):
            here = members[photos[members] == photo]
            others = members[photos[members] != photo]
            agreement = similarity[np.ix_(here, others)].mean(1) if len(others) else np.zeros(len(here))
            best = int(here[int(np.argmax(agreement))])  # ties: the first, the photo's largest face
            keep.append(best)
            spill += [int(m) for m in here if m != best]
        groups.append([core[m] for m in sorted(keep)])
        if spill:
            groups += cluster_core(faces, [core[m] for m in sorted(spill)])
    return groups


def join_faces(
    faces: Sequence[AlbumFace], people: Sequence[Sequence[int]], candidates: Sequence[int]
) -> dict[int, int]:
    """Which person each candidate face joins (face index -> person index): the most similar person's core, when
    that similarity reaches JOIN_FLOOR and beats the runner-up by JOIN_MARGIN, both over all people. A person
    appears once per photo: when the best person already has a face in the candidate's photo (a core face, or a
    more similar candidate, as candidates go in order of similarity), the candidate stays in no person rather than
    fall back on the runner-up, which would give a stranger someone else's references."""
    if not people or not candidates:
        return {}
    centroids = np.stack([_centroid(faces, person) for person in people])
    taken = {(faces[i].photo, p) for p, person in enumerate(people) for i in person}
    similarity = {i: centroids @ faces[i].embedding for i in candidates if faces[i].face.size >= MIN_FACE_SIZE}
    joined: dict[int, int] = {}
    for i in sorted(similarity, key=lambda i: -float(similarity[i].max())):
        ranked = sorted(range(len(people)), key=lambda p: -float(similarity[i][p]))
        best = float(similarity[i][ranked[0]])
        runner_up = max(float(similarity[i][ranked[1]]) if len(ranked) > 1 else 0.0, 0.0)
        if best >= JOIN_FLOOR and best - runner_up >= JOIN_MARGIN and (faces[i].photo, ranked[0]) not in taken:
            joined[i] = ranked[0]
            taken.add((faces[i].photo, ranked[0]))
    return joined


def _centroid(faces: Sequence[AlbumFace], person: Sequence[int]) -> np.ndarray:
    """A person's mean identity, from its core faces (all its faces when it has none, as a user's edit can make)."""
    members = [i for i in person if faces[i].core] or list(person)
    mean = np.mean([faces[i].embedding for i in members], axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def choose_references(
    faces: Sequence[AlbumFace], exclude: Sequence[str], k: int, threshold: float, keep_sharp: float = KEEP_SHARP
) -> list[str]:
    """Up to ``k`` reference face ids among a person's ``faces``: core faces only, and of those the ones too sharp
    to restore (``keep_sharp``) where the person has any, so that a worn photo is restored rather than made a
    reference; the user's exclusions left out; ranked by agreement with the others, size, sharpness
    (``rank_references``) and frontality; faces that look like another person are dropped."""
    pool = [f for f in faces if f.core and f.face.size >= MIN_REFERENCE_SIZE and f.id not in set(exclude)]
    pool = [f for f in pool if f.detail >= keep_sharp] or pool
    if not pool:
        return []
    reports = rank_references(
        np.stack([f.embedding for f in pool]), [f.face.size for f in pool], [f.sharpness for f in pool], threshold
    )
    ranked = sorted(
        (r for r in reports if not r.flagged), key=lambda r: -(r.score + FRONTAL_WEIGHT * pool[r.index].frontal)
    )
    return [pool[r.index].id for r in ranked[:k]]


def decide(face: AlbumFace, person: Person | None, keep_sharp: float) -> str:
    """What happens to a face: only a person's degraded faces, with references, are restored."""
    if person is None:
        return "unmatched"
    if face.id in person.references:
        return "reference"
    if face.face.size < MIN_FACE_SIZE:
        return "too small"
    if face.detail >= keep_sharp:
        return "kept sharp"
    return "restored" if person.references else "no reference"


def build_album(
    restorer: RefFaceRestorer,
    analysis: FaceAnalysis,
    photos_dir: Path,
    out: Path,
    settings: AlbumSettings,
    model_id: str,
    log: Callable[[str], None] = print,
    counter: Callable[[str, str], Callable[[int, int], None]] | None = None,
    state: PartialState | None = None,
) -> Album:
    """The whole album: faces found (cached), grouped into people (or as ``people.json`` says, after an edit),
    references chosen, degraded faces restored (cached by their inputs) and pasted back, ``people.json`` and the
    contact sheet written. ``model_id`` names the model's weights in the cache keys. ``counter(what, unit)`` makes a
    (done, total) progress callback. Under accelerate (``state``), the main process finds and groups the faces once,
    every process restores its share of the batches, and the main process pastes and writes."""
    settings.check()
    photos = photo_files(photos_dir)
    check_out(photos_dir, out)
    check_restorer(restorer)
    out.mkdir(parents=True, exist_ok=True)
    count = counter or (lambda what, unit: lambda done, total: None)
    cache = out / CACHE
    previous = _read_people(out / PEOPLE_JSON)  # a broken edit fails before any work, in every process
    main = state is None or state.is_main_process
    shared = state is not None and state.num_processes > 1
    grouping, failure = None, None
    if main:
        try:
            log(f"finding faces in {len(photos)} photo(s)")
            found = scan_photos(analysis, photos, cache / "detections", count("photos", "photo"))
            for line in faceless_photos([path.name for path in photos], found):
                log(line)
            grouping = group_people(found, analysis.same_person_threshold, settings, previous, log)
        except RefFaceError as e:
            if not shared:
                raise
            failure = str(e)  # every process stops on it, rather than wait for a grouping that never comes
    if shared:
        from accelerate.utils import broadcast_object_list

        grouping, failure = broadcast_object_list([grouping, failure])
    if failure is not None:
        raise RefFaceError(failure)
    assert grouping is not None

    @functools.lru_cache(PHOTOS_IN_MEMORY)
    def photo_of(name: str) -> Photo:
        return load_photo(photos_dir / name)

    def pixels_of(name: str) -> np.ndarray:
        return photo_of(name).pixels

    shard = (state.process_index, state.num_processes) if state is not None else (0, 1)
    barrier = state.wait_for_everyone if state is not None else lambda: None
    restored, sampled = _restore(restorer, grouping, pixels_of, settings, model_id, cache, count, shard, barrier)
    if state is not None:
        state.wait_for_everyone()
    if not main:
        return Album(grouping.faces, grouping.people, grouping.decisions, {}, sampled)
    outputs = _paste(grouping, restored, [path.name for path in photos], photo_of, settings, out, previous, log)
    album = Album(grouping.faces, grouping.people, grouping.decisions, outputs, sampled)
    _write_people(out, album, settings, model_id, restored)
    write_contact_sheet(out, album, pixels_of, restored)
    return album


def faceless_photos(names: Sequence[str], faces: dict[str, AlbumFace]) -> list[str]:
    """A line naming the photos in which no face was found, if any: they are left as they are."""
    with_faces = {face.photo for face in faces.values()}
    empty = [name for name in names if name not in with_faces]
    return [f"no face found in {len(empty)} photo(s), left as they are: {', '.join(empty)}"] if empty else []


def person_lines(grouping: Grouping) -> list[str]:
    """The grouping in words: each person's faces, references and faces to restore; the faces in no person."""
    lines = []
    for p in grouping.people:
        photos = len({grouping.faces[i].photo for i in p.faces})
        restore = [i for i in p.faces if grouping.decisions[i] == "restored"]
        refs = ", ".join(p.references) or "none (no large, sharp face: its faces are left unchanged)"
        lines.append(f"{p.id}: {len(p.faces)} face(s) in {photos} photo(s); references: {refs}; restoring "
                     f"{len(restore)}" + (f": {', '.join(restore)}" if restore else ""))  # fmt: skip
    unmatched = [i for i, d in grouping.decisions.items() if d == "unmatched"]
    if unmatched:
        lines.append(f"in no person, left unchanged ({len(unmatched)}): {', '.join(unmatched)}")
    return lines


def group_people(
    found: dict[str, AlbumFace],
    threshold: float,
    settings: AlbumSettings,
    previous: dict | None = None,
    log: Callable[[str], None] = print,
) -> Grouping:
    """The faces grouped into people (as ``previous``, a read ``people.json``, says where given), each person's
    references chosen (``threshold``: the face models' same-person similarity) and each face's fate decided."""
    people = _people(found, previous, log)
    for person in people:
        person.references = choose_references([found[i] for i in person.faces], person.exclude, settings.max_refs,
                                              threshold, settings.keep_sharp)  # fmt: skip
    owner = {face_id: person for person in people for face_id in person.faces}
    decisions = {face_id: decide(face, owner.get(face_id), settings.keep_sharp) for face_id, face in found.items()}
    log(f"{len(people)} people; {sum(d == 'restored' for d in decisions.values())} face(s) to restore, "
        f"{sum(d == 'unmatched' for d in decisions.values())} in no person")  # fmt: skip
    return Grouping(found, people, decisions)


def _people(found: dict[str, AlbumFace], previous: dict | None, log: Callable[[str], None]) -> list[Person]:
    """People as the user left them in ``people.json`` (new faces joining them by margin), else clustered afresh."""
    ids = list(found)
    faces = [found[i] for i in ids]
    if previous is None:
        groups, _ = cluster_faces(faces)
        return [Person(f"person_{n + 1}", [ids[i] for i in group]) for n, group in enumerate(groups)]
    named = [*previous.get("unmatched", [])]
    for entry in previous["people"]:
        named += [*entry["faces"], *entry.get("exclude_references", [])]
    unknown = [face_id for face_id in dict.fromkeys(named) if face_id not in found]
    if unknown:
        log(f"{PEOPLE_JSON} names face(s) in none of the photos, ignored: {', '.join(unknown)}")
    people = []
    for entry in previous["people"]:
        members = [face_id for face_id in entry["faces"] if face_id in found]
        if members:
            people.append(Person(str(entry["id"]), members, [str(x) for x in entry.get("exclude_references", [])]))
    known = {face_id for person in people for face_id in person.faces} | set(previous.get("unmatched", []))
    new = [n for n, face_id in enumerate(ids) if face_id not in known]
    if new:
        log(f"{len(new)} face(s) not in {PEOPLE_JSON}: joining them to its people")
        index = {face_id: n for n, face_id in enumerate(ids)}
        groups = [[index[face_id] for face_id in person.faces] for person in people]
        for i, p in join_faces(faces, groups, new).items():
            people[p].faces.append(ids[i])
    return people


def _restore(
    restorer: RefFaceRestorer,
    grouping: Grouping,
    pixels_of: Callable[[str], np.ndarray],
    settings: AlbumSettings,
    model_id: str,
    cache: Path,
    count: Callable[[str, str], Callable[[int, int], None]],
    shard: tuple[int, int] = (0, 1),
    barrier: Callable[[], None] = lambda: None,
) -> tuple[dict[str, Path], int]:
    """Every face to restore, in ``cache``/faces/ under a key of its inputs (its crop, its person's reference
    crops, the model, the settings and the seed), sampled unless that file exists. Returns the files and how many
    faces had none (all processes together; this one sampled its ``shard`` of them). ``barrier`` waits for every
    process to know what to sample before any writes, so that all share out the same faces."""
    crop = aligned_crops(grouping.faces, pixels_of, restorer.image_size)
    settings_text = json.dumps(settings.sample_options, sort_keys=True, default=str)
    inputs = [str(x).encode() for x in (model_id, settings_text, settings.seed, restorer.dtype)]
    faces_dir = cache / "faces"
    faces_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    to_restore = grouping.to_restore()
    for face_id, person in to_restore:
        key = _digest(crop(face_id).tobytes(), *(crop(r).tobytes() for r in person.references), *inputs)
        paths[face_id] = faces_dir / f"{key}.png"
    todo = [(face_id, person) for face_id, person in to_restore if not paths[face_id].is_file()]
    barrier()
    for face_id, image in sample_faces(restorer, grouping, todo, crop, settings, count("faces", "face"), shard):
        write_atomic(paths[face_id], lambda tmp, image=image: Image.fromarray(image).save(tmp, format="PNG"))
    return paths, len(todo)


def aligned_crops(
    faces: dict[str, AlbumFace], pixels_of: Callable[[str], np.ndarray], size: int
) -> Callable[[str], np.ndarray]:
    """face id -> its aligned crop at the model's size (``pixels_of``: a photo's pixels by name), the last
    CROPS_IN_MEMORY kept: an album's references are asked for again and again, its photos may not fit in memory."""

    @functools.lru_cache(CROPS_IN_MEMORY)
    def crop(face_id: str) -> np.ndarray:
        face = faces[face_id]
        return align_face(to_8bit(pixels_of(face.photo)), face.face.landmarks, size)[0]

    return crop


def sample_faces(
    restorer: RefFaceRestorer,
    grouping: Grouping,
    todo: Sequence[tuple[str, Person]],
    crop: Callable[[str], np.ndarray],
    settings: AlbumSettings,
    update: Callable[[int, int], None] = lambda done, total: None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[str, np.ndarray]]:
    """(face id, restored crop) for each face of ``todo``, sampled ``settings.batch_size`` at a time, each with its
    person's context and the album's seed. The batches are cut in ``todo``'s order and a process takes every
    ``shard[1]``-th from ``shard[0]``."""
    index, processes = shard
    batches = [todo[i : i + settings.batch_size] for i in range(0, len(todo), settings.batch_size)][index::processes]
    contexts = {}
    for person in {p.id: p for batch in batches for _, p in batch}.values():
        identity = np.stack([grouping.faces[i].embedding for i in person.references])
        contexts[person.id] = restorer.encode_context([crop(i) for i in person.references], identity)
    done, total = 0, sum(map(len, batches))
    for batch in batches:
        images = restorer.restore_batch(
            [crop(face_id) for face_id, _ in batch], [contexts[p.id] for _, p in batch],
            [settings.seed] * len(batch), settings.batch_size, **settings.sample_options,
        )  # fmt: skip
        yield from zip([face_id for face_id, _ in batch], images, strict=True)
        done += len(batch)
        update(done, total)


def _paste(
    grouping: Grouping,
    restored: dict[str, Path],
    names: Sequence[str],
    photo_of: Callable[[str], Photo],
    settings: AlbumSettings,
    out: Path,
    previous: dict | None,
    log: Callable[[str], None],
) -> dict[str, dict[str, str]]:
    """Each photo with restored faces, written into ``out`` as <name>.png. A file there is replaced only when it is
    this album's own earlier output, unchanged since (its hash is in ``people.json``); any other file keeps its name
    and the photo takes a free one."""
    before = (previous or {}).get("photos", {})
    outputs = {}
    for name in names:
        targets = [f for f in grouping.faces.values() if f.photo == name and grouping.decisions[f.id] == "restored"]
        if not targets:
            continue
        key = _digest(*(restored[f.id].name.encode() for f in targets), str(settings.upscale).encode(),
                      str(settings.tone).encode(), name.encode())  # fmt: skip
        old = before.get(name, {})
        own = old.get("output") and _file_digest(out / old["output"]) == old.get("sha256")
        if own and old.get("key") == key:
            outputs[name] = {"output": old["output"], "key": key}
            continue
        photo = photo_of(name)
        result = paste_faces(photo.pixels, targets, lambda f: np.asarray(Image.open(restored[f]).convert("RGB")),
                             settings)  # fmt: skip
        path = out / old["output"] if own else _free_name(out, Path(name).stem)
        save_image(result, path, {"software": "RefFace album", "source": name, "key": key}, photo.exif, photo.icc)
        log(f"wrote {path}")
        outputs[name] = {"output": path.name, "key": key}
    return outputs


def paste_faces(
    pixels: np.ndarray, targets: Sequence[AlbumFace], restored: Callable[[str], np.ndarray], settings: AlbumSettings
) -> np.ndarray:
    """The photo (8- or 16-bit) with each target face's restored crop (``restored(face id)``) pasted back, scaled by
    ``settings.upscale`` (None: restore's automatic factor) and toned as the photo where ``settings.tone``."""
    from .pipeline import auto_upscale, check_upscale

    base, small = pixels, to_8bit(pixels)
    upscale = settings.upscale or auto_upscale(small.shape, [f.face.size for f in targets])
    check_upscale(small.shape, upscale)
    if upscale != 1:
        base = cv2.resize(base, (round(small.shape[1] * upscale), round(small.shape[0] * upscale)),
                          interpolation=cv2.INTER_LANCZOS4)  # fmt: skip
    factors = (base.shape[1] / small.shape[1], base.shape[0] / small.shape[0])
    gray = settings.tone and is_grayscale(small)
    for f in targets:
        lq, affine = align_face(small, f.face.landmarks, 512)
        face = restored(f.id)
        lq = cv2.resize(lq, face.shape[1::-1], interpolation=cv2.INTER_AREA)
        face = match_tone(face, lq, gray) if settings.tone else face
        base = paste_back(base, face, scale_affine(affine, *factors), 512)
    return base


def _free_name(out: Path, stem: str) -> Path:
    path, n = out / f"{stem}.png", 1
    while path.exists():
        n += 1
        path = out / f"{stem}-{n}.png"
    return path


def _read_people(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RefFaceError(f"cannot read {path} ({e}); fix it, or move it away to group the faces afresh") from None
    if not isinstance(data, dict) or not isinstance(data.get("people"), list):
        raise RefFaceError(f"{path} is not an album's {PEOPLE_JSON} (no 'people' list); move it away to start afresh")
    version = data.get("format", FORMAT)
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT:
        raise RefFaceError(f"{path} has format {version!r}, newer than this RefFace reads ({FORMAT}); upgrade RefFace, "
                           "or move it away to group the faces afresh")  # fmt: skip
    for entry in data["people"]:
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("faces"), list):
            raise RefFaceError(f"{path}: each person needs an 'id' and a 'faces' list, got {str(entry)[:80]}")
        lists = [entry["faces"], entry.get("exclude_references", [])]
        if not isinstance(lists[1], list) or not all(isinstance(x, str) for x in lists[0] + lists[1]):
            raise RefFaceError(f"{path}: person {entry['id']}'s 'faces' and 'exclude_references' must be lists of "
                               f"face ids (text), got {str(entry)[:80]}")  # fmt: skip
    unmatched = data.get("unmatched", [])
    if not isinstance(unmatched, list) or not all(isinstance(x, str) for x in unmatched):
        raise RefFaceError(f"{path}: 'unmatched' must be a list of face ids (text)")
    ids = [str(entry["id"]) for entry in data["people"]]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise RefFaceError(f"{path}: person ids must differ; repeated: {', '.join(twice)}")
    owners: dict[str, list[str]] = {}
    for entry in data["people"]:
        for face_id in entry["faces"]:
            owners.setdefault(face_id, []).append(str(entry["id"]))
    for face_id, names in owners.items():
        if len(names) > 1:
            raise RefFaceError(f"{path}: face {face_id} is under more than one person ({', '.join(names)}); "
                               "leave it in one 'faces' list")  # fmt: skip
    return data


def _write_people(out: Path, album: Album, settings: AlbumSettings, model_id: str, restored: dict[str, Path]) -> None:
    """``people.json``: what the user reads and edits (people's ``faces`` and ``exclude_references``)."""
    owner = {face_id: person.id for person in album.people for face_id in person.faces}
    photos = {name: {**entry, "sha256": _file_digest(out / entry["output"])} for name, entry in album.outputs.items()}
    data = {
        "format": FORMAT,
        "how_to_edit": "Move face ids between people's 'faces' lists to merge or split people (a new person needs a "
        "new 'id'), or into 'unmatched'; list face ids in 'exclude_references' to keep them out of the references. "
        "Then run the same command again: only what changed is restored again.",
        "settings": {
            "model": model_id,
            "seed": settings.seed,
            "max_refs": settings.max_refs,
            "keep_sharp": settings.keep_sharp,
            **settings.sample_options,
        },  # fmt: skip
        "people": [
            {"id": p.id, "faces": p.faces, "references": p.references, "exclude_references": p.exclude}
            for p in album.people
        ],
        "unmatched": [face_id for face_id, d in album.decisions.items() if d == "unmatched"],
        "faces": {
            face_id: {
                "photo": face.photo,
                "box": [round(float(v), 1) for v in face.face.bbox],
                "person": owner.get(face_id),
                "decision": album.decisions[face_id],
                "size": round(face.face.size, 1),
                "sharpness": round(face.detail, 1),
                **({"restored": str(restored[face_id].relative_to(out))} if face_id in restored else {}),
            }
            for face_id, face in album.faces.items()
        },
        "photos": photos,
    }
    write_atomic(out / PEOPLE_JSON, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


def write_contact_sheet(
    out: Path, album: Album, pixels_of: Callable[[str], np.ndarray], restored: dict[str, Path]
) -> None:
    """``album.html``: a row per person (references, then each restored face before and after), then the faces in
    no person. Thumbnails sit in the cache folder, linked relatively: the page opens from the disk."""
    thumbs = out / CACHE / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)

    def thumb(face_id: str, after: bool = False) -> str:
        face = album.faces[face_id]
        if after:
            image = np.asarray(Image.open(restored[face_id]).convert("RGB"))
        else:
            image = align_face(to_8bit(pixels_of(face.photo)), face.face.landmarks, THUMB)[0]
        name = f"{_digest(face_id.encode(), str(after).encode())}.jpg"
        Image.fromarray(image).resize((THUMB, THUMB), Image.LANCZOS).save(thumbs / name, quality=90)
        return f'<img src="{CACHE}/thumbs/{name}" title="{html.escape(face_id)}" alt="{html.escape(face_id)}">'

    rows = []
    for person in album.people:
        refs = "".join(thumb(i) for i in person.references) or "<em>no reference</em>"
        pairs = "".join(
            f"<figure>{thumb(i)}{thumb(i, True)}<figcaption>{html.escape(i)}</figcaption></figure>"
            for i in person.faces if album.decisions[i] == "restored"
        )  # fmt: skip
        kept = sum(album.decisions[i] == "kept sharp" for i in person.faces)
        rows.append(f"<tr><th>{html.escape(person.id)}<br><small>{len(person.faces)} faces, {kept} kept sharp"
                    f"</small></th><td>{refs}</td><td>{pairs}</td></tr>")  # fmt: skip
    unmatched = "".join(thumb(i) for i, d in album.decisions.items() if d == "unmatched")
    page = (
        "<!doctype html><meta charset=utf-8><title>RefFace album</title><style>body{font-family:sans-serif}"
        "td,th{border-bottom:1px solid #ccc;padding:6px;vertical-align:top}figure{display:inline-block;margin:4px}"
        "img{margin:1px}</style><h1>RefFace album</h1><p>Edit people.json to merge or split people or exclude a "
        "reference, then run the command again.</p><table><tr><th>person</th><th>references</th>"
        "<th>restored faces: before, after</th></tr>" + "".join(rows) + "</table>"
        f"<h2>In no person (left unchanged)</h2><p>{unmatched or 'none'}</p>"
    )
    write_atomic(out / CONTACT_SHEET, lambda tmp: Path(tmp).write_text(page))


def people_sheet(grouping: Grouping, pixels_of: Callable[[str], np.ndarray], size: int = THUMB) -> np.ndarray:
    """A picture of the grouping: a row per person (its name, its references, then a gap and its faces to
    restore), and a last row of the faces in no person."""
    rows = [(p.id, p.references, [i for i in p.faces if grouping.decisions[i] == "restored"]) for p in grouping.people]
    unmatched = [i for i, d in grouping.decisions.items() if d == "unmatched"]
    if unmatched:
        rows.append(("no person", [], unmatched))
    label, gap = 2 * size, size // 4
    width = label + max((len(refs) * size + gap + len(faces) * size for _, refs, faces in rows), default=size)
    sheet = np.full((max(len(rows), 1) * size, width, 3), 255, np.uint8)
    for r, (name, refs, faces) in enumerate(rows):
        y = r * size
        cv2.putText(sheet, name, (6, y + size // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        x = label
        for face_id in [*refs, None, *faces]:
            if face_id is None:
                x += gap
                continue
            face = grouping.faces[face_id]
            sheet[y : y + size, x : x + size] = align_face(to_8bit(pixels_of(face.photo)), face.face.landmarks, size)[0]
            x += size
        sheet[y + size - 1, :] = 200
    return sheet


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:32]


def _file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def model_id(folder: str | os.PathLike) -> str:
    """Names a model folder's weights for the cache keys: its config and its files' sizes and times."""
    folder = Path(folder)
    parts = [(folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b""]
    parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode() for p in sorted(folder.glob("*"))]
    return _digest(*parts)
