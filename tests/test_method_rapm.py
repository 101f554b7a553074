"""RAPM's loss (Alg. 2): the detaches hold, the teacher is the unadapted UNet, D sees fakes and both reals."""

import pytest
import torch

from rapm.diffusion import coarse_timesteps, ddim_step
from rapm.discriminator import Discriminator, DiscriminatorSpec
from rapm.methods.base import Context, pseudo_huber
from rapm.methods.base import student_step, student_trajectory
from rapm.methods.rapm import RAPM
from rapm.roles import DISCRIMINATOR, STUDENT, LoraSpec, add_roles, lora_parameters, set_trainable
from rapm.store import TrajectoryBatch
from rapm.teacher import guided_output, load_teacher


def _setup(path, levels="full"):
    teacher = load_teacher(path)
    cond, uncond = teacher.encode_prompts(["a photo of a cat", "a red car"])
    plain = load_teacher(path, text_encoders=False).unet  # a separate, never-adapted copy, for reference only
    add_roles(teacher.unet, LoraSpec(4, 4), LoraSpec(2, 2))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(teacher.unet, STUDENT).values():
            p.add_(torch.randn_like(p) * 0.05)
    disc = Discriminator(teacher.unet, DiscriminatorSpec(levels, 2, 3))
    batch = TrajectoryBatch(torch.randn(2, 5, 4, 8, 8), cond, uncond)
    ctx = Context(teacher.unet, teacher.schedule, coarse_timesteps(1000, 4), 3.0,
                  [torch.Generator().manual_seed(i) for i in range(2)], disc)
    return teacher, plain, ctx, batch


def _grads(unet):
    return {n: p.grad.clone() for n, p in lora_parameters(unet, STUDENT).items() if p.grad is not None}


def test_relative_position_is_teacher_delta_step_then_frozen_student(tiny_sd):
    teacher, plain, ctx, batch = _setup(tiny_sd)
    rel = RAPM(delta=10).relative_positions(ctx, batch)
    assert rel.shape == (2, 4, 4, 8, 8) and not rel.requires_grad
    # Slot from t=749 (index 1) for sample 1, by hand: the plain UNet with guidance 3, 749 -> 739, then the student.
    z = batch.latents[1:2, 1]
    t = torch.tensor([749])
    with torch.no_grad():
        out = guided_output(plain, z, t, batch.cond[1:2], batch.uncond[1:2], 3.0)
        mid = ddim_step(teacher.schedule, z, out, 749, 739)
        expected = student_step(ctx, mid, torch.tensor([739]), torch.tensor([499]), batch.cond[1:2])
    torch.testing.assert_close(rel[1, 1], expected[0], rtol=1e-4, atol=1e-5)


def test_gradients_reach_the_student_only_through_z_n(tiny_sd):
    """Each slot's gradient equals a step from the detached previous position against detached targets."""
    teacher, _, ctx, batch = _setup(tiny_sd)
    method = RAPM(huber_c=0.01, adv_weight=0.0, delta=10)  # Huber terms only: the structure under test
    set_trainable(teacher.unet, STUDENT)
    rel = method.relative_positions(ctx, batch)
    starts = torch.cat([batch.latents[:, :1], student_trajectory(ctx, batch.latents[:, 0], batch.cond)[:, :-1]], dim=1)
    for j, (loss, _) in enumerate(method.generator_losses(ctx, batch)):
        teacher.unet.zero_grad(set_to_none=True)
        loss.backward()
        got = _grads(teacher.unet)
        teacher.unet.zero_grad(set_to_none=True)
        t = torch.full((2,), ctx.timesteps[j])
        s = torch.full((2,), ctx.timesteps[j + 1])
        z_n = student_step(ctx, starts[:, j], t, s, batch.cond)
        (pseudo_huber(z_n, rel[:, j], 0.01) + pseudo_huber(z_n, batch.latents[:, j + 1], 0.01)).backward()
        want = _grads(teacher.unet)
        assert got.keys() == want.keys() and got
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-6)
        teacher.unet.zero_grad(set_to_none=True)


