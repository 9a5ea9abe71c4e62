"""Reference faces and identity: load and check references, embed identities, compare faces with a person."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from refface_core import RefFaceError
from refface_core.faces import FaceAnalysis, check_threshold, find_faces, prepare_references
from refface_core.images import IMAGE_SUFFIXES

from .runtime import report, to_arrays, to_image
from .types import Identity, IdentityType

ALIGNED_SIZE = 512  # the FFHQ template's size; the restorer resizes to its own
MAX_REFERENCES = 16
THRESHOLD_TOOLTIP = "Same-person cosine similarity; -1 uses the face model's own (0.363 for SFace, 0.3 for ArcFace)."


def threshold_input() -> io.Float.Input:
    return io.Float.Input("threshold", default=-1.0, min=-1.0, max=1.0, step=0.01, tooltip=THRESHOLD_TOOLTIP)


def folder_photos(folder: str, what: str = "reference folder") -> list[Path]:
    """Photos in ``folder`` (``what`` in messages), a folder inside ComfyUI's input folder (as LoadImage, nothing
    outside it is read)."""
    inputs = Path(folder_paths.get_input_directory()).resolve()
    path = (inputs / folder).resolve()
    if not path.is_relative_to(inputs):
        raise RefFaceError(f"the {what} must be inside ComfyUI's input folder {inputs}, got {folder!r}")
    if not path.is_dir():
        raise RefFaceError(f"{what} not found: {path} (put the photos in a folder inside {inputs})")
    photos = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for photo in photos:  # as for the folder: a link may not lead out of the input folder
        target = photo.resolve()
        if not target.is_relative_to(inputs):
            raise RefFaceError(f"{photo.name} in the {what} links to {target}, outside ComfyUI's input "
                               f"folder {inputs}; copy the photo into the folder instead")  # fmt: skip
        if not target.is_file():
            raise RefFaceError(f"{photo.name} in the {what} {path} is not a file (a broken link?)")
    if not photos:
        raise RefFaceError(f"no photos ({', '.join(IMAGE_SUFFIXES)}) in the {what} {path}")
    return photos


def folder_fingerprint(folder: str) -> str:
    """Changes when the folder's photos change, so that ComfyUI (which caches on inputs) runs the node again."""
    try:
        return "|".join(f"{p.name}:{p.stat().st_mtime_ns}" for p in folder_photos(folder)) if folder else ""
    except (RefFaceError, OSError):  # execute will say what is wrong
        return ""


def slot_number(name: str) -> int:
    """Where an Autogrow input ``reference<N>`` goes in the order."""
    number = name.removeprefix("reference")
    if not number.isdigit():
        raise RefFaceError(f"unexpected reference input {name!r}: the inputs are named reference0, reference1, ...")
    return int(number)


def same_person_threshold(analysis: FaceAnalysis, threshold: float) -> float:
    """The node's threshold, -1 meaning the face model's own."""
    check_threshold(threshold)
    return analysis.same_person_threshold if threshold < 0 else threshold


def identity_of(identity: Identity, analysis: FaceAnalysis) -> np.ndarray:
    if identity.face_model != analysis.name:
        raise RefFaceError(
            f"the identity was made with {identity.face_model} but the face analysis is {analysis.name}; "
            "embeddings of different face models cannot be compared"
        )
    return identity.embeddings


class LoadReferenceFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceLoadReferences",
            display_name="Load Reference Faces",
            category="RefFace",
            description="Good photos of the person: the largest face of each is aligned, checked against the others "
            "and ranked. A reference that is probably another person is flagged in the report and left out.",
            inputs=[
                io.FaceAnalysis.Input("face_analysis", tooltip="From Load Face Analysis."),
                io.Autogrow.Input(
                    "references",
                    template=io.Autogrow.TemplatePrefix(
                        io.Image.Input("reference", tooltip="A photo of the person (a batch counts as several)."),
                        prefix="reference",
                        min=0,
                        max=MAX_REFERENCES,
                    ),
                    tooltip="Photos of the person; a new input appears as you connect one.",
                ),
                io.String.Input(
                    "folder",
                    default="",
                    tooltip="Also use every photo in this folder, a folder inside ComfyUI's input folder.",
                ),
                io.Int.Input("keep", default=0, min=0, max=64, tooltip="Use only the best K references (0 = all)."),
                threshold_input(),
            ],
            outputs=[
                io.Image.Output(display_name="references", tooltip="Aligned 512×512 crops, best first."),
                IdentityType.Output(display_name="identity", tooltip="Their identity embeddings."),
                io.String.Output(display_name="report", tooltip="Per reference: score, agreement, size, sharpness."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str = "", **_: object) -> str:
        return folder_fingerprint(folder)

    @classmethod
    def execute(
        cls,
        face_analysis: FaceAnalysis,
        folder: str,
        keep: int,
        threshold: float,
        references: dict[str, torch.Tensor | None] | None = None,
    ) -> io.NodeOutput:
        photos, names = [], []
        for slot in sorted(references or {}, key=slot_number):
            if references[slot] is not None:
                batch = to_arrays(references[slot])
                photos += batch
                names += [slot if len(batch) == 1 else f"{slot}[{i}]" for i in range(len(batch))]
        for path in folder_photos(folder) if folder else []:
            photos.append(path)  # read by prepare_references, which skips an unreadable one with a report line
            names.append(os.path.basename(path))
        if not photos:
            raise RefFaceError("no reference photos: connect at least one image or set a folder")
        threshold = same_person_threshold(face_analysis, threshold)
        refs = prepare_references(face_analysis, photos, ALIGNED_SIZE, names, keep or None, threshold)
        return io.NodeOutput(
            to_image(refs.crops), Identity(refs.embeddings, face_analysis.name), "\n".join(refs.lines),
            ui=report(refs.lines),
        )  # fmt: skip


class IdentityEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceIdentityEmbedding",
            display_name="Identity Embedding (RefFace)",
            category="RefFace",
            description="The identity embedding of the largest face in each image, e.g. ArcFace for Composite Context.",
            inputs=[
                io.FaceAnalysis.Input("face_analysis", tooltip="From Load Face Analysis; its recogniser embeds."),
                io.Image.Input("image", tooltip="Photos or aligned crops of the person, one face each."),
            ],
            outputs=[IdentityType.Output(display_name="identity")],
        )

    @classmethod
    def execute(cls, face_analysis: FaceAnalysis, image: torch.Tensor) -> io.NodeOutput:
        arrays = to_arrays(image)
        embeddings = face_analysis.main_embeddings(arrays, [f"image {i}" for i in range(len(arrays))])
        return io.NodeOutput(Identity(embeddings, face_analysis.name))


class IdentitySimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceIdentitySimilarity",
            display_name="Identity Similarity (RefFace)",
            category="RefFace",
            description="How much each face in the image looks like the person: cosine similarity of identity "
            "embeddings (1 = same embedding; above the threshold = same person).",
            inputs=[
                io.FaceAnalysis.Input("face_analysis", tooltip="The face analysis that made the identity."),
                io.Image.Input("image", tooltip="Restored (or any) photos or face crops."),
                IdentityType.Input("identity", tooltip="The person, e.g. from Load Reference Faces."),
                threshold_input(),
            ],
            outputs=[
                io.Float.Output(display_name="similarity", tooltip="The best match in the first image."),
                io.String.Output(display_name="report", tooltip="Every face of every image."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, face_analysis: FaceAnalysis, image: torch.Tensor, identity: Identity, threshold: float
    ) -> io.NodeOutput:
        person = identity_of(identity, face_analysis)
        threshold = same_person_threshold(face_analysis, threshold)
        lines, best, others = [], [], []
        for i, photo in enumerate(to_arrays(image)):
            similarity = find_faces(face_analysis, photo, person).similarity
            best.append(float(similarity.max()) if len(similarity) else 0.0)
            verdicts = [
                f"face {k}: {s:.3f} ({'same' if s >= threshold else 'other'})" for k, s in enumerate(similarity)
            ]
            lines.append(f"image {i}: " + (", ".join(verdicts) or "no face found"))
            others.append(best[-1] < threshold)  # marked: no face of this image is the person
        lines.append(f"threshold {threshold:.3f} ({face_analysis.name})")
        return io.NodeOutput(best[0], "\n".join(lines), ui=report(lines, [*others, False]))
