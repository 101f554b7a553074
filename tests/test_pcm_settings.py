"""PCM's teacher settings one option away (issue 35, docs/paper.md): a guidance range drawn per trajectory and
recorded in the store (`rapm trajectories --guidance 5:6`, `--guidance pcm`), and PCM's Δ per family (`--delta pcm`)."""

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from rapm.cli import app
from rapm.errors import RapmError
from rapm.methods.base import Context, teacher_step
from rapm.teacher import guided_output, load_teacher
from rapm.trajectories import initial_noise, teacher_trajectories, trajectory_guidance, write_trajectories

PROMPTS = ["a photo of a cat", "a red car", "a blue dog", "a cat", "a dog"]
FAST = dict(steps=2, substeps=3, batch_size=2, shard_size=3, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("pcm") / "prompts.txt"
    path.write_text("".join(p + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def ranged(tiny_sd, prompts, tmp_path_factory):
    return write_trajectories(tiny_sd, prompts, tmp_path_factory.mktemp("pcm") / "store", guidance="2:9", **FAST)


def test_a_guidance_range_is_recorded_and_each_trajectory_draws_its_own(ranged):
    m = ranged.manifest
    assert m["guidance_range"] == [2.0, 9.0] and m["guidance"] == 5.5 and ranged.guidance_range == (2.0, 9.0)
    batch = ranged.get(list(range(len(PROMPTS))))
    g = batch.cond.guidance
    assert g.shape == (len(PROMPTS),) and ((g >= 2.0) & (g <= 9.0)).all()
    assert len(set(g.tolist())) == len(PROMPTS)  # drawn per trajectory, not one value
    # a value depends on the trajectory's seed alone: the same across shards (3 + 2) and batches (2)
    torch.testing.assert_close(g, trajectory_guidance(m, batch.seeds))
    assert batch.uncond.guidance is None  # the negative carries none (CFG's scale is not a UNet input)


def test_each_stored_trajectory_is_the_teachers_at_its_own_guidance(tiny_sd, ranged):
    """Trajectory i of the range store equals the teacher's trajectory from the same noise at the fixed guidance g_i;
    the range's middle (the manifest's `guidance`) gives another trajectory, so the comparison can fail."""
    teacher = load_teacher(tiny_sd)
    m = ranged.manifest
    batch = ranged.get([0, 3])
    for row, g in enumerate(batch.cond.guidance.tolist()):
        cond, uncond = teacher.encode_prompts([batch.prompts[row]])
        z = initial_noise([batch.seeds[row]], teacher.latent_shape)
        ours, deltas = teacher_trajectories(teacher, z, cond, uncond, g, m["timesteps"], m["substeps"], delta=m["delta"])
        torch.testing.assert_close(batch.latents[row:row + 1], ours, rtol=1e-3, atol=1e-4)  # batched vs one: float noise
        torch.testing.assert_close(batch.delta_latents[row:row + 1], deltas, rtol=1e-3, atol=1e-4)
        middle, _ = teacher_trajectories(teacher, z, cond, uncond, m["guidance"], m["timesteps"], m["substeps"])
        assert (middle - ours).abs().max() > 1e-3


def test_guided_output_guides_each_sample_by_its_own_scale(tiny_sd):
    teacher = load_teacher(tiny_sd)
    cond, uncond = teacher.encode_prompts(["a cat", "a red car"])
    z = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700, 700])
    both = guided_output(teacher.unet, z, t, replace(cond, guidance=torch.tensor([1.5, 8.0])), uncond, 99.0)
    for row, g in enumerate((1.5, 8.0)):
        one = guided_output(teacher.unet, z[row:row + 1], t[row:row + 1], cond[row:row + 1], uncond[row:row + 1], g)
        torch.testing.assert_close(both[row:row + 1], one, rtol=1e-4, atol=1e-5)
    assert (both[1] - guided_output(teacher.unet, z, t, cond, uncond, 1.5)[1]).abs().max() > 1e-3


def test_trainings_teacher_step_uses_each_trajectorys_guidance(tiny_sd, ranged):
    """What `rapm train --set delta=…` and progressive distillation compute: the teacher's Δ-step from z~_{n+1} with
    the Context's scalar guidance (the range's middle) equals the stored Δ-step, taken at each trajectory's own."""
    teacher = load_teacher(tiny_sd)
    batch = ranged.get([1, 2, 4])
    ctx = Context(teacher.unet, teacher.schedule, ranged.timesteps, ranged.guidance, [])
    t0 = ranged.timesteps[0]
    t = torch.full((3,), t0)
    got = teacher_step(ctx, batch.latents[:, 0], t, t - ranged.delta, batch.cond, batch.uncond)
    torch.testing.assert_close(got, batch.delta_latents[:, 0], rtol=1e-4, atol=1e-5)


class _Ran:
    """`rapm trajectories` as `rapm.cli.main` runs it: a RapmError is its one `error:` line (any other exception is
    raised: a traceback)."""

    def __init__(self, result):
        error = result.exception
        if error is not None and not isinstance(error, (SystemExit, RapmError)):
            raise error
        self.exit_code = 1 if isinstance(error, RapmError) else result.exit_code
        self.output = result.output + (f"error: {error}\n" if isinstance(error, RapmError) else "")


def _trajectories(*args):
    return _Ran(CliRunner().invoke(app, ["trajectories", *map(str, args), "--steps", "2", "--substeps", "3", "--no-progress"]))


def test_a_rerun_with_another_range_is_refused_and_the_same_resumes(tiny_sd, prompts, tmp_path):
    out = tmp_path / "store"
    first = _trajectories("--teacher", tiny_sd, "--prompts", prompts, "--out", out, "--guidance", "5:6")
    assert first.exit_code == 0, first.output
    assert "guidance=U[5, 6] per trajectory" in first.output
    other = _trajectories("--teacher", tiny_sd, "--prompts", prompts, "--out", out, "--guidance", "5:7")
    assert other.exit_code != 0 and "guidance_range is [5.0, 6.0] in the store but [5.0, 7.0] in this run" in other.output
    fixed = _trajectories("--teacher", tiny_sd, "--prompts", prompts, "--out", out, "--guidance", "5.5")
    assert fixed.exit_code != 0 and "guidance_range is [5.0, 6.0] in the store but None" in fixed.output
    again = _trajectories("--teacher", tiny_sd, "--prompts", prompts, "--out", out, "--guidance", "5:6")
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_pcm_gives_the_familys_guidance_range_and_delta(family, tiny_sd, tiny_sdxl, prompts, tmp_path):
    teacher = {"sd": tiny_sd, "sdxl": tiny_sdxl}[family]
    result = _trajectories("--teacher", teacher, "--prompts", prompts, "--out", tmp_path / "s", "--guidance", "pcm",
                           "--delta", "pcm")
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    # PCM's public code: SD 1.5 w ~ U[4, 5], Δ = 1000 // 50; SDXL w ~ U[6, 7], Δ = 1000 // 40 (LCM's form, g = w + 1)
    assert (m["guidance_range"], m["delta"]) == ({"sd": [5.0, 6.0], "sdxl": [7.0, 8.0]}[family], {"sd": 20, "sdxl": 25}[family])


@pytest.mark.parametrize("flag", ["--guidance", "--delta"])
def test_pcm_is_refused_by_name_where_pcm_gives_no_value(flag, prompts, tmp_path):
    result = _trajectories("--teacher", "digits", "--prompts", prompts, "--out", tmp_path / "s", flag, "pcm")
    if flag == "--delta":  # the digits teacher is of the sd family with SD's schedule: PCM's SD Δ applies
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "s" / "manifest.json").read_text())["delta"] == 20
        return
    assert result.exit_code != 0 and not (tmp_path / "s").exists()
    assert "error: --guidance pcm: PCM's range is SD 1.5's and SDXL's" in result.output


