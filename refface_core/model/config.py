"""Checks of a model folder's files before anything is built from them.

diffusers and torch take a config's values at face value: a huge ``layers_per_block`` builds modules for ever, a
huge ``sample_size`` asks for hundreds of GB at the first restore, and a wrong type or a zero ends deep inside in a
TypeError or ZeroDivisionError. So every key of config.json is checked against a table of the keys RefFace writes,
with bounds a few times ReF-LDM's own, plus a few rules across keys; all problems are reported at once.
Weights must be floating point and finite: NaN weights would restore black faces without a word.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from ..errors import RefFaceError, listing

FORMAT = "refface"
VERSION = 1
MAX_IMAGE_SIZE = 2048  # pixels per side of the face crops a model restores (ReF-LDM: 512)

Check = Callable[[Any], str | None]  # what is wrong with a value, or None


def _show(value: Any) -> str:
    text = json.dumps(value, default=repr)  # JSON spelling: true, null, NaN, as the user wrote it
    return text if len(text) <= 40 else text[:37] + "..."


def whole(low: int, high: int) -> Check:
    """An int (not a bool: JSON's true is no count) from ``low`` to ``high``."""

    def check(value: Any) -> str | None:
        if type(value) is not int or not low <= value <= high:
            return f"must be a whole number from {low} to {high}, got {_show(value)}"
        return None

    return check


def number(low: float, high: float) -> Check:
    """A finite int or float from ``low`` to ``high`` (Python's json reads NaN and Infinity)."""

    def check(value: Any) -> str | None:
        if type(value) not in (int, float) or not low <= value <= high:
            return f"must be a number from {low:g} to {high:g}, got {_show(value)}"
        return None

    return check


def flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {_show(value)}"


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, str) and value in choices:
            return None
        return f"must be {' or '.join(json.dumps(c) for c in choices)}, got {_show(value)}"

    return check


def label(value: Any) -> str | None:
    """A name recorded for the user (e.g. which face model the context expects)."""
    if isinstance(value, str) and 0 < len(value) <= 64:
        return None
    return f"must be a name of 1 to 64 characters, got {_show(value)}"


def list_of(item: Check, shortest: int, longest: int) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, list | tuple) or not shortest <= len(value) <= longest:
            return f"must be a list of {shortest} to {longest} items, got {_show(value)}"
        for i, element in enumerate(value):
            if problem := item(element):
                return f"item {i} {problem}"
        return None

    return check


CHANNELS = whole(1, 2048)  # ReF-LDM: at most 640 (UNet) and 512 (VQ)
LEVELS = (1, 6)  # ReF-LDM: 4
ACTIVATION = one_of("silu", "swish", "mish", "gelu", "relu")

UNET: dict[str, Check] = {
    "sample_size": whole(1, 128),  # the latent's side; ReF-LDM: 64
    "in_channels": whole(1, 256),
    "out_channels": whole(1, 256),
    "block_out_channels": list_of(CHANNELS, *LEVELS),
    "layers_per_block": whole(1, 8),
    "down_block_types": list_of(one_of("DownBlock2D", "AttnDownBlock2D"), *LEVELS),
    "up_block_types": list_of(one_of("UpBlock2D", "AttnUpBlock2D"), *LEVELS),
    "attention_head_dim": CHANNELS,
    "flip_sin_to_cos": flag,
    "freq_shift": number(0, 1),
    "norm_num_groups": CHANNELS,
    "norm_eps": number(1e-12, 0.1),
    "act_fn": ACTIVATION,
    "time_embedding_type": one_of("positional"),
}
VQ: dict[str, Check] = {
    "in_channels": whole(3, 3),  # RGB photos in and out
    "out_channels": whole(3, 3),
    "down_block_types": list_of(one_of("DownEncoderBlock2D"), *LEVELS),
    "up_block_types": list_of(one_of("UpDecoderBlock2D"), *LEVELS),
    "block_out_channels": list_of(CHANNELS, *LEVELS),
    "layers_per_block": whole(1, 8),
    "act_fn": ACTIVATION,
    "latent_channels": whole(1, 256),
    "vq_embed_dim": whole(1, 128),
    "num_vq_embeddings": whole(1, 32768),  # ReF-LDM: 8192
    "norm_num_groups": CHANNELS,
    "scaling_factor": number(1e-6, 1e6),
    "sample_size": whole(1, 4 * MAX_IMAGE_SIZE),
}
CONTEXT: dict[str, Check] = {  # ReF-LDM-CC: 512, arcface 512-d x 4, farl-vit-b16 768 wide, layers 4 8 12, grid 4
    "width": whole(1, 4096),
    "identity_encoder": label,
    "identity_dim": whole(1, 4096),
    "identity_tokens": whole(1, 64),
    "appearance_encoder": label,
    "appearance_width": whole(1, 4096),
    "appearance_layers": list_of(whole(0, 64), 1, 16),
    "appearance_grid": whole(1, 16),
}


