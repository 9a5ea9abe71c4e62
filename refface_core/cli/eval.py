"""`refface eval`: restore a benchmark set (over a grid of settings), score it and write a report."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..choices import EVAL_SETS, SWEEPABLE
from ..errors import RefFaceError
from .options import add_face_models_option, add_model_option, add_sampling_options, process_state, sampling_options

if TYPE_CHECKING:
    from ..evaluation.restoring import ContextOf
    from ..model import RefFaceRestorer
    from ..progress import Progress


def add_to(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="restore a benchmark set and measure identity and quality (IDS, LPIPS, FID, PSNR, SSIM)",
        description="Restore a benchmark set into RUN_DIR/images/, score it, and write metrics.csv, summary.json, "
        "plots/ and report.html. Rerun the same command to resume. Under `accelerate launch -m refface_core eval "
        "...` the faces are shared among the processes.",
    )
    evaluate.add_argument("--set", required=True, choices=EVAL_SETS, help="the benchmark set")
    evaluate.add_argument(
        "--data",
        required=True,
        type=Path,
        help="the set's folder: FFHQ-Ref's (reference_mapping/, test_images/), CelebA-Test-Ref's "
        "(test_references.csv, celeba_test_images/), or for --set folder one sub-folder of photos per person",
    )
    evaluate.add_argument("--images", type=Path, help="the HQ images the CSV names (FFHQ's, CelebA-HQ's)")
    evaluate.add_argument("--lq-dir", type=Path, help="the LQ test images, if not where the release puts them")
    evaluate.add_argument("--out", required=True, type=Path, help="the run's folder (RUN_DIR)")
    add_model_option(evaluate)
    evaluate.add_argument("--max-refs", type=int, default=5, help="references per face, at most (default 5)")
    evaluate.add_argument("--limit", type=int, help="only the first N faces of the set")
    evaluate.add_argument(
        "--preset",
        default="moderate",
        help="--set folder: degradation preset, moderate, severe or train (default moderate)",
    )
    evaluate.add_argument("--degrade-seed", type=int, default=0, help="--set folder: degradation seed (default 0)")
    evaluate.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help=f"run every combination; repeat for several keys. KEY: {', '.join(SWEEPABLE)}",
    )
    evaluate.add_argument("--batch-size", type=int, default=8, help="faces per UNet call (default 8)")
    evaluate.add_argument(
        "--metrics",
        type=Path,
        help="folder of the metrics' weights files (default $REFFACE_HOME/metrics); a missing file skips its "
        "metric, saying where to get it",
    )
    evaluate.add_argument("--farl", type=Path, help="FaRL checkpoint, for models with Composite Context")
    evaluate.add_argument("--context-scale", type=float, default=1.0, help="Composite Context strength (0 = off)")
    add_face_models_option(evaluate)
    add_sampling_options(evaluate, steps=100, spacing="uniform")  # the published figures' settings
    evaluate.add_argument(
        "--seed", type=int, default=2024, help="noise seed; each face's comes from it and its id (default 2024)"
    )
    evaluate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import check_number, check_seeds
    from ..evaluation.restoring import parse_sweep

    cells = parse_sweep(args.sweep)
    for number in ("batch_size", "limit"):
        value = getattr(args, number)
        if value is not None and value < 1:
            raise RefFaceError(f"--{number.replace('_', '-')} must be at least 1, got {value}")
    check_seeds([args.seed])
    check_number("--context-scale", args.context_scale)
    options = {**sampling_options(args), "context_scale": args.context_scale}
    from ..sampling import make_branches, make_solver  # torch: after the quick checks

    for cell in cells:  # every cell's settings are checked before any work
        settings = options | cell
        make_solver(settings["solver"], settings["steps"], settings["spacing"])
        make_branches(settings["guidance"], settings.get("refs", 1), settings["scale"], settings["s_i"],
                      settings["s_c"], settings["ref_slots"])  # fmt: skip
        check_number("context_scale", settings["context_scale"])

    from ..evaluation.metrics import Scorer, check_metrics_dir, default_metrics_dir
    from ..evaluation.restoring import restore_set
    from ..evaluation.run import ALIGNED, open_run_dir, score_and_report
    from ..evaluation.sets import open_set
    from ..model import pick_device
    from ..progress import Progress
    from ..weights import default_model_dir
    from .restore import load_model

    metrics_dir = args.metrics or default_metrics_dir()
    check_metrics_dir(metrics_dir)
    state = process_state(args)
    main = state.is_main_process
    progress = Progress() if main else Progress(io.StringIO())  # one process speaks
    folder_only = args.set == "folder"
    paths = {"data": args.data, "images": args.images, "lq_dir": args.lq_dir, "farl": args.farl,
             "face_models": args.face_models, "model": args.model or default_model_dir()}  # fmt: skip
    record = {
        "set": args.set, **{k: str(v.resolve()) if v else None for k, v in paths.items()},
        "dtype": str(pick_device(args.device, args.dtype)[1]).removeprefix("torch."), "compile": args.compile,
        "options": options, "sweep": cells, "seed": args.seed, "max_refs": args.max_refs,
        "batch_size": args.batch_size, "preset": args.preset if folder_only else None,
        "degrade_seed": args.degrade_seed if folder_only else None,
    }  # fmt: skip
    open_run_dir(args.out, record, write=False)  # every process checks, so all stop on its error
    with state.main_process_first():  # one process aligns a folder set's faces and fetches the default model
        eval_set = open_set(
            args.set, args.data, args.images, args.lq_dir, max_refs=args.max_refs, preset=args.preset,
            seed=args.degrade_seed, face_models=args.face_models, cache=args.out / ALIGNED,
            most_refs=max((cell.get("refs", 0) for cell in cells), default=0),
        )  # fmt: skip
        model, model_name = load_model(args, progress)
    eval_set.size = model.image_size
    context_of = reference_context(model, args, progress)
    total = len(eval_set.faces)
    eval_set.faces = eval_set.faces[: args.limit]
    limited = f" (the first {len(eval_set.faces)} of {total})" if len(eval_set.faces) < total else ""
    progress(f"{eval_set.name}: {len(eval_set.faces)} face{'s' * (len(eval_set.faces) != 1)}{limited}")
    for line in eval_set.problems:
        progress(f"  left out: {line}")
    scorer = Scorer(metrics_dir, model.device, progress) if main else None  # its files are checked before restoring
    if main:  # all is checked: the run is recorded (a run that failed its checks leaves none, so a fix can rerun)
        open_run_dir(args.out, record, write=True)
    state.wait_for_everyone()
    restored = restore_set(
        model, eval_set, args.out, cells, options, context_of, args.seed, args.batch_size,
        (state.process_index, state.num_processes), progress.counter("restoring", "image"),
    )  # fmt: skip
    state.wait_for_everyone()
    if scorer is not None:
        progress("scoring")
        summary = score_and_report(
            model_name,
            str(model.device),
            eval_set,
            args.out,
            cells,
            options,
            args.seed,
            restored,
            scorer,
            progress.counter("scoring", "image"),
        )
        print_summary(summary, args.out)
    return 0


def reference_context(model: RefFaceRestorer, args: argparse.Namespace, progress: Progress) -> ContextOf:
    """Reference crops -> their CompositeContext; with Composite Context, also their identity and FaRL tokens."""
    if model.context_encoder is None:
        return lambda crops, names: model.encode_context(crops)
    if args.farl is None:
        raise RefFaceError("this model has Composite Context: give its FaRL checkpoint with --farl FILE")
    from ..context.farl import load_farl
    from ..faces import load_face_analysis

    progress(f"loading FaRL {args.farl}")
    farl = load_farl(args.farl, device=model.device, dtype=model.dtype)
    analysis = load_face_analysis(args.face_models)
    return lambda crops, names: model.encode_context(crops, analysis.main_embeddings(crops, names), farl)


def print_summary(summary: dict, run_dir: Path) -> None:
    for cell in summary["cells"]:
        scores = [f"{k.upper()} {v['mean']:.3f}" for k, v in cell["metrics"].items()]
        if cell["fid"] is not None:
            scores.append(f"FID {cell['fid']:.2f}")
        print(f"{cell['cell']}: {cell['faces']} faces, {', '.join(scores)}")
    if summary["seconds_per_image"] is not None:
        print(f"{summary['seconds_per_image']:.3g} s per restored image on {summary['device']}", file=sys.stderr)
    print(f"wrote {run_dir / 'report.html'}, summary.json, metrics.csv and plots/")
