"""ComfyUI V3 nodes for RefFace: thin wrappers over refface_core (no model math here)."""

from comfy_api.latest import ComfyExtension, io

from .album import GroupPeople, RestoreAlbum
from .context import BuildCompositeContext
from .examples import install_examples
from .loaders import LoadFaceAnalysis, LoadFaRL, LoadRestorer
from .references import IdentityEmbedding, IdentitySimilarity, LoadReferenceFaces
from .restore import CropFaces, PasteFaces, RefFaceRestore, RestorePhoto
from .runtime import register_model_folders
from .video import RestoreVideo

NODES: list[type[io.ComfyNode]] = [
    LoadRestorer,
    LoadFaceAnalysis,
    LoadFaRL,
    LoadReferenceFaces,
    IdentityEmbedding,
    BuildCompositeContext,
    CropFaces,
    RefFaceRestore,
    PasteFaces,
    RestorePhoto,
    IdentitySimilarity,
    GroupPeople,
    RestoreAlbum,
    RestoreVideo,
]


class RefFaceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> RefFaceExtension:
    register_model_folders()
    install_examples()
    return RefFaceExtension()
