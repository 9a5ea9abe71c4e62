"""Composite Context: FaRL loading, the context encoder, decoupled cross-attention and its guidance."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import farl_state_dict, tiny_context_config, tiny_restorer

from refface_core import RefFaceError, RefFaceRestorer
from refface_core.context.farl import FaRLEncoder
from refface_core.sampling import make_branches


def openai_clip_image_features(state, images):
    """OpenAI CLIP's VisionTransformer, written out, as the reference for the key map."""
    v = {k.removeprefix("visual."): t for k, t in state.items() if k.startswith("visual.")}
    width = v["conv1.weight"].shape[0]
    x = F.conv2d(images, v["conv1.weight"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([v["class_embedding"].expand(len(x), 1, -1), x], dim=1) + v["positional_embedding"]
    x = F.layer_norm(x, (width,), v["ln_pre.weight"], v["ln_pre.bias"])
    for i in range(len({k.split(".")[2] for k in v if k.startswith("transformer.resblocks.")})):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), v[p + "ln_1.weight"], v[p + "ln_1.bias"]).transpose(0, 1)
        attn, _ = F.multi_head_attention_forward(
            h, h, h, width, width // 64, v[p + "attn.in_proj_weight"], v[p + "attn.in_proj_bias"], None, None,
            False, 0.0, v[p + "attn.out_proj.weight"], v[p + "attn.out_proj.bias"], need_weights=False,
        )  # fmt: skip
        x = x + attn.transpose(0, 1)
        h = F.layer_norm(x, (width,), v[p + "ln_2.weight"], v[p + "ln_2.bias"])
        h = F.linear(h, v[p + "mlp.c_fc.weight"], v[p + "mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), v[p + "mlp.c_proj.weight"], v[p + "mlp.c_proj.bias"])
    return F.layer_norm(x[:, 0], (width,), v["ln_post.weight"], v["ln_post.bias"]) @ v["proj"]


def test_farl_loader_maps_the_public_format(tmp_path):
    state = farl_state_dict()
    torch.save({"state_dict": state}, tmp_path / "FaRL-Base-Patch16.pth")
    from refface_core.context.farl import load_farl

    farl = load_farl(tmp_path / "FaRL-Base-Patch16.pth")
    assert farl.width == 64 and farl.model.config.num_hidden_layers == 2 and farl.model.config.image_size == 224
    images = torch.rand(2, 3, 224, 224)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    ours = farl.model(pixel_values=(images - mean) / std).image_embeds
    expected = openai_clip_image_features(state, (images - mean) / std)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    hidden = farl.hidden_states(images * 2 - 1, [1, 2])
    assert [tuple(h.shape) for h in hidden] == [(2, 197, 64)] * 2

    broken = dict(state)
    del broken["visual.ln_post.bias"]
    broken["visual.transformer.resblocks.0.attn.out_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(RefFaceError) as info:
        FaRLEncoder.from_openai_state_dict(broken)
    assert "missing: vision_model.post_layernorm.bias" in str(info.value)
    assert "shape of vision_model.encoder.layers.0.self_attn.out_proj.weight: (3, 3)" in str(info.value)
    with pytest.raises(RefFaceError, match="not a FaRL"):
        FaRLEncoder.from_openai_state_dict({"weight": torch.zeros(1)})


@pytest.fixture(scope="module")
def farl():
    return FaRLEncoder.from_openai_state_dict(farl_state_dict())


def context_tokens(model, farl, seed=0, refs=3):
    gen = torch.Generator().manual_seed(seed)
    faces = [torch.rand(3, 32, 32, generator=gen) for _ in range(refs)]
    identity = torch.randn(refs, model.context_encoder.identity_dim, generator=gen)
    return model.encode_context(faces, identity, farl)


def randomise_context(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_ctx" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def test_fresh_context_layers_leave_the_converted_backbone_unchanged(golden, golden_model, farl):
    backbone = golden_model("sharp")
    extended = copy.deepcopy(backbone)
    extended.add_composite_context(tiny_context_config())
    g = golden("unet_tiny_sharp")
    refs = g["golden.ref_latents_wide"].unflatten(3, (3, 16)).permute(0, 3, 1, 2, 4)
    context = context_tokens(extended, farl)
    tokens = context.tokens.expand(2, -1, -1, -1)
    args = (g["golden.x_t"], g["golden.t"], g["golden.z_lq"], refs)
    eps = extended.predict_noise(*args, ref_tokens=tokens)
    torch.testing.assert_close(eps, backbone.predict_noise(*args), atol=1e-6, rtol=0)
    torch.testing.assert_close(eps, g["golden.eps_cachekv"], atol=3e-5, rtol=0)
    x_T = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    for guidance in ("refldm", "multi_reference"):
        with_context = extended.sample(g["golden.z_lq"], refs, steps=3, guidance=guidance, x_T=x_T, ref_tokens=tokens)
        without = backbone.sample(g["golden.z_lq"], refs, steps=3, guidance=guidance, x_T=x_T)
        assert (with_context - without).abs().max() <= 1e-6  # in fact bit-identical: the new output starts at 0


@pytest.fixture(scope="module")
def trained(farl):
    model = tiny_restorer(seed=3)
    model.add_composite_context(tiny_context_config())
    randomise_context(model)
    return model


def test_context_changes_eps_with_identity(trained, farl):
    gen = torch.Generator().manual_seed(4)
    x_t, lq = torch.randn(1, 8, 16, 16, generator=gen), torch.randn(1, 8, 16, 16, generator=gen)
    faces = [torch.rand(3, 32, 32, generator=gen) for _ in range(2)]
    a = trained.encode_context(faces, torch.randn(2, 128, generator=gen), farl)
    b = trained.encode_context(faces, torch.randn(2, 128, generator=gen), farl)
    eps_a = trained.predict_noise(x_t, 300, lq, a.latents, a.tokens)
    eps_b = trained.predict_noise(x_t, 300, lq, b.latents, b.tokens)
    assert (eps_a - eps_b).abs().max() > 1e-3
    # context_scale 0 switches the cross-attention off
    off_a = trained.predict_noise(x_t, 300, lq, a.latents, a.tokens, context_scale=0.0)
    torch.testing.assert_close(off_a, trained.predict_noise(x_t, 300, lq, a.latents), atol=1e-6, rtol=0)
    assert (off_a - eps_a).abs().max() > 1e-3


def test_multi_reference_with_context_ignores_order_and_batches(trained, farl):
    context = context_tokens(trained, farl, seed=5)
    lq = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(6))
    x_t = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(7))
    branches = make_branches("multi_reference", 3, 0, 1.2, 1.2)
    a = trained.denoiser(lq, context.latents, branches, context.tokens)(x_t, 500)
    order = [2, 0, 1]
    b = trained.denoiser(lq, context.latents[:, order], branches, context.tokens[:, order])(x_t, 500)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # ∅ drops every part: a zeroed reference with zero tokens is a zeroed reference without tokens
    zero = torch.zeros_like(context.latents[:, :1])
    with_zero_tokens = trained.predict_noise(x_t, 500, lq, zero, torch.zeros_like(context.tokens[:, :1]))
    torch.testing.assert_close(with_zero_tokens, trained.predict_noise(x_t, 500, lq, zero), atol=1e-6, rtol=0)


def test_save_load_round_trip_with_context(trained, farl, tmp_path):
    trained.save_pretrained(tmp_path)
    loaded = RefFaceRestorer.from_pretrained(tmp_path)
    assert loaded.context_config == trained.context_config
    context = context_tokens(trained, farl, seed=8, refs=2)
    lq = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(9))
    x_T = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(10))
    a = trained.sample(lq, context.latents, steps=3, x_T=x_T, ref_tokens=context.tokens)
    b = loaded.sample(lq, context.latents, steps=3, x_T=x_T, ref_tokens=context.tokens)
    assert torch.equal(a, b)
    # a backbone-only model still loads
    tiny_restorer().save_pretrained(tmp_path / "plain")
    assert RefFaceRestorer.from_pretrained(tmp_path / "plain").context_encoder is None


def test_wrong_identity_embedding_is_a_clear_error(farl):
    model = tiny_restorer()
    model.add_composite_context(tiny_context_config("arcface", 512))
    faces = [np.zeros((32, 32, 3), np.uint8)]
    with pytest.raises(RefFaceError, match="128-d, but this model's context expects arcface 512-d"):
        model.encode_context(faces, torch.randn(1, 128), farl)
    with pytest.raises(RefFaceError, match="needs each reference's identity embedding"):
        model.encode_context(faces)
    with pytest.raises(RefFaceError, match="no Composite Context layers"):
        plain = tiny_restorer()
        plain.predict_noise(torch.zeros(1, 8, 16, 16), 10, torch.zeros(1, 8, 16, 16), torch.zeros(1, 1, 8, 16, 16),
                            torch.zeros(1, 1, 5, 32))  # fmt: skip
