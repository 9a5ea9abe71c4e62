"""config.json checks: every config RefFace writes passes, every bad value is named, nothing bad reaches diffusers."""

import functools
import json
import random
import string

import pytest
import torch
from support import tiny_context_config, tiny_restorer

from refface_core import RefFaceError, RefFaceRestorer
from refface_core.context import composite_context_config
from refface_core.model import refldm_unet_config, refldm_vq_config
from refface_core.model.config import check_model_config


def config_of(unet: dict, vq: dict, context: dict | None = None) -> dict:
    """As save_pretrained writes it (tuples become lists)."""
    return json.loads(json.dumps({"format": "refface", "version": 1, "unet": unet, "vq": vq, "context": context}))


@functools.cache
def tiny_model() -> RefFaceRestorer:
    return tiny_restorer()


def tiny_config(context: bool = False) -> dict:
    model = tiny_model()
    return config_of(model.unet_config, model.vq_config, tiny_context_config() if context else None)


def problems_of(config: dict) -> str:
    with pytest.raises(RefFaceError) as info:
        check_model_config(config, "model/config.json")
    return str(info.value)


def test_configs_refface_writes_pass():
    check_model_config(config_of(refldm_unet_config(), refldm_vq_config()), "refldm")  # ReF-LDM as converted
    check_model_config(config_of(refldm_unet_config(), refldm_vq_config(), composite_context_config()), "refldm-cc")
    golden = refldm_unet_config(32, (1, 2, 2), (False, True, True), 1, 8, sample_size=16)  # the golden tiny UNet
    check_model_config(config_of(golden, refldm_vq_config(32, (1, 2), 1, 8, 8, 64)), "golden")
    check_model_config(tiny_config(context=True), "tiny")


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("unet", "layers_per_block", 10**9, "layers_per_block: must be a whole number from 1 to 8, got 1000000000"),
        ("unet", "layers_per_block", 1e9, "got 1000000000.0"),
        ("unet", "layers_per_block", True, "unet.layers_per_block: must be a whole number from 1 to 8, got true"),
        ("unet", "sample_size", 100000, "unet.sample_size: must be a whole number from 1 to 128, got 100000"),
        ("unet", "sample_size", 15, "unet.sample_size: must be a multiple of 2"),
        ("unet", "attention_head_dim", 0, "unet.attention_head_dim: must be a whole number from 1 to 2048, got 0"),
        ("unet", "attention_head_dim", 24, "unet.attention_head_dim: 24 does not divide the channels [64]"),
        ("unet", "norm_num_groups", 7, "unet.norm_num_groups: 7 does not divide the channels [32, 64]"),
        ("unet", "block_out_channels", [32], "unet.down_block_types: 2 entries, but block_out_channels has 1"),
        ("unet", "block_out_channels", [32, "64"], "unet.block_out_channels: item 1 must be a whole number"),
        ("unet", "down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"], 'item 1 must be "DownBlock2D" or'),
        ("unet", "in_channels", 12, "unet.in_channels: must be 16 for vq.vq_embed_dim 8, got 12"),
        ("vq", "in_channels", 4, "vq.in_channels: must be a whole number from 3 to 3, got 4"),
        ("unet", "freq_shift", float("nan"), "unet.freq_shift: must be a number from 0 to 1, got NaN"),
        ("unet", "norm_eps", float("inf"), "unet.norm_eps: must be a number from 1e-12 to 0.1, got Infinity"),
        ("unet", "act_fn", "tanh", 'unet.act_fn: must be "silu" or'),
        ("unet", "time_embedding_type", "fourier", 'unet.time_embedding_type: must be "positional"'),
        ("unet", "mid_block_type", "UNetMidBlock2D", "unet.mid_block_type: unknown key"),
        ("vq", "num_vq_embeddings", 0, "vq.num_vq_embeddings: must be a whole number from 1 to 32768, got 0"),
        ("vq", "layers_per_block", 10**9, "vq.layers_per_block: must be a whole number from 1 to 8"),
        ("vq", "norm_num_groups", 5, "vq.norm_num_groups: 5 does not divide the channels [32, 64]"),
        ("vq", "scaling_factor", None, "vq.scaling_factor: must be a number from 1e-06 to 1e+06, got null"),
        ("context", "appearance_grid", 100000, "context.appearance_grid: must be a whole number from 1 to 16"),
        ("context", "appearance_layers", [4, -1], "context.appearance_layers: item 1 must be a whole number"),
        ("context", "identity_encoder", "", "context.identity_encoder: must be a name of 1 to 64 characters"),
        ("context", "extra", 1, "context.extra: unknown key"),
    ],
)
def test_each_bad_value_is_named(section, key, value, expected):
    config = tiny_config(context=True)
    config[section][key] = value
    message = problems_of(config)
    assert message.startswith("model/config.json has invalid settings") and expected in message


