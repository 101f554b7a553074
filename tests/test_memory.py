"""Memory options: gradient checkpointing with the adapters, 8-bit Adam, no text encoders while training, one UNet."""

import sys

import pytest
import torch

from rapm.config import ConfigError, TrainConfig, apply_overrides
from rapm.methods import build_method
from rapm.methods.base import Context
from rapm.models import build_models, make_optimizer
from rapm.roles import DISCRIMINATOR, STUDENT, lora_parameters, set_trainable
from rapm.store import TrajectoryBatch
from rapm.store import open_store
from rapm.stream import sample_generators

# Both discriminators and the relative terms on (the default recipe leaves the relative terms out)
SMALL = dict(adv_weight=0.1, relative_weight=0.25, lora_rank=4, lora_alpha=4, disc_lora_rank=2, disc_lora_alpha=2, disc_heads_per_level=1, sample_every=0,
             batch_size=2)


def _config(tiny_sd, sd_store, **kw) -> TrainConfig:
    return apply_overrides(TrainConfig(), {"teacher": str(tiny_sd), "store": str(sd_store), **SMALL, **kw}, "test")


def _gradients(config: TrainConfig, sd_store, phase: str) -> dict[str, torch.Tensor]:
    """One iteration's gradients of ``phase``, with the trainer's per-slot backward."""
    torch.manual_seed(0)
    teacher, disc = build_models(config, torch.device("cpu"), need_vae=False, with_discriminator=True)
    with torch.no_grad():  # a student that is not the teacher, so every role gives different features
        for p in lora_parameters(teacher.unet, STUDENT).values():
            p.normal_(0, 0.05)
        for p in lora_parameters(teacher.unet, DISCRIMINATOR).values():
            p.normal_(0, 0.05)
    store = open_store(sd_store)
    b = store.get([0, 1])
    batch = TrajectoryBatch(b.latents, b.cond, b.uncond)
    ctx = Context(teacher.unet, teacher.schedule, store.timesteps, store.guidance, sample_generators(0, [0, 1]), disc)
    method = build_method(config, delta=10)
    adapter = DISCRIMINATOR if phase == "discriminator" else STUDENT
    set_trainable(teacher.unet, adapter)
    disc.requires_grad_(phase == "discriminator")
    losses = method.discriminator_losses if phase == "discriminator" else method.generator_losses
    for loss, _ in losses(ctx, batch):
        loss.backward()
    params = {**lora_parameters(teacher.unet, adapter), **{f"heads.{n}": p for n, p in disc.named_parameters()}}
    return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("phase", ["student", "discriminator"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd, sd_store, phase):
    # The recompute runs during backward, after the roles' context managers have exited: it must still use the
    # adapter (teacher / student / discriminator) that the forward used.
    plain = _gradients(_config(tiny_sd, sd_store), sd_store, phase)
    checkpointed = _gradients(_config(tiny_sd, sd_store, gradient_checkpointing=True), sd_store, phase)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-7, msg=name)


def test_gradient_checkpointing_is_on_in_the_unet(tiny_sd, sd_store):
    teacher, _ = build_models(_config(tiny_sd, sd_store, gradient_checkpointing=True), torch.device("cpu"), False, True)
    assert teacher.unet.is_gradient_checkpointing


def test_8bit_adam_without_bitsandbytes_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="use_8bit_adam.*pip install bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], 1e-3, [0.9, 0.999], 0.0, use_8bit=True)


def test_training_loads_no_text_encoder_and_one_unet(tiny_sd, sd_store):
    from diffusers import UNet2DConditionModel

    teacher, disc = build_models(_config(tiny_sd, sd_store), torch.device("cpu"), need_vae=False, with_discriminator=True)
    assert teacher.text_encoders == [] and teacher.tokenizers == [] and teacher.vae is None
    unets = [m for m in list(teacher.unet.modules()) + list(disc.modules()) if isinstance(m, UNet2DConditionModel)]
    assert unets == [teacher.unet]  # the discriminator holds heads only, not a backbone copy
    base = [p for n, p in teacher.unet.named_parameters() if "lora_" not in n]
    pointers = {p.untyped_storage().data_ptr() for p in base}
    assert len(pointers) == len(base)  # each base weight stored once
    head_pointers = {p.untyped_storage().data_ptr() for p in disc.parameters()}
    assert not head_pointers & pointers
