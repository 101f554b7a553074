"""rapm.diffusion agrees with diffusers' own DDIMScheduler."""

import pytest
import torch
from diffusers import DDIMScheduler

from rapm.diffusion import (renoise, FINAL, ScheduleError, alpha_sigma, coarse_timesteps, ddim, ddim_step,
                            sample_positions, schedule_from_config, slot_grid)
from rapm.demo.clip import SD_SCHEDULER


def test_trailing_coarse_timesteps_match_the_paper():
    assert coarse_timesteps(1000, 4) == [999, 749, 499, 249, FINAL]
    assert coarse_timesteps(1000, 1) == [999, FINAL]
    # The fine grid of M=25 steps per slot has the coarse positions as its phase edges.
    fine = coarse_timesteps(1000, 100)
    assert fine[::25] == [999, 749, 499, 249, FINAL]
    assert slot_grid(249, FINAL, 25) == fine[75:]


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_timesteps_equal_diffusers_trailing(steps):
    sched = DDIMScheduler(**SD_SCHEDULER, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    assert coarse_timesteps(1000, steps)[:-1] == sched.timesteps.tolist()


def test_final_position_alpha_is_the_schedulers():
    s = schedule_from_config(SD_SCHEDULER)
    sched = DDIMScheduler(**SD_SCHEDULER)
    a, _ = alpha_sigma(s, FINAL, torch.zeros(1))
    assert a.item() ** 2 == pytest.approx(float(sched.final_alpha_cumprod), rel=1e-6)
    s1 = schedule_from_config({**SD_SCHEDULER, "set_alpha_to_one": True})
    assert alpha_sigma(s1, FINAL, torch.zeros(1))[0].item() == 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_ddim_sampling_equals_diffusers(prediction_type, steps, beta_schedule):
    config = {**SD_SCHEDULER, "prediction_type": prediction_type, "beta_schedule": beta_schedule}
    sched = DDIMScheduler(**config, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    schedule = schedule_from_config(config)
    # A fixed random "model": a smooth function of z and t, so errors would compound over steps.
    g = torch.Generator().manual_seed(steps)
    w = torch.randn(4, 4, generator=g) * 0.3

    def model(z, t):
        return torch.einsum("bchw,cd->bdhw", z, w) + torch.tanh(z) * (t.float().view(-1, 1, 1, 1) / 1000)

    z0 = torch.randn(3, 4, 8, 8, generator=g)
    ref = z0.clone()
    for t in sched.timesteps:
        ref = sched.step(model(ref, t.expand(3)), t, ref).prev_sample
    ours = sample_positions(model, schedule, z0, coarse_timesteps(1000, steps))
    assert len(ours) == steps + 1
    torch.testing.assert_close(ours[-1], ref, rtol=1e-4, atol=1e-5)


def test_k_step_ddim_inside_a_slot_equals_a_fine_diffusers_grid():
    sched = DDIMScheduler(**SD_SCHEDULER, timestep_spacing="trailing")
    sched.set_timesteps(100)
    schedule = schedule_from_config(SD_SCHEDULER)
    model = lambda z, t: torch.sin(z) * 0.5  # noqa: E731
    z = torch.randn(2, 4, 4, 4)
    ref = z.clone()
    for t in sched.timesteps[:25]:  # the first slot, 999 -> 749
        ref = sched.step(model(ref, t), t, ref).prev_sample
    torch.testing.assert_close(ddim(model, schedule, z, 999, 749, 25), ref, rtol=1e-4, atol=1e-5)


def test_batched_per_sample_timesteps_equal_one_at_a_time():
    schedule = schedule_from_config(SD_SCHEDULER)
    z, out = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t, s = torch.tensor([999, 749, 249]), torch.tensor([749, 499, FINAL])
    batched = ddim_step(schedule, z, out, t, s)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], ddim_step(schedule, z[i : i + 1], out[i : i + 1], int(t[i]), int(s[i])))


def test_renoise_matches_the_forward_process_marginal():
    schedule = schedule_from_config(SD_SCHEDULER)
    x0 = torch.randn(20000, 1, 1, 1)
    z = renoise(schedule, x0, 499, 999, torch.randn_like(x0))  # x0 is a sample at t=499 here
    a_f, s_f = alpha_sigma(schedule, 499, x0)
    a_t, s_t = alpha_sigma(schedule, 999, x0)
    # Var(z) = (abar_999/abar_499) * Var(x) + 1 - abar_999/abar_499
    ratio = (a_t / a_f).item() ** 2
    assert z.var().item() == pytest.approx(ratio + 1 - ratio, rel=0.05)
    assert torch.corrcoef(torch.stack([z.flatten(), x0.flatten()]))[0, 1].item() == pytest.approx(ratio**0.5 / 1.0, abs=0.03)


