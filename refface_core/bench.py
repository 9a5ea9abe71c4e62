"""`refface bench`: time each stage of a restore and report FLOPs, throughput and peak memory."""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .model import RefFaceRestorer

if TYPE_CHECKING:
    from .context.farl import FaRLEncoder
from .sampling import make_branches, make_solver, run_sampler


def count_flops(model: RefFaceRestorer, stage: Callable[[RefFaceRestorer, Callable], Any]) -> int:
    """FLOPs of ``stage`` run on a meta-device copy of the model (on ``model`` if it is one): counted, not computed."""
    meta = model if model.device.type == "meta" else meta_copy(model)
    meta.forget_empty_reference()  # a reference preparation counts ∅'s pass, as the first one of a model makes it
    with FlopCounterMode(display=False) as counter:
        stage(meta, lambda t: t.to("meta"))
    return counter.get_total_flops()


def meta_copy(model: RefFaceRestorer) -> RefFaceRestorer:
    """The model's architecture without storage, for counting FLOPs (building one takes a while)."""
    with torch.device("meta"):
        return RefFaceRestorer(model.unet_config, model.vq_config, model.context_config).to(model.dtype)


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
    farl: FaRLEncoder | None = None,
) -> dict[str, Any]:
    """Benchmark one restore of ``batch`` faces with ``refs`` references each, on random inputs.
    For a model with Composite Context, ``farl`` defaults to a randomly initialised FaRL ViT-B/16."""
    device = model.device
    cuda = device.type == "cuda"
    size = model.image_size
    gen = torch.Generator().manual_seed(0)
    lq = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    ref_images = torch.rand(batch, refs, 3, size, size, generator=gen) * 2 - 1
    branches = make_branches(guidance, refs, scale, s_i, s_c, ref_slots)
    rows, passes = len(branches) * batch, batch * refs + 1
    solve = make_solver(solver, steps, spacing)
    timesteps = len(solve.timesteps)
    encoder = model.context_encoder
    if encoder is not None and farl is None:
        farl = random_farl().to(device=device, dtype=model.dtype)

    def encode(m: RefFaceRestorer, put: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        return m.encode(put(lq)), m.encode_references(put(ref_images))

    def encode_context() -> torch.Tensor:
        identity = torch.randn(batch * refs, encoder.identity_dim, generator=gen).to(device)
        appearance = farl.hidden_states(ref_images.flatten(0, 1).to(device), encoder.appearance_layers)
        return encoder(identity, appearance).unflatten(0, (batch, refs))

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
        tokens = encode_context() if encoder is not None else None
        denoise = model.denoiser(lq_lat, ref_lat, branches, tokens)
        run_sampler(denoise, torch.randn(lq_lat.shape, generator=gen).to(device), make_solver(solver, 2, spacing))
        model.decode(lq_lat)

    (lq_lat, ref_lat), t_encode, m_encode = timed(lambda: encode(model, lambda t: t))
    tokens, t_context, m_context = timed(encode_context) if encoder is not None else (None, 0.0, 0)
    f_context = 0
    if encoder is not None:
        with FlopCounterMode(display=False) as counter:
            encode_context()
        f_context = counter.get_total_flops()
    model.forget_empty_reference()  # timed as a model's first restore: with ∅'s pass, batch·refs + 1 in all
    denoise, t_prep, m_prep = timed(lambda: model.denoiser(lq_lat, ref_lat, branches, tokens))
    x_T = torch.randn(lq_lat.shape, generator=gen).to(device)
    latent, t_sample, m_sample = timed(lambda: run_sampler(denoise, x_T, solve))
    _, t_decode, m_decode = timed(lambda: model.decode(latent))

    lat_shape, ref_shape = lq_lat.shape, ref_lat.shape

    def step_flops(with_context: bool) -> int:
        def stage(m: RefFaceRestorer, put: Callable) -> None:
            ctx = put(tokens) if with_context else None
            m.denoiser(put(torch.zeros(lat_shape)), put(torch.zeros(ref_shape)), branches, ctx)(
                put(torch.zeros(lat_shape)), 500
            )

        return count_flops(model, stage)

    f_encode = count_flops(model, encode)
    f_prep = count_flops(
        model, lambda m, put: m.denoiser(put(torch.zeros(lat_shape)), put(torch.zeros(ref_shape)), branches)
    )
    f_step = step_flops(encoder is not None) - f_prep
    f_decode = count_flops(model, lambda m, put: m.decode(put(torch.zeros(lat_shape))))

    stages = [
        ("vq_encode", t_encode, f_encode, 0, m_encode),
        ("reference_prep", t_prep, f_prep, passes, m_prep),
        ("sampling", t_sample, f_step * timesteps, rows * timesteps, m_sample),
        ("decode", t_decode, f_decode, 0, m_decode),
    ]
    if encoder is not None:
        stages.insert(1, ("context_encode", t_context, f_context, 0, m_context))
    result = {
        "config": {
            "device": torch.cuda.get_device_name(device)
            if cuda
            else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
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
    if encoder is not None:
        plain = model.denoiser(lq_lat, ref_lat, branches)
        with_context = [timed(lambda: denoise(x_T, 500))[1] for _ in range(3)]
        without = [timed(lambda: plain(x_T, 500))[1] for _ in range(3)]
        result["context"] = {
            "tokens_per_reference": encoder.num_tokens,
            "encode_seconds_per_reference": round(t_context / (batch * refs), 4),
            "extra_seconds_per_unet_call": round(min(with_context) - min(without), 4),
            "extra_gflop_per_unet_call": round((f_step - (step_flops(False) - f_prep)) / 1e9, 2),
            "unet_rows_per_call": rows,
        }
    return result


def random_farl() -> FaRLEncoder:
    """FaRL's architecture (CLIP ViT-B/16 at 224 px) with random weights, for timing."""
    from transformers import CLIPVisionConfig

    from .context.farl import FaRLEncoder

    return FaRLEncoder(CLIPVisionConfig(patch_size=16, hidden_act="quick_gelu", projection_dim=512))


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
    if c := result.get("context"):
        lines.append(
            f"Composite Context: {c['tokens_per_reference']} tokens/reference, encoder "
            f"{c['encode_seconds_per_reference']:.3f} s/reference, +{c['extra_seconds_per_unet_call']:.3f} s and "
            f"+{c['extra_gflop_per_unet_call']:.1f} GFLOP per UNet call ({c['unet_rows_per_call']} rows)"
        )
    return "\n".join(lines)