@pytest.mark.parametrize("bad, says", [("5:x", "'x' is not a number"), ("6:5", "low end is above its high end"),
                                       ("nan", "not a finite number"), ("1:2:3", "'2:3' is not a number")])
def test_a_bad_guidance_is_one_error_line_before_anything_is_written(bad, says, prompts, tmp_path):
    result = _trajectories("--teacher", "digits", "--prompts", prompts, "--out", tmp_path / "s", "--guidance", bad)
    assert result.exit_code != 0 and says in result.output and not (tmp_path / "s").exists()


def test_a_flux_teacher_draws_its_guidance_embedding_per_trajectory(prompts, tmp_path):
    from tests.tiny_flow import build_tiny_flux

    teacher = build_tiny_flux(tmp_path / "flux")
    store = write_trajectories(teacher, prompts, tmp_path / "store", guidance=(2.0, 4.0), **FAST)
    batch = store.get(list(range(len(PROMPTS))))
    torch.testing.assert_close(batch.cond.guidance, trajectory_guidance(store.manifest, batch.seeds))
    assert ((batch.cond.guidance >= 2) & (batch.cond.guidance <= 4)).all()
    with pytest.raises(RapmError, match="PCM's public code trains no flux teacher"):
        write_trajectories(teacher, prompts, tmp_path / "other", guidance="pcm", **FAST)


