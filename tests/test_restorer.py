"""RefFaceRestorer: sampling options, precisions, save/load, image types."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from support import tiny_restorer

from refface_core import Cancelled, RefFaceError, RefFaceRestorer
from refface_core.model import CompositeContext


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


def person(model, n, seed, tokens=False):
    """A CompositeContext of ``n`` random reference crops (and, with ``tokens``, random context tokens)."""
    gen = torch.Generator().manual_seed(seed)
    refs = torch.rand(1, n, 3, model.image_size, model.image_size, generator=gen) * 2 - 1
    width = model.context_encoder.width if tokens else 0
    return CompositeContext(
        model.encode_references(refs), torch.randn(1, n, 3, width, generator=gen) if tokens else None
    )


@pytest.fixture(scope="module")
def composite_model():
    """The tiny model with Composite Context layers whose (zero-initialised) outputs are made random, so that a
    face given another face's tokens would show."""
    from support import tiny_context_config

    model = tiny_restorer(seed=2)
    model.add_composite_context(tiny_context_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "to_out_ctx" in name:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    return model


def decoded_latents(model, monkeypatch):
    """The latents each restore decodes, in order."""
    latents = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda x: (latents.append(x), decode(x))[1])
    return latents


@pytest.mark.parametrize(("guidance", "composite"), [("refldm", False), ("multi_reference", True)])
def test_a_batch_of_faces_restores_each_face_as_alone(model, composite_model, composite, guidance, monkeypatch):
    """Faces with their own references (1, 2 or 3 of them) and seeds: batched by reference count, in chunks of any
    size, each face samples as it does alone, to float rounding (images can still differ where a latent sits on a
    codebook boundary)."""
    model = composite_model if composite else model
    rng = np.random.default_rng(1)
    faces = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    contexts = [person(model, n, seed, composite) for n, seed in [(2, 0), (1, 1), (2, 2), (3, 3), (1, 4)]]
    seeds = [11, 12, 13, 14, 11]
    options = dict(steps=3, guidance=guidance)
    latents = decoded_latents(model, monkeypatch)
    for face, context, seed in zip(faces, contexts, seeds, strict=True):
        model.restore(face, context, seed=seed, **options)
    alone = torch.cat(latents)[[0, 2, 1, 4, 3]]  # in the batch's order: by reference count, then as given
    assert (alone[0] - alone[1]).abs().max() > 0.01 * alone.abs().max()  # another person's references, another face
    for batch_size in (2, 8):
        latents.clear()
        model.restore_batch(faces, contexts, seeds, batch_size=batch_size, **options)
        assert (torch.cat(latents) - alone).abs().max() <= 1e-5 * alone.abs().max(), batch_size


def count_unet_calls(monkeypatch):
    from refface_core.model import restorer, unet

    calls = []

    def counted(*args, **kwargs):
        rows = kwargs.get("rows")  # rows: faces × branches (or references, for the CacheKV pass)
        calls.append(args[1].shape[0] if rows is None else len(rows))
        return unet.unet_forward(*args, **kwargs)

    monkeypatch.setattr(restorer, "unet_forward", counted)
    return calls


def test_faces_of_one_person_take_one_unet_call_per_step(model, monkeypatch):
    rng = np.random.default_rng(2)
    faces = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    shared = person(model, 2, 0)
    calls = count_unet_calls(monkeypatch)
    model.restore_batch(faces, shared, [1, 2, 3], steps=4)  # refldm guidance: 2 branches
    assert calls[-5:] == [2] + [3 * 2] * 4  # the shared CacheKV once (2 references), then one call per step
    assert calls[:-5] in ([], [1])  # ∅'s keys and values: once per model, unless an earlier test made them
    calls.clear()
    model.restore_batch(faces, [shared, person(model, 1, 1), shared], [1, 2, 3], steps=4, batch_size=8)
    assert calls == [2] + [2 * 2] * 4 + [1] + [1 * 2] * 4  # a run per reference count; faces 0, 2 share
    calls.clear()
    model.restore_batch(faces, shared, [1, 2, 3], steps=4, batch_size=2)
    assert calls == [2] + [2 * 2] * 4 + [2] + [1 * 2] * 4  # chunks of at most 2 faces


def test_candidates_encode_the_face_once_and_are_their_seeds_restores(model, monkeypatch):
    face = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    context = person(model, 2, 0)
    latents = decoded_latents(model, monkeypatch)
    model.restore(face, context, seed=6, steps=3)
    encode, encoded = model.encode, []
    monkeypatch.setattr(model, "encode", lambda x: (encoded.append(len(x)), encode(x))[1])
    calls = count_unet_calls(monkeypatch)
    model.restore_candidates(face, context, [5, 6], steps=3)
    assert encoded == [1] and calls == [2] + [2 * 2] * 3  # one LQ encoding, one CacheKV, one call per step
    alone, candidates = latents
    assert (candidates[1] - alone[0]).abs().max() <= 1e-5 * alone.abs().max()
    assert (candidates[0] - alone[0]).abs().max() > 0.01 * alone.abs().max()


def test_batch_mistakes_are_one_clear_line(model):
    face = np.zeros((32, 32, 3), np.uint8)
    context = person(model, 1, 0)
    with pytest.raises(RefFaceError, match="2 faces need one context and one seed each, got 2 and 1"):
        model.restore_batch([face, face], context, [1])
    with pytest.raises(RefFaceError, match="batch_size must be a whole number of at least 1, got 0"):
        model.restore_batch([face], context, [1], batch_size=0)
    with pytest.raises(RefFaceError, match=r"one person's references \[1,N,C,h,w\], got a batch of \(2, 1,"):
        model.restore_batch([face], CompositeContext(context.latents.expand(2, -1, -1, -1, -1)), [1])
    tokens = CompositeContext(context.latents, torch.zeros(1, 1, 3, 8))
    with pytest.raises(RefFaceError, match="some contexts have Composite Context tokens and some not"):
        model.restore_batch([face, face], [context, tokens], [1, 2])
    assert model.restore_batch([], context, []) == []  # a photo with no face to restore
    with pytest.raises(RefFaceError, match="at least one seed is needed"):
        model.restore_candidates(face, context, [])
