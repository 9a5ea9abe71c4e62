"""The exact speed-ups give the results of the plain computation: ∅ as a model constant, repeated slots attended
once with a ln-count bias, preallocated CacheKV buffers, lean ResNet blocks, the compiled UNet."""

import pytest
import torch
import torch.nn.functional as F
from support import tiny_restorer

from refface_core.model import CacheKV, KVRecorder, pick_device
from refface_core.model.unet import lean_resnet, unet_forward
from refface_core.sampling import make_branches


class PlainCache:
    """What CacheKV computes, written plainly: each row attends to its own tokens and every slot's, copies and all."""

    def __init__(self, layers, slots):
        def pick(t):
            rows, count = slots.shape
            _, heads, tokens, dim = t.shape
            picked = t[slots.flatten()].view(rows, count, heads, tokens, dim).transpose(1, 2)
            return picked.reshape(rows, heads, count * tokens, dim)

        self.layers = {name: (pick(k), pick(v)) for name, (k, v) in layers.items()}

    def attend(self, name, q, k, v):
        ref_k, ref_v = self.layers[name]
        return F.scaled_dot_product_attention(q, torch.cat([k, ref_k], 2), torch.cat([v, ref_v], 2))


@pytest.fixture(scope="module")
def model():
    return tiny_restorer(seed=3)


def inputs(model, rows, passes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = model.unet_config["out_channels"]
    refs = torch.randn(passes, 2 * c, 16, 16, generator=gen)
    main = torch.randn(rows, 2 * c, 16, 16, generator=gen)
    return refs, main, torch.full((rows,), 500)


@pytest.mark.parametrize(
    "slots",
    [
        [[3, 3, 3], [0, 1, 2]],  # ReF-LDM's CFG: ∅ three times, then three references
        [[3, 3, 3, 3, 3], [0, 1, 2, 0, 1]],  # --ref-slots 5 over three references: counts 2, 2, 1
        [[3, 3], [3, 3], [0, 0], [1, 1], [2, 2]],  # the multi-reference guidance with 2 slots
        [[0, 1, 2], [2, 2, 2], [1, 0, 2]],  # runs that are not in order
    ],
)
def test_cachekv_gives_the_plain_attention(model, slots):
    slots = torch.tensor(slots)
    refs, main, t = inputs(model, len(slots))
    recorder = KVRecorder()
    with torch.no_grad():
        unet_forward(model.unet, refs, torch.zeros(len(refs), dtype=torch.long), recorder)
        plain = unet_forward(model.unet, main, t, PlainCache(recorder.layers, slots))
        cache = recorder.gather(slots)
        fast = unet_forward(model.unet, main, t, cache)
        again = unet_forward(model.unet, main, t, cache)  # the buffers are reused: nothing of the last call stays
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast, again)
    with torch.enable_grad():  # training concatenates instead of writing into the buffers
        torch.testing.assert_close(unet_forward(model.unet, main, t, cache), plain, atol=1e-5, rtol=1e-5)


def test_a_repeated_slot_is_one_copy_with_a_bias_and_buffers_are_written_in_place():
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(3, 2, 4, 8, generator=gen), torch.randn(3, 2, 4, 8, generator=gen)
    slots = torch.tensor([[2, 2, 2, 2], [0, 1, 1, 0]])
    cache = CacheKV({"layer": (k, v)}, slots)
    (keys_1, _, room_1, bias_1), (keys_2, _, room_2, bias_2) = cache.layers["layer"]
    assert keys_1.shape == (1, 2, 4 + 4, 8) and keys_2.shape == (1, 2, 4 + 2 * 4, 8)  # one copy per distinct pass
    assert room_1 == room_2 == 4
    assert torch.allclose(bias_1, torch.tensor(4.0).log() * torch.ones(1, 4))  # ln 4 on the one copy of pass 2
    assert torch.allclose(bias_2, torch.tensor(2.0).log() * torch.ones(1, 8))  # passes 0 and 1 twice each
    pointers = [t.data_ptr() for t in (keys_1, keys_2)]
    q, own_k, own_v = (torch.randn(2, 2, 4, 8, generator=gen) for _ in range(3))
    with torch.no_grad():
        out = cache.attend("layer", q, own_k, own_v)
    plain = PlainCache({"layer": (k, v)}, slots).attend("layer", q, own_k, own_v)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)
    assert [t.data_ptr() for t in (keys_1, keys_2)] == pointers and torch.equal(keys_1[0, :, :4], own_k[0])
    with pytest.raises(ValueError, match="laid out for 2"):
        cache.attend("layer", q[:1], own_k[:1], own_v[:1])


