"""`refface album` on an album made from the real photos of tests/data: some photos kept sharp, some degraded with
fixed seeds, restored by the tiny model."""

import argparse
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from support import tiny_restorer

from refface_core import RefFaceRestorer
from refface_core.album import CACHE, PEOPLE_JSON, AlbumSettings, build_album, model_id
from refface_core.cli import album as album_cli
from refface_core.errors import RefFaceError
from refface_core.faces import load_face_analysis
from refface_core.training.degradations import PRESETS, degrade

FACES = Path(__file__).parent / "data" / "faces"
OPTIONS = dict(steps=2, spacing="uniform_trailing")


def small_scan(name: str, eyes: float, quality: int) -> np.ndarray:
    """An old small scan: the photo shrunk to ``eyes`` px between the eyes (its face has about 93), as JPEG."""
    photo = np.asarray(Image.open(FACES / name).convert("RGB"))
    small = cv2.resize(photo, None, fx=eyes / 93, fy=eyes / 93, interpolation=cv2.INTER_AREA)
    _, data = cv2.imencode(".jpg", small[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]


@pytest.fixture(scope="module")
def album_dir(tmp_path_factory) -> Path:
    """Ardern, Macron and Obama each in a sharp photo and a degraded one; Sunak only degraded (no reference)."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("ardern_1", "macron_2", "obama"):
        shutil.copy(FACES / f"{name}.jpg", folder / f"{name}.jpg")
    degraded = {
        "ardern_2": small_scan("ardern_2.jpg", 16, 40),
        "macron_1": degrade(np.asarray(Image.open(FACES / "macron_1.jpg").convert("RGB")), PRESETS["moderate"], 3),
        "obama_old": small_scan("obama.jpg", 12, 40),
        "sunak": small_scan("sunak.jpg", 14, 40),
    }
    for name, pixels in degraded.items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_restorer().save_pretrained(folder)
    return folder


def counting(monkeypatch) -> list[int]:
    """Faces given to the sampler, per restore_batch call."""
    calls: list[int] = []
    original = RefFaceRestorer.restore_batch

    def restore_batch(self, lq_faces, *args, **kwargs):
        calls.append(len(lq_faces))
        return original(self, lq_faces, *args, **kwargs)

    monkeypatch.setattr(RefFaceRestorer, "restore_batch", restore_batch)
    return calls


def build(album_dir: Path, model_dir: Path, out: Path, lines: list[str] | None = None):
    model = RefFaceRestorer.from_pretrained(model_dir)
    settings = AlbumSettings(max_refs=3, sample_options=OPTIONS)
    log = lines.append if lines is not None else lambda line: None
    return build_album(model, load_face_analysis(), album_dir, out, settings, model_id(model_dir), log)


@pytest.fixture(scope="module")
def built(album_dir, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    (out / "macron_1.png").write_bytes(b"the user's own file")  # taken name: the album must not overwrite it
    album = build(album_dir, model_dir, out)
    return album, out, json.loads((out / PEOPLE_JSON).read_text())


def person_of(people: dict, face_id: str) -> dict:
    return next(p for p in people["people"] if face_id in p["faces"])


def test_album_groups_the_right_people(built):
    _, _, people = built
    groups = sorted(sorted(f.split("#")[0] for f in p["faces"]) for p in people["people"])
    assert groups == [
        ["ardern_1.jpg", "ardern_2.png"],
        ["macron_1.png", "macron_2.jpg"],
        ["obama.jpg", "obama_old.png"],
    ]
    assert people["unmatched"] == ["sunak.png#0"]  # no sharp photo of him: no references, left alone and listed
    assert people["faces"]["sunak.png#0"]["decision"] == "unmatched"


def test_album_restores_degraded_faces_with_their_own_person_references(built, album_dir):
    _, out, people = built
    for degraded, sharp in (("ardern_2.png#0", "ardern_1.jpg#0"), ("macron_1.png#0", "macron_2.jpg#0"),
                            ("obama_old.png#0", "obama.jpg#0")):  # fmt: skip
        assert people["faces"][degraded]["decision"] == "restored"
        assert people["faces"][sharp]["decision"] == "reference"
        assert person_of(people, degraded)["references"] == [sharp]
    assert set(people["photos"]) == {"ardern_2.png", "macron_1.png", "obama_old.png"}  # sharp photos are not copied
    for name, entry in people["photos"].items():
        restored = np.asarray(Image.open(out / entry["output"]).convert("RGB"))
        photo = np.asarray(Image.open(album_dir / name).convert("RGB"))
        assert restored.shape == photo.shape and not np.array_equal(restored, photo)  # the face pasted in
    assert (out / "album.html").is_file() and "person_1" in (out / "album.html").read_text()


def test_album_never_overwrites(built):
    _, out, people = built
    assert (out / "macron_1.png").read_bytes() == b"the user's own file"
    assert people["photos"]["macron_1.png"]["output"] == "macron_1-2.png"


def test_rerun_samples_nothing_and_an_edit_resamples_only_that_person(
    built, album_dir, model_dir, tmp_path, monkeypatch
):
    _, out, people = built
    out = Path(shutil.copytree(out, tmp_path / "out"))
    calls = counting(monkeypatch)
    again = build(album_dir, model_dir, out)
    assert calls == [] and again.sampled == 0
    assert json.loads((out / PEOPLE_JSON).read_text())["photos"] == people["photos"]  # nothing rewritten

    edited = json.loads((out / PEOPLE_JSON).read_text())
    obama = person_of(edited, "obama.jpg#0")
    obama["faces"].append("sunak.png#0")  # the user says Sunak's old photo is this person: it gets his references
    edited["unmatched"] = []
    (out / PEOPLE_JSON).write_text(json.dumps(edited))
    lines: list[str] = []
    result = build(album_dir, model_dir, out, lines)
    assert calls == [1] and result.sampled == 1  # only the moved face; the other restored faces come from the cache
    after = json.loads((out / PEOPLE_JSON).read_text())
    assert after["faces"]["sunak.png#0"]["decision"] == "restored"
    assert after["faces"]["sunak.png#0"]["person"] == obama["id"]
    assert {name for name in after["photos"]} == {"ardern_2.png", "macron_1.png", "obama_old.png", "sunak.png"}
    for name in ("ardern_2.png", "macron_1.png", "obama_old.png"):
        assert after["photos"][name] == people["photos"][name]


def test_excluding_a_reference_leaves_the_person_without_restoration(built, album_dir, model_dir, tmp_path):
    _, out, _ = built
    out = Path(shutil.copytree(out, tmp_path / "out"))
    edited = json.loads((out / PEOPLE_JSON).read_text())
    person_of(edited, "ardern_1.jpg#0")["exclude_references"] = ["ardern_1.jpg#0"]
    (out / PEOPLE_JSON).write_text(json.dumps(edited))
    build(album_dir, model_dir, out)
    after = json.loads((out / PEOPLE_JSON).read_text())
    assert person_of(after, "ardern_1.jpg#0")["references"] == []
    assert after["faces"]["ardern_2.png#0"]["decision"] == "no reference"


@pytest.mark.parametrize(
    "edit, message",
    [
        ("{not json", "cannot read"),
        ('{"people": [{"id": "a", "faces": []}, {"id": "a", "faces": []}]}', "repeated: a"),
        ('{"people": [{"faces": []}]}', "needs an 'id'"),
    ],
)
def test_a_broken_people_json_is_one_clear_error(album_dir, model_dir, tmp_path, edit, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / PEOPLE_JSON).write_text(edit)
    with pytest.raises(RefFaceError, match=message):
        build(album_dir, model_dir, out)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    album_cli.add_to(parser.add_subparsers())
    return parser.parse_args(["album", *argv])


def test_cli_bad_input_fails_before_any_work(tmp_path, model_dir):
    with pytest.raises(RefFaceError, match="photo folder not found"):
        album_cli.run(parse([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--model", str(model_dir)]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RefFaceError, match="no photos"):
        album_cli.run(parse([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]))
    with pytest.raises(RefFaceError, match="--max-refs"):
        album_cli.run(parse([str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--max-refs", "0"]))


def test_cli_runs_an_album(built, album_dir, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(built[1] / CACHE / "detections", out / CACHE / "detections")  # resumes: no detection again
    argv = [str(album_dir), "--out", str(out), "--model", str(model_dir), "--steps", "2", "--device", "cpu"]
    assert album_cli.run(parse(argv)) == 0
    assert "in no person (1): sunak.png#0" in capsys.readouterr().err
    assert (out / PEOPLE_JSON).is_file() and (out / "album.html").is_file()
