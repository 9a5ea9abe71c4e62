"""`refface eval` on a tiny FFHQ-Ref-format set made from the real photos: images, CSV, summary, plots and HTML; the
seeds, batching and resume leave every image unchanged; two accelerate processes give the same summary."""

import csv
import json
import os
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image
from support import export_iresnet, ffhq_ref_set, metrics_folder, run_bounded, tiny_restorer

from refface_core.cli import main
from refface_core.errors import RefFaceError
from refface_core.evaluation.restoring import face_seed, parse_sweep, restore_set
from refface_core.evaluation.sets import open_set

REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(
    steps=3,
    spacing="uniform",
    solver="ddim",
    guidance="refldm",
    scale=1.5,
    s_i=1.2,
    s_c=1.2,
    ref_slots=None,
    context_scale=1.0,
)  # fmt: skip  (what eval_args gives)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = ffhq_ref_set(root / "FFHQ-Ref")
    tiny_restorer().save_pretrained(root / "model")
    (root / "metrics").mkdir()
    export_iresnet(root / "metrics" / "insightface_webface_r50.onnx")  # IDS on; LPIPS and FID files absent
    return {**data, "model": root / "model", "metrics": root / "metrics", "root": root}


def eval_args(setup, out, *extra):
    return [
        "eval", "--set", "ffhq-ref-severe", "--data", str(setup["data"]), "--images", str(setup["images"]),
        "--out", str(out), "--model", str(setup["model"]), "--metrics", str(setup["metrics"]), "--steps", "3",
        *extra,
    ]  # fmt: skip


def images_of(run_dir):
    """Each restored image's pixels, by its path in the run."""
    return {p.relative_to(run_dir).as_posix(): Image.open(p).tobytes() for p in (run_dir / "images").rglob("*.png")}


@pytest.fixture(scope="module")
def full_run(setup):
    out = setup["root"] / "full"
    assert main(eval_args(setup, out, "--sweep", "refs=1,2")) == 0
    return out


def test_eval_writes_images_csv_summary_plots_and_html(setup, full_run):
    images = images_of(full_run)
    assert len(images) == 2 * 12 and all(len(image) == 32 * 32 * 3 for image in images.values())
    rows = list(csv.DictReader(open(full_run / "metrics.csv")))
    assert len(rows) == 24 and {row["cell"] for row in rows} == {"refs=1", "refs=2"}
    assert {row["refs"] for row in rows if row["cell"] == "refs=1"} == {"1"}
    assert {row["refs"] for row in rows if row["face"] == "obama"} == {"1"}  # one reference: never repeated
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["faces"] == 12 and [c["cell"] for c in summary["cells"]] == ["refs=1", "refs=2"]
    for cell in summary["cells"]:
        ids = cell["metrics"]["ids"]
        values = [float(r["ids"]) for r in rows if r["cell"] == cell["cell"]]
        assert ids["mean"] == pytest.approx(np.mean(values)) and -1 <= ids["mean"] <= 1
        assert ids["ci95"][0] < ids["mean"] < ids["ci95"][1] and ids["n"] == 12
        assert {"ids_ref", "psnr", "ssim"} <= set(cell["metrics"]) and "lpips" not in cell["metrics"]
        assert cell["fid"] is None
    skipped = " ".join(summary["metric_notes"])
    assert "LPIPS skipped" in skipped and "vgg16-397923af.pth" in skipped and "FID skipped" in skipped
    for plot in ("ids_by_references.png",):
        assert Image.open(full_run / "plots" / plot).size[0] > 300
    page = (full_run / "report.html").read_text()
    assert "ReF-LDM (paper)" in page and "0.676" in page and "refs=2" in page
    sources = [unquote(source) for source in re.findall(r'src="([^"]+)"', page)]
    assert len(sources) >= 2 * 3 * 4 and all((full_run / s).is_file() for s in sources)  # opens with no server


