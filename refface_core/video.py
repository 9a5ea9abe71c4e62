"""One person across the frames of a video: faces tracked, the person's track restored with temporal consistency
(landmarks smoothed over time so the crop does not jitter, one seed for every frame of a track), pasted back, and
the video written again with its timing, size, rotation, codec and audio kept.

The work is three passes over the decoded video, so that no more than a frame or two is held in memory:

1. analyse: detect and embed every face, link detections into tracks, choose the person's track(s) and smooth
   their landmarks;
2. restore: align each chosen face with its smoothed landmarks and restore a track's frames in batches with one
   shared context; each restored crop is kept in OUT.parts/ (resumable);
3. encode: paste the crops back, encode, copy the audio packets, and measure flicker and identity per frame.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import RefFaceError
from .faces import (
    Face,
    FaceAnalysis,
    PhotoFaces,
    Wording,
    align_face,
    alignment_transform,
    choose_faces,
    face_similarity,
    paste_back,
    paste_mask,
)
from .faces.analysis import box_iou
from .faces.matching import USABLE_SHARPNESS, USABLE_SIZE
from .faces.references import sharpness
from .files import write_atomic

if TYPE_CHECKING:
    import av

    from .model import CompositeContext, RefFaceRestorer

# Output containers by suffix: the temporary file beside OUT has no telling suffix of its own.
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}
FALLBACK_ENCODER = "libx264"  # where the input's codec has no encoder in PyAV's FFmpeg
# Linking detections into tracks: a detection continues a track seen at most MAX_GAP frames before when their boxes
# overlap by MIN_IOU, or when it looks like the same person (the recogniser's threshold); a missed detection inside
# a track's span is interpolated, so the person's face does not flip between restored and not.
MIN_IOU = 0.3
MAX_GAP = 5
POLY_ORDER = 2  # Savitzky-Golay: quadratic over the window, so steady motion and zoom pass, jitter does not
COLOR_TAGS = ("color_primaries", "color_trc", "colorspace", "color_range")
TRACK_WORDING = Wording("--track N, tracks listed longest first", "--all-tracks", "an aligned video is not supported")


@dataclass
class VideoInfo:
    """What the output keeps of the input's video stream."""

    frames: int
    width: int  # as stored, before rotation
    height: int
    rate: Fraction | None  # the stream's average frame rate (the encoder's rate control); timestamps say the rest
    time_base: Fraction
    rotation: int  # counter-clockwise degrees to display it upright (a multiple of 90)
    codec: str
    pix_fmt: str
    bit_rate: int | None
    audio: list[str]  # codecs of the audio streams, copied unchanged
    color: dict[str, int] = field(default_factory=dict)  # colour tags: primaries, trc, colorspace, range (FFmpeg's)
    sample_aspect_ratio: Fraction | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "frames": self.frames, "width": self.width, "height": self.height,
            "rate": str(self.rate) if self.rate else None, "rotation": self.rotation, "codec": self.codec,
            "bit_rate": self.bit_rate, "audio": self.audio, "color": self.color,
            "sample_aspect_ratio": str(self.sample_aspect_ratio) if self.sample_aspect_ratio else None,
        }  # fmt: skip


@dataclass
class Track:
    """One face followed across frames. ``landmarks`` holds every frame of each of its segments (the runs of
    detections whose boxes overlap from one to the next), missed ones interpolated."""

    frames: list[int] = field(default_factory=list)  # frames where it was detected
    faces: list[Face] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    usable: list[bool] = field(default_factory=list)  # big and sharp enough for its identity to be trusted
    _sum: np.ndarray | None = field(default=None, repr=False)  # the embeddings' running sum

    def __post_init__(self) -> None:
        if self.embeddings and self._sum is None:
            self._sum = np.sum(self.embeddings, axis=0, dtype=np.float64)

    def add(self, frame: int, face: Face, embedding: np.ndarray, usable: bool) -> None:
        self.frames.append(frame)
        self.faces.append(face)
        self.embeddings.append(embedding)
        self.usable.append(usable)
        self._sum = embedding.astype(np.float64) if self._sum is None else self._sum + embedding

    def identity(self) -> np.ndarray:
        """The mean of its embeddings, normalised: a track's many degraded frames say more than one frame does."""
        total = self._sum if self._sum is not None else np.sum(self.embeddings, axis=0, dtype=np.float64)
        return (total / max(float(np.linalg.norm(total)), 1e-12)).astype(np.float32)

    def segments(self) -> list[list[int]]:
        """Indices into ``frames``, split wherever two consecutive detections do not overlap (box IoU under MIN_IOU):
        a detection joined on identity alone, across a scene cut, starts a new segment."""
        return split_segments(self.faces)

    def landmarks(self) -> list[dict[int, np.ndarray]]:
        """Per segment, landmarks for every frame from its first to its last detection, gaps interpolated linearly;
        the frames between segments have none."""
        filled_segments = []
        for indices in self.segments():
            frames = [self.frames[i] for i in indices]
            points = np.stack([self.faces[i].landmarks for i in indices]).reshape(len(indices), -1)
            span = np.arange(frames[0], frames[-1] + 1)
            filled = np.stack([np.interp(span, frames, points[:, k]) for k in range(points.shape[1])], axis=1)
            filled_segments.append({int(t): row.reshape(5, 2) for t, row in zip(span, filled, strict=True)})
        return filled_segments


