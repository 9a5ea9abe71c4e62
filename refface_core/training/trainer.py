"""Fine-tuning with Composite Context and the Hard Example Identity loss, on HF accelerate (one GPU, or DDP or FSDP2
through `accelerate launch`). Every random draw derives from (seed, step, process), so a run resumed from a checkpoint
continues exactly."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import RefFaceError
from ..faces.align import FFHQ_TEMPLATE_512
from ..files import check_writable_folder
from ..images import save_image
from ..model import RefFaceRestorer
from ..model.unet import KVRecorder, unet_forward
from ..sampling import refldm_alphas_cumprod
from ..sampling.schedule import TRAIN_STEPS
from .config import TrainConfig
from .identity import ArcFace, hid_loss

CHECKPOINTS = "checkpoints"


def trainable_parameters(restorer: RefFaceRestorer, freeze: str) -> dict[str, nn.Parameter]:
    """The parameters ``freeze`` leaves trainable ("context", "context_attention" or "full"); the rest are frozen."""
    restorer.requires_grad_(False)
    has_context = restorer.context_encoder is not None
    if freeze in ("context", "context_attention") and not has_context:
        raise RefFaceError(
            f"freeze: {freeze} trains the Composite Context layers, which this model lacks; convert it with "
            "`refface convert --add-composite-context`, or train the full UNet (freeze: full)"
        )

    def chosen(name: str) -> bool:
        if name.startswith("context_encoder."):
            return True
        if name.startswith("unet."):
            if freeze == "full":
                return True
            in_attention = ".attentions." in name
            return in_attention and ("_ctx" in name or freeze == "context_attention")
        return False  # the VQ autoencoder stays frozen

    params = {name: p for name, p in restorer.named_parameters() if chosen(name)}
    for p in params.values():
        p.requires_grad_(True)
    return params


def estimate_norm_quietly(landmarks: np.ndarray, size: int) -> np.ndarray:
    """insightface's 2×3 transform onto ArcFace's template, without scikit-image's deprecation warning."""
    from insightface.utils.face_align import estimate_norm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return estimate_norm(landmarks, size)


def arcface_crops(faces: torch.Tensor) -> torch.Tensor:
    """FFHQ-aligned crops [B,3,S,S] -> ArcFace's 112×112 alignment (insightface's norm_crop of the template)."""
    scale = np.sqrt(abs(np.linalg.det(estimate_norm_quietly(FFHQ_TEMPLATE_512, 112)[:, :2])))  # per 512-crop px
    size, unscaled = faces.shape[-1], round(512 * scale)  # the crop size the warp neither shrinks nor enlarges
    if size > unscaled:  # shrink with antialiasing first, as norm_crop's source photo would be sampled
        faces = F.interpolate(faces, size=(unscaled, unscaled), mode="bilinear", antialias=True, align_corners=False)
        size = unscaled
    to_112 = np.vstack([estimate_norm_quietly(FFHQ_TEMPLATE_512 * size / 512, 112), [0, 0, 1]])
    back = np.linalg.inv(to_112)[:2]  # output pixel -> source pixel
    # affine_grid works in [-1, 1] coordinates (align_corners=False): convert pixel maps on both sides
    out_to_px = np.array([[112 / 2, 0, 112 / 2 - 0.5], [0, 112 / 2, 112 / 2 - 0.5], [0, 0, 1]])
    px_to_in = np.array([[2 / size, 0, 1 / size - 1], [0, 2 / size, 1 / size - 1], [0, 0, 1]])
    theta = torch.tensor((px_to_in @ np.vstack([back, [0, 0, 1]]) @ out_to_px)[:2], dtype=faces.dtype)
    grid = F.affine_grid(theta.expand(len(faces), 2, 3).to(faces.device), [len(faces), 3, 112, 112], False)
    return F.grid_sample(faces, grid, mode="bilinear", padding_mode="border", align_corners=False)


def full_precision(like: torch.Tensor) -> torch.autocast:
    return torch.autocast(like.device.type, enabled=False)