def test_each_face_has_its_own_seed_and_the_shards_change_nothing(setup, full_run, tmp_path):
    assert face_seed(2024, "obama") == face_seed(2024, "obama") != face_seed(2024, "sunak")
    assert face_seed(2024, "obama") != face_seed(2025, "obama")
    from refface_core import RefFaceRestorer

    model = RefFaceRestorer.from_pretrained(setup["model"])
    eval_set = open_set("ffhq-ref-severe", setup["data"], setup["images"], size=model.image_size)
    for shard in [(1, 3), (0, 3), (2, 3)]:  # processes 1 of 3, 0 of 3, 2 of 3, one after another
        restore_set(model, eval_set, tmp_path, parse_sweep(["refs=2"]), OPTIONS, context_of(model), 2024, 8, shard)
    assert images_of(tmp_path) == {k: v for k, v in images_of(full_run).items() if k.startswith("images/refs=2/")}


def context_of(model):
    return lambda crops, names: model.encode_context(crops)


def test_resume_continues_exactly(setup, full_run, tmp_path, monkeypatch, capsys):
    from refface_core import RefFaceRestorer

    out, calls = tmp_path / "run", []
    restore_batch = RefFaceRestorer.restore_batch

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third batch
        return restore_batch(self, *args, **kwargs)

    monkeypatch.setattr(RefFaceRestorer, "restore_batch", interrupted)
    assert main(eval_args(setup, out, "--sweep", "refs=1,2")) == 130
    monkeypatch.undo()
    assert "refface: interrupted" in capsys.readouterr().err
    assert 0 < len(images_of(out)) < 24 and (out / "run.json").is_file() and not (out / "summary.json").exists()
    assert main(eval_args(setup, out, "--sweep", "refs=1,2")) == 0
    assert images_of(out) == images_of(full_run)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (out, full_run)]
    assert summaries[0]["cells"] == summaries[1]["cells"]
    assert not list(out.rglob("*.tmp"))


def test_a_run_folder_keeps_its_settings(setup, full_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy)
    assert main(eval_args(setup, copy, "--sweep", "refs=1,2", "--scale", "2")) == 1
    err = capsys.readouterr().err
    assert "holds a run made with other settings (options.scale: 1.5 -> 2.0)" in err and "Traceback" not in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(eval_args(setup, tmp_path / "other")) == 1
    assert "other files in it" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "sweep, message",
    [
        (["colour=1,2"], "KEY one of guidance"),
        (["refs=1,x"], "'x' is not a whole number"),
        (["guidance=cfg"], "'cfg' is not one of refldm, multi_reference"),
        (["refs=1", "refs=2"], "names refs twice"),
        (["steps=5,5"], "lists a value twice"),
    ],
)
def test_bad_sweeps_say_what_is_wrong(sweep, message):
    with pytest.raises(RefFaceError, match=re.escape(message)):
        parse_sweep(sweep)


def test_sweep_is_every_combination():
    cells = parse_sweep(["guidance=refldm,multi_reference", "refs=1,3,5"])
    assert len(cells) == 6 and cells[0] == {"guidance": "refldm", "refs": 1}
    assert parse_sweep([]) == [{}]


def test_missing_files_are_counted_and_left_out(setup, tmp_path, capsys):
    data = tmp_path / "FFHQ-Ref"
    shutil.copytree(setup["data"], data)
    images = data / "images"
    (images / "sunak.png").unlink()  # a ground truth and a reference
    (data / "test_images" / "severe_degrad" / "obama.png").unlink()  # an LQ image
    eval_set = open_set("ffhq-ref-severe", data, images, size=32)
    assert len(eval_set.faces) == 9 and len(eval_set.problems) == 3
    assert any("obama.png" in p and "LQ image not found" in p for p in eval_set.problems)
    assert main(eval_args(setup, tmp_path / "run", "--data", str(data), "--images", str(images), "--limit", "2")) == 0
    err = capsys.readouterr().err
    assert "2 faces (the first 2 of 9)" in err and err.count("left out:") == 3


