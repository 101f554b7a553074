"""Distillation methods: one loss object each, with the same call signature (see ``base.Method``)."""

from __future__ import annotations

from rapm.config import ConfigError, TrainConfig
from rapm.methods.base import Context, Method, Setup, TrajectoryBatch, pseudo_huber
from rapm.methods.pcm import PCM
from rapm.methods.progressive import Progressive
from rapm.methods.rapm import RAPM

METHODS = ("rapm", "rapm-relative", "sfd", "pcm", "progressive", "progressive-rdd")


def build_method(config: TrainConfig, delta: int) -> Method:
    """The loss object for ``config.method``; ``delta`` is Δ in teacher timesteps."""
    common = dict(huber_c=config.huber_c, adv_weight=config.adv_weight, delta=delta, slot_weights=config.slot_weights)
    if config.method == "rapm":
        return RAPM(**common, distance=config.distance or "pseudo_huber")
    if config.method == "rapm-relative":  # eq. 16 alone: the ablation of paper Fig. 3
        return RAPM(**common, absolute=False, distance=config.distance or "pseudo_huber")
    if config.method == "sfd":
        # SFD (Zhou et al. 2024; paper Alg. 3): the absolute position alone, L1 as SFD's code, no discriminator.
        # SFD steps its optimizer once per slot; here the slots' gradients are summed into one step per iteration.
        return RAPM(**common, relative=False, discriminator=False, distance=config.distance or "l1")
    if config.method == "pcm":  # paper Alg. 1: real data, the relative position from a noised real image
        real = config.real_data or ("digits" if config.teacher == "digits" else "")
        if not real:
            raise ConfigError("config field 'real_data': --method pcm needs real images; set real_data to a folder of "
                              "images with a .txt caption beside each (or 'digits' for the digits teacher)")
        return PCM(real_data=real, huber_c=config.huber_c, adv_weight=config.adv_weight)
    if config.method in ("progressive", "progressive-rdd"):  # Salimans & Ho 2022; + RDD's relational loss
        return Progressive(start_steps=config.progressive_start_steps, rdd_queue_size=config.rdd_queue_size,
                           rdd_weight=config.rdd_weight if config.method == "progressive-rdd" else 0.0)
    raise ConfigError(f"config field 'method': {config.method!r} is not one of {', '.join(METHODS)}")


__all__ = ["Context", "Method", "Setup", "TrajectoryBatch", "RAPM", "PCM", "Progressive", "build_method", "pseudo_huber", "METHODS"]
