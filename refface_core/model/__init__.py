from ..checkpoints import load_checkpoint
from .convert import convert_refldm
from .restorer import DTYPES, CompositeContext, RefFaceRestorer
from .unet import CacheKV, KVRecorder, refldm_unet_config
from .vq import refldm_vq_config

__all__ = [
    "DTYPES",
    "CacheKV",
    "CompositeContext",
    "KVRecorder",
    "RefFaceRestorer",
    "convert_refldm",
    "load_checkpoint",
    "refldm_unet_config",
    "refldm_vq_config",
]
