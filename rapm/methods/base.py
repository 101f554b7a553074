"""What every method's loss needs from one iteration: the context, the pieces of Alg. 2 they share."""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import torch

from rapm.conditioning import Conditioning
from rapm.diffusion import Schedule, ddim_step
from rapm.diffusion import renoise as renoise_between
from rapm.discriminator import Discriminator
from rapm.roles import student_role, teacher_role
from rapm.store import TrajectoryBatch
from rapm.teacher import guided_output, unet_output

Losses = Iterator[tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Context:
    """One iteration's fixed inputs. ``generators`` draw the noise, one per sample of the batch (CPU), so a sample's
    noise does not depend on how the batch is split across processes."""

    unet: torch.nn.Module
    schedule: Schedule
    timesteps: list[int]  # t_N .. t_0, with -1 the final position
    guidance: float  # the stored trajectories' guidance, used for the teacher's Δ-step
    generators: list[torch.Generator]
    discriminator: Discriminator | None = None
    cache: dict = field(default_factory=dict)  # what the iteration's phases share (the relative positions)
    frozen_student: Callable[[], AbstractContextManager] | None = None  # makes the frozen student the EMA; None: as is

    @property
    def steps(self) -> int:
        return len(self.timesteps) - 1

    def _per_sample(self, draw, shape: tuple[int, ...]) -> torch.Tensor:
        """Rows are sample-major (row = sample * k + slot): each sample's rows come from its own generator."""
        rows = shape[0] // len(self.generators)
        return torch.cat([draw((rows, *shape[1:]), generator=g) for g in self.generators])

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        return self._per_sample(torch.randn, tuple(like.shape)).to(like.device, like.dtype)

    def rand(self, rows: int) -> torch.Tensor:
        return self._per_sample(torch.rand, (rows,))


@dataclass
class Setup:
    """What a method may need once, before the first iteration (``Method.prepare``)."""

    unet: torch.nn.Module
    schedule: Schedule
    store: object  # rapm.store.TrajectoryStore
    device: torch.device
    dtype: torch.dtype


@dataclass
class Method:
    """One distillation method = one loss object; the trainer is written once (after EDM's training/loss.py).

    A method is a dataclass whose fields are its settings, with its defaults; ``from_config`` builds it from a run's
    config and one of its presets (``rapm.methods.REGISTRY``). The fields below are the loop's (``rapm.train`` reads
    them off the method); the class attributes say where the method applies. A method yields its losses; the rest
    has defaults here: nothing to prepare, no state or extra parameters. A method that overrides a hook calls the
    base's (a term it holds, such as RDD's, comes in through it).
    """

    updates: str = "both"  # how discriminator and student updates share the iterations: both | alternate (Alg. 2)
    ema_decay: float = 0.0  # the student's EMA, validated, sampled and exported in its place (0 = none)
    ema_warmup: bool = False  # decay min(ema_decay, (1 + k) / (10 + k)) after k updates

    flow: ClassVar[str | None] = None  # None: applies to a flow-matching teacher; else why it does not
    reads: ClassVar[tuple[str, ...]] = ()  # the config fields only this method reads (the model card leaves them out
    # of another method's run)
    uses_discriminator = False

    @classmethod
    def from_config(cls, config, delta: int, preset: dict) -> "Method":
        """The loss object for a run's ``config`` (its fields left to the method already resolved,
        ``rapm.methods.resolve``), Δ = ``delta`` teacher timesteps, and the method's ``preset`` (``REGISTRY``)."""
        raise NotImplementedError

    @classmethod
    def own(cls, preset: dict) -> dict:
        """The method's values of its fields: its defaults, then its preset's."""
        return {**{f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}, **preset}

    def generator_losses(self, ctx: Context, batch: TrajectoryBatch) -> Losses:
        """Yield the student's loss piece by piece (one per slot); the trainer back-propagates each as it comes."""
        raise NotImplementedError

    def discriminator_losses(self, ctx: Context, batch: TrajectoryBatch) -> Losses:
        """Yield the discriminators' loss."""
        raise NotImplementedError(f"{type(self).__name__} trains no discriminator")

    def prepare(self, setup: Setup) -> None:
        """Load what the method needs beyond the store (real data, a feature network, extra adapters)."""

    def begin_step(self, step: int, unet: torch.nn.Module) -> None:
        """Called before every iteration (progressive distillation changes rounds here)."""

    def extra_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters besides the student LoRA, stepped by the student's optimizer (not exported)."""
        return {}

    def state_dict(self) -> dict:
        """The method's own state, saved in every checkpoint so a resume continues exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt((a - b)^2 + c^2) - c): PCM's code's pseudo-Huber loss and its c (docs/references.md). The paper says only
    "the Huber-loss" (§3.1, after eq. 9) and gives no formula."""
    d = (a.float() - b.float()).square()
    return (d + c * c).sqrt().mean() - c


def slot_times(ctx: Context, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end timesteps of every slot for every sample, sample-major: [B*N] each."""
    starts = torch.tensor(ctx.timesteps[:-1], device=device).repeat(batch_size)
    ends = torch.tensor(ctx.timesteps[1:], device=device).repeat(batch_size)
    return starts, ends


def student_step(ctx: Context, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """One DDIM step of the student (guidance 1) from t to s."""
    with student_role(ctx.unet):
        return ddim_step(ctx.schedule, z, unet_output(ctx.unet, z, t, cond), t, s)


def teacher_step(
    ctx: Context, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Conditioning, uncond: Conditioning | None
) -> torch.Tensor:
    """One DDIM step of the teacher with the trajectories' guidance, cond and uncond in one forward."""
    with teacher_role(ctx.unet):
        return ddim_step(ctx.schedule, z, guided_output(ctx.unet, z, t, cond, uncond, ctx.guidance), t, s)


@torch.no_grad()
def student_trajectory(ctx: Context, z: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The student's N positions after z_N, without gradients: [B, N, C, H, W]."""
    positions = []
    for t, s in zip(ctx.timesteps[:-1], ctx.timesteps[1:]):
        tt = torch.full((z.shape[0],), t, device=z.device)
        z = student_step(ctx, z, tt, torch.full_like(tt, s), cond)
        positions.append(z)
    return torch.stack(positions, dim=1)


def discriminator_timesteps(ctx: Context, ends: torch.Tensor) -> torch.Tensor:
    """Where the discriminator looks: t_gan ~ U[t_n, t_n + T/N) (PCM), for each slot end t_n."""
    if ctx.schedule.is_flow:  # float timesteps σ · 1000: t_gan ~ U[t_n, t_n + T/N), at most T
        t_max = float(ctx.schedule.num_train_timesteps)
        u = ctx.rand(ends.shape[0]).to(ends.device, torch.float64)
        lo = ends.double()
        hi = (lo + t_max / ctx.steps).clamp_max(t_max)
        return (lo + u * (hi - lo)).float()
    span = ctx.schedule.num_train_timesteps // ctx.steps
    lo = ends.clamp_min(0)
    hi = (ends + span).clamp_max(ctx.schedule.num_train_timesteps - 1)
    u = ctx.rand(ends.shape[0]).to(ends.device)
    return (lo + (u * (hi - lo + 1).float()).long().clamp_max(hi - lo)).long()


def renoise(ctx: Context, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Move discriminator inputs from their slot end to t_gan with fresh noise."""
    return renoise_between(ctx.schedule, x, t_from, t_to, noise)
