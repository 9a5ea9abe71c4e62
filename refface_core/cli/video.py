"""`refface video`: one person's face restored through a video, consistent from frame to frame."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import RefFaceError, check_seeds
from .options import (
    add_colorize_option,
    add_face_models_option,
    add_model_option,
    add_sampling_options,
    sampling_options,
)

DEFAULT_SMOOTH = 9  # frames: about a third of a second at 25-30 fps


def add_to(commands: argparse._SubParsersAction) -> None:
    video = commands.add_parser("video", help="restore a person's face through a video, using reference photos")
    video.add_argument("input", type=Path, metavar="IN", help="the video (anything PyAV's FFmpeg reads)")
    video.add_argument(
        "--ref", required=True, action="append", type=Path, help="a good photo (or a folder) of the person; repeat"
    )
    video.add_argument("--out", required=True, type=Path, help="output video (.mp4, .mov, .mkv, .webm, .avi)")
    add_model_option(video)
    video.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    video.add_argument(
        "--smooth",
        type=int,
        default=DEFAULT_SMOOTH,
        help=f"smooth the landmarks over N frames (odd) so the face crop does not jitter: a quadratic fit from 5, "
        f"a moving mean at 3, 1 = off (default {DEFAULT_SMOOTH})",
    )
    video.add_argument("--batch-size", type=int, default=8, help="frames per UNet call (default 8)")
    video.add_argument(
        "--previous-frame",
        action="store_true",
        help="also guide each frame with the track's restored frame before it, as one more reference (slower: "
        "frames are restored one at a time)",
    )
    video.add_argument("--track", type=int, help="restore only this track (0 = longest; listed as the run starts)")
    video.add_argument("--all-tracks", action="store_true", help="restore every face track, not only the person's")
    add_colorize_option(video, "video")
    video.add_argument("--keep-refs", type=int, help="use only the best K references")
    video.add_argument("--ref-threshold", type=float, help="same-person similarity threshold (model default)")
    add_face_models_option(video)
    add_sampling_options(video)
    video.add_argument("--seed", type=int, default=2024, help="noise seed, the same for every frame (default 2024)")
    video.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..files import path_kind, write_atomic
    from ..video import check_paths, check_smooth, open_video

    check_seeds([args.seed])
    check_smooth(args.smooth)
    if args.batch_size < 1:
        raise RefFaceError(f"--batch-size must be at least 1, got {args.batch_size}")
    if path_kind(args.input) != "file":
        raise RefFaceError(f"video not found: {args.input}")
    check_paths(args.input, args.out, args.overwrite)
    open_video(args.input).close()  # not a video: say so before the model loads
    from ..sampling import make_branches, make_solver
    from .album import model_folder
    from .restore import image_files, load_model

    refs, _ = image_files(args.ref, "--ref")
    make_solver(args.solver, args.steps, args.spacing)  # bad sampling options fail now, not after the model loads
    make_branches(args.guidance, 1, args.scale, args.s_i, args.s_c, args.ref_slots)

    from ..album import model_id
    from ..faces import load_face_analysis, prepare_references
    from ..progress import Progress
    from ..video import report_path as video_report_path
    from ..video import restore_video, summary_lines

    progress = Progress()
    model, model_name = load_model(args, progress)
    if model.context_encoder is not None:
        raise RefFaceError("models with Composite Context are not supported by `refface video` yet")
    analysis = load_face_analysis(args.face_models)
    progress(f"preparing {len(refs)} reference(s)")
    names = [str(p) for p in refs]
    references = prepare_references(analysis, refs, model.image_size, names, args.keep_refs, args.ref_threshold)
    for line in references.lines:
        progress(line)
    context = model.encode_context(references.crops, references.embeddings)
    select = args.track if args.track is not None else ("all" if args.all_tracks else "matching")
    # The rest of the resume key (video, references by content, dtype, sampling) is made by restore_video.
    settings = {"model": model_id(model_folder(args)), "face_models": str(args.face_models)}
    result = restore_video(
        model, analysis, args.input, args.out, references.embeddings, context, settings, select, args.ref_threshold,
        args.smooth, args.seed, args.batch_size, not args.colorize, progress, progress.counter, args.previous_frame,
        **sampling_options(args),
    )  # fmt: skip
    report = {
        "input": str(args.input),
        "output": str(args.out),
        "references": references.names,
        "model": model_name,
        "seed": args.seed,
        "smooth": args.smooth,
        "previous_frame": args.previous_frame,
        "settings": sampling_options(args),
        **result.to_json(),
    }
    report_path = video_report_path(args.out)
    text = json.dumps(report, indent=2)
    write_atomic(report_path, lambda tmp: Path(tmp).write_text(text))
    for line in summary_lines(result.restored, result.measures, result.info.frames, result.seconds):
        progress(line)
    print(f"wrote {args.out} and {report_path}")
    return 0
