"""Fuzz: random bytes, image shapes and modes, and numbers through the commands (in-process, through ``main``) and
the Python API, with a tiny model. Every outcome must be a success or a RefFaceError (for the CLI: exit 0, or exit 1
with one `refface: error:` line, or argparse's usage error), never another exception. Seeded and bounded."""

import contextlib
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import tiny_restorer

from refface_core import RefFaceError, RefFaceRestorer
from refface_core.cli import main
from refface_core.faces import find_faces, load_face_analysis, prepare_references
from refface_core.images import load_image, save_image
from refface_core.pipeline import restore_photo

DATA = Path(__file__).parent / "data" / "faces"
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F"]
SUFFIXES = [".png", ".jpg", ".tif", ".webp", ".bmp", ".gif", ".txt", ""]
SIZES = [(1, 1), (5, 5), (15, 40), (16, 16), (64, 64), (200, 150), (4000, 5), (5, 3000)]
NUMBERS = ["nan", "inf", "-inf", "-1", "0", "0.5", "1", "1.5", "3", "1e308", "18446744073709551616", "x", ""]


def random_file(rng: np.random.Generator, folder: Path, k: int) -> Path:
    """A random picture in a random mode, size and format, or random bytes (sometimes behind an image header)."""
    suffix = SUFFIXES[rng.integers(len(SUFFIXES))]
    path = folder / f"f{k}{suffix}"
    if rng.random() < 0.3:
        header = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00"][rng.integers(4)]
        path.write_bytes(header + rng.bytes(int(rng.integers(0, 3000))))
        return path
    if rng.random() < 0.4:  # a real face, shrunk and squeezed, sometimes as a 16-bit scan
        w, h = int(rng.integers(8, 300)), int(rng.integers(8, 300))
        image = load_image(DATA / ["obama.jpg", "macron_1.jpg", "ardern_1.jpg"][rng.integers(3)]).resize((w, h))
        if rng.random() < 0.3:
            deep = folder / f"f{k}{['.png', '.tif'][rng.integers(2)]}"
            save_image(np.asarray(image).astype(np.uint16) * 257, deep)
            return deep
    else:
        w, h = SIZES[rng.integers(len(SIZES))]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(MODES[rng.integers(len(MODES))])
    try:
        image.save(path)
    except (OSError, ValueError, KeyError):  # a mode this format cannot hold
        path.write_bytes(rng.bytes(100))
    return path


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``main(argv)``: its exit status and stderr; any exception but argparse's exit fails the test, naming argv."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: a usage line and exit 2
            assert e.code == 2, argv
            return 2, err.getvalue()
        except BaseException as e:
            raise AssertionError(f"{type(e).__name__} from refface {' '.join(argv)}: {e}") from e
    assert code in (0, 1), argv
    if code == 1:  # an error, or photos of a folder that were not restored, each with its reason
        last = err.getvalue().strip().splitlines()[-1]
        assert last.startswith("refface: error: ") or "  not restored: " in err.getvalue(), (argv, err.getvalue())
    return code, err.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "model"
    tiny_restorer(seed=3).save_pretrained(path)
    return path


def test_commands_on_random_files_and_numbers(model_dir, tmp_path):
    rng = np.random.default_rng(2026)
    photo = tmp_path / "photo.png"
    load_image(DATA / "obama.jpg").resize((160, 200)).save(photo)
    outcomes = {0: 0, 1: 0, 2: 0}
    for k in range(120):
        files = [random_file(rng, tmp_path, 3 * k + i) for i in range(3)]
        pick = [photo, files[0]][rng.integers(2)]
        out = tmp_path / f"out{k}{['.png', '.jpg', '.tif', ''][rng.integers(4)]}"
        kind = rng.integers(4)
        if kind == 0:
            argv = ["restore", "--model", str(model_dir), "--input", str(pick), "--ref", str(files[1]),
                    "--ref", str(DATA / "obama.jpg"), "--out", str(out), "--steps", "1"]  # fmt: skip
            for option in rng.choice(["--scale", "--s-i", "--s-c", "--context-scale", "--upscale", "--seed",
                                      "--ref-slots", "--candidates", "--keep-refs", "--ref-threshold", "--face",
                                      "--steps"], size=int(rng.integers(0, 3)), replace=False):  # fmt: skip
                argv += [str(option), NUMBERS[rng.integers(len(NUMBERS))]]
            if rng.random() < 0.3:
                argv += ["--guidance", "multi_reference"]
            if rng.random() < 0.2:
                argv += ["--aligned"]
        elif kind == 1:
            argv = ["faces", str(files[0])] + (["--align", str(tmp_path / f"crops{k}")] if rng.random() < 0.5 else [])
        elif kind == 2:
            argv = ["similarity", str(files[0]), str(pick), str(files[2])]
        else:
            argv = ["restore", "--model", str(model_dir), "--input", str(tmp_path), "--ref", str(files[2]),
                    "--out", str(out), "--steps", "1"]  # fmt: skip  # a folder of random files
        code, _ = run_cli(argv)
        outcomes[code] += 1
    assert outcomes[0] >= 5 and outcomes[1] >= 30  # both successes and errors were reached
    assert not list(tmp_path.rglob(".*.tmp"))