def test_image_size_is_bounded():
    config = tiny_config()
    config["unet"]["sample_size"] = 128
    for levels, error in ((5, False), (6, True)):  # a VQ of factor 2**(levels - 1): 2048 px faces pass, 4096 not
        config["vq"] |= dict(
            block_out_channels=[32] * levels,
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
        )
        if error:
            assert "unet.sample_size: restores 4096px faces, more than the 2048px supported" in problems_of(config)
        else:
            check_model_config(config, "model/config.json")


def test_all_problems_in_one_message():
    config = tiny_config()
    config["unet"]["layers_per_block"] = "2"
    del config["unet"]["sample_size"]
    config["vq"]["latent_channels"] = -1
    config["context"] = [1, 2]
    config["notes"] = "hi"
    message = problems_of(config)
    assert "(5):" in message
    for line in (
        "notes: unknown key",
        'unet.layers_per_block: must be a whole number from 1 to 8, got "2"',
        "unet.sample_size: missing",
        "vq.latent_channels: must be a whole number from 1 to 256, got -1",
        "context: must be an object of settings, got [1, 2]",
    ):
        assert f"\n  {line}" in message


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ([1, 2], 'holds [1, 2], not a RefFace model config (a JSON object with "format": "refface")'),
        ({"version": 1}, 'is not a RefFace model config (no format, expected "format": "refface")'),
        ({"format": "diffusers"}, 'is not a RefFace model config (format "diffusers", expected'),
        ({"format": "refface", "version": 2}, "is a version 2 RefFace model, newer than this RefFace reads (up to 1)"),
        ({"format": "refface", "version": "1", "unet": {}, "vq": None}, "version: must be a whole number"),
    ],
)
def test_not_a_refface_config(config, expected):
    assert expected in problems_of(config)


# -- property test: whatever passes the check builds, loads or is refused with a RefFaceError ---------------------

WORDS = ["silu", "relu", "gelu", "tanh", "positional", "fourier", "DownBlock2D", "AttnDownBlock2D", "UpBlock2D",
         "AttnUpBlock2D", "DownEncoderBlock2D", "UpDecoderBlock2D", "arcface", "", "NaN"]  # fmt: skip


def nearby(rng: random.Random, value: object) -> object:
    """A plausible edit of a valid value, so that many mutated configs pass the check and reach diffusers."""
    if type(value) is int:
        return rng.choice([value * 2, value * 4, value // 2, value // 4, value + 1, value - 1])
    if type(value) is float:
        return rng.choice([value * 10, value / 10, 0.0, 1.0])
    if isinstance(value, list) and value:
        return [nearby(rng, v) if rng.random() < 0.5 else v for v in value] + value[: rng.choice([0, 0, 0, 1])]
    if isinstance(value, str):
        return rng.choice(WORDS)
    return random_value(rng)


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.choice(["small", "small", "small", "big", "float", "bool", "none", "word", "text", "list", "dict"])
    if kind == "small":
        return rng.choice([rng.randint(-2, 70), 2 ** rng.randint(0, 6)])
    if kind == "big":
        return rng.choice([1, -1]) * 10 ** rng.randint(3, 12)
    if kind == "float":
        return rng.choice([0.0, 1e-6, 0.5, 1.0, 8.0, 1e9, -3.5, float("nan"), float("inf")])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "word":
        return rng.choice(WORDS)
    if kind == "text":
        return "".join(rng.choices(string.ascii_letters, k=rng.randint(0, 8)))
    if kind == "list" and depth < 2:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 7))]
    if kind == "dict" and depth < 2:
        return {"k": random_value(rng, depth + 1)}
    return None


