"""Faces: detection with 5 landmarks, FFHQ alignment and paste-back, identity embeddings, reference checks."""

from .align import FFHQ_TEMPLATE_512, align_face, alignment_transform, paste_back, paste_mask
from .analysis import Face, FaceAnalysis, InsightFacePack, OpenCVZoo, load_face_analysis, opencv_zoo_models

__all__ = [
    "FFHQ_TEMPLATE_512",
    "Face",
    "FaceAnalysis",
    "InsightFacePack",
    "OpenCVZoo",
    "align_face",
    "alignment_transform",
    "load_face_analysis",
    "opencv_zoo_models",
    "paste_back",
    "paste_mask",
]
