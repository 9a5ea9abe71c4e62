"""`refface download` and the default model, against a local HTTP server on 127.0.0.1 that plays GitHub's release:
redirects, Range requests honoured or ignored, dropped connections, errors and damaged files."""

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from support import GOLDEN, weights_of

from refface_core import RefFaceError
from refface_core.cli import main
from refface_core.images import load_image
from refface_core.weights import LICENCE, download

DATA = Path(__file__).parent / "data" / "faces"


class Release:
    """What the server serves and how it misbehaves; ``requests`` records each request's path and Range header."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.honour_range = True
        self.drop_after: dict[str, int] = {}  # name -> bytes sent before the connection drops (once)
        self.requests: list[tuple[str, str | None]] = []


def handler_for(release: Release) -> type:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            release.requests.append((self.path, self.headers.get("Range")))
            if self.path.startswith("/github/"):  # GitHub answers release downloads with a 302
                self.send_response(302)
                self.send_header("Location", "/objects/" + self.path.removeprefix("/github/"))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            name = self.path.rsplit("/", 1)[-1]
            if name not in release.files:
                self.send_error(500 if name == "broken" else 404)
                return
            data, start = release.files[name], 0
            wanted = self.headers.get("Range")
            if wanted and release.honour_range:
                start = int(wanted.removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            body = data[start:]
            if name in release.drop_after:  # announce everything, send part, hang up
                body = body[: release.drop_after.pop(name)]
                self.close_connection = True
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server():
    release = Release()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(release))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    release.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield release
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


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
    with pytest.raises(RefFaceError, match="stopped after .* bytes .*run the command again to resume"):
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


def checkpoint_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.fixture
def stand_ins():
    """Tiny checkpoints in the release's format: refldm.ckpt a plain state dict with model.diffusion_model.* and
    the EMA copy, vqgan.ckpt Lightning's {"state_dict": ...} (weights from the original code, in ../shared)."""
    if not GOLDEN.is_dir():
        pytest.skip(f"tiny ReF-LDM weights not found at {GOLDEN} (they sit in ../shared beside the checkout)")
    from safetensors.torch import load_file

    unet = weights_of(load_file(GOLDEN / "unet_tiny_sharp.safetensors"))
    prefix = "model.diffusion_model."
    unet |= {"model_ema.diffusion_model" + k[len(prefix) :].replace(".", ""): v for k, v in list(unet.items())}
    vq = weights_of(load_file(GOLDEN / "vq_tiny.safetensors"))
    return {"refldm.ckpt": checkpoint_bytes(unet), "vqgan.ckpt": checkpoint_bytes({"state_dict": vq})}


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
    assert "cannot load" in err and "run `refface download` again" in err
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
    assert "Delete it and run `refface download` again" in capsys.readouterr().err
    assert (tmp_path / "vqgan.ckpt").read_bytes() == b"the user's own, damaged"
    assert not (tmp_path / "refldm").exists()


def test_a_checkpoint_file_as_model_says_how_to_convert_it(tmp_path, capsys):
    (tmp_path / "refldm.ckpt").write_bytes(b"weights")
    args = ["restore", "--model", str(tmp_path / "refldm.ckpt"), "--input", str(DATA / "macron_2.jpg"),
            "--ref", str(DATA / "macron_1.jpg"), "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "a RefFace model is a folder" in err and "refface convert --refldm-unet" in err and "refface download" in err
