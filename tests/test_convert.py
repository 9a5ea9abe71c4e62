"""`refface convert`: full-size key lists, both file formats, EMA choice, and clear errors."""

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support import GOLDEN, weights_of

from refface_core import RefFaceError, RefFaceRestorer
from refface_core.cli import main
from refface_core.model import convert_refldm
from refface_core.model.unet import refldm_unet_config
from refface_core.model.vq import refldm_vq_config


def full_size_state_dicts():
    """Random tensors with exactly the names and shapes of the released checkpoints' key lists."""
    if not GOLDEN.is_dir():
        pytest.skip(f"key lists not found at {GOLDEN}")
    keys = json.loads((GOLDEN / "refldm_keys.json").read_text())
    vq_keys = json.loads((GOLDEN / "vqgan_keys.json").read_text())
    gen = torch.Generator().manual_seed(0)
    unet = {name: torch.zeros(()).expand(shape) for name, shape, _ in keys["model.diffusion_model"]}
    unet |= {name: torch.randn(shape, generator=gen) for name, shape, _ in keys["model_ema"]["buffers"]}
    unet |= {name: torch.zeros(()).expand(shape) for name, shape, _ in keys["first_stage_model"]}
    for entries in keys["other"].values():  # schedule buffers and the cond_stage_model copies of the VQ
        unet |= {name: torch.zeros(()).expand(shape) for name, shape, _ in entries}
    vq = {name: torch.randn(shape, generator=gen) for name, shape, _ in vq_keys["autoencoder"]}
    vq |= {name: torch.zeros(()).expand(shape) for name, shape, _ in vq_keys["loss_training_only"]}
    return keys, unet, vq


def test_full_size_checkpoints_convert_exactly():
    keys, unet_sd, vq_sd = full_size_state_dicts()
    assert len(unet_sd) == keys["counts"]["total_state_dict_tensors"]
    model = convert_refldm(unet_sd, vq_sd)
    assert sum(p.numel() for p in model.unet.parameters()) == 117_759_368
    assert sum(p.numel() for p in model.vq.parameters()) == 57_183_515
    assert model.unet_config == refldm_unet_config()
    assert model.vq_config == refldm_vq_config()
    # EMA weights by default
    ema = "model_ema.diffusion_model"
    assert torch.equal(model.unet.conv_in.weight, unet_sd[f"{ema}input_blocks00weight"])
    # legacy qkv: head h owns rows [3dh, 3d(h+1)) = q, k, v of that head
    qkv = unet_sd[f"{ema}middle_block1qkvweight"][:, :, 0]
    attn = model.unet.mid_block.attentions[0]
    assert attn.heads == 20
    for h in (0, 7, 19):
        rows = slice(96 * h, 96 * h + 96)
        assert torch.equal(attn.to_q.weight[32 * h : 32 * h + 32], qkv[rows][:32])
        assert torch.equal(attn.to_k.weight[32 * h : 32 * h + 32], qkv[rows][32:64])
        assert torch.equal(attn.to_v.weight[32 * h : 32 * h + 32], qkv[rows][64:])
    assert torch.equal(
        model.vq.decoder.up_blocks[0].resnets[0].conv1.weight, vq_sd["decoder.up.3.block.0.conv1.weight"]
    )
    assert torch.equal(model.vq.quantize.embedding.weight, vq_sd["quantize.embedding.weight"])


