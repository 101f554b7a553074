"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512, Alg. 2), optionally with RDD's relational loss.

Rounds halve the student's step count: with ``start_steps`` = N 2^R, round r = 1..R trains a K_r = N 2^(R-r) step
student to do in one DDIM step what its round's teacher does in two:

    z_t      = alpha_t x + sigma_t eps,   t on the K_r-step trailing grid        (x: see below)
    z_t'     = DDIM(z_t, t, t'; teacher_r),  z_t'' = DDIM(z_t', t', t''; teacher_r)   (t' the midpoint on the 2K_r grid)
    x~       = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)    (the x-target)
    loss     = mean( max(SNR(t), 1) (x^_student(z_t, t) - x~)^2 )                   ("truncated SNR" weighting)

teacher_1 is the diffusers teacher with the store's guidance (the student learns the guided model at guidance 1,
so the exported LoRA samples as every other method's); teacher_r for r > 1 is the student at the end of round
r - 1, held as a third LoRA adapter ``previous`` on the same UNet (decision 1: no second UNet). The iteration budget
is split evenly between rounds; the optimizer state carries over (the student starts each round as its teacher,
as in the paper). Data: no real images; x is the stored teacher end point z~_0 of the trajectory batch (the store's
other positions are unused), so the method sees the same teacher samples as RAPM.

With RDD's relational term on (``--method progressive-rdd``, or ``rdd_weight`` > 0), RDD's relational loss between
the features of x~ and of the student's x^ is added (rapm/methods/rdd.py: the teacher's own mid-block features, or
the digits classifier's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from rapm.config import ConfigError
from rapm.diffusion import add_noise, alpha_sigma, coarse_timesteps, ddim_step, predict_x0_eps
from rapm.methods.base import Context, Losses, Method, Setup
from rapm.methods.rdd import TakesRelationalTerm, relational_settings
from rapm.roles import STUDENT, LoraSpec, adapter_role, add_frozen_adapter, lora_parameters, student_role, teacher_role
from rapm.store import TrajectoryBatch
from rapm.teacher import guided_output, unet_output

PREVIOUS = "previous"  # the adapter holding the last round's student: the teacher of rounds 2..R


def rounds_for(start_steps: int, steps: int) -> int:
    """R such that start_steps = steps 2^R (R >= 1), or a ConfigError naming the field."""
    r, k = 0, start_steps
    while k > steps and k % 2 == 0:
        k //= 2
        r += 1
    if k != steps or r < 1:
        raise ConfigError(f"config field 'progressive_start_steps': {start_steps} must be the store's N = {steps} "
                          f"times a power of two (at least 2 N = {2 * steps})")
    return r


