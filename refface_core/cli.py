"""The `refface` command line (also `python -m refface_core`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import RefFaceError
from .model import DTYPES
from .sampling import GUIDANCES, SOLVERS, SPACINGS


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (RefFaceError, ValueError, OSError) as e:  # ValueError: out-of-range options; OSError: files
        print(f"refface: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("refface: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refface", description="Reference-guided face restoration.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    convert = commands.add_parser("convert", help="convert ReF-LDM's refldm.ckpt + vqgan.ckpt into a RefFace model")
    convert.add_argument("--refldm-unet", required=True, type=Path, help="refldm.ckpt (or .safetensors)")
    convert.add_argument("--refldm-vq", required=True, type=Path, help="vqgan.ckpt (or .safetensors)")
    convert.add_argument("--num-head-channels", type=int, default=32, help="attention head size (default 32)")
    convert.add_argument("--no-ema", action="store_true", help="use the raw UNet weights instead of the EMA ones")
    convert.add_argument("--out", required=True, type=Path, help="output model folder")
    convert.add_argument(
        "--add-composite-context",
        action="store_true",
        help="add zero-initialised Composite Context layers (ArcFace + FaRL ViT-B/16), ready for fine-tuning",
    )
    convert.set_defaults(run=run_convert)

    restore = commands.add_parser("restore", help="restore the faces of a photo using reference photos")
    restore.add_argument("--model", required=True, type=Path, help="RefFace model folder (from `refface convert`)")
    restore.add_argument(
        "--input", required=True, type=Path, help="the photo to restore (an aligned crop with --aligned)"
    )
    restore.add_argument("--ref", required=True, action="append", type=Path, help="photo of the same person (repeat)")
    restore.add_argument("--out", required=True, type=Path, help="output image (.png, .jpg, ...)")
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
    restore.set_defaults(run=run_restore)

    faces = commands.add_parser("faces", help="list the faces found in a photo")
    faces.add_argument("photo", type=Path)
    faces.add_argument("--json", action="store_true", help="print a JSON list of bbox, landmarks and score")
    faces.add_argument("--align", type=Path, metavar="DIR", help="write each aligned 512 crop as a PNG into DIR")
    add_face_models_option(faces)
    faces.set_defaults(run=run_faces)

    similarity = commands.add_parser("similarity", help="identity similarity of the main face of each image")
    similarity.add_argument("images", type=Path, nargs="+", metavar="IMG")
    similarity.add_argument("--json", action="store_true", help='print {"similarity": [[...]]}')
    add_face_models_option(similarity)
    similarity.set_defaults(run=run_similarity)

    train = commands.add_parser(
        "train", help="fine-tune with Composite Context and the HID loss (several GPUs: accelerate launch)"
    )
    train.add_argument("--config", required=True, type=Path, help="training config (YAML; see README)")
    train.add_argument(
        "--resume", nargs="?", const="latest", metavar="CHECKPOINT", help="continue from the latest checkpoint (or one)"
    )
    train.set_defaults(run=run_train)

    degrade = commands.add_parser("degrade", help="write a reproducible low-quality test set from HQ images")
    degrade.add_argument("--input", required=True, type=Path, help="folder of HQ images")
    degrade.add_argument("--out", required=True, type=Path, help="folder for the LQ images (PNG, same names)")
    degrade.add_argument("--preset", default="moderate", help="moderate, severe or train (default moderate)")
    degrade.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default 0)")
    degrade.set_defaults(run=run_degrade)

    queue = commands.add_parser(
        "comfy-queue", help="restore a photo through a running ComfyUI server with an API-format workflow"
    )
    queue.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL (default http://127.0.0.1:8188)")
    queue.add_argument("--workflow", required=True, type=Path, help="API-format workflow, e.g. workflows/api/*.json")
    queue.add_argument("--input", required=True, type=Path, help="the photo to restore")
    queue.add_argument("--ref", required=True, action="append", type=Path, help="photo of the same person (repeat)")
    queue.add_argument("--out", type=Path, default=Path("."), help="folder for the results (default: here)")
    queue.set_defaults(run=run_comfy_queue)

    bench = commands.add_parser("bench", help="time a restore stage by stage (random weights unless --model)")
    bench.add_argument("--model", type=Path, help="RefFace model folder (default: full-size ReF-LDM, random)")
    bench.add_argument("--refs", type=int, default=5, help="references per face (default 5)")
    bench.add_argument("--batch", type=int, default=1, help="faces per batch (default 1)")
    bench.add_argument("--warmup", type=int, help="warm-up runs (default 1 on CUDA, 0 on CPU)")
    bench.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    bench.add_argument("--composite-context", action="store_true", help="add Composite Context layers (random)")
    bench.add_argument("--farl", type=Path, help="FaRL checkpoint (default for context models: random ViT-B/16)")
    bench.add_argument("--train", action="store_true", help="time training steps instead of a restore")
    bench.add_argument(
        "--freeze", choices=["context", "context_attention", "full"], default="context", help="--train: what trains"
    )
    bench.add_argument("--gradient-checkpointing", action="store_true", help="--train: recompute in backward")
    bench.add_argument("--arcface", type=Path, help="--train: ArcFace ONNX for the HID loss (default: a tiny stand-in)")
    add_sampling_options(bench, steps=100, spacing="uniform")
    bench.set_defaults(run=run_bench)
    return parser


def add_face_models_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--face-models",
        type=Path,
        metavar="DIR",
        help="insightface model folder (e.g. buffalo_l) or OpenCV Zoo folder (default: $REFFACE_FACE_MODELS, else a "
        "pack in ~/.insightface/models, else the offline YuNet + SFace)",
    )


def add_sampling_options(parser: argparse.ArgumentParser, steps: int = 50, spacing: str = "uniform_trailing") -> None:
    parser.add_argument("--steps", type=int, default=steps, help=f"sampling steps (default {steps})")
    parser.add_argument("--spacing", choices=SPACINGS, default=spacing, help=f"timestep spacing (default {spacing})")
    parser.add_argument("--solver", choices=SOLVERS, default="ddim", help="ddim (ReF-LDM's) or dpmpp_2m")
    parser.add_argument(
        "--guidance",
        choices=GUIDANCES,
        default="refldm",
        help="refldm: CFG on the references; multi_reference: the paper's N-reference guidance",
    )
    parser.add_argument("--scale", type=float, default=1.5, help="refldm guidance scale (default 1.5)")
    parser.add_argument("--s-i", type=float, default=1.2, help="multi_reference LQ-image scale s_i (default 1.2)")
    parser.add_argument("--s-c", type=float, default=1.2, help="multi_reference reference scale s_c (default 1.2)")
    parser.add_argument("--ref-slots", type=int, help="repeat references to fill this many slots per branch")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=[*DTYPES, "auto"], default="auto", help="default bf16 on CUDA, else fp32")


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RefFaceError(f"unknown device {args.device!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RefFaceError("--device cuda was asked for, but this torch build sees no CUDA GPU")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, DTYPES[dtype]


def sampling_options(args: argparse.Namespace) -> dict:
    return dict(
        steps=args.steps,
        spacing=args.spacing,
        solver=args.solver,
        guidance=args.guidance,
        scale=args.scale,
        s_i=args.s_i,
        s_c=args.s_c,
        ref_slots=args.ref_slots,
    )


def run_convert(args: argparse.Namespace) -> int:
    from .model import convert_refldm, load_checkpoint

    model = convert_refldm(
        load_checkpoint(args.refldm_unet), load_checkpoint(args.refldm_vq), args.num_head_channels, not args.no_ema
    )
    if args.add_composite_context:
        from .context import composite_context_config

        model.add_composite_context(composite_context_config())
    model.save_pretrained(args.out)
    unet_params = sum(p.numel() for p in model.unet.parameters())
    vq_params = sum(p.numel() for p in model.vq.parameters())
    weights = "raw" if args.no_ema else "EMA"
    context = "" if model.context_encoder is None else ", with zero-initialised Composite Context layers"
    print(
        f"wrote {args.out} (UNet {unet_params:,} parameters, {weights} weights; VQ {vq_params:,} parameters{context})"
    )
    return 0


def run_restore(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from . import RefFaceRestorer
    from .images import check_output_path, load_image, save_image

    check_output_path(args.out)
    photo = load_image(args.input)
    refs = [load_image(path) for path in args.ref]
    device, dtype = resolve_device(args)
    model = RefFaceRestorer.from_pretrained(args.model, device=device, dtype=dtype)
    with tqdm(total=args.steps, desc="restoring", unit="step", disable=None) as bar:

        def progress(step: int, total: int, *_: object) -> None:
            if step == 1:
                bar.reset(total)
            bar.update(step - bar.n)

        options = dict(seed=args.seed, callback=progress, context_scale=args.context_scale, **sampling_options(args))
        farl = None
        if model.context_encoder is not None:
            from .context.farl import load_farl

            if args.farl is None:
                raise RefFaceError("this model has Composite Context: give its FaRL checkpoint with --farl FILE")
            farl = load_farl(args.farl, device=device, dtype=dtype)
        if args.aligned:
            identity = None
            if farl is not None:
                from .faces import load_face_analysis
                from .pipeline import main_face_embeddings

                ref_arrays = [np.asarray(r) for r in refs]
                identity = main_face_embeddings(
                    load_face_analysis(args.face_models), ref_arrays, [str(p) for p in args.ref]
                )
            restored = model.restore(photo, refs, identity=identity, farl=farl, **options)
        else:
            from .faces import load_face_analysis
            from .pipeline import restore_photo

            def log(message: str) -> None:
                tqdm.write(message, file=sys.stderr)

            select = args.face if args.face is not None else ("all" if args.all_faces else "matching")

            restored = Image.fromarray(
                restore_photo(
                    model, load_face_analysis(args.face_models), np.asarray(photo), [np.asarray(r) for r in refs],
                    reference_names=[str(p) for p in args.ref], select=select,
                    keep=args.keep_refs, threshold=args.ref_threshold, farl=farl, log=log, **options,
                )
            )  # fmt: skip
    save_image(restored, args.out)
    print(f"wrote {args.out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from .training.config import load_config
    from .training.trainer import train

    final = train(load_config(args.config), resume=args.resume)
    if final is not None:  # the main process
        print(f"wrote {final}")
    return 0


def run_degrade(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .training.degradations import degrade_folder

    with tqdm(unit="image", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        written = degrade_folder(args.input, args.out, args.preset, args.seed, progress)
    print(f"wrote {len(written)} images to {args.out} ({args.preset}, seed {args.seed})")
    return 0


def run_comfy_queue(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .comfy_queue import queue_restore

    bar = tqdm(total=0, unit="step", file=sys.stderr)

    def progress(event: dict) -> None:
        data = event["data"]
        if event["type"] == "progress":
            bar.set_description(f"node {data['node']}")
            bar.total, bar.n = data["max"], data["value"]
            bar.refresh()
        elif event["type"] == "execution_cached" and data.get("nodes"):
            bar.write(f"cached: nodes {', '.join(data['nodes'])}", file=sys.stderr)

    try:
        paths, texts = queue_restore(args.server, args.workflow, args.input, args.ref, args.out, progress)
    finally:
        bar.close()
    for text in texts:
        print(text)
    for path in paths:
        print(f"wrote {path}")
    if not paths:
        raise RefFaceError("the workflow finished without saving an image (add a SaveImage node)")
    return 0


def run_train_bench(args: argparse.Namespace, model: torch.nn.Module, farl: torch.nn.Module | None) -> int:
    """Training keeps fp32 weights; --dtype bf16/fp16 becomes mixed precision."""
    from .bench import random_farl
    from .training.bench import format_train_table, run_train_bench
    from .training.identity import ArcFace

    if model.context_encoder is not None and farl is None:
        farl = random_farl().to(model.device)
    arcface = ArcFace.from_onnx(args.arcface) if args.arcface else None
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolve_device(args)[1], "no")
    result = run_train_bench(
        model, farl, arcface, args.freeze, args.batch, args.refs, args.gradient_checkpointing, precision
    )
    return print_report(format_train_table(result), result, args.json)


def print_report(table: str, result: dict, json_path: Path | None) -> int:
    """A benchmark's table and its JSON, also written to ``json_path``."""
    text = json.dumps(result, indent=2)
    print(f"{table}\n{text}")
    if json_path:
        json_path.write_text(text)
    return 0


