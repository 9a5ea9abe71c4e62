"""Schedule, DDIM and full pipeline against the original ReF-LDM code."""

import pytest
import torch

from refface_core import RefFaceError
from refface_core.sampling import DDIM, ddim_timesteps, refldm_alphas_cumprod, refldm_betas


def test_schedule(golden):
    g = golden("schedule")
    torch.testing.assert_close(refldm_betas(), g["schedule.betas_f64"], atol=0, rtol=0)
    ac = refldm_alphas_cumprod()
    assert torch.equal(ac, g["schedule.alphas_cumprod"])
    assert ac[0].item() == pytest.approx(0.9985) and ac[-1].item() == pytest.approx(6.6867e-4, rel=1e-4)


@pytest.mark.parametrize("spacing", ["uniform", "uniform_trailing"])
@pytest.mark.parametrize("steps", [25, 50, 100])
def test_ddim_tables(golden, spacing, steps):
    g, key = golden("schedule"), f"ddim.{spacing}.{steps}"
    assert torch.equal(ddim_timesteps(steps, spacing), g[f"{key}.timesteps"])
    ddim = DDIM(steps, spacing)
    assert torch.equal(ddim.alphas, g[f"{key}.alphas"])
    assert torch.equal(ddim.alphas_prev, g[f"{key}.alphas_prev"])
    assert torch.equal(ddim.alphas_prev.double(), g[f"{key}.alphas_prev_f64"])  # last step: alpha-bar[0], not 1
    assert torch.equal(ddim.sqrt_one_minus_alphas, g[f"{key}.sqrt_one_minus_alphas"])
    assert torch.equal(ddim.sigmas, g[f"{key}.sigmas_eta0"])
    if steps == 50:
        torch.testing.assert_close(DDIM(steps, spacing, eta=1.0).sigmas, g[f"{key}.sigmas_eta1"], atol=1e-7, rtol=0)


@pytest.mark.parametrize("steps", [1, 3, 7, 30, 999])
def test_timesteps_for_any_step_count(steps):
    for spacing in ("uniform", "uniform_trailing"):
        t = ddim_timesteps(steps, spacing)
        assert len(t) == steps and t.min() >= 0 and t.max() <= 999 and (t.diff() > 0).all()
    assert ddim_timesteps(steps, "uniform_trailing")[-1] == 999
    assert len(ddim_timesteps(1000, "uniform_trailing")) == 1000
    with pytest.raises(RefFaceError, match="at most 999"):
        ddim_timesteps(1000, "uniform")


@pytest.mark.parametrize("case", range(5))
def test_single_ddim_steps(golden, case):
    g, key = golden("schedule"), f"ddim_step.{case}"
    steps, index = g[f"{key}.num_steps"].item(), g[f"{key}.index"].item()
    spacing = "uniform" if g[f"{key}.t"][0] in (201, 1) else "uniform_trailing"
    ddim = DDIM(steps, spacing)
    i = len(ddim.timesteps) - 1 - index  # sampling order
    assert ddim.timesteps[i] == g[f"{key}.t"][0]
    x_prev, pred_x0 = ddim.step(g[f"{key}.x"], g[f"{key}.eps"], i)
    torch.testing.assert_close(x_prev, g[f"{key}.x_prev"], atol=1e-6, rtol=0)
    expected = g[f"{key}.pred_x0"]
    torch.testing.assert_close(pred_x0, expected, atol=1e-6 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("init", ["tiny", "sharp"])
def test_full_ddim_with_cachekv_and_cfg(golden, golden_model, init):
    model = golden_model(init)
    g = golden("schedule")
    p = "ddim_full" if init == "tiny" else "ddim_full_sharp"
    refs = g[f"{p}.ref_latents_wide"].unflatten(3, (3, 16)).permute(0, 3, 1, 2, 4)
    steps_seen = []

    def record(step, total, x, pred_x0):
        steps_seen.append((step, total, x, pred_x0))

    out = model.sample(
        g[f"{p}.z_lq"], refs, steps=5, spacing="uniform_trailing", scale=1.5, x_T=g[f"{p}.x_T"], callback=record
    )
    tol = 5e-6 * g[f"{p}.final_latent"].abs().max().item()
    torch.testing.assert_close(out, g[f"{p}.final_latent"], atol=tol, rtol=0)
    assert [s[:2] for s in steps_seen] == [(i, 5) for i in range(1, 6)]
    for i, (_, _, x, pred_x0) in enumerate(steps_seen):
        torch.testing.assert_close(x, g[f"{p}.x_after_each_step"][i], atol=tol, rtol=0)
        torch.testing.assert_close(pred_x0, g[f"{p}.pred_x0_each_step"][i], atol=tol, rtol=0)

    cfg1 = model.sample(g[f"{p}.z_lq"], refs, steps=5, scale=1.0, x_T=g[f"{p}.x_T"])
    torch.testing.assert_close(cfg1, g[f"{p}.final_latent_cfg1"], atol=tol, rtol=0)


@pytest.mark.parametrize("init", ["tiny", "sharp"])
def test_pixel_pipeline(golden, golden_model, init):
    model, g = golden_model(init), golden("pipeline_tiny")
    p = "pipe" if init == "tiny" else "pipe_sharp"
    lq_latent = model.encode(g[f"{p}.lq_image"])
    torch.testing.assert_close(lq_latent, g[f"{p}.lq_latent"], atol=2e-5, rtol=0)
    refs = g[f"{p}.ref_image_wide"].unflatten(3, (3, 32)).permute(0, 3, 1, 2, 4)  # [B, N, 3, H, W]
    ref_latents = model.encode_references(refs)
    torch.testing.assert_close(
        ref_latents.permute(0, 2, 3, 1, 4).flatten(3), g[f"{p}.ref_latent_wide"], atol=2e-5, rtol=0
    )
    final = model.sample(lq_latent, ref_latents, steps=5, spacing="uniform_trailing", scale=1.5, x_T=g[f"{p}.x_T"])
    tol = 5e-6 * g[f"{p}.final_latent"].abs().max().item()
    torch.testing.assert_close(final, g[f"{p}.final_latent"], atol=tol, rtol=0)
    decoded = model.decode(g[f"{p}.final_latent"])
    torch.testing.assert_close(decoded, g[f"{p}.decoded"], atol=2e-5, rtol=0)
    torch.testing.assert_close(((decoded + 1) / 2).clamp(0, 1), g[f"{p}.output_01"], atol=2e-5, rtol=0)
