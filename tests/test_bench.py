"""`refface bench --suite` (dry runs on a tiny model) and `refface bench --baseline` (the same code at HEAD against
the working tree, on a tiny saved model)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from itertools import product
from pathlib import Path

import psutil
import pytest
from support import run_bounded, tiny_restorer

from refface_core import RefFaceRestorer, bench_suite
from refface_core.bench_baseline import CODE_ROOT, METRICS, git_toplevel
from refface_core.cli import main
from refface_core.errors import RefFaceError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "model"
    tiny_restorer(seed=2).save_pretrained(path)
    return path


def worktrees() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_suite_dry_run_prints_every_cell(name, tmp_path, capsys):
    report = tmp_path / "suite.json"
    assert main(["bench", "--suite", name, "--dry-run", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    result = json.loads(report.read_text())
    suite = bench_suite.SUITES[name]
    grid = list(product(suite.dtypes, suite.compiled, suite.batches, suite.refs, suite.guidances))
    cells = result["cells"]
    assert [(c["dtype"], c["compiled"], c["batch"], c["refs"], c["guidance"]) for c in cells] == grid
    rows = [line.split() for line in out.splitlines()]
    for c in cells:
        assert "error" not in c
        mode = "compiled" if c["compiled"] else "eager"
        assert [c["dtype"], mode, c["guidance"], str(c["batch"]), str(c["refs"])] in [row[:5] for row in rows]
        if "skipped" in c:
            assert c["compiled"] and f"compiled cells skipped: {c['skipped']}" in result["notes"]
        else:
            assert c["unet_call_s"] > 0 and c["reference_pass_s"] > 0 and c["unet_gflop"] > 0
            assert c["reference_passes"] == c["batch"] * c["refs"] + 1
            restore = c["restore_s"]
            fixed = c["vq_encode_s"] + c["reference_pass_s"] * c["reference_passes"] + c["decode_s"]
            assert restore["100"] == pytest.approx(fixed + 100 * c["unet_call_s"])
            assert c["faces_per_s"]["50"] == pytest.approx(c["batch"] / restore["50"])
            assert c["peak_tflops"] is None and c["unet_peak_fraction"] is None  # a CPU's peak is not known
    assert f"{len(grid)} cells" in out and result["dry_run"]


def test_dry_run_compiles_one_cell_per_precision(monkeypatch, capsys):
    switches = []
    monkeypatch.setattr(RefFaceRestorer, "set_compile", lambda self, enabled: switches.append(enabled), raising=False)
    monkeypatch.setitem(bench_suite.SUITES, "gpu", replace(bench_suite.SUITES["gpu"], refs=(1, 3), batches=(1,)))
    result = bench_suite.run_suite("gpu", dry_run=True)
    assert switches == [True, False, True, False]  # once per precision, and eager again afterwards
    compiled = [c for c in result["cells"] if c["compiled"]]
    assert [("skipped" in c) for c in compiled] == [False, True, True, True] * 2
    assert f"compiled cells skipped: {bench_suite.DRY_RUN_COMPILE}" in result["notes"]


def test_peak_tflops_by_device_name():
    assert bench_suite.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert bench_suite.peak_tflops("NVIDIA H100 PCIe", "fp16") == 756.0
    assert bench_suite.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert bench_suite.peak_tflops("NVIDIA H200 NVL", "bf16") is None
    assert bench_suite.peak_tflops("NVIDIA H100 80GB HBM3", "fp32") is None


def test_baseline_compares_head_with_the_working_tree(model_dir, tmp_path):
    before = worktrees()
    temp = tmp_path / "tmp"
    temp.mkdir()
    report = tmp_path / "compare.json"
    command = [sys.executable, "-m", "refface_core", "bench", "--baseline", "HEAD", "--model", str(model_dir),
               "--steps", "1", "--refs", "1", "--repeat", "1", "--timeout", "120", "--json", str(report)]  # fmt: skip
    done = run_bounded(command, timeout=240, cwd=ROOT, env=os.environ | {"TMPDIR": str(temp)})
    assert done.returncode == 0, done.stdout
    table = done.stdout[done.stdout.index("baseline HEAD") :]
    for name, unit, _ in METRICS:
        line = next(line for line in table.splitlines() if line.startswith(f"{name} ({unit})"))
        assert line.endswith("x")  # the ratio baseline/current
    result = json.loads(report.read_text())
    assert result["baseline"]["dtype"] == result["current"]["dtype"] == "float32"
    assert len(result["rounds"]) == 1 and set(result["rounds"][0]) == {"baseline", "current"}
    assert result["rounds"][0]["baseline"]["stages"]["sampling"]["unet_evals"] == 2  # the raw figures of each run
    assert all(m["ratio"] > 0 for m in result["metrics"].values())
    assert worktrees() == before and not list(temp.iterdir())  # the old code is gone


def test_baseline_unknown_ref_is_one_clear_line(capsys):
    assert main(["bench", "--baseline", "no-such-ref-14"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"refface: error: unknown git ref 'no-such-ref-14' in {git_toplevel(CODE_ROOT)}: give a commit, branch or tag"
    ]


def test_baseline_needs_a_git_checkout(tmp_path):
    with pytest.raises(RefFaceError, match="needs a git checkout of RefFace"):
        git_toplevel(tmp_path)


def test_baseline_run_failing_removes_the_worktree(tmp_path, capsys):
    before = worktrees()
    args = ["bench", "--baseline", "HEAD", "--model", str(tmp_path / "missing"), "--timeout", "120"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("refface: error: the HEAD benchmark failed: model folder not found")
    assert worktrees() == before


def test_baseline_interrupted_removes_the_worktree_and_stops_its_run(model_dir, tmp_path):
    before = worktrees()
    # 999 steps: a run long enough to interrupt (uniform spacing allows no more)
    command = [sys.executable, "-m", "refface_core", "bench", "--baseline", "HEAD", "--model", str(model_dir),
               "--steps", "999", "--timeout", "120"]  # fmt: skip
    # Ctrl-C as at a terminal, though the tests may run in the background, where SIGINT starts ignored
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    children = []
    try:
        deadline = time.monotonic() + 60
        while not children and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            children = [c for c in psutil.Process(process.pid).children() if "refface_core" in c.cmdline()]
        assert children, "the baseline run did not start"
        assert "refface-baseline-" in worktrees()
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
        assert code == 130, process.stderr.read().decode()[-3000:]  # what it said, should it end otherwise
    finally:
        for leftover in [process, *children]:
            if leftover.poll() is None if leftover is process else leftover.is_running():
                leftover.kill()
        process.wait()
    assert "refface: interrupted" in process.stderr.read().decode()
    assert psutil.wait_procs(children, timeout=10)[1] == []  # the run was killed with its process group
    assert worktrees() == before


def test_the_gpu_suite_compiles_only_refldms_setting():
    """Each compiled shape costs a compile: the GPU grid compiles 5 references with CFG, at both batch sizes."""
    gpu = bench_suite.SUITES["gpu"]
    compiled = [(n, g) for n in gpu.refs for g in gpu.guidances if bench_suite.in_compiled_subset(gpu, n, g)]
    assert compiled == [(5, "refldm")] and gpu.batches == (1, 8)
    cpu = bench_suite.SUITES["cpu"]
    assert all(bench_suite.in_compiled_subset(cpu, n, g) for n in cpu.refs for g in cpu.guidances)


def test_a_signal_during_the_child_start_is_raised_once_it_can_be_cleaned_up():
    from refface_core.bench_baseline import _signals_held

    with _signals_held() as held:
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C inside Popen: held, not raised there
        time.sleep(0.05)
    with pytest.raises(KeyboardInterrupt):
        held()
    with _signals_held() as held:
        pass
    held()  # nothing came: nothing raised
