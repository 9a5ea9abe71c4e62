"""Faces on real photos with the real offline models (YuNet + SFace), and the insightface-pack path."""

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from support import insightface_stand_ins

from refface_core import RefFaceError
from refface_core.cli import main
from refface_core.faces import (
    BUNDLED_MODELS,
    FFHQ_TEMPLATE_512,
    align_face,
    load_face_analysis,
    paste_back,
    paste_mask,
)
from refface_core.faces.references import rank_references, sharpness
from refface_core.images import load_image

DATA = Path(__file__).parent / "data" / "faces"
PEOPLE = {
    "macron": ["macron_1", "macron_2"],
    "ardern": ["ardern_1", "ardern_2"],
    "obama": ["obama"],
    "sunak": ["sunak"],
}


def group_photo() -> Path:
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"


def photo(name: str) -> np.ndarray:
    return np.asarray(load_image(DATA / f"{name}.jpg"))


@pytest.fixture(scope="module")
def analysis():
    return load_face_analysis()  # the offline default: OpenCV Zoo YuNet + SFace


def test_default_backend_is_the_offline_one(analysis):
    assert analysis.name == "OpenCV Zoo YuNet + SFace" and analysis.embedding_dim == 128
    assert load_face_analysis() is analysis  # models are loaded once


def test_detection_counts(analysis):
    for names in PEOPLE.values():
        for name in names:
            assert len(analysis.detect(photo(name))) == 1, name
    faces = analysis.detect(np.asarray(load_image(group_photo())))
    assert len(faces) == 6
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    for face in faces:  # insightface order: the image-left eye first, the mouth below the nose
        assert face.landmarks[0, 0] < face.landmarks[1, 0]
        assert face.landmarks[2, 1] < face.landmarks[3:, 1].min()


def test_aligned_landmarks_land_on_the_template(analysis):
    for name in ("macron_2", "ardern_1", "obama", "sunak"):
        image = photo(name)
        face = analysis.detect(image)[0]
        crop, affine = align_face(image, face.landmarks, 512)
        assert crop.shape == (512, 512, 3)
        moved = face.landmarks @ affine[:, :2].T + affine[:, 2]
        error = np.linalg.norm(moved - FFHQ_TEMPLATE_512, axis=1)  # px at 512
        # a similarity transform cannot fit every face exactly (a turned head moves the nose): a few px
        assert np.median(error) < 8 and error.max() < 25, (name, error)
        redetected = np.linalg.norm(analysis.detect(crop)[0].landmarks - FFHQ_TEMPLATE_512, axis=1)
        assert np.median(redetected) < 10 and redetected.max() < 30, (name, redetected)
    assert align_face(image, face.landmarks, 256)[0].shape == (256, 256, 3)


def test_same_person_pairs_score_above_different_person_pairs(analysis):
    names = [n for group in PEOPLE.values() for n in group]
    images = [photo(n) for n in names]
    embeddings = np.stack([analysis.embed(im, analysis.detect(im)[:1])[0] for im in images])
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    person = {n: p for p, group in PEOPLE.items() for n in group}
    same, different = [], []
    for i, j in itertools.combinations(range(len(names)), 2):
        (same if person[names[i]] == person[names[j]] else different).append(embeddings[i] @ embeddings[j])
    assert min(same) > max(different)
    assert min(same) > analysis.same_person_threshold > max(different)
    # batched and one-by-one embeddings agree
    faces = analysis.detect(np.asarray(load_image(group_photo())))
    group = np.asarray(load_image(group_photo()))
    batched = analysis.embed(group, faces)
    single = np.stack([analysis.embed(group, [f])[0] for f in faces])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_paste_back_round_trip(analysis):
    group = np.asarray(load_image(group_photo()))
    faces = analysis.detect(group)
    pasted = group
    for face in faces[:3]:  # several faces in one photo
        crop, affine = align_face(group, face.landmarks, 512)
        pasted = paste_back(pasted, crop, affine)
        inside = paste_mask(affine, 512, group.shape) > 0.999
        assert inside.sum() > 1000
        error = (pasted[inside].astype(np.float64) - group[inside]) ** 2
        psnr = 10 * np.log10(255**2 / error.mean())
        assert psnr >= 40, psnr
    outside = sum(paste_mask(align_face(group, f.landmarks, 512)[1], 512, group.shape) for f in faces[:3]) == 0
    assert np.array_equal(pasted[outside], group[outside])


def test_large_photos_are_detected_downscaled_and_aligned_from_the_original(analysis):
    import cv2

    image = photo("obama")
    big = cv2.resize(image, (image.shape[1] * 4, image.shape[0] * 4), interpolation=cv2.INTER_CUBIC)
    scale = analysis.max_detect_side / max(big.shape)
    assert scale < 1
    on_copy = analysis.detect(cv2.resize(big, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))[0]
    face = analysis.detect(big)[0]
    original = (on_copy.landmarks + 0.5) / scale - 0.5  # in the original's pixels (pixel centres)
    np.testing.assert_allclose(face.landmarks, original, rtol=1e-5)
    assert np.abs(face.landmarks / 4 - analysis.detect(image)[0].landmarks).max() < 0.15 * face.eye_distance / 4
    crop, affine = align_face(big, face.landmarks)
    assert crop.shape == (512, 512, 3) and sharpness(crop) > 0


