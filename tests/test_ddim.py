"""Deterministic DDIM decode / inversion (ipl_diffusion.ddim): exact round trips, timestep
bookkeeping, parity with diffusers' DDIMScheduler.step and with a re-statement of upstream
DiffAE's reverse loop."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ipl_diffusion.ddim import (
    alpha_at,
    ddim_decode,
    ddim_invert,
    ddim_step,
    ddim_timesteps,
    decode_plan,
    diffae_timesteps,
    inversion_plan,
    predict_eps,
)

DTYPE = torch.float64


def scheduler(**kwargs):
    config = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    config.update(kwargs)
    return DDIMScheduler(**config)


class ConstantEps(torch.nn.Module):
    """A noise model that ignores x: eps = a fixed tensor scaled by a function of t, so a step
    that evaluates the model at the wrong timestep breaks the round trip."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x, t, z_sem=None):
        scale = (1 + t.to(x.dtype) / 1000).reshape(-1, *([1] * (x.ndim - 1)))
        return self.eps.expand_as(x) * scale


class ScaledEps(torch.nn.Module):
    """eps(x, t) = 0.1 x: an eps that depends on x, so a round trip is only approximate."""

    def forward(self, x, t, z_sem=None):
        return 0.1 * x


class Recorder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, t, z_sem=None):
        self.calls.append(int(t[0]))
        return self.inner(x, t, z_sem)


@pytest.fixture
def x0():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=DTYPE)


# --- the round trip is exact only when eps ignores x ----------------------------------------


def test_round_trip_exact_when_eps_ignores_x(x0):
    eps = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    model, sched = ConstantEps(eps), scheduler()
    for steps in (5, 50):
        x_t = ddim_invert(model, x0, None, sched, steps)
        rec = ddim_decode(model, x_t, None, sched, steps)
        assert (rec - x0).abs().max() < 1e-5
        assert not torch.allclose(x_t, x0)
    # upstream's source-timestep variant is not an exact inverse (its levels are shifted)
    x_t = ddim_invert(model, x0, None, sched, 5, variant="diffae", end_timestep=800)
    assert (ddim_decode(model, x_t, None, sched, 5, start_timestep=800) - x0).abs().max() > 1e-3


def test_round_trip_error_falls_with_steps_for_x_dependent_eps(x0):
    sched = scheduler()
    errors = []
    for steps in (5, 10, 50):
        x_t = ddim_invert(ScaledEps(), x0, None, sched, steps)
        errors.append((ddim_decode(ScaledEps(), x_t, None, sched, steps) - x0).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 1e-3  # inversion is not exact: the test would catch an identity "inversion"


def test_constant_eps_inverts_onto_the_forward_process(x0):
    eps = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    x_t = ddim_invert(lambda x, t: eps.expand_as(x), x0, None, scheduler(), 10, end_timestep=400)
    a = alpha_at(scheduler().alphas_cumprod.to(DTYPE), 400)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)


def test_round_trip_to_intermediate_timestep(x0):
    eps = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    model, sched = ConstantEps(eps), scheduler()
    x_t = ddim_invert(model, x0, None, sched, 10, end_timestep=400)
    assert (ddim_decode(model, x_t, None, sched, 10, start_timestep=400) - x0).abs().max() < 1e-5


