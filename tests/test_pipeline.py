"""`refface restore` on whole real photos with a tiny random restorer and the offline face models."""

from pathlib import Path

import numpy as np
import pytest
from support import tiny_restorer

from refface_core.cli import main
from refface_core.faces import load_face_analysis, paste_mask
from refface_core.faces.align import alignment_transform
from refface_core.images import load_image

DATA = Path(__file__).parent / "data" / "faces"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_restorer(seed=6).save_pretrained(folder)
    return folder


def restore(model_dir, photo, refs, out, *extra):
    args = ["restore", "--model", str(model_dir), "--input", str(photo), "--out", str(out), "--steps", "2"]
    for ref in refs:
        args += ["--ref", str(DATA / f"{ref}.jpg")]
    return main([*args, *extra])


def test_restores_the_persons_face_and_flags_another_person(model_dir, tmp_path, capsys):
    out = tmp_path / "restored.png"
    assert restore(model_dir, DATA / "macron_2.jpg", ["macron_1", "obama"], out) == 0
    err = capsys.readouterr().err
    assert "FLAGGED: probably another person" in err and "face 0: restoring" in err
    before, after = np.asarray(load_image(DATA / "macron_2.jpg")), np.asarray(load_image(out))
    assert after.shape == before.shape
    face = load_face_analysis().detect(before)[0]
    mask = paste_mask(alignment_transform(face.landmarks, 32), 32, before.shape)
    assert np.array_equal(after[mask == 0], before[mask == 0])  # untouched outside the face
    assert np.abs(after[mask > 0.99].astype(int) - before[mask > 0.99]).mean() > 1  # changed inside


def test_group_photo_restores_only_matching_faces_unless_asked(model_dir, tmp_path, capsys):
    import insightface

    group = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    out = tmp_path / "group.png"
    assert restore(model_dir, group, ["obama"], out) == 1
    assert "no face in the photo matches the references" in capsys.readouterr().err and not out.exists()

    assert restore(model_dir, group, ["obama"], out, "--all-faces") == 0
    err = capsys.readouterr().err
    assert err.count(": restoring") == 5
    assert "face 1: skipped, too small to restore (26px between the eyes)" in err
    assert load_image(out).size == load_image(group).size

    assert restore(model_dir, group, ["obama"], out, "--face", "9") == 1
    assert "face 9 does not exist: the photo has 6 (0..5)" in capsys.readouterr().err


def test_reference_without_a_face(model_dir, tmp_path, capsys):
    from PIL import Image

    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (100, 100), (90, 90, 90)).save(blank)
    args = ["restore", "--model", str(model_dir), "--input", str(DATA / "obama.jpg"), "--ref", str(blank),
            "--out", str(tmp_path / "o.png")]  # fmt: skip
    assert main(args) == 1
    assert f"no face found in {blank}" in capsys.readouterr().err


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
