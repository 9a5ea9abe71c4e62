"""`refface album`: every person in a folder of photos, each restored with their own best photos as references."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from ..choices import ALBUM_KEEP_SHARP, ALBUM_MAX_REFERENCES
from .options import (
    add_colorize_option,
    add_face_models_option,
    add_model_option,
    add_sampling_options,
    process_state,
    sampling_options,
)


def add_to(commands: argparse._SubParsersAction) -> None:
    album = commands.add_parser(
        "album",
        help="group the faces of a photo folder into people and restore each with that person's best photos",
        description="Group the faces of a photo folder into people and restore each person's degraded faces with "
        "that person's best photos as references. Rerun the same command to resume, or after editing people.json. "
        "Under `accelerate launch -m refface_core album ...` the faces are grouped once and the restoring is shared "
        "between the processes.",
    )
    album.add_argument("photos", type=Path, metavar="PHOTOS_DIR", help="folder of photos (not searched recursively)")
    album.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder: restored photos (never over a file the album did not write), people.json (edit it "
        "and rerun) and album.html",
    )
    add_model_option(album)
    album.add_argument(
        "--max-refs",
        type=int,
        default=ALBUM_MAX_REFERENCES,
        help=f"references per person, chosen automatically ({ALBUM_MAX_REFERENCES})",
    )
    album.add_argument(
        "--keep-sharp",
        type=float,
        default=ALBUM_KEEP_SHARP,
        metavar="THRESHOLD",
        help=f"leave a face alone when its 512 px aligned crop is this sharp (Laplacian variance; default "
        f"{ALBUM_KEEP_SHARP:g}: sharp photos measure about 100-400, degraded ones under 50)",
    )
    album.add_argument(
        "--upscale",
        type=float,
        default=1.0,
        help="output size over the photo's (default 1; 0: restore's automatic factor, up to 4, per photo)",
    )
    add_colorize_option(album)
    album.add_argument("--batch-size", type=int, default=8, help="faces per sampler run (default 8)")
    add_face_models_option(album)
    add_sampling_options(album)
    album.add_argument("--seed", type=int, default=2024, help="noise seed (default 2024, as ReF-LDM)")
    album.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..album import (
        PEOPLE_JSON,
        AlbumSettings,
        build_album,
        check_out,
        check_restorer,
        model_id,
        person_lines,
        photo_files,
    )
    from ..errors import RefFaceError
    from ..faces import load_face_analysis
    from ..files import check_writable_folder
    from ..pipeline import check_upscale
    from ..progress import Progress
    from ..sampling import make_branches, make_solver
    from .restore import load_model

    settings = AlbumSettings(
        max_refs=args.max_refs,
        keep_sharp=args.keep_sharp,
        seed=args.seed,
        upscale=args.upscale or None,
        tone=not args.colorize,
        batch_size=args.batch_size,
        sample_options=sampling_options(args),
    )
    settings.check()  # every quick check before the model loads
    if args.upscale:
        check_upscale((1, 1), args.upscale)
    if args.batch_size < 1:
        raise RefFaceError(f"--batch-size must be at least 1, got {args.batch_size}")
    photo_files(args.photos)
    check_out(args.photos, args.out)
    check_writable_folder(args.out)
    make_solver(args.solver, args.steps, args.spacing)
    make_branches(args.guidance, 1, args.scale, args.s_i, args.s_c, args.ref_slots)

    state = process_state(args)
    progress = Progress() if state.is_main_process else Progress(io.StringIO())  # one process speaks
    with state.main_process_first():  # one process fetches the default model
        model, _ = load_model(args, progress)
    check_restorer(model)  # before any photo is scanned
    analysis = load_face_analysis(args.face_models)
    album = build_album(model, analysis, args.photos, args.out, settings, model_id(model_folder(args)), progress,
                        progress.counter, state)  # fmt: skip
    if not state.is_main_process:
        return 0
    for line in person_lines(album):
        progress(line)
    progress(
        f"{len(album.people)} people, {sum(d == 'restored' for d in album.decisions.values())} face(s) restored "
        f"({album.sampled} sampled now, the rest cached), {len(album.outputs)} photo(s) written into {args.out}"
    )
    progress(f"edit {args.out / PEOPLE_JSON} to merge or split people or exclude references, then run again")
    return 0


def model_folder(args: argparse.Namespace) -> Path:
    """The folder the model was loaded from (as ``load_model`` picks it)."""
    if args.model is not None:
        return args.model
    from ..weights import default_model_dir

    return default_model_dir()
