"""The diffusion math, as small pure functions over tensors.

Positions are named by integer timesteps of the teacher's training schedule
(0 .. T-1). The *final position* (where a DDIM sampler ends, after the last
step) is timestep ``-1``; its alpha-bar is the scheduler's ``final_alpha_cumprod``
(``alphas_cumprod[0]`` for SD's ``set_alpha_to_one=False``, 1.0 otherwise).
That one convention lets coarse slots, fine DDIM grids and the final step share
the same code, batched over per-sample timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rapm.errors import RapmError
from rapm.flowmatch import FlowSchedule

FINAL = -1  # timestep index of the final position

SUPPORTED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")
FLOW = "flow"  # Schedule.kind (and prediction_type) of a flow-matching teacher (SD3, FLUX): x_t = (1 - σ) x0 + σ eps
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


class ScheduleError(RapmError):
    """A scheduler config this project cannot reproduce exactly."""


@dataclass(frozen=True)
class Schedule:
    """alpha-bar over the teacher's timesteps, with the final position prepended; or a flow-matching schedule.

    ``kind`` "ddpm" (SD, SDXL): positions are integer timesteps, alpha and sigma come from alpha-bar (above).
    ``kind`` "flow" (SD3, FLUX; prediction_type "flow"): positions are float timesteps t = σ · 1000 (the scheduler's
    and the transformer's own unit), alpha = 1 - σ and sigma = σ, the final position is t = 0, and the model output is
    a velocity v = eps - x0. The DDIM step in this (alpha, sigma) form is the Euler step (docs/flow-matching.md), so
    every step, renoising and method is written once for both kinds. ``flow`` holds the σ placement (shift, dynamic
    shift) and ``mu`` the dynamic shift of the teacher's resolution (None without dynamic shifting).
    """

    alphas_cumprod: torch.Tensor  # [T] float64 (empty for a flow schedule)
    final_alpha_cumprod: float
    prediction_type: str
    num_train_timesteps: int
    kind: str = "ddpm"
    flow: object = None  # rapm.flowmatch.FlowSchedule (kind "flow")
    mu: float | None = None

    @property
    def is_flow(self) -> bool:
        return self.kind == FLOW

    @property
    def timestep_dtype(self) -> torch.dtype:
        return torch.float32 if self.is_flow else torch.long

    def coarse(self, steps: int) -> list:
        """The N+1 positions of an N-step student: ``coarse_timesteps`` (DDPM), or σ · 1000 of the trailing σ (flow:
        ``FlowSchedule.trailing_sigmas``, FluxPipeline's placement and SD3's with ``sigmas=``), ending at 0."""
        if not self.is_flow:
            return coarse_timesteps(self.num_train_timesteps, steps)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        sigmas = self.flow.trailing_sigmas(steps, self.mu)
        return [float(x) for x in (sigmas * self.num_train_timesteps).tolist()]

    def grid(self, t, s, k: int) -> list:
        """k+1 positions from t down to s for k teacher steps inside a slot: ``slot_grid`` (DDPM), or uniform in the
        unshifted σ (flow: ``FlowSchedule.fine_sigmas``, how the pipelines and PCM's SD3 solver space their steps)."""
        if not self.is_flow:
            return slot_grid(t, s, k)
        n = self.num_train_timesteps
        fine = self.flow.fine_sigmas(float(t) / n, float(s) / n, k, self.mu).double() * n
        out = [float(x) for x in fine.tolist()]
        out[0], out[-1] = float(t), float(s)
        return out

    @property
    def table(self) -> torch.Tensor:
        """alpha-bar indexed by ``t + 1`` (index 0 is the final position)."""
        return torch.cat([self.alphas_cumprod.new_tensor([self.final_alpha_cumprod]), self.alphas_cumprod])


def _betas(config: dict) -> torch.Tensor:
    t = int(config.get("num_train_timesteps", 1000))
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    if kind == "linear":
        return torch.linspace(start, end, t, dtype=torch.float32).double()
    if kind == "scaled_linear":
        return (torch.linspace(start**0.5, end**0.5, t, dtype=torch.float32) ** 2).double()
    if kind == "squaredcos_cap_v2":
        def abar(x: float) -> float:
            return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / t) / abar(i / t), 0.999) for i in range(t)], dtype=torch.float32).double()
    raise ScheduleError(
        f"scheduler config: beta_schedule {kind!r} is not supported; use one of {', '.join(SUPPORTED_BETA_SCHEDULES)}"
    )


