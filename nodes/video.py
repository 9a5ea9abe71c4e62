"""Video: the person's face restored through a video's frames (an IMAGE batch from the usual video loaders) with
temporal consistency (refface_core.video, as `refface video`)."""

from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from refface_core.faces import SELECT_MODES, FaceAnalysis, Wording
from refface_core.model import CompositeContext
from refface_core.video import check_previous_frame, check_smooth, plan_tracks, restore_planned_frames, summary_lines

from .references import identity_of, same_person_threshold, threshold_input
from .restore import NODE_WORDING, sample_options, sampling_inputs
from .runtime import Offloadable, SamplingProgress, load_on_device, report, to_arrays, to_image
from .types import ContextType, Identity, IdentityType, RefFaceModel

TRACK_WORDING = Wording("select: largest, for the biggest face's track", "select: all", NODE_WORDING.aligned)


class RestoreVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefFaceRestoreVideo",
            display_name="Restore Face in Video Frames (RefFace)",
            category="RefFace",
            description="Restores the person's face through a video's frames (e.g. from Get Video Components): "
            "faces are tracked across frames, their alignment smoothed over time, and every frame of a track starts "
            "from the same noise, so the face does not jitter or flicker. The report measures both.",
            inputs=[
                RefFaceModel.Input("model", tooltip="From Load RefFace Model."),
                ContextType.Input("context", tooltip="The person, from Build Composite Context."),
                io.FaceAnalysis.Input("face_analysis", tooltip="From Load Face Analysis."),
                io.Image.Input("frames", tooltip="The video's frames, in order (an IMAGE batch)."),
                io.Combo.Input(
                    "select",
                    options=list(SELECT_MODES),
                    default="matching",
                    tooltip="matching: the tracks of faces that look like the person (needs identity); largest: the "
                    "biggest face's track; all: every track.",
                ),
                IdentityType.Input("identity", optional=True, tooltip="The person, for select = matching."),
                threshold_input(),
                io.Int.Input(
                    "smooth",
                    default=9,
                    min=1,
                    max=61,
                    step=2,
                    tooltip="Frames over which the face's landmarks are smoothed, so the crop does not jitter (1 = "
                    "off).",
                ),
                io.Boolean.Input(
                    "keep_tone", default=True, tooltip="Give the restored face the frame's tone (e.g. black and white)."
                ),
                io.Int.Input("batch_size", default=8, min=1, max=64, advanced=True, tooltip="Frames per sampler run."),
                io.Boolean.Input(
                    "previous_frame",
                    default=False,
                    advanced=True,
                    tooltip="Also guide each frame with the restored frame before it, as one more reference (slower: "
                    "frames are restored one at a time).",
                ),
                *sampling_inputs(),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="Every frame, the person's face restored."),
                io.String.Output(display_name="report", tooltip="Tracks found; flicker and identity of the result."),
            ],
        )

    @classmethod
    def execute(
        cls,
        model: Offloadable,
        context: CompositeContext,
        face_analysis: FaceAnalysis,
        frames: torch.Tensor,
        select: str,
        threshold: float,
        smooth: int,
        keep_tone: bool,
        batch_size: int,
        previous_frame: bool,
        seed: int,
        identity: Identity | None = None,
        **options: Any,
    ) -> io.NodeOutput:
        check_smooth(smooth, "smooth")
        if previous_frame:
            check_previous_frame(context)
        images = to_arrays(frames)
        person = None if identity is None else identity_of(identity, face_analysis)
        lines: list[str] = []
        plan, _ = plan_tracks(face_analysis, images, len(images), person, select,
                              same_person_threshold(face_analysis, threshold), smooth, lines.append,
                              wording=TRACK_WORDING)  # fmt: skip
        (restorer,) = load_on_device(model)
        progress = SamplingProgress(restorer, sum(map(len, plan.values())), options["steps"])
        restored, measures = restore_planned_frames(
            restorer, face_analysis, images, plan, person, context, seed, batch_size, keep_tone,
            previous_frame=previous_frame, callback=progress, **sample_options(**options),
        )  # fmt: skip
        lines += summary_lines(list(plan), measures, len(images))
        return io.NodeOutput(to_image(restored), "\n".join(lines), ui=report(lines))
