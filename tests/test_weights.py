"""`refface download` and the default model, against a local HTTP server on 127.0.0.1 that plays GitHub's release:
redirects, Range requests honoured or ignored, dropped connections, errors and damaged files."""

from pathlib import Path

import numpy as np
import pytest

from refface_core import RefFaceError
from refface_core.cli import main
from refface_core.images import load_image
from refface_core.weights import LICENCE, download

DATA = Path(__file__).parent / "data" / "faces"


PAYLOAD = bytes(range(256)) * 4000  # about 1 MB


def test_full_download_and_a_redirect(server, tmp_path):
    server.files["refldm.ckpt"] = PAYLOAD
    seen = []
    download(f"{server.url}/github/refldm.ckpt", tmp_path / "refldm.ckpt", lambda done, total: seen.append(total))
    assert (tmp_path / "refldm.ckpt").read_bytes() == PAYLOAD and not (tmp_path / "refldm.ckpt.part").exists()
    assert [path for path, _ in server.requests] == ["/github/refldm.ckpt", "/objects/refldm.ckpt"]
    assert seen and set(seen) == {len(PAYLOAD)}


@pytest.mark.parametrize("honour_range", [True, False])
def test_an_interrupted_download_resumes(server, tmp_path, honour_range):
    server.files["vqgan.ckpt"] = PAYLOAD
    server.honour_range = honour_range
    server.drop_after["vqgan.ckpt"] = 300_000
    target = tmp_path / "vqgan.ckpt"
    with pytest.raises(
        RefFaceError, match=r"stopped after .* bytes .*run again \(the command, or the workflow in ComfyUI\) to resume"
    ):
        download(f"{server.url}/vqgan.ckpt", target)
    kept = (tmp_path / "vqgan.ckpt.part").stat().st_size
    assert 200_000 < kept <= 300_000 and not target.exists()
    assert (tmp_path / "vqgan.ckpt.part").read_bytes() == PAYLOAD[:kept]
    download(f"{server.url}/vqgan.ckpt", target)
    assert server.requests[-1] == ("/vqgan.ckpt", f"bytes={kept}-")  # asked to resume
    assert target.read_bytes() == PAYLOAD  # appended after a 206, or started again after a 200


def test_a_part_file_the_server_cannot_resume(server, tmp_path):
    server.files["vqgan.ckpt"] = PAYLOAD
    part = tmp_path / "vqgan.ckpt.part"
    part.write_bytes(PAYLOAD)  # complete already: 416, nothing to fetch
    download(f"{server.url}/vqgan.ckpt", tmp_path / "vqgan.ckpt")
    assert (tmp_path / "vqgan.ckpt").read_bytes() == PAYLOAD and not part.exists()
    (tmp_path / "again.ckpt.part").write_bytes(PAYLOAD + b"more than the file")  # 416, then fetched again whole
    download(f"{server.url}/vqgan.ckpt", tmp_path / "again.ckpt")
    assert (tmp_path / "again.ckpt").read_bytes() == PAYLOAD
    assert server.requests[-2:] == [("/vqgan.ckpt", f"bytes={len(PAYLOAD) + 18}-"), ("/vqgan.ckpt", None)]


def test_server_errors_are_one_clear_line(server, tmp_path):
    with pytest.raises(RefFaceError, match="download of .*/broken failed: HTTP 500"):
        download(f"{server.url}/broken", tmp_path / "x")
    with pytest.raises(RefFaceError, match="HTTP 404"):
        download(f"{server.url}/missing.ckpt", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_restore_without_a_model_downloads_and_converts_it_once(server, stand_ins, tmp_path, monkeypatch, capsys):
    server.files |= stand_ins
    monkeypatch.setenv("REFFACE_DOWNLOAD_BASE", f"{server.url}/github")
    monkeypatch.setenv("REFFACE_HOME", str(tmp_path / "home"))
    args = ["restore", "--input", str(DATA / "macron_2.jpg"), "--ref", str(DATA / "macron_1.jpg"), "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err
    assert "no --model given" in err and LICENCE in err and err.index(LICENCE) < err.index("downloading")
    models = tmp_path / "home" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["refldm", "refldm.ckpt", "vqgan.ckpt"]
    assert load_image(tmp_path / "a.png").size == load_image(DATA / "macron_2.jpg").size
    fetched = len(server.requests)
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0  # the second time: nothing fetched
    assert len(server.requests) == fetched and "no --model given" not in capsys.readouterr().err
    assert np.array_equal(np.asarray(load_image(tmp_path / "a.png")), np.asarray(load_image(tmp_path / "b.png")))


def test_a_damaged_checkpoint_leaves_no_model_behind(server, stand_ins, tmp_path, monkeypatch, capsys):
    server.files |= {"refldm.ckpt": stand_ins["refldm.ckpt"][:50_000], "vqgan.ckpt": stand_ins["vqgan.ckpt"]}
    monkeypatch.setenv("REFFACE_DOWNLOAD_BASE", server.url)
    assert main(["download", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "cannot load" in err and "It was removed: run again (the command, or the workflow in ComfyUI)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vqgan.ckpt"]  # no model, no partial folder
    server.files["refldm.ckpt"] = stand_ins["refldm.ckpt"]  # the file fixed on the server
    assert main(["download", "--dir", str(tmp_path)]) == 0
    assert f"model ready: {tmp_path / 'refldm'}" in capsys.readouterr().out
    assert [path for path, _ in server.requests].count("/vqgan.ckpt") == 1  # a complete file is not fetched again
    assert main(["download", "--dir", str(tmp_path)]) == 0
    assert "is already there" in capsys.readouterr().err


def test_a_damaged_checkpoint_of_the_users_is_not_deleted(server, stand_ins, tmp_path, monkeypatch, capsys):
    server.files |= stand_ins
    monkeypatch.setenv("REFFACE_DOWNLOAD_BASE", server.url)
    (tmp_path / "vqgan.ckpt").write_bytes(b"the user's own, damaged")
    assert main(["download", "--dir", str(tmp_path)]) == 1
    assert "Delete it and run again (the command, or the workflow in ComfyUI)" in capsys.readouterr().err
    assert (tmp_path / "vqgan.ckpt").read_bytes() == b"the user's own, damaged"
    assert not (tmp_path / "refldm").exists()


def test_a_checkpoint_file_as_model_says_how_to_convert_it(tmp_path, capsys):
    (tmp_path / "refldm.ckpt").write_bytes(b"weights")
    args = ["restore", "--model", str(tmp_path / "refldm.ckpt"), "--input", str(DATA / "macron_2.jpg"),
            "--ref", str(DATA / "macron_1.jpg"), "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "a RefFace model is a folder" in err and "refface convert --refldm-unet" in err and "refface download" in err
