"""Faces: detection with 5 landmarks, FFHQ alignment and paste-back, identity, reference checks, the photo's tone."""

from .align import FFHQ_TEMPLATE_512, align_face, alignment_transform, paste_back, paste_mask, scale_affine
from .analysis import BUNDLED_MODELS, Face, FaceAnalysis, InsightFacePack, OpenCVZoo, load_face_analysis
from .matching import SELECT_MODES, PhotoFaces, Wording, choose_faces, face_similarity, find_faces
from .references import References, check_threshold, is_warning, prepare_references

__all__ = [
    "BUNDLED_MODELS",
    "FFHQ_TEMPLATE_512",
    "SELECT_MODES",
    "Face",
    "FaceAnalysis",
    "InsightFacePack",
    "OpenCVZoo",
    "PhotoFaces",
    "References",
    "Wording",
    "align_face",
    "alignment_transform",
    "check_threshold",
    "choose_faces",
    "face_similarity",
    "find_faces",
    "is_warning",
    "load_face_analysis",
    "paste_back",
    "paste_mask",
    "prepare_references",
    "scale_affine",
]
