"""Distillation methods: one loss object each (a dataclass: its fields are its settings, with its defaults; see
``base.Method``), and the one registry of the names ``--method`` takes, each a method class and its preset. The
loop, the CLI and the validation read the classes' attributes, and test no method's name.

Adding a method: its file here (a ``Method`` subclass with ``from_config``), one line in ``REGISTRY``, its tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rapm.config import LEFT_TO_METHOD, ConfigError, TrainConfig, left_to_method
from rapm.methods.base import Method
from rapm.methods.pcm import PCM
from rapm.methods.progressive import Progressive
from rapm.methods.rapm import DEFAULT_RECIPE, RAPM, RELATIVE_ONLY
from rapm.methods.rdd import DEFAULT_WEIGHT, TakesRelationalTerm
from rapm.methods.sfd import SFD


@dataclass(frozen=True)
class Entry:
    """One name ``--method`` takes: a method class and the preset its fields start from."""

    cls: type[Method]
    preset: dict = field(default_factory=dict)

    @property
    def takes_rdd(self) -> bool:
        """Whether RDD's relational term (``rdd_weight``) can be added to it."""
        return issubclass(self.cls, TakesRelationalTerm)

    def own(self) -> dict:
        """Its values of the config fields that a run leaves to the method (``rapm.config.LEFT_TO_METHOD``)."""
        return {k: v for k, v in self.cls.own(self.preset).items() if k in LEFT_TO_METHOD}


REGISTRY: dict[str, Entry] = {
    "rapm": Entry(RAPM, DEFAULT_RECIPE),
    "rapm-paper": Entry(RAPM),  # the paper's setting: RAPM's own defaults
    "rapm-relative": Entry(RAPM, RELATIVE_ONLY),
    "sfd": Entry(SFD),
    "pcm": Entry(PCM),
    "progressive": Entry(Progressive),
    "progressive-rdd": Entry(Progressive, {"rdd_weight": DEFAULT_WEIGHT}),
}
METHODS = tuple(REGISTRY)
FLOW_METHODS = tuple(name for name, entry in REGISTRY.items() if entry.cls.flow is None)
RDD_METHODS = tuple(name for name, entry in REGISTRY.items() if entry.takes_rdd)


def method_entry(name: str) -> Entry:
    entry = REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"config field 'method': {name!r} is not one of {', '.join(METHODS)}")
    return entry


def resolve(config: TrainConfig) -> TrainConfig:
    """``config`` with the method's own values written into the fields it leaves to the method: what a run records
    in its config.json, so that a resume trains on with the settings it started with. Resolving twice changes
    nothing."""
    own = method_entry(config.method).own()
    return dataclasses.replace(config, **{k: v for k, v in own.items() if left_to_method(config, k)})


def build_method(config: TrainConfig, delta: int) -> Method:
    """The loss object for ``config.method``; ``delta`` is Δ in teacher timesteps."""
    entry = method_entry(config.method)
    config = resolve(config)
    if config.rdd_weight > 0 and not entry.takes_rdd:
        raise ConfigError(f"config field 'rdd_weight': --method {config.method} does not take RDD's relational loss "
                          f"(these do: {', '.join(RDD_METHODS)}); set rdd_weight=0")
    return entry.cls.from_config(config, delta, entry.preset)


__all__ = ["build_method", "resolve", "METHODS", "REGISTRY", "Entry", "method_entry", "FLOW_METHODS", "RDD_METHODS"]