class TrainingModel(nn.Module):
    """One training step's forward: the loss of ε-prediction plus the weighted HID term. DDP or FSDP wraps this module,
    so gradients of everything trainable inside are synchronised."""

    def __init__(self, restorer: RefFaceRestorer, arcface: ArcFace | None, farl: nn.Module | None, config: TrainConfig):
        super().__init__()
        self.restorer, self.arcface, self.farl, self.config = restorer, arcface, farl, config
        self.register_buffer("alphas_cumprod", refldm_alphas_cumprod(), persistent=False)

    def context_tokens(self, refs: torch.Tensor) -> torch.Tensor | None:
        """Composite Context tokens [B,N,L,D] of references [B,N,3,S,S] (None for a model without the layers)."""
        encoder = self.restorer.context_encoder
        if encoder is None:
            return None
        faces = refs.flatten(0, 1)
        with torch.no_grad(), full_precision(refs):
            identity = F.normalize(self.arcface(arcface_crops(faces)).float(), dim=-1)
            appearance = self.farl.hidden_states(faces, encoder.appearance_layers)
        return encoder(identity, appearance).unflatten(0, refs.shape[:2])

    def forward(
        self, hq: torch.Tensor, lq: torch.Tensor, refs: torch.Tensor, draws: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        restorer, config = self.restorer, self.config
        vq = restorer.vq
        b, n = refs.shape[:2]
        with torch.no_grad(), full_precision(hq):  # targets and frozen encoders stay out of mixed precision
            z0 = vq.encode(hq).latents
            lq_latent = vq.encode(lq).latents * draws["keep_lq"].view(b, 1, 1, 1)
            ref_latents = restorer.encode_references(refs) * draws["keep_context"].view(b, 1, 1, 1, 1)
            # the x_HQ target: what the model can reach at best
            hq_reconstruction = vq.decode(z0).sample if config.hid_weight > 0 else None
        context = None
        tokens = self.context_tokens(refs)
        if tokens is not None:
            tokens = tokens * draws["keep_context"].view(b, 1, 1, 1).to(tokens.dtype)  # ∅: all-zero tokens
            context = (tokens.flatten(1, 2), 1.0)

        t = draws["t"]
        ab = self.alphas_cumprod[t].view(b, 1, 1, 1)
        x_t = ab.sqrt() * z0 + (1 - ab).sqrt() * draws["noise"]
        unet = restorer.unet
        recorder = KVRecorder()
        ref_rows = torch.cat([ref_latents.flatten(0, 1), torch.zeros_like(ref_latents.flatten(0, 1))], dim=1)
        with torch.set_grad_enabled(config.freeze != "context"):  # context layers do not act in the reference pass
            unet_forward(unet, ref_rows, torch.zeros(b * n, dtype=torch.long, device=t.device), recorder, None,
                         config.gradient_checkpointing)  # fmt: skip
        cache = recorder.gather(torch.arange(b * n, device=t.device).view(b, n))
        eps = unet_forward(unet, torch.cat([x_t, lq_latent], dim=1), t, cache, context, config.gradient_checkpointing)
        eps_loss = F.mse_loss(eps.float(), draws["noise"])
        losses = {"eps": eps_loss, "loss": eps_loss}
        if config.hid_weight > 0:
            x0 = (x_t - (1 - ab).sqrt() * eps.float()) / ab.sqrt()
            # straight-through quantisation keeps the gradient; the decoder's activations are the largest cost of a
            # step at 512², so gradient checkpointing recomputes them too
            decode = lambda latent: vq.decode(latent).sample  # noqa: E731
            if config.gradient_checkpointing:
                restored = torch.utils.checkpoint.checkpoint(decode, x0.to(vq.dtype), use_reentrant=False)
            else:
                restored = decode(x0.to(vq.dtype))
            with full_precision(x0):
                hid = hid_loss(self.arcface, restored.float(), hq_reconstruction.float(), refs[:, 0].float(),
                               config.hid_lambda)  # fmt: skip
            losses["hid"] = (hid * ab.view(b).sqrt()).mean()
            losses["loss"] = eps_loss + config.hid_weight * losses["hid"]
        return losses


def step_draws(
    config: TrainConfig, step: int, micro: int, process: int, b: int, latent_shape: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """The step's timesteps, noise and dropout masks, from (seed, step, micro-batch, process) alone."""
    g = torch.Generator().manual_seed(hash((config.seed, step, micro, process)) % 2**63)
    return {
        "t": torch.randint(0, TRAIN_STEPS, (b,), generator=g),
        "noise": torch.randn((b, *latent_shape), generator=g),
        "keep_lq": (torch.rand(b, generator=g) >= config.lq_dropout).float(),
        "keep_context": (torch.rand(b, generator=g) >= config.context_dropout).float(),
    }


def batches(
    dataset: torch.utils.data.Dataset, config: TrainConfig, start: int, process: int, processes: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(sample indices, micro-batch) from micro-batch ``start`` on: a fresh permutation per epoch, sharded across
    processes, so a resumed run sees the very batches it would have seen."""
    per_epoch = len(dataset) // processes // config.batch_size
    if per_epoch == 0:
        raise RefFaceError(
            f"{len(dataset)} training samples cannot fill one batch of {config.batch_size} on {processes} processes"
        )
    epoch, offset = divmod(start, per_epoch)
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
        shard = order[process::processes][: per_epoch * config.batch_size].view(per_epoch, config.batch_size)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        rows = shard[offset:].tolist()
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=rows, num_workers=config.data.workers)
        yield from zip(rows, loader, strict=True)
        epoch, offset = epoch + 1, 0


def gathered(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """The full tensors on the CPU where ``keep``, else nothing. FSDP shards are gathered one at a time (a collective:
    every process calls this, in one order), so a process never holds more than one whole tensor on its device."""
    kept = {}
    for name, tensor in tensors.items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if keep:
            kept[name] = full.detach().cpu().contiguous()
    return kept


def placed_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` on ``like``'s device, as this process's shard if ``like`` is an FSDP shard."""
    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full.to(like.device)


class EMA:
    """Moving average of the trained weights, with ReF-LDM's warm-up: decay min(d, (1 + n) / (10 + n)). Under FSDP
    each process averages its own shard."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter]) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - decay)


def save_checkpoint(
    folder: Path | None,
    step: int,
    params: dict[str, nn.Parameter],
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    run: dict[str, Any],
    loss_scale: dict[str, Any] | None = None,
) -> None:
    """model, EMA and optimizer state as safetensors; the step, the fp16 loss scale and what makes the run's batches
    and draws (``run``) as JSON. Written beside and renamed into place. Every process calls it (FSDP gathers the
    shards); the one given a ``folder`` writes."""
    names, keep = list(params), folder is not None
    tensors = {
        "model": gathered(params, keep),
        "ema": gathered(ema.shadow, keep),
        "optimizer": gathered(
            {
                f"{names[i]}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
                for i, state in optimizer.state_dict()["state"].items()
                for key, value in state.items()
            },
            keep,
        ),
    }
    if folder is None:
        return
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for kind, values in tensors.items():
        save_file(values, tmp / f"{kind}.safetensors")
    state = {"step": step, "ema_updates": ema.updates, "run": run, "loss_scale": loss_scale}
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def export_whole(model: RefFaceRestorer, final: Path) -> None:
    """``model`` saved beside ``final`` and renamed into place, so ``final`` is either whole or absent; a folder that
    is already there (put there during the run: train() refuses one up front) is never replaced."""
    tmp = final.with_name(final.name + ".partial")  # a leftover is an export that did not finish
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
    except OSError as e:
        raise RefFaceError(
            f"cannot write the trained model to {tmp} ({e.strerror or e}); make room, then run again with --resume: "
            "the last checkpoint holds it"
        ) from None
    try:
        tmp.rename(final)
    except OSError as e:
        raise RefFaceError(
            f"cannot put the trained model in place as {final} ({e.strerror}); it is saved whole as {tmp}: move it "
            f"elsewhere, as the next run into {final.parent} deletes that folder"
        ) from None


def load_checkpoint(
    folder: Path, params: dict[str, nn.Parameter], ema: EMA, optimizer: torch.optim.Optimizer, run: dict[str, Any]
) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote, if ``run`` is the same run; returns its state.json."""
    try:
        state = json.loads((folder / "state.json").read_text())
        weights, shadow = load_file(folder / "model.safetensors"), load_file(folder / "ema.safetensors")
        moments = load_file(folder / "optimizer.safetensors")
    except (OSError, ValueError) as e:
        raise RefFaceError(f"cannot resume from {folder}: {e}") from None
    changed = [f"{k}: {state['run'].get(k)!r} -> {v!r}" for k, v in run.items() if state["run"].get(k) != v]
    if changed:
        raise RefFaceError(
            f"cannot resume {folder} exactly: the run changed ({'; '.join(changed)}); restore those settings, "
            "or start a new run in another output folder"
        )
    if set(weights) != set(params):
        raise RefFaceError(f"the checkpoint {folder} trained other parameters than this model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(placed_like(weights[name].to(p.dtype), p))
    ema.shadow = {name: placed_like(shadow[name], p) for name, p in params.items()}
    ema.updates = state["ema_updates"]
    saved = optimizer.state_dict()
    saved["state"] = {}
    for i, (name, p) in enumerate(params.items()):
        mine = {key.removeprefix(name + "."): v for key, v in moments.items() if key.startswith(name + ".")}
        if mine:  # the moments are sharded like the parameter; the step count is not
            saved["state"][i] = {k: v if k == "step" else placed_like(v, p) for k, v in mine.items()}
    optimizer.load_state_dict(saved)
    return state


def latest_checkpoint(output: Path) -> Path | None:
    found = sorted((output / CHECKPOINTS).glob("step_*[0-9]"))
    return found[-1] if found else None


@torch.no_grad()
def sample_grid(model: TrainingModel, batch: dict[str, torch.Tensor], config: TrainConfig) -> Image.Image:
    """An image for a person to look at: per sample, LQ | restored | HQ | first reference."""
    restorer = model.restorer
    restorer.forget_empty_reference()  # FSDP unshards the trained weights into the same tensors
    device = restorer.device
    hq, lq, refs = (batch[k].to(device) for k in ("hq", "lq", "refs"))
    ref_latents = restorer.encode_references(refs)
    tokens = model.context_tokens(refs)
    latent = restorer.sample(
        restorer.encode(lq), ref_latents, steps=config.sample_steps, ref_tokens=tokens,
        generator=torch.Generator().manual_seed(config.seed),
    )  # fmt: skip
    restored = restorer.decode(latent)
    size = hq.shape[-1]
    columns = [lq, F.interpolate(restored, size=(size, size), mode="bilinear"), hq, refs[:, 0]]
    grid = torch.cat([torch.cat(list(column), dim=1) for column in columns], dim=2)  # [3, B·S, 4·S]
    return Image.fromarray(((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


def fsdp_plugin(frozen: list[nn.Module]) -> Any:
    """The plugin when `accelerate launch` asks for FSDP, fitted to this model: FSDP2 with the whole model as one unit
    (optimizer state and EMA sharded; units per ResNet block, each run twice a step by the reference and main passes,
    lost the last block's gradients in the first step of a bf16 test), the ``frozen`` encoders whole on every process,
    and fp32 weights under accelerate's autocast, as with DDP."""
    from accelerate.utils import FullyShardedDataParallelPlugin, parse_flag_from_env
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return None
    if int(os.environ.get("FSDP_VERSION", "2")) != 2:
        raise RefFaceError(
            "training shards with FSDP2: set `fsdp_version: 2` in `accelerate config`, or pass `--fsdp_version 2` "
            "to `accelerate launch`"
        )
    if parse_flag_from_env("FSDP_OFFLOAD_PARAMS"):
        raise RefFaceError(
            "FSDP parameter offload is not supported (the sharded training state of this model fits on a GPU); "
            "turn it off in `accelerate config`"
        )
    if parse_flag_from_env("FSDP_ACTIVATION_CHECKPOINTING"):
        raise RefFaceError(
            "FSDP's activation checkpointing wraps and renames the UNet's modules; turn it off in `accelerate config` "
            "and set `gradient_checkpointing: true` in the training config instead"
        )
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="no_wrap", mixed_precision_policy=MixedPrecisionPolicy(),
        ignored_modules=frozen, cpu_ram_efficient_loading=False, activation_checkpointing=False,
    )  # fmt: skip


@contextmanager
def whole_root(model: nn.Module) -> Iterator[None]:
    """Under FSDP, the root unit's weights gathered for a use that does not run its forward (sampling); every process
    enters it. Elsewhere, nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def build_dataset(config: TrainConfig) -> torch.utils.data.Dataset:
    from ..faces import load_face_analysis
    from .datasets import FFHQRefDataset, PersonFolderDataset
    from .degradations import PRESETS

    data = config.data
    if data.degradation not in PRESETS:
        raise RefFaceError(f"data.degradation must be one of {sorted(PRESETS)}, got {data.degradation!r}")
    degradation = PRESETS[data.degradation]
    if data.layout == "ffhq_ref":
        return FFHQRefDataset(
            Path(data.csv), Path(data.root), data.size, data.num_refs, degradation, data.use_lq_images, data.augment,
            Path(data.split) if data.split else None, config.seed, data.on_bad,
            Path(data.lq_root) if data.lq_root else None,
        )  # fmt: skip
    cache = Path(data.cache) if data.cache else Path(config.output) / "aligned"
    analysis = load_face_analysis(data.face_models)
    return PersonFolderDataset(
        Path(data.root), analysis, cache, data.size, data.num_refs, degradation, data.augment, config.seed, data.on_bad
    )


def train(config: TrainConfig, resume: str | None = None) -> Path | None:
    """Run (or, with ``resume`` = "latest" or a checkpoint folder, continue) a training run; returns the exported
    model folder, which `RefFaceRestorer.from_pretrained` and `refface restore` load (None on a distributed run's
    other processes)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration
    from tqdm import tqdm

    from ..context.farl import load_farl

    output = Path(config.output)
    check_writable_folder(output)  # before the model loads and faces are aligned
    restorer = RefFaceRestorer.from_pretrained(config.model)
    if config.data.size != restorer.image_size:
        raise RefFaceError(f"data.size is {config.data.size}, but the model restores {restorer.image_size}px faces")
    params = trainable_parameters(restorer, config.freeze)
    has_context = restorer.context_encoder is not None
    if has_context and not (config.arcface and config.farl):
        raise RefFaceError(
            "a model with Composite Context needs `arcface:` (identity tokens) and `farl:` in the config"
        )
    arcface = ArcFace.from_onnx(config.arcface) if config.arcface else None
    if has_context:  # found now, not after a long alignment pass
        restorer.context_encoder.check_identity(arcface(torch.zeros(1, 3, 112, 112)))
    farl = load_farl(config.farl) if has_context else None

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],  # ArcFace's weights are buffers
        fsdp_plugin=fsdp_plugin([m for m in (restorer.vq, farl) if m is not None]),
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise RefFaceError(
            "training runs on one device, with DDP or with FSDP2; DeepSpeed is not supported (answer 'no' to "
            "DeepSpeed in `accelerate config`, and choose FSDP with fsdp_version 2 to shard the training state)"
        )
    main = accelerator.is_main_process
    if not resume and latest_checkpoint(output):
        raise RefFaceError(f"{output} already has checkpoints: continue with --resume, or choose a new output folder")
    final = output / "final"
    if final.exists():  # found now, not after the run: the export never replaces a model
        raise RefFaceError(
            f"{final} holds the model of an earlier run, which this run would replace: move it away "
            f"(e.g. `mv {final} {output / 'final-earlier'}`) or train into another output folder"
        )

    def say(message: str) -> None:
        if main:
            tqdm.write(message, file=sys.stderr)

    with accelerator.main_process_first():  # the alignment cache is written once
        dataset = build_dataset(config)
    problems = list(getattr(dataset, "problems", []))
    for problem in problems[:20]:
        say(f"skipped: {problem}")
    say(f"{len(dataset)} training samples, {len(problems)} skipped")

    model = TrainingModel(restorer, arcface, farl, config).to(accelerator.device)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    params = {name: p for name, p in restorer.named_parameters() if name in params}  # FSDP swaps in its shards
    ema = EMA(params, config.ema_decay)
    count = sum(p.numel() for p in params.values())
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params.values())
    say(
        f"training {count:,} parameters ({config.freeze}) on {accelerator.num_processes} process(es), "
        f"{accelerator.distributed_type.value}; each process holds {held:,} of them and their optimizer state"
    )
    run = {  # what decides the batches and random draws: a resumed run must not change them
        "model": config.model, "freeze": config.freeze, "seed": config.seed, "batch_size": config.batch_size,
        "grad_accum": config.grad_accum, "processes": accelerator.num_processes, "num_refs": config.data.num_refs,
        "samples": len(dataset), "mixed_precision": config.mixed_precision,
    }  # fmt: skip
    start = 0
    if resume:
        folder = latest_checkpoint(output) if resume == "latest" else Path(resume)
        if folder is None:
            raise RefFaceError(f"no checkpoint to resume from in {output / CHECKPOINTS}")
        state = load_checkpoint(folder, params, ema, optimizer, run)
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["loss_scale"])
        start = state["step"]
        say(f"resumed from {folder} at step {start}")

    f = 2 ** (len(restorer.vq_config["block_out_channels"]) - 1)
    latent_shape = (restorer.vq_config["latent_channels"], config.data.size // f, config.data.size // f)
    data = batches(dataset, config, start * config.grad_accum, accelerator.process_index, accelerator.num_processes)
    preview = next(batches(dataset, config, 0, 0, 1))[1] if main else None
    accelerator.init_trackers("refface")
    bar = tqdm(total=config.steps, initial=start, disable=not main, unit="step", file=sys.stderr)
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
        totals: dict[str, torch.Tensor] = {}
        for micro in range(config.grad_accum):
            indices, batch = next(data)
            b = len(indices)
            draws = step_draws(config, step, micro, accelerator.process_index, b, latent_shape)
            draws = {k: v.to(accelerator.device) for k, v in draws.items()}
            with accelerator.accumulate(model):
                with accelerator.autocast():  # FSDP2 leaves mixed precision to us: its weights stay fp32
                    losses = model(*(batch[k].to(accelerator.device) for k in ("hq", "lq", "refs")), draws)
                if not accelerator.gather(torch.isfinite(losses["loss"]).view(1)).all():  # every process stops
                    names = [dataset.entries[i].name for i in indices] if hasattr(dataset, "entries") else indices
                    parts = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
                    raise RefFaceError(
                        f"non-finite loss at step {step + 1} (here: samples {names}, {parts}; or on another process)"
                    )
                accelerator.backward(losses["loss"])
                optimizer.step()
                optimizer.zero_grad()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v.detach() / config.grad_accum
        if not accelerator.optimizer_step_was_skipped:  # fp16: the loss scale overflowed, the weights did not move
            ema.update(params)
        done = step + 1
        means = {k: v.item() for k, v in accelerator.reduce(totals, reduction="mean").items()}  # all processes
        bar.update()
        bar.set_postfix(loss=f"{means['loss']:.4f}")
        if done % config.log_every == 0 or done == config.steps:
            accelerator.log({f"train/{k}": v for k, v in means.items()} | {"train/lr": optimizer.param_groups[0]["lr"]},
                            step=done)  # fmt: skip
        if done % config.checkpoint_every == 0 or done == config.steps:
            accelerator.wait_for_everyone()
            scale = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            folder = output / CHECKPOINTS / f"step_{done:07d}"
            save_checkpoint(folder if main else None, done, params, ema, optimizer, run, scale)
            if main:
                for old in sorted((output / CHECKPOINTS).glob("step_*[0-9]"))[: -config.keep_checkpoints]:
                    shutil.rmtree(old)
        if done % config.sample_every == 0 or done == config.steps:
            with whole_root(unwrapped):  # every process takes part in gathering FSDP's shards
                if main:
                    (output / "samples").mkdir(parents=True, exist_ok=True)
                    save_image(sample_grid(unwrapped, preview, config), output / "samples" / f"step_{done:07d}.png")
    bar.close()
    shadow = gathered(ema.shadow, keep=main)
    if main:  # the base model with the EMA of the trained weights
        export = RefFaceRestorer.from_pretrained(config.model)
        with torch.no_grad():
            for name, value in shadow.items():
                export.get_parameter(name).copy_(value)
        export_whole(export, final)
        say(f"exported {final}" + (f"; {len(problems)} samples were skipped" if problems else ""))
    accelerator.wait_for_everyone()
    # DDP's reducer must not hold the last reference to the process group: it frees it with the GIL held, and gloo's
    # destructor then joins its worker threads, one of which may still need the GIL to free a finished collective's
    # tensors (a deadlock at exit, seen under load). Freed first, the group goes in end_training's
    # destroy_process_group, which lets go of the GIL.
    del model, optimizer
    accelerator.free_memory()  # and accelerate's references to them
    accelerator.end_training()
    return final if main else None
