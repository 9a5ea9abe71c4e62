"""`refface bench --train`: the time and peak memory of training steps (forward, backward, optimizer), per freezing
choice, on random inputs at the model's size."""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model import DTYPES, RefFaceRestorer
from .config import DataConfig, TrainConfig
from .identity import ArcFace
from .trainer import TrainingModel, step_draws, trainable_parameters


def arcface_stand_in(dim: int) -> ArcFace:
    """A tiny random model with ArcFace's interface ([N,3,112,112] -> [N, dim]), when no real ONNX is given: the
    identity loss then costs less than with a real ArcFace (R50: about 6 GFLOP per 112² face)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal((64, 3, 8, 8)) * 0.05).astype(np.float32), "conv"),
        numpy_helper.from_array((rng.standard_normal((64, dim)) * 0.1).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["input.1", "conv"], ["c"], strides=[8, 8]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["fc1"]),
    ]
    graph = helper.make_graph(
        nodes, "arcface_stand_in",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", dim])], weights,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "arcface_stand_in.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
        return ArcFace.from_onnx(path)


def run_train_bench(
    model: RefFaceRestorer,
    farl: nn.Module | None,
    arcface: ArcFace | None,
    freeze: str = "context",
    batch: int = 1,
    refs: int = 1,
    gradient_checkpointing: bool = False,
    mixed_precision: str = "no",
    steps: int = 2,
) -> dict[str, Any]:
    """Time ``steps`` training steps (the first one warms up); report the last one and the peak memory."""
    device = model.device
    cuda = device.type == "cuda"
    identity_dim = model.context_encoder.identity_dim if model.context_encoder is not None else 512
    given = arcface is not None
    arcface = (arcface if given else arcface_stand_in(identity_dim)).to(device)
    config = TrainConfig(
        model="", output="", freeze=freeze, batch_size=batch, gradient_checkpointing=gradient_checkpointing,
        mixed_precision=mixed_precision, data=DataConfig(num_refs=refs, size=model.image_size),
    )  # fmt: skip
    params = trainable_parameters(model, freeze)
    training = TrainingModel(model, arcface, farl, config).to(device)
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-6)
    gen = torch.Generator().manual_seed(0)
    size = model.image_size
    hq, lq = (torch.rand(batch, 3, size, size, generator=gen).to(device) * 2 - 1 for _ in range(2))
    references = torch.rand(batch, refs, 3, size, size, generator=gen).to(device) * 2 - 1
    f = 2 ** (len(model.vq_config["block_out_channels"]) - 1)
    latent_shape = (model.vq_config["latent_channels"], size // f, size // f)
    autocast_dtype = DTYPES.get(mixed_precision)  # None for "no"
    seconds = []
    for step in range(steps):
        draws = {k: v.to(device) for k, v in step_draws(config, step, 0, 0, batch, latent_shape).items()}
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            losses = training(hq, lq, references, draws)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "config": {
            "device": str(device), "freeze": freeze, "batch": batch, "refs": refs, "image_size": size,
            "gradient_checkpointing": gradient_checkpointing, "mixed_precision": mixed_precision,
            "arcface": "given" if given else "stand-in",
        },
        "trainable_parameters": sum(p.numel() for p in params.values()),
        "seconds_per_step": seconds[-1],
        "first_step_seconds": seconds[0],
        "peak_mib": peak / 2**20,
        "peak_memory_kind": "CUDA max allocated in a step" if cuda else "process peak RSS (CPU)",
        "losses": {k: v.item() for k, v in losses.items()},
    }  # fmt: skip


def format_train_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return (
        f"training step · {cfg['device']} · freeze {cfg['freeze']} · batch {cfg['batch']} · {cfg['refs']} refs · "
        f"{cfg['image_size']}px · checkpointing {'on' if cfg['gradient_checkpointing'] else 'off'} · "
        f"mixed precision {cfg['mixed_precision']} · ArcFace {cfg['arcface']}\n"
        f"trainable parameters {result['trainable_parameters']:,}; {result['seconds_per_step']:.2f} s/step "
        f"(first {result['first_step_seconds']:.2f} s); peak {result['peak_mib']:.0f} MiB "
        f"({result['peak_memory_kind']})"
    )
