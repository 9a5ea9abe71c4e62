from ..checkpoints import load_checkpoint
from .convert import convert_refldm
from .device import DTYPES, pick_device
from .restorer import CompositeContext, RefFaceRestorer
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
    "pick_device",
    "refldm_unet_config",
    "refldm_vq_config",
]