def schedule_from_config(config: dict, source: str = "scheduler config") -> Schedule:
    """Build the schedule a diffusers DDIM/DDPM/PNDM/Euler scheduler config describes.

    alpha-bar is computed as diffusers does (float32 betas, cumulative product in
    float32), then kept in float64 for the step arithmetic.
    """
    if config.get("_class_name") in FLOW_SCHEDULERS:
        return flow_schedule_from_config(config, source)
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ScheduleError(
            f"{source}: prediction_type {prediction_type!r} is not supported; "
            f"rapm distills teachers that predict {' or '.join(SUPPORTED_PREDICTION_TYPES)}"
        )
    if config.get("rescale_betas_zero_snr", False):
        raise ScheduleError(f"{source}: rescale_betas_zero_snr=true is not supported; use a teacher without it")
    betas = _betas(config).float()
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    # set_alpha_to_one is DDIM's field; SD's configs (PNDM) carry it too.
    final = 1.0 if config.get("set_alpha_to_one", False) else float(alphas_cumprod[0])
    return Schedule(
        alphas_cumprod=alphas_cumprod.double(),
        final_alpha_cumprod=final,
        prediction_type=prediction_type,
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
    )


def flow_schedule_from_config(config: dict, source: str = "scheduler config", mu: float | None = None) -> Schedule:
    """The flow-matching schedule of a ``FlowMatchEulerDiscreteScheduler`` config (refusing, by field, what
    ``rapm.flowmatch.FlowSchedule`` does not reproduce)."""
    try:
        flow = FlowSchedule.from_config(config)
    except ValueError as e:
        raise ScheduleError(f"{source}: {e}") from None
    return Schedule(alphas_cumprod=torch.zeros(0, dtype=torch.float64), final_alpha_cumprod=1.0, prediction_type=FLOW,
                    num_train_timesteps=int(config.get("num_train_timesteps", 1000)), kind=FLOW, flow=flow, mu=mu)


def coarse_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The N+1 positions t_N > ... > t_1 > t_0 of an N-step sampler, "trailing" spacing.

    t_N..t_1 are diffusers' trailing timesteps (N=4, T=1000: 999, 749, 499, 249);
    t_0 is the final position (``FINAL``).
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps / steps
    ts = [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(steps)]
    return ts + [FINAL]


def slot_grid(t: int, s: int, k: int) -> list[int]:
    """k+1 evenly spaced timesteps from t down to s (both included), rounded as diffusers' trailing grid."""
    return [int(round(t + (s - t) * i / k)) for i in range(k + 1)]


def alpha_sigma(schedule: Schedule, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t), shaped to broadcast against ``like``.

    Flow schedules: sigma_t = t / T (clamped to [0, 1]) and alpha_t = 1 - sigma_t, in float64."""
    if schedule.is_flow:
        sig = (torch.as_tensor(t).double().reshape(-1) / schedule.num_train_timesteps).clamp(0.0, 1.0)
        sig = sig.reshape(-1, *([1] * (like.ndim - 1))).to(like.device)
        return 1.0 - sig, sig
    t = torch.as_tensor(t, device=schedule.alphas_cumprod.device).long().reshape(-1)
    abar = schedule.table.to(t.device)[t + 1]
    abar = abar.reshape(-1, *([1] * (like.ndim - 1))).to(like.device)
    return abar.sqrt(), (1.0 - abar).sqrt()


def predict_x0_eps(
    schedule: Schedule, z: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean sample x0 and the noise eps implied by the model's output at (z, t)."""
    a, s = alpha_sigma(schedule, t, z)
    z64, out = z.double(), model_output.double()
    if schedule.prediction_type == "epsilon":
        eps = out
        x0 = (z64 - s * eps) / a
    elif schedule.prediction_type == FLOW:  # v = eps - x0 on z = (1 - sigma) x0 + sigma eps
        x0 = z64 - s * out
        eps = z64 + a * out
    else:  # v = alpha * eps - sigma * x0
        x0 = a * z64 - s * out
        eps = s * z64 + a * out
    return x0, eps


