"""Validation during training (docs/design.md decision 11): the student's trajectory error on held-out trajectories.

A seeded share of the store (``val_fraction``) is held out and never trained on. Every ``eval_every`` iterations the
student runs its N steps from each held-out trajectory's noise z~_N, and the run logs

* ``val_trajectory_error``: the mean over samples of the RMS distance between the student's end point and the stored
  teacher end point z~_0 (the N·M-step DDIM the student was trained on): in image space for a pixel-space teacher
  (digits), in latent space for a teacher with a VAE (so training needs no VAE in memory);
* ``val_slot_error/<n>``: the RMS distance, in latent space, of the student's position z_n to the stored z~_n;
* ``val_reference_error`` (``val_reference_steps`` > 0): the same against the teacher's K-step DDIM from the same noise;
* for a teacher whose plug-in has metrics (digits, scenes), ``val_fd_teacher`` (Fréchet distance in its classifier's
  features to the teacher's images of the same prompts and noise: fidelity to the teacher), ``val_fd_real`` (to its
  real reference set) and ``val_prompt_accuracy``; with ``val_reference_steps`` > 0 also the distribution metrics
  against the teacher's K-step images of the same prompts from *other* noise (rapm.distribution):
  ``val_fd_teacher_other``, ``val_precision``, ``val_recall``, ``val_coverage`` and ``val_sharpness`` (high-frequency
  energy, the student's over the teacher's). On a few dozen samples the FDs are biased upward and precision / recall
  are coarse: compare runs at the same split only.

This is the curve of the paper's Fig. 5: the user sees when a run has converged or diverged.
"""

from __future__ import annotations

import torch

from rapm.diffusion import ddim
from rapm.distribution import against_other_noise
from rapm.methods.base import Context, student_trajectory
from rapm.roles import teacher_role
from rapm.plugins import plugin_for
from rapm.teacher import guided_output


OTHER_NOISE_SEED = 7_919  # the teacher's reference images from other noise: the distribution metrics' reference


class ValidationWarning(UserWarning):
    """Validation asked for (eval_every > 0) but off: the store is too small for val_fraction to hold one out."""


def held_out_note(count: int, fraction: float) -> str | None:
    """Why ``split_indices(count, fraction, ...)`` holds none out though ``fraction`` asks for some, and how to get
    validation; None when it holds some out (or ``fraction`` is 0: validation off by choice)."""
    if fraction <= 0 or int(count * fraction) > 0:
        return None
    needed = -(-1000 // count) / 1000  # the least val_fraction, to three decimals, that holds one of count out
    why = (f"validation is off: val_fraction {fraction:g} of the store's {count} trajector"
           f"{'y' if count == 1 else 'ies'} rounds down to 0 held out")
    if needed < 0.5:  # val_fraction must stay below 0.5
        return f"{why}; hold some out with --set val_fraction={needed:g} (or store more trajectories)"
    return f"{why}, and a store of {count} cannot hold one out (val_fraction < 0.5); store 3 or more trajectories"


def split_indices(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) trajectory indices: a seeded ``fraction`` of ``count`` held out (none if it rounds to 0)."""
    held = int(count * fraction)
    if held == 0:
        return list(range(count)), []
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 104_729 + 17)).tolist()
    val = sorted(perm[:held])
    chosen = set(val)
    return [i for i in range(count) if i not in chosen], val


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The per-sample RMS distance [B]."""
    return (a.float() - b.float()).flatten(1).square().mean(1).sqrt()


class Validation:
    """The held-out trajectories of one run, and the metrics of a student on them."""

    def __init__(self, teacher, store, indices: list[int], device, dtype, reference_steps: int = 0, batch: int = 64):
        self.teacher, self.store, self.indices = teacher, store, indices
        self.batches = [store.get(indices[i:i + batch]).to(device, torch.float32) for i in range(0, len(indices), batch)]
        self.teacher_images = self.decode([b.latents[:, -1] for b in self.batches])
        self.reference_images = None
        if reference_steps > 0:
            self.reference_images = self.decode([self.teacher_ddim(b, reference_steps) for b in self.batches])
        self.metrics = None  # the teacher's own image metrics, where its plug-in has them (digits, scenes)
        self.plugin = plugin_for(teacher)
        self.other_images = self.other_features = None
        if self.plugin is not None:
            prompts = store.prompts
            self.metrics = self.plugin.metrics()
            self.labels = [self.plugin.label_of(prompts[i]) for i in indices]
            self.teacher_features = self.metrics.features(self.reference_images if self.reference_images is not None
                                                          else self.teacher_images)
            if reference_steps > 0:  # the distribution metrics' reference: the same prompts from other noise
                gen = torch.Generator().manual_seed(OTHER_NOISE_SEED)
                self.other_images = self.decode([self.teacher_ddim(b, reference_steps, torch.randn(
                    b.latents[:, 0].shape, generator=gen).to(b.latents)) for b in self.batches])
                self.other_features = self.metrics.features(self.other_images)

    def __len__(self) -> int:
        return len(self.indices)

    @torch.no_grad()
    def decode(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """Images for a pixel-space teacher (clamped to [-1, 1]); the latents themselves for a teacher with a VAE."""
        if getattr(self.teacher, "vae", None) is not None:
            return torch.cat([z.float().cpu() for z in latents])
        return torch.cat([self.teacher.decode(z).float().cpu() for z in latents])

    @torch.no_grad()
    def teacher_ddim(self, batch, steps: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's ``steps``-step DDIM from the stored noise (or ``noise``), with the store's guidance."""
        unet = self.teacher.unet

        def model(z, t):
            return guided_output(unet, z, t, batch.cond, batch.uncond, self.store.guidance)

        with teacher_role(unet):
            start = batch.latents[:, 0] if noise is None else noise
            return ddim(model, self.teacher.schedule, start, self.store.timesteps[0], self.store.timesteps[-1], steps)

    @torch.no_grad()
    def __call__(self, unet) -> dict[str, float]:
        """The metrics of the student now in ``unet`` (its student adapter)."""
        n = self.store.steps
        slot_sq = torch.zeros(n)
        student = []
        for b in self.batches:
            ctx = Context(unet, self.teacher.schedule, self.store.timesteps, self.store.guidance, [])
            positions = student_trajectory(ctx, b.latents[:, 0], b.cond)  # [B, N, ...]
            for j in range(n):
                slot_sq[j] += rms(positions[:, j], b.latents[:, j + 1]).square().sum().cpu()
            student.append(positions[:, -1])
        out = self.measure(self.decode(student))
        for j in range(n):
            out[f"val_slot_error/{n - 1 - j}"] = float((slot_sq[j] / len(self)).sqrt())
        return out

    def measure(self, images: torch.Tensor) -> dict[str, float]:
        """The metrics of final images [len(self), ...] (decoded), whoever made them."""
        out = {"val_trajectory_error": float(rms(images, self.teacher_images).mean())}
        if self.reference_images is not None:
            out["val_reference_error"] = float(rms(images, self.reference_images).mean())
        if self.metrics is not None:
            frechet_distance = self.plugin.frechet_distance
            feats = self.metrics.features(images)
            if len(self) >= 2:
                out["val_fd_teacher"] = frechet_distance(feats, self.teacher_features)
                out["val_fd_real"] = frechet_distance(feats, self.metrics.reference_features)
            out["val_prompt_accuracy"] = self.metrics.prompt_accuracy(images, self.labels)
            if self.other_features is not None and len(self) >= 2:
                spread = against_other_noise(self.other_features, feats, self.other_images, images)
                out.update({f"val_{k}": v for k, v in spread.items()})
        return out

