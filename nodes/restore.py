"""Restoration: the sampler on aligned faces, face crop and paste-back, and a whole-photo convenience node."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import comfy.model_management as mm
import numpy as np
import torch
from comfy_api.latest import io

from refface_core import RefFaceError
from refface_core.choices import GUIDANCES, MAX_REF_SLOTS, MAX_SEED, SOLVERS, SPACINGS
from refface_core.faces import (
    SELECT_MODES,
    Face,
    FaceAnalysis,
    PhotoFaces,
    Wording,
    align_face,
    choose_faces,
    find_faces,
    paste_back,
    paste_mask,
)
from refface_core.model import CompositeContext
from refface_core.pipeline import restore_faces

from .references import ALIGNED_SIZE, identity_of, same_person_threshold, threshold_input
from .runtime import Offloadable, SamplingProgress, load_on_device, report, to_arrays, to_image
from .types import ContextType, FaceCrops, FaceCropsType, Identity, IdentityType, RefFaceModel

NODE_WORDING = Wording(  # the core's face-choice messages, in the nodes' terms
    choose_face="select: largest, for the biggest face",
    all_faces="select: all",
    aligned="RefFace Restore, which takes aligned crops",
)
SELECT_TOOLTIP = (
    "matching: the faces that look like the person (needs identity); largest: the biggest face; all: every face."
)


def sampling_inputs() -> list[io.Input]:
    return [
        io.Int.Input(
            "seed",
            default=2024,
            min=0,
            max=MAX_SEED,
            control_after_generate=True,
            tooltip="Noise seed (ReF-LDM: 2024).",
        ),
        io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Sampling steps."),
        io.Combo.Input(
            "solver", options=list(SOLVERS), default="ddim", tooltip="ddim (ReF-LDM's) or DPM-Solver++(2M)."
        ),
        io.Combo.Input(
            "guidance",
            options=list(GUIDANCES),
            default="refldm",
            tooltip="refldm: guidance on all references together; multi_reference: the paper's N-reference guidance "
            "(one branch per reference, averaged).",
        ),
        io.Float.Input("scale", default=1.5, min=0.0, max=10.0, step=0.05, tooltip="refldm guidance scale."),
        io.Float.Input("s_i", default=1.2, min=0.0, max=10.0, step=0.05, tooltip="multi_reference: LQ-image scale."),
        io.Float.Input("s_c", default=1.2, min=0.0, max=10.0, step=0.05, tooltip="multi_reference: reference scale."),
        io.Float.Input(
            "context_scale",
            default=1.0,
            min=0.0,
            max=4.0,
            step=0.05,
            tooltip="Composite Context strength (models with Composite Context; 0 = off).",
        ),
        io.Combo.Input(
            "spacing",
            options=list(SPACINGS),
            default="uniform_trailing",
            advanced=True,
            tooltip="Timestep spacing (ReF-LDM's names).",
        ),
        io.Int.Input(
            "ref_slots",
            default=0,
            min=0,
            max=MAX_REF_SLOTS,
            advanced=True,
            tooltip="Repeat references to fill this many slots per branch (0 = as many as there are references).",
        ),
    ]


def sample_options(steps: int, ref_slots: int, **options: Any) -> dict[str, Any]:
    return {"steps": steps, "ref_slots": ref_slots or None, **options}


class RefFaceRestore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceRestore",
            display_name="RefFace Restore",
            category="RefFace",
            description="Restores aligned face crops (e.g. from Crop Faces) so that they look like the person.",
            inputs=[
                RefFaceModel.Input("model", tooltip="From Load RefFace Model."),
                ContextType.Input("context", tooltip="The person, from Build Composite Context."),
                io.Image.Input("faces", tooltip="Aligned, square low-quality face crops."),
                *sampling_inputs(),
            ],
            outputs=[io.Image.Output(display_name="faces", tooltip="Restored crops at the model's size.")],
        )

    @classmethod
    def execute(
        cls, model: Offloadable, context: CompositeContext, faces: torch.Tensor, seed: int, **options: Any
    ) -> io.NodeOutput:
        (restorer,) = load_on_device(model)
        crops = to_arrays(faces)
        progress = SamplingProgress(restorer, len(crops), options["steps"])
        restored = restorer.restore_batch(
            crops, context, [seed] * len(crops), callback=progress, **sample_options(**options)
        )
        return io.NodeOutput(to_image(restored))


class CropFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceCropFaces",
            display_name="Crop Faces (RefFace)",
            category="RefFace",
            description="Finds faces and warps each to an FFHQ-aligned square crop, for RefFace Restore.",
            inputs=[
                io.FaceAnalysis.Input("face_analysis", tooltip="From Load Face Analysis."),
                io.Image.Input("image", tooltip="Photos (a batch is cropped image by image)."),
                io.Combo.Input("select", options=list(SELECT_MODES), default="matching", tooltip=SELECT_TOOLTIP),
                IdentityType.Input("identity", optional=True, tooltip="The person, for select = matching."),
                threshold_input(),
                io.Int.Input("size", default=ALIGNED_SIZE, min=64, max=2048, step=8, tooltip="Crop size in pixels."),
            ],
            outputs=[
                io.Image.Output(display_name="faces", tooltip="Aligned crops, largest face first."),
                FaceCropsType.Output(display_name="crops", tooltip="Where each crop came from, for Paste Faces."),
                io.BoundingBox.Output(display_name="bboxes", tooltip="The chosen faces' boxes, per image."),
            ],
        )

    @classmethod
    def execute(
        cls,
        face_analysis: FaceAnalysis,
        image: torch.Tensor,
        select: str,
        threshold: float,
        size: int,
        identity: Identity | None = None,
    ) -> io.NodeOutput:
        crops, affines, sources, boxes, lines = [], [], [], [], []
        photos = to_arrays(image)
        for i, photo in enumerate(photos):
            found, targets = choose(face_analysis, photo, identity, select, threshold, report_for(lines, i))
            similarity = found.similarity
            boxes.append([box(found.faces[k], None if similarity is None else similarity[k]) for k in targets])
            for k in targets:
                crop, affine = align_face(photo, found.faces[k].landmarks, size)
                crops.append(crop)
                affines.append(affine)
                sources.append(i)
        if not crops:
            why = "\n".join(lines)
            raise RefFaceError(f"no face to crop in any of the {len(boxes)} images (select: {select}):\n{why}")
        sizes = [p.shape[:2] for p in photos]
        return io.NodeOutput(to_image(crops), FaceCrops(affines, sources, size, sizes), boxes, ui=report(lines))


def report_for(lines: list[str], image: int) -> Callable[[str], None]:
    """Collects a photo's report lines, named by its place in the batch."""
    return lambda line: lines.append(f"image {image}: {line}")


