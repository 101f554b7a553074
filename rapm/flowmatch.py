"""The σ schedule of SD3 / SD3.5 and FLUX.1 teachers (issue 19), read from their scheduler config.

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
plus μ (FLUX pipeline); see docs/flow-matching.md. ``rapm.diffusion.Schedule`` of kind "flow" holds one; the
straight-line conversions and the Euler solver that tests check it against are tests/flow_reference.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch


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
