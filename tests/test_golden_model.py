"""The port against vectors from the original ReF-LDM code (../shared/golden/refldm/README.md)."""

import pytest
import torch

from refface_core.model import KVRecorder
from refface_core.model.unet import unet_forward
from refface_core.sampling import make_branches

# float32 tolerances from the golden README: far below the reference effect (1.8e-5 tiny, 0.66 sharp)
EPS_ATOL = {"tiny": 5e-7, "sharp": 3e-5}


# our attention layers (forward order) and the original's module names
ATTENTION_NAMES = {
    "down_blocks.1.attentions.0": "input_blocks.3.1",
    "down_blocks.2.attentions.0": "input_blocks.5.1",
    "mid_block.attentions.0": "middle_block.1",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.1.attentions.0": "output_blocks.2.1",
    "up_blocks.1.attentions.1": "output_blocks.3.1",
}


def unet_inputs(golden, init):
    g = golden("unet_tiny" if init == "tiny" else "unet_tiny_sharp")
    refs = g["golden.ref_latents_wide"].unflatten(3, (3, 16)).permute(0, 3, 1, 2, 4)  # [B, N, C, h, w]
    return g, g["golden.x_t"], g["golden.t"], g["golden.z_lq"], refs


@pytest.mark.parametrize("init", ["tiny", "sharp"])
def test_eps_matches_refldm(golden, golden_model, init):
    model = golden_model(init)
    g, x_t, t, z_lq, refs = unet_inputs(golden, init)
    cases = {
        "eps_noref": model.predict_noise(x_t, t, z_lq),
        "eps_cachekv": model.predict_noise(x_t, t, z_lq, refs),
        "eps_cachekv_zero_refs": model.predict_noise(x_t, t, z_lq, refs * 0),
        "eps_cachekv_1ref": model.predict_noise(x_t, t, z_lq, refs[:, :1]),
        "eps_cfg": model.denoiser(z_lq, refs, make_branches("refldm", 3, 1.5, 1, 1))(x_t, t),
    }
    for key, eps in cases.items():
        torch.testing.assert_close(eps, g[f"golden.{key}"], atol=EPS_ATOL[init], rtol=0, msg=key)
    # the references must visibly matter, so the checks above can catch CacheKV bugs
    if init == "sharp":
        assert (cases["eps_cachekv"] - cases["eps_noref"]).abs().max() > 0.1


def test_main_pass_input_is_x_then_lq(golden):
    g = golden("unet_tiny")
    torch.testing.assert_close(g["golden.unet_input_concat"], torch.cat([g["golden.x_t"], g["golden.z_lq"]], 1))


@pytest.mark.parametrize("init", ["tiny", "sharp"])
def test_reference_pass_records_refldm_kv(golden, golden_model, init):
    model = golden_model(init)
    g, _, _, _, refs = unet_inputs(golden, init)
    cache = golden(f"{'unet_tiny' if init == 'tiny' else 'unet_tiny_sharp'}_kvcache")
    inputs = g["golden.ref_pass_inputs"]  # [N, B, 16, h, w]: ref latent then 8 zero channels
    torch.testing.assert_close(inputs[:, :, :8], refs.transpose(0, 1))
    assert inputs[:, :, 8:].abs().max() == 0

    recorder = KVRecorder()
    with torch.no_grad():
        unet_forward(model.unet, inputs.flatten(0, 1), torch.zeros(6, dtype=torch.long), recorder)
    assert list(recorder.layers) == list(ATTENTION_NAMES)
    for name, (k, v) in recorder.layers.items():
        for ours, key in ((k, "k"), (v, "v")):
            # ours: [N·B, heads, tokens, d]; golden: [N, B·heads, d, tokens]
            expected = cache[f"cache.{ATTENTION_NAMES[name]}.{key}"]
            n, bh, d, tokens = expected.shape
            torch.testing.assert_close(
                ours.reshape(n, bh, tokens, d).transpose(2, 3), expected, atol=EPS_ATOL[init], rtol=0
            )


def test_vq_encode_decode_quantize(golden, golden_model):
    model, g = golden_model("tiny"), golden("vq_tiny")
    torch.testing.assert_close(model.encode(g["golden.image"]), g["golden.encode"], atol=2e-5, rtol=0)
    torch.testing.assert_close(model.decode(g["golden.encode"]), g["golden.decode"], atol=2e-5, rtol=0)
    quant, _, (_, _, indices) = model.vq.quantize(g["golden.encode"])
    assert torch.equal(indices.view(2, 16, 16), g["golden.quant_indices"])
    torch.testing.assert_close(quant, g["golden.quant"], atol=1e-6, rtol=0)
    no_quant = model.vq.decode(g["golden.encode"], force_not_quantize=True).sample
    torch.testing.assert_close(no_quant, g["golden.decode_no_quant"], atol=2e-5, rtol=0)


def test_reference_layouts(golden, golden_model):
    model, g = golden_model("tiny"), golden("vq_tiny")
    refs = g["golden.ref_images"]  # [B, N, 3, H, W]
    torch.testing.assert_close(refs.permute(0, 2, 3, 1, 4).flatten(3), g["golden.ref_image_wide"])
    for layout, key in (("strip", "encode_ref_wide"), ("separate", "encode_ref_separate")):
        latents = model.encode_references(refs, layout)  # [B, N, C, h, w]
        assert latents.shape == (2, 3, 8, 16, 16)
        torch.testing.assert_close(latents.permute(0, 2, 3, 1, 4).flatten(3), g[f"golden.{key}"], atol=2e-5, rtol=0)
    assert model.encode_references(refs).shape == (2, 3, 8, 16, 16)  # "strip" is the default
