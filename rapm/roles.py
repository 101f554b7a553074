"""The roles of the one UNet (DESIGN.md, decision 1).

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

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

STUDENT = "student"
DISCRIMINATOR = "discriminator"

# PCM's LoRA targets (REFERENCES.md), used for the student and the discriminator backbone.
PCM_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]


@dataclass
class LoraSpec:
    """One LoRA adapter: rank, alpha (peft's lora_alpha) and the module names it targets."""

    rank: int = 64
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: list(PCM_TARGET_MODULES))

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules)
        )


def add_roles(unet: torch.nn.Module, student: LoraSpec, discriminator: LoraSpec | None = None) -> None:
    """Add the ``student`` (and optionally ``discriminator``) adapters to the teacher's UNet, in place.

    The student adapter starts at zero (LoRA B = 0), so the student begins as the teacher.
    """
    unet.requires_grad_(False)
    with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the design
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        if discriminator is not None:
            unet.add_adapter(discriminator.peft_config(), adapter_name=DISCRIMINATOR)
        unet.add_adapter(student.peft_config(), adapter_name=STUDENT)
    unet.set_adapter(STUDENT)
    set_trainable(unet, None)


def lora_parameters(unet: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The named LoRA parameters of one adapter (peft names them ``...lora_A.<adapter>.weight``)."""
    tag = f".{adapter}."
    return {n: p for n, p in unet.named_parameters() if ("lora_A" in n or "lora_B" in n) and tag in n}


def set_trainable(unet: torch.nn.Module, adapter: str | None) -> None:
    """Make exactly one adapter's LoRA parameters require grad (none when ``adapter`` is None)."""
    for name, p in unet.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.requires_grad_(adapter is not None and f".{adapter}." in name)


def _active(unet: torch.nn.Module) -> str | list[str]:
    return unet.active_adapters() if callable(getattr(unet, "active_adapters", None)) else unet.active_adapter


def _keeping_trainable(unet: torch.nn.Module, switch) -> None:
    """Call ``switch()`` (a peft/diffusers adapter switch) and undo the ``requires_grad`` flips it makes."""
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    switch()
    for n, p in unet.named_parameters():
        p.requires_grad_(n in trainable)


def activate(unet: torch.nn.Module, adapter: str) -> None:
    """Make ``adapter`` the active one without disturbing which parameters train."""
    _keeping_trainable(unet, lambda: unet.set_adapter(adapter))


@contextmanager
def teacher_role(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The teacher: all adapters disabled, the exact unadapted UNet."""
    _keeping_trainable(unet, unet.disable_adapters)
    try:
        yield unet
    finally:
        _keeping_trainable(unet, unet.enable_adapters)


@contextmanager
def adapter_role(unet: torch.nn.Module, adapter: str) -> Iterator[torch.nn.Module]:
    """Run the UNet with one adapter active (student or discriminator backbone); restores the previous one."""
    previous = _active(unet)
    previous = previous[0] if isinstance(previous, list) else previous
    if previous != adapter:
        activate(unet, adapter)
    try:
        yield unet
    finally:
        if previous != adapter:
            activate(unet, previous)


def student_role(unet: torch.nn.Module):
    return adapter_role(unet, STUDENT)


def discriminator_role(unet: torch.nn.Module):
    return adapter_role(unet, DISCRIMINATOR)