@dataclass
class Progressive(TakesRelationalTerm, Method):
    start_steps: int = 16  # the first round's teacher steps (2 K_1)
    rounds: int = 0
    iterations: int = 0
    round: int = 0  # the round the student is in (1..R); 0 before the first step
    lora: LoraSpec | None = field(default=None, repr=False)  # the frozen previous-round student's adapter
    unet: torch.nn.Module | None = field(default=None, repr=False)

    flow: ClassVar[str | None] = ("its rounds halve integer DDIM grids of a DDPM schedule and it needs its own teacher "
                                  "targets")
    reads: ClassVar[tuple[str, ...]] = ("progressive_start_steps",)

    @classmethod
    def from_config(cls, config, delta: int, preset: dict) -> "Progressive":
        """Salimans & Ho 2022; with ``rdd_weight`` (progressive-rdd's preset: 1.0), RDD's relational loss."""
        return cls(start_steps=config.progressive_start_steps, iterations=config.iterations,
                   lora=LoraSpec(config.lora_rank, config.lora_alpha, list(config.lora_targets)),
                   relational=relational_settings(config), updates=config.updates, ema_decay=config.ema_decay,
                   ema_warmup=config.ema_warmup)

    def prepare(self, setup: Setup) -> None:
        self.unet = setup.unet
        self.rounds = rounds_for(self.start_steps, setup.store.steps)
        super().prepare(setup)  # RDD's relational term (progressive-rdd)

    def student_steps(self, round_: int) -> int:
        return self.start_steps >> round_

    def round_at(self, step: int) -> int:
        return min(step * self.rounds // max(self.iterations, 1), self.rounds - 1) + 1

    def begin_step(self, step: int, unet: torch.nn.Module) -> None:
        """At a round's first step, the student so far becomes the teacher (copied into the ``previous`` adapter)."""
        r = self.round_at(step)
        if r == self.round:
            return
        if r > 1:
            add_frozen_adapter(unet, PREVIOUS, self.lora)
            src = lora_parameters(unet, STUDENT)
            dst = lora_parameters(unet, PREVIOUS)
            with torch.no_grad():
                for name, p in src.items():
                    dst[name.replace(f".{STUDENT}.", f".{PREVIOUS}.")].copy_(p)
        self.round = r

    def state_dict(self) -> dict:
        state = {"round": self.round, **super().state_dict()}
        if PREVIOUS in getattr(self.unet, "peft_config", {}):
            state["previous"] = {n: p.detach().cpu().clone() for n, p in lora_parameters(self.unet, PREVIOUS).items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state.get("round", 0))
        if state.get("previous"):
            add_frozen_adapter(self.unet, PREVIOUS, self.lora)
            with torch.no_grad():
                for name, p in lora_parameters(self.unet, PREVIOUS).items():
                    p.copy_(state["previous"][name])
        super().load_state_dict(state)

    def teacher_output(self, ctx: Context, z, t, batch: TrajectoryBatch) -> torch.Tensor:
        if self.round <= 1:  # the diffusers teacher, guided as the store's trajectories were
            with teacher_role(ctx.unet):
                return guided_output(ctx.unet, z, t, batch.cond, batch.uncond, ctx.guidance)
        with adapter_role(ctx.unet, PREVIOUS):
            return unet_output(ctx.unet, z, t, batch.cond)

    def generator_losses(self, ctx: Context, batch: TrajectoryBatch) -> Losses:
        b = batch.latents.shape[0]
        k = self.student_steps(self.round)
        student_grid = coarse_timesteps(ctx.schedule.num_train_timesteps, k)
        teacher_grid = coarse_timesteps(ctx.schedule.num_train_timesteps, 2 * k)
        x = batch.latents[:, -1]  # the teacher's end point z~_0 stands in for data (no real images)
        i = (ctx.rand(b) * k).long().clamp_max(k - 1).tolist()
        dev = x.device
        t = torch.tensor([student_grid[j] for j in i], device=dev)
        mid = torch.tensor([teacher_grid[2 * j + 1] for j in i], device=dev)
        end = torch.tensor([student_grid[j + 1] for j in i], device=dev)
        a_t, s_t = alpha_sigma(ctx.schedule, t, x)
        z_t = add_noise(ctx.schedule, x, t, ctx.randn(x))
        with torch.no_grad():  # two teacher DDIM steps (Alg. 2, lines 7-8)
            z_mid = ddim_step(ctx.schedule, z_t, self.teacher_output(ctx, z_t, t, batch), t, mid)
            z_end = ddim_step(ctx.schedule, z_mid, self.teacher_output(ctx, z_mid, mid, batch), mid, end)
            a_e, s_e = alpha_sigma(ctx.schedule, end, x)
            ratio = s_e / s_t
            x_target = (z_end.double() - ratio * z_t.double()) / (a_e - ratio * a_t)  # the x-target (Alg. 2, line 9)
        with student_role(ctx.unet):
            x_pred, _ = predict_x0_eps(ctx.schedule, z_t, unet_output(ctx.unet, z_t, t, batch.cond), t)
        snr = (a_t / s_t) ** 2
        weight = snr.clamp_min(1.0)  # truncated SNR: max(x-MSE, eps-MSE)
        mse = (weight * (x_pred - x_target).square()).float().mean()
        loss, logs = mse, {"pd_mse": mse.item(), "round": float(self.round), "student_steps": float(k)}
        if self.rdd is not None:  # RDD's relational loss between the x-target's features and the prediction's
            rdd, rdd_logs = self.rdd(ctx, x_pred.float(), x_target.float(), batch.cond)
            loss = loss + self.rdd.weight * rdd
            logs.update(rdd_logs)
        logs["loss/progressive"] = loss.item()
        yield loss, logs