def test_generator_step_gives_no_gradient_to_the_discriminator(tiny_sd):
    teacher, _, ctx, batch = _setup(tiny_sd)
    set_trainable(teacher.unet, STUDENT)
    ctx.discriminator.requires_grad_(False)
    for loss, logs in RAPM(delta=10).generator_losses(ctx, batch):
        loss.backward()
        assert {"huber_rel/3", "gen_abs/3"} <= set(logs) or any(k.startswith("gen_rel") for k in logs)
    assert all(p.grad is None for p in lora_parameters(teacher.unet, DISCRIMINATOR).values())
    assert all(p.grad is None for p in ctx.discriminator.parameters())
    assert any(p.grad is not None for p in lora_parameters(teacher.unet, STUDENT).values())


def test_discriminator_step_trains_only_the_discriminator(tiny_sd):
    teacher, _, ctx, batch = _setup(tiny_sd)
    set_trainable(teacher.unet, DISCRIMINATOR)
    ctx.discriminator.requires_grad_(True)
    (loss, logs), = list(RAPM(delta=10).discriminator_losses(ctx, batch))
    loss.backward()
    # The loss and the pair accuracy (real above its own fake) of each discriminator and slot.
    assert set(logs) == {f"disc_{a}{k}/{n}" for a in ("", "acc_") for k in ("rel", "abs") for n in range(4)}
    assert all(p.grad is None for p in lora_parameters(teacher.unet, STUDENT).values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(teacher.unet, DISCRIMINATOR).values())
    assert all(p.grad is not None for p in ctx.discriminator.parameters())


def test_relative_only_has_no_absolute_term(tiny_sd):
    _, _, ctx, batch = _setup(tiny_sd)
    logs = {}
    for loss, entry in RAPM(delta=10, absolute=False).generator_losses(ctx, batch):
        logs.update(entry)
    assert not any("abs" in k for k in logs) and "huber_rel/0" in logs


def test_one_iteration_on_sdxl_runs(tiny_sdxl):
    teacher, _, ctx, batch = _setup(tiny_sdxl, levels="down_mid")
    assert batch.cond.pooled_embeds is not None
    set_trainable(teacher.unet, STUDENT)
    losses = [loss for loss, _ in RAPM(delta=10).generator_losses(ctx, batch)]
    assert len(losses) == 4 and all(torch.isfinite(x) for x in losses)
    set_trainable(teacher.unet, DISCRIMINATOR)
    (d, _), = list(RAPM(delta=10).discriminator_losses(ctx, batch))
    d.backward()
    assert torch.isfinite(d)


def test_sfd_matches_only_the_absolute_position(tiny_sd):
    from rapm.config import TrainConfig, apply_overrides
    from rapm.methods import build_method

    _, _, ctx, batch = _setup(tiny_sd)
    method = build_method(apply_overrides(TrainConfig(), {"method": "sfd"}, "test"), delta=10)
    assert not method.uses_discriminator
    logs = {}
    for loss, entry in method.generator_losses(ctx, batch):
        logs.update(entry)
    assert set(k.split("/")[0] for k in logs) == {"l1_abs", "loss"}  # no relative term, no adversarial term


def test_the_plain_sum_over_slots_is_n_times_the_mean(tiny_sd):
    """disc_slot_reduction=sum: Alg. 2 line 18's sum over the N slots; the default divides it by N."""
    from rapm.config import TrainConfig, apply_overrides
    from rapm.methods import build_method

    losses = {}
    for reduction in ("mean", "sum"):
        _, _, ctx, batch = _setup(tiny_sd)  # the same discriminator noise in both
        config = apply_overrides(TrainConfig(), {"method": "rapm-paper", "disc_slot_reduction": reduction}, "test")
        method = build_method(config, 10)  # the paper's: adv_weight 0.1, hinge, relative weight 1
        (loss, logs), = list(method.discriminator_losses(ctx, batch))
        losses[reduction] = loss.item()
    assert losses["mean"] > 0
    assert losses["sum"] == pytest.approx(4 * losses["mean"], rel=1e-5)


def test_the_heads_take_pcm_s_leaky_relu_slope(tiny_sd):
    teacher, _, _, _ = _setup(tiny_sd)
    slopes = {m.negative_slope for m in Discriminator(teacher.unet, DiscriminatorSpec("full", 1, 3, 0.01)).modules()
              if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.01}
    assert {m.negative_slope for m in Discriminator(teacher.unet, DiscriminatorSpec("full", 1, 3)).modules()
            if isinstance(m, torch.nn.LeakyReLU)} == {0.2}
