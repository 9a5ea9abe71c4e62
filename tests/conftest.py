import io
import os
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file
from support import GOLDEN, weights_of

# Face tests use the offline default models, whatever insightface packs this machine has.
os.environ["INSIGHTFACE_HOME"] = tempfile.mkdtemp(prefix="refface-no-insightface-")
os.environ.pop("REFFACE_FACE_MODELS", None)

from refface_core import RefFaceRestorer
from refface_core.model import convert_refldm


@pytest.fixture(scope="session")
def golden():
    """Loader for ../shared/golden/refldm/<name>.safetensors (skips where the folder is absent)."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN} (they sit in ../shared beside the checkout)")
    cache = {}

    def load(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            cache[name] = load_file(GOLDEN / f"{name}.safetensors")
        return cache[name]

    return load


@pytest.fixture(scope="session")
def golden_model(golden):
    """The tiny golden UNet ('tiny' or 'sharp' init) with the tiny golden VQ, converted."""
    models = {}

    def get(init: str) -> RefFaceRestorer:
        if init not in models:
            unet = weights_of(golden("unet_tiny" if init == "tiny" else "unet_tiny_sharp"))
            models[init] = convert_refldm(unet, weights_of(golden("vq_tiny")), head_channels=8, use_ema=False)
        return models[init]

    return get


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
    unet = weights_of(load_file(GOLDEN / "unet_tiny_sharp.safetensors"))
    prefix = "model.diffusion_model."
    unet |= {"model_ema.diffusion_model" + k[len(prefix) :].replace(".", ""): v for k, v in list(unet.items())}
    vq = weights_of(load_file(GOLDEN / "vq_tiny.safetensors"))
    return {"refldm.ckpt": checkpoint_bytes(unet), "vqgan.ckpt": checkpoint_bytes({"state_dict": vq})}
