"""Face detection (5 landmarks) and identity embeddings behind one small interface, with two backends:

- ``OpenCVZoo``: YuNet + SFace from OpenCV Zoo, the default, bundled in ``faces/models`` (MIT and Apache-2.0);
- ``InsightFacePack``: a folder of insightface ONNX models (buffalo_l, antelopev2, ...), routed by insightface.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from ..errors import RefFaceError
from ..images import MIN_SIDE, check_photo, to_8bit
from .align import FFHQ_TEMPLATE_512

YUNET = "face_detection_yunet_2023mar_int8bq.onnx"
SFACE = "face_recognition_sface_2021dec_int8bq.onnx"
BUNDLED_MODELS = Path(__file__).parent / "models"
INSIGHTFACE_PACKS = ("buffalo_l", "antelopev2")
MODELS_HINT = (
    "give a folder with the OpenCV Zoo models (YuNet + SFace, as RefFace bundles them in "
    f"{BUNDLED_MODELS}) or an insightface pack (e.g. models/insightface/models/buffalo_l)"
)
# The FFHQ template's eye distance and landmark spread (RMS distance from the centroid), at 512 px.
TEMPLATE_EYE_DISTANCE = float(np.linalg.norm(FFHQ_TEMPLATE_512[1] - FFHQ_TEMPLATE_512[0]))
TEMPLATE_SPREAD = float(np.sqrt(((FFHQ_TEMPLATE_512 - FFHQ_TEMPLATE_512.mean(0)) ** 2).sum(1).mean()))

ort.set_default_logger_severity(3)
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


@dataclass
class Face:
    bbox: np.ndarray  # [4]: x1, y1, x2, y2 in photo pixels
    landmarks: np.ndarray  # [5, 2]: image-left eye, image-right eye, nose, left and right mouth corners
    score: float

    @property
    def eye_distance(self) -> float:
        return float(np.linalg.norm(self.landmarks[1] - self.landmarks[0]))

    @property
    def size(self) -> float:
        """How big the face is, in px between the eyes of a frontal face with the same landmark spread. All five
        landmarks count, so a turned head, whose eyes come closer together, is not taken for a small face."""
        spread = np.sqrt(((self.landmarks - self.landmarks.mean(0)) ** 2).sum(1).mean())
        return float(spread / TEMPLATE_SPREAD * TEMPLATE_EYE_DISTANCE)

    @property
    def area(self) -> float:
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))

    def to_json(self) -> dict:
        return {
            "bbox": [round(float(v), 1) for v in self.bbox],
            "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in self.landmarks],
            "score": round(float(self.score), 4),
        }


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def onnx_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class FaceAnalysis(ABC):
    """Detects faces and embeds their identity. Images are RGB uint8 arrays [H, W, 3]."""

    name: str
    embedding_dim: int
    same_person_threshold: float  # cosine similarity above which two faces are taken as one person
    max_detect_side = 1600  # larger photos are detected on a downscaled copy
    max_upscale = 4.0  # small faces are looked for again on a copy upscaled up to this much (within max_detect_side)
    small_face = 24.0  # px (Face.size): under this, YuNet misses faces and misplaces landmarks at the photo's scale

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces, largest first, in the coordinates of ``image``. A small photo is also searched upscaled,
        which finds faces down to a few pixels between the eyes."""
        image = to_8bit(check_photo(image))
        long_side = max(image.shape[:2])
        faces = self._detect_scaled(image, min(1.0, self.max_detect_side / long_side))
        upscale = min(self.max_upscale, self.max_detect_side / long_side)
        if upscale >= 1.5:
            faces = self._merge(faces, self._detect_scaled(image, upscale))
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def _detect_scaled(self, image: np.ndarray, scale: float) -> list[Face]:
        """Detect on ``image`` resized by ``scale``; boxes and landmarks mapped back to ``image``."""
        if min(image.shape[:2]) * scale < MIN_SIDE:  # a strip too thin for a face at this scale
            return []
        if scale != 1:
            interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=interpolation)
        faces = self._detect(np.ascontiguousarray(image))
        for face in faces:  # pixel centres: x = (x' + 0.5) / scale - 0.5
            face.bbox = (face.bbox + 0.5) / scale - 0.5
            face.landmarks = (face.landmarks + 0.5) / scale - 0.5
        return faces

    def _merge(self, faces: list[Face], upscaled: list[Face]) -> list[Face]:
        """Faces of both passes, each once: of two boxes that overlap, the upscaled pass's when the face is small."""
        merged = list(faces)
        for face in upscaled:
            overlaps = [i for i, other in enumerate(merged) if box_iou(face.bbox, other.bbox) > 0.3]
            if not overlaps:
                merged.append(face)
            elif face.size < self.small_face:
                merged = [other for i, other in enumerate(merged) if i not in overlaps] + [face]
        return merged

    def main_face(self, image: np.ndarray, name: str) -> Face:
        """The largest face; ``name`` says which image had none."""
        faces = self.detect(image)
        if not faces:
            raise RefFaceError(f"no face found in {name}")
        return faces[0]

    def main_embeddings(self, images: list[np.ndarray], names: list[str]) -> np.ndarray:
        """Identity embedding of the main (largest) face of each image [len(images), embedding_dim]."""
        return np.stack(
            [self.embed(image, [self.main_face(image, name)])[0] for image, name in zip(images, names, strict=True)]
        )

    def embed(self, image: np.ndarray, faces: list[Face]) -> np.ndarray:
        """L2-normalised identity embeddings [len(faces), embedding_dim], one batched model call."""
        return self.embed_crops(self.identity_crops(image, faces))

    def identity_crops(self, image: np.ndarray, faces: list[Face]) -> np.ndarray:
        """The recogniser's aligned 112×112 RGB crops (insightface's norm_crop) [len(faces), 112, 112, 3]."""
        from insightface.utils.face_align import norm_crop

        crops = np.zeros((len(faces), 112, 112, 3), np.uint8)
        with warnings.catch_warnings():  # scikit-image deprecation inside insightface's norm_crop
            warnings.simplefilter("ignore", FutureWarning)
            for crop, face in zip(crops, faces, strict=True):
                crop[:] = norm_crop(image, face.landmarks, 112)
        return crops

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """L2-normalised identity embeddings of ``identity_crops`` [N, embedding_dim]."""
        if not len(crops):
            return np.zeros((0, self.embedding_dim), np.float32)
        features = self._embed(crops).astype(np.float32)
        return features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)

    @abstractmethod
    def _detect(self, image: np.ndarray) -> list[Face]: ...

    @abstractmethod
    def _embed(self, crops: np.ndarray) -> np.ndarray:
        """Raw features of aligned 112×112 RGB crops [N, 112, 112, 3]."""


