"""Flow-matching teachers through the verbs, as a user runs them: a tiny SD3 folder -> `rapm trajectories` ->
`rapm train` (rapm, sfd) -> `rapm export` -> a fresh diffusers pipeline's `load_lora_weights` gives `rapm sample`'s
images."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rapm import flow_denoisers as fd
from rapm import flowmatch as fm
from rapm.cli import app
from tests.tiny_flow import IMAGE, MAX_TOKENS, build_tiny_sd3, load

PROMPTS = ["a photo of a cat", "a red car", "a blue dog", "a cat"]
STEPS, SUBSTEPS = 2, 3


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def _train(root, teacher, store, method, iterations=2):
    out = root / method
    _invoke("train", "--out", out, "--teacher", teacher, "--store", store, "--method", method, "--iterations", iterations,
            "--checkpoint-every", iterations, "--device", "cpu", "--no-progress", "--set", "sample_every=0",
            "--set", "eval_every=0", "--set", "lora_rank=4", "--set", "lora_alpha=8", "--set", "disc_lora_rank=4")
    return out


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_verbs_sd3")
    teacher = build_tiny_sd3(root / "teacher")
    (root / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    _invoke("trajectories", "--teacher", teacher, "--prompts", root / "prompts.txt", "--out", root / "store",
            "--steps", STEPS, "--substeps", SUBSTEPS, "--batch-size", 2, "--dtype", "float32", "--no-progress")
    return root, teacher, root / "store"


def test_sd3_trajectories_are_the_teachers_euler_steps_on_the_trailing_sigmas(sd3):
    from rapm.store import open_store
    from rapm.trajectories import initial_noise

    root, teacher, store_dir = sd3
    manifest = json.loads((store_dir / "manifest.json").read_text())
    pipe = load(teacher)
    schedule = fm.FlowSchedule.from_config(pipe.scheduler.config)
    coarse = schedule.trailing_sigmas(STEPS)
    assert manifest["teacher"]["family"] == "sd3" and manifest["guidance"] == 7.0  # StableDiffusion3Pipeline's CFG
    assert manifest["timesteps"] == pytest.approx((coarse * 1000).tolist()) and manifest["timesteps"][-1] == 0
    assert manifest["timesteps"] == [1000.0, 750.0, 0.0]  # shift 3 at N = 2: σ 1, 0.75, 0
    delta = manifest["delta"]
    assert delta == 1000 // (STEPS * SUBSTEPS)

    store = open_store(store_dir)
    batch = store.get([0, 1])
    cond, uncond = fd.encode_prompt_sd3(pipe, PROMPTS[:2], max_sequence_length=MAX_TOKENS)
    x = initial_noise([0, 1], (16, 8, 8))

    def velocity(z, t):
        return fd.sd3_guided_velocity(pipe.transformer, z, t, cond, uncond, 7.0)

    with torch.no_grad():
        positions, _ = fm.teacher_trajectory(velocity, x, coarse, SUBSTEPS, schedule)
        # the Δ-step: one Euler step of Δ / 1000 in σ from each slot's start, with the teacher's velocity there
        steps = [fm.euler_step(positions[:, j], velocity(positions[:, j], (coarse[j] * 1000).expand(2)), coarse[j],
                               coarse[j] - delta / 1000) for j in range(STEPS)]
    torch.testing.assert_close(batch.latents, positions, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.delta_latents, torch.stack(steps, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.cond.pooled_embeds, cond.pooled_prompt_embeds)


@pytest.mark.parametrize("method", ["rapm", "sfd"])
def test_sd3_train_through_the_cli_trains_the_transformer_student(sd3, method):
    from rapm.flow_lora import SD3_TARGET_MODULES
    from rapm.run import load_student, read_run_config

    root, teacher, store = sd3
    run = _train(root, teacher, store, method)
    config = read_run_config(run)
    assert config.preset == "sd3" and list(config.lora_targets) == list(SD3_TARGET_MODULES)
    _, transformer, _ = load_student(run)
    moved = [p for n, p in transformer.named_parameters() if "lora_B" in n and "student" in n]
    assert moved and any(p.abs().max() > 0 for p in moved)  # B starts at zero: the student was stepped


@pytest.mark.parametrize("method", ["pcm", "progressive"])
def test_methods_that_do_not_apply_to_a_flow_teacher_are_refused_by_name(sd3, method):
    from rapm.config import ConfigError

    root, teacher, store = sd3
    with pytest.raises(ConfigError, match=f"'{method}' does not apply to a flow-matching teacher"):
        _train(root, teacher, store, method)


def test_sd3_export_loads_in_a_fresh_pipeline_and_gives_rapm_samples_images(sd3):
    from diffusers import StableDiffusion3Pipeline

    from rapm.export import export_lora
    from rapm.lora import load_lora
    from rapm.run import load_student
    from rapm.sample import generate
    from rapm.teacher import load_teacher

    root, teacher, store = sd3
    run = root / "rapm" if (root / "rapm").exists() else _train(root, teacher, store, "rapm")
    _invoke("export", "--run", run, "--out", root / "lora-cli")  # the verb itself: diffusers layout only
    facts = json.loads((root / "lora-cli" / "rapm_lora.json").read_text())
    assert set(facts["files"]) == {"diffusers"} and facts["scheduler"]["sigmas"] == [1.0, 0.5]
    assert "sigmas=[1.0, 0.5]" in (root / "lora-cli" / "README.md").read_text()

    _, transformer, config = load_student(run)
    with torch.no_grad():  # a trained B is ~lr small: scale it, or the comparison below cannot fail
        for name, p in transformer.named_parameters():
            if "lora_B" in name and "student" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    lora = root / "lora-big"
    export_lora(transformer, teacher, "sd3", lora, STEPS)

    t = load_teacher(teacher, text_encoders=True, vae=True)
    load_lora(t, lora)
    x_seeds = [0, 1]
    ours = generate(t, PROMPTS[:2], x_seeds, STEPS, guidance=1.0, role="student")
    base = generate(t, PROMPTS[:2], x_seeds, STEPS, guidance=1.0, role="teacher")
    assert (ours - base).abs().max() > 1e-2

    from rapm.trajectories import initial_noise

    fresh = StableDiffusion3Pipeline.from_pretrained(teacher, torch_dtype=torch.float32)
    fresh.load_lora_weights(str(lora))
    sigmas = list(np.linspace(1.0, 1.0 / STEPS, STEPS))
    kwargs = dict(prompt=PROMPTS[:2], num_inference_steps=STEPS, sigmas=sigmas, guidance_scale=1.0, height=IMAGE,
                  width=IMAGE, output_type="latent", latents=initial_noise(x_seeds, (16, 8, 8)),
                  max_sequence_length=MAX_TOKENS)
    torch.testing.assert_close(fresh(**kwargs).images, ours, rtol=1e-4, atol=1e-4)
    fresh.fuse_lora()
    torch.testing.assert_close(fresh(**kwargs).images, ours, rtol=1e-4, atol=1e-4)

    out = root / "samples"
    _invoke("sample", "--teacher", teacher, "--lora", lora, "--prompt", PROMPTS[0], "--out", out, "--device", "cpu")
    assert (out / "p0000_s0.png").exists()