def test_a_folder_of_people_is_degraded_with_a_fixed_seed(setup, tmp_path):
    people = tmp_path / "people"
    for photo in (REPO / "tests" / "data" / "faces").glob("*_[12].jpg"):
        (people / photo.stem.split("_")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, people / photo.stem.split("_")[0])
    a = open_set("folder", people, size=32, preset="severe", cache=tmp_path / "cache")
    b = open_set("folder", people, size=32, preset="severe", cache=tmp_path / "cache")
    assert [f.id for f in a.faces] == ["ardern/ardern_1", "ardern/ardern_2", "macron/macron_1", "macron/macron_2"]
    assert all(len(a.references(f)) == 1 for f in a.faces)
    assert np.array_equal(a.lq(a.faces[0]), b.lq(b.faces[0]))
    assert not np.array_equal(a.lq(a.faces[0]), a.lq(a.faces[1]))
    out = tmp_path / "run"
    mistyped = ["eval", "--set", "folder", "--data", str(people), "--preset", "sever", "--out", str(out)]
    assert main([*mistyped, "--model", str(setup["model"])]) == 1 and not (out / "run.json").exists()
    assert main(["eval", "--set", "folder", "--data", str(people), "--preset", "severe", "--out", str(out),
                 "--model", str(setup["model"]), "--metrics", str(setup["metrics"]), "--steps", "2"]) == 0  # fmt: skip
    assert len(images_of(out)) == 4 and (out / "report.html").is_file()


