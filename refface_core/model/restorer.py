"""RefFaceRestorer: the ReF-LDM UNet and VQ autoencoder, with CacheKV references and guided sampling."""

from __future__ import annotations

import functools
import json
import numbers
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import UNet2DModel, VQModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoints import weight_problems
from ..context.encoder import CompositeContextEncoder
from ..errors import RefFaceError, check_number, check_seeds, listing
from ..files import write_atomic
from ..sampling import Branch, make_branches, make_solver, run_sampler
from ..sampling.sampler import Denoiser, StepCallback
from .config import FORMAT, check_model_config, weight_value_problems
from .tensors import ImageLike, from_model_tensor, to_model_tensor
from .unet import (
    KV,
    CacheKV,
    KVRecorder,
    ReferenceAttnProcessor,
    install_reference_attention,
    refldm_unet_config,
    unet_forward,
)
from .vq import refldm_vq_config

if TYPE_CHECKING:
    from ..context.farl import FaRLEncoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_BATCH_SIZE = 8  # faces per sampler run: bounds memory (rows = faces × guidance branches)


@dataclass
class CompositeContext:
    """One person's prepared references, reusable across restores: VQ latents (the CacheKV source)
    [B,N,C,h,w] and, for models with Composite Context, their identity + appearance tokens [B,N,L,D]."""

    latents: torch.Tensor
    tokens: torch.Tensor | None = None


