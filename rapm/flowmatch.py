"""Flow-matching math for SD3 / SD3.5 and FLUX.1 teachers (issue 19), as small pure functions.

The forward process is the straight line x_t = (1 - σ) x_0 + σ ε, σ ∈ [0, 1]; the
transformer predicts the velocity v = ε - x_0 = dx_t/dσ. In the (α, σ) notation of
DDIM this is α = 1 - σ, and the deterministic DDIM step
x_s = α_s x̂_0 + σ_s ε̂ equals the Euler step x_s = x_t + (σ_s - σ_t) v: the ODE is
integrated exactly when v is constant along the segment, which is what a
distilled student is trained to make it.

σ comes from the scheduler config (diffusers' ``FlowMatchEulerDiscreteScheduler``):
a static ``shift`` (SD3: 3.0) or, with ``use_dynamic_shifting`` (FLUX), the
exponential time shift with μ interpolated linearly in the image's token count
(``calculate_shift`` of diffusers' FLUX pipeline). The N coarse σ are placed as
``set_timesteps(N)`` places them (SD3 pipeline) or from ``np.linspace(1, 1/N, N)``
plus μ (FLUX pipeline); see docs/flow-matching.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------------------------
# The straight-line parameterization and its conversions.


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - σ) x_0 + σ ε (diffusers' ``scale_noise``); ``sigma`` broadcasts against ``x0``."""
    sigma = _as_batch(sigma, x0)
    return (1.0 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target v = ε - x_0."""
    return noise - x0


def velocity_to_x0(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x̂_0 = x_t - σ v."""
    return x_t - _as_batch(sigma, x_t) * v


def velocity_to_eps(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """ε̂ = x_t + (1 - σ) v."""
    return x_t + (1.0 - _as_batch(sigma, x_t)) * v


def x0_eps_to_velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = ε - x_0 from a pair of predictions."""
    return eps - x0


def x0_to_velocity(x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """v = (x_t - x_0) / σ (σ > 0)."""
    return (x_t - x0) / _as_batch(sigma, x_t)


def eps_to_velocity(x_t: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """v = (ε - x_t) / (1 - σ) (σ < 1)."""
    return (eps - x_t) / (1.0 - _as_batch(sigma, x_t))


def euler_step(
    x_t: torch.Tensor, v: torch.Tensor, sigma_from: torch.Tensor | float, sigma_to: torch.Tensor | float
) -> torch.Tensor:
    """The deterministic step x_s = x_t + (σ_s - σ_t) v, in float32 as diffusers' scheduler.step computes it."""
    dtype = x_t.dtype
    x = x_t.float()
    step = _as_batch(sigma_to, x) - _as_batch(sigma_from, x)
    return (x + step * v.float()).to(dtype)


def ddim_step(
    x_t: torch.Tensor, v: torch.Tensor, sigma_from: torch.Tensor | float, sigma_to: torch.Tensor | float
) -> torch.Tensor:
    """DDIM in (α = 1 - σ, σ): x_s = α_s x̂_0 + σ_s ε̂; equal to ``euler_step`` (tests/test_flowmatch.py)."""
    x0 = velocity_to_x0(x_t, v, sigma_from)
    eps = velocity_to_eps(x_t, v, sigma_from)
    sigma_to = _as_batch(sigma_to, x_t)
    return (1.0 - sigma_to) * x0 + sigma_to * eps


def _as_batch(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample [B] σ as a tensor broadcasting over ``like``'s trailing dims."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 1 and like.ndim > 1:
        t = t.reshape(-1, *([1] * (like.ndim - 1)))
    return t


# ---------------------------------------------------------------------------------------------------------------
# The schedule: shift, dynamic shift, coarse and fine σ grids.


def calculate_shift(
    image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """μ of FLUX's resolution-dependent shift: linear in the token count, base_shift at base_seq_len, max_shift at max_seq_len."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


@dataclass(frozen=True)
class FlowSchedule:
    """The σ schedule of a ``FlowMatchEulerDiscreteScheduler`` config (the fields RAPM needs; others must be default)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    # Config options that change the σ placement in ways this module does not reproduce: refuse them, never ignore.
    _UNSUPPORTED = {
        "invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False,
    }

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "FlowSchedule":
        """From a scheduler, its ``.config`` or a scheduler_config.json dict."""
        config = getattr(config, "config", config)
        config = dict(config)
        for key, default in cls._UNSUPPORTED.items():
            value = config.get(key, default)
            if value not in (default, None, False) and value != default:
                raise ValueError(
                    f"scheduler config: {key}={value!r} is not supported for flow-matching distillation "
                    f"(only {default!r}); use the teacher's default scheduler"
                )
        fields = {f: config[f] for f in cls.__dataclass_fields__ if f in config and config[f] is not None}
        return cls(**fields)

    def mu(self, image_seq_len: int) -> float:
        """μ for an image of ``image_seq_len`` transformer tokens, from this config's base/max shift and lengths."""
        return calculate_shift(
            image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift
        )

    def apply_shift(self, sigmas: np.ndarray, mu: float | None = None) -> np.ndarray:
        """Unshifted σ ∈ (0, 1] to the teacher's σ: static shift s σ / (1 + (s - 1) σ), or e^μ / (e^μ + 1/σ - 1)."""
        sigmas = np.asarray(sigmas)
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("this scheduler uses dynamic shifting: pass mu (FlowSchedule.mu(image_seq_len))")
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def remove_shift(self, sigmas: np.ndarray, mu: float | None = None) -> np.ndarray:
        """The inverse of ``apply_shift`` (σ = 0 maps to 0)."""
        sigmas = np.asarray(sigmas, dtype=np.float64)
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("this scheduler uses dynamic shifting: pass mu")
            return sigmas / (sigmas + math.exp(mu) * (1 - sigmas))
        return sigmas / (self.shift - (self.shift - 1) * sigmas)

    def training_sigmas(self) -> np.ndarray:
        """The scheduler's table of num_train_timesteps σ (descending; static shift applied, dynamic not)."""
        n = self.num_train_timesteps
        table = np.linspace(1, n, n, dtype=np.float32)[::-1].copy() / n
        return table if self.use_dynamic_shifting else self.apply_shift(table).astype(np.float32)

    def coarse_sigmas(
        self, num_steps: int, mu: float | None = None, sigmas: Sequence[float] | None = None
    ) -> torch.Tensor:
        """The num_steps + 1 σ (last 0) that ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps, sigmas=, mu=)`` places.

        Without ``sigmas``: linspace in timestep units between the table's σ_max and σ_min, then shifted (SD3's
        pipeline; with a static shift the table is already shifted, so the ends are shifted twice, as in diffusers).
        """
        if sigmas is None:
            table = self.training_sigmas()
            n = self.num_train_timesteps
            timesteps = np.linspace(float(table[0]) * n, float(table[-1]) * n, num_steps)
            unshifted = timesteps / n
        else:
            unshifted = np.array(sigmas).astype(np.float32)
        shifted = self.apply_shift(unshifted, mu)
        out = torch.from_numpy(np.asarray(shifted)).to(torch.float32)
        return torch.cat([out, torch.zeros(1)])

    def trailing_sigmas(self, num_steps: int, mu: float | None = None) -> torch.Tensor:
        """N slots of equal width in the unshifted σ, then shifted: ``set_timesteps(sigmas=np.linspace(1, 1/N, N), mu=)``.

        FLUX's pipeline always places its σ so; SD3's does when its ``sigmas=`` argument is given. It is the
        flow-matching analogue of DDIM's "trailing" spacing (999, 749, 499, 249) and PCM's SD3 phase edges. SD3's
        default placement (``coarse_sigmas``) instead ends at the table's σ_min, so its last slot spans σ 0.009 to 0
        at N = 4 with shift 3: a wasted step for a few-step student.
        """
        return self.coarse_sigmas(num_steps, mu=mu, sigmas=np.linspace(1.0, 1 / num_steps, num_steps))

    def flux_coarse_sigmas(self, num_steps: int, image_seq_len: int) -> torch.Tensor:
        """The σ of diffusers' FluxPipeline for num_steps: ``sigmas=np.linspace(1, 1/N, N)`` and μ from the token count."""
        return self.trailing_sigmas(num_steps, mu=self.mu(image_seq_len))

    def pipeline_coarse_sigmas(self, family: str, num_steps: int, image_seq_len: int) -> torch.Tensor:
        """The N-step σ of the family's diffusers pipeline: FluxPipeline's, or StableDiffusion3Pipeline's (μ if dynamic)."""
        if family == "flux":
            return self.flux_coarse_sigmas(num_steps, image_seq_len)
        if family != "sd3":
            raise ValueError(f"family must be 'sd3' or 'flux', got {family!r}")
        return self.coarse_sigmas(num_steps, mu=self.mu(image_seq_len) if self.use_dynamic_shifting else None)

    def slot_mu(self, family: str, image_seq_len: int) -> float | None:
        """The μ a fine grid needs (``fine_sigmas``/``slot_grid``): the image's μ with dynamic shifting, else None."""
        return self.mu(image_seq_len) if self.use_dynamic_shifting else None

    def fine_sigmas(self, sigma_from: float, sigma_to: float, k: int, mu: float | None = None) -> torch.Tensor:
        """k + 1 σ from ``sigma_from`` down to ``sigma_to`` (both kept exactly), uniform in the unshifted σ.

        Uniform before the shift is how both the pipelines' coarse grids and PCM's SD3 Euler solver (uniform indices
        into the shifted training table) space their steps, so the teacher's fine steps inside a slot follow the same
        density as its own N-step sampler: they concentrate near σ = 1 when shift > 1.
        """
        if k < 1:
            raise ValueError(f"fine steps per slot must be >= 1, got {k}")
        ends = self.remove_shift(np.array([sigma_from, sigma_to], dtype=np.float64), mu)
        grid = np.linspace(ends[0], ends[1], k + 1)
        with np.errstate(divide="ignore"):
            shifted = self._shift_safe(grid, mu)
        shifted[0], shifted[-1] = sigma_from, sigma_to
        return torch.from_numpy(shifted).to(torch.float32)

    def _shift_safe(self, sigmas: np.ndarray, mu: float | None) -> np.ndarray:
        """``apply_shift`` written so σ = 0 maps to 0 (used for fine grids that end at σ = 0)."""
        if self.use_dynamic_shifting:
            e = math.exp(mu)
            return e * sigmas / (e * sigmas + (1 - sigmas))
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def slot_grid(self, coarse: torch.Tensor, k: int, mu: float | None = None) -> torch.Tensor:
        """The whole fine grid: k steps inside each of the N slots of ``coarse`` (N + 1 σ), N k + 1 σ."""
        pieces = [self.fine_sigmas(float(coarse[i]), float(coarse[i + 1]), k, mu) for i in range(len(coarse) - 1)]
        return torch.cat([pieces[0]] + [p[1:] for p in pieces[1:]])

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The scheduler's timestep for σ, σ · num_train_timesteps: what SD3's transformer takes (FLUX's takes it / 1000)."""
        return sigma * self.num_train_timesteps


def sample_euler(velocity, latents: torch.Tensor, sigmas: torch.Tensor, schedule: FlowSchedule) -> torch.Tensor:
    """Integrate the flow ODE from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps: ``velocity(x, timestep)`` per step.

    ``timestep`` is the [B] scheduler timestep (σ · num_train_timesteps), as the pipelines pass it.
    """
    x = latents
    for i in range(len(sigmas) - 1):
        timestep = schedule.model_timestep(sigmas[i]).expand(x.shape[0]).to(x.dtype)
        v = velocity(x, timestep)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
    return x


def teacher_trajectory(
    velocity, noise: torch.Tensor, coarse: torch.Tensor, k: int, schedule: FlowSchedule, mu: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's trajectory through the N coarse σ with k Euler steps per slot (``fine_sigmas``).

    Returns the positions at the coarse σ, [B, N + 1, ...] (index 0 is the noise at ``coarse[0]``), and the
    Δ-step of each slot, [B, N, ...]: the position after the slot's first fine step (decision 8; at k = 1 it is
    the slot's end). ``velocity(x, timestep)`` as in ``sample_euler``.
    """
    positions, delta_steps = [noise], []
    x = noise
    for i in range(len(coarse) - 1):
        fine = schedule.fine_sigmas(float(coarse[i]), float(coarse[i + 1]), k, mu)
        for j in range(k):
            timestep = schedule.model_timestep(fine[j]).expand(x.shape[0]).to(x.dtype)
            x = euler_step(x, velocity(x, timestep), fine[j], fine[j + 1])
            if j == 0:
                delta_steps.append(x)
        positions.append(x)
    return torch.stack(positions, dim=1), torch.stack(delta_steps, dim=1)