def choose(
    analysis: FaceAnalysis,
    photo: np.ndarray,
    identity: Identity | None,
    select: str,
    threshold: float,
    log: Callable[[str], None],
) -> tuple[PhotoFaces, list[int]]:
    """The photo's faces and the chosen ones (none, with a log line, where no face is found or matches)."""
    found = find_faces(analysis, photo, None if identity is None else identity_of(identity, analysis))
    try:
        return found, choose_faces(found, select, same_person_threshold(analysis, threshold), log, NODE_WORDING)
    except RefFaceError as e:
        log(str(e))
        return found, []


def box(face: Face, similarity: float | None) -> dict[str, float | str]:
    x1, y1, x2, y2 = (float(v) for v in face.bbox)
    label = "face" if similarity is None else f"face {similarity:.2f}"
    return {"x": x1, "y": y1, "width": x2 - x1, "height": y2 - y1, "label": label, "score": float(face.score)}


class PasteFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFacePasteFaces",
            display_name="Paste Faces Back (RefFace)",
            category="RefFace",
            description="Blends restored crops back into the photos they were cropped from, with a feathered mask.",
            inputs=[
                io.Image.Input("image", tooltip="The photos given to Crop Faces."),
                io.Image.Input("faces", tooltip="Restored crops, in Crop Faces' order (any size)."),
                FaceCropsType.Input("crops", tooltip="From Crop Faces."),
            ],
            outputs=[
                io.Image.Output(display_name="image"),
                io.Mask.Output(display_name="mask", tooltip="Where faces were pasted (feathered)."),
            ],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, faces: torch.Tensor, crops: FaceCrops) -> io.NodeOutput:
        photos, restored = to_arrays(image), to_arrays(faces)
        if len(restored) != len(crops.affines):
            raise RefFaceError(f"{len(restored)} faces to paste, but Crop Faces made {len(crops.affines)} crops")
        if [p.shape[:2] for p in photos] != crops.photo_sizes:
            sizes = ", ".join(f"{w}×{h}" for h, w in crops.photo_sizes)
            got = ", ".join(f"{p.shape[1]}×{p.shape[0]}" for p in photos)
            raise RefFaceError(f"the crops came from photos of {sizes}, but the image given is {got}: give Paste "
                               "Faces Back the image that Crop Faces cropped")  # fmt: skip
        masks = [np.zeros(p.shape[:2], np.float32) for p in photos]
        for face, affine, i in zip(restored, crops.affines, crops.image_index, strict=True):
            photos[i] = paste_back(photos[i], face, affine, crops.size)
            masks[i] = np.maximum(masks[i], paste_mask(affine, crops.size, photos[i].shape))
        return io.NodeOutput(to_image(photos), torch.from_numpy(np.stack(masks)).to(mm.intermediate_device()))


