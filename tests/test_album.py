"""`refface album` on an album made from the real photos of tests/data: some photos kept sharp, some degraded with
fixed seeds, restored by the tiny model."""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import album_photos, run_bounded, small_scan, tiny_context_config, tiny_restorer

from refface_core import RefFaceRestorer
from refface_core.album import (
    CACHE,
    FORMAT,
    PEOPLE_JSON,
    AlbumFace,
    AlbumSettings,
    build_album,
    choose_references,
    cluster_core,
    cluster_faces,
    join_faces,
    model_id,
    scan_photos,
)
from refface_core.cli import album as album_cli
from refface_core.errors import RefFaceError
from refface_core.faces import Face, load_face_analysis

FACES = Path(__file__).parent / "data" / "faces"
OPTIONS = dict(steps=2, spacing="uniform_trailing")


@pytest.fixture(scope="module")
def album_dir(tmp_path_factory) -> Path:
    return album_photos(tmp_path_factory.mktemp("photos"))


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


def test_people_json_a_face_under_two_people_is_one_clear_error(built, album_dir, model_dir, tmp_path):
    out = Path(shutil.copytree(built[1], tmp_path / "out"))
    edited = json.loads((out / PEOPLE_JSON).read_text())
    person_of(edited, "obama.jpg#0")["faces"].append("ardern_1.jpg#0")  # also still under Ardern's person
    (out / PEOPLE_JSON).write_text(json.dumps(edited))
    with pytest.raises(RefFaceError, match=r"face ardern_1\.jpg#0 is under more than one person"):
        build(album_dir, model_dir, out)


def test_people_json_an_unknown_face_id_is_one_log_line(built, album_dir, model_dir, tmp_path):
    out = Path(shutil.copytree(built[1], tmp_path / "out"))
    edited = json.loads((out / PEOPLE_JSON).read_text())
    person_of(edited, "obama.jpg#0")["faces"].append("obama.jpg#7")  # a typo: the photo has one face
    person_of(edited, "ardern_1.jpg#0")["exclude_references"] = ["gone.jpg#0"]
    (out / PEOPLE_JSON).write_text(json.dumps(edited))
    lines: list[str] = []
    build(album_dir, model_dir, out, lines)
    named = [line for line in lines if "obama.jpg#7" in line or "gone.jpg#0" in line]
    assert len(named) == 1 and "obama.jpg#7" in named[0] and "gone.jpg#0" in named[0], lines
    assert "obama.jpg#7" not in json.dumps(json.loads((out / PEOPLE_JSON).read_text())["people"])


def test_people_json_of_a_newer_format_is_refused(album_dir, model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / PEOPLE_JSON).write_text(json.dumps({"format": FORMAT + 1, "people": []}))
    with pytest.raises(RefFaceError, match="newer than this RefFace reads"):
        build(album_dir, model_dir, out)


def synthetic_face(face_id: str, embedding, sharp: bool = True) -> AlbumFace:
    """A frontal face 40 px between the eyes, sure and (unless ``sharp`` is False) clear enough for the core."""
    landmarks = np.array([[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]], float)
    face = Face(np.array([0, 0, 100, 100], float), landmarks, 0.99)
    embedding = np.asarray(embedding, float) / np.linalg.norm(embedding)
    return AlbumFace(face_id, face_id.split("#")[0], face, embedding, 500.0 if sharp else 5.0, 10.0)


def mixed(similarities: dict[int, float], dims: int = 8) -> np.ndarray:
    """A unit vector with the given cosine similarities to basis vectors; the rest in the last dimension."""
    v = np.zeros(dims)
    for axis, value in similarities.items():
        v[axis] = value
    v[-1] = np.sqrt(1 - float(v @ v))
    return v


def test_a_stranger_next_to_a_person_never_takes_the_runner_up():
    faces = [
        synthetic_face("group.jpg#0", mixed({0: 1.0})),  # Obama, clear
        synthetic_face("biden.jpg#0", mixed({1: 1.0})),  # Biden, clear, in another photo
        synthetic_face("group.jpg#1", mixed({0: 0.35, 1: 0.22}), sharp=False),  # a stranger beside Obama
        synthetic_face("group2.jpg#1", mixed({0: 0.60, 1: 0.10}), sharp=False),  # like Obama, beside him again
        synthetic_face("group2.jpg#0", mixed({0: 1.0})),
        synthetic_face("old.jpg#0", mixed({0: 0.60, 1: 0.10}), sharp=False),  # the same, alone in its photo
    ]
    people = [[0, 4], [1]]
    assert join_faces(faces, people, [2, 3, 5]) == {5: 0}  # only the face whose best person is free joins
    groups, unmatched = cluster_faces(faces)
    assert sorted(groups) == [[0, 4, 5], [1]] and unmatched == [2, 3]


def test_two_faces_of_one_photo_are_never_one_person():
    # six clear photos of one person, and a photo of two people both like them: average linkage merges all eight.
    faces = [synthetic_face(f"x{n}.jpg#0", mixed({0: 0.97, 1 + n: 0.2})) for n in range(6)]
    faces.append(synthetic_face("pair.jpg#0", mixed({0: 0.95})))
    faces.append(synthetic_face("pair.jpg#1", mixed({0: 0.80})))  # another person
    groups = cluster_core(faces, list(range(len(faces))))
    assert sorted(groups) == [[0, 1, 2, 3, 4, 5, 6], [7]]
    for group in groups:
        photos = [faces[i].photo for i in group]
        assert len(photos) == len(set(photos))


