"""RAPM: Relative and Absolute Position Matching (Zhang et al. 2025, arXiv 2503.20744, Alg. 2).

Per stored trajectory z~_N..z~_0 and for each slot n = N-1..0:

    rel_n = DDIM(DDIM(z~_{n+1}, t_{n+1}, t_{n+1}-Δ; teacher), t_{n+1}-Δ, t_n; frozen student)   (eqs. 12-14, no grad)
    z_n   = DDIM(z_{n+1}, t_{n+1}, t_n; student)                                            (eq. 11)
    loss_r = H(z_n, rel_n) + λ G1(z_n | t_n)                                                 (eq. 15; summed: 16)
    loss_a = w_n [ H(z_n, z~_n) + λ G2(z_n | t_n) ]                                          (eq. 17; total: 18)
    z_n   = detach(z_n)                                                                      (§3.3)

Even iterations update D1 and D2, odd ones the student (Alg. 2, lines 17-21); the trainer's ``updates`` field can
instead make every iteration a discriminator step and then a student step on the same trajectory.

The GAN loss is ``gan_loss``: "hinge" is PCM's unpaired hinge loss (the paper's setting); "relativistic" is a paired
relativistic loss (RpGAN, Jolicoeur-Martineau 2018; R3GAN, Huang et al. 2025 without its penalties): every fake z_n
has its own reals (the relative position and the stored point), renoised to the same t_gan with the same noise, and
the discriminator scores the difference D(real) - D(fake) patch by patch, so it has to tell the pair apart rather
than find a 2-12% feature difference across samples that differ by 40-95%.
``absolute=False`` gives the relative-only ablation (eq. 16 alone); ``relative=False,
discriminator=False, distance="l1"`` is SFD (paper Alg. 3: the absolute position only).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from rapm.config import ConfigError
from rapm.discriminator import (hinge_discriminator_loss, hinge_generator_loss, pair_accuracy,
                                relativistic_discriminator_loss, relativistic_generator_loss)
from rapm.methods.base import (Context, Losses, Method, discriminator_timesteps, pseudo_huber, renoise, slot_times,
                               student_step, student_trajectory, teacher_step)
from rapm.methods.rdd import TakesRelationalTerm, relational_settings
from rapm.store import TrajectoryBatch


class DeltaStepWarning(UserWarning):
    """The teacher's Δ-step is computed in training (the store holds none for this Δ)."""


# The default recipe (`--method rapm`), chosen on the digits convergence benchmark (docs/results/convergence.md): the
# absolute terms alone (relative weight 0: the relative terms and D1 are not computed), no discriminator (switched on
# with `--set adv_weight=0.1`, the paired, relativistic ones, updated in every iteration before the student), and an
# EMA of the student (0.99 with the warm-up) as the student that is validated and exported.
DEFAULT_RECIPE = dict(gan_loss="relativistic", updates="both", adv_weight=0.0, relative_weight=0.0, ema_decay=0.99,
                      ema_warmup=True)
# Eq. 16 alone, the ablation of paper Fig. 3 (`--method rapm-relative`)
RELATIVE_ONLY = dict(gan_loss="relativistic", updates="both", adv_weight=0.0, absolute=False)