class RestorePhoto(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceRestorePhoto",
            display_name="Restore Faces in Photo (RefFace)",
            category="RefFace",
            description="Crop Faces, RefFace Restore and Paste Faces Back in one node: restores the person's faces "
            "in whole photos, group photos included.",
            inputs=[
                RefFaceModel.Input("model", tooltip="From Load RefFace Model."),
                ContextType.Input("context", tooltip="The person, from Build Composite Context."),
                io.FaceAnalysis.Input("face_analysis", tooltip="From Load Face Analysis."),
                io.Image.Input("image", tooltip="Photos (a batch is restored image by image)."),
                io.Combo.Input("select", options=list(SELECT_MODES), default="matching", tooltip=SELECT_TOOLTIP),
                IdentityType.Input("identity", optional=True, tooltip="The person, for select = matching."),
                threshold_input(),
                *sampling_inputs(),
            ],
            outputs=[
                io.Image.Output(display_name="image"),
                io.String.Output(display_name="report", tooltip="Which faces were restored, and why not others."),
            ],
        )

    @classmethod
    def execute(
        cls,
        model: Offloadable,
        context: CompositeContext,
        face_analysis: FaceAnalysis,
        image: torch.Tensor,
        select: str,
        threshold: float,
        seed: int,
        identity: Identity | None = None,
        **options: Any,
    ) -> io.NodeOutput:
        lines: list[str] = []
        plans = []
        for i, photo in enumerate(to_arrays(image)):
            say = report_for(lines, i)
            found, targets = choose(face_analysis, photo, identity, select, threshold, say)
            say(f"{len(found.faces)} face(s), restoring {len(targets)}")
            plans.append((photo, found.faces, targets, say))
        if not any(plan[2] for plan in plans):
            raise RefFaceError("no face restored:\n" + "\n".join(lines))
        (restorer,) = load_on_device(model)
        progress = SamplingProgress(restorer, sum(len(plan[2]) for plan in plans), options["steps"])
        restored = [
            restore_faces(
                restorer, photo, faces, targets, context, upscale=1, tone=False, seeds=(seed,), log=say,
                callback=progress, **sample_options(**options),
            ).images[0]
            for photo, faces, targets, say in plans
        ]  # fmt: skip
        return io.NodeOutput(to_image(restored), "\n".join(lines), ui=report(lines))