def split_segments(faces: list[Face]) -> list[list[int]]:
    """Indices of ``faces`` (one track's detections, in frame order) in runs whose consecutive boxes overlap by
    MIN_IOU."""
    runs: list[list[int]] = []
    for i, face in enumerate(faces):
        if runs and box_iou(faces[i - 1].bbox, face.bbox) >= MIN_IOU:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def open_video(path: Path) -> av.container.InputContainer:
    """The input container, or one clear RefFaceError: missing, not a video, no video stream."""
    import av

    if not path.is_file():
        raise RefFaceError(f"video not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise RefFaceError(f"not a readable video: {path} ({e})") from None
    if not container.streams.video:
        container.close()
        raise RefFaceError(f"{path} has no video stream")
    return container


def probe(path: Path) -> VideoInfo:
    """The video stream's properties; the frames are counted by decoding where the container does not say."""
    with open_video(path) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        decoded = _decode(container, path)
        first = next(decoded, None)
        if first is None:
            raise RefFaceError(f"{path}: the video stream has no frames")
        rotation = int(round(first.rotation / 90)) * 90 % 360
        frames = stream.frames or 1 + sum(1 for _ in decoded)
        bit_rate = stream.bit_rate or codec.bit_rate or None
        if not bit_rate and container.duration:  # the whole file's rate, less its audio
            audio = sum(s.bit_rate or 0 for s in container.streams.audio)
            bit_rate = max(int(path.stat().st_size * 8 / (container.duration / 1e6)) - audio, 0) or None
        color = {name: int(getattr(codec, name) or 0) for name in COLOR_TAGS}
        for name in COLOR_TAGS:  # the first frame says where the container does not
            color[name] = color[name] or int(getattr(first, name, 0) or 0)
        return VideoInfo(
            frames, codec.width, codec.height, stream.average_rate or stream.base_rate, stream.time_base, rotation,
            codec.name, codec.pix_fmt or "yuv420p", bit_rate, [s.codec_context.name for s in container.streams.audio],
            {name: value for name, value in color.items() if value}, codec.sample_aspect_ratio or None,
        )  # fmt: skip


def _decode(container: av.container.InputContainer, path: Path) -> Iterator[av.VideoFrame]:
    import av

    try:
        yield from container.decode(container.streams.video[0])
    except av.FFmpegError as e:
        raise RefFaceError(f"cannot decode {path}: {e}") from None


def upright(frame: av.VideoFrame, rotation: int) -> np.ndarray:
    """The frame as RGB (by its own colorspace and range), turned as a player shows it, so the faces stand up for
    the detector."""
    rgb = frame.to_ndarray(
        format="rgb24", src_colorspace=frame.colorspace, src_color_range=frame.color_range, interpolation=_exact()
    )
    return np.ascontiguousarray(np.rot90(rgb, rotation // 90))


def _exact() -> Any:
    """swscale's accurate rounding: without it, RGB -> YUV -> RGB drifts by a level or two."""
    from av.video.reformatter import Interpolation

    return Interpolation.BILINEAR | Interpolation.ACCURATE_RND


def to_frame(image: np.ndarray, like: av.VideoFrame, rotation: int) -> av.VideoFrame:
    """Upright RGB ``image`` as a frame of ``like``'s kind: turned back, in its pixel format, colorspace and range
    (the inverse of ``upright``), at its timestamp, so a restored frame's colours match the untouched frames'."""
    import av

    stored = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(image, -(rotation // 90))), "rgb24")
    made = stored.reformat(
        format=like.format.name, src_colorspace=like.colorspace, dst_colorspace=like.colorspace,
        src_color_range="JPEG", dst_color_range=like.color_range, interpolation=_exact(),
    )  # fmt: skip
    for name in COLOR_TAGS:
        setattr(made, name, getattr(like, name))
    made.pts = like.pts
    if like.time_base is not None:
        made.time_base = like.time_base
    return made


def frames_of(path: Path, rotation: int) -> Iterator[np.ndarray]:
    """Upright RGB frames, in presentation order."""
    with open_video(path) as container:
        for frame in _decode(container, path):
            yield upright(frame, rotation)


def analyse_frames(
    analysis: FaceAnalysis, frames: Iterable[np.ndarray], total: int, update: Callable[[int, int], None] | None = None
) -> list[Track]:
    """Detect and embed every face of every frame and link them into tracks, longest first."""
    detections = []
    for t, image in enumerate(frames):
        faces = analysis.detect(image)
        crops = analysis.identity_crops(image, faces)
        usable = [f.size >= USABLE_SIZE and sharpness(c) >= USABLE_SHARPNESS for f, c in zip(faces, crops, strict=True)]
        detections.append((faces, analysis.embed_crops(crops), usable))
        if update:
            update(t + 1, total)
    return link_tracks(detections, analysis.same_person_threshold)


def link_tracks(detections: list[tuple[list[Face], np.ndarray, list[bool]]], threshold: float) -> list[Track]:
    """Greedy frame-to-frame linking: each detection joins the open track it overlaps most (box IoU) plus looks most
    like (cosine to the track's identity), if it overlaps by MIN_IOU or reaches ``threshold``; else it starts one."""
    tracks: list[Track] = []
    for t, (faces, embeddings, usable) in enumerate(detections):
        open_tracks = [k for k, track in enumerate(tracks) if t - track.frames[-1] <= MAX_GAP]
        pairs = []
        for k in open_tracks:
            last, identity = tracks[k].faces[-1], tracks[k].identity()
            for i, face in enumerate(faces):
                overlap, similar = box_iou(last.bbox, face.bbox), float(embeddings[i] @ identity)
                if overlap >= MIN_IOU or similar >= threshold:
                    pairs.append((overlap + similar, k, i))
        taken_tracks, taken_faces = set(), set()
        for _, k, i in sorted(pairs, reverse=True):
            if k not in taken_tracks and i not in taken_faces:
                taken_tracks.add(k)
                taken_faces.add(i)
                tracks[k].add(t, faces[i], embeddings[i], usable[i])
        for i in range(len(faces)):
            if i not in taken_faces:
                tracks.append(Track([t], [faces[i]], [embeddings[i]], [usable[i]]))
    return sorted(tracks, key=lambda track: (-len(track.frames), -max(f.size for f in track.faces)))


def choose_tracks(
    tracks: list[Track],
    identity: np.ndarray | None,
    select: str | int,
    threshold: float,
    log: Callable[[str], None] = print,
    wording: Wording = TRACK_WORDING,
) -> list[int]:
    """The person's tracks, by the rule that chooses a photo's faces (``choose_faces``), each track judged by its
    mean identity over all its frames (``identity`` None: no person, as for select "largest" or "all"); the report
    says "track" where that rule says "face"."""
    if not tracks:
        raise RefFaceError("no face found in any frame of the video")
    if isinstance(select, int) and not 0 <= select < len(tracks):
        count = f"{len(tracks)} track{'s' if len(tracks) != 1 else ''}"
        raise RefFaceError(f"track {select} does not exist: the video has {count} (0..{len(tracks) - 1})")
    biggest = [max(track.faces, key=lambda f: f.size) for track in tracks]
    identities = np.stack([track.identity() for track in tracks])
    similarity = None if identity is None else face_similarity(identities, identity)
    usable = np.array([any(track.usable) for track in tracks])
    for k, track in enumerate(tracks):
        log(f"track {k}: frames {track.frames[0]}-{track.frames[-1]} ({len(track.frames)} detected)")
    return choose_faces(
        PhotoFaces(biggest, similarity, usable),
        select,
        threshold,
        lambda line: log(re.sub(r"^(warning: )?face (\d+)", r"\1track \2", line)),
        wording,
    )


def check_smooth(window: int, name: str = "--smooth") -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise RefFaceError(f"{name} must be an odd number of frames (1 = off, 3, 5, ...), got {window!r}")


def smooth_landmarks(landmarks: np.ndarray, window: int) -> np.ndarray:
    """Landmarks [T, 5, 2] smoothed over time with a Savitzky-Golay filter of ``window`` frames (an even one taken
    down to odd; shortened to the segment's length), which removes the detector's frame-to-frame jitter but keeps
    steady motion and zoom: quadratic from 5 frames, a straight line (a moving mean) over 3, off at 1."""
    window = min(window, len(landmarks))
    window -= window % 2 == 0
    if window < 3:
        return landmarks
    from scipy.signal import savgol_filter

    return savgol_filter(landmarks, window, min(POLY_ORDER, window - 2), axis=0, mode="interp")


def track_plan(track: Track, window: int) -> dict[int, np.ndarray]:
    """Frame -> the smoothed landmarks to align that frame's face with; each segment of the track filled and
    smoothed on its own, so neither reaches across a cut."""
    plan = {}
    for filled in track.landmarks():
        smoothed = smooth_landmarks(np.stack(list(filled.values())), window)
        plan.update(zip(filled, smoothed, strict=True))
    return plan


def _digest(*arrays: Any) -> str:
    """A digest of arrays' (or tensors') values, shapes and dtypes."""
    h = hashlib.sha256()
    for array in arrays:
        if hasattr(array, "detach"):  # a torch tensor: its values on the CPU
            array = array.detach().cpu()
            h.update(str(array.dtype).encode())
            array = array.float().numpy()
        array = np.ascontiguousarray(array)
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def resume_settings(
    restorer: RefFaceRestorer,
    analysis: FaceAnalysis,
    video: Path,
    identity: np.ndarray,
    context: CompositeContext,
    **choices: Any,
) -> dict[str, Any]:
    """What OUT.parts/ is keyed on, from what ``restore_video`` is given: the video file (path, size, time), the
    references by content (their embeddings and the model's context made from them), the model's dtype and crop
    size, the face models, and the choices (sampling, seed, smoothing, tracks, tone, threshold)."""
    stat = video.stat()
    tensors = [t for t in (context.latents, context.tokens) if t is not None]
    return {
        "input": [str(video.resolve()), stat.st_size, stat.st_mtime_ns],
        "identity": _digest(identity),
        "context": _digest(*tensors),
        "dtype": str(restorer.dtype),
        "image_size": restorer.image_size,
        "face_analysis": getattr(analysis, "name", type(analysis).__name__),
        **choices,
    }


class CropStore:
    """Restored crops by (track, frame), in memory."""

    def __init__(self) -> None:
        self.crops: dict[tuple[int, int], np.ndarray] = {}

    def has(self, track: int, frame: int) -> bool:
        return (track, frame) in self.crops

    def save(self, track: int, frame: int, crop: np.ndarray) -> None:
        self.crops[track, frame] = crop

    def load(self, track: int, frame: int) -> np.ndarray:
        return self.crops[track, frame]


class Parts(CropStore):
    """OUT.parts/: the restored crops of a run, one PNG per track and frame, and the plan they were made for. A rerun
    with the same settings takes them up where it stopped; other settings start afresh."""

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.folder = out.with_name(out.name + ".parts")
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()

    def load_plan(self) -> tuple[dict[int, dict[int, np.ndarray]], list[dict[str, Any]]] | None:
        """The plan and track list of an earlier run with the same settings, or None (and no folder). A folder that
        RefFace did not make (no plan.json in it, and not empty) is refused, not removed."""
        if self.folder.exists() and not self.folder.is_dir():
            raise RefFaceError(f"{self.folder} exists and is not a folder; move it away, or choose another --out")
        if not self.folder.exists():
            return None
        if not (self.folder / "plan.json").is_file() and any(self.folder.iterdir()):
            raise RefFaceError(
                f"{self.folder} exists and is not RefFace's (no plan.json); move it away, or choose another --out"
            )
        try:
            saved = json.loads((self.folder / "plan.json").read_text())
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        plan = {
            int(k): {int(t): np.array(points, np.float64) for t, points in frames.items()}
            for k, frames in saved["plan"].items()
        }
        return plan, saved["tracks"]

    def save_plan(self, plan: dict[int, dict[int, np.ndarray]], tracks: list[dict[str, Any]]) -> None:
        self.folder.mkdir(exist_ok=True)
        frames = {k: {t: points.tolist() for t, points in plan_k.items()} for k, plan_k in plan.items()}
        text = json.dumps({"key": self.key, "plan": frames, "tracks": tracks})
        write_atomic(self.folder / "plan.json", lambda tmp: Path(tmp).write_text(text))

    def path(self, track: int, frame: int) -> Path:
        return self.folder / f"track{track}_frame{frame:07d}.png"

    def has(self, track: int, frame: int) -> bool:
        return self.path(track, frame).exists()

    def save(self, track: int, frame: int, crop: np.ndarray) -> None:
        from PIL import Image

        write_atomic(self.path(track, frame), lambda tmp: Image.fromarray(crop).save(tmp, format="PNG"))

    def load(self, track: int, frame: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.path(track, frame)) as image:
            return np.asarray(image.convert("RGB"))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def restore_tracks(
    restorer: RefFaceRestorer,
    frames_again: Callable[[], Iterable[np.ndarray]],
    plan: dict[int, dict[int, np.ndarray]],
    context: CompositeContext,
    parts: CropStore,
    seed: int,
    batch_size: int,
    tone: bool = True,
    update: Callable[[int, int], None] | None = None,
    previous_frame: bool = False,
    **sample_options: Any,
) -> int:
    """Restore every planned face not yet in ``parts`` (``frames_again()``: the frames, from the first, each time it
    is called): a track's frames go through ``restore_batch`` together, ``batch_size`` at a time, all from the same
    ``seed`` (the same initial noise) and the one shared ``context``.
    Returns how many were restored now. With ``previous_frame``, each frame is also guided by the track's restored
    frame before it, as one more reference, so frames are restored one at a time."""
    from .faces.tone import is_grayscale
    from .pipeline import restore_crops

    todo = {k: {t for t in frames if not parts.has(k, t)} for k, frames in plan.items()}
    total = sum(len(frames) for frames in plan.values())
    done = total - sum(len(frames) for frames in todo.values())
    gray: dict[int, bool | None] = {}  # decided once per track, on its first frame: a face does not flip to colour
    first = {k: min(frames) for k, frames in plan.items() if frames}  # the same frame however far a run got
    pending: dict[int, list[tuple[int, np.ndarray]]] = {k: [] for k in plan}

    if previous_frame:
        check_previous_frame(context)
    size = 1 if previous_frame else batch_size

    def flush(k: int) -> None:
        nonlocal done
        frames = [t for t, _ in pending[k]]
        crops = [crop for _, crop in pending[k]]
        here, t = context, frames[0]
        if previous_frame and parts.has(k, t - 1) and same_shot(plan[k][t - 1], plan[k][t]):
            here = with_previous_face(restorer, context, parts.load(k, t - 1))
        restored = restore_crops(restorer, crops, here, [seed], tone, gray[k], batch_size=batch_size,
                                 **sample_options)  # fmt: skip
        for t, (face,) in zip(frames, restored, strict=True):
            parts.save(k, t, face)
        pending[k].clear()
        done += len(frames)
        if update:
            update(done, total)

    if not any(todo.values()):
        return 0
    for t, image in enumerate(frames_again()):
        for k, frames in todo.items():
            if t == first.get(k) or t in frames:
                crop, _ = align_face(image, plan[k][t], restorer.image_size)
                gray.setdefault(k, tone and is_grayscale(crop))
            if t in frames:
                pending[k].append((t, crop))
                if len(pending[k]) == size:
                    flush(k)
    for k in plan:
        if pending[k]:
            flush(k)
    return sum(len(frames) for frames in todo.values())


def check_previous_frame(context: CompositeContext) -> None:
    if context.tokens is not None:
        raise RefFaceError("guiding with the previous frame needs a model without Composite Context")


def same_shot(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether a track's face in two consecutive frames is in one shot: its landmarks' boxes overlap by MIN_IOU, as
    a segment's detections do (the previous frame guides the next only within a shot)."""
    boxes = [np.r_[points.min(0), points.max(0)] for points in (before, after)]
    return box_iou(*boxes) >= MIN_IOU


def with_previous_face(restorer: RefFaceRestorer, context: CompositeContext, face: np.ndarray) -> CompositeContext:
    """``context`` with a track's previous restored face as one more reference (its CacheKV latent)."""
    import torch

    from .model import CompositeContext

    return CompositeContext(torch.cat([context.latents, restorer.encode_context([face]).latents], dim=1))


@dataclass
class TrackMeasure:
    """Flicker and identity of one restored track, gathered frame by frame while encoding."""

    frames: int = 0
    flicker_out: list[float] = field(default_factory=list)
    flicker_in: list[float] = field(default_factory=list)
    identity: dict[int, float] = field(default_factory=dict)
    identity_in: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        ids, ids_in = list(self.identity.values()), list(self.identity_in.values())
        return {
            "frames": self.frames,
            "flicker": {"output": _mean(self.flicker_out), "input": _mean(self.flicker_in)},
            "identity": {"mean": _mean(ids), "min": _round(min(ids)) if ids else None, "input_mean": _mean(ids_in)},
            "per_frame": [
                {"frame": t, "identity": _round(self.identity[t]), "identity_input": _round(self.identity_in[t])}
                for t in self.identity
            ],
        }


def _mean(values: list[float]) -> float | None:
    return _round(float(np.mean(values))) if values else None


def _round(value: float) -> float:
    return round(float(value), 4)


def flicker(before: np.ndarray, after: np.ndarray, region: np.ndarray) -> float:
    """Mean absolute difference (0-255) of two consecutive frames over a region: how much the face changes."""
    return float(np.abs(after[region].astype(np.float32) - before[region].astype(np.float32)).mean())


class FacePaster:
    """Pastes each frame's planned faces back, frames in order, and measures each track's flicker (against the
    input's, over the same region) and identity (cosine of the face to the references' mean, restored and as it
    was; not measured without references)."""

    def __init__(
        self,
        plan: dict[int, dict[int, np.ndarray]],
        parts: CropStore,
        crop_size: int,
        analysis: FaceAnalysis,
        identity: np.ndarray | None,
    ) -> None:
        self.plan, self.parts, self.crop_size, self.analysis = plan, parts, crop_size, analysis
        self.measures = {k: TrackMeasure() for k in plan}
        self.previous: dict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}  # frame, input, output, region
        self.person = None
        if identity is not None:
            mean = identity.reshape(-1, identity.shape[-1]).mean(0)
            self.person = mean / max(float(np.linalg.norm(mean)), 1e-12)

    def tracks_in(self, t: int) -> list[int]:
        return [k for k in self.plan if t in self.plan[k]]

    def __call__(self, t: int, before: np.ndarray) -> np.ndarray:
        """Frame ``t`` (upright RGB) with its planned faces pasted back, measured (as it is where it has none)."""
        here = self.tracks_in(t)
        after = before
        for k in here:
            after = paste_back(after, self.parts.load(k, t), alignment_transform(self.plan[k][t], self.crop_size))
        for k in here:
            measure, landmarks = self.measures[k], self.plan[k][t]
            region = paste_mask(alignment_transform(landmarks, self.crop_size), self.crop_size, before.shape) > 0.5
            if k in self.previous and self.previous[k][0] == t - 1:
                _, before_prev, after_prev, region_prev = self.previous[k]
                both = region | region_prev
                measure.flicker_out.append(flicker(after_prev, after, both))
                measure.flicker_in.append(flicker(before_prev, before, both))
            self.previous[k] = (t, before, after, region)
            measure.frames += 1
            if self.person is not None:
                face = [Face(np.r_[landmarks.min(0), landmarks.max(0)], landmarks, 1.0)]
                measure.identity[t] = float(self.analysis.embed(after, face)[0] @ self.person)
                measure.identity_in[t] = float(self.analysis.embed(before, face)[0] @ self.person)
        return after


def encode_video(
    path: Path,
    out: str,
    container_format: str,
    info: VideoInfo,
    paster: FacePaster,
    update: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Write the video to ``out``: every frame at its own timestamp, the planned faces pasted back and measured by
    ``paster``, the audio packets copied as they are."""
    import av

    def restored(frame: av.VideoFrame, t: int) -> av.VideoFrame:
        if not paster.tracks_in(t):
            frame.pict_type = av.video.frame.PictureType.NONE  # let the encoder choose, not copy the input's
            return frame
        return to_frame(paster(t, upright(frame, info.rotation)), frame, info.rotation)

    durations: dict[Fraction, Fraction] = {}  # input packets' durations by time: the encoder guesses the last one's

    def timed(packets: list[av.Packet]) -> list[av.Packet]:
        for packet in packets:
            duration = durations.pop(packet.pts * packet.time_base, None) if packet.pts is not None else None
            if duration:
                packet.duration = round(duration / packet.time_base)
        return packets

    with open_video(path) as source, av.open(out, "w", format=container_format) as target:
        video_out = _video_stream(target, info, log)
        audio = {s.index: target.add_stream_from_template(s) for s in source.streams.audio}
        t = 0
        try:
            for packet in source.demux(source.streams.video[0], *source.streams.audio):
                if packet.stream.index in audio:
                    if packet.size:  # not the demuxer's empty flush packet
                        packet.stream = audio[packet.stream.index]
                        target.mux(packet)
                    continue
                if packet.pts is not None and packet.duration:
                    durations[packet.pts * packet.time_base] = packet.duration * packet.time_base
                for frame in packet.decode():
                    target.mux(timed(video_out.encode(restored(frame, t))))
                    t += 1
                    if update:
                        update(t, info.frames)
            target.mux(timed(video_out.encode()))
        except av.FFmpegError as e:
            raise RefFaceError(f"cannot write the video ({container_format}): {e}") from None


def _video_stream(target: av.container.OutputContainer, info: VideoInfo, log: Callable[[str], None]) -> Any:
    """The output's video stream: the input's codec (or H.264 where PyAV has no encoder for it), size, time base,
    rotation, bit rate, colour tags and sample aspect ratio."""
    import av

    try:
        codec = av.Codec(info.codec, "w")
    except av.FFmpegError:
        codec = None
    if codec is None or not codec.is_encoder:
        log(f"no {info.codec} encoder in PyAV's FFmpeg: writing {FALLBACK_ENCODER}")
        codec = av.Codec(FALLBACK_ENCODER, "w")
    stream = target.add_stream(codec.name, rate=info.rate)
    stream.width, stream.height = info.width, info.height
    formats = [f.name for f in codec.video_formats or []]
    stream.pix_fmt = info.pix_fmt if not formats or info.pix_fmt in formats else formats[0]
    stream.time_base = info.time_base
    stream.codec_context.time_base = info.time_base
    if info.bit_rate:
        stream.bit_rate = info.bit_rate
    for name, value in info.color.items():  # tagged as the input, so players show the same colours
        setattr(stream.codec_context, name, value)
    if info.sample_aspect_ratio:
        stream.codec_context.sample_aspect_ratio = info.sample_aspect_ratio
    if info.rotation:
        stream.set_display_rotation(info.rotation)
    return stream


def report_path(out: Path) -> Path:
    """OUT.json, where the run's report goes."""
    return out.with_name(out.name + ".json")


def output_format(out: Path) -> str:
    """The container for OUT's suffix."""
    fmt = CONTAINERS.get(out.suffix.lower())
    if fmt is None:
        raise RefFaceError(f"unknown video extension {out.suffix!r} for {out}; use one of {' '.join(CONTAINERS)}")
    return fmt


def check_paths(video: Path, out: Path, overwrite: bool) -> None:
    """Before any work: OUT is a new video file (or --overwrite) in an existing folder, and not the input."""
    output_format(out)
    if out.exists() and out.resolve() == video.resolve():
        raise RefFaceError(f"--out {out} is the input video; write the result to another file")
    if out.is_dir():
        raise RefFaceError(f"{out} is a folder; give a file name for the video")
    if out.exists() and not overwrite:
        raise RefFaceError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    report = report_path(out)
    if report.exists() and not overwrite:
        raise RefFaceError(f"{report} (the report) exists; pass --overwrite to replace it, or choose another --out")
    if not out.parent.is_dir():
        raise RefFaceError(f"output folder does not exist: {out.parent}")


@dataclass
class VideoResult:
    info: VideoInfo
    tracks: list[dict[str, Any]]  # every track found: its frames and whether it was restored
    restored: list[int]  # the tracks restored
    measures: dict[int, TrackMeasure]
    seconds: dict[str, float]  # per pass

    def to_json(self) -> dict[str, Any]:
        frames = self.info.frames
        return {
            "video": self.info.to_json(),
            "tracks": self.tracks,
            "restored": {str(k): self.measures[k].to_json() for k in self.restored},
            "seconds": {name: round(s, 2) for name, s in self.seconds.items()},
            "frames_per_second": {name: round(frames / s, 2) if s > 0 else None for name, s in self.seconds.items()},
        }


def plan_tracks(
    analysis: FaceAnalysis,
    frames: Iterable[np.ndarray],
    total: int,
    identity: np.ndarray | None,
    select: str | int,
    threshold: float | None,
    smooth: int,
    log: Callable[[str], None],
    counter: Callable[[str, str], Callable[[int, int], None]] | None = None,
    wording: Wording = TRACK_WORDING,
) -> tuple[dict[int, dict[int, np.ndarray]], list[dict[str, Any]]]:
    """The analysis pass: the chosen tracks' smoothed landmarks by frame, and every track found, for the report."""
    found = analyse_frames(analysis, frames, total, counter("analysing", "frame") if counter else None)
    threshold = analysis.same_person_threshold if threshold is None else threshold
    chosen = choose_tracks(found, identity, select, threshold, log, wording)
    tracks = [
        {"track": k, "first": tr.frames[0], "last": tr.frames[-1], "detected": len(tr.frames), "restored": k in chosen}
        for k, tr in enumerate(found)
    ]
    return {k: track_plan(found[k], smooth) for k in chosen}, tracks


def restore_planned_frames(
    restorer: RefFaceRestorer,
    analysis: FaceAnalysis,
    frames: list[np.ndarray],
    plan: dict[int, dict[int, np.ndarray]],
    identity: np.ndarray | None,
    context: CompositeContext,
    seed: int = 2024,
    batch_size: int = 8,
    tone: bool = True,
    update: Callable[[int, int], None] | None = None,
    previous_frame: bool = False,
    **sample_options: Any,
) -> tuple[list[np.ndarray], dict[int, TrackMeasure]]:
    """The restore and paste passes of ``restore_video`` for frames in memory (the ComfyUI nodes' video, an IMAGE
    batch), after ``plan_tracks``: the frames with the planned faces restored, and each track's measures."""
    crops = CropStore()
    restore_tracks(restorer, lambda: frames, plan, context, crops, seed, batch_size, tone, update, previous_frame,
                   **sample_options)  # fmt: skip
    paster = FacePaster(plan, crops, restorer.image_size, analysis, identity)
    return [paster(t, frame) for t, frame in enumerate(frames)], paster.measures


def restore_video(
    restorer: RefFaceRestorer,
    analysis: FaceAnalysis,
    video: Path,
    out: Path,
    identity: np.ndarray,
    context: CompositeContext,
    settings: dict[str, Any] | None = None,
    select: str | int = "matching",
    threshold: float | None = None,
    smooth: int = 9,
    seed: int = 2024,
    batch_size: int = 8,
    tone: bool = True,
    progress: Callable[[str], None] = print,
    counter: Callable[[str, str], Callable[[int, int], None]] | None = None,
    previous_frame: bool = False,
    **sample_options: Any,
) -> VideoResult:
    """Restore the person's face through ``video`` into ``out`` (written whole or not at all), resumable through
    OUT.parts/, which is removed once OUT is written. A rerun resumes only with the same inputs and choices
    (``resume_settings``) and the same ``settings``, which should name what this function cannot see: the model's
    weights (e.g. ``{"model": album.model_id(folder)}``). ``select`` and ``threshold`` choose the tracks as
    ``choose_tracks`` does."""
    seconds = {}
    info = probe(video)
    progress(
        f"video: {info.frames} frames, {info.width}×{info.height}, {info.codec}, {float(info.rate or 0):.3g} fps"
        + (f", rotated {info.rotation}°" if info.rotation else "")
        + (f", audio {', '.join(info.audio)}" if info.audio else "")
    )
    key = resume_settings(restorer, analysis, video, identity, context, smooth=smooth, seed=seed, select=select,
                          tone=tone, threshold=threshold, previous_frame=previous_frame,
                          sampling=sample_options)  # fmt: skip
    parts = Parts(out, {**(settings or {}), **key})
    saved = parts.load_plan()
    began = time.monotonic()
    if saved is None:
        plan, tracks = plan_tracks(analysis, frames_of(video, info.rotation), info.frames, identity, select,
                                   threshold, smooth, progress, counter)  # fmt: skip
        parts.save_plan(plan, tracks)
    else:
        progress(f"resuming from {parts.folder}")
        plan, tracks = saved
    seconds["analyse"] = time.monotonic() - began
    progress(f"restoring {sum(map(len, plan.values()))} face(s) in {len(plan)} track(s)")
    began = time.monotonic()
    restore_tracks(restorer, lambda: frames_of(video, info.rotation), plan, context, parts, seed, batch_size, tone,
                   counter("restoring", "frame") if counter else None, previous_frame, **sample_options)  # fmt: skip
    seconds["restore"] = time.monotonic() - began
    began = time.monotonic()
    paster = FacePaster(plan, parts, restorer.image_size, analysis, identity)
    write_atomic(
        out,
        lambda tmp: encode_video(
            video, tmp, output_format(out), info, paster, counter("encoding", "frame") if counter else None, progress
        ),
    )
    seconds["encode"] = time.monotonic() - began
    parts.remove()
    return VideoResult(info, tracks, list(plan), paster.measures, seconds)


def summary_lines(
    restored: list[int], measures: dict[int, TrackMeasure], frames: int, seconds: dict[str, float] | None = None
) -> list[str]:
    """The report: per restored track, its flicker next to the input's and its identity; the speed."""
    lines = []
    for k in restored:
        m = measures[k].to_json()
        flick, ident = m["flicker"], m["identity"]
        identity = f"; identity {_show(ident['mean'])} (min {_show(ident['min'])}, input {_show(ident['input_mean'])})"
        lines.append(
            f"track {k}: {m['frames']} frames restored; flicker "
            f"{_show(flick['output'])} (input {_show(flick['input'])}, mean |Δ| between frames over the face, 0-255)"
            + (identity if measures[k].identity else "")
        )
    total = sum((seconds or {}).values())
    if total > 0:
        lines.append(f"{frames} frames in {total:.1f} s ({frames / total:.2f} frames/s)")
    return lines


def _show(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"
