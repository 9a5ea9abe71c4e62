"""`refface restore`: photos, or folders of them, restored with good photos of the person."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RefFaceError, check_number, check_seeds
from ..files import check_writable_folder, path_kind
from .options import (
    add_colorize_option,
    add_face_models_option,
    add_model_option,
    add_sampling_options,
    sampling_options,
)

if TYPE_CHECKING:
    from ..model import RefFaceRestorer
    from ..progress import Progress

MAX_CANDIDATES = 16
MAX_NAMES = 20  # reference names a result records (EXIF holds 64 KB)


def add_to(commands: argparse._SubParsersAction) -> None:
    restore = commands.add_parser("restore", help="restore the faces of photos using reference photos of the person")
    restore.add_argument(
        "--input",
        required=True,
        nargs="+",
        type=Path,
        help="photos, or folders of photos (aligned crops with --aligned)",
    )
    restore.add_argument(
        "--ref", required=True, action="append", type=Path, help="a good photo (or a folder) of the person; repeat"
    )
    restore.add_argument(
        "--out", required=True, type=Path, help="output image (.png, .jpg, ...), or a folder for several photos"
    )
    add_model_option(restore)
    restore.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    restore.add_argument(
        "--upscale",
        type=float,
        help="output size over the photo's (default: the smallest factor up to 4 that gives every restored face "
        "64 px between the eyes; 1 keeps the photo's size)",
    )
    add_colorize_option(restore)
    restore.add_argument(
        "--candidates", type=int, default=1, help="write N restorations, seeds SEED..SEED+N-1, to choose from"
    )
    restore.add_argument("--aligned", action="store_true", help="--input and --ref are aligned square face crops")
    restore.add_argument("--all-faces", action="store_true", help="restore every face, not only the person's")
    restore.add_argument("--face", type=int, help="restore only this face (0 = largest; see `refface faces`)")
    restore.add_argument("--keep-refs", type=int, help="use only the best K references")
    restore.add_argument("--ref-threshold", type=float, help="same-person similarity threshold (model default)")
    restore.add_argument("--farl", type=Path, help="FaRL checkpoint, for models with Composite Context")
    restore.add_argument("--context-scale", type=float, default=1.0, help="Composite Context strength (0 = off)")
    add_face_models_option(restore)
    add_sampling_options(restore)
    restore.add_argument("--seed", type=int, default=2024, help="noise seed (default 2024, as ReF-LDM)")
    restore.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..images import load_image, load_photo, save_image, to_8bit
    from ..pipeline import check_upscale, restore_crops, restore_photo
    from ..progress import Progress

    if not 1 <= args.candidates <= MAX_CANDIDATES:
        raise RefFaceError(f"--candidates must be between 1 and {MAX_CANDIDATES}, got {args.candidates}")
    if args.upscale is not None:
        check_upscale((1, 1), args.upscale)
    seeds = [args.seed + i for i in range(args.candidates)]
    check_seeds(seeds)
    check_number("--context-scale", args.context_scale)
    if args.aligned and (args.upscale is not None or args.face is not None or args.all_faces or args.keep_refs):
        raise RefFaceError("--aligned restores the crops as they are: --upscale, --face, --all-faces and --keep-refs "
                           "apply to whole photos")  # fmt: skip
    photos, folder = image_files(args.input, "--input")
    refs, _ = image_files(args.ref, "--ref")
    batch = folder or len(photos) > 1 or path_kind(args.out) == "folder" or not args.out.suffix  # into a folder
    outputs = plan_outputs(photos, args.out, batch, seeds, args.overwrite)
    from ..sampling import make_branches, make_solver  # torch: after the quick checks

    make_solver(args.solver, args.steps, args.spacing)  # bad sampling options fail now, not after the model loads
    make_branches(args.guidance, 1, args.scale, args.s_i, args.s_c, args.ref_slots)

    progress = Progress()
    model, model_name = load_model(args, progress)
    farl = None
    if model.context_encoder is not None:
        if args.farl is None:
            raise RefFaceError("this model has Composite Context: give its FaRL checkpoint with --farl FILE")
        from ..context.farl import load_farl

        progress(f"loading FaRL {args.farl}")
        farl = load_farl(args.farl, device=model.device, dtype=model.dtype)
    analysis = None
    if not args.aligned or farl is not None:
        from ..faces import load_face_analysis

        analysis = load_face_analysis(args.face_models)
    progress(f"preparing {len(refs)} reference(s)")
    if args.aligned:
        crops = [np.asarray(load_image(path)) for path in refs]
        identity = None if farl is None else analysis.main_embeddings(crops, [str(p) for p in refs])
        context = model.encode_context(crops, identity, farl)
        used = refs
    else:
        from ..faces import prepare_references

        references = prepare_references(
            analysis, refs, model.image_size, [str(p) for p in refs], args.keep_refs, args.ref_threshold
        )
        for line in references.lines:
            progress(line)
        identity = references.embeddings
        context = model.encode_context(references.crops, identity, farl)
        used = [Path(name) for name in references.names]

    options = dict(callback=progress.step, context_scale=args.context_scale, **sampling_options(args))
    select = args.face if args.face is not None else ("all" if args.all_faces else "matching")
    failed, warned = [], []
    for k, (photo_path, paths) in enumerate(zip(photos, outputs, strict=True), start=1):
        progress(f"photo {k}/{len(photos)}: {photo_path}" if batch else f"photo: {photo_path}")

        def log(line: str, photo_path: Path = photo_path) -> None:
            if line.startswith("warning:") and photo_path not in warned:
                warned.append(photo_path)
            progress(line)

        try:
            photo = load_photo(photo_path)
            if args.aligned:
                images = restore_crops(model, [to_8bit(photo.pixels)], context, seeds, not args.colorize, **options)[0]
                faces, upscale = [0], 1.0
            else:
                result = restore_photo(
                    model, analysis, photo.pixels, identity, context, select, args.ref_threshold, args.upscale,
                    not args.colorize, seeds, log, **options,
                )  # fmt: skip
                images, faces, upscale = result.images, result.faces, result.upscale
        except RefFaceError as e:
            if not batch:
                raise
            failed.append(f"{photo_path}: {e}")
            progress(f"{photo_path}: not restored: {e}")
            continue
        for image, path, seed in zip(images, paths, seeds, strict=True):
            made = provenance(args, model_name, photo_path, used, faces, upscale, seed)
            save_image(image, path, made, photo.exif, photo.icc)
            print(f"wrote {path}")
    if batch:
        progress(f"restored {len(photos) - len(failed)} of {len(photos)} photos into {args.out}")
        for line in failed:
            progress(f"  not restored: {line}")
        for photo_path in warned:
            progress(f"  restored with an identity warning (see above): {photo_path}")
    return 1 if failed else 0


def image_files(paths: list[Path], option: str) -> tuple[list[Path], bool]:
    """The image files named, folders expanded (sorted); True when a folder was among them."""
    from ..images import IMAGE_SUFFIXES

    files, folder = [], False
    for path in paths:
        kind = path_kind(path)
        if kind == "folder":
            folder = True
            try:
                found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            except OSError as e:
                raise RefFaceError(f"{option} {path}: cannot list this folder: {e.strerror}") from None
            if not found:
                raise RefFaceError(f"{option} {path}: no images ({' '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif kind == "file":
            files.append(path)
        else:
            raise RefFaceError(f"{option} {path}: no such file or folder")
    return list(dict.fromkeys(files)), folder


def plan_outputs(photos: list[Path], out: Path, batch: bool, seeds: list[int], overwrite: bool) -> list[list[Path]]:
    """Every file to write, per photo and seed, checked before any work. One photo goes to the file ``out``; in a
    ``batch`` the photos go into the folder ``out`` as <name>.png, under a new name where one is taken: nothing is
    overwritten."""
    from ..images import IMAGE_SUFFIXES, check_output_path

    suffixes = [""] if len(seeds) == 1 else [f"_seed{seed}" for seed in seeds]
    if not batch:
        check_output_path(out)
        paths = [out.with_name(f"{out.stem}{suffix}{out.suffix}") for suffix in suffixes]
        for path in paths:
            if path.resolve() == photos[0].resolve():
                raise RefFaceError(f"--out {path} is the input photo; write the result to another file")
            if path.exists() and not overwrite:
                raise RefFaceError(f"{path} exists; pass --overwrite to replace it, or choose another --out")
        return [paths]
    kind = path_kind(out)
    if kind not in ("folder", "missing"):
        raise RefFaceError(f"--out {out} is a file, but several photos need a folder")
    if kind == "missing" and out.suffix.lower() in IMAGE_SUFFIXES:
        raise RefFaceError(f"--out {out} looks like an image file, but several photos need a folder")
    check_writable_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RefFaceError(f"cannot make the folder {out}: {e.strerror}") from None
    taken: set[Path] = set()
    plans = []
    for photo in photos:
        paths = []
        for suffix in suffixes:
            path, n = out / f"{photo.stem}{suffix}.png", 1
            while path.exists() or path in taken:
                n += 1
                path = out / f"{photo.stem}{suffix}-{n}.png"
            taken.add(path)
            paths.append(path)
        plans.append(paths)
    return plans


def load_model(args: argparse.Namespace, progress: Progress) -> tuple[RefFaceRestorer, str]:
    """--model, or the default model, downloaded and converted on first use."""
    from ..model import RefFaceRestorer, pick_device

    device, dtype = pick_device(args.device, args.dtype)
    path = args.model
    if path is None:
        from ..weights import default_model_dir, download_model

        path = default_model_dir()
        if not (path / "config.json").is_file():
            progress(f"no --model given and no model in {path} yet: fetching ReF-LDM's weights (once)")
            download_model(path.parent, progress, progress.download)
    progress(f"loading the model {path} ({device}, {str(dtype).removeprefix('torch.')})")
    model = RefFaceRestorer.from_pretrained(path, device=device, dtype=dtype)
    model.set_compile(args.compile)
    return model, path.name


def provenance(
    args: argparse.Namespace,
    model: str,
    photo: Path,
    refs: list[Path],
    faces: list[int],
    upscale: float,
    seed: int,
) -> dict[str, Any]:
    """What a restored file records about how it was made: these are edited photos of real people."""
    from .. import __version__

    return {
        "software": f"RefFace {__version__}",
        "edited": "faces restored by a generative model guided by reference photos; not an original photograph",
        "source": photo.name,
        "model": model,
        "references": [ref.name for ref in refs[:MAX_NAMES]]
        + [f"and {len(refs) - MAX_NAMES} more"] * (len(refs) > MAX_NAMES),
        "faces": faces,
        "seed": seed,
        "upscale": upscale,
        "tone": "model colours" if args.colorize else "the photo's",
        "settings": {**sampling_options(args), "context_scale": args.context_scale},
    }