class RandomRelease(BaseHTTPRequestHandler):
    """Answers each request with a random status, headers and body, then hangs up."""

    rng = np.random.default_rng(0)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        rng = self.rng
        status = [200, 206, 302, 404, 416, 500][rng.integers(6)]
        body = rng.bytes(int(rng.integers(0, 2000)))
        self.send_response(status)
        headers = {
            "Content-Length": [str(len(body)), str(len(body) + 50), "abc"][rng.integers(3)],
            "Content-Range": ["", f"bytes 0-{len(body) - 1}/{len(body)}", "bytes 7-9/x", "junk"][rng.integers(4)],
            "Location": ["", "/elsewhere", "http://127.0.0.1:9/"][rng.integers(3)],
        }
        for name, value in headers.items():
            if value:
                self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True


def test_download_against_a_random_server(tmp_path, monkeypatch):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RandomRelease)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("REFFACE_DOWNLOAD_BASE", f"http://127.0.0.1:{httpd.server_address[1]}")
    (tmp_path / "a_file").write_text("x")
    try:
        for k in range(40):
            folder = [tmp_path / f"m{k}", tmp_path / "a_file", tmp_path / "a_file" / "below", Path("/proc/refface")][
                k % 4
            ]
            code, err = run_cli(["download", "--dir", str(folder)])
            assert code == 1, err  # random bytes are never ReF-LDM's checkpoints
    finally:
        httpd.shutdown()
        httpd.server_close()


def random_array(rng: np.random.Generator, valid: np.ndarray):
    """``valid`` (a photo), or an array of a random shape and dtype, NaN and inf among its floats, or not an array."""
    if rng.random() < 0.4:
        return valid
    shape = [(0, 0, 3), (64, 64), (64, 64, 4), (64, 64, 1), (16, 16, 3), (5, 4000, 3), (120, 100, 3), (64, 64, 3)][
        rng.integers(8)
    ]
    dtype = [np.uint8, np.uint16, np.float32, np.float64, np.int64, bool][rng.integers(6)]
    array = (rng.random(shape) * (255 if dtype in (np.uint8, np.int64) else 1)).astype(dtype)
    if dtype in (np.float32, np.float64) and array.size and rng.random() < 0.5:
        array.flat[rng.integers(array.size)] = [np.nan, np.inf][rng.integers(2)]
    return array if rng.random() < 0.9 else [None, "photo.png", 3, torch.zeros(3, 8, 8)][rng.integers(4)]


def test_python_api_on_random_arrays_and_numbers(model_dir):
    rng = np.random.default_rng(7)
    restorer = RefFaceRestorer.from_pretrained(model_dir)
    analysis = load_face_analysis()
    photo = np.asarray(load_image(DATA / "obama.jpg").resize((160, 200)))
    context = restorer.encode_context([photo[:160, :160]])
    identity = analysis.main_embeddings([np.asarray(load_image(DATA / "obama.jpg"))], ["obama"])
    numbers = [float("nan"), float("inf"), -1.0, 0.0, 1, 1.5, 2**64, True, "2"]
    successes = errors = 0
    for _ in range(120):
        case = rng.integers(5)
        options = {"steps": 1}
        names = ["scale", "s_i", "s_c", "context_scale", "eta", "ref_slots", "seed"]
        for name in rng.choice(names, size=int(rng.integers(0, 2))):
            options[str(name)] = numbers[rng.integers(len(numbers))]
        try:
            if case == 0:
                restorer.restore(random_array(rng, photo), context, **options)
            elif case == 1:
                restorer.restore(
                    photo[:160, :160], [random_array(rng, photo) for _ in range(rng.integers(0, 3))], **options
                )
            elif case == 2:
                find_faces(analysis, random_array(rng, photo), identity)
            elif case == 3:
                prepare_references(analysis, [random_array(rng, photo) for _ in range(rng.integers(0, 3))], 64)
            else:
                seed = options.pop("seed", 1)
                restore_photo(restorer, analysis, random_array(rng, photo), identity, context, seeds=[seed], log=str,
                              **options)  # fmt: skip
            successes += 1
        except RefFaceError:
            errors += 1
    assert successes >= 5 and errors >= 30, (successes, errors)
