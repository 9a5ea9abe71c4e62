"""`refface restore` on real photos, degraded as old photos are, with a tiny random restorer and the bundled face
models: only the chosen faces change, at the photo's size or upscaled, in the photo's tone."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from support import tiny_restorer

from refface_core import RefFaceError
from refface_core.cli import main
from refface_core.faces import load_face_analysis, paste_mask, scale_affine
from refface_core.faces.align import alignment_transform
from refface_core.images import load_image, load_photo, save_image
from refface_core.training.degradations import PRESETS, degrade

DATA = Path(__file__).parent / "data" / "faces"
CROP = 32  # the tiny restorer's crop size


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_restorer(seed=6).save_pretrained(folder)
    return folder


def photo(name):
    return np.asarray(load_image(DATA / f"{name}.jpg"))


def small_scan(image, eye_distance, path, quality=60):
    """A small scan: the photo downscaled so its face has ``eye_distance`` px between the eyes, saved as JPEG."""
    face = load_face_analysis().detect(image)[0]
    scale = eye_distance / face.size
    Image.fromarray(cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)).save(
        path, quality=quality
    )
    return path


def side_by_side(*names, height=400):
    tiles = [cv2.resize(photo(n), (round(photo(n).shape[1] * height / photo(n).shape[0]), height)) for n in names]
    return np.concatenate(tiles, axis=1)


def restore(model_dir, inputs, refs, out, *extra):
    inputs = inputs if isinstance(inputs, list) else [inputs]
    args = ["restore", "--model", str(model_dir), "--input", *map(str, inputs), "--out", str(out), "--steps", "2"]
    for ref in refs:
        args += ["--ref", str(ref if isinstance(ref, Path) else DATA / f"{ref}.jpg")]
    return main([*args, *extra])


def face_masks(image, faces, factor):
    """Each face's paste mask in the output (the photo upscaled by ``factor``)."""
    shape = (round(image.shape[0] * factor), round(image.shape[1] * factor))
    return [
        paste_mask(scale_affine(alignment_transform(f.landmarks, CROP), factor, factor), CROP, shape) for f in faces
    ]


def assert_only_faces_changed(before, after, restored, others=(), factor=1):
    """``after`` is ``before`` (Lanczos-upscaled by ``factor``) except inside the ``restored`` faces, which changed."""
    expected = before
    if factor != 1:
        size = (round(before.shape[1] * factor), round(before.shape[0] * factor))
        expected = cv2.resize(before, size, interpolation=cv2.INTER_LANCZOS4)
    assert after.shape == expected.shape
    masks = face_masks(before, restored, factor)
    outside = sum(masks) == 0
    assert np.array_equal(after[outside], expected[outside])
    for mask in masks:
        assert np.abs(after[mask > 0.99].astype(int) - expected[mask > 0.99]).mean() > 1
    for mask in face_masks(before, others, factor):
        assert np.array_equal(after[mask > 0], expected[mask > 0])


def provenance(path):
    with Image.open(path) as im:
        return json.loads(im.info["refface"])


@pytest.mark.parametrize(
    "name, ref, eye_distance", [("macron_2", "macron_1", 8), ("ardern_1", "ardern_2", 12), ("macron_2", "macron_1", 22)]
)
def test_small_scans_restore_at_their_size_and_upscaled(model_dir, tmp_path, capsys, name, ref, eye_distance):
    scan = small_scan(photo(name), eye_distance, tmp_path / "scan.jpg")
    before = np.asarray(load_image(scan))
    faces = load_face_analysis().detect(before)
    assert len(faces) == 1 and abs(faces[0].size - eye_distance) < 2
    assert restore(model_dir, scan, [ref], tmp_path / "same.png", "--upscale", "1") == 0
    assert_only_faces_changed(before, np.asarray(load_image(tmp_path / "same.png")), faces)
    assert restore(model_dir, scan, [ref], tmp_path / "big.png") == 0  # the automatic factor
    factor = min(4, int(np.ceil(64 / faces[0].size)))
    assert f"upscaling the photo {factor}×" in capsys.readouterr().err
    assert_only_faces_changed(before, np.asarray(load_image(tmp_path / "big.png")), faces, factor=factor)
    made = provenance(tmp_path / "big.png")
    assert made["upscale"] == factor and made["references"] == [f"{ref}.jpg"] and made["faces"] == [0]
    assert made["seed"] == 2024 and "generative model" in made["edited"]