@dataclass
class RAPM(TakesRelationalTerm, Method):
    """RAPM's loss; its defaults are the paper's setting (Alg. 2 as written: PCM's unpaired hinge loss, discriminator
    and student updates alternating, every term at weight 1, no EMA), ``--method rapm-paper``."""

    updates: str = "alternate"
    huber_c: float = 0.001
    adv_weight: float = 0.1
    delta: int = 10  # Δ in teacher timesteps: one step of the stored fine grid (1000 / (N M))
    slot_weights: list[float] = field(default_factory=list)  # w_n, index n = 0..N-1 (slot ending at t_n); empty = 1
    relative: bool = True
    absolute: bool = True
    discriminator: bool = True
    distance: str = "pseudo_huber"  # or "l1" (SFD's code), "l2"
    gan_loss: str = "hinge"  # "hinge" (PCM, the paper) or "relativistic" (paired, RpGAN)
    relative_weight: float = 1.0  # weight of the relative terms (eq. 15) against the absolute ones
    d1: bool = True  # the relative discriminator D1 (eq. 15); off: its head set is not trained or used
    slot_sum: bool = False  # the discriminator loss summed over the slots (Alg. 2 line 18) instead of their mean
    d2: bool = True  # the absolute discriminator D2 (eq. 17)
    independent_noise: bool = False  # the discriminator step renoises each fake and each real with its own noise (PCM)
    _warned: bool = field(default=False, init=False, repr=False, compare=False)  # DeltaStepWarning is said once

    @classmethod
    def from_config(cls, config, delta: int, preset: dict) -> "RAPM":
        """The loss object for a run's resolved ``config``, Δ = ``delta``, and the switches of the ``preset``
        (``relative``, ``absolute``, ``discriminator``); relative weight 0 switches the relative terms (and D1) off,
        unless they are the only ones."""
        switches = {k: preset.get(k, getattr(cls, k)) for k in ("relative", "absolute", "discriminator")}
        switches["relative"] = switches["relative"] and (config.relative_weight > 0 or not switches["absolute"])
        own = dict(huber_c=config.huber_c, adv_weight=config.adv_weight, delta=delta, slot_weights=config.slot_weights,
                   gan_loss=config.gan_loss, relative_weight=config.relative_weight, distance=config.distance,
                   updates=config.updates, ema_decay=config.ema_decay, ema_warmup=config.ema_warmup,
                   d1=config.disc_relative, d2=config.disc_absolute, relational=relational_settings(config))
        if switches["discriminator"]:  # the discriminator step's settings
            independent = config.disc_renoise == "independent"
            if independent and config.gan_loss == "relativistic":
                raise ConfigError("config field 'disc_renoise': independent noise unpairs a fake from its real, and the "
                                  "relativistic loss compares the two at the same noise; set gan_loss=hinge (PCM's, with "
                                  "which its code renoises independently), or disc_renoise=shared")
            own.update(slot_sum=config.disc_slot_reduction == "sum", independent_noise=independent)
        return cls(**own, **switches)

    @property
    def uses_discriminator(self) -> bool:
        return self.discriminator and self.adv_weight > 0 and bool(self.gan_kinds)

    @property
    def gan_kinds(self) -> list[str]:
        """The discriminators in use: "relative" (D1) and/or "absolute" (D2)."""
        return [k for k, on in (("relative", self.relative and self.d1), ("absolute", self.absolute and self.d2)) if on]

    def distance_fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.distance == "pseudo_huber":
            return pseudo_huber(a, b, self.huber_c)
        if self.distance == "l1":
            return (a.float() - b.float()).abs().mean()
        return (a.float() - b.float()).square().mean()

    @property
    def term(self) -> str:
        """The log name of the position-matching terms."""
        return {"pseudo_huber": "huber"}.get(self.distance, self.distance)

    def weight(self, n: int) -> float:
        return self.slot_weights[n] if self.slot_weights else 1.0

    def relative_positions(self, ctx: Context, batch: TrajectoryBatch) -> torch.Tensor:
        """rel_n for every slot, batched over slots (decision 2): the stored (or one computed) teacher Δ-step, then one
        frozen-student forward. [B, N, ...]

        Computed once per iteration: a discriminator update changes neither the teacher nor the student, so the
        student update after it on the same trajectory reuses them.
        """
        key = ("relative_positions", id(batch))
        if key not in ctx.cache:
            ctx.cache[key] = self._relative_positions(ctx, batch)
        return ctx.cache[key]

    @torch.no_grad()
    def _relative_positions(self, ctx: Context, batch: TrajectoryBatch) -> torch.Tensor:
        """The teacher's Δ-step from the store when it holds this Δ (decision 8: no teacher pass), else one teacher
        forward; then one frozen-student forward."""
        b, n = batch.latents.shape[0], ctx.steps
        starts = batch.latents[:, :n].flatten(0, 1)  # z~_{n+1} for every slot, sample-major
        t, s = slot_times(ctx, b, starts.device)
        mid = t - self.delta  # Alg. 2, line 8: the teacher's Δ-step ...
        cond = batch.cond.repeat(n)
        if batch.delta_latents is not None and batch.delta == self.delta:
            z_mid = batch.delta_latents.flatten(0, 1)
        else:
            self._say_delta_step_is_computed(batch)
            uncond = batch.uncond.repeat(n) if batch.uncond is not None else None
            z_mid = teacher_step(ctx, starts, t, mid, cond, uncond)
        with ctx.frozen_student() if ctx.frozen_student is not None else nullcontext():  # relative_target "ema"
            rel = student_step(ctx, z_mid, mid, s, cond)  # ... then the frozen student to t_n (line 9)
        return rel.unflatten(0, (b, n))

    def kind_weight(self, kind: str, slot: int) -> float:
        """The weight of a discriminator's terms: the relative one's, or w_n for the absolute one."""
        return self.relative_weight if kind == "relative" else self.weight(slot)

    @staticmethod
    def _paired_logits(ctx: Context, groups: list[torch.Tensor], s: torch.Tensor, t_gan: torch.Tensor,
                       noise: torch.Tensor, cond, independent: bool = False) -> list[dict[str, list[torch.Tensor]]]:
        """Each group (rows at the slot ends ``s``) moved to ``t_gan`` with the same ``noise``, all in one backbone pass
        (decision 2): the logits of every group, head by head, so group k's row i pairs with every other group's.
        ``independent``: the first group takes ``noise``, every other group fresh noise of its own (PCM's code)."""
        m, rows = len(groups), len(s)
        noises = [noise] + [ctx.randn(noise) if independent else noise for _ in groups[1:]]
        x = renoise(ctx, torch.cat(groups), s.repeat(m), t_gan.repeat(m), torch.cat(noises))
        logits = ctx.discriminator.logits(ctx.unet, x, t_gan.repeat(m), type(cond).cat([cond] * m))
        return [{kind: [h[i * rows:(i + 1) * rows] for h in heads] for kind, heads in logits.items()} for i in range(m)]

    @torch.no_grad()
    def _real_logits(self, ctx: Context, batch: TrajectoryBatch, reals: dict, s: torch.Tensor, t_gan: torch.Tensor,
                     noise: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """The paired reals' logits for the relativistic generator loss (no gradient; one batched backbone pass)."""
        if self.gan_loss != "relativistic":
            return {}
        kinds = self.gan_kinds
        groups = self._paired_logits(ctx, [reals[k] for k in kinds], s, t_gan, noise, batch.cond)
        return {k: groups[i][k] for i, k in enumerate(kinds)}

    def _say_delta_step_is_computed(self, batch: TrajectoryBatch) -> None:
        if self._warned:
            return
        self._warned = True
        if batch.delta_latents is None:
            why = ("the trajectory store holds no Δ-step positions (format_version 1 in its manifest.json); rebuild it "
                   "with this rapm's `rapm trajectories` to keep the teacher out of training")
        else:
            why = (f"Δ = {self.delta} is not the store's Δ = {batch.delta} (manifest.json field 'delta'); leave config "
                   f"field 'delta' at 0 to train with the stored Δ-steps")
        warnings.warn(f"{why}. Until then every iteration computes the teacher's Δ-step (Alg. 2, line 8): "
                      "one guided teacher forward over all slots", DeltaStepWarning, stacklevel=4)

    def generator_losses(self, ctx: Context, batch: TrajectoryBatch) -> Losses:
        b, n = batch.latents.shape[0], ctx.steps
        rel = self.relative_positions(ctx, batch) if self.relative else None
        z = batch.latents[:, 0]  # z_N = z~_N: the student starts from the trajectory's noise
        for j in range(n):  # slot from t_{n+1} = timesteps[j] to t_n = timesteps[j+1]
            slot = n - 1 - j  # the paper's n
            t = torch.full((b,), ctx.timesteps[j], device=z.device)
            s = torch.full((b,), ctx.timesteps[j + 1], device=z.device)
            z_n = student_step(ctx, z, t, s, batch.cond)  # line 11 (eq. 11), with gradients
            target = batch.latents[:, j + 1]  # z~_n
            loss = z_n.new_zeros(())
            logs: dict[str, float] = {}
            if self.relative:
                h = self.distance_fn(z_n, rel[:, j])  # eq. 15's H (line 12)
                loss = loss + self.relative_weight * h
                logs[f"{self.term}_rel/{slot}"] = h.item()
            if self.absolute:
                h = self.distance_fn(z_n, target)  # eq. 17's H (line 14)
                loss = loss + self.weight(slot) * h
                logs[f"{self.term}_abs/{slot}"] = h.item()
            if self.rdd is not None and slot == 0:  # RDD's relational loss on the end point z_0 (rapm/methods/rdd.py)
                r, r_logs = self.rdd(ctx, z_n, target, batch.cond)
                loss = loss + self.rdd.weight * r
                logs.update(r_logs)
            if self.uses_discriminator:
                t_gan = discriminator_timesteps(ctx, s)
                noise = ctx.randn(z_n)
                logits = ctx.discriminator.logits(ctx.unet, renoise(ctx, z_n, s, t_gan, noise), t_gan, batch.cond)
                real_logits = self._real_logits(ctx, batch, {"relative": rel[:, j] if self.relative else None,
                                                             "absolute": target}, s, t_gan, noise)
                for kind in self.gan_kinds:
                    if self.gan_loss == "relativistic":
                        g = relativistic_generator_loss(logits[kind], real_logits[kind])
                    else:
                        g = hinge_generator_loss(logits[kind])  # eqs. 15, 17
                    loss = loss + self.adv_weight * self.kind_weight(kind, slot) * g
                    logs[f"gen_{kind[:3]}/{slot}"] = g.item()
            logs[f"loss/{slot}"] = loss.item()
            yield loss, logs
            z = z_n.detach()  # slots are decoupled (§3.3)

    def discriminator_losses(self, ctx: Context, batch: TrajectoryBatch) -> Losses:
        b, n = batch.latents.shape[0], ctx.steps
        fake = student_trajectory(ctx, batch.latents[:, 0], batch.cond)  # [B, N, ...], no grad
        reals = {}
        if "relative" in self.gan_kinds:
            reals["relative"] = self.relative_positions(ctx, batch)
        if "absolute" in self.gan_kinds:
            reals["absolute"] = batch.latents[:, 1:]
        kinds = list(reals)
        _, s = slot_times(ctx, b, fake.device)
        t_gan = discriminator_timesteps(ctx, s)
        noise = ctx.randn(fake.flatten(0, 1))
        # One backbone pass over fakes and all reals (decision 2); each moved to t_gan with the same noise (or, with
        # independent_noise, each with its own, as PCM's code draws it).
        groups = self._paired_logits(ctx, [fake.flatten(0, 1)] + [reals[k].flatten(0, 1) for k in kinds], s, t_gan,
                                     noise, batch.cond.repeat(n), self.independent_noise)
        loss = fake.new_zeros((), dtype=torch.float32)
        logs: dict[str, float] = {}
        slot_of_row = torch.arange(b * n, device=fake.device) % n  # sample-major rows: row = b * N + j
        for i, kind in enumerate(kinds):
            fake_logits, real_logits = groups[0][kind], groups[i + 1][kind]
            for j in range(n):
                slot = n - 1 - j
                sel = slot_of_row == j
                f, r = [h[sel] for h in fake_logits], [h[sel] for h in real_logits]
                if self.gan_loss == "relativistic":
                    d = relativistic_discriminator_loss(f, r)
                else:
                    d = hinge_discriminator_loss(f, r)
                loss = loss + self.kind_weight(kind, slot) * (d if self.slot_sum else d / n)
                logs[f"disc_{kind[:3]}/{slot}"] = d.item()
                logs[f"disc_acc_{kind[:3]}/{slot}"] = pair_accuracy(f, r)
        yield loss, logs
