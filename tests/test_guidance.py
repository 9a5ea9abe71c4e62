"""Guidance: ReF-LDM CFG and the paper's multi-reference guidance, as batched branches."""

import pytest
import torch
from support import tiny_restorer

from refface_core import RefFaceError
from refface_core.sampling import Branch, make_branches


@pytest.fixture(scope="module")
def setup():
    model = tiny_restorer(seed=1)
    gen = torch.Generator().manual_seed(3)
    x_t, lq = torch.randn(2, 8, 16, 16, generator=gen), torch.randn(2, 8, 16, 16, generator=gen)
    refs = torch.randn(2, 3, 8, 16, 16, generator=gen)
    return model, x_t, torch.tensor([400, 900]), lq, refs


def unet_batch_sizes(model):
    sizes = []
    handle = model.unet.conv_in.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    return sizes, handle


def test_branch_layouts():
    assert make_branches("refldm", 3, 1.5, 1, 1) == [Branch(-0.5, True, None), Branch(1.5, True, (0, 1, 2))]
    assert make_branches("refldm", 2, 1.0, 1, 1) == [Branch(1.0, True, (0, 1))]  # scale 1: no uncond pass
    assert make_branches("refldm", 2, 1.5, 1, 1, slots=5)[1].refs == (0, 1, 0, 1, 0)
    same = make_branches("multi_reference", 3, 0, 1.2, 1.2)
    assert len(same) == 4  # N + 1 branches when s_i == s_c
    assert same[0] == Branch(pytest.approx(-0.2), False, None)
    assert [b.refs for b in same[1:]] == [(0,), (1,), (2,)]
    assert len(make_branches("multi_reference", 3, 0, 1.5, 1.2)) == 5
    assert make_branches("multi_reference", 2, 0, 1.2, 1.2, slots=3)[1].refs == (0, 0, 0)
    with pytest.raises(RefFaceError, match="guidance must be one of"):
        make_branches("cfg", 2, 1.5, 1, 1)


def test_multi_reference_equals_the_papers_formula(setup):
    model, x_t, t, lq, refs = setup
    s_i, s_c, n = 1.6, 1.2, refs.shape[1]
    zero_ref = torch.zeros_like(refs[:, :1])
    e_uncond = model.predict_noise(x_t, t, torch.zeros_like(lq), zero_ref)
    e_lq = model.predict_noise(x_t, t, lq, zero_ref)
    e_refs = [model.predict_noise(x_t, t, lq, refs[:, i : i + 1]) for i in range(n)]
    expected = (1 - s_i) * e_uncond + (s_i - s_c) * e_lq + (s_c / n) * sum(e_refs)

    sizes, handle = unet_batch_sizes(model)
    outputs = []
    last = model.unet.conv_out.register_forward_hook(lambda m, inp, out: outputs.append(len(out)))
    guided = model.denoiser(lq, refs, make_branches("multi_reference", n, 0, s_i, s_c))(x_t, t)
    handle.remove(), last.remove()
    assert not guided.requires_grad  # no autograd graph kept across sampling steps
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)
    # one reference pass over the B·N references (∅'s keys and values are the model's, made by the calls above),
    # then one main pass with (N + 2)·B rows, whose first layers run once per distinct input (∅ or LQ)·B
    assert sizes == [2 * n, 2 * 2] and outputs == [(n + 2) * 2]
    # references change the result, so the check above is not vacuous
    assert (e_refs[0] - e_lq).abs().max() > 1e-2


def test_multi_reference_ignores_reference_order(setup):
    model, x_t, t, lq, refs = setup
    branches = make_branches("multi_reference", 3, 0, 1.2, 1.2)
    a = model.denoiser(lq, refs, branches)(x_t, t)
    b = model.denoiser(lq, refs[:, [2, 0, 1]], branches)(x_t, t)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_refldm_cfg_and_slots(setup):
    model, x_t, t, lq, refs = setup
    e_u, e_c = model.predict_noise(x_t, t, lq, refs * 0), model.predict_noise(x_t, t, lq, refs)
    guided = model.denoiser(lq, refs, make_branches("refldm", 3, 2.0, 1, 1))(x_t, t)
    torch.testing.assert_close(guided, e_u + 2.0 * (e_c - e_u), atol=1e-5, rtol=1e-5)
    # repeating references to 6 slots equals passing each one twice
    slots6 = model.denoiser(lq, refs, make_branches("refldm", 3, 1.0, 1, 1, slots=6))(x_t, t)
    twice = model.predict_noise(x_t, t, lq, refs[:, [0, 1, 2, 0, 1, 2]])
    torch.testing.assert_close(slots6, twice, atol=1e-5, rtol=0)
