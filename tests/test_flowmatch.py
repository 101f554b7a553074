"""The flow-matching schedule and step agree with diffusers' FlowMatchEulerDiscreteScheduler to float32 tolerance."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift

from rapm.flowmatch import FlowSchedule, calculate_shift
from tests import flow_reference as ref

FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_coarse_sigmas_match_set_timesteps_static_shift(shift, n):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(n)
    schedule = FlowSchedule.from_config(scheduler.config)
    sigmas = schedule.coarse_sigmas(n)
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(schedule.model_timestep(sigmas[:-1]), scheduler.timesteps, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("resolution", [256, 1024])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_coarse_sigmas_match_flux_dynamic_shift(resolution, n):
    image_seq_len = (resolution // 16) ** 2  # 8x VAE, then 2x2 packing
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    mu = diffusers_calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    schedule = FlowSchedule.from_config(scheduler.config)
    assert schedule.mu(image_seq_len) == pytest.approx(mu)
    sigmas = ref.flux_coarse_sigmas(schedule, n, image_seq_len)
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(schedule.model_timestep(sigmas[:-1]), scheduler.timesteps, rtol=1e-6, atol=1e-4)


def test_dynamic_shift_differs_by_resolution():
    schedule = FlowSchedule(**FLUX_SCHEDULER)
    low, high = ref.flux_coarse_sigmas(schedule, 4, 256), ref.flux_coarse_sigmas(schedule, 4, 4096)
    assert (high[1:-1] > low[1:-1]).all()  # more tokens, more time at high noise


def test_training_sigmas_match_scheduler_table():
    for config in (dict(shift=3.0), FLUX_SCHEDULER):
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        table = FlowSchedule.from_config(scheduler.config).training_sigmas()
        np.testing.assert_allclose(table, scheduler.sigmas.numpy(), rtol=0, atol=1e-6)


def test_unsupported_scheduler_option_is_refused():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowSchedule.from_config(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True).config)


def _toy_velocity(x, timestep):
    # a smooth nonlinear velocity field that depends on the timestep, as a transformer would
    t = timestep.reshape(-1, 1, 1, 1) / 1000
    return torch.tanh(x) * (1 + t) - 0.3 * x * t + 0.1


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("config", [dict(shift=3.0), dict(shift=1.0), "flux"])
def test_euler_sampling_matches_scheduler_step_loop(n, config):
    x_init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n))
    if config == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(1024))
        ours = FlowSchedule.from_config(scheduler.config)
        sigmas = ref.flux_coarse_sigmas(ours, n, 1024)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        scheduler.set_timesteps(n)
        ours = FlowSchedule.from_config(scheduler.config)
        sigmas = ours.coarse_sigmas(n)
    x = x_init.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(_toy_velocity(x, t.expand(x.shape[0])), t, x, return_dict=False)[0]
    mine = ref.sample_euler(_toy_velocity, x_init.clone(), sigmas, ours)
    torch.testing.assert_close(mine, x, rtol=1e-5, atol=1e-5)


def test_euler_step_is_ddim_in_alpha_sigma_parameterization():
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma_t, sigma_s = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.6, 0.2, 0.0])
    torch.testing.assert_close(ref.euler_step(x_t, v, sigma_t, sigma_s), ref.ddim_step(x_t, v, sigma_t, sigma_s))


def test_conversions_round_trip_and_exact_on_the_line():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    sigma = torch.tensor([0.7, 0.25])
    x_t = ref.add_noise(x0, eps, sigma)
    v = ref.velocity_target(x0, eps)
    torch.testing.assert_close(ref.velocity_to_x0(x_t, v, sigma), x0)
    torch.testing.assert_close(ref.velocity_to_eps(x_t, v, sigma), eps)
    torch.testing.assert_close(ref.x0_to_velocity(x_t, x0, sigma), v)
    torch.testing.assert_close(ref.eps_to_velocity(x_t, eps, sigma), v)
    torch.testing.assert_close(ref.x0_eps_to_velocity(x0, eps), v)
    # with the true velocity one Euler step lands exactly on the line at any σ_s
    sigma_s = torch.tensor([0.1, 0.0])
    torch.testing.assert_close(ref.euler_step(x_t, v, sigma, sigma_s), ref.add_noise(x0, eps, sigma_s))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    torch.testing.assert_close(
        ref.add_noise(x0, eps, scheduler.sigmas[1]), scheduler.scale_noise(x0, scheduler.timesteps[1:2], eps)
    )


@pytest.mark.parametrize("config", [dict(shift=3.0), "flux"])
def test_fine_grid_inside_slots(config):
    schedule = FlowSchedule(**FLUX_SCHEDULER) if config == "flux" else FlowSchedule(**config)
    mu = schedule.mu(1024) if config == "flux" else None
    coarse = ref.flux_coarse_sigmas(schedule, 4, 1024) if config == "flux" else schedule.coarse_sigmas(4)
    grid = schedule.slot_grid(coarse, k=5, mu=mu)
    assert len(grid) == 4 * 5 + 1
    torch.testing.assert_close(grid[::5], coarse)  # the coarse σ are on the fine grid, exactly
    assert (grid[1:] < grid[:-1]).all()
    # uniform before the shift
    unshifted = schedule.remove_shift(grid.double().numpy(), mu)
    for i in range(4):
        np.testing.assert_allclose(np.diff(unshifted[5 * i : 5 * i + 6]), np.diff(unshifted[5 * i : 5 * i + 6])[0], rtol=1e-4)
    # remove_shift inverts apply_shift
    s = np.linspace(0.05, 1.0, 7)
    np.testing.assert_allclose(schedule.apply_shift(schedule.remove_shift(s, mu), mu), s, rtol=1e-10)
    # one fine step is the coarse grid itself
    torch.testing.assert_close(schedule.slot_grid(coarse, k=1, mu=mu), coarse)


@pytest.mark.parametrize("dynamic", [False, True])
def test_pipeline_coarse_sigmas_for_sd3_with_and_without_dynamic_shift(dynamic):
    config = dict(FLUX_SCHEDULER, max_shift=1.16) if dynamic else dict(shift=3.0)
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    seq = (128 // 2) ** 2  # SD3 at 1024 px: 128x128 latent, 2x2 patches
    # StableDiffusion3Pipeline: mu from calculate_shift with the config's values only when use_dynamic_shifting
    scheduler.set_timesteps(4, **({"mu": diffusers_calculate_shift(seq, 256, 4096, 0.5, 1.16)} if dynamic else {}))
    ours = FlowSchedule.from_config(scheduler.config)
    torch.testing.assert_close(ref.pipeline_coarse_sigmas(ours, "sd3", 4, seq), scheduler.sigmas, rtol=0, atol=1e-6)
    assert (ref.slot_mu(ours, seq) is None) == (not dynamic)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_trailing_sigmas_match_set_timesteps_with_sigmas_as_the_sd3_pipeline_passes_them(n):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 1 / n, n)))  # StableDiffusion3Pipeline(..., sigmas=...)
    ours = FlowSchedule.from_config(scheduler.config).trailing_sigmas(n)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-6)
    if n == 4:  # equal slots before the shift: shift 3 puts them at 1, 0.9, 0.75, 0.5, 0
        torch.testing.assert_close(ours, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))


@pytest.mark.parametrize("config", [dict(shift=3.0), "flux"])
def test_teacher_trajectory_is_euler_on_the_slot_grid(config):
    schedule = FlowSchedule(**FLUX_SCHEDULER) if config == "flux" else FlowSchedule(**config)
    mu = ref.slot_mu(schedule, 1024) if config == "flux" else None
    coarse = schedule.trailing_sigmas(4, mu)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    positions, deltas = ref.teacher_trajectory(_toy_velocity, noise, coarse, 3, schedule, mu)
    assert positions.shape == (2, 5, 4, 8, 8) and deltas.shape == (2, 4, 4, 8, 8)
    grid = schedule.slot_grid(coarse, 3, mu)
    torch.testing.assert_close(positions[:, 0], noise)
    for n in range(1, 5):  # each coarse position is Euler along the fine grid up to it
        torch.testing.assert_close(positions[:, n], ref.sample_euler(_toy_velocity, noise, grid[: 3 * n + 1], schedule))
    for n in range(4):  # the delta-step is the first fine step from the stored position
        torch.testing.assert_close(
            deltas[:, n], ref.sample_euler(_toy_velocity, positions[:, n], grid[3 * n : 3 * n + 2], schedule)
        )
    # one fine step per slot: the coarse sampler itself, and the delta-step is the slot's end
    positions_1, deltas_1 = ref.teacher_trajectory(_toy_velocity, noise, coarse, 1, schedule, mu)
    torch.testing.assert_close(positions_1[:, -1], ref.sample_euler(_toy_velocity, noise, coarse, schedule))
    torch.testing.assert_close(deltas_1, positions_1[:, 1:])