# --- the discriminators: PCM's independent renoising, separate backbones (Alg. 2's φ1, φ2), PCM's frozen backbone ---

from rapm.config import ConfigError, TrainConfig, apply_overrides  # noqa: E402
from rapm.run import checkpoints, load_checkpoint  # noqa: E402
from rapm.train import train  # noqa: E402

# rapm-paper (hinge, both discriminators, alternating), small: 1 discriminator step, then 1 student step
PAPER = dict(method="rapm-paper", lora_rank=4, lora_alpha=4, disc_lora_rank=2, disc_lora_alpha=2, disc_heads_per_level=1,
             lr=1e-3, disc_lr=1e-2, sample_every=0, eval_every=0, batch_size=1, iterations=2, checkpoint_every=1,
             keep_checkpoints=3)


@pytest.fixture(scope="module")
def paper_store(tiny_sd, prompts, tmp_path_factory):
    return write_trajectories(tiny_sd, prompts, tmp_path_factory.mktemp("pcm") / "paper", steps=4, substeps=2,
                              progress=False, dtype="float32")


def _paper(tiny_sd, store, **kw) -> TrainConfig:
    return apply_overrides(TrainConfig(), {"teacher": str(tiny_sd), "store": str(store.path), **PAPER, **kw}, "test")


def _disc_noises(monkeypatch, tiny_sd, store, renoise: str) -> list[torch.Tensor]:
    """The noise each discriminator-step input was renoised with: [fakes, relative reals, absolute reals]."""
    import rapm.methods.rapm as rapm_method

    seen = []
    real = rapm_method.renoise

    def spy(ctx, x, t_from, t_to, noise):
        seen.append(noise.clone())
        return real(ctx, x, t_from, t_to, noise)

    monkeypatch.setattr(rapm_method, "renoise", spy)
    from rapm.methods import build_method
    from rapm.methods.base import Context
    from rapm.models import build_models

    config = _paper(tiny_sd, store, disc_renoise=renoise)
    method = build_method(config, delta=store.delta)
    teacher, disc = build_models(config, torch.device("cpu"), need_vae=False, with_discriminator=True)
    ctx = Context(teacher.unet, teacher.schedule, store.timesteps, store.guidance,
                  [torch.Generator().manual_seed(0)], disc)
    (loss, _), = list(method.discriminator_losses(ctx, store.get([0])))
    assert torch.isfinite(loss)
    (noise,) = seen  # one batched renoise over fakes and both reals
    return list(noise.chunk(3))


def test_pcm_renoises_each_fake_and_real_with_its_own_noise(monkeypatch, tiny_sd, paper_store):
    fake, relative, absolute = _disc_noises(monkeypatch, tiny_sd, paper_store, "shared")
    assert torch.equal(fake, relative) and torch.equal(fake, absolute)  # rapm's default: a pair differs only in position
    fake2, relative2, absolute2 = _disc_noises(monkeypatch, tiny_sd, paper_store, "independent")
    assert torch.equal(fake2, fake)  # the fakes' noise is drawn as before; each real draws its own after it
    assert not torch.equal(fake2, relative2) and not torch.equal(fake2, absolute2) and not torch.equal(relative2, absolute2)


