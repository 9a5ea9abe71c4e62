"""The values that travel between RefFace nodes; core types (IMAGE, MASK, BOUNDING_BOX, FACE_ANALYSIS) elsewhere."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from comfy_api.latest import io

from refface_core.album import Grouping

RefFaceModel = io.Custom("REFFACE_MODEL")  # runtime.Offloadable around a RefFaceRestorer
FaRLModel = io.Custom("REFFACE_FARL")  # runtime.Offloadable around a FaRLEncoder
IdentityType = io.Custom("REFFACE_IDENTITY")  # Identity
ContextType = io.Custom("REFFACE_CONTEXT")  # refface_core CompositeContext: one person, prepared once
FaceCropsType = io.Custom("REFFACE_FACE_CROPS")  # FaceCrops


@dataclass(frozen=True)
class Identity:
    embeddings: np.ndarray  # [N, dim], L2-normalised
    face_model: str  # the FaceAnalysis that made them: similarities only compare embeddings of one model


@dataclass(frozen=True)
class FaceCrops:
    """Where each aligned crop came from, for pasting restored crops back."""

    affines: list[np.ndarray]  # photo -> crop
    image_index: list[int]  # which image of the batch
    size: int  # the crop size the affines were made for
    photo_sizes: list[tuple[int, int]]  # (height, width) of each image of the batch


AlbumType = io.Custom("REFFACE_ALBUM")  # AlbumPhotos


@dataclass(frozen=True)
class AlbumPhotos:
    """Photos by name, in order, and their faces grouped into people."""

    photos: dict[str, np.ndarray]  # RGB uint8
    grouping: Grouping
