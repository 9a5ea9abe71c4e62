"""The report of an evaluation run: metrics.csv (per face), summary.json (per cell, mean and 95% confidence
interval), plots (PNG) and report.html, a static page that opens from disk with no server."""

from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from ..files import write_atomic

# Published figures (ReF-LDM paper: 100 DDIM steps, CFG 1.5, 5 references, 512²): IDS, LPIPS, FID.
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "ffhq-ref-severe": {
        "CodeFormer": {"ids": 0.323, "lpips": 0.398, "fid": 51.51},
        "ReF-LDM": {"ids": 0.676, "lpips": 0.429, "fid": 37.60},
    },
    "ffhq-ref-moderate": {
        "CodeFormer": {"ids": 0.760, "lpips": 0.301, "fid": 38.78},
        "ReF-LDM": {"ids": 0.840, "lpips": 0.332, "fid": 33.05},
    },
    "celeba-test-ref": {"CodeFormer": {"ids": 0.660, "lpips": 0.340}, "ReF-LDM": {"ids": 0.779, "lpips": 0.368}},
}
COLUMNS = ("ids", "ids_ref", "lpips", "fid", "psnr", "ssim", "niqe")
THUMB = 160


def interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and its 95% confidence interval (Student's t) of the defined values (NIQE is NaN on a flat image); no
    interval for fewer than 2, no mean for none."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "ci95": None, "n": len(x)}
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(x)}


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"  # strict JSON: an undefined value is null
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def summarise(rows: list[dict[str, Any]], cells: list[dict[str, Any]], fid: dict[str, float | None]) -> list[dict]:
    """Per cell: its settings, face count, each metric's interval, and FID."""
    summary = []
    for cell in cells:
        name = cell["name"]
        mine = [row for row in rows if row["cell"] == name]
        metrics = {
            key: interval([row[key] for row in mine])
            for key in COLUMNS
            if key != "fid" and mine and all(key in row for row in mine)
        }
        asked = cell["settings"].get("refs")
        short = sum(1 for row in mine if asked is not None and row["refs"] < asked)  # faces with fewer references
        summary.append({"cell": name, "settings": cell["settings"], "faces": len(mine), "fewer_refs": short,
                        "metrics": metrics, "fid": fid.get(name)})  # fmt: skip
    return summary


