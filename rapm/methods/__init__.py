"""Distillation methods: one loss object each, with the same call signature (see ``base.Method``)."""

from __future__ import annotations

from rapm.config import ConfigError, TrainConfig
from rapm.methods.base import Context, Method, TrajectoryBatch, pseudo_huber
from rapm.methods.rapm import RAPM

METHODS = ("rapm", "rapm-relative", "sfd")


def build_method(config: TrainConfig, delta: int) -> Method:
    """The loss object for ``config.method``; ``delta`` is Δ in teacher timesteps."""
    common = dict(huber_c=config.huber_c, adv_weight=config.adv_weight, delta=delta, slot_weights=config.slot_weights)
    if config.method == "rapm":
        return RAPM(**common)
    if config.method == "rapm-relative":  # eq. 16 alone: the ablation of paper Fig. 3
        return RAPM(**common, absolute=False)
    if config.method == "sfd":
        # SFD (Zhou et al. 2024; paper Alg. 3): the absolute position alone, L1 as SFD's code, no discriminator.
        # SFD steps its optimizer once per slot; here the slots' gradients are summed into one step per iteration.
        return RAPM(**common, relative=False, discriminator=False, distance="l1")
    raise ConfigError(f"config field 'method': {config.method!r} is not one of {', '.join(METHODS)}")


__all__ = ["Context", "Method", "TrajectoryBatch", "RAPM", "build_method", "pseudo_huber", "METHODS"]