# --- timestep bookkeeping --------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
def test_inversion_mirrors_decoding(spacing, offset, x0):
    sched = scheduler(timestep_spacing=spacing, steps_offset=offset)
    grid = ddim_timesteps(sched, 50)
    assert len(grid) == 50 and all(0 <= t <= 999 for t in grid)
    dec, inv = decode_plan(grid), inversion_plan(grid, "mirror")
    assert len(dec) == len(inv) == 50
    # every inversion step undoes exactly one decoding step: same model timestep, levels swapped
    for (mt_i, frm_i, to_i), (mt_d, frm_d, to_d) in zip(inv, reversed(dec)):
        assert (mt_i, frm_i, to_i) == (mt_d, to_d, frm_d)
    assert inv[0][1] == -1 and dec[-1][2] == -1

    # the evaluated timesteps are the scheduler's, in range, ascending for inversion
    rec = Recorder(ScaledEps())
    ddim_invert(rec, x0, None, sched, 50)
    assert rec.calls == sorted(grid)
    rec.calls.clear()
    ddim_decode(rec, x0, None, sched, 50)
    assert rec.calls == grid
    assert all(0 <= t <= 999 for t in rec.calls)

    # numerically: a decoding step followed by its mirrored inversion step is the identity
    alphas = sched.alphas_cumprod.to(DTYPE)
    eps = torch.randn_like(x0)
    for mt, frm, to in dec[:3] + dec[-3:]:
        down, _ = ddim_step(eps, x0, frm, to, alphas)
        back, _ = ddim_step(eps, down, to, frm, alphas)
        assert torch.allclose(back, x0, atol=1e-8)


def test_out_of_range_grid_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        ddim_timesteps(scheduler(steps_offset=1), 1000)
    with pytest.raises(ValueError, match="positive integer"):
        ddim_timesteps(scheduler(), 0)
    with pytest.raises(ValueError, match="at most"):
        ddim_timesteps(scheduler(), 20, max_timestep=10)


def test_diffusionclip_grid_and_diffae_spacing():
    assert ddim_timesteps(scheduler(), 5, max_timestep=400) == [400, 300, 200, 100, 0]
    assert diffae_timesteps(20) == ddim_timesteps(scheduler(), 20)  # N divides 1000: same grid
    assert diffae_timesteps(30)[:2] == [986, 952]  # stride 34, not diffusers' 33


# --- parity with diffusers (decoding) and upstream DiffAE (inversion) -------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_decode_matches_diffusers_ddim_scheduler_step(prediction_type, x0):
    # For "v_prediction" diffusers reads the model's output as v (pred_x0 = sqrt(a) x -
    # sqrt(1 - a) v): our eps-form update, after predict_eps's conversion, must land where
    # DDIMScheduler.step does, clipping included.
    sched = scheduler(clip_sample=True, prediction_type=prediction_type)
    model = ScaledEps()
    x_t = x0.float() * 3
    ours = ddim_decode(model, x_t, None, sched, 10)
    sched.set_timesteps(10)
    x = x_t
    for t in sched.timesteps:
        eps = model(x, t.reshape(1))
        x = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    assert torch.allclose(ours, x, atol=1e-5)


def test_v_prediction_is_converted_to_eps_by_hand():
    sched = scheduler(prediction_type="v_prediction")
    x = torch.randn(2, 3, 4, 4)
    v = torch.randn(2, 3, 4, 4)
    model = lambda x_, t_, z_=None: v  # noqa: E731
    a = sched.alphas_cumprod[600]
    expected = a.sqrt() * v + (1 - a).sqrt() * x
    torch.testing.assert_close(predict_eps(model, x, 600, None, sched), expected)
    # without a scheduler (or with an eps scheduler) the output is eps as it is
    assert torch.equal(predict_eps(model, x, 600, None), v)
    assert torch.equal(predict_eps(model, x, 600, None, scheduler()), v)