def test_a_worn_photo_is_restored_rather_than_made_a_reference():
    """Both faces are clear enough for their identity (core); only one is sharp enough to leave alone."""
    worn, sharp = (synthetic_face(f"{n}.jpg#0", mixed({0: 0.95})) for n in ("worn", "sharp"))
    worn.face.landmarks[:, 0] *= 1.3  # larger, which would rank it first
    sharp.detail = 200.0
    assert choose_references([worn, sharp], [], 3, 0.3, keep_sharp=60.0) == ["sharp.jpg#0"]
    assert choose_references([worn], [], 3, 0.3, keep_sharp=60.0) == ["worn.jpg#0"]  # none sharp: the best there is


def side_by_side(*images: np.ndarray) -> np.ndarray:
    height = max(image.shape[0] for image in images)
    padded = [np.pad(image, ((0, height - image.shape[0]), (0, 0), (0, 0)), constant_values=128) for image in images]
    return np.concatenate(padded, axis=1)


def test_a_photo_of_two_people_gives_two_people(tmp_path):
    """Obama and Macron in one photo, each also alone in another: two people, one face of the pair in each."""
    folder = tmp_path / "photos"
    folder.mkdir()
    pair = side_by_side(*(np.asarray(Image.open(FACES / n).convert("RGB")) for n in ("obama.jpg", "macron_2.jpg")))
    Image.fromarray(pair).save(folder / "pair.png")
    shutil.copy(FACES / "macron_1.jpg", folder / "macron_1.jpg")
    Image.fromarray(small_scan("obama.jpg", 16, 40)).save(folder / "obama_old.png")
    photos = sorted(folder.iterdir())
    found = scan_photos(load_face_analysis(), photos, tmp_path / "cache")
    assert sum(face.photo == "pair.png" for face in found.values()) == 2
    ids = list(found)
    groups, _ = cluster_faces(list(found.values()))
    for group in groups:
        members = [found[ids[i]].photo for i in group]
        assert len(members) == len(set(members)), members  # never two faces of one photo
    assert len([g for g in groups if any(found[ids[i]].photo == "pair.png" for i in g)]) == 2


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


def test_cli_refuses_out_in_the_photo_folder_before_the_model_loads(album_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("REFFACE_HOME", str(tmp_path / "home"))  # no model there: loading one would download
    with pytest.raises(RefFaceError, match="is the photo folder"):
        album_cli.run(parse([str(album_dir), "--out", str(album_dir)]))
    assert not (tmp_path / "home").exists()


def test_a_composite_context_model_is_refused_before_any_photo_is_scanned(album_dir, tmp_path):
    model = tiny_restorer()
    model.add_composite_context(tiny_context_config())
    out = tmp_path / "out"
    with pytest.raises(RefFaceError, match="this model has Composite Context: albums do not support it yet"):
        build_album(model, None, album_dir, out, AlbumSettings(), "tiny")  # no face analysis: never reached
    assert not out.exists()


def test_cli_runs_an_album(built, album_dir, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(built[1] / CACHE / "detections", out / CACHE / "detections")  # resumes: no detection again
    argv = [str(album_dir), "--out", str(out), "--model", str(model_dir), "--steps", "2", "--device", "cpu"]
    assert album_cli.run(parse(argv)) == 0
    said = capsys.readouterr().err
    assert "in no person, left unchanged (1): sunak.png#0" in said
    assert "references: macron_2.jpg#0; restoring 1: macron_1.png#0" in said
    assert (out / PEOPLE_JSON).is_file() and (out / "album.html").is_file()


@pytest.mark.slow
def test_two_accelerate_processes_group_once_and_share_the_restoring(album_dir, model_dir, tmp_path):
    """Against one process with the same threads per process (the thread count changes float rounding)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "ACCELERATE_USE_CPU": "true"}
    args = ["album", str(album_dir), "--model", str(model_dir), "--steps", "2", "--batch-size", "1", "--out"]
    one = run_bounded([sys.executable, "-m", "refface_core", *args, str(tmp_path / "one")], 300, env=env, cwd=repo)
    assert one.returncode == 0, one.stdout[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "refface_core"]  # fmt: skip
    two = run_bounded([*launch, *args, str(tmp_path / "two")], 300, env=env, cwd=repo)
    assert two.returncode == 0, two.stdout[-3000:]
    assert two.stdout.count("finding faces in 7 photo(s)") == 1 and two.stdout.count("3 people,") == 1  # one speaks
    people = [json.loads((tmp_path / run / PEOPLE_JSON).read_text()) for run in ("one", "two")]
    assert people[0]["people"] == people[1]["people"] and people[0]["faces"] == people[1]["faces"]
    outputs = {name: entry["output"] for name, entry in people[0]["photos"].items()}
    assert len(outputs) == 3 and outputs == {name: entry["output"] for name, entry in people[1]["photos"].items()}
    for output in outputs.values():
        assert np.array_equal(*(np.asarray(Image.open(tmp_path / run / output)) for run in ("one", "two"))), output
    broken = tmp_path / "broken"
    shutil.copytree(album_dir, broken)
    (broken / "torn.jpg").write_bytes(b"not a photo")  # the main process fails on it while the others wait
    args[1] = str(broken)
    failed = run_bounded([*launch, *args, str(tmp_path / "three")], 300, env=env, cwd=repo)
    assert failed.returncode != 0 and failed.stdout.count("torn.jpg") >= 2, failed.stdout[-3000:]  # each process
