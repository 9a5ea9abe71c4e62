"""`refface faces` and `refface similarity`: what the face analysis sees."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import RefFaceError
from .options import add_face_models_option


def add_to(commands: argparse._SubParsersAction) -> None:
    faces = commands.add_parser("faces", help="list the faces found in a photo")
    faces.add_argument("photo", type=Path)
    faces.add_argument("--json", action="store_true", help="print a JSON list of bbox, landmarks and score")
    faces.add_argument("--align", type=Path, metavar="DIR", help="write each aligned 512 crop as a PNG into DIR")
    faces.add_argument("--overwrite", action="store_true", help="replace crops already in DIR")
    add_face_models_option(faces)
    faces.set_defaults(run=run_faces)

    similarity = commands.add_parser("similarity", help="identity similarity of the main face of each image")
    similarity.add_argument("images", type=Path, nargs="+", metavar="IMG")
    similarity.add_argument("--json", action="store_true", help='print {"similarity": [[...]]}')
    add_face_models_option(similarity)
    similarity.set_defaults(run=run_similarity)


def run_faces(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from ..faces import align_face, load_face_analysis
    from ..files import check_writable_folder
    from ..images import load_image, save_image

    if args.align:
        check_writable_folder(args.align)
    photo = np.asarray(load_image(args.photo))
    faces = load_face_analysis(args.face_models).detect(photo)
    if args.json:
        print(json.dumps([face.to_json() for face in faces]))
    else:
        print(f"{len(faces)} face(s) in {args.photo}")
        for i, face in enumerate(faces):
            x1, y1, x2, y2 = face.bbox
            print(f"  {i}: box ({x1:.0f}, {y1:.0f})-({x2:.0f}, {y2:.0f}), eyes {face.eye_distance:.0f}px apart "
                  f"(size {face.size:.0f}px, from all landmarks), score {face.score:.2f}")  # fmt: skip
    if args.align:
        crops = [args.align / f"face_{i}.png" for i in range(len(faces))]
        taken = [str(path) for path in crops if path.exists()]
        if taken and not args.overwrite:
            raise RefFaceError(f"{taken[0]} exists ({len(taken)} in all); pass --overwrite, or another --align DIR")
        args.align.mkdir(parents=True, exist_ok=True)
        for face, path in zip(faces, crops, strict=True):
            save_image(Image.fromarray(align_face(photo, face.landmarks, 512)[0]), path)
    return 0


def run_similarity(args: argparse.Namespace) -> int:
    import numpy as np

    from ..faces import load_face_analysis
    from ..images import load_image

    analysis = load_face_analysis(args.face_models)
    photos = [np.asarray(load_image(path)) for path in args.images]
    embeddings = analysis.main_embeddings(photos, [str(p) for p in args.images])
    matrix = (embeddings @ embeddings.T).round(4).tolist()
    if args.json:
        print(json.dumps({"similarity": matrix}))
        return 0
    print(f"identity similarity ({analysis.name}; same person above {analysis.same_person_threshold}):")
    for path, row in zip(args.images, matrix, strict=True):
        print("  " + " ".join(f"{v:6.3f}" for v in row) + f"  {path}")
    return 0