class RefFaceRestorer(nn.Module):
    def __init__(
        self,
        unet_config: dict[str, Any] | None = None,
        vq_config: dict[str, Any] | None = None,
        context_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.unet_config = dict(unet_config or refldm_unet_config())
        self.vq_config = dict(vq_config or refldm_vq_config())
        self.unet = UNet2DModel(**self.unet_config)
        self.vq = VQModel(**self.vq_config)
        self.context_config = None
        self.context_encoder = None
        self._empty_kv: tuple[torch.Size, list, dict[str, KV]] | None = None  # see empty_reference_kv
        self.compiled = False  # see set_compile
        install_reference_attention(self.unet)
        if context_config is not None:
            self.add_composite_context(context_config)

    def add_composite_context(self, context_config: dict[str, Any]) -> None:
        """Add the context encoder and zero-initialised cross-attention: the model still behaves as before."""
        device, dtype = self.device, self.dtype
        self.context_config = dict(context_config)
        self.context_encoder = CompositeContextEncoder(**self.context_config).to(device=device, dtype=dtype)
        install_reference_attention(self.unet, self.context_encoder.width)
        for module in self.unet.modules():
            if isinstance(module, ReferenceAttnProcessor):
                module.to(device=device, dtype=dtype)

    # -- loading and saving -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> RefFaceRestorer:
        path = Path(path)
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        if path.is_file():
            raise RefFaceError(
                f"{path} is a file, but a RefFace model is a folder: convert ReF-LDM's checkpoints once with "
                "`refface convert --refldm-unet refldm.ckpt --refldm-vq vqgan.ckpt --out models/refldm` and give "
                "--model models/refldm, or let `refface download` fetch and convert them"
            )
        if not path.is_dir():
            raise RefFaceError(f"model folder not found: {path}; `refface download` fetches ReF-LDM's weights")
        try:
            text = config_file.read_bytes()
        except OSError:
            raise RefFaceError(
                f"{path} is not a RefFace model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                "make one from ReF-LDM weights with `refface convert`"
            ) from None
        try:
            config = json.loads(text)
        except ValueError as e:  # also a UnicodeDecodeError
            raise RefFaceError(f"{config_file} is not valid JSON ({e}); make it again with `refface convert`") from None
        check_model_config(config, str(config_file))
        try:
            state = load_file(weights_file, device=str(device))
        except (OSError, SafetensorError) as e:
            raise RefFaceError(f"cannot read the weights {weights_file}: {e}") from None
        if problems := weight_value_problems(state):
            raise RefFaceError(listing(f"{weights_file} holds unusable weights (convert the model again)", problems))
        with torch.device("meta"):
            model = cls(config["unet"], config["vq"], config.get("context"))
        model.load_weights(state, source=str(weights_file))
        return model.to(device=device, dtype=dtype).eval()

    def load_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Strict load that names every missing, unexpected or mis-shaped tensor."""
        problems = weight_problems(self.state_dict(), state)
        if problems:
            raise RefFaceError(listing(f"weights in {source} do not match the model config", problems))
        self.load_state_dict(state, strict=True, assign=True)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config = {
            "format": FORMAT,
            "version": 1,
            "unet": self.unet_config,
            "vq": self.vq_config,
            "context": self.context_config,
        }
        write_atomic(path / WEIGHTS_NAME, lambda f: save_file(weights, f))
        write_atomic(path / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(config, indent=2)))

    def set_compile(self, enabled: bool = True) -> None:
        """Run the denoiser's UNet calls through ``torch.compile``: inductor, and on CUDA mode "reduce-overhead",
        which also captures CUDA graphs. The first call at each batch shape compiles (a minute for a tiny model on
        two CPU cores, more at full size); later calls in the process, for any restorer, reuse it."""
        self.compiled = enabled

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def image_size(self) -> int:
        """Pixel size of the aligned face crops the model restores."""
        return self.unet_config["sample_size"] * 2 ** (len(self.vq_config["block_out_channels"]) - 1)

    # -- the VQ first stage -------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> unquantized latents [B,C,H/f,W/f]."""
        return self.vq.encode(images.to(self.device, self.dtype)).latents.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1,1]; quantizes to the codebook first, as ReF-LDM does."""
        return self.vq.decode(latents.to(self.device, self.dtype)).sample.float()

    @torch.no_grad()
    def encode_references(self, images: torch.Tensor, layout: str = "strip") -> torch.Tensor:
        """[B,N,3,H,W] -> [B,N,C,h,w]. "strip" encodes the N faces side by side as one wide image (ReF-LDM)."""
        b, n, c, h, w = images.shape
        if layout == "separate":
            return self.encode(images.reshape(b * n, c, h, w)).unflatten(0, (b, n))
        if layout != "strip":
            raise RefFaceError(f"layout must be 'strip' or 'separate', got {layout!r}")
        strip = self.encode(images.permute(0, 2, 3, 1, 4).reshape(b, c, h, n * w))
        return strip.unflatten(3, (n, strip.shape[3] // n)).permute(0, 3, 1, 2, 4).contiguous()

    # -- the denoiser -------------------------------------------------------------------------------

    @torch.no_grad()
    def denoiser(
        self,
        lq_latent: torch.Tensor,
        ref_latents: torch.Tensor | None,
        branches: Sequence[Branch],
        ref_tokens: torch.Tensor | None = None,
        context_scale: float = 1.0,
    ) -> Denoiser:
        """Prepare the CacheKV (and context tokens) for ``branches`` once; return x_t, t -> guided eps (float32).
        ``ref_latents`` [1,N,...] with a batch of B > 1 is one person's references for every row, prepared once."""
        b = lq_latent.shape[0]
        lq = lq_latent.to(self.device, self.dtype)
        inputs = list(dict.fromkeys(branch.use_lq for branch in branches))  # the distinct inputs: LQ or ∅, once each
        lq_inputs = torch.cat([lq if use_lq else torch.zeros_like(lq) for use_lq in inputs])
        rows = torch.tensor([inputs.index(branch.use_lq) * b + i for branch in branches for i in range(b)])
        rows = None if len(inputs) == len(branches) else rows.to(self.device)
        cache = context = None
        if ref_latents is not None:
            slots = self._slots(b, ref_latents.shape[0], ref_latents.shape[1], branches)
            cache = self.reference_kv(ref_latents, slots)
            if ref_tokens is not None:
                if self.context_encoder is None:
                    raise RefFaceError("this model has no Composite Context layers to use context tokens with")
                context = (_gather_tokens(ref_tokens.to(self.device, self.dtype), slots), context_scale)
        weights = torch.tensor([branch.weight for branch in branches], device=self.device).view(-1, 1, 1, 1, 1)
        main_pass = unet_forward
        if self.compiled:  # the mode is chosen here: ComfyUI loads a model on the CPU and runs it on the GPU
            main_pass = compiled_unet_forward("reduce-overhead" if self.device.type == "cuda" else "default")

        @torch.no_grad()
        def denoise(x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
            t_inputs = torch.as_tensor(t, device=self.device).expand(b).repeat(len(inputs))
            x_inputs = x.to(self.device, self.dtype).repeat(len(inputs), 1, 1, 1)
            sample = torch.cat([x_inputs, lq_inputs], dim=1)
            try:
                eps = main_pass(self.unet, sample, t_inputs, cache, context, rows=rows).float()
            except torch._dynamo.exc.BackendCompilerFailed as e:  # no C++ compiler, no Triton, an unsupported device
                message = str(e).strip().splitlines()[0][:300]
                raise RefFaceError(
                    f"torch.compile failed on {self.device.type} ({message}); run without compiling"
                ) from None
            if len(branches) == 1 and branches[0].weight == 1.0:
                return eps
            return (weights * eps.unflatten(0, (len(branches), b))).sum(0)

        return denoise

    def _slots(self, b: int, ref_b: int, n: int, branches: Sequence[Branch]) -> torch.Tensor:
        """[rows, S]: which of the ``ref_b``·``n`` references each main-batch row attends to; index ref_b·n is the
        zeroed (∅) reference. With ``ref_b`` = 1, every row shares the one set."""
        if ref_b not in (1, b):
            raise ValueError(f"{ref_b} sets of references for a batch of {b}; give 1 or {b}")
        slot_counts = {len(branch.refs) for branch in branches if branch.refs is not None} or {1}
        if len(slot_counts) != 1:
            raise ValueError(f"all branches must use the same number of reference slots, got {slot_counts}")
        (count,) = slot_counts
        rows = [
            [ref_b * n] * count if branch.refs is None else [(i if ref_b == b else 0) * n + r for r in branch.refs]
            for branch in branches
            for i in range(b)
        ]
        return torch.tensor(rows)  # on the CPU: CacheKV groups the rows by their slots

    @torch.no_grad()
    def reference_kv(self, ref_latents: torch.Tensor, slots: torch.Tensor) -> CacheKV:
        """One UNet pass at t=0 per (sample, reference), laid out per row by ``slots`` with ∅ (all zeros) last."""
        refs = ref_latents.to(self.device, self.dtype).flatten(0, 1)
        recorder = KVRecorder()
        inputs = torch.cat([refs, torch.zeros_like(refs)], dim=1)
        unet_forward(self.unet, inputs, torch.zeros(len(refs), dtype=torch.long, device=self.device), recorder)
        empty = self.empty_reference_kv(inputs.shape[1:])
        layers = {
            name: (torch.cat([k, empty[name][0]]), torch.cat([v, empty[name][1]]))
            for name, (k, v) in recorder.layers.items()
        }
        return CacheKV(layers, slots)

    @torch.no_grad()
    def empty_reference_kv(self, shape: torch.Size) -> dict[str, KV]:
        """∅'s keys and values depend only on the weights: computed once and kept while every UNet parameter is
        the same tensor with the same storage and version (training steps, loading, ``.to()`` and offloading each
        change one of them). Weights changed behind the version counter (``p.data``, FSDP's unsharding, in-place
        writes under inference mode, whose tensors have none) need ``forget_empty_reference``."""
        weights = [
            (weakref.ref(p), p.data_ptr(), None if p.is_inference() else p._version) for p in self.unet.parameters()
        ]
        cached = self._empty_kv
        if cached is None or cached[0] != shape or not _same_weights(cached[1], weights):
            recorder = KVRecorder()
            zeros = torch.zeros(1, *shape, device=self.device, dtype=self.dtype)
            unet_forward(self.unet, zeros, torch.zeros(1, dtype=torch.long, device=self.device), recorder)
            self._empty_kv = cached = (shape, weights, recorder.layers)
        return cached[2]

    def forget_empty_reference(self) -> None:
        """Drop the cached ∅ keys and values: the next reference pass computes them again."""
        self._empty_kv = None

    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: int | torch.Tensor,
        lq_latent: torch.Tensor,
        ref_latents: torch.Tensor | None = None,
        ref_tokens: torch.Tensor | None = None,
        context_scale: float = 1.0,
    ) -> torch.Tensor:
        """eps for [x_t, lq] with CacheKV over ``ref_latents`` [B,N,C,h,w] (None: no references) and, for
        Composite Context models, cross-attention to ``ref_tokens`` [B,N,L,D]."""
        refs = None if ref_latents is None else tuple(range(ref_latents.shape[1]))
        return self.denoiser(lq_latent, ref_latents, [Branch(1.0, True, refs)], ref_tokens, context_scale)(x_t, t)

    # -- sampling -----------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        lq_latent: torch.Tensor,
        ref_latents: torch.Tensor,
        steps: int = 50,
        spacing: str = "uniform_trailing",
        guidance: str = "refldm",
        scale: float = 1.5,
        s_i: float = 1.2,
        s_c: float = 1.2,
        solver: str = "ddim",
        ref_slots: int | None = None,
        eta: float = 0.0,
        x_T: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
        cancel: Callable[[], bool] | None = None,
        ref_tokens: torch.Tensor | None = None,
        context_scale: float = 1.0,
    ) -> torch.Tensor:
        """Restore latents. ``ref_latents`` is [B,N,C,h,w]; ``ref_slots`` repeats references to that many slots;
        ``ref_tokens`` [B,N,L,D] are the references' Composite Context tokens, weighted by ``context_scale``."""
        branches = make_branches(guidance, ref_latents.shape[1], scale, s_i, s_c, ref_slots)
        check_number("context_scale", context_scale)
        if x_T is None:
            x_T = torch.randn(lq_latent.shape, generator=generator, dtype=torch.float32)
        solve = make_solver(solver, steps, spacing, eta, generator)
        denoise = self.denoiser(lq_latent, ref_latents, branches, ref_tokens, context_scale)
        return run_sampler(denoise, x_T.float().to(self.device), solve, callback, cancel)

    @torch.no_grad()
    def encode_context(
        self,
        reference_faces: Sequence[ImageLike],
        identity: torch.Tensor | np.ndarray | None = None,
        farl: FaRLEncoder | None = None,
        layout: str = "strip",
    ) -> CompositeContext:
        """Aligned reference crops (and, with Composite Context, their identity embeddings [N, dim] and the FaRL
        encoder) -> one person's CompositeContext, computed once and reusable across restores."""
        if not reference_faces:
            raise RefFaceError("at least one reference face is needed")
        faces = torch.stack([to_model_tensor(r, self.image_size)[0] for r in reference_faces])
        latents = self.encode_references(faces[None], layout)
        if self.context_encoder is None:
            return CompositeContext(latents)
        if identity is None or farl is None:
            raise RefFaceError(
                "this model has Composite Context: it needs each reference's identity embedding "
                f"({self.context_encoder.identity_encoder} {self.context_encoder.identity_dim}-d) and a FaRL encoder"
            )
        identity = torch.as_tensor(identity, dtype=torch.float32, device=self.device)
        if identity.dim() != 2 or len(identity) != len(reference_faces):
            raise RefFaceError(
                f"{len(reference_faces)} reference faces need one identity embedding each, got shape "
                f"{tuple(identity.shape)}"
            )
        self.context_encoder.check_identity(identity)
        appearance = farl.hidden_states(faces.to(farl.model.device), self.context_encoder.appearance_layers)
        tokens = self.context_encoder(identity, [h.to(self.device) for h in appearance])
        return CompositeContext(latents, tokens[None].float())

    def restore(
        self,
        lq_face: ImageLike,
        references: Sequence[ImageLike] | CompositeContext,
        seed: int = 2024,
        ref_layout: str = "strip",
        identity: torch.Tensor | np.ndarray | None = None,
        farl: FaRLEncoder | None = None,
        **sample_options: Any,
    ) -> ImageLike:
        """Restore one aligned face crop with aligned reference crops (or their ``encode_context``);
        returns the kind of image given."""
        return self.restore_candidates(lq_face, references, [seed], ref_layout, identity, farl, **sample_options)[0]

    def restore_candidates(
        self,
        lq_face: ImageLike,
        references: Sequence[ImageLike] | CompositeContext,
        seeds: Sequence[int],
        ref_layout: str = "strip",
        identity: torch.Tensor | np.ndarray | None = None,
        farl: FaRLEncoder | None = None,
        **sample_options: Any,
    ) -> list[ImageLike]:
        """``restore`` once per seed: ``restore_batch`` of one face, so the LQ encoding and the references' CacheKV
        are computed once."""
        check_seeds(seeds)
        if not isinstance(references, CompositeContext):
            references = self.encode_context(references, identity, farl, ref_layout)
        return self.restore_batch([lq_face] * len(seeds), references, seeds, **sample_options)

    def restore_batch(
        self,
        lq_faces: Sequence[ImageLike],
        contexts: CompositeContext | Sequence[CompositeContext],
        seeds: Sequence[int],
        batch_size: int = DEFAULT_BATCH_SIZE,
        **sample_options: Any,
    ) -> list[ImageLike]:
        """Aligned face crops, each with its own context (or one shared by all) and seed, restored in as few UNet
        calls as possible: faces with the same number of references sample together, ``batch_size`` at a time
        (padding to a common count would change the attention). Each face starts from the noise its seed gives
        alone, so its result does not depend on the batching; only with eta > 0 is the later noise drawn per batch,
        from its first face's generator. ``callback`` and ``cancel`` apply to each batch's run in turn."""
        contexts = [contexts] * len(lq_faces) if isinstance(contexts, CompositeContext) else list(contexts)
        if not len(lq_faces) == len(contexts) == len(seeds):
            raise RefFaceError(
                f"{len(lq_faces)} faces need one context and one seed each, got {len(contexts)} and {len(seeds)}"
            )
        if not lq_faces:
            return []
        check_seeds(seeds)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise RefFaceError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        for context in contexts:
            if not isinstance(context, CompositeContext):
                raise RefFaceError(
                    f"contexts must be CompositeContext (from encode_context), got {type(context).__name__}"
                )
            if context.latents.dim() != 5 or context.latents.shape[0] != 1:
                raise RefFaceError(f"a context holds one person's references [1,N,C,h,w], got a batch of "
                                   f"{tuple(context.latents.shape)}; make it with encode_context")  # fmt: skip
        if len({context.tokens is None for context in contexts}) > 1:
            raise RefFaceError("some contexts have Composite Context tokens and some not; make them with one model")
        encoded: dict[int, torch.Tensor] = {}  # a face given several times (candidates) is encoded once
        for face in lq_faces:
            if id(face) not in encoded:
                encoded[id(face)] = self.encode(to_model_tensor(face, self.image_size))
        groups: dict[int, list[int]] = {}
        for i, context in enumerate(contexts):
            groups.setdefault(context.latents.shape[1], []).append(i)
        restored: dict[int, ImageLike] = {}
        for group in groups.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                latents = self._sample_faces(
                    [encoded[id(lq_faces[i])] for i in chunk], [contexts[i] for i in chunk], [seeds[i] for i in chunk],
                    **sample_options,
                )  # fmt: skip
                for i, image in zip(chunk, self.decode(latents), strict=True):
                    restored[i] = from_model_tensor(image[None], like=lq_faces[i])
        return [restored[i] for i in range(len(lq_faces))]

    def _sample_faces(
        self,
        lq_latents: Sequence[torch.Tensor],
        contexts: Sequence[CompositeContext],
        seeds: Sequence[int],
        **sample_options: Any,
    ) -> torch.Tensor:
        """One sampler run over faces with the same number of references. One context shared by all is given once
        (a batch of 1), so its CacheKV is computed once for every row."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        x_T = torch.cat([torch.randn(lq.shape, generator=g) for lq, g in zip(lq_latents, generators, strict=True)])
        used = contexts[:1] if all(context is contexts[0] for context in contexts) else contexts
        tokens = None if used[0].tokens is None else torch.cat([context.tokens for context in used])
        return self.sample(
            torch.cat(list(lq_latents)), torch.cat([context.latents for context in used]), x_T=x_T,
            generator=generators[0], ref_tokens=tokens, **sample_options,
        )  # fmt: skip


@functools.cache
def compiled_unet_forward(mode: str) -> Callable[..., torch.Tensor]:
    """One compiled ``unet_forward`` per mode for the process: its compiled graphs are kept across restores."""
    return torch.compile(unet_forward, mode=mode, dynamic=False)  # dynamic shapes failed to lower (torch 2.13)


def _same_weights(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x[0]() is y[0]() and x[1:] == y[1:] for x, y in zip(a, b, strict=True))


def _gather_tokens(tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[B,N,L,D] per-reference tokens -> [rows, S·L, D] per main-batch row, ∅ (index B·N) as zeros."""
    flat = tokens.flatten(0, 1)
    flat = torch.cat([flat, torch.zeros_like(flat[:1])])
    rows, count = slots.shape
    return flat[slots.flatten().to(flat.device)].view(rows, count * flat.shape[1], flat.shape[2])
