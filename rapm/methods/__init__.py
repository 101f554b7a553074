"""Distillation methods: one loss object each, with the same call signature (see ``base.Method``), and the one
registry (``REGISTRY``) that says, per method, how it is built, the values it takes where the config leaves a field
to the method, whether it applies to a flow-matching teacher and whether it takes RDD's relational term: the loop,
the CLI and the validation read these, and test no method's name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from rapm.config import ConfigError, TrainConfig
from rapm.methods.base import Method
from rapm.methods.pcm import PCM
from rapm.methods.progressive import Progressive
from rapm.methods.rapm import RAPM
from rapm.methods.rdd import relational_settings
from rapm.methods.sfd import build_sfd
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


NO_EMA = dict(ema_decay=0.0, ema_warmup=False)  # the EMA is the default recipe's; the paper and the peers train without


def method_info(name: str) -> "MethodInfo":
    info = REGISTRY.get(name)
    if info is None:
        raise ConfigError(f"config field 'method': {name!r} is not one of {', '.join(METHODS)}")
    return info


def recipe_of(config: TrainConfig) -> dict:
    """The method's settings where the config leaves them to the method ("" or a negative weight)."""
    own = method_info(config.method).recipe
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


def _rapm(config: TrainConfig, recipe: dict, delta: int) -> Method:
    # relative weight 0: the relative terms (and D1, weighted by it) are not computed at all
    return RAPM.from_config(config, recipe, delta, relative=recipe["relative_weight"] > 0,
                            distance=config.distance or "pseudo_huber")


def _rapm_relative(config: TrainConfig, recipe: dict, delta: int) -> Method:
    """Eq. 16 alone: the ablation of paper Fig. 3."""
    return RAPM.from_config(config, recipe, delta, absolute=False, distance=config.distance or "pseudo_huber")


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


@dataclass(frozen=True)
class MethodInfo:
    """What rapm knows of one method, in one place."""

    build: Callable[[TrainConfig, dict, int], Method]  # factory(config, recipe, delta): the loss object
    recipe: dict  # its values of the fields the config leaves to the method (RAPM_RECIPE's keys)
    flow: str | None = None  # None: applies to a flow-matching teacher; else why it does not
    takes_rdd: bool = True  # whether RDD's relational term (rdd_weight) can be added to it


_GRIDS = "its rounds halve integer DDIM grids of a DDPM schedule and it needs its own teacher targets"
REGISTRY: dict[str, MethodInfo] = {
    "rapm": MethodInfo(_rapm, RAPM_RECIPE),
    "rapm-paper": MethodInfo(_rapm, {**PAPER_RECIPE, **NO_EMA}),
    "rapm-relative": MethodInfo(_rapm_relative, {**RAPM_RECIPE, **NO_EMA, "relative_weight": 1.0}),  # its only term
    "sfd": MethodInfo(build_sfd, {**RAPM_RECIPE, **NO_EMA}),
    "pcm": MethodInfo(_pcm, {**PAPER_RECIPE, **NO_EMA}, takes_rdd=False,
                      flow="it trains on real images through a DDPM forward process (config field 'real_data') and its "
                           "phase grid"),
    "progressive": MethodInfo(_progressive, {**RAPM_RECIPE, **NO_EMA}, flow=_GRIDS),
    "progressive-rdd": MethodInfo(_progressive, {**RAPM_RECIPE, **NO_EMA}, flow=_GRIDS),
}
METHODS = tuple(REGISTRY)
FACTORIES = {name: info.build for name, info in REGISTRY.items()}  # name -> factory(config, recipe, delta)
FLOW_METHODS = tuple(name for name, info in REGISTRY.items() if info.flow is None)
RDD_METHODS = tuple(name for name, info in REGISTRY.items() if info.takes_rdd)


def build_method(config: TrainConfig, delta: int) -> Method:
    """The loss object for ``config.method``; ``delta`` is Δ in teacher timesteps."""
    info = method_info(config.method)
    if config.rdd_weight > 0 and not info.takes_rdd:
        raise ConfigError(f"config field 'rdd_weight': --method {config.method} does not take RDD's relational loss "
                          f"(these do: {', '.join(RDD_METHODS)}); set rdd_weight=0")
    return info.build(config, recipe_of(config), delta)


__all__ = ["build_method", "METHODS", "FACTORIES", "updates_of", "recipe_of", "with_recipe", "ema_of", "RAPM_RECIPE",
           "PAPER_RECIPE", "REGISTRY", "MethodInfo", "method_info", "FLOW_METHODS", "RDD_METHODS"]