def test_v_prediction_inversion_undoes_decoding_to_first_order(x0):
    # As for eps models: the round-trip error falls with the step size.
    sched = scheduler(clip_sample=True, prediction_type="v_prediction")
    model = ScaledEps()
    x0 = x0.clamp(-0.9, 0.9)  # inside the clipping range
    errors = [
        (ddim_decode(model, ddim_invert(model, x0, None, sched, n), None, sched, n) - x0).abs().max().item()
        for n in (10, 50, 200)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 5e-3, errors


def test_unsupported_prediction_type_is_refused_before_any_step(x0):
    model = Recorder(ScaledEps())
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_decode(model, x0, None, scheduler(prediction_type="sample"), 5)
    assert model.calls == []


def _upstream_reverse_loop(model, x, alphas_spaced, clip):
    """Re-statement of upstream DiffAE's ddim_reverse_sample_loop on a spaced schedule."""
    next_alphas = list(alphas_spaced[1:]) + [0.0]
    for i, (a, a_next) in enumerate(zip(alphas_spaced, next_alphas)):
        eps = model(x, None)
        x0_hat = (x / np.sqrt(a) - np.sqrt(1 / a - 1) * eps)
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
        eps = (x / np.sqrt(a) - x0_hat) / np.sqrt(1 / a - 1)
        x = x0_hat * np.sqrt(a_next) + np.sqrt(1 - a_next) * eps
    return x


@pytest.mark.parametrize("clip", [False, True])
def test_diffae_variant_matches_upstream_reverse_loop(clip, x0):
    sched = scheduler(clip_sample=clip)
    grid = ddim_timesteps(sched, 10)
    alphas = sched.alphas_cumprod.to(DTYPE)
    spaced = [alphas[t].item() for t in sorted(grid)]
    expected = _upstream_reverse_loop(ScaledEps(), x0, spaced, clip)
    ours = ddim_invert(ScaledEps(), x0, None, sched, 10, variant="diffae")
    assert torch.allclose(ours, expected, atol=1e-6)
    # the last step lands on alpha_bar = 0: x_T is the re-derived eps
    assert inversion_plan(grid, "diffae", to_pure_noise=True)[-1][2] == 1000


def test_functions_keep_gradients(x0):
    x = x0.clone().requires_grad_(True)
    out = ddim_decode(ScaledEps(), x, None, scheduler(), 3)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_image_size_not_divisible_fails_before_forward():
    from ipl_diffusion.models import DiffAEUNetModel

    unet = DiffAEUNetModel(
        sample_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(), embed_channels=16, z_sem_channels=8,
    )
    calls = []
    unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="divisible by 2"):
        ddim_invert(unet, torch.zeros(1, 3, 7, 8), torch.zeros(1, 8), scheduler(), 2)
    assert calls == []


def test_step_in_bfloat16_is_computed_in_float32():
    alphas = scheduler().alphas_cumprod
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    exact, _ = ddim_step(eps, x, 0, -1, alphas)  # alpha_bar(0) = 0.9999: bfloat16 would round it to 1
    half, _ = ddim_step(eps.bfloat16(), x.bfloat16(), 0, -1, alphas)
    assert half.dtype == torch.bfloat16
    assert (half.float() - exact).abs().max() < 0.02
    assert (exact - x).abs().max() > 0.005  # the step is not the identity


def test_gradients_reach_the_unet_and_z_sem_through_a_chain():
    from diffae_tiny import SIZE, Z, diffae_scheduler, tiny_unet

    unet = tiny_unet()
    z_sem = torch.randn(1, Z, requires_grad=True)
    x_t = torch.randn(1, 3, SIZE, SIZE)
    out = ddim_decode(unet, x_t, z_sem, diffae_scheduler(clip_sample=False), 3, start_timestep=400)
    out.square().mean().backward()
    assert z_sem.grad is not None and z_sem.grad.abs().sum() > 0
    assert all(p.grad is not None for p in unet.parameters())


def test_mirror_variant_matches_diffusers_ddim_inverse_scheduler_without_clipping(x0):
    from diffusers import DDIMInverseScheduler

    sched = scheduler(clip_sample=False)
    model = ScaledEps()
    ours = ddim_invert(model, x0.float(), None, sched, 10)
    inverse = DDIMInverseScheduler.from_config(sched.config)
    inverse.set_timesteps(10)
    x = x0.float()
    for t in inverse.timesteps:
        x = inverse.step(model(x, t.reshape(1)), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5)
