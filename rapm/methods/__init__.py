"""Distillation methods: one loss object each, with the same call signature (see ``base.Method``)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from rapm.config import ConfigError, TrainConfig
from rapm.methods.base import Context, Method, Setup, TrajectoryBatch, pseudo_huber
from rapm.methods.pcm import PCM
from rapm.methods.progressive import Progressive
from rapm.methods.rapm import RAPM
from rapm.methods.rdd import relational_settings
from rapm.plugins import plugin_for
from rapm.roles import LoraSpec

# The default RAPM recipe, chosen on the digits convergence benchmark (README "Quality", benchmarks/results/
# convergence.md): the absolute terms alone (relative weight 0: at 3,000 iterations over three seeds and at 10,000 it
# is ahead of the relative terms at 0.25, the default until 2026-12-02, at N = 4 and N = 2; on a store of 50
# trajectories used up many times the 0.25 is ahead at N = 2), no discriminator, and an EMA of the student (0.99
# with the warm-up) as the student that is validated and exported; switched on (`--set adv_weight=0.1`), the
# discriminators are the paired (relativistic) ones, updated in every iteration before the student (D1 needs the
# relative terms: `--set relative_weight=0.25`). The paper's setting (Alg. 2 as written: PCM's unpaired hinge loss,
# discriminator and student updates alternating, every term at weight 1, no EMA) is `--method rapm-paper`. The peers
# keep their own recipes (no EMA).
RAPM_RECIPE = dict(gan_loss="relativistic", updates="both", adv_weight=0.0, relative_weight=0.0, ema_decay=0.99,
                   ema_warmup=True)
PAPER_RECIPE = dict(gan_loss="hinge", updates="alternate", adv_weight=0.1, relative_weight=1.0, ema_decay=0.0,
                    ema_warmup=False)


def recipe_of(config: TrainConfig) -> dict:
    """The method's settings where the config leaves them to the method ("" or a negative weight)."""
    own = dict(PAPER_RECIPE if config.method in ("rapm-paper", "pcm") else RAPM_RECIPE)
    if config.method == "rapm-relative":
        own["relative_weight"] = 1.0  # its only position term
    if config.method != "rapm":  # the EMA is the default recipe's; the paper and the peers train without one
        own["ema_decay"], own["ema_warmup"] = 0.0, False
    ema = (config.ema_decay, config.ema_warmup) if config.ema_decay >= 0 else (own["ema_decay"], own["ema_warmup"])
    return {"gan_loss": config.gan_loss or own["gan_loss"], "updates": config.updates or own["updates"],
            "adv_weight": config.adv_weight if config.adv_weight >= 0 else own["adv_weight"],
            "relative_weight": config.relative_weight if config.relative_weight >= 0 else own["relative_weight"],
            "ema_decay": ema[0], "ema_warmup": ema[1]}


def with_recipe(config: TrainConfig) -> TrainConfig:
    """``config`` with the method's own settings written in: what a run records in its config.json, so that a
    resume trains on with the recipe it started with even where a later rapm changes a method's own."""
    return dataclasses.replace(config, **recipe_of(config))


def ema_of(config: TrainConfig) -> tuple[float, bool]:
    """The student's EMA decay (0 = none) and whether it warms up: the config's, else the method's own."""
    recipe = recipe_of(config)
    return recipe["ema_decay"], recipe["ema_warmup"]


def updates_of(config: TrainConfig) -> str:
    """How discriminator and student updates share the iterations: the config's, else the method's own."""
    return recipe_of(config)["updates"]


def _common(config: TrainConfig, recipe: dict, delta: int) -> dict:
    return dict(huber_c=config.huber_c, adv_weight=recipe["adv_weight"], delta=delta, slot_weights=config.slot_weights,
                gan_loss=recipe["gan_loss"], relative_weight=recipe["relative_weight"], d1=config.disc_relative,
                d2=config.disc_absolute, relational=relational_settings(config))


def _slots(config: TrainConfig, recipe: dict) -> dict:
    independent = config.disc_renoise == "independent"
    if independent and recipe["gan_loss"] == "relativistic":
        raise ConfigError("config field 'disc_renoise': independent noise unpairs a fake from its real, and the "
                          "relativistic loss compares the two at the same noise; set gan_loss=hinge (PCM's, with which "
                          "its code renoises independently), or disc_renoise=shared")
    return dict(slot_sum=config.disc_slot_reduction == "sum", independent_noise=independent)


def _rapm(config: TrainConfig, recipe: dict, delta: int) -> Method:
    # relative weight 0: the relative terms (and D1, weighted by it) are not computed at all
    return RAPM(**_common(config, recipe, delta), **_slots(config, recipe), relative=recipe["relative_weight"] > 0,
                distance=config.distance or "pseudo_huber")


def _rapm_relative(config: TrainConfig, recipe: dict, delta: int) -> Method:
    """Eq. 16 alone: the ablation of paper Fig. 3."""
    return RAPM(**_common(config, recipe, delta), **_slots(config, recipe), absolute=False,
                distance=config.distance or "pseudo_huber")


def _sfd(config: TrainConfig, recipe: dict, delta: int) -> Method:
    """SFD (Zhou et al. 2024; paper Alg. 3): the absolute position alone, L1 as SFD's code, no discriminator.
    SFD steps its optimizer once per slot; here the slots' gradients are summed into one step per iteration."""
    return RAPM(**_common(config, recipe, delta), relative=False, discriminator=False, distance=config.distance or "l1")


def _pcm(config: TrainConfig, recipe: dict, delta: int) -> Method:
    """Paper Alg. 1: real data, the relative position from a noised real image."""
    real = config.real_data or ("digits" if plugin_for(config.teacher) is not None else "")
    if not real:
        raise ConfigError("config field 'real_data': --method pcm needs real images; set real_data to a folder of "
                          "images with a .txt caption beside each (or 'digits' for the digits teacher)")
    return PCM(real_data=real, huber_c=config.huber_c, adv_weight=recipe["adv_weight"], teacher=config.teacher,
               relational=relational_settings(config))


def _progressive(config: TrainConfig, recipe: dict, delta: int) -> Method:
    """Salimans & Ho 2022; progressive-rdd adds RDD's relational loss (methods/rdd.py)."""
    return Progressive(start_steps=config.progressive_start_steps, iterations=config.iterations,
                       lora=LoraSpec(config.lora_rank, config.lora_alpha, list(config.lora_targets)),
                       relational=relational_settings(config))


# name -> factory(config, recipe, delta): each method gets what it needs of the config in its constructor
FACTORIES: dict[str, Callable[[TrainConfig, dict, int], Method]] = {
    "rapm": _rapm, "rapm-paper": _rapm, "rapm-relative": _rapm_relative, "sfd": _sfd, "pcm": _pcm,
    "progressive": _progressive, "progressive-rdd": _progressive,
}
METHODS = tuple(FACTORIES)


def build_method(config: TrainConfig, delta: int) -> Method:
    """The loss object for ``config.method``; ``delta`` is Δ in teacher timesteps."""
    factory = FACTORIES.get(config.method)
    if factory is None:
        raise ConfigError(f"config field 'method': {config.method!r} is not one of {', '.join(METHODS)}")
    return factory(config, recipe_of(config), delta)


__all__ = ["Context", "Method", "Setup", "TrajectoryBatch", "RAPM", "PCM", "Progressive", "build_method", "pseudo_huber", "METHODS", "FACTORIES",
           "updates_of", "recipe_of", "with_recipe", "ema_of", "RAPM_RECIPE", "PAPER_RECIPE"]
