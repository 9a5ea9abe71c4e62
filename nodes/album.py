"""Albums: every face of a set of photos grouped into people, and each person's degraded faces restored with that
person's own best photos as references (refface_core.album, as `refface album`)."""

from __future__ import annotations

from typing import Any

import comfy.utils
import torch
from comfy_api.latest import io

from refface_core import RefFaceError
from refface_core.album import (
    AlbumSettings,
    aligned_crops,
    check_restorer,
    faceless_photos,
    find_album_faces,
    group_people,
    paste_faces,
    people_sheet,
    person_lines,
    sample_faces,
)
from refface_core.choices import ALBUM_KEEP_SHARP, ALBUM_MAX_REFERENCES
from refface_core.images import load_photo, to_8bit

from .references import folder_fingerprint, folder_photos
from .restore import sample_options, sampling_inputs
from .runtime import Offloadable, SamplingProgress, load_on_device, report, to_arrays, to_image
from .types import AlbumPhotos, AlbumType, RefFaceModel


class GroupPeople(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceGroupPeople",
            display_name="Group Faces into People (RefFace)",
            category="RefFace",
            description="Finds every face in a set of photos and groups the faces into people. Each person's "
            "largest, sharpest faces become that person's references; their degraded faces are to be restored.",
            inputs=[
                io.FaceAnalysis.Input("face_analysis", tooltip="From Load Face Analysis."),
                io.Image.Input("images", optional=True, tooltip="Photos of one size (a batch)."),
                io.String.Input(
                    "folder",
                    default="",
                    tooltip="Also every photo in this folder, a folder inside ComfyUI's input folder (any sizes).",
                ),
                io.Int.Input(
                    "max_refs", default=ALBUM_MAX_REFERENCES, min=1, max=16, tooltip="References per person, at most."
                ),
                io.Float.Input(
                    "keep_sharp",
                    default=ALBUM_KEEP_SHARP,
                    min=0.0,
                    max=100000.0,
                    step=1.0,
                    tooltip="Leave a face alone when its aligned crop is this sharp (Laplacian variance: sharp "
                    "photos measure about 100-400, degraded ones under 50).",
                ),
            ],
            outputs=[
                AlbumType.Output(display_name="album", tooltip="For Restore Album."),
                io.Image.Output(
                    display_name="people",
                    tooltip="A row per person: name, references, then the faces to restore; last, faces in no person.",
                ),
                io.String.Output(
                    display_name="report", tooltip="Each person's faces, references and faces to restore."
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str = "", **_: object) -> str:
        return folder_fingerprint(folder)

    @classmethod
    def execute(
        cls, face_analysis: Any, folder: str, max_refs: int, keep_sharp: float, images: torch.Tensor | None = None
    ) -> io.NodeOutput:
        photos = {f"image {i}": photo for i, photo in enumerate(to_arrays(images))} if images is not None else {}
        for path in folder_photos(folder, "album folder") if folder else []:
            try:
                photos[path.name] = to_8bit(load_photo(path).pixels)
            except RefFaceError as e:
                raise RefFaceError(f"album folder: {e}") from None
        if not photos:
            raise RefFaceError("no photos: connect images or set a folder")
        settings = AlbumSettings(max_refs=max_refs, keep_sharp=keep_sharp)
        settings.check()
        bar = comfy.utils.ProgressBar(len(photos))
        found = find_album_faces(face_analysis, photos, lambda done, total: bar.update_absolute(done, total))
        lines = [f"{len(found)} face(s) in {len(photos)} photo(s)", *faceless_photos(list(photos), found)]
        grouping = group_people(found, face_analysis.same_person_threshold, settings, log=lines.append)
        lines += person_lines(grouping)
        sheet = people_sheet(grouping, photos.__getitem__)
        album = AlbumPhotos(photos, grouping)
        return io.NodeOutput(album, to_image([sheet]), "\n".join(lines), ui=report(lines))


class RestoreAlbum(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceRestoreAlbum",
            display_name="Restore Album (RefFace)",
            category="RefFace",
            description="Restores each person's degraded faces with that person's own references, and pastes them "
            "back. Faces in no person, sharp ones and the references are left as they are.",
            inputs=[
                RefFaceModel.Input("model", tooltip="From Load RefFace Model (a ReF-LDM model)."),
                AlbumType.Input("album", tooltip="From Group Faces into People."),
                io.Boolean.Input(
                    "keep_tone", default=True, tooltip="Give restored faces the photo's tone (e.g. sepia or grey)."
                ),
                *sampling_inputs(),
            ],
            outputs=[
                io.Image.Output(
                    display_name="images",
                    is_output_list=True,
                    tooltip="Every photo in the album's order, restored faces pasted back (a list: sizes may differ).",
                ),
                io.String.Output(display_name="report", tooltip="Which faces of each photo were restored."),
            ],
        )

    @classmethod
    def execute(
        cls, model: Offloadable, album: AlbumPhotos, keep_tone: bool, seed: int, **options: Any
    ) -> io.NodeOutput:
        grouping = album.grouping
        todo = grouping.to_restore()
        (restorer,) = load_on_device(model)
        check_restorer(restorer)
        progress = SamplingProgress(restorer, len(todo), options["steps"])
        settings = AlbumSettings(seed=seed, tone=keep_tone, sample_options=sample_options(**options))
        settings.sample_options["callback"] = progress
        crop = aligned_crops(grouping.faces, album.photos.__getitem__, restorer.image_size)
        restored = dict(sample_faces(restorer, grouping, todo, crop, settings))  # none to restore: photos as they are
        images, lines = [], []
        for name, pixels in album.photos.items():
            targets = [f for f in grouping.faces.values() if f.photo == name and f.id in restored]
            images.append(
                to_image([paste_faces(pixels, targets, restored.__getitem__, settings) if targets else pixels])
            )
            lines.append(f"{name}: restored {len(targets)} face(s)" + "".join(f", {f.id}" for f in targets))
        return io.NodeOutput(images, "\n".join(lines), ui=report(lines))