@pytest.mark.slow
def test_two_accelerate_processes_give_the_same_summary(setup, tmp_path):
    """Against one process with the same threads per process: the thread count changes float rounding (a pixel in
    a few images by one level), the number of processes nothing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    one = run_bounded([sys.executable, "-m", "refface_core", *eval_args(setup, tmp_path / "one", "--sweep", "refs=1,2",
                       "--batch-size", "3")], 300, env=env, cwd=REPO)  # fmt: skip
    assert one.returncode == 0, one.stdout[-3000:]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "refface_core",
        *eval_args(setup, tmp_path / "two", "--sweep", "refs=1,2", "--batch-size", "3"),
    ]  # fmt: skip
    two = run_bounded(command, 300, env=env, cwd=REPO)
    assert two.returncode == 0, two.stdout[-3000:]
    assert two.stdout.count("restoring:") >= 1 and two.stdout.count("wrote ") == 1  # one process reports
    assert images_of(tmp_path / "two") == images_of(tmp_path / "one")
    summaries = [json.loads((tmp_path / run / "summary.json").read_text())["cells"] for run in ("one", "two")]
    for a, b in zip(*summaries, strict=True):
        for key, value in a["metrics"].items():
            assert b["metrics"][key]["mean"] == pytest.approx(value["mean"], abs=1e-6)


def test_ids_is_arcface_cosine_on_refldms_crop_as_onnxruntime_computes_it(setup):
    import onnxruntime as ort
    import torch

    from refface_core.evaluation.metrics import Scorer
    from refface_core.training.identity import identity_preprocess

    lines = []
    scorer = Scorer(setup["metrics"], torch.device("cpu"), lines.append)
    assert any("LPIPS skipped" in line for line in lines) and scorer.arcface is not None
    faces = [np.asarray(Image.open(setup["images"] / f"{name}.png")) for name in ("obama", "sunak", "obamam")]
    session = ort.InferenceSession(str(setup["metrics"] / "insightface_webface_r50.onnx"))
    from refface_core.evaluation.metrics import to_tensor

    crops = identity_preprocess(torch.cat([to_tensor(face) for face in faces]))
    emb = session.run(None, {session.get_inputs()[0].name: crops.numpy()})[0]
    cosine = emb @ emb.T / np.outer(np.linalg.norm(emb, axis=1), np.linalg.norm(emb, axis=1))
    scores = scorer.face(faces[0], faces[1], faces[2])
    assert scores["ids"] == pytest.approx(cosine[0, 1], abs=1e-5)
    assert scores["ids_ref"] == pytest.approx(cosine[0, 2], abs=1e-5)
    assert scorer.face(faces[0], faces[0], faces[0])["ids"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_every_metric_from_its_public_file(tmp_path):
    """At 128 px (NIQE needs 96): each metric loads its file (random weights, seeded), scores every face and gives
    what the metric's own module gives; FID is against statistics of the set's ground truths."""
    import torch

    from refface_core.evaluation.fid import InceptionFeatures, frechet_distance, load_statistics, statistics
    from refface_core.evaluation.lpips import LPIPS
    from refface_core.evaluation.metrics import to_tensor
    from refface_core.evaluation.no_reference import NIQE

    data = ffhq_ref_set(tmp_path / "set", size=128)
    tiny_restorer(sample_size=64).save_pretrained(tmp_path / "model")
    hq = [np.asarray(Image.open(p)) for p in sorted(data["images"].glob("*.png"))]
    metrics_folder(tmp_path / "metrics", hq)
    out = tmp_path / "run"
    assert main(["eval", "--set", "ffhq-ref-severe", "--data", str(data["data"]), "--images", str(data["images"]),
                 "--out", str(out), "--model", str(tmp_path / "model"), "--metrics", str(tmp_path / "metrics"),
                 "--steps", "2", "--limit", "3"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert [line for line in summary["metric_notes"] if "skipped" in line] == []
    cell = summary["cells"][0]
    assert set(cell["metrics"]) == {"ids", "ids_ref", "lpips", "psnr", "ssim", "niqe"} and np.isfinite(cell["fid"])
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    restored = [np.asarray(Image.open(out / "images" / "default" / f"{row['face']}.png")) for row in rows]
    truth = [np.asarray(Image.open(data["images"] / f"{row['face']}.png")) for row in rows]
    folder = tmp_path / "metrics"
    lpips = LPIPS.from_files(folder / "vgg16-397923af.pth", folder / "vgg.pth")
    niqe = NIQE.from_file(folder / "niqe_modelparameters.mat")
    inception = InceptionFeatures.from_file(folder / "pt_inception-2015-12-05-6726825d.pth")
    with torch.no_grad():
        for row, image, gt in zip(rows, restored, truth, strict=True):
            assert float(row["lpips"]) == pytest.approx(float(lpips(to_tensor(image), to_tensor(gt))[0]), abs=1e-6)
            assert float(row["niqe"]) == pytest.approx(float(niqe(to_tensor(image))[0]), abs=1e-9)
        features = torch.cat([inception(to_tensor(image)) for image in restored])
    fid = frechet_distance(*statistics(features), *load_statistics(folder / "ffhq_clean_trainval70k_512.npz"))
    assert cell["fid"] == pytest.approx(fid, rel=1e-6)
    assert Image.open(out / "plots" / "ids_lpips.png").size[0] > 300


def test_a_sweep_beyond_max_refs_gets_its_references(setup, tmp_path):
    out = tmp_path / "run"
    assert main(eval_args(setup, out, "--max-refs", "1", "--sweep", "refs=2", "--limit", "2")) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [row["refs"] for row in rows] == ["2", "2"]


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--out", str(tmp_path / "afile")], "is a file; give a folder for the run"),
        (["--data", str(tmp_path / "nowhere")], "no such folder"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--sweep", "steps=0"], "steps"),
    ]
    for extra, message in cases:
        assert main(eval_args(setup, tmp_path / "run", *extra)) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("refface: error:") == 1


def test_a_damaged_image_is_named(setup, full_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy)
    damaged = copy / "images" / "refs=1" / "obama.png"
    damaged.write_bytes(damaged.read_bytes()[:40])
    assert main(eval_args(setup, copy, "--sweep", "refs=1,2")) == 1
    err = capsys.readouterr().err
    assert f"{damaged} is not a readable image" in err and "delete it and rerun" in err