@pytest.fixture
def tiny_checkpoint(golden):
    """The tiny golden UNet as a ReF-LDM state dict (raw + EMA differing) and the VQ as a Lightning checkpoint."""
    raw = {k: v for k, v in weights_of(golden("unet_tiny_sharp")).items()}
    ema = {
        "model_ema.diffusion_model" + k.removeprefix("model.diffusion_model.").replace(".", ""): v
        for k, v in raw.items()
    }
    noisy_raw = {k: v + 1.0 for k, v in raw.items()}
    unet = noisy_raw | ema | {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5)}
    unet |= {"betas": torch.zeros(1000), "first_stage_model.quant_conv.bias": torch.zeros(8)}
    vq = weights_of(golden("vq_tiny")) | {"loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)}
    return unet, vq, raw


def eps_error(model, golden):
    g = golden("unet_tiny_sharp")
    refs = g["golden.ref_latents_wide"].unflatten(3, (3, 16)).permute(0, 3, 1, 2, 4)
    eps = model.predict_noise(g["golden.x_t"], g["golden.t"], g["golden.z_lq"], refs)
    return (eps - g["golden.eps_cachekv"]).abs().max().item()


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_cli_converts_files_and_uses_ema(tmp_path, golden, tiny_checkpoint, fmt, capsys):
    unet, vq, _ = tiny_checkpoint
    if fmt == "ckpt":
        torch.save(unet, tmp_path / "refldm.ckpt")
        torch.save({"state_dict": vq, "epoch": 3, "global_step": 1000}, tmp_path / "vqgan.ckpt")
    else:
        save_file({k: v.contiguous() for k, v in unet.items()}, tmp_path / "refldm.safetensors")
        save_file(vq, tmp_path / "vqgan.safetensors")
    out = tmp_path / "model"
    args = ["convert", "--refldm-unet", str(tmp_path / f"refldm.{fmt}"), "--refldm-vq", str(tmp_path / f"vqgan.{fmt}")]
    assert main([*args, "--num-head-channels", "8", "--out", str(out)]) == 0
    assert "EMA weights" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert eps_error(RefFaceRestorer.from_pretrained(out), golden) < 3e-5

    assert main([*args, "--num-head-channels", "8", "--no-ema", "--out", str(tmp_path / "raw")]) == 0
    raw_model = RefFaceRestorer.from_pretrained(tmp_path / "raw")
    assert torch.equal(raw_model.unet.conv_in.weight, unet["model.diffusion_model.input_blocks.0.0.weight"])
    assert not list(tmp_path.glob(".*.tmp"))  # written beside, then renamed into place

    before = (out / "model.safetensors").read_bytes()
    (tmp_path / "a_file").write_text("x")
    for target, message in [
        (out, "--out .*model exists; move it away or give a new folder"),
        (tmp_path / "a_file" / "model", "a_file is a file, not a folder"),
        (Path("/proc/model"), "cannot write into /proc"),
    ]:
        assert main([*args, "--num-head-channels", "8", "--out", str(target)]) == 1
        assert re.search(message, capsys.readouterr().err)
    assert (out / "model.safetensors").read_bytes() == before  # the existing model is untouched


def test_errors_list_every_problem(tiny_checkpoint):
    unet, vq, raw = tiny_checkpoint
    broken = dict(raw)
    del broken["model.diffusion_model.out.2.bias"]
    broken["model.diffusion_model.input_blocks.3.1.qkv.bias"] = torch.zeros(7)
    broken["model.diffusion_model.extra_layer.weight"] = torch.zeros(3)
    broken["something_else"] = torch.zeros(3)
    with pytest.raises(RefFaceError) as info:
        convert_refldm(broken, vq, head_channels=8, use_ema=False)
    message = str(info.value)
    assert "missing: unet.conv_out.bias" in message
    assert "unexpected: model.diffusion_model.extra_layer.weight" in message
    assert "unexpected: something_else" in message
    assert "shape of model.diffusion_model.input_blocks.3.1.qkv.bias: (7,)" in message

    with pytest.raises(RefFaceError, match="EMA weights missing.*use --no-ema"):
        convert_refldm(raw, vq, head_channels=8)
    with pytest.raises(RefFaceError, match="--num-head-channels 48 does not divide"):
        convert_refldm(unet, vq, head_channels=48)
    with pytest.raises(RefFaceError, match="is this ReF-LDM's refldm.ckpt"):
        convert_refldm(vq, vq, head_channels=8)
    with pytest.raises(RefFaceError, match="VQ architecture"):
        convert_refldm(unet, {k: v for k, v in vq.items() if "conv_out" not in k}, head_channels=8)


def test_cli_reports_unloadable_files(tmp_path, capsys):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hparams": argparse.Namespace(lr=1)}, tmp_path / "pickled.ckpt")
    for bad in ("missing.ckpt", "notes.ckpt", "pickled.ckpt"):
        code = main(
            [
                "convert",
                "--refldm-unet",
                str(tmp_path / bad),
                "--refldm-vq",
                str(tmp_path / bad),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("refface: error:") and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_only_floating_point_weights_convert(tiny_checkpoint, dtype):
    unet, vq, raw = tiny_checkpoint
    name = "model.diffusion_model.input_blocks.0.0.weight"
    with pytest.raises(RefFaceError) as info:
        convert_refldm(raw | {name: raw[name].to(dtype)}, vq, head_channels=8, use_ema=False)
    assert f"\n  {name}: {dtype}, weights must be floating point" in str(info.value)
    # integer buffers inference does not use (EMA step count, discriminator batch counts) are still skipped
    vq = vq | {"loss.discriminator.main.1.num_batches_tracked": torch.tensor(7)}
    assert convert_refldm(unet, vq, head_channels=8).unet.conv_in.weight.dtype == torch.float32


def test_non_finite_weights_do_not_convert(tiny_checkpoint):
    _, vq, raw = tiny_checkpoint
    name = "model.diffusion_model.out.2.bias"
    broken_vq = vq | {"quantize.embedding.weight": torch.full_like(vq["quantize.embedding.weight"], float("inf"))}
    with pytest.raises(RefFaceError) as info:
        convert_refldm(raw | {name: raw[name] * float("nan")}, broken_vq, head_channels=8, use_ema=False)
    assert f"\n  {name}: holds NaN or infinite values" in str(info.value)
    assert "\n  quantize.embedding.weight: holds NaN or infinite values" in str(info.value)


@pytest.mark.parametrize("value", ["0", "-8", "4096"])
def test_head_size_is_checked_before_reading_checkpoints(tmp_path, capsys, value):
    args = ["convert", "--refldm-unet", str(tmp_path / "absent.ckpt"), "--refldm-vq", str(tmp_path / "absent.ckpt")]
    assert main([*args, "--num-head-channels", value, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert (
        err == f"refface: error: --num-head-channels must be a whole number from 1 to 2048, got {value} "
        "(ReF-LDM's is 32)\n"
    )
    with pytest.raises(RefFaceError, match="--num-head-channels must be a whole number"):
        convert_refldm({}, {}, head_channels=int(value))
