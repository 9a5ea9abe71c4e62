"""One evaluation run: a set restored over a grid of settings into RUN_DIR, then scored and reported.

RUN_DIR/run.json records the settings; a rerun with the same ones resumes (images already written are kept), one
with other settings is refused, so a run's images always belong to one set of settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import RefFaceError
from ..files import check_writable_folder, path_kind
from . import report
from .metrics import HIGHER_IS_BETTER, Scorer
from .restoring import Cell, Restored, cell_name, face_seed, restored_path
from .sets import EvalSet

ALIGNED = "aligned"  # a folder set's aligned faces, cached in the run folder before the run is recorded


def open_run_dir(run_dir: Path, settings: dict[str, Any], write: bool = True) -> None:
    """Check that RUN_DIR is new, empty, or a run made with these ``settings`` (to resume); with ``write``, make it
    and its run.json. Every process checks, so all of them stop on the same error; one writes."""
    kind = path_kind(run_dir)
    if kind == "file":
        raise RefFaceError(f"--out {run_dir} is a file; give a folder for the run")
    record = run_dir / "run.json"
    if record.is_file():
        try:
            before = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RefFaceError(f"{record} is not readable ({e}); give a new --out folder") from None
        changed = _changes(before, settings)
        if changed:
            raise RefFaceError(
                f"{run_dir} holds a run made with other settings ({'; '.join(changed)[:500]}); rerun with the same "
                "settings to resume it, or give a new --out folder"
            )
        return
    if kind == "folder" and any(p.name != ALIGNED for p in run_dir.iterdir()):
        raise RefFaceError(f"--out {run_dir} is a folder with other files in it; give a new or empty folder")
    check_writable_folder(run_dir)
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        report.write_json(record, settings)


def _changes(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """What differs between two recorded settings, key by key (into nested settings)."""
    changed = []
    for key, value in now.items():
        old = before.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            changed += _changes(old, value, f"{prefix}{key}.")
        elif old != value:
            changed.append(f"{prefix}{key}: {old!r} -> {value!r}")
    return changed


def score_and_report(
    model_name: str,
    device: str,
    eval_set: EvalSet,
    run_dir: Path,
    cells: list[Cell],
    options: dict[str, Any],
    seed: int,
    restored: Restored,
    scorer: Scorer,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score every restored image (every process's), write metrics.csv, the plots, report.html and summary.json;
    returns the summary."""
    rows: list[dict[str, Any]] = []
    fid: dict[str, float | None] = {}
    for k, cell in enumerate(cells):
        images = []
        for i, face in enumerate(eval_set.faces):
            if progress is not None:
                progress(k * len(eval_set.faces) + i, len(cells) * len(eval_set.faces))
            image = read_restored(restored_path(run_dir, cell, face))
            images.append(image)
            first_reference = eval_set.read(face.references[0])
            row = {
                "cell": cell_name(cell),
                "face": face.id,
                "refs": len(eval_set.references(face, cell.get("refs"))),
                "seed": face_seed(seed, face.id),
            }
            rows.append(row | scorer.face(image, eval_set.read(face.hq), first_reference))
        fid[cell_name(cell)] = scorer.fid(images, cell_name(cell))
    if progress is not None:
        progress(len(rows), len(rows))
    described = [{"name": cell_name(cell), "settings": cell} for cell in cells]
    summary = report.summarise(rows, described, fid)
    ranked_by = next((key for key in ("ids", "lpips", "psnr") if rows and key in rows[0]), "psnr")
    run = {
        "set": eval_set.name,
        "model": model_name,
        "faces": len(eval_set.faces),
        "problems": eval_set.problems,
        "metric_notes": scorer.notes,
        "options": options,
        "seed": seed,
        "device": device,
        "seconds_per_image": restored.seconds / restored.images if restored.images else _earlier_rate(run_dir),
        "ranked_by": ranked_by,
    }
    report.write_csv(run_dir / "metrics.csv", rows)
    run["plots"] = [p.relative_to(run_dir).as_posix() for p in report.plot(run_dir, rows, summary, eval_set.name)]
    sheets = {cell_name(c): contact_sheet(run_dir, eval_set, c, rows, ranked_by) for c in cells}
    report.write_html(run_dir, run, summary, sheets)
    result = {**run, "cells": summary}
    report.write_json(run_dir / "summary.json", result)
    return result


def read_restored(path: Path) -> np.ndarray:
    """A restored image as written; one that cannot be read (damaged outside RefFace) is named, to be restored anew."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise RefFaceError(f"{path} is not a readable image ({e}); delete it and rerun to restore it again") from None


def _earlier_rate(run_dir: Path) -> float | None:
    """The time per image an earlier invocation measured, when this one restored nothing (all was written)."""
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("seconds_per_image")
    except (OSError, ValueError):
        return None


def contact_sheet(
    run_dir: Path, eval_set: EvalSet, cell: Cell, rows: list[dict[str, Any]], key: str
) -> list[dict[str, Any]]:
    """The best, median and worst faces of a cell by ``key``, with thumbnails of their LQ, ground truth and
    references (the restored image is linked as written)."""
    mine = sorted((row for row in rows if row["cell"] == cell_name(cell)), key=lambda row: row[key])
    if HIGHER_IS_BETTER.get(key, True):
        mine.reverse()
    picks = {"best": mine[0], "median": mine[len(mine) // 2], "worst": mine[-1]} if mine else {}
    faces = {face.id: face for face in eval_set.faces}
    sheet = []
    for rank, row in picks.items():
        face = faces[row["face"]]
        folder = f"report/{cell_name(cell)}/{face.id}"
        refs = [eval_set.read(path) for path in face.references[: row["refs"]]]
        sheet.append(
            {
                "rank": rank,
                "id": face.id,
                "score": f"{key.upper()} {row[key]:.3f}",
                "lq": report.thumbnail(eval_set.lq(face), run_dir, f"{folder}/lq.jpg"),
                "hq": report.thumbnail(eval_set.read(face.hq), run_dir, f"{folder}/hq.jpg"),
                "restored": restored_path(run_dir, cell, face).relative_to(run_dir).as_posix(),
                "refs": [report.thumbnail(ref, run_dir, f"{folder}/ref{k}.jpg") for k, ref in enumerate(refs)],
            }
        )
    return sheet