def test_independent_noise_is_refused_with_the_paired_loss(tiny_sd, paper_store):
    from rapm.methods import build_method

    with pytest.raises(ConfigError, match="'disc_renoise'.*set gan_loss=hinge"):
        build_method(_paper(tiny_sd, paper_store, disc_renoise="independent", gan_loss="relativistic"), delta=10)


def test_separate_backbones_train_a_lora_each_and_resume(tiny_sd, paper_store, tmp_path):
    run = tmp_path / "run"
    train(_paper(tiny_sd, paper_store, disc_backbones="separate", iterations=1), run, progress=False)
    after_d = load_checkpoint(checkpoints(run)[-1])["discriminator"]
    own = {n: v for n, v in after_d.items() if ".discriminator_absolute." in n}
    shared = {n: v for n, v in after_d.items() if ".discriminator." in n}
    assert own and len(own) == len(shared)  # D2's LoRA on the same targets as D1's
    # the discriminator step trained both backbones' LoRAs (B starts at zero: nonzero means it moved)
    for group in (own, shared):
        assert any(torch.count_nonzero(v) > 0 for n, v in group.items() if "lora_B" in n)
    assert not any(torch.equal(own[n.replace(".discriminator.", ".discriminator_absolute.")], v)
                   for n, v in shared.items() if "lora_B" in n)
    train(_paper(tiny_sd, paper_store, disc_backbones="separate"), run, resume=True, progress=False)
    after_s = load_checkpoint(checkpoints(run)[-1])["discriminator"]
    assert all(torch.equal(after_s[n], v) for n, v in after_d.items())  # the student's step left both alone


def test_separate_backbones_give_d2_its_own_features(tiny_sd, paper_store):
    from rapm.models import build_models

    teacher, disc = build_models(_paper(tiny_sd, paper_store, disc_backbones="separate"), torch.device("cpu"),
                                 need_vae=False, with_discriminator=True)
    from rapm.discriminator import ABSOLUTE_BACKBONE
    from rapm.roles import lora_parameters

    with torch.no_grad():  # D2's LoRA away from zero, so its backbone differs from D1's
        for p in lora_parameters(teacher.unet, ABSOLUTE_BACKBONE).values():
            p.add_(torch.randn_like(p))
        disc.absolute.load_state_dict(disc.relative.state_dict())  # the same heads: only the backbones differ
    batch = paper_store.get([0])
    x, t = batch.latents[:, 1], torch.tensor([500])
    with torch.no_grad():
        both = disc.logits(teacher.unet, x, t, batch.cond)
    assert any((r - a).abs().max() > 1e-4 for r, a in zip(both["relative"], both["absolute"]))


def test_separate_backbones_need_a_discriminator_lora():
    from rapm.config import validate

    with pytest.raises(ConfigError, match="disc_backbones.*disc_lora=false trains none"):
        validate(apply_overrides(TrainConfig(), {"disc_backbones": "separate", "disc_lora": False}, "test"))
    with pytest.raises(ConfigError, match="disc_renoise.*must be shared or independent"):
        validate(apply_overrides(TrainConfig(), {"disc_renoise": "fresh"}, "test"))


def test_pcms_frozen_backbone_trains_the_heads_only(tiny_sd, paper_store, tmp_path):
    """disc_lora=false: the discriminator's backbone is the frozen teacher (PCM's code); its step trains the heads."""
    from rapm.run import load_student

    run = tmp_path / "run"
    train(_paper(tiny_sd, paper_store, disc_lora=False, iterations=1), run, progress=False)
    state = load_checkpoint(checkpoints(run)[-1])
    assert state["discriminator"] and all(n.startswith("heads.") for n in state["discriminator"])
    train(_paper(tiny_sd, paper_store, disc_lora=False), run, resume=True, progress=False)
    _, unet, _ = load_student(run)
    assert not any("discriminator" in n for n, _ in unet.named_parameters())
    base = load_teacher(tiny_sd, text_encoders=False).unet.state_dict()
    weights = {n.replace(".base_layer", ""): p for n, p in unet.named_parameters() if "lora_" not in n}
    assert weights and all(torch.equal(p.detach(), base[n]) for n, p in weights.items())  # the base never moved