@pytest.mark.parametrize("name, ref, seed", [("macron_2", "macron_1", 3), ("ardern_2", "ardern_1", 5)])
def test_blurred_jpegs_upscaled_back_restore(model_dir, tmp_path, capsys, name, ref, seed):
    lq = degrade(photo(name), PRESETS["moderate"], seed)  # blur, downscale, noise, JPEG, resized back
    Image.fromarray(lq).save(tmp_path / "lq.png")
    faces = load_face_analysis().detect(lq)
    assert len(faces) == 1
    assert restore(model_dir, tmp_path / "lq.png", [ref], tmp_path / "out.png", "--upscale", "1") == 0
    assert_only_faces_changed(lq, np.asarray(load_image(tmp_path / "out.png")), faces)
    err = capsys.readouterr().err
    assert "restoring 1 face(s)" in err and "face 0: restored, pasting it back" in err and "similarity" in err


def test_of_two_degraded_people_only_the_referenced_one_is_restored(model_dir, tmp_path, capsys):
    group = side_by_side("macron_2", "ardern_1")
    scan = small_scan(group, 16, tmp_path / "group.jpg")  # both faces about 16 px between the eyes
    before = np.asarray(load_image(scan))
    faces = load_face_analysis().detect(before)
    assert len(faces) == 2
    macron = [f for f in faces if f.bbox[2] < before.shape[1] / 2]
    ardern = [f for f in faces if f.bbox[0] > before.shape[1] / 2]
    assert restore(model_dir, scan, ["macron_1"], tmp_path / "out.png", "--upscale", "1") == 0
    assert_only_faces_changed(before, np.asarray(load_image(tmp_path / "out.png")), macron, others=ardern)
    err = capsys.readouterr().err
    assert err.count("px between the eyes, similarity") == 2 and err.count(": restored, pasting") == 1


def test_group_photo_without_the_person_is_refused_with_the_choice_to_make(model_dir, tmp_path, capsys):
    import insightface

    group = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    out = tmp_path / "group.png"
    assert restore(model_dir, group, ["obama"], out) == 1
    err = capsys.readouterr().err
    assert "no face clearly matches the references" in err and "--face N" in err and not out.exists()
    assert err.count("px between the eyes, similarity") == 6  # every face's figure

    assert restore(model_dir, group, ["obama"], out, "--all-faces") == 0
    err = capsys.readouterr().err
    assert err.count(": restored, pasting") == 6  # the turned head (26 px between the eyes, a large face) too
    assert "restoring 6 face(s)" in err and err.count("sampled 2 steps") == 1  # in one sampler run
    assert "warning" not in err  # all faces were asked for
    width, height = load_image(group).size
    assert load_image(out).size == (2 * width, 2 * height)  # faces of about 43 px: 2× brings them to 64

    assert restore(model_dir, group, ["obama"], tmp_path / "nine.png", "--face", "9") == 1
    assert "face 9 does not exist: the photo has 6 (0..5)" in capsys.readouterr().err


def test_wrong_person_warnings(model_dir, tmp_path, capsys):
    # one reference of someone else, and a clear input face: restored, with a warning
    assert restore(model_dir, DATA / "macron_2.jpg", ["obama"], tmp_path / "a.png") == 0
    assert "warning: face 0 may not be the person in the references" in capsys.readouterr().err
    # two references that disagree
    assert restore(model_dir, DATA / "macron_2.jpg", ["macron_1", "obama"], tmp_path / "b.png") == 0
    err = capsys.readouterr().err
    assert "warning: the references may show different people" in err and "warning: face 0" not in err
    # the right person: no warning
    assert restore(model_dir, DATA / "macron_2.jpg", ["macron_1"], tmp_path / "c.png") == 0
    assert "warning" not in capsys.readouterr().err


def test_references_without_a_usable_face_are_skipped(model_dir, tmp_path, capsys):
    Image.new("RGB", (100, 100), (90, 90, 90)).save(tmp_path / "blank.jpg")
    (tmp_path / "broken.jpg").write_text("not an image")
    refs = [tmp_path / "blank.jpg", tmp_path / "broken.jpg", "macron_1"]
    assert restore(model_dir, DATA / "macron_2.jpg", refs, tmp_path / "out.png") == 0
    err = capsys.readouterr().err
    assert "blank.jpg: skipped: no face found" in err and "broken.jpg: skipped: not a readable image" in err
    assert restore(model_dir, DATA / "macron_2.jpg", refs[:2], tmp_path / "none.png") == 1
    assert "no usable reference" in capsys.readouterr().err and not (tmp_path / "none.png").exists()