class OpenCVZoo(FaceAnalysis):
    """YuNet detector (run by OpenCV, which handles its int8 graph) and SFace 128-d (run by onnxruntime)."""

    name = "OpenCV Zoo YuNet + SFace"
    embedding_dim = 128
    same_person_threshold = 0.363  # OpenCV's published cosine threshold for SFace

    def __init__(self, folder: Path) -> None:
        yunet, sface = folder / YUNET, folder / SFACE
        for path in (yunet, sface):
            if not path.is_file():
                raise RefFaceError(f"face model missing: {path}; {MODELS_HINT}")
        try:
            self.detector = cv2.FaceDetectorYN.create(str(yunet), "", (320, 320), 0.6, 0.3, 5000)
            self.recognizer = ort.InferenceSession(_prune_sface(sface), providers=onnx_providers())
        except Exception as e:  # OpenCV, onnx and onnxruntime each raise their own types for a bad file
            raise RefFaceError(f"cannot load the face models in {folder} (corrupt file?): {e}") from None

    def _detect(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        self.detector.setInputSize((w, h))
        _, rows = self.detector.detect(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if rows is None:
            return []
        faces = []
        for row in rows:
            x, y, bw, bh = row[:4]
            faces.append(Face(np.array([x, y, x + bw, y + bh]), row[4:14].reshape(5, 2).copy(), float(row[14])))
        return faces

    def _embed(self, crops: np.ndarray) -> np.ndarray:
        blob = crops.transpose(0, 3, 1, 2).astype(np.float32)  # RGB, 0..255, as OpenCV's FaceRecognizerSF feeds it
        return self.recognizer.run(None, {self.recognizer.get_inputs()[0].name: blob})[0]


def _prune_sface(path: Path) -> bytes:
    """SFace lists unused weights as graph inputs, which onnxruntime rejects; drop them and free the batch size."""
    import onnx

    model = onnx.load(str(path))
    weights = {init.name for init in model.graph.initializer}
    consumed = {name for node in model.graph.node for name in node.input}
    inputs = [i for i in model.graph.input if i.name not in weights and i.name in consumed]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return model.SerializeToString()


class InsightFacePack(FaceAnalysis):
    """A folder of insightface ONNX models; insightface's router picks the detector and the recogniser."""

    same_person_threshold = 0.3
    max_upscale = 1.0  # SCRFD resizes every photo to its 640 px input: an upscaled copy would come back the same

    def __init__(self, folder: Path) -> None:
        from insightface.model_zoo import get_model

        self.name = f"insightface pack {folder.name}"
        models = {}
        for path in sorted(folder.glob("*.onnx")):
            try:
                model = get_model(str(path), providers=onnx_providers())
            except Exception as e:  # a truncated or foreign file fails inside onnx/onnxruntime
                raise RefFaceError(f"cannot load {path} (corrupt or not an ONNX model?): {e}") from None
            if model is not None and model.taskname in ("detection", "recognition"):
                models.setdefault(model.taskname, model)
        missing = [task for task in ("detection", "recognition") if task not in models]
        if missing:
            raise RefFaceError(f"no insightface {' or '.join(missing)} model (.onnx) found in {folder}")
        self.detector, self.recognizer = models["detection"], models["recognition"]
        self.detector.prepare(0, input_size=(640, 640), det_thresh=0.5)
        self.recognizer.prepare(0)
        self.embedding_dim = int(self.recognizer.output_shape[-1])

    def _detect(self, image: np.ndarray) -> list[Face]:
        boxes, landmarks = self.detector.detect(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), max_num=0)
        return [Face(box[:4].copy(), kps.copy(), float(box[4])) for box, kps in zip(boxes, landmarks, strict=True)]

    def _embed(self, crops: np.ndarray) -> np.ndarray:
        return self.recognizer.get_feat([np.ascontiguousarray(crop[..., ::-1]) for crop in crops])  # it takes BGR


def default_face_models() -> Path:
    """$REFFACE_FACE_MODELS, else an insightface pack in ~/.insightface/models, else the bundled OpenCV Zoo models."""
    if folder := os.environ.get("REFFACE_FACE_MODELS"):
        return Path(folder)
    root = Path(os.environ.get("INSIGHTFACE_HOME", "~/.insightface")).expanduser() / "models"
    for pack in INSIGHTFACE_PACKS:
        if any((root / pack).glob("*.onnx")):
            return root / pack
    return BUNDLED_MODELS


@lru_cache(maxsize=4)
def load_face_analysis(folder: str | os.PathLike | None = None) -> FaceAnalysis:
    """The backend for a model folder (loaded once per folder); None picks the default."""
    path = Path(folder) if folder is not None else default_face_models()
    if not path.is_dir():
        raise RefFaceError(f"face model folder not found: {path}; {MODELS_HINT}")
    if (path / YUNET).exists() or (path / SFACE).exists():
        return OpenCVZoo(path)
    if not any(path.glob("*.onnx")):
        raise RefFaceError(f"no .onnx face models in {path}; {MODELS_HINT}")
    return InsightFacePack(path)
