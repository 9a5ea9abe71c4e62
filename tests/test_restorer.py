"""RefFaceRestorer: sampling options, precisions, save/load, image types."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from support import tiny_restorer

from refface_core import Cancelled, RefFaceError, RefFaceRestorer


@pytest.fixture(scope="module")
def model():
    return tiny_restorer(seed=2)


@pytest.fixture(scope="module")
def latents():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(1, 8, 16, 16, generator=gen), torch.randn(1, 2, 8, 16, 16, generator=gen)


def test_sampling_is_seeded(model, latents):
    lq, refs = latents

    def run(seed, **kw):
        return model.sample(lq, refs, steps=4, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))
    # default x_T matches ReF-LDM's torch.manual_seed(seed); randn(shape)
    torch.manual_seed(7)
    x_T = torch.randn(1, 8, 16, 16)
    assert torch.equal(run(7), model.sample(lq, refs, steps=4, x_T=x_T))


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("guidance", ["refldm", "multi_reference"])
def test_solvers_and_guidance_modes(model, latents, solver, guidance):
    lq, refs = latents
    steps = []
    out = model.sample(
        lq, refs, steps=5, solver=solver, guidance=guidance, callback=lambda s, n, x, x0: steps.append(s)
    )
    assert out.shape == lq.shape and torch.isfinite(out).all()
    assert steps == [1, 2, 3, 4, 5]


def test_dpm_solver_uses_refldm_timesteps():
    from refface_core.sampling.solvers import DPMSolverPP

    assert DPMSolverPP(50, "uniform_trailing").timesteps[:2] == [999, 979]
    assert DPMSolverPP(50, "uniform").timesteps[-2:] == [21, 1]


def test_cancel_stops_sampling(model, latents):
    lq, refs = latents
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled, match="step 2 of 10"):
        model.sample(lq, refs, steps=10, cancel=cancel)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_track_fp32(model, latents, dtype):
    lq, refs = latents
    x_T = torch.randn(lq.shape, generator=torch.Generator().manual_seed(1))
    ref32 = model.predict_noise(x_T, 500, lq, refs)
    half = tiny_restorer(seed=2).to(dtype)
    eps = half.predict_noise(x_T, 500, lq, refs)
    assert eps.dtype == torch.float32
    assert (eps - ref32).abs().max() < 0.05 * ref32.abs().max()
    assert half.sample(lq, refs, steps=2).isfinite().all()


def test_save_load_round_trip(model, latents, tmp_path):
    lq, refs = latents
    model.save_pretrained(tmp_path)
    loaded = RefFaceRestorer.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["format"] == "refface"
    x_T = torch.randn(lq.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.sample(lq, refs, steps=3, x_T=x_T), loaded.sample(lq, refs, steps=3, x_T=x_T))


def test_from_pretrained_errors(model, tmp_path):
    with pytest.raises(RefFaceError, match="model folder not found"):
        RefFaceRestorer.from_pretrained(tmp_path / "nope")
    with pytest.raises(RefFaceError, match="not a RefFace model folder.*refface convert"):
        RefFaceRestorer.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["unet"]["layers_per_block"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RefFaceError, match="(?s)do not match the model config.*missing: unet.down_blocks.0.resnets.1"):
        RefFaceRestorer.from_pretrained(tmp_path)


def test_from_pretrained_checks_the_config_before_building(model, tmp_path):
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    good = config_file.read_text()
    config_file.write_text("{")
    with pytest.raises(RefFaceError, match=r"config.json is not valid JSON \(Expecting"):
        RefFaceRestorer.from_pretrained(tmp_path)
    # Python's json reads NaN; a zero head size was a ZeroDivisionError inside diffusers
    config_file.write_text(
        good.replace('"norm_eps": 1e-05', '"norm_eps": NaN').replace(
            '"attention_head_dim": 8', '"attention_head_dim": 0'
        )
    )
    with pytest.raises(RefFaceError) as info:
        RefFaceRestorer.from_pretrained(tmp_path)
    assert str(info.value).splitlines() == [
        f"{config_file} has invalid settings (fix them, or convert the model again) (2):",
        "  unet.attention_head_dim: must be a whole number from 1 to 2048, got 0",
        "  unet.norm_eps: must be a number from 1e-12 to 0.1, got NaN",
    ]
    config_file.write_text(json.dumps(json.loads(good) | {"version": 2}))
    with pytest.raises(RefFaceError, match="is a version 2 RefFace model, newer than this RefFace reads.*update"):
        RefFaceRestorer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("name", "change", "problem"),
    [
        ("unet.conv_in.weight", lambda t: t.long(), "torch.int64, weights must be floating point"),
        ("unet.conv_in.weight", lambda t: t * float("nan"), "holds NaN or infinite values"),
        ("vq.quantize.embedding.weight", lambda t: t.fill_(float("-inf")), "holds NaN or infinite values"),
    ],
)
def test_from_pretrained_refuses_unusable_weights(model, tmp_path, name, change, problem):
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file(state | {name: change(state[name])}, tmp_path / "model.safetensors")
    with pytest.raises(RefFaceError) as info:
        RefFaceRestorer.from_pretrained(tmp_path)
    assert str(info.value).splitlines() == [
        f"{tmp_path / 'model.safetensors'} holds unusable weights (convert the model again) (1):",
        f"  {name}: {problem}",
    ]


def test_restore_accepts_pil_numpy_and_tensor(model):
    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)  # resized to the model's 32 px
    ref = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("L")
    options = dict(steps=2, seed=1)
    out_np = model.restore(face, [ref], **options)
    assert out_np.dtype == np.uint8 and out_np.shape == (32, 32, 3)
    out_pil = model.restore(Image.fromarray(face), [ref], **options)
    assert isinstance(out_pil, Image.Image) and out_pil.size == (32, 32)
    assert np.array_equal(np.asarray(out_pil), out_np)
    out_t = model.restore(torch.from_numpy(face).permute(2, 0, 1) / 255.0, [ref], **options)
    assert out_t.shape == (3, 32, 32) and 0 <= out_t.min() and out_t.max() <= 1
    reused = model.encode_context([ref])  # reference work done once for many restores
    assert np.array_equal(model.restore(face, reused, **options), out_np)
    with pytest.raises(RefFaceError, match="square"):
        model.restore(face[:, :40], [ref], **options)
    with pytest.raises(RefFaceError, match="at least one reference"):
        model.restore(face, [], **options)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"eta": float("nan")}, "eta must be a finite number, got nan"),
        ({"eta": -0.5}, "eta must be at least 0"),
        ({"scale": float("inf")}, "guidance scale must be a finite number, got inf"),
        ({"context_scale": float("nan")}, "context_scale must be a finite number"),
        ({"ref_slots": 65}, "reference slots must be between 1 and 64"),
        ({"seed": 2**63}, "seed must be a whole number from 0 to"),
        ({"seed": -1}, "seed must be a whole number from 0 to"),
    ],
)
def test_bad_numbers_in_the_api_are_refused(model, change, message):
    face = np.full((32, 32, 3), 120, np.uint8)
    with pytest.raises(RefFaceError, match=message):
        model.restore(face, [face], steps=1, **change)


@pytest.mark.parametrize(
    "face, refs, message",
    [
        (np.full((32, 32, 3), np.nan, np.float32), None, "NaN or infinite values"),
        (torch.full((3, 32, 32), float("inf")), None, "NaN or infinite values"),
        (np.zeros((0, 0, 3), np.uint8), None, "empty"),
        (np.zeros((32, 32), np.uint8), None, "expected an H×W×3 RGB array, got shape (32, 32)"),
        (np.zeros((32, 32, 4), np.uint8), None, "got shape (32, 32, 4)"),
        (np.zeros((32, 32, 3), np.int64), None, "expected uint8 pixels or floats in [0, 1], got int64"),
        (np.zeros((32, 32, 3), np.uint8), [], "at least one reference face is needed"),
    ],
)
def test_bad_images_in_the_api_are_refused(model, face, refs, message):
    ref = np.full((32, 32, 3), 120, np.uint8)
    with pytest.raises(RefFaceError) as error:
        model.restore(face, [ref] if refs is None else refs, steps=1)
    assert message in str(error.value)


def test_the_reference_pass_stops_after_the_last_attention_layer(model):
    """Nothing after the last attention layer is used by a reference pass: it is not run, and the recorded keys and
    values are exactly those of a whole forward pass."""
    from refface_core.model.unet import KVRecorder, unet_forward

    refs = torch.randn(2, 2 * model.unet_config["out_channels"], 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.zeros(2, dtype=torch.long)

    class WholePass:  # records as a KVRecorder does, but is not one: the whole forward runs
        attend = KVRecorder.attend

        def __init__(self) -> None:
            self.layers = {}

    whole = WholePass()
    assert unet_forward(model.unet, refs, t, whole) is not None
    calls = []
    hook = model.unet.conv_out.register_forward_hook(lambda *args: calls.append(1))
    try:
        recorder = KVRecorder()
        assert unet_forward(model.unet, refs, t, recorder) is None
    finally:
        hook.remove()
    assert calls == [] and recorder.layers.keys() == whole.layers.keys() and len(recorder.layers) >= 2
    for name, (k, v) in recorder.layers.items():
        assert torch.equal(k, whole.layers[name][0]) and torch.equal(v, whole.layers[name][1]), name
