"""The training configuration: a YAML file read into dataclasses, checked up front with clear messages."""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RefFaceError

FREEZE_CHOICES = ("context", "context_attention", "full")
LAYOUTS = ("folders", "ffhq_ref")
MAX_TRAIN_SEED = 2**32 - 1  # draws are seeded from seed·100003 + epoch (torch takes up to 2**64) and by numpy


@dataclass
class DataConfig:
    layout: str = "folders"  # "folders": root/<person>/<photos>; "ffhq_ref": FFHQ-Ref's CSV
    root: str = ""  # the person folders, or the images the CSV names
    csv: str | None = None  # ffhq_ref: gt_image, lq_image, ref_image
    split: str | None = None  # ffhq_ref: identity-based split file
    cache: str | None = None  # folders: where aligned crops are cached (default <output>/aligned)
    face_models: str | None = None  # folders: face model folder for alignment (default: as `refface restore`)
    size: int = 512
    num_refs: int = 1  # the paper trains with one reference; ReF-LDM with up to 5
    degradation: str = "train"
    use_lq_images: bool = False  # ffhq_ref: use the CSV's lq_image instead of degrading online
    lq_root: str | None = None  # ffhq_ref: where those LQ images are (default: root)
    augment: bool = True  # ReF-LDM's reference augmentation
    on_bad: str = "skip"  # a missing image or a face not found: "skip" (reported) or "abort"
    workers: int = 2


@dataclass
class TrainConfig:
    model: str  # the RefFace model folder to start from (`refface convert [--add-composite-context]`)
    output: str  # checkpoints, TensorBoard logs, sample grids and the final model
    data: DataConfig = field(default_factory=DataConfig)
    arcface: str | None = None  # ArcFace ONNX (e.g. antelopev2/glintr100.onnx): HID loss and identity tokens
    farl: str | None = None  # FaRL checkpoint, for models with Composite Context
    freeze: str = "context"  # train the context layers, + all attention, or the full UNet
    steps: int = 10000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 5e-5  # ReF-LDM's
    warmup_steps: int = 1000
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"; this wins over `accelerate launch --mixed_precision`
    gradient_checkpointing: bool = False  # recompute the UNet's ResNet blocks and the HID decode in backward
    ema_decay: float = 0.9999
    lq_dropout: float = 0.1  # independent drops, matching the ∅ rule of guidance at inference
    context_dropout: float = 0.1
    hid_weight: float = 0.1  # the identity term's weight (ReF-LDM: 0.1, scaled by sqrt(alpha-bar_t))
    hid_lambda: float = 0.5  # L_HID = (1 - λ) L_ID(x_HQ, x̂) + λ L_ID(x_REF, x̂)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    sample_every: int = 500
    sample_steps: int = 20

    def check(self) -> None:
        problems = []
        if self.freeze not in FREEZE_CHOICES:
            problems.append(f"freeze must be one of {FREEZE_CHOICES}, got {self.freeze!r}")
        if self.data.layout not in LAYOUTS:
            problems.append(f"data.layout must be one of {LAYOUTS}, got {self.data.layout!r}")
        if self.data.layout == "ffhq_ref" and not self.data.csv:
            problems.append("data.csv is needed for the ffhq_ref layout")
        if self.data.on_bad not in ("skip", "abort"):
            problems.append(f"data.on_bad must be 'skip' or 'abort', got {self.data.on_bad!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "sample_every",
                     "keep_checkpoints", "sample_steps"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name, value in (("data.num_refs", self.data.num_refs), ("data.size", self.data.size)):
            if value < 1:
                problems.append(f"{name} must be at least 1")
        if self.lr <= 0 or self.warmup_steps < 0 or self.hid_weight < 0 or self.data.workers < 0:
            problems.append("lr must be positive; warmup_steps, hid_weight and data.workers at least 0")
        if not 0 <= self.ema_decay <= 1 or self.sample_steps > 1000:
            problems.append("ema_decay must be in [0, 1] and sample_steps at most 1000")
        for name in ("lq_dropout", "context_dropout", "hid_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1]")
        if not 0 <= self.seed <= MAX_TRAIN_SEED:
            problems.append(f"seed must be from 0 to {MAX_TRAIN_SEED} (2**32 - 1), got {self.seed}")
        if self.hid_weight > 0 and not self.arcface:
            problems.append("hid_weight > 0 needs `arcface:` (an ArcFace ONNX file, e.g. antelopev2/glintr100.onnx)")
        if problems:
            raise RefFaceError("the training config has problems:\n  " + "\n  ".join(problems))


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config; relative paths in it are relative to the file."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RefFaceError(f"cannot read the training config {path}: {e}") from None
    raw = _mapping({} if raw is None else raw, f"the training config {path}")
    raw = {**raw, **(overrides or {})}
    data_values = raw.pop("data", None)
    data_values = _mapping({} if data_values is None else data_values, f"`data:` in {path}")
    problems: list[str] = []  # values of the wrong type, all named at once
    data = _build(DataConfig, data_values, "data.", problems)
    config = _build(TrainConfig, {**raw, "data": data}, "", problems)
    if problems:
        raise RefFaceError("the training config has problems:\n  " + "\n  ".join(problems))
    base = path.parent
    for owner, names in (
        (config, ("model", "output", "arcface", "farl")),
        (data, ("root", "csv", "split", "cache", "lq_root")),
    ):
        for name in names:
            value = getattr(owner, name)
            if value:
                setattr(owner, name, str(base / Path(value).expanduser()))
    if data.face_models:
        data.face_models = str(base / Path(data.face_models).expanduser())
    config.check()
    return config


def _mapping(value: Any, what: str) -> dict[str, Any]:
    """YAML can hold a list or a bare word where keys are expected: say so rather than fail on it later."""
    if not isinstance(value, dict):
        raise RefFaceError(f"{what} must be a mapping (`key: value` lines), got a {type(value).__name__}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    """The dataclass from YAML values, each checked against its field's annotation (the one place the types live);
    a value of the wrong type is added to ``problems``."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(str(k) for k in values if k not in hints)
    if unknown:
        raise RefFaceError(f"unknown training config keys: {', '.join(prefix + k for k in unknown)}")
    typed = {
        name: value if dataclasses.is_dataclass(hints[name]) else _typed(prefix + name, hints[name], value, problems)
        for name, value in values.items()
    }
    try:
        return cls(**typed)
    except TypeError as e:  # a required key is missing
        raise RefFaceError(f"the training config is incomplete: {e}") from None


KINDS = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text"}


def _typed(key: str, hint: Any, value: Any, problems: list[str]) -> Any:
    """``value`` as the field's type, or a problem naming ``key``. PyYAML (YAML 1.1) reads 5e-5 without a dot as
    text, so a float field takes a numeric string, and an int; bool, an int subclass, is never a number; NaN and
    infinity are never settings."""
    kinds = typing.get_args(hint) or (hint,)
    if value is None and type(None) in kinds:
        return None
    kind = next(k for k in kinds if k is not type(None))
    if kind is float and (isinstance(value, str) or type(value) is int):
        try:
            value = float(value)
        except (ValueError, OverflowError):
            pass  # named below, as any other wrong type
    if type(value) is not kind or (kind is float and not math.isfinite(value)):
        null = " or null" if type(None) in kinds else ""
        problems.append(f"{key} must be {KINDS[kind]}{null}, got {value!r} ({type(value).__name__})")
    return value
