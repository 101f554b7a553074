"""One UNet, many roles: teacher (adapters off), student and discriminator adapters, no second copy."""

import pytest
import torch

from rapm.roles import (DISCRIMINATOR, STUDENT, LoraSpec, add_roles, discriminator_role, lora_parameters,
                        set_trainable, student_role, teacher_role)
from rapm.teacher import load_teacher


@pytest.fixture()
def teacher(tiny_sd):
    return load_teacher(tiny_sd)


def _perturb(params):
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.1)


def test_teacher_role_is_exactly_the_unadapted_unet(teacher):
    cond, _ = teacher.encode_prompts(["a photo of a cat"])
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([600])
    before = teacher.unet_output(z, t, cond)
    add_roles(teacher.unet, LoraSpec(rank=4, alpha=4), LoraSpec(rank=2, alpha=2))
    _perturb(lora_parameters(teacher.unet, STUDENT))
    _perturb(lora_parameters(teacher.unet, DISCRIMINATOR))
    with teacher_role(teacher.unet):
        assert torch.equal(teacher.unet_output(z, t, cond), before)
    with student_role(teacher.unet):
        student = teacher.unet_output(z, t, cond)
    with discriminator_role(teacher.unet):
        disc = teacher.unet_output(z, t, cond)
    assert not torch.allclose(student, before) and not torch.allclose(disc, before)
    assert not torch.allclose(student, disc)


def test_student_starts_as_the_teacher(teacher):
    cond, _ = teacher.encode_prompts(["a red car"])
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    before = teacher.unet_output(z, t, cond)
    add_roles(teacher.unet, LoraSpec(rank=4, alpha=8))
    with student_role(teacher.unet):
        torch.testing.assert_close(teacher.unet_output(z, t, cond), before)


def test_student_gradients_reach_only_the_student_lora(teacher):
    add_roles(teacher.unet, LoraSpec(rank=4, alpha=4), LoraSpec(rank=2, alpha=2))
    _perturb(lora_parameters(teacher.unet, STUDENT))
    cond, _ = teacher.encode_prompts(["a photo of a dog"])
    set_trainable(teacher.unet, STUDENT)
    with student_role(teacher.unet):
        teacher.unet_output(torch.randn(1, 4, 8, 8), torch.tensor([500]), cond).square().mean().backward()
    student = set(lora_parameters(teacher.unet, STUDENT))
    with_grad = {n for n, p in teacher.unet.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= student
    assert any(p.grad.abs().sum() > 0 for n, p in teacher.unet.named_parameters() if n in with_grad)


def test_switching_roles_keeps_which_parameters_train(teacher):
    add_roles(teacher.unet, LoraSpec(rank=4, alpha=4), LoraSpec(rank=2, alpha=2))
    set_trainable(teacher.unet, STUDENT)
    with discriminator_role(teacher.unet):
        pass
    with teacher_role(teacher.unet):
        pass
    trainable = {n for n, p in teacher.unet.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(teacher.unet, STUDENT))


def test_no_second_copy_of_the_unet(teacher):
    unet = teacher.unet
    base = {n: (p.data_ptr(), p.numel()) for n, p in unet.named_parameters()}
    base_count = sum(n for _, n in base.values())
    add_roles(unet, LoraSpec(rank=4, alpha=4), LoraSpec(rank=2, alpha=2))
    lora = {**lora_parameters(unet, STUDENT), **lora_parameters(unet, DISCRIMINATOR)}
    total = sum(p.numel() for p in unet.parameters())
    assert total == base_count + sum(p.numel() for p in lora.values())
    # The base weights are the same storage as before (peft wraps them; names gain a base_layer).
    ptrs_after = {p.data_ptr() for n, p in unet.named_parameters() if n not in lora}
    assert ptrs_after == {ptr for ptr, _ in base.values()}
    assert len({p.data_ptr() for p in unet.parameters()}) == len(list(unet.parameters()))
