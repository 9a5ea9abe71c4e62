"""Loaders: the restorer from models/refface/, face analysis, and the FaRL encoder."""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io

from refface_core import RefFaceRestorer
from refface_core.context.farl import load_farl
from refface_core.faces import BUNDLED_MODELS, load_face_analysis
from refface_core.weights import LICENCE, MODEL_NAME

from .runtime import DTYPES, INSIGHTFACE, Offloadable, available, found, model_dtype, model_path, restorer_path
from .types import FaRLModel, RefFaceModel

OPENCV_ZOO = "opencv_zoo (offline YuNet + SFace)"


def dtype_input() -> io.Combo.Input:
    return io.Combo.Input(
        "dtype",
        options=["auto", *DTYPES],
        default="auto",
        tooltip="Weights' precision; auto follows ComfyUI's choice for the device (bf16 or fp16 on GPUs, else fp32).",
    )


class LoadRestorer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceLoadModel",
            display_name="Load RefFace Model",
            category="RefFace/loaders",
            description="A RefFace restorer (ReF-LDM weights, optionally with Composite Context) from models/refface/.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=available("refface"),
                    tooltip=f"A model folder in models/refface/ (config.json + model.safetensors). {MODEL_NAME} is "
                    "ReF-LDM's model: on first use it is downloaded (refldm.ckpt and vqgan.ckpt) and converted into "
                    f"models/refface/{MODEL_NAME}. {LICENCE}",
                ),
                dtype_input(),
                io.Boolean.Input(
                    "compile",
                    default=False,
                    optional=True,
                    tooltip="torch.compile the UNet: faster steps after a first restore that compiles (minutes); "
                    "kept while ComfyUI runs",
                ),
            ],
            outputs=[RefFaceModel.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str) -> bool | str:
        return model_name == MODEL_NAME or found("refface", model_name)

    @classmethod
    def execute(cls, model_name: str, dtype: str, compile: bool = False) -> io.NodeOutput:
        path = restorer_path(model_name)
        restorer = RefFaceRestorer.from_pretrained(path, device=mm.unet_offload_device(), dtype=model_dtype(dtype))
        restorer.set_compile(compile)
        return io.NodeOutput(Offloadable(restorer))


class LoadFaceAnalysis(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceLoadFaceAnalysis",
            display_name="Load Face Analysis (RefFace)",
            category="RefFace/loaders",
            description="Face detection with 5 landmarks and identity embeddings (onnxruntime).",
            inputs=[
                io.Combo.Input(
                    "models",
                    options=[OPENCV_ZOO, *available(INSIGHTFACE)],
                    default=OPENCV_ZOO,
                    tooltip="An insightface pack from models/insightface/models/<name>/ (antelopev2 or buffalo_l "
                    "give the ArcFace identity that Composite Context models need; non-commercial licence), or the "
                    "OpenCV Zoo models that RefFace bundles (YuNet + SFace, MIT and Apache-2.0, offline).",
                ),
            ],
            outputs=[io.FaceAnalysis.Output(display_name="face_analysis")],
        )

    @classmethod
    def validate_inputs(cls, models: str) -> bool | str:
        return models == OPENCV_ZOO or found(INSIGHTFACE, models)

    @classmethod
    def execute(cls, models: str) -> io.NodeOutput:
        folder = BUNDLED_MODELS if models == OPENCV_ZOO else model_path(INSIGHTFACE, models)
        return io.NodeOutput(load_face_analysis(folder))


class LoadFaRL(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceLoadFaRL",
            display_name="Load FaRL Encoder (RefFace)",
            category="RefFace/loaders",
            description="FaRL ViT-B/16: the appearance half of Composite Context (models with Composite Context only).",
            inputs=[
                io.Combo.Input(
                    "farl_name",
                    options=available("farl"),
                    tooltip="A FaRL checkpoint in models/farl/, e.g. FaRL-Base-Patch16-LAIONFace20M-ep64.pth.",
                ),
                dtype_input(),
            ],
            outputs=[FaRLModel.Output(display_name="farl")],
        )

    @classmethod
    def validate_inputs(cls, farl_name: str) -> bool | str:
        return found("farl", farl_name)

    @classmethod
    def execute(cls, farl_name: str, dtype: str) -> io.NodeOutput:
        farl = load_farl(model_path("farl", farl_name), device=mm.unet_offload_device(), dtype=model_dtype(dtype))
        return io.NodeOutput(Offloadable(farl))