def ddim_step(
    schedule: Schedule, z: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor | int, s: torch.Tensor | int
) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from t to s, given the model's output at (z, t)."""
    x0, eps = predict_x0_eps(schedule, z, model_output, t)
    a_s, s_s = alpha_sigma(schedule, s, z)
    return (a_s * x0 + s_s * eps).to(z.dtype)


def ddim(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: Schedule,
    z: torch.Tensor,
    t: int,
    s: int,
    k: int,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """k deterministic DDIM steps from t to s; ``model(z, t_tensor)`` returns the teacher's raw output."""
    grid = schedule.grid(t, s, k)
    for i in range(k):
        tt = torch.full((z.shape[0],), grid[i], device=z.device, dtype=schedule.timestep_dtype)
        z = ddim_step(schedule, z, model(z, tt), grid[i], grid[i + 1])
        if callback is not None:
            callback(grid[i + 1], z)
    return z


def sample_positions(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: Schedule,
    z: torch.Tensor,
    timesteps: Sequence[int],
    substeps: int = 1,
) -> list[torch.Tensor]:
    """Run DDIM through the coarse ``timesteps`` with ``substeps`` steps per slot; return every coarse position."""
    positions = [z]
    for t, s in zip(timesteps[:-1], timesteps[1:]):
        z = ddim(model, schedule, z, t, s, substeps)
        positions.append(z)
    return positions


def add_noise(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
    """diffusers' ``add_noise``: a clean sample x0 on the forward process at t, z_t = alpha_t x0 + sigma_t noise."""
    a, s = alpha_sigma(schedule, t, x0)
    return (a * x0.double() + s * noise.double()).to(x0.dtype)


def renoise(schedule: Schedule, x: torch.Tensor, t_from: torch.Tensor | int, t_to: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
    """Move a sample at position t_from to the noisier t_to with fresh noise (forward process q(z_to | z_from))."""
    a_f, s_f = alpha_sigma(schedule, t_from, x)
    a_t, s_t = alpha_sigma(schedule, t_to, x)
    if schedule.is_flow:  # z_to = r z_from + sqrt(sigma_to^2 - r^2 sigma_from^2) noise, r = alpha_to / alpha_from
        r = a_t / a_f
        return (r * x.double() + (s_t.square() - (r * s_f).square()).clamp_min(0).sqrt() * noise.double()).to(x.dtype)
    ratio = (a_t / a_f) ** 2  # abar_to / abar_from
    return (ratio.sqrt() * x.double() + (1 - ratio).clamp_min(0).sqrt() * noise.double()).to(x.dtype)


# --- the teacher's ODE through the coarse timesteps (the trajectory store) ------------------------------------------

SOLVERS = ("ddim", "dpmsolver++")


def log_snr(schedule: Schedule, t: int) -> float:
    """lambda_t = log(alpha_t / sigma_t) at an integer timestep (+inf where sigma is 0)."""
    abar = float(schedule.table[t + 1])
    return math.inf if abar >= 1.0 else 0.5 * (math.log(abar) - math.log1p(-abar))


def dpmsolver_step(
    schedule: Schedule, z: torch.Tensor, x0: torch.Tensor, t: int, s: int,
    previous: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step from t to s in data prediction (Lu et al. 2022, arXiv 2211.01095, Alg. 2; the
    midpoint form diffusers uses), given x0 predicted at (z, t) and ``previous`` = (x0, timestep) of the step before.

    Without ``previous``, or towards sigma_s = 0, it is the first-order step, which is DDIM exactly.
    """
    a_t, s_t = alpha_sigma(schedule, t, z)
    a_s, s_s = alpha_sigma(schedule, s, z)
    lam_t, lam_s = log_snr(schedule, t), log_snr(schedule, s)
    if math.isinf(lam_s):
        return (a_s * x0).to(z.dtype)
    h = lam_s - lam_t
    d = x0
    if previous is not None:
        x0_prev, t_prev = previous
        r = (lam_t - log_snr(schedule, t_prev)) / h
        d = x0 + (x0 - x0_prev) / (2 * r)
    return ((s_s / s_t) * z.double() - a_s * math.expm1(-h) * d).to(z.dtype)


def logsnr_grid(schedule: Schedule, t: int, s: int, k: int) -> list[int]:
    """About k+1 timesteps from t down to s, evenly spaced in log-SNR lambda (DPM-Solver's spacing), each the nearest
    integer timestep; repeats (and points at s's own lambda: t = 0 before the final position) are dropped."""
    lam = [log_snr(schedule, u) for u in range(s, t + 1)]  # lam[u - s]
    end = lam[0] if math.isfinite(lam[0]) else lam[1]  # sigma = 0 at the end (set_alpha_to_one): space to t = 0
    grid = [t]
    for i in range(1, k):
        target = lam[t - s] + (end - lam[t - s]) * i / k
        u = min(range(s, t + 1), key=lambda v: abs(lam[v - s] - target))
        if u < grid[-1] and lam[u - s] != lam[0]:
            grid.append(u)
    return grid + [s]


def solve_positions(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: Schedule,
    z: torch.Tensor,
    timesteps: Sequence[int],
    substeps: int,
    solver: str = "ddim",
    delta: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's coarse positions z~_N..z~_0 (``substeps`` solver steps per slot) and, with ``delta``, each
    slot's Δ-step z^Δ_{n+1} = DDIM(z~_{n+1}, t_{n+1}, t_{n+1} - Δ) (paper Alg. 2, line 8).

    ``model(z, t)`` is called once per substep (at most ``substeps`` N calls in all, whatever ``delta``): the Δ-step
    reuses the model output at (z~_{n+1}, t_{n+1}) that the slot's first substep evaluates anyway, so it is exact
    DDIM for any Δ at no extra teacher pass.

    ``ddim`` steps on the trailing grid (``slot_grid``) and gives exactly ``sample_positions``. ``dpmsolver++`` is
    DPM-Solver++(2M) on a log-SNR-uniform grid in each slot (``logsnr_grid``): on the trailing grid the last step
    into t_0 spans a large lambda interval that dominates the error at any order. Its multistep history carries
    across slot boundaries (each coarse timestep is a grid point, not a restart), so it is first order only on the
    very first step, and towards sigma = 0.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if schedule.is_flow and solver != "ddim":
        raise ValueError(f"solver {solver!r} is for DDPM teachers; a flow-matching teacher's trajectories are Euler (ddim) steps")
    positions, delta_positions = [z], []
    previous: tuple[torch.Tensor, int] | None = None
    for t, s in zip(timesteps[:-1], timesteps[1:]):
        grid = schedule.grid(t, s, substeps) if solver == "ddim" else logsnr_grid(schedule, t, s, substeps)
        for i in range(len(grid) - 1):
            tt = torch.full((z.shape[0],), grid[i], device=z.device, dtype=schedule.timestep_dtype)
            out = model(z, tt)
            if i == 0 and delta is not None:
                delta_positions.append(ddim_step(schedule, z, out, t, t - delta))
            if solver == "ddim":
                z = ddim_step(schedule, z, out, grid[i], grid[i + 1])
            else:
                x0, _ = predict_x0_eps(schedule, z, out, grid[i])
                z = dpmsolver_step(schedule, z, x0, grid[i], grid[i + 1], previous)
                previous = (x0, grid[i])
        positions.append(z)
    return positions, delta_positions
