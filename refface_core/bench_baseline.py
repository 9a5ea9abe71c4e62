"""`refface bench --baseline GITREF`: the same benchmark run by an older commit's code and by this code, in turns,
each in a process of its own, so that one table says what a change bought. The old code lives only in a temporary
git worktree, removed afterwards, whatever happens. No torch here: the work is done by the two processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import RefFaceError

HELD = (signal.SIGINT, signal.SIGTERM)

CODE_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds refface_core/
GIT_SECONDS = 120

# What a baseline's `bench` understands: the options of commit c46eb7e, the oldest baseline. (dest, takes a value)
BASELINE_OPTIONS = (
    ("model", True), ("refs", True), ("batch", True), ("warmup", True), ("composite_context", False),
    ("farl", True), ("steps", True), ("spacing", True), ("solver", True), ("guidance", True), ("scale", True),
    ("s_i", True), ("s_c", True), ("ref_slots", True), ("device", True), ("dtype", True),
)  # fmt: skip


def _seconds(stage: str, per: str | None = None) -> Callable[[dict], float]:
    """A stage's seconds from one run's JSON, divided by its UNet evaluations (``per="evals"``) or steps."""

    def figure(run: dict) -> float:
        seconds = run["stages"][stage]["seconds"]
        if per == "evals":
            return seconds / run["stages"][stage]["unet_evals"]
        return seconds / run["config"]["steps"] if per == "steps" else seconds

    return figure


# (name, unit, figure from one run's JSON)
METRICS: tuple[tuple[str, str, Callable[[dict], float]], ...] = (
    ("guided UNet eval", "s", _seconds("sampling", "steps")),
    ("reference pass", "s", _seconds("reference_prep", "evals")),
    ("whole restore", "s", lambda run: run["total"]["seconds"]),
    ("vq encode", "s", _seconds("vq_encode")),
    ("decode", "s", _seconds("decode")),
    ("peak memory", "MiB", lambda run: run["total"]["peak_mib"]),
)


def baseline_argv(options: dict[str, Any]) -> list[str]:
    """The ``bench`` options (argparse dests) that a baseline understands, as arguments; paths made absolute, since
    each run has its own working folder. Options a baseline lacks are never passed: it would refuse them."""
    argv = []
    for dest, takes_value in BASELINE_OPTIONS:
        value = options.get(dest)
        flag = "--" + dest.replace("_", "-")
        if value is None or value is False:
            continue
        if not takes_value:
            argv.append(flag)
            continue
        argv.append(f"{flag}={Path(value).resolve() if isinstance(value, Path) else value}")  # "=": "-1" stays a value
    return argv


def compare(gitref: str, argv: list[str], repeat: int = 2, timeout: float = 3600.0) -> dict[str, Any]:
    """Run ``bench argv`` with the code at ``gitref`` and with this code, baseline first, ``repeat`` times each in
    turns (A B A B), so that a machine growing slower or faster over the runs weighs on both sides alike."""
    if repeat < 1:
        raise RefFaceError(f"--repeat must be at least 1, got {repeat}")
    top = git_toplevel(CODE_ROOT)
    commit = resolve(top, gitref)
    relative = CODE_ROOT.relative_to(top)
    bench_module = (relative / "refface_core" / "cli" / "bench.py").as_posix()
    if git(top, "cat-file", "-e", f"{commit}:{bench_module}", check=False) is None:
        raise RefFaceError(f"{gitref} has no `refface bench` ({bench_module}) to compare with")
    current = git(top, "describe", "--always", "--dirty") or "?"
    folder = Path(tempfile.mkdtemp(prefix="refface-baseline-"))
    tree = folder / "tree"
    try:
        git(top, "worktree", "add", "--detach", "--quiet", str(tree), commit)
        rounds = []
        for i in range(repeat):
            rounds.append(
                {
                    "baseline": run_bench_process(tree / relative, argv, folder / f"baseline{i}.json", timeout, gitref),
                    "current": run_bench_process(CODE_ROOT, argv, folder / f"current{i}.json", timeout, "current"),
                }
            )
    finally:
        remove_worktree(top, tree)
        shutil.rmtree(folder, ignore_errors=True)
    return summarise(rounds, {"ref": gitref, "commit": commit}, {"code": str(CODE_ROOT), "commit": current})


def summarise(rounds: list[dict], baseline: dict, current: dict) -> dict[str, Any]:
    """Best of the rounds per side, and baseline/current (above 1: the current code is faster or smaller)."""
    for side, info in (("baseline", baseline), ("current", current)):
        config = rounds[0][side]["config"]
        info |= {"dtype": config["dtype"], "device": config["device"]}
    metrics = {}
    for name, unit, figure in METRICS:
        best = {side: min(figure(r[side]) for r in rounds) for side in ("baseline", "current")}
        ratio = best["baseline"] / best["current"] if best["current"] else None
        metrics[name] = {"unit": unit, **best, "ratio": ratio}
    kind = rounds[0]["current"]["total"]["peak_memory_kind"]
    return {"baseline": baseline, "current": current, "peak_memory_kind": kind, "metrics": metrics, "rounds": rounds}


def format_comparison(result: dict[str, Any]) -> str:
    base, cur = result["baseline"], result["current"]
    lines = [
        f"baseline {base['ref']} ({base['commit'][:10]}, {base['dtype']}) vs current ({cur['commit']}, "
        f"{cur['dtype']}) · {cur['device']} · best of {len(result['rounds'])} round(s)",
        f"{'metric':<22}{'baseline':>12}{'current':>12}{'baseline/current':>18}",
    ]
    for name, m in result["metrics"].items():
        label = f"{name} ({m['unit']})"
        ratio = "-" if m["ratio"] is None else f"{m['ratio']:.2f}x"
        lines.append(f"{label:<22}{m['baseline']:>12.4g}{m['current']:>12.4g}{ratio:>18}")
    lines.append(f"peak memory: {result['peak_memory_kind']}; above 1x: the current code is faster (or smaller)")
    if base["dtype"] != cur["dtype"]:
        lines.append(f"note: the two sides ran in different precisions ({base['dtype']} vs {cur['dtype']})")
    return "\n".join(lines)


def run_bench_process(root: Path, argv: list[str], json_path: Path, timeout: float, side: str) -> dict[str, Any]:
    """``python -m refface_core bench`` with the code in ``root`` (its working folder and first on PYTHONPATH), in a
    process group of its own that is killed if it runs past ``timeout`` or this process is interrupted."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "refface_core", "bench", *argv, "--json", str(json_path)]
    print(f"refface bench: running the {side} code ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryFile() as log:
        with _signals_held() as held:  # Ctrl-C inside Popen would leave its child running, in a session of its own
            process = subprocess.Popen(
                command, cwd=root, env=os.environ | {"PYTHONPATH": path}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            held()
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RefFaceError(f"the {side} benchmark ran past {timeout:g} s (--timeout) and was stopped") from None
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.seek(0)
        output = log.read().decode(errors="replace").strip().splitlines()
    if code != 0:
        last = output[-1] if output else f"exit status {code}"
        raise RefFaceError(f"the {side} benchmark failed: {last.removeprefix('refface: error: ')}")
    return json.loads(json_path.read_text())


@contextlib.contextmanager
def _signals_held() -> Iterator[Callable[[], None]]:
    """Hold SIGINT and SIGTERM while the block runs; the callable it yields raises one that came meanwhile, as its
    own handler would have, once the caller is ready to clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    caught: list[int] = []

    def release() -> None:
        if caught:
            signal.raise_signal(caught[0])

    handlers = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in HELD}
    try:
        yield release
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def git(top: Path, *args: str, check: bool = True) -> str | None:
    """A git command's output; on failure an error (``check``) or None."""
    try:
        done = subprocess.run(["git", "-C", str(top), *args], capture_output=True, text=True, timeout=GIT_SECONDS)
    except FileNotFoundError:
        raise RefFaceError("--baseline needs git, which is not installed") from None
    except subprocess.TimeoutExpired:
        raise RefFaceError(f"git {args[0]} took over {GIT_SECONDS} s") from None
    if done.returncode != 0:
        if check:
            raise RefFaceError(f"git {args[0]} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return None
    return done.stdout.strip()


def git_toplevel(root: Path) -> Path:
    top = git(root, "rev-parse", "--show-toplevel", check=False)
    if top is None or git(root, "ls-files", "--error-unmatch", "refface_core/__main__.py", check=False) is None:
        raise RefFaceError(f"--baseline needs a git checkout of RefFace; the code in {root} is not one")
    return Path(top).resolve()


def resolve(top: Path, gitref: str) -> str:
    commit = (
        None
        if gitref.startswith("-")
        else git(top, "rev-parse", "--verify", "--quiet", f"{gitref}^{{commit}}", check=False)
    )
    if not commit:
        raise RefFaceError(f"unknown git ref {gitref!r} in {top}: give a commit, branch or tag")
    return commit


def remove_worktree(top: Path, tree: Path) -> None:
    """Remove the temporary worktree and its registration, even half made (interrupted while being added)."""
    if git(top, "worktree", "remove", "--force", str(tree), check=False) is None:
        shutil.rmtree(tree, ignore_errors=True)
        git(top, "worktree", "prune", check=False)