def test_black_and_white_and_sepia_photos_keep_their_tone(model_dir, tmp_path):
    gray = np.repeat(cv2.cvtColor(photo("macron_2"), cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    sepia = np.clip(photo("macron_2") @ np.array([[0.39, 0.35, 0.27], [0.77, 0.69, 0.53], [0.19, 0.17, 0.13]]), 0, 255)
    face = load_face_analysis().detect(gray)[0]
    inside = face_masks(gray, [face], 1)[0] > 0.99
    for name, image in (("gray", gray), ("sepia", sepia.astype(np.uint8))):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        for extra in ([], ["--colorize"]):
            out = tmp_path / f"{name}_{'colour' if extra else 'toned'}.png"
            assert restore(model_dir, tmp_path / f"{name}.png", ["macron_1"], out, "--upscale", "1", *extra) == 0
        toned, coloured = (np.asarray(load_image(tmp_path / f"{name}_{s}.png")) for s in ("toned", "colour"))
        lab = [cv2.cvtColor(x, cv2.COLOR_RGB2LAB)[inside][:, 1:].astype(float) for x in (image, toned, coloured)]
        chroma_error = [np.abs(x.mean(0) - lab[0].mean(0)).max() for x in lab[1:]]
        assert chroma_error[0] < 2 and chroma_error[1] > 2 * chroma_error[0] + 2, (name, chroma_error)
        if name == "gray":
            assert (toned.max(2) == toned.min(2)).all()  # still black and white, everywhere


def test_candidates_share_the_reference_work_and_record_their_seeds(model_dir, tmp_path, capsys):
    assert restore(model_dir, DATA / "macron_2.jpg", ["macron_1"], tmp_path / "out.png", "--candidates", "2") == 0
    a, b = tmp_path / "out_seed2024.png", tmp_path / "out_seed2025.png"
    assert provenance(a)["seed"] == 2024 and provenance(b)["seed"] == 2025
    assert not np.array_equal(np.asarray(load_image(a)), np.asarray(load_image(b)))
    assert capsys.readouterr().err.count("sampled 2 steps") == 1  # one batch for both
    assert restore(model_dir, DATA / "macron_2.jpg", ["macron_1"], tmp_path / "alone.png", "--seed", "2025") == 0
    alone = np.asarray(load_image(tmp_path / "alone.png")).astype(int)
    assert np.abs(alone - np.asarray(load_image(b))).max() <= 2  # a candidate is its seed's restore


def test_a_folder_of_photos(model_dir, tmp_path, capsys):
    photos = tmp_path / "album"
    photos.mkdir()
    small_scan(photo("macron_2"), 20, photos / "macron_2.jpg")
    Image.fromarray(photo("macron_2")).save(photos / "portrait.png")
    Image.new("RGB", (80, 80), (120, 110, 100)).save(photos / "no_face.png")
    Image.fromarray(photo("obama")).save(photos / "someone_else.png")
    out = tmp_path / "restored"
    out.mkdir()
    (out / "macron_2.png").write_bytes(b"an earlier result")
    assert restore(model_dir, photos, ["macron_1"], out) == 1  # one photo failed
    captured = capsys.readouterr()
    assert "preparing 1 reference(s)" in captured.err and captured.err.count("loading the model") == 1
    assert "no_face.png: not restored: no face found" in captured.err
    assert "restored 3 of 4 photos" in captured.err
    assert f"restored with an identity warning (see above): {photos / 'someone_else.png'}" in captured.err
    assert (out / "macron_2.png").read_bytes() == b"an earlier result"  # never overwritten
    assert sorted(p.name for p in out.iterdir()) == [
        "macron_2-2.png",
        "macron_2.png",
        "portrait.png",
        "someone_else.png",
    ]
    assert f"wrote {out / 'macron_2-2.png'}" in captured.out
    # one photo and an --out without an extension: a folder too
    assert restore(model_dir, DATA / "sunak.jpg", ["sunak"], tmp_path / "single", "--upscale", "1") == 0
    assert [p.name for p in (tmp_path / "single").iterdir()] == ["sunak.png"]


def test_options_that_cannot_work_fail_before_any_work(model_dir, tmp_path, capsys):
    from refface_core.pipeline import check_upscale

    check_upscale((9000, 8000), 1)  # a 72 MP scan restores at its own size
    with pytest.raises(Exception, match="the most is 64 MP"):
        check_upscale((9000, 8000), 2)
    cases = [
        ([DATA / "macron_2.jpg", DATA / "sunak.jpg"], "result.png", [], "looks like an image file"),
        ([DATA / "macron_2.jpg"], "out.png", ["--aligned", "--upscale", "2"], "--aligned restores the crops as they"),
        ([DATA / "macron_2.jpg"], "out.png", ["--upscale", "0.5"], "upscale must be between 1 and 8"),
        ([DATA / "macron_2.jpg"], "out.png", ["--candidates", "0"], "--candidates must be between 1 and 16"),
    ]
    for inputs, out, extra, message in cases:
        assert restore(model_dir, inputs, ["macron_1"], tmp_path / out, *extra) == 1
        err = capsys.readouterr().err
        assert message in err and "loading the model" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder made


def test_existing_output_and_the_input_itself_are_never_replaced(model_dir, tmp_path, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    assert restore(model_dir, DATA / "macron_2.jpg", ["macron_1"], out) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert restore(model_dir, DATA / "macron_2.jpg", ["macron_1"], out, "--overwrite") == 0
    assert load_image(out).size == load_image(DATA / "macron_2.jpg").size
    copy = tmp_path / "copy.png"
    copy.write_bytes(out.read_bytes())
    assert restore(model_dir, copy, ["macron_1"], copy, "--overwrite") == 1
    assert "is the input photo" in capsys.readouterr().err
    (tmp_path / "link.png").symlink_to(copy)  # the same file under another name
    assert restore(model_dir, copy, ["macron_1"], tmp_path / "link.png", "--overwrite") == 1
    assert "is the input photo" in capsys.readouterr().err and copy.read_bytes() == out.read_bytes()


def test_unwritable_outputs_fail_before_any_work(model_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder.png").mkdir()
    cases = [
        ([DATA / "macron_2.jpg"], Path("/proc/out.png"), "cannot write into /proc"),  # unwritable, even for root
        ([DATA / "macron_2.jpg"], tmp_path / "a_file" / "out.png", "a_file is a file, not a folder"),
        ([DATA / "macron_2.jpg", DATA / "sunak.jpg"], tmp_path / "a_file" / "results", "is a file, not a folder"),
        ([DATA / "macron_2.jpg", DATA / "sunak.jpg"], Path("/proc/results"), "cannot write into /proc"),
    ]
    for inputs, out, message in cases:
        assert restore(model_dir, inputs, ["macron_1"], out) == 1
        err = capsys.readouterr().err
        assert message in err and "loading the model" not in err, err
    with pytest.raises(RefFaceError, match="is a folder; give a file name"):
        save_image(photo("macron_2"), tmp_path / "a_folder.png")


def test_results_keep_the_photos_depth_profile_and_exif(model_dir, tmp_path):
    """A 16-bit scan stays 16-bit (outside the face, bit for bit); its ICC profile and EXIF are carried over, the
    orientation applied and reset; JPEG results are written at quality 95."""
    from PIL import ImageCms

    upright = photo("macron_2")
    rng = np.random.default_rng(0)
    deep = (upright.astype(np.uint16) * 257 + rng.integers(0, 257, upright.shape)).astype(np.uint16)
    rotated = np.ascontiguousarray(np.rot90(deep))  # stored on its side, EXIF orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Kodak"
    exif.get_ifd(0x8769)[0x9003] = "1962:05:01 10:00:00"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    save_image(rotated, tmp_path / "scan.png", exif=exif, icc=icc)
    assert load_photo(tmp_path / "scan.png").pixels.dtype == np.uint16

    assert restore(model_dir, tmp_path / "scan.png", ["macron_1"], tmp_path / "out.png", "--upscale", "1") == 0
    result = load_photo(tmp_path / "out.png")
    assert result.pixels.dtype == np.uint16 and result.pixels.shape == deep.shape
    face = load_face_analysis().detect(upright)[0]
    x1, y1, x2, y2 = face.bbox.astype(int)
    margin = 2 * (x2 - x1)
    away = np.ones(deep.shape[:2], bool)
    away[max(0, y1 - margin) : y2 + margin, max(0, x1 - margin) : x2 + margin] = False
    assert np.array_equal(result.pixels[away], deep[away])  # untouched, with its low bits
    assert not np.array_equal(result.pixels[~away], deep[~away])
    assert result.icc == icc
    assert result.exif[0x010F] == "Kodak" and 0x0112 not in result.exif
    assert result.exif.get_ifd(0x8769)[0x9003] == "1962:05:01 10:00:00"

    assert restore(model_dir, tmp_path / "scan.png", ["macron_1"], tmp_path / "out.jpg", "--upscale", "1") == 0
    with Image.open(tmp_path / "out.jpg") as im:
        assert im.size == (deep.shape[1], deep.shape[0]) and im.info["icc_profile"] == icc
        assert max(im.quantization[0]) == 12  # quality 95 (PIL's default, 75, gives 61)
        assert im.getexif()[0x010F] == "Kodak" and "refface" in str(im.getexif()[0x010E]).lower()


def test_a_thin_strip_or_a_folder_is_refused_clearly(model_dir, tmp_path, capsys):
    Image.fromarray(np.full((5, 20000, 3), 128, np.uint8)).save(tmp_path / "thin.png")
    assert restore(model_dir, tmp_path / "thin.png", ["macron_1"], tmp_path / "out.png") == 1
    assert "is 20000×5 px: too small to hold a face" in capsys.readouterr().err
    (tmp_path / "album").mkdir()
    assert main(["similarity", str(tmp_path / "album"), str(DATA / "macron_1.jpg")]) == 1
    assert "album is a folder, not an image" in capsys.readouterr().err


def test_composite_context_model_restores_a_photo(tmp_path, capsys):
    import torch
    from support import farl_state_dict, tiny_context_config

    model = tiny_restorer(seed=7)
    model.add_composite_context(tiny_context_config())  # identity from the offline SFace (128-d)
    model.save_pretrained(tmp_path / "cc")
    torch.save({"state_dict": farl_state_dict()}, tmp_path / "farl.pth")
    out = tmp_path / "restored.png"
    assert restore(tmp_path / "cc", DATA / "macron_2.jpg", ["macron_1"], out) == 1
    assert "give its FaRL checkpoint with --farl FILE" in capsys.readouterr().err
    assert restore(tmp_path / "cc", DATA / "macron_2.jpg", ["macron_1"], out, "--farl", str(tmp_path / "farl.pth")) == 0
    assert load_image(out).size == load_image(DATA / "macron_2.jpg").size


def test_convert_can_add_composite_context(tmp_path, golden, capsys):
    import torch
    from support import weights_of

    torch.save(weights_of(golden("unet_tiny_sharp")), tmp_path / "refldm.ckpt")
    torch.save({"state_dict": weights_of(golden("vq_tiny"))}, tmp_path / "vqgan.ckpt")
    args = ["convert", "--refldm-unet", str(tmp_path / "refldm.ckpt"), "--refldm-vq", str(tmp_path / "vqgan.ckpt"),
            "--num-head-channels", "8", "--no-ema", "--out", str(tmp_path / "model"),
            "--add-composite-context"]  # fmt: skip
    assert main(args) == 0
    assert "zero-initialised Composite Context" in capsys.readouterr().out
    from refface_core import RefFaceRestorer

    model = RefFaceRestorer.from_pretrained(tmp_path / "model")
    assert model.context_config["identity_encoder"] == "arcface" and model.context_config["identity_dim"] == 512
    assert model.context_config["appearance_width"] == 768
    assert all(p.abs().max() == 0 for n, p in model.named_parameters() if "to_out_ctx" in n)


def test_a_threshold_that_is_no_similarity_is_refused(model_dir, tmp_path, capsys):
    for value in ("nan", "5"):
        assert (
            restore(model_dir, DATA / "macron_2.jpg", ["macron_1"], tmp_path / "o.png", f"--ref-threshold={value}") == 1
        )
        assert "the same-person threshold must be" in capsys.readouterr().err


def test_the_faces_of_a_photo_are_restored_in_one_sampler_run(model_dir, monkeypatch):
    from refface_core import RefFaceRestorer
    from refface_core.faces import align_face
    from refface_core.pipeline import restore_photo

    model, analysis = RefFaceRestorer.from_pretrained(model_dir), load_face_analysis()
    reference = photo("macron_1")
    context = model.encode_context([align_face(reference, analysis.detect(reference)[0].landmarks, CROP)[0]])
    group = side_by_side("macron_2", "ardern_1")
    runs, sample = [], RefFaceRestorer.sample
    monkeypatch.setattr(
        RefFaceRestorer, "sample", lambda self, lq, *a, **k: (runs.append(len(lq)), sample(self, lq, *a, **k))[1]
    )

    def restored(**options):
        lines = []
        result = restore_photo(model, analysis, group, None, context, "all", None, 1, True, (1, 2), lines.append,
                               steps=2, **options)  # fmt: skip
        return result.images, [line for line in lines if "restor" in line]

    batched, lines = restored()
    assert runs == [4]  # two faces, two candidates each: one run
    assert lines == ["restoring 2 face(s), 2 candidates each", "face 0: restored, pasting it back",
                     "face 1: restored, pasting it back"]  # fmt: skip
    one_by_one, _ = restored(batch_size=1)
    assert runs == [4, 1, 1, 1, 1]
    for a, b in zip(batched, one_by_one, strict=True):
        assert not np.array_equal(a, group) and np.abs(a.astype(int) - b).max() <= 2
