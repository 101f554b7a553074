"""The roles of the one UNet (docs/design.md, decision 1).

Teacher, student, frozen student and discriminator backbone are one diffusers
UNet with two peft LoRA adapters:

* teacher: adapters disabled, exactly the unadapted UNet;
* student: adapter ``student`` active (under ``torch.no_grad()`` it is the frozen student);
* discriminator backbone: adapter ``discriminator`` active.

peft's ``set_adapter`` flips ``requires_grad`` on the adapters it (de)activates, so
which parameters train is set here explicitly by ``set_trainable`` and never
inferred from the active adapter; optimizers are built from ``lora_parameters``.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

STUDENT = "student"
DISCRIMINATOR = "discriminator"

# PCM's LoRA targets (docs/references.md), used for the student and the discriminator backbone; the SD families' own
# (a flow family's are in rapm.families.flow).
PCM_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]

def peft_targets(targets) -> list[str] | str:
    """peft's ``target_modules`` for rapm's target names: a module path suffix each, matched as peft matches a list
    (the module's path equals it or ends in "." + it); an entry with ``*`` (one path component, any name:
    ``single_transformer_blocks.*.proj_out``) turns the list into the one regular expression peft fully matches."""
    targets = list(targets)
    if not any("*" in t for t in targets):
        return targets
    alternatives = "|".join(re.escape(t).replace(r"\*", r"[^.]+") for t in targets)
    return rf"(?:.*\.)?(?:{alternatives})"


def matches_target(name: str, targets) -> bool:
    """Whether a module path is a LoRA target for ``targets`` (rapm's names, ``peft_targets``' matching)."""
    pattern = peft_targets(targets)
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == t or name.endswith("." + t) for t in pattern)


@dataclass
class LoraSpec:
    """One LoRA adapter: rank, alpha (peft's lora_alpha) and the module names it targets."""

    rank: int = 64
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: list(PCM_TARGET_MODULES))

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, target_modules=peft_targets(self.target_modules)
        )


def add_roles(unet: torch.nn.Module, student: LoraSpec, discriminator: LoraSpec | None = None) -> None:
    """Add the ``student`` (and optionally ``discriminator``) adapters to the teacher's UNet, in place.

    The student adapter starts at zero (LoRA B = 0), so the student begins as the teacher.
    """
    unet.requires_grad_(False)
    if discriminator is not None:
        _inject(unet, discriminator, DISCRIMINATOR)
    _inject(unet, student, STUDENT)
    unet.set_adapter(STUDENT)
    unet._rapm_lora_layers = None
    set_trainable(unet, None)


def add_frozen_adapter(unet: torch.nn.Module, name: str, spec: LoraSpec) -> None:
    """One more adapter beside the roles (float32, never trained; once): progressive distillation's last-round student.

    Which adapter is active and which parameters train stay as they were (diffusers' add_adapter changes both).
    """
    if name in getattr(unet, "peft_config", {}):
        return
    state = _get_state(unet)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    _inject(unet, spec, name)
    for p in lora_parameters(unet, name).values():
        p.data = p.data.float()
    for n, p in unet.named_parameters():
        p.requires_grad_(n in trainable)
    _set_state(unet, state)


def _inject(unet: torch.nn.Module, spec: LoraSpec, name: str) -> None:
    with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the design
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        unet.add_adapter(spec.peft_config(), adapter_name=name)


def lora_parameters(unet: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The named LoRA parameters of one adapter (peft names them ``...lora_A.<adapter>.weight``)."""
    tag = f".{adapter}."
    return {n: p for n, p in unet.named_parameters() if ("lora_A" in n or "lora_B" in n) and tag in n}


def set_trainable(unet: torch.nn.Module, adapter: str | None) -> None:
    """Make exactly one adapter's LoRA parameters require grad (none when ``adapter`` is None)."""
    for name, p in unet.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.requires_grad_(adapter is not None and f".{adapter}." in name)


def _lora_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's tuner layers in the UNet, cached until the set of adapters changes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(sorted(getattr(unet, "peft_config", {}) or {}))
    cached = getattr(unet, "_rapm_lora_layers", None)
    if cached is None or cached[0] != key:
        cached = (key, [m for m in unet.modules() if isinstance(m, BaseTunerLayer)])
        unet._rapm_lora_layers = cached
    return cached[1]


# Roles switch by setting each tuner layer's active adapter and disabled flag directly: the same state that
# peft's set_adapter / enable_adapters set, without their requires_grad flips and without a pass over every
# parameter, so a switch costs microseconds per layer (it happens several times an iteration).
def _get_state(unet: torch.nn.Module) -> tuple[bool, list[str]] | None:
    layers = _lora_layers(unet)
    if not layers:
        return None
    first = layers[0]
    active = first._active_adapter
    return bool(first._disable_adapters), [active] if isinstance(active, str) else list(active)


def _set_state(unet: torch.nn.Module, state: tuple[bool, list[str]] | None) -> None:
    if state is None:
        return
    disabled, active = state
    for layer in _lora_layers(unet):
        layer._disable_adapters = disabled
        layer._active_adapter = list(active)


def activate(unet: torch.nn.Module, adapter: str) -> None:
    """Make ``adapter`` the active one (adapters enabled) without touching which parameters train."""
    _set_state(unet, (False, [adapter]))


@contextmanager
def _role(unet: torch.nn.Module, state: tuple[bool, list[str]]) -> Iterator[torch.nn.Module]:
    previous = _get_state(unet)
    if previous is None:
        raise ValueError("the UNet carries no LoRA adapters: add them with rapm.roles.add_roles")
    _set_state(unet, state)
    try:
        yield unet
    finally:
        _set_state(unet, previous)


@contextmanager
def teacher_role(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The teacher: all adapters disabled, the exact unadapted UNet (a UNet without adapters is the teacher)."""
    state = _get_state(unet)
    if state is None:
        yield unet
        return
    with _role(unet, (True, state[1])):
        yield unet


def adapter_role(unet: torch.nn.Module, adapter: str):
    """Run the UNet with one adapter active (student or discriminator backbone); restores the previous state."""
    return _role(unet, (False, [adapter]))


def student_role(unet: torch.nn.Module):
    return adapter_role(unet, STUDENT)


def discriminator_role(unet: torch.nn.Module):
    return adapter_role(unet, DISCRIMINATOR)


def enable_gradient_checkpointing(unet: torch.nn.Module) -> None:
    """diffusers' gradient checkpointing, made role-aware.

    The recompute of a checkpointed block runs during ``backward()``, after the role's context manager has exited
    (one backward covers the student step and the discriminator pass of a slot). Plain checkpointing would recompute
    every block under whatever adapter is active then: wrong gradients, or a shape error when the ranks differ. Here
    each checkpoint records the adapter state of its forward and restores it for its recompute.
    """
    from contextlib import nullcontext

    from torch.utils.checkpoint import checkpoint

    def checkpoint_in_role(function, *args):
        state = _get_state(unet)  # the role of this forward, restored around its recompute
        return checkpoint(function, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), _role(unet, state)))

    unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_in_role)
