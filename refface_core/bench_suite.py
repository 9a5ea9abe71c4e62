"""`refface bench --suite gpu|cpu`: a grid of precisions, compile modes, reference counts, guidance modes and batch
sizes timed in one command. Whole restores would take hours over such a grid, so each cell times a few guided UNet
calls and reference preparations, the VQ stages are measured once per precision, batch and reference count, and
restores are extrapolated from them: restore ≈ vq encode + reference pass·(batch·N+1) + steps·UNet call + decode.
``dry_run`` walks the same code path with a tiny model on the CPU, so that a broken suite costs no GPU time."""

from __future__ import annotations

import contextlib
import platform
import resource
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

import torch

from .bench import count_flops, meta_copy
from .choices import GUIDANCES
from .errors import RefFaceError
from .model import DTYPES, RefFaceRestorer, refldm_unet_config, refldm_vq_config
from .model.device import fast_cpu_bf16
from .sampling import make_branches

SCALE, S_I, S_C = 1.5, 1.2, 1.2  # the CLI's defaults
T = 500  # the timestep of a timed UNet call: its cost does not depend on it


@dataclass(frozen=True)
class Suite:
    """Each cell times ``calls`` UNet calls and reference preparations, after ``warmup`` untimed ones."""

    dtypes: tuple[str, ...]
    compiled: tuple[bool, ...]
    refs: tuple[int, ...]
    batches: tuple[int, ...]
    warmup: int
    calls: int
    guidances: tuple[str, ...] = GUIDANCES
    steps: tuple[int, ...] = (50, 100)  # extrapolated, not run
    compiled_refs: tuple[int, ...] = ()  # the reference counts compiled cells are timed at (default: all)
    compiled_guidances: tuple[str, ...] = GUIDANCES


SUITES = {
    # warm-up 3: CUDA graphs ("reduce-overhead") are recorded on a later call than the first
    # compiled: each new shape compiles, so only ReF-LDM's setting (5 references, its CFG) at both batch sizes
    "gpu": Suite(
        ("bf16", "fp16"),
        (False, True),
        (1, 3, 5, 8),
        (1, 8),
        warmup=3,
        calls=5,
        compiled_refs=(5,),
        compiled_guidances=("refldm",),
    ),
    # fp32: 11 minutes at full size on 2 AVX2 cores; bf16 only where the CPU has AMX (fast_cpu_bf16)
    "cpu": Suite(("fp32", "bf16"), (False,), (1, 5), (1, 4), warmup=1, calls=1),
}
COMPILED_SUBSET = "compiled at 5 references with refldm guidance only: every new shape compiles"
NO_FAST_BF16 = "cpu suite: bf16 skipped, this CPU has no AMX (bf16 convolutions run far slower than fp32 there)"
CPU_EAGER_ONLY = "cpu suite: eager only (inductor spends minutes compiling each new shape on a CPU)"
DRY_RUN_COMPILE = "dry run: one compiled cell per precision (inductor compiles each new shape on the CPU, slowly)"

# Dense (no sparsity) bf16/fp16 tensor-core peak in TFLOP/s by device name, first match wins; None: not known.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", None), ("H100", 989.0), ("H200 NVL", None), ("H200", 989.0))


def peak_tflops(device_name: str, dtype: str) -> float | None:
    if dtype not in ("bf16", "fp16"):
        return None
    return next((peak for name, peak in PEAK_TFLOPS if name in device_name), None)


def tiny_model() -> RefFaceRestorer:
    """The dry run's model: ReF-LDM's layout at 8 px with 32 channels. Tiny, because a CPU without bf16 kernels
    runs bf16 and fp16 convolutions through a slow fallback."""
    return RefFaceRestorer(
        refldm_unet_config(32, (1, 2), (False, True), 1, 8, sample_size=4), refldm_vq_config(32, (1, 2), 1, 8, 8, 64)
    )