def mutate(config: dict, rng: random.Random) -> list[str]:
    """One to three random changes (a key dropped, a value or a list item replaced, a key added); what was done."""
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        name = rng.choice(["unet", "unet", "unet", "vq", "vq", "vq", "context", "context", "top"])
        section = config if name == "top" or not isinstance(config.get(name), dict) else config[name]
        key = rng.choice(sorted(section))
        action = rng.choice(["drop", "set", "set", "near", "near", "near", "near", "near", "item", "add"])
        if action == "drop":
            del section[key]
        elif action == "item" and isinstance(section[key], list) and section[key]:
            section[key][rng.randrange(len(section[key]))] = random_value(rng)
        elif action == "add":
            key = rng.choice(["dropout", "mid_block_type", "num_train_timesteps", "zz"])
            section[key] = random_value(rng)
        elif action == "near":
            section[key] = nearby(rng, section[key])
        else:
            section[key] = random_value(rng)
        done.append(f"{name}.{action} {key} -> {json.dumps(section.get(key))}")
    return done


def run_once(model: RefFaceRestorer, gen: torch.Generator) -> torch.Tensor:
    """Encode, denoise with references (and context tokens) and decode at the config's sizes."""
    size, latent = model.unet_config["sample_size"], model.vq_config["vq_embed_dim"]
    image = torch.rand(1, model.vq_config["in_channels"], model.image_size, model.image_size, generator=gen)
    lq = model.encode(image * 2 - 1)
    refs = torch.randn(1, 2, latent, size, size, generator=gen)
    tokens = None
    if model.context_encoder is not None:
        c = model.context_config
        hidden = [torch.randn(2, 17, c["appearance_width"], generator=gen) for _ in c["appearance_layers"]]
        tokens = model.context_encoder(torch.randn(2, c["identity_dim"], generator=gen), hidden)[None]
    eps = model.predict_noise(torch.randn(lq.shape, generator=gen), 500, lq, refs, tokens)
    return model.decode(eps)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    folders = []
    for context in (False, True):
        model = tiny_restorer(seed=3, sample_size=8)
        if context:
            model.add_composite_context(tiny_context_config())
        folder = tmp_path_factory.mktemp("with_context" if context else "plain")
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds overhead, a lot of it on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mutated_configs_load_or_are_refused(tiny_folders, tmp_path, one_thread):
    """200 seeded mutations of the tiny configs: what the check accepts builds, and loads or is refused for
    mismatching weights; what loads runs. Never a TypeError, ZeroDivisionError or RuntimeError from diffusers."""
    rng = random.Random(12)
    outcomes, unexpected = {"checked": 0, "loaded": 0}, []
    for case in range(200):
        source = tiny_folders[case % 2]
        config = json.loads((source / "config.json").read_text())
        changes = mutate(config, rng)
        folder = tmp_path / str(case)
        folder.mkdir()
        (folder / "model.safetensors").symlink_to(source / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config))
        try:
            check_model_config(config, "config.json")
            outcomes["checked"] += 1
        except RefFaceError:
            continue
        try:
            model = RefFaceRestorer.from_pretrained(folder)
            out = run_once(model, torch.Generator().manual_seed(case))
            assert torch.isfinite(out).all(), f"case {case}: {changes}: non-finite output"
            outcomes["loaded"] += 1
        except RefFaceError as e:
            assert "do not match the model config" in str(e), f"case {case}: {changes}: {e}"
        except Exception as e:  # what the check exists to prevent: report every such case at once
            unexpected.append(f"case {case}: {changes}: {type(e).__name__}: {e}")
    assert not unexpected, "\n".join(unexpected)
    assert outcomes["checked"] >= 20 and outcomes["loaded"] >= 10, outcomes