@pytest.mark.parametrize("field,value", [("prediction_type", "sample"), ("beta_schedule", "exp")])
def test_unsupported_scheduler_is_a_clear_error(field, value):
    with pytest.raises(ScheduleError, match=field):
        schedule_from_config({**SD_SCHEDULER, field: value}, source="teacher/scheduler/scheduler_config.json")


# --- the trajectory solvers --------------------------------------------------------------------------------------------

def _gaussian_data(schedule, variance: float, prediction_type: str):
    """The exact model of data x0 ~ N(0, v I), and the exact probability-flow ODE solution it defines."""
    def abar(t):
        return schedule.table[t.long() + 1].view(-1, 1, 1, 1).float()

    def model(z, t):
        a2 = abar(t)
        eps = (1 - a2).sqrt() * z / (a2 * variance + 1 - a2)
        if prediction_type == "epsilon":
            return eps
        x0 = a2.sqrt() * variance * z / (a2 * variance + 1 - a2)
        return a2.sqrt() * eps - (1 - a2).sqrt() * x0

    def exact(z, t, s):
        a_t, a_s = float(schedule.table[t + 1]), float(schedule.table[s + 1])
        return z * ((a_s * variance + 1 - a_s) / (a_t * variance + 1 - a_t)) ** 0.5

    return model, exact


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmsolver_is_second_order_and_ddim_first_at_the_coarse_positions(prediction_type):
    from rapm.diffusion import solve_positions

    schedule = schedule_from_config({**SD_SCHEDULER, "prediction_type": prediction_type})
    model, exact = _gaussian_data(schedule, 0.1, prediction_type)
    timesteps = coarse_timesteps(1000, 4)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    truth = [z] + [exact(z, timesteps[0], s) for s in timesteps[1:]]

    def error(solver, m, final=False):
        positions, _ = solve_positions(model, schedule, z, timesteps, m, solver)
        pairs = list(zip(positions[1:], truth[1:]))
        return max(float((p - q).abs().max()) for p, q in (pairs if final else pairs[:-1]))

    ddim_ratio = error("ddim", 4) / error("ddim", 8)
    dpm_ratio = error("dpmsolver++", 4) / error("dpmsolver++", 8)
    assert 1.6 < ddim_ratio < 2.6  # halving the step halves DDIM's error ...
    assert dpm_ratio > 3.2  # ... and quarters DPM-Solver++(2M)'s
    # The final position too (where the trailing grid's last step is long in log-SNR): 8 steps a slot beat DDIM's 25.
    assert error("dpmsolver++", 8, final=True) < error("ddim", 25, final=True) / 2


def test_ddim_solve_positions_is_sample_positions_and_the_delta_step_its_first_substep():
    from rapm.diffusion import solve_positions

    schedule = schedule_from_config(SD_SCHEDULER)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 0.3
    calls = []

    def model(z, t):
        calls.append(int(t[0]))
        return torch.einsum("bchw,cd->bdhw", z, w) + torch.tanh(z) * (t.float().view(-1, 1, 1, 1) / 1000)

    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    timesteps = coarse_timesteps(1000, 4)
    positions, delta_positions = solve_positions(model, schedule, z, timesteps, 5, "ddim", delta=50)
    assert len(calls) == 20  # the Δ-steps cost no model call
    plain = sample_positions(model, schedule, z, timesteps, 5)
    assert all(torch.equal(a, b) for a, b in zip(positions, plain))
    for j, t in enumerate(timesteps[:-1]):
        assert torch.equal(delta_positions[j], ddim(model, schedule, positions[j], t, t - 50, 1))


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_logsnr_grid_runs_from_the_slot_start_to_its_end_without_repeats(set_alpha_to_one):
    from rapm.diffusion import logsnr_grid, solve_positions

    schedule = schedule_from_config({**SD_SCHEDULER, "set_alpha_to_one": set_alpha_to_one})
    for t, s, k in ((999, 749, 4), (249, FINAL, 8), (249, FINAL, 25), (499, 249, 25)):
        grid = logsnr_grid(schedule, t, s, k)
        assert grid[0] == t and grid[-1] == s and all(a > b for a, b in zip(grid, grid[1:]))
        assert k - 3 <= len(grid) - 1 <= k  # near t = 0 a few nearest integer timesteps coincide and are dropped
    model, _ = _gaussian_data(schedule, 0.1, "epsilon")
    positions, _ = solve_positions(model, schedule, torch.randn(1, 4, 8, 8), coarse_timesteps(1000, 4), 8, "dpmsolver++")
    assert all(torch.isfinite(p).all() for p in positions)


def test_add_noise_is_diffusers_add_noise():
    from diffusers import DDIMScheduler

    from rapm.diffusion import add_noise

    schedule = schedule_from_config(SD_SCHEDULER)
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 499, 999])
    expected = DDIMScheduler(**SD_SCHEDULER).add_noise(x0.double(), noise.double(), t).float()
    assert torch.allclose(add_noise(schedule, x0, t, noise), expected, atol=1e-6)
