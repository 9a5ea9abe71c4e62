"""`refface bench`: time each stage of a restore and report FLOPs, throughput and peak memory."""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .model import RefFaceRestorer
from .sampling import make_branches, make_solver, run_sampler


def count_flops(model: RefFaceRestorer, stage: Callable[[RefFaceRestorer, Callable], Any]) -> int:
    """FLOPs of ``stage`` run on a meta-device copy of the model: counted, not computed."""
    with torch.device("meta"):
        meta = RefFaceRestorer(model.unet_config, model.vq_config).to(model.dtype)
    with FlopCounterMode(display=False) as counter:
        stage(meta, lambda t: t.to("meta"))
    return counter.get_total_flops()


def run_bench(
    model: RefFaceRestorer,
    refs: int = 5,
    steps: int = 100,
    guidance: str = "refldm",
    solver: str = "ddim",
    spacing: str = "uniform",
    batch: int = 1,
    warmup: int | None = None,
    scale: float = 1.5,
    s_i: float = 1.2,
    s_c: float = 1.2,
    ref_slots: int | None = None,
) -> dict[str, Any]:
    """Benchmark one restore of ``batch`` faces with ``refs`` references each, on random inputs."""
    device = model.device
    cuda = device.type == "cuda"
    size = model.image_size
    gen = torch.Generator().manual_seed(0)
    lq = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    ref_images = torch.rand(batch, refs, 3, size, size, generator=gen) * 2 - 1
    branches = make_branches(guidance, refs, scale, s_i, s_c, ref_slots)
    rows = len(branches) * batch
    passes = batch * refs + any(b.refs is None for b in branches)

    def encode(m: RefFaceRestorer, put: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        return m.encode(put(lq)), m.encode_references(put(ref_images))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def timed(fn: Callable[[], Any]) -> tuple[Any, float, int]:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if cuda else 0
        return out, seconds, peak

    for _ in range(warmup if warmup is not None else (1 if cuda else 0)):
        lq_lat, ref_lat = encode(model, lambda t: t)
        denoise = model.denoiser(lq_lat, ref_lat, branches)
        run_sampler(denoise, torch.randn(lq_lat.shape, generator=gen).to(device), make_solver(solver, 2, spacing))
        model.decode(lq_lat)

    (lq_lat, ref_lat), t_encode, m_encode = timed(lambda: encode(model, lambda t: t))
    denoise, t_prep, m_prep = timed(lambda: model.denoiser(lq_lat, ref_lat, branches))
    x_T = torch.randn(lq_lat.shape, generator=gen).to(device)
    latent, t_sample, m_sample = timed(lambda: run_sampler(denoise, x_T, make_solver(solver, steps, spacing)))
    _, t_decode, m_decode = timed(lambda: model.decode(latent))
    timesteps = len(make_solver(solver, steps, spacing).timesteps)

    lat_shape, ref_shape = lq_lat.shape, ref_lat.shape
    f_encode = count_flops(model, encode)
    f_prep = count_flops(
        model, lambda m, put: m.denoiser(put(torch.zeros(lat_shape)), put(torch.zeros(ref_shape)), branches)
    )
    f_step = (
        count_flops(
            model,
            lambda m, put: m.denoiser(put(torch.zeros(lat_shape)), put(torch.zeros(ref_shape)), branches)(
                put(torch.zeros(lat_shape)), 500
            ),
        )
        - f_prep
    )
    f_decode = count_flops(model, lambda m, put: m.decode(put(torch.zeros(lat_shape))))

    stages = [
        ("vq_encode", t_encode, f_encode, 0, m_encode),
        ("reference_prep", t_prep, f_prep, passes, m_prep),
        ("sampling", t_sample, f_step * timesteps, rows * timesteps, m_sample),
        ("decode", t_decode, f_decode, 0, m_decode),
    ]
    result = {
        "config": {
            "device": torch.cuda.get_device_name(device)
            if cuda
            else f"cpu ({platform.processor() or 'x86_64'}, {torch.get_num_threads()} threads)",
            "dtype": str(model.dtype).removeprefix("torch."),
            "image_size": size,
            "batch": batch,
            "refs": refs,
            "steps": timesteps,
            "guidance": guidance,
            "solver": solver,
            "branches": len(branches),
            "torch": torch.__version__,
        },
        "stages": {
            name: {
                "seconds": round(seconds, 4),
                "unet_evals": evals,
                "gflop": round(flops / 1e9, 1),
                "tflops": round(flops / seconds / 1e12, 2) if seconds > 0 else None,
                "peak_mib": round(peak / 2**20, 1) if cuda else None,
            }
            for name, seconds, flops, evals, peak in stages
        },
    }
    total_seconds = sum(s[1] for s in stages)
    total_flops = sum(s[2] for s in stages)
    result["total"] = {
        "seconds": round(total_seconds, 4),
        "seconds_per_face": round(total_seconds / batch, 4),
        "unet_evals": sum(s[3] for s in stages),
        "gflop": round(total_flops / 1e9, 1),
        "tflops": round(total_flops / total_seconds / 1e12, 2),
        "peak_mib": round(max(s[4] for s in stages) / 2**20, 1)
        if cuda
        else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_memory_kind": "CUDA max allocated" if cuda else "process max RSS",
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    head = (
        f"{cfg['device']} · {cfg['dtype']} · batch {cfg['batch']} · {cfg['refs']} refs · {cfg['steps']} steps · "
        f"{cfg['guidance']} ({cfg['branches']} branches) · {cfg['solver']} · {cfg['image_size']}px"
    )
    lines = [head, f"{'stage':<16}{'seconds':>10}{'UNet evals':>12}{'GFLOP':>10}{'TFLOP/s':>9}{'peak MiB':>10}"]
    for name, s in [*result["stages"].items(), ("total", result["total"])]:
        peak = "-" if s["peak_mib"] is None else f"{s['peak_mib']:.0f}"
        tflops = "-" if s["tflops"] is None else f"{s['tflops']:.2f}"
        lines.append(f"{name:<16}{s['seconds']:>10.3f}{s['unet_evals']:>12}{s['gflop']:>10.0f}{tflops:>9}{peak:>10}")
    lines.append(
        f"per face: {result['total']['seconds_per_face']:.3f} s; peak memory: {result['total']['peak_memory_kind']}"
    )
    return "\n".join(lines)
