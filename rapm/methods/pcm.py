"""PCM: Phased Consistency Models (Wang et al. 2024, arXiv 2405.18407), as RAPM's paper states it (Alg. 1).

PCM learns from **real data**: a real image x (with its caption) is noised to a point t inside a phase
(t_{n+1} >= t > t_n, on the phase's M-step grid), and the student's step from t to the phase edge t_n must land
where the teacher's solver step from t to t - Δ followed by the frozen student from t - Δ to t_n lands:

    x_t    = alpha_t x + sigma_t eps,  x ~ real data                                  (Alg. 1, lines 5-7; eq. 1)
    target = DDIM(DDIM(x_t, t, t-Δ, 1; teacher, CFG), t-Δ, t_n, 1; frozen student)    (no grad; at t-Δ = t_n
             the teacher's point itself, the consistency boundary condition)
    pred   = DDIM(x_t, t, t_n, 1; student)
    loss   = H(pred, target) + λ G(pred | t_n)

The discriminator (PCM's, RAPM's D1) compares ``pred`` with ``target`` after both are moved to t_gan with the same
noise. Everything is batched over the samples: one teacher, one frozen-student and one student forward.

Differences from PCM's code, for one machinery: the frozen student plays PCM's target network (RAPM's choice;
PCM's code uses the online LoRA under no_grad as well); the teacher's guidance is the store's fixed scale rather
than w ~ U[4, 5]; the unconditional embedding is the store's. The store supplies N, M, the guidance and the
unconditional embedding; its trajectories are not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from rapm.conditioning import Conditioning
from rapm.config import ConfigError
from rapm.diffusion import add_noise, slot_grid
from rapm.discriminator import hinge_discriminator_loss, hinge_generator_loss
from rapm.families import BUILTIN_NAMES
from rapm.methods.base import (Context, Losses, Method, Setup, discriminator_timesteps, pseudo_huber, renoise,
                               student_step, teacher_step)
from rapm.plugins import plugin_for
from rapm.realdata import load_real_data
from rapm.store import TrajectoryBatch


@dataclass
class PCM(Method):
    updates: str = "alternate"
    real_data: str = "digits"
    huber_c: float = 0.001
    adv_weight: float = 0.1
    substeps: int = 0  # M, the phase's grid (t - Δ is the next point on it); 0 = the store's
    teacher: str = "digits"  # whose text encoders and VAE encode the real data
    data: object = field(default=None, repr=False)  # rapm.realdata.RealData, loaded by prepare

    flow: ClassVar[str | None] = ("it trains on real images through a DDPM forward process (config field 'real_data') "
                                  "and its phase grid")
    reads: ClassVar[tuple[str, ...]] = ("real_data",)

    @classmethod
    def from_config(cls, config, delta: int, preset: dict) -> "PCM":
        """Paper Alg. 1: real data (``real_data``; a built-in teacher's own by default), the relative position from a
        noised real image."""
        plugin = plugin_for(config.teacher)
        real = config.real_data or (plugin.name if plugin is not None else "")
        if not real:
            raise ConfigError("config field 'real_data': --method pcm needs real images; set real_data to a folder of "
                              f"images with a .txt caption beside each (or a built-in teacher's name, {BUILTIN_NAMES}, for "
                              "its own)")
        return cls(real_data=real, huber_c=config.huber_c, adv_weight=config.adv_weight, teacher=config.teacher,
                   updates=config.updates, ema_decay=config.ema_decay, ema_warmup=config.ema_warmup)

    @property
    def uses_discriminator(self) -> bool:
        return self.adv_weight > 0

    def prepare(self, setup: Setup) -> None:
        self.substeps = self.substeps or setup.store.substeps
        if self.data is None:
            self.data = load_real_data(self.real_data, self.teacher, device=setup.device, dtype=setup.dtype,
                                       unet=setup.unet)  # text encoders and VAE only: no second UNet

    def draw(self, ctx: Context, batch_size: int, device, dtype: torch.dtype) -> dict:
        """Each sample's real image, caption, phase, point in the phase and noise, from its own generator."""
        n, m = ctx.steps, self.substeps
        u = ctx.rand(3 * batch_size).view(batch_size, 3)
        slot = (u[:, 0] * n).long().clamp_max(n - 1)  # index j: the phase from timesteps[j] to timesteps[j+1]
        point = (u[:, 1] * m).long().clamp_max(m - 1)
        item = (u[:, 2] * len(self.data)).long().clamp_max(len(self.data) - 1)
        x, cond = self.data.get(item)
        grids = [slot_grid(ctx.timesteps[j], ctx.timesteps[j + 1], m) for j in slot.tolist()]
        t = torch.tensor([g[i] for g, i in zip(grids, point.tolist())], device=device)
        mid = torch.tensor([g[i + 1] for g, i in zip(grids, point.tolist())], device=device)
        end = torch.tensor([ctx.timesteps[j + 1] for j in slot.tolist()], device=device)
        x = x.to(device, dtype)
        noise = ctx.randn(x)
        x_t = add_noise(ctx.schedule, x, t, noise)  # Alg. 1: a real image on the teacher's forward process
        return dict(x_t=x_t, t=t, mid=mid, end=end, cond=cond.to(device, x.dtype))

    @torch.no_grad()
    def target(self, ctx: Context, d: dict, uncond: Conditioning | None) -> torch.Tensor:
        z_mid = teacher_step(ctx, d["x_t"], d["t"], d["mid"], d["cond"], uncond)
        at_edge = d["mid"] == d["end"]  # t - Δ is the phase edge: the teacher's point is the target
        safe_mid = torch.where(at_edge, d["t"], d["mid"])  # never call the UNet at the final position
        frozen = student_step(ctx, z_mid, safe_mid, d["end"], d["cond"])
        return torch.where(at_edge.view(-1, *[1] * (z_mid.ndim - 1)), z_mid, frozen)

    def _batch(self, ctx: Context, batch: TrajectoryBatch):
        b = batch.latents.shape[0]
        d = self.draw(ctx, b, batch.latents.device, batch.latents.dtype)
        uncond = batch.uncond  # the store's negative embedding, one per sample
        return d, self.target(ctx, d, uncond)

    def generator_losses(self, ctx: Context, batch: TrajectoryBatch) -> Losses:
        d, target = self._batch(ctx, batch)
        pred = student_step(ctx, d["x_t"], d["t"], d["end"], d["cond"])
        h = pseudo_huber(pred, target, self.huber_c)
        loss, logs = h, {"huber": h.item()}
        if self.uses_discriminator:
            t_gan = discriminator_timesteps(ctx, d["end"])
            x = renoise(ctx, pred, d["end"], t_gan, ctx.randn(pred))
            g = hinge_generator_loss(ctx.discriminator.logits(ctx.unet, x, t_gan, d["cond"])["relative"])
            loss = loss + self.adv_weight * g
            logs["gen"] = g.item()
        logs["loss/pcm"] = loss.item()
        yield loss, logs

    def discriminator_losses(self, ctx: Context, batch: TrajectoryBatch) -> Losses:
        d, target = self._batch(ctx, batch)
        with torch.no_grad():
            fake = student_step(ctx, d["x_t"], d["t"], d["end"], d["cond"])
        t_gan = discriminator_timesteps(ctx, d["end"])
        noise = ctx.randn(fake)
        inputs = torch.cat([fake, target])  # one backbone pass over fakes and reals, the same noise for both
        x = renoise(ctx, inputs, d["end"].repeat(2), t_gan.repeat(2), noise.repeat(2, *[1] * (noise.ndim - 1)))
        logits = ctx.discriminator.logits(ctx.unet, x, t_gan.repeat(2), Conditioning.cat([d["cond"], d["cond"]]))
        b = fake.shape[0]
        heads = logits["relative"]
        loss = hinge_discriminator_loss([h[:b] for h in heads], [h[b:] for h in heads])
        yield loss, {"disc": loss.item()}
