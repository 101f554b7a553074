"""Distillation methods: one loss object each, with the same call signature (see ``base.Method``)."""

from __future__ import annotations

from rapm.config import ConfigError, TrainConfig
from rapm.methods.base import Context, Method, Setup, TrajectoryBatch, pseudo_huber
from rapm.methods.pcm import PCM
from rapm.methods.progressive import Progressive
from rapm.methods.rapm import RAPM

METHODS = ("rapm", "rapm-paper", "rapm-relative", "sfd", "pcm", "progressive", "progressive-rdd")

# The default RAPM recipe, chosen on the digits convergence benchmark (README "Quality", benchmarks/results/
# convergence.md): the relative terms at a quarter of the absolute ones' weight and no discriminator; switched on
# (`--set adv_weight=0.1`), the discriminators are the paired (relativistic) ones, updated in every iteration before
# the student. The paper's setting (Alg. 2 as written: PCM's unpaired hinge loss, discriminator and student updates
# alternating, every term at weight 1) is `--method rapm-paper`.
RAPM_RECIPE = dict(gan_loss="relativistic", updates="both", adv_weight=0.0, relative_weight=0.25)
PAPER_RECIPE = dict(gan_loss="hinge", updates="alternate", adv_weight=0.1, relative_weight=1.0)


def recipe_of(config: TrainConfig) -> dict:
    """The method's settings where the config leaves them to the method ("" or a negative weight)."""
    own = dict(PAPER_RECIPE if config.method in ("rapm-paper", "pcm") else RAPM_RECIPE)
    if config.method == "rapm-relative":
        own["relative_weight"] = 1.0  # its only position term
    return {"gan_loss": config.gan_loss or own["gan_loss"], "updates": config.updates or own["updates"],
            "adv_weight": config.adv_weight if config.adv_weight >= 0 else own["adv_weight"],
            "relative_weight": config.relative_weight if config.relative_weight >= 0 else own["relative_weight"]}


def updates_of(config: TrainConfig) -> str:
    """How discriminator and student updates share the iterations: the config's, else the method's own."""
    return recipe_of(config)["updates"]


def build_method(config: TrainConfig, delta: int) -> Method:
    """The loss object for ``config.method``; ``delta`` is Δ in teacher timesteps."""
    recipe = recipe_of(config)
    common = dict(huber_c=config.huber_c, adv_weight=recipe["adv_weight"], delta=delta, slot_weights=config.slot_weights,
                  gan_loss=recipe["gan_loss"], relative_weight=recipe["relative_weight"],
                  d1=config.disc_relative, d2=config.disc_absolute)
    if config.method in ("rapm", "rapm-paper"):
        # relative weight 0: the relative terms (and D1, weighted by it) are not computed at all
        return RAPM(**common, relative=recipe["relative_weight"] > 0, distance=config.distance or "pseudo_huber")
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
        return PCM(real_data=real, huber_c=config.huber_c, adv_weight=recipe["adv_weight"])
    if config.method in ("progressive", "progressive-rdd"):  # Salimans & Ho 2022; + RDD's relational loss
        return Progressive(start_steps=config.progressive_start_steps)  # RDD's term: Method.prepare (methods/rdd.py)
    raise ConfigError(f"config field 'method': {config.method!r} is not one of {', '.join(METHODS)}")


__all__ = ["Context", "Method", "Setup", "TrajectoryBatch", "RAPM", "PCM", "Progressive", "build_method", "pseudo_huber", "METHODS",
           "updates_of", "recipe_of", "RAPM_RECIPE", "PAPER_RECIPE"]