def test_a_main_pass_of_another_size_still_attends_to_its_references(model):
    """The buffers have room for a main pass of the references' size; another size is concatenated, as before."""
    slots = torch.tensor([[3, 3, 3], [0, 1, 2]])
    refs, _, _ = inputs(model, 2)
    recorder = KVRecorder()
    gen = torch.Generator().manual_seed(2)
    main = torch.randn(2, refs.shape[1], 8, 8, generator=gen)
    with torch.no_grad():
        unet_forward(model.unet, refs, torch.zeros(len(refs), dtype=torch.long), recorder)
        fast = unet_forward(model.unet, main, torch.full((2,), 500), recorder.gather(slots))
        plain = unet_forward(model.unet, main, torch.full((2,), 500), PlainCache(recorder.layers, slots))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_the_empty_reference_is_computed_once_and_follows_the_weights():
    model = tiny_restorer(seed=4)
    refs = torch.randn(1, 2, model.unet_config["out_channels"], 16, 16)
    shape = torch.Size([2 * model.unet_config["out_channels"], 16, 16])
    first = model.empty_reference_kv(shape)
    assert model.empty_reference_kv(shape) is first
    # what a whole reference pass with ∅ in the batch records
    recorder = KVRecorder()
    with torch.no_grad():
        ref_rows = torch.cat([refs[0], torch.zeros_like(refs[0])], dim=1)
        unet_forward(model.unet, torch.cat([ref_rows, torch.zeros_like(ref_rows[:1])]), torch.zeros(3).long(), recorder)
    for name, (k, v) in first.items():
        torch.testing.assert_close(k, recorder.layers[name][0][2:], atol=2e-5, rtol=1e-5)  # batch rounding
        torch.testing.assert_close(v, recorder.layers[name][1][2:], atol=2e-5, rtol=1e-5)

    def changed(before):
        after = model.empty_reference_kv(shape)
        assert after is not before
        return after

    with torch.no_grad():  # an optimizer step: the same tensors, changed in place
        model.unet.conv_in.bias.add_(0.5)
    kv = changed(first)
    name = next(iter(kv))
    assert not torch.allclose(kv[name][0], first[name][0])
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # new tensors
    kv = changed(kv)
    model.double()
    kv = changed(kv)
    assert kv[name][0].dtype == torch.float64
    model.float()
    changed(kv)


def test_lean_resnet_blocks_match_diffusers():
    model = tiny_restorer(seed=5)
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(2, model.unet.time_embedding.linear_2.out_features, generator=gen)
    blocks = [r for block in (*model.unet.down_blocks, model.unet.mid_block, *model.unet.up_blocks)
              for r in block.resnets]  # fmt: skip
    assert blocks
    with torch.no_grad():
        for resnet in blocks:
            x = torch.randn(2, resnet.in_channels, 8, 8, generator=gen)
            torch.testing.assert_close(lean_resnet(resnet, x.clone(), F.silu(emb)), resnet(x, emb), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_the_compiled_unet_matches_eager(golden, golden_model):
    """On the CPU (inductor); within the golden tolerance of the original code, for eps and a 5-step restore."""
    model = golden_model("sharp")
    g = golden("schedule")
    refs = g["ddim_full_sharp.ref_latents_wide"].unflatten(3, (3, 16)).permute(0, 3, 1, 2, 4)
    z_lq, x_T = g["ddim_full_sharp.z_lq"], g["ddim_full_sharp.x_T"]
    branches = make_branches("refldm", 3, 1.5, 1.2, 1.2)
    eager = model.denoiser(z_lq, refs, branches)(x_T, 999)
    model.set_compile(True)
    try:
        compiled = model.denoiser(z_lq, refs, branches)(x_T, 999)
        latent = model.sample(z_lq, refs, steps=5, spacing="uniform_trailing", scale=1.5, x_T=x_T)
    finally:
        model.set_compile(False)
    torch.testing.assert_close(compiled, eager, atol=3e-5, rtol=0)
    tol = 5e-6 * g["ddim_full_sharp.final_latent"].abs().max().item()
    torch.testing.assert_close(latent, g["ddim_full_sharp.final_latent"], atol=tol, rtol=0)


@pytest.mark.parametrize("amx", [True, False])
def test_cpu_bf16_only_where_amx_makes_it_fast(monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert pick_device("cpu", "auto") == (torch.device("cpu"), torch.bfloat16 if amx else torch.float32)
    assert pick_device("cpu", "fp32")[1] == torch.float32


@pytest.mark.parametrize("guidance", ["refldm", "multi_reference"])
def test_rows_with_one_input_share_the_layers_before_the_first_attention(model, guidance, monkeypatch):
    """CFG's branches share x and the LQ latent: the UNet's first layers run once for them, and eps is unchanged."""
    from refface_core.model import restorer, unet

    gen = torch.Generator().manual_seed(7)
    c = model.unet_config["out_channels"]
    lq, refs = torch.randn(2, c, 16, 16, generator=gen), torch.randn(1, 3, c, 16, 16, generator=gen)
    x = torch.randn(2, c, 16, 16, generator=gen)
    branches = make_branches(guidance, 3, 1.5, 1.2, 1.2)
    conv_in = []
    hook = model.unet.conv_in.register_forward_hook(lambda m, args, out: conv_in.append(len(out)))
    try:
        shared = model.denoiser(lq, refs, branches)(x, 500)
    finally:
        hook.remove()
    assert conv_in[-1] == 2 * len({branch.use_lq for branch in branches}) < 2 * len(branches)

    def every_row_whole(unet_, sample, t, cache=None, context=None, rows=None):
        if rows is not None:  # the main pass: every row computed whole, as before
            sample, t = sample[rows], t[rows]
        return unet.unet_forward(unet_, sample, t, cache, context)

    monkeypatch.setattr(restorer, "unet_forward", every_row_whole)
    plain = model.denoiser(lq, refs, branches)(x, 500)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