def run_faces(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .faces import align_face, load_face_analysis
    from .images import load_image, save_image

    photo = np.asarray(load_image(args.photo))
    faces = load_face_analysis(args.face_models).detect(photo)
    if args.json:
        print(json.dumps([face.to_json() for face in faces]))
    else:
        print(f"{len(faces)} face(s) in {args.photo}")
        for i, face in enumerate(faces):
            x1, y1, x2, y2 = face.bbox
            print(f"  {i}: box ({x1:.0f}, {y1:.0f})-({x2:.0f}, {y2:.0f}), eyes {face.eye_distance:.0f}px apart, "
                  f"score {face.score:.2f}")  # fmt: skip
    if args.align:
        args.align.mkdir(parents=True, exist_ok=True)
        for i, face in enumerate(faces):
            save_image(Image.fromarray(align_face(photo, face.landmarks, 512)[0]), args.align / f"face_{i}.png")
    return 0


def run_similarity(args: argparse.Namespace) -> int:
    import numpy as np

    from .faces import load_face_analysis
    from .images import load_image
    from .pipeline import main_face_embeddings

    analysis = load_face_analysis(args.face_models)
    photos = [np.asarray(load_image(path)) for path in args.images]
    embeddings = main_face_embeddings(analysis, photos, [str(p) for p in args.images])
    matrix = (embeddings @ embeddings.T).round(4).tolist()
    if args.json:
        print(json.dumps({"similarity": matrix}))
        return 0
    print(f"identity similarity ({analysis.name}; same person above {analysis.same_person_threshold}):")
    for path, row in zip(args.images, matrix, strict=True):
        print("  " + " ".join(f"{v:6.3f}" for v in row) + f"  {path}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from . import RefFaceRestorer
    from .bench import format_table, run_bench

    device, dtype = resolve_device(args)
    if args.json and not args.json.parent.is_dir():
        raise RefFaceError(f"folder for --json does not exist: {args.json.parent}")
    if args.model:
        model = RefFaceRestorer.from_pretrained(args.model, device=device, dtype=dtype)
    else:
        model = RefFaceRestorer().to(device=device, dtype=dtype).eval()
    if args.composite_context and model.context_encoder is None:
        from .context import composite_context_config

        model.add_composite_context(composite_context_config())
    farl = None
    if args.farl:
        from .context.farl import load_farl

        farl = load_farl(args.farl, device=device, dtype=dtype)
    if args.train:
        return run_train_bench(args, model.float(), farl)
    options = sampling_options(args)
    result = run_bench(model, refs=args.refs, batch=args.batch, warmup=args.warmup, farl=farl, **options)
    return print_report(format_table(result), result, args.json)
