"""The trained models: the teacher's one UNet with its adapters (student, discriminator) and the discriminator heads,
their optimizers and learning-rate schedules, and the student's EMA.
"""

from __future__ import annotations

import math
import warnings

import torch

from rapm.config import ConfigError, TrainConfig
from rapm.discriminator import ABSOLUTE_BACKBONE, Discriminator, DiscriminatorSpec
from rapm.quantize import quantize_base
from rapm.roles import (DISCRIMINATOR, STUDENT, LoraSpec, add_frozen_adapter, add_roles, enable_gradient_checkpointing,
                        lora_parameters)
from rapm.teacher import load_teacher


def weight_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if device.type == "cpu" or config.mixed_precision == "no":
        return torch.float32
    return torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16


def student_spec(config: TrainConfig) -> LoraSpec:
    return LoraSpec(config.lora_rank, config.lora_alpha, list(config.lora_targets))


def build_models(config: TrainConfig, device: torch.device, need_vae: bool, with_discriminator: bool):
    """The teacher's one UNet with its adapters, and the discriminator heads on it."""
    quantized = bool(config.base_quantization)  # quantized from a CPU copy, so the device never holds the full base
    teacher = load_teacher(config.teacher, device="cpu" if quantized else device, dtype=weight_dtype(config, device),
                           text_encoders=False, vae=need_vae)
    if quantized:
        quantize_base(teacher.unet, config.base_quantization)
        teacher.unet.to(device)
        if teacher.vae is not None:
            teacher.vae.to(device)
    disc_spec = LoraSpec(config.disc_lora_rank, config.disc_lora_alpha, list(config.lora_targets))
    with warnings.catch_warnings():  # peft on torchao layers: merging is unsupported, and rapm never merges
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
        add_roles(teacher.unet, student_spec(config), disc_spec if (with_discriminator and config.disc_lora) else None)
        separate = with_discriminator and config.disc_lora and config.disc_backbones == "separate"
        if separate:  # D2's backbone LoRA (float32, not trainable until the discriminator's phase: train.run_phase)
            add_frozen_adapter(teacher.unet, ABSOLUTE_BACKBONE, disc_spec)
    for p in list(lora_parameters(teacher.unet, STUDENT).values()) + list(lora_parameters(teacher.unet, DISCRIMINATOR).values()):
        p.data = p.data.float()  # trainable weights stay float32 under mixed precision
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(teacher.unet)  # role-aware: the recompute uses the forward's adapter
    disc = None
    if with_discriminator:
        spec = DiscriminatorSpec(config.disc_levels, config.disc_heads_per_level, config.disc_kernel_size,
                                 config.disc_negative_slope, separate)
        disc = Discriminator(teacher.unet, spec).to(device)
    return teacher, disc


def make_optimizer(params: list[torch.nn.Parameter], lr: float, betas, weight_decay: float, use_8bit: bool):
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("config field 'use_8bit_adam': bitsandbytes is not installed; pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def lr_factor(kind: str, update: int, total: int) -> float:
    """The learning rate's factor at a phase's ``update``-th update of ``total``: "constant" 1; "step" 1, then 0.1 from
    half the updates on (SFD's recipe, docs/references.md); "cosine" from 1 to 0 over the updates."""
    if kind == "step":
        return 1.0 if update < total // 2 else 0.1
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(update, total) / max(total, 1)))
    return 1.0


def lr_schedule(optimizer, kind: str = "constant", total: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over a phase's updates; only its step count is checkpointed, so a resume rebuilds it from the config
    (a resume to a larger --iterations stretches a step or cosine schedule over the new total)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(kind, k, total))


def constant_schedule(optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return lr_schedule(optimizer)


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], decay: float) -> None:
    for name, p in params.items():
        ema[name].mul_(decay).add_(p.detach().float(), alpha=1 - decay)


class swap_in:
    """Temporarily load other values (the EMA) into parameters."""

    def __init__(self, params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor] | None):
        self.params, self.values, self.saved = params, values, None

    def __enter__(self):
        if self.values is not None:
            self.saved = {n: p.detach().clone() for n, p in self.params.items()}
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.values[n])

    def __exit__(self, *exc):
        if self.saved is not None:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.saved[n])


def ema_decay_at(decay: float, warmup: bool, updates_done: int) -> float:
    """The EMA's decay after ``updates_done`` student updates; with warm-up min(decay, (1 + k) / (10 + k))."""
    return min(decay, (1 + updates_done) / (10 + updates_done)) if warmup else decay