def test_reference_flagging_on_a_mixed_set(analysis):
    names = ["macron_1", "macron_2", "obama", "sunak"]
    crops, embeddings, sizes = [], [], []
    for name in names:
        image = photo(name)
        face = analysis.detect(image)[0]
        crops.append(align_face(image, face.landmarks)[0])
        embeddings.append(analysis.embed(image, [face])[0])
        sizes.append(face.size)
    reports = rank_references(
        np.stack(embeddings), sizes, [sharpness(c) for c in crops], analysis.same_person_threshold
    )
    flagged = {names[r.index] for r in reports if r.flagged}
    assert flagged == {"obama", "sunak"}
    assert [names[r.index] for r in reports[:2]] == ["macron_2", "macron_1"]  # larger and sharper first
    kept = reports[0]
    assert kept.agreement > 0.5 and "FLAGGED" in reports[-1].describe()


def test_insightface_pack_path_through_its_router(tmp_path):
    insightface_stand_ins(tmp_path)
    pack = load_face_analysis(tmp_path)
    assert type(pack.detector).__name__ == "SCRFD" and type(pack.recognizer).__name__ == "ArcFaceONNX"
    assert pack.embedding_dim == 512
    image = np.zeros((480, 640, 3), np.uint8)
    image[96:160, 320:384] = 255  # four bright 32-px cells
    faces = pack.detect(image)
    assert faces and all(f.landmarks.shape == (5, 2) for f in faces)
    centres = np.array([(f.bbox[:2] + f.bbox[2:]) / 2 for f in faces])  # SCRFD anchors sit on cell corners
    assert ((centres >= [320, 96]) & (centres < [384, 160])).all()
    embeddings = pack.embed(image, faces)
    assert embeddings.shape == (len(faces), 512)
    np.testing.assert_allclose(embeddings[1], pack.embed(image, faces[1:2])[0], atol=1e-5)


def test_an_installed_insightface_pack_becomes_the_default(tmp_path, monkeypatch):
    from refface_core.faces.analysis import default_face_models

    assert default_face_models() == BUNDLED_MODELS  # the OpenCV Zoo models RefFace ships
    pack = tmp_path / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    insightface_stand_ins(pack)
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path))
    assert default_face_models() == pack
    monkeypatch.setenv("REFFACE_FACE_MODELS", str(tmp_path / "chosen"))
    assert default_face_models() == tmp_path / "chosen"


def test_model_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RefFaceError, match="no .onnx face models"):
        load_face_analysis(empty)
    with pytest.raises(RefFaceError, match="face model folder not found"):
        load_face_analysis(tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "det_10g.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(RefFaceError, match="cannot load"):
        load_face_analysis(corrupt)
    only_detector = tmp_path / "det"
    only_detector.mkdir()
    insightface_stand_ins(only_detector)
    (only_detector / "w600k_r50.onnx").unlink()
    with pytest.raises(RefFaceError, match="no insightface recognition model"):
        load_face_analysis(only_detector)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "face_detection_yunet_2023mar_int8bq.onnx").write_bytes(b"not onnx")
    with pytest.raises(RefFaceError, match="face model missing"):
        load_face_analysis(zoo)


def test_faces_cli(tmp_path, capsys):
    assert main(["faces", str(group_photo()), "--json", "--align", str(tmp_path / "crops")]) == 0
    faces = json.loads(capsys.readouterr().out)
    assert len(faces) == 6
    for face in faces:
        assert set(face) == {"bbox", "landmarks", "score"}
        assert len(face["bbox"]) == 4 and np.array(face["landmarks"]).shape == (5, 2) and 0 < face["score"] <= 1
    crops = sorted(p.name for p in (tmp_path / "crops").iterdir())
    assert crops == [f"face_{i}.png" for i in range(6)]
    assert load_image(tmp_path / "crops" / "face_0.png").size == (512, 512)

    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.new("L", (200, 200), 128).save(blank)
    assert main(["faces", str(blank), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_similarity_cli(capsys):
    images = [str(DATA / f"{n}.jpg") for n in ("macron_1", "macron_2", "obama")]
    assert main(["similarity", *images, "--json"]) == 0
    matrix = np.array(json.loads(capsys.readouterr().out)["similarity"])
    assert matrix.shape == (3, 3) and np.allclose(np.diag(matrix), 1, atol=1e-3)
    assert matrix[0, 1] > 0.5 > max(matrix[0, 2], matrix[1, 2])
    assert main(["similarity", *images]) == 0
    assert "same person above" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["faces", "missing.jpg"], "image not found"),
    (["faces", __file__], "not a readable image"),
    (["similarity", str(DATA / "obama.jpg"), "blank"], "no face found in"),
    (["faces", str(DATA / "obama.jpg"), "--face-models", "nowhere"], "face model folder not found"),
])  # fmt: skip
def test_cli_bad_input(tmp_path, args, message, capsys):
    if "blank" in args:
        from PIL import Image

        Image.new("RGB", (64, 64)).save(tmp_path / "blank.png")
        args = [str(tmp_path / "blank.png") if a == "blank" else a for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("refface: error:") and message in err and len(err.strip().splitlines()) == 1


def test_paste_back_of_a_resized_crop_lands_where_it_came_from(analysis):
    photo = np.asarray(load_image(DATA / "macron_2.jpg"))
    face = analysis.detect(photo)[0]
    crop, affine = align_face(photo, face.landmarks, 512)
    inside = paste_mask(affine, 512, photo.shape) > 0.99
    for size in (128, 256):
        small = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        pasted = paste_back(photo, small, affine, crop_size=512)
        error = np.abs(pasted.astype(float) - photo)[inside].mean()
        shifted = paste_back(photo, small, affine * (size / 512))  # the pixel-centre term left out
        assert error < np.abs(shifted.astype(float) - photo)[inside].mean()
        assert error < {128: 6.0, 256: 4.0}[size], (size, error)  # measured 5.25 and 3.24; the rest is resolution