def plot(run_dir: Path, rows: list[dict[str, Any]], summary: list[dict], set_name: str) -> list[Path]:
    """IDS against the number of references (one line per other setting), and the IDS-LPIPS trade-off per cell."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    folder = run_dir / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    if rows and "ids" in rows[0]:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        lines: dict[str, dict[int, list[float]]] = {}  # other settings -> references -> IDS of the faces
        for entry in summary:
            others = ",".join(f"{k}={v}" for k, v in entry["settings"].items() if k != "refs") or "all faces"
            swept = entry["settings"].get("refs")
            for row in rows:  # each face at the references it had; a face short of a swept count is left out there
                if row["cell"] == entry["cell"] and swept in (None, row["refs"]):
                    lines.setdefault(others, {}).setdefault(row["refs"], []).append(row["ids"])
        for label, by_refs in lines.items():
            ns = sorted(by_refs)
            means = [interval(by_refs[n]) for n in ns]
            errors = [0 if m["ci95"] is None else m["mean"] - m["ci95"][0] for m in means]
            ax.errorbar(ns, [m["mean"] for m in means], yerr=errors, marker="o", capsize=3, label=label)
        ax.legend(fontsize=7)
        ax.set(xlabel="references per face", ylabel="IDS (ArcFace cosine to ground truth)", title=set_name)
        ax.set_xticks(sorted({n for by_refs in lines.values() for n in by_refs}))
        written.append(_save(fig, folder / "ids_by_references.png"))
        if "lpips" in rows[0]:
            fig = Figure(figsize=(6, 3.5))
            ax = fig.subplots()
            for entry in summary:
                m = entry["metrics"]
                ax.scatter(m["lpips"]["mean"], m["ids"]["mean"], label=entry["cell"])
            for method, figures in PUBLISHED.get(set_name, {}).items():
                ax.scatter(figures["lpips"], figures["ids"], marker="x", color="grey")
                ax.annotate(f"{method} (paper)", (figures["lpips"], figures["ids"]), fontsize=7, color="grey")
            ax.legend(fontsize=7, loc="best")
            ax.ticklabel_format(useOffset=False)
            ax.locator_params(nbins=5)
            ax.set(xlabel="LPIPS (lower is better)", ylabel="IDS (higher is better)", title="identity and fidelity")
            written.append(_save(fig, folder / "ids_lpips.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def thumbnail(image: np.ndarray, run_dir: Path, relative: str) -> str:
    """A small JPEG of ``image`` at ``run_dir/relative``, for the contact sheet; returns ``relative``."""
    path = run_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    small = Image.fromarray(image).resize((THUMB, THUMB), Image.Resampling.LANCZOS)
    write_atomic(path, lambda tmp: small.save(tmp, format="JPEG", quality=90))
    return relative


def write_html(run_dir: Path, run: dict[str, Any], summary: list[dict], sheets: dict[str, list[dict]]) -> Path:
    """report.html: the settings, a table of each cell against the published rows, the plots, and per cell a
    contact sheet of the best, median and worst faces."""
    e = html.escape

    def src(path: str) -> str:
        return e(quote(path))  # a face id may hold '#', '%' or spaces

    fmt = _format

    head = "".join(f"<th>{e(c.upper().replace('_', '-'))}</th>" for c in COLUMNS)
    body = []
    for entry in summary:
        cells = [
            fmt(entry["metrics"].get(c)) if c != "fid" else f"<td>{_number(entry['fid'], 2)}</td>" for c in COLUMNS
        ]
        short = f"<br><small>{entry['fewer_refs']} with fewer references</small>" if entry["fewer_refs"] else ""
        body.append(f"<tr><td>{e(entry['cell'])}{short}</td><td>{entry['faces']}</td>{''.join(cells)}</tr>")
    for method, figures in PUBLISHED.get(run["set"], {}).items():
        cells = [f"<td>{_number(figures.get(c), 2 if c == 'fid' else 3)}</td>" for c in COLUMNS]
        body.append(f"<tr class=paper><td>{e(method)} (paper)</td><td></td>{''.join(cells)}</tr>")
    plots = "".join(f'<img src="{src(p)}" alt="{e(Path(p).stem)}">' for p in run["plots"])
    plots = plots or "<p>No plots: they show IDS, whose ArcFace file was missing (see above).</p>"
    sheet_html = []
    for cell, rows in sheets.items():
        lines = []
        for row in rows:
            refs = "".join(f'<img src="{src(r)}" alt="reference">' for r in row["refs"])
            lines.append(
                f"<tr><th>{e(row['rank'])}<br>{e(row['id'])}<br>{e(row['score'])}</th>"
                f'<td><img src="{src(row["lq"])}" alt="LQ"></td>'
                f'<td><img src="{src(row["restored"])}" alt="restored"></td>'
                f'<td><img src="{src(row["hq"])}" alt="ground truth"></td><td class=refs>{refs}</td></tr>'
            )
        sheet_html.append(
            f"<h3>{e(cell)}</h3><table class=sheet><tr><th></th><th>LQ</th><th>restored</th><th>ground truth</th>"
            f"<th>references</th></tr>{''.join(lines)}</table>"
        )
    swept = {key for entry in summary for key in entry["settings"]}
    settings = ", ".join(f"{k}={v}" for k, v in run["options"].items() if k not in swept)
    settings += f"; swept: {', '.join(sorted(swept))}" if swept else ""
    published = (
        "Published rows: the ReF-LDM paper (100 DDIM steps, CFG 1.5, 5 references)."
        if run["set"] in PUBLISHED
        else "The paper publishes no figures for this set."
    )
    problems = f"<p>{len(run['problems'])} face(s) left out: see summary.json.</p>" if run["problems"] else ""
    notes = "".join(f"<li>{e(line)}</li>" for line in run["metric_notes"])
    page = f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>RefFace eval: {e(run["set"])}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child {{ text-align: left; }}
tr.paper {{ color: #666; font-style: italic; }}
table.sheet td, table.sheet th {{ text-align: center; vertical-align: middle; }}
table.sheet img {{ width: {THUMB}px; height: {THUMB}px; display: block; }}
td.refs img {{ display: inline-block; width: {THUMB // 2}px; height: {THUMB // 2}px; margin: 1px; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>RefFace evaluation: {e(run["set"])}</h1>
<p>Model <b>{e(run["model"])}</b>; {run["faces"]} faces; {e(settings)}; seed {run["seed"]}.
{_number(run.get("seconds_per_image"), 1)} s per restored image on {e(run["device"])}.</p>
{problems}{f"<ul>{notes}</ul>" if notes else ""}
<h2>Metrics</h2>
<p>Mean [95% confidence interval]. IDS: ArcFace cosine to the ground truth; IDS-REF: to the first reference;
LPIPS: VGG. {published}</p>
<table><tr><th>setting</th><th>faces</th>{head}</tr>{"".join(body)}</table>
{plots}
<h2>Best, median and worst faces by {e(run["ranked_by"].upper().replace("_", "-"))}</h2>
{"".join(sheet_html)}
</body></html>
"""
    path = run_dir / "report.html"
    write_atomic(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _format(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "<td>–</td>"
    ci = entry["ci95"]
    spread = "" if ci is None else f" <small>[{ci[0]:.3f}, {ci[1]:.3f}]</small>"
    return f"<td>{entry['mean']:.3f}{spread}</td>"