def run_suite(name: str, dry_run: bool = False, on_cell: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Time every cell of suite ``name``. ``on_cell`` sees the result so far after each cell, so a long run shows
    progress and keeps what it measured if it is stopped. A failing cell is recorded and the grid goes on."""
    suite = SUITES[name]
    if not dry_run:
        return grid(name, suite, False, on_cell)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the dry run checks code, not speed: one thread waits on no other on a busy CPU
    try:
        return grid(name, replace(suite, warmup=0, calls=1), True, on_cell)
    finally:
        torch.set_num_threads(threads)


def grid(name: str, suite: Suite, dry_run: bool, on_cell: Callable[[dict], None] | None) -> dict[str, Any]:
    device = torch.device("cuda" if name == "gpu" and not dry_run else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RefFaceError("the gpu suite needs a CUDA GPU; --dry-run checks it on the CPU with a tiny model")
    cuda = device.type == "cuda"
    device_name = (
        torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    started = time.perf_counter()
    result: dict[str, Any] = {
        "suite": name,
        "dry_run": dry_run,
        "config": {"device": device_name, "torch": torch.__version__, "warmup": suite.warmup, "calls": suite.calls},
        "peak_memory_kind": "CUDA max allocated" if cuda else "process max RSS",
        "notes": [CPU_EAGER_ONLY] if name == "cpu" else [],
        "cells": [],
    }
    flops = None
    dtypes = suite.dtypes
    if device.type == "cpu" and not dry_run and not fast_cpu_bf16():
        dtypes = tuple(d for d in dtypes if d != "bf16")
        result["notes"].append(NO_FAST_BF16)
    for dtype in dtypes:
        torch.manual_seed(0)
        model = (tiny_model() if dry_run else RefFaceRestorer()).to(device, DTYPES[dtype]).eval()
        flops = flops or Flops(model)
        result["config"]["image_size"] = model.image_size
        vq: dict[tuple[int, int], dict[str, Any]] = {}  # per batch and reference count, shared by the cells
        decode_seconds: dict[int, float] = {}
        peak = peak_tflops(device_name, dtype)
        for compiled in suite.compiled:
            with compiling(model, compiled):
                for i, (batch, n, guidance) in enumerate(product(suite.batches, suite.refs, suite.guidances)):
                    cell = {"dtype": dtype, "compiled": compiled, "guidance": guidance, "batch": batch, "refs": n}
                    reason = None
                    if compiled and dry_run and i > 0:
                        reason = DRY_RUN_COMPILE
                    elif compiled and not dry_run and not in_compiled_subset(suite, n, guidance):
                        reason = COMPILED_SUBSET
                    if reason:
                        cell["skipped"] = reason
                        if (note := f"compiled cells skipped: {reason}") not in result["notes"]:
                            result["notes"].append(note)
                    else:
                        cell |= measure_cell(model, cell, vq, decode_seconds, suite, flops, peak)
                    result["cells"].append(cell)
                    if on_cell:
                        on_cell(result)
        del model, vq
        if cuda:
            torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def in_compiled_subset(suite: Suite, refs: int, guidance: str) -> bool:
    return (not suite.compiled_refs or refs in suite.compiled_refs) and guidance in suite.compiled_guidances


@contextlib.contextmanager
def compiling(model: RefFaceRestorer, enabled: bool) -> Iterator[None]:
    """The model's UNet compiled inside the block (the next cells run eager again, whatever happens)."""
    if not enabled:
        yield
        return
    model.set_compile(True)
    try:
        with torch._dynamo.config.patch(recompile_limit=64):  # past dynamo's 8 shapes, it would run eager unsaid
            yield
    finally:
        model.set_compile(False)


def measure_cell(
    model: RefFaceRestorer,
    cell: dict[str, Any],
    vq: dict[tuple[int, int], dict[str, Any]],
    decode_seconds: dict[int, float],
    suite: Suite,
    flops: Flops,
    peak: float | None,
) -> dict[str, Any]:
    """The cell's figures, or its error: running out of memory or failing to compile leaves the other cells' figures."""
    batch, n = cell["batch"], cell["refs"]
    cuda = model.device.type == "cuda"
    try:
        if (batch, n) not in vq:
            vq[batch, n] = measure_vq(model, batch, n, suite.warmup if cuda else 0, decode_seconds, flops)
        figures = time_cell(model, vq[batch, n], cell["guidance"], suite, flops)
        return figures | extrapolate(cell | figures, vq[batch, n], suite.steps, peak)
    except Exception as e:
        if cuda:
            torch.cuda.empty_cache()
        first_line = (str(e).strip().splitlines() or [""])[0]
        return {"error": f"{type(e).__name__}: {first_line}", "traceback": traceback.format_exc()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float:
    """CUDA max allocated since the last reset; on the CPU, the process's max RSS (it never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, calls: int) -> tuple[float, float, Any]:
    """(seconds of the ``warmup`` calls together, which include any compiling; the fastest of ``calls`` calls; what
    the last call returned)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    synchronize(device)
    warm, best = time.perf_counter() - start, float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return warm, best, out


class Flops:
    """FLOPs of stages by key, each counted once, on one meta-device copy of the model (building one takes a while)."""

    def __init__(self, model: RefFaceRestorer) -> None:
        self.meta = meta_copy(model)
        self.counts: dict[tuple, int] = {}

    def __call__(self, key: tuple, stage: Callable[[RefFaceRestorer, Callable], Any]) -> int:
        if key not in self.counts:
            self.counts[key] = count_flops(self.meta, stage)
        return self.counts[key]


def measure_vq(
    model: RefFaceRestorer, batch: int, n: int, warmup: int, decode_seconds: dict[int, float], flops: Flops
) -> dict[str, Any]:
    """VQ-encode ``batch`` random faces and their ``n`` references each, and decode ``batch`` latents (once per
    batch size): the latents feed the cells, the seconds and FLOPs the extrapolated restores."""
    device, size = model.device, model.image_size
    gen = torch.Generator().manual_seed(0)
    lq = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    refs = torch.rand(batch, n, 3, size, size, generator=gen) * 2 - 1

    def encode(m: RefFaceRestorer, put: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        return m.encode(put(lq)), m.encode_references(put(refs))

    def decode(m: RefFaceRestorer, put: Callable) -> torch.Tensor:
        return m.decode(put(lq_lat))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, encode_s, (lq_lat, ref_lat) = best_seconds(lambda: encode(model, lambda t: t), device, warmup, 1)
    if batch not in decode_seconds:
        decode_seconds[batch] = best_seconds(lambda: decode(model, lambda t: t), device, warmup, 1)[1]
    return {
        "lq": lq_lat,
        "refs": ref_lat,
        "vq_encode_s": encode_s,
        "decode_s": decode_seconds[batch],
        "vq_flops": flops(("encode", batch, n), encode) + flops(("decode", batch), decode),
        "peak_mib": peak_mib(device),
    }


def time_cell(model: RefFaceRestorer, vq: dict[str, Any], guidance: str, suite: Suite, flops: Flops) -> dict[str, Any]:
    """The fastest reference preparation and guided UNet call of one cell, and their FLOPs."""
    device = model.device
    lq, refs = vq["lq"], vq["refs"]
    batch, n = refs.shape[:2]
    branches = make_branches(guidance, n, SCALE, S_I, S_C)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def prepare_anew() -> Callable:  # with ∅'s pass, as a model's first restore: batch·N + 1 passes
        model.forget_empty_reference()
        return model.denoiser(lq, refs, branches)

    prep_warm, prep_s, denoise = best_seconds(prepare_anew, device, suite.warmup, suite.calls)
    x = torch.randn(lq.shape, generator=torch.Generator().manual_seed(0))
    call_warm, call_s, _ = best_seconds(lambda: denoise(x, T), device, suite.warmup, suite.calls)

    def prepare(m: RefFaceRestorer, put: Callable) -> Callable:
        return m.denoiser(put(torch.zeros(lq.shape)), put(torch.zeros(refs.shape)), branches)

    prep_flops = flops(("prep", guidance, batch, n), prepare)
    call_flops = flops(("both", guidance, batch, n), lambda m, put: prepare(m, put)(put(torch.zeros(lq.shape)), T))
    call_flops -= prep_flops
    return {
        "branches": len(branches),
        "unet_rows": len(branches) * batch,
        "reference_passes": batch * n + 1,
        "unet_call_s": call_s,
        "reference_pass_s": prep_s / (batch * n + 1),
        "warmup_s": prep_warm + call_warm,
        "unet_gflop": call_flops / 1e9,
        "reference_prep_gflop": prep_flops / 1e9,
        "peak_mib": max(vq["peak_mib"], peak_mib(device)),
    }


def extrapolate(cell: dict[str, Any], vq: dict[str, Any], steps: tuple[int, ...], peak: float | None) -> dict:
    """Whole restores at each step count from the cell's figures; TFLOP/s of the UNet call and of a restore."""
    batch, passes = cell["batch"], cell["reference_passes"]
    fixed = vq["vq_encode_s"] + cell["reference_pass_s"] * passes + vq["decode_s"]
    fixed_flops = vq["vq_flops"] + cell["reference_prep_gflop"] * 1e9
    restore = {str(s): fixed + s * cell["unet_call_s"] for s in steps}
    unet_tflops = cell["unet_gflop"] / 1e3 / cell["unet_call_s"]
    return {
        "vq_encode_s": vq["vq_encode_s"],
        "decode_s": vq["decode_s"],
        "restore_s": restore,
        "seconds_per_face": {s: t / batch for s, t in restore.items()},
        "faces_per_s": {s: batch / t for s, t in restore.items()},
        "unet_tflops": unet_tflops,
        "restore_tflops": {
            str(s): (fixed_flops + s * cell["unet_gflop"] * 1e9) / 1e12 / restore[str(s)] for s in steps
        },
        "peak_tflops": peak,
        "unet_peak_fraction": unet_tflops / peak if peak else None,
    }


def format_suite_header(result: dict[str, Any]) -> str:
    cfg = result["config"]
    title = "dry run, tiny model" if result["dry_run"] else "random full-size weights"
    return "\n".join(
        [
            f"bench suite {result['suite']} ({title}) · {cfg['device']} · torch {cfg['torch']} · "
            f"{cfg['warmup']} warm-up + {cfg['calls']} timed call(s) per cell · restores extrapolated",
            f"{'dtype':<6}{'mode':<9}{'guidance':<16}{'B':>3}{'N':>3}{'UNet s':>9}{'ref pass s':>11}"
            f"{'restore s 50/100':>19}{'s/face 50/100':>17}{'faces/s 50/100':>16}{'TFLOP/s':>9}{'% peak':>8}"
            f"{'peak MiB':>10}",
        ]
    )


def format_suite_row(cell: dict[str, Any]) -> str:
    head = (
        f"{cell['dtype']:<6}{'compiled' if cell['compiled'] else 'eager':<9}{cell['guidance']:<16}"
        f"{cell['batch']:>3}{cell['refs']:>3}"
    )
    if "skipped" in cell:
        return f"{head}  skipped: {cell['skipped']}"
    if "error" in cell:
        return f"{head}  failed: {cell['error']}"

    def pair(figures: dict[str, float]) -> str:
        return "/".join(f"{figures[s]:.3g}" for s in ("50", "100"))

    fraction = cell["unet_peak_fraction"]
    return (
        f"{head}{cell['unet_call_s']:>9.4f}{cell['reference_pass_s']:>11.4f}{pair(cell['restore_s']):>19}"
        f"{pair(cell['seconds_per_face']):>17}{pair(cell['faces_per_s']):>16}{cell['unet_tflops']:>9.3g}"
        f"{'-' if fraction is None else f'{100 * fraction:.1f}':>8}{cell['peak_mib']:>10.0f}"
    )


def format_suite_footer(result: dict[str, Any]) -> str:
    counts = {kind: sum(kind in c for c in result["cells"]) for kind in ("skipped", "error")}
    lines = [
        f"{len(result['cells'])} cells ({counts['skipped']} skipped, {counts['error']} failed) in "
        f"{result['seconds']:.0f} s; UNet s: one guided UNet call (all branches); TFLOP/s: of the UNet call, "
        f"% of the device's dense bf16/fp16 peak; peak memory: {result['peak_memory_kind']}",
        *(f"note: {note}" for note in result["notes"]),
    ]
    return "\n".join(lines)