def check_model_config(config: Any, source: str) -> None:
    """Raise one RefFaceError naming every problem of a parsed config.json, before any model is built from it."""
    if not isinstance(config, dict):
        raise RefFaceError(
            f"{source} holds {_show(config)}, not a RefFace model config (a JSON object with "
            f'"format": "{FORMAT}"); make the model folder with `refface convert`'
        )
    if config.get("format") != FORMAT:
        found = "no format" if "format" not in config else f"format {_show(config['format'])}"
        raise RefFaceError(
            f'{source} is not a RefFace model config ({found}, expected "format": "{FORMAT}"); '
            "make the model folder with `refface convert`"
        )
    version = config.get("version")
    if type(version) is int and version > VERSION:
        raise RefFaceError(
            f"{source} is a version {version} RefFace model, newer than this RefFace reads (up to {VERSION}); "
            "update RefFace"
        )
    problems = [f"{key}: unknown key" for key in config if key not in ("format", "version", "unet", "vq", "context")]
    if type(version) is not int or version < 1:
        problems.append(f"version: must be a whole number (this RefFace writes {VERSION}), got {_show(version)}")
    unet = _section(config, "unet", UNET, problems)
    vq = _section(config, "vq", VQ, problems)
    if config.get("context") is not None:
        _section(config, "context", CONTEXT, problems)
    problems += _levels("unet", unet) + _levels("vq", vq) + _across(unet, vq)
    if problems:
        raise RefFaceError(listing(f"{source} has invalid settings (fix them, or convert the model again)", problems))


def _section(config: dict, name: str, table: dict[str, Check], problems: list[str]) -> dict[str, Any]:
    """Check one sub-config against its table; return its valid values, which the rules across keys use."""
    section = config.get(name)
    if not isinstance(section, dict):
        problems.append(f"{name}: must be an object of settings, got {_show(section)}")
        return {}
    problems += [f"{name}.{key}: unknown key" for key in section if key not in table]
    problems += [f"{name}.{key}: missing" for key in table if key not in section]
    valid = {}
    for key, check in table.items():
        if key in section:
            if problem := check(section[key]):
                problems.append(f"{name}.{key}: {problem}")
            else:
                valid[key] = section[key]
    return valid


def _levels(name: str, valid: dict[str, Any]) -> list[str]:
    """Per resolution level: one block type each, and group norms and attention heads that split every width."""
    if "block_out_channels" not in valid:
        return []
    channels = list(valid["block_out_channels"])
    types = {key: valid[key] for key in ("down_block_types", "up_block_types") if key in valid}
    problems = [
        f"{name}.{key}: {len(value)} entries, but block_out_channels has {len(channels)}"
        for key, value in types.items()
        if len(value) != len(channels)
    ]
    if "norm_num_groups" in valid and (bad := [c for c in channels if c % valid["norm_num_groups"]]):
        problems.append(f"{name}.norm_num_groups: {valid['norm_num_groups']} does not divide the channels {bad}")
    if "attention_head_dim" in valid:
        attended = {channels[-1]}  # the middle block always attends
        attended |= {c for c, t in zip(channels, types.get("down_block_types", []), strict=False) if "Attn" in t}
        attended |= {c for c, t in zip(channels[::-1], types.get("up_block_types", []), strict=False) if "Attn" in t}
        if bad := sorted(c for c in attended if c % valid["attention_head_dim"]):
            problems.append(
                f"{name}.attention_head_dim: {valid['attention_head_dim']} does not divide the channels {bad}"
            )
    if "sample_size" in valid and name == "unet" and valid["sample_size"] % 2 ** (len(channels) - 1):
        problems.append(
            f"unet.sample_size: must be a multiple of {2 ** (len(channels) - 1)} (the UNet halves it "
            f"{len(channels) - 1} times), got {valid['sample_size']}"
        )
    return problems


def _across(unet: dict[str, Any], vq: dict[str, Any]) -> list[str]:
    """The UNet denoises VQ latents: [noisy latent, low-quality latent] in, a latent's noise out."""
    problems = []
    if "vq_embed_dim" in vq:
        latent = vq["vq_embed_dim"]
        for key, expected in (("in_channels", 2 * latent), ("out_channels", latent)):
            if key in unet and unet[key] != expected:
                problems.append(f"unet.{key}: must be {expected} for vq.vq_embed_dim {latent}, got {unet[key]}")
    if "sample_size" in unet and "block_out_channels" in vq:
        size = unet["sample_size"] * 2 ** (len(vq["block_out_channels"]) - 1)
        if size > MAX_IMAGE_SIZE:
            problems.append(f"unet.sample_size: restores {size}px faces, more than the {MAX_IMAGE_SIZE}px supported")
    return problems


def weight_value_problems(state: dict[str, torch.Tensor], name: Callable[[str], str] = str) -> list[str]:
    """Tensors that cannot be weights: not floating point, or holding NaN/inf (which would restore black faces)."""
    problems = [
        f"{name(k)}: {t.dtype}, weights must be floating point" for k, t in state.items() if not t.is_floating_point()
    ]
    problems += [
        f"{name(k)}: holds NaN or infinite values"
        for k, t in state.items()
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    return problems
