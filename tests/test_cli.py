"""`refface restore` and `refface bench` end to end on a tiny random model."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from support import tiny_restorer

from refface_core.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_restorer(seed=4).save_pretrained(root / "model")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "lq.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA").save(root / "ref1.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").convert("P").save(root / "ref2.png")
    (root / "notes.png").write_text("not an image")
    return root


def restore_args(files, out, *extra):
    """Aligned-crop mode: the files are random pictures, not photos with faces."""
    return ["restore", "--aligned", "--model", str(files / "model"), "--input", str(files / "lq.png"),
            "--ref", str(files / "ref1.png"), "--ref", str(files / "ref2.png"), "--out", str(out),
            "--steps", "3", *extra]  # fmt: skip


@pytest.mark.parametrize("extra", [[], ["--guidance", "multi_reference", "--solver", "dpmpp_2m", "--dtype", "bf16"]])
def test_restore_writes_a_valid_image(files, tmp_path, extra, capsys):
    out = tmp_path / "restored.png"
    assert main(restore_args(files, out, *extra)) == 0
    with Image.open(out) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
        pixels = np.asarray(im)
    assert pixels.std() > 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_restore_is_reproducible_from_the_seed(files, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(restore_args(files, a, "--seed", "9")) == 0
    assert main(restore_args(files, b, "--seed", "9")) == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize(
    "change, message",
    [
        (("--input", "missing.png"), "missing.png: no such file or folder"),
        (("--input", "notes.png"), "not a readable image"),
        (("--model", "."), "not a RefFace model folder"),
        (("--out", "restored.xyz"), "unknown image extension"),
        (("--steps", "0"), "steps must be in 1..1000"),
        (("--scale", "nan"), "guidance scale must be a finite number, got nan"),
        (("--s-i", "inf"), "s_i must be a finite number, got inf"),
        (("--s-c", "-inf"), "s_c must be a finite number, got -inf"),
        (("--context-scale", "nan"), "--context-scale must be a finite number, got nan"),
        (("--ref-slots", "100000"), "reference slots must be between 1 and 64, got 100000"),
        (("--seed", "-1"), "seed must be a whole number from 0 to 9223372036854775807"),
        (("--seed", str(2**64)), "seed must be a whole number from 0"),
        (("--out", "/proc/restored.png"), "cannot write into /proc"),  # unwritable, even for root
    ],
)
def test_restore_bad_input_is_one_clear_line(files, tmp_path, change, message, capsys):
    out = tmp_path / "restored.png"
    out.write_bytes(b"precious")
    args = restore_args(files, out, "--overwrite")  # a failed run leaves even a replaceable file as it was
    flag, value = change
    paths = {"--out": tmp_path, "--input": files, "--model": files}
    value = str(paths[flag] / value) if flag in paths else value
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args.append(f"{flag}={value}")  # "=": argparse takes "-inf" for an option otherwise
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the error
    assert err[-1].startswith("refface: error:") and message in err[-1]
    assert sum(line.startswith("refface: error:") for line in err) == 1 and "Traceback" not in "".join(err)
    assert out.read_bytes() == b"precious"  # the existing output is untouched


def test_bench_reports_stages(files, tmp_path, capsys):
    report = tmp_path / "bench.json"
    args = [
        "bench",
        "--model",
        str(files / "model"),
        "--refs",
        "3",
        "--steps",
        "4",
        "--batch",
        "2",
        "--guidance",
        "multi_reference",
        "--json",
        str(report),
    ]
    assert main(args) == 0
    result = json.loads(report.read_text())
    stages = result["stages"]
    assert list(stages) == ["vq_encode", "reference_prep", "sampling", "decode"]
    assert result["config"]["branches"] == 4  # s_i == s_c: N + 1
    assert stages["sampling"]["unet_evals"] == 4 * 4 * 2
    assert stages["reference_prep"]["unet_evals"] == 2 * 3 + 1
    assert all(s["seconds"] > 0 and s["gflop"] > 0 for s in stages.values())
    assert "per face" in capsys.readouterr().out


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "refface_core", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "restore" in result.stdout and "convert" in result.stdout


HEAVY = ("torch", "diffusers", "transformers", "cv2", "onnxruntime")


def test_help_and_argument_errors_import_nothing_heavy():
    code = f"""
import contextlib, io, sys
from refface_core.cli import build_parser, main
build_parser().parse_args(["restore", "--input", "a.jpg", "--ref", "b.jpg", "--out", "c.png"])
for argv in (["--help"], ["restore", "--help"], ["download", "--help"], ["restore", "--steps", "x"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print([name for name in {HEAVY!r} if name in sys.modules])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_device_choice_cuda_then_mps_then_cpu(monkeypatch):
    import torch

    from refface_core import RefFaceError
    from refface_core.model import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device() == (torch.device("mps"), torch.float32)
    assert pick_device("mps", "fp16") == (torch.device("mps"), torch.float16)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == (torch.device("cpu"), torch.float32)
    with pytest.raises(RefFaceError, match="MPS is not available"):
        pick_device("mps")
    with pytest.raises(RefFaceError, match="sees no CUDA GPU"):
        pick_device("cuda")
    with pytest.raises(RefFaceError, match="unknown device 'gpu'"):
        pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device() == (torch.device("cuda"), torch.float16)  # a GPU without bf16
    with pytest.raises(RefFaceError, match="there is no cuda:5: this machine has 1 CUDA GPU"):
        pick_device("cuda:5")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_plain_lines_in_a_log_and_a_bar_on_a_terminal():
    from refface_core.progress import Progress

    log = io.StringIO()
    progress = Progress(log, every=0)
    progress("loading the model")
    for step in range(1, 6):
        progress.step(step, 5)
    lines = log.getvalue().splitlines()
    assert lines[0] == "loading the model" and lines[-1].startswith("sampled 5 steps, ")
    assert [line.split(",")[0] for line in lines[1:-1]] == [f"sampling: step {i}/5" for i in (2, 3, 4)]

    terminal = Terminal()
    progress = Progress(terminal)
    for step in range(1, 6):
        progress.step(step, 5)
    assert "sampling: 100%" in terminal.getvalue() and progress.bar is None
    assert terminal.getvalue().rstrip().splitlines()[-1].startswith("sampled 5 steps, ")


def test_bench_reports_what_the_composite_context_adds(tmp_path, capsys):
    import torch
    from support import farl_state_dict, tiny_context_config

    model = tiny_restorer(seed=4)
    model.add_composite_context(tiny_context_config())
    model.save_pretrained(tmp_path / "cc")
    torch.save({"state_dict": farl_state_dict()}, tmp_path / "farl.pth")
    report = tmp_path / "bench.json"
    args = ["bench", "--model", str(tmp_path / "cc"), "--farl", str(tmp_path / "farl.pth"), "--refs", "2",
            "--steps", "2", "--json", str(report)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(report.read_text())
    assert "context_encode" in result["stages"] and result["stages"]["context_encode"]["gflop"] > 0
    context = result["context"]
    assert context["tokens_per_reference"] == 12 and context["encode_seconds_per_reference"] > 0
    assert context["extra_gflop_per_unet_call"] > 0 and context["unet_rows_per_call"] == 2
    assert "Composite Context: 12 tokens/reference" in capsys.readouterr().out
