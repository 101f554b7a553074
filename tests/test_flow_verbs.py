"""Flow-matching teachers through the verbs, as a user runs them: a tiny SD3 / FLUX folder -> `rapm trajectories` ->
`rapm train` (rapm, sfd) -> `rapm export` -> a fresh diffusers pipeline's `load_lora_weights` gives `rapm sample`'s
images."""

import json

import numpy as np
import pytest
import torch

from rapm.families import family_named
from rapm.families.flow import pack_latents, unpack_latents
from rapm.flowmatch import FlowSchedule
from tests import flow_reference as ref
from tests.cli_run import invoke_ok as _invoke
from tests.tiny_flow import BUILD, IMAGE, LATENT, MAX_TOKENS, load

PROMPTS = ["a photo of a cat", "a red car", "a blue dog", "a cat"]
STEPS, SUBSTEPS = 2, 3




def _train(root, teacher, store, method, iterations=2):
    out = root / method
    _invoke("train", "--out", out, "--teacher", teacher, "--store", store, "--method", method, "--iterations", iterations,
            "--checkpoint-every", iterations, "--device", "cpu", "--no-progress", "--set", "sample_every=0",
            "--set", "eval_every=0", "--set", "lora_rank=4", "--set", "lora_alpha=8", "--set", "disc_lora_rank=4")
    return out


GUIDANCE = {"sd3": 7.0, "flux": 3.5}  # the pipelines' defaults: SD3's CFG scale, FLUX.1-dev's guidance embedding


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow(tmp_path_factory, request):
    family = request.param
    root = tmp_path_factory.mktemp(f"flow_verbs_{family}")
    teacher = BUILD[family](root / "teacher")
    (root / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    _invoke("trajectories", "--teacher", teacher, "--prompts", root / "prompts.txt", "--out", root / "store",
            "--steps", STEPS, "--substeps", SUBSTEPS, "--batch-size", 2, "--dtype", "float32", "--no-progress")
    return family, root, teacher, root / "store"


def _velocity(family, pipe, prompts):
    """The teacher's velocity as the pipeline runs it (SD3: CFG 7; FLUX: guidance embedding 3.5), by tests/flow_reference.py."""
    if family == "sd3":
        cond, uncond = ref.encode_prompt_sd3(pipe, prompts, max_sequence_length=MAX_TOKENS)
        return cond, lambda z, t: ref.sd3_guided_velocity(pipe.transformer, z, t, cond, uncond, GUIDANCE[family])
    cond = ref.encode_prompt_flux(pipe, prompts, max_sequence_length=MAX_TOKENS)
    return cond, lambda z, t: ref.flux_velocity(pipe.transformer, z, t, cond, GUIDANCE[family])


def test_trajectories_are_the_teachers_euler_steps_on_the_trailing_sigmas(flow):
    from rapm.store import open_store
    from rapm.trajectories import initial_noise

    family, root, teacher, store_dir = flow
    manifest = json.loads((store_dir / "manifest.json").read_text())
    pipe = load(teacher)
    schedule = FlowSchedule.from_config(pipe.scheduler.config)
    mu = schedule.mu(family_named(family).image_seq_len((16, LATENT, LATENT))) if family == "flux" else None
    coarse = schedule.trailing_sigmas(STEPS, mu)  # FluxPipeline's own σ (dynamic shift μ of 16 tokens)
    assert manifest["teacher"]["family"] == family and manifest["guidance"] == GUIDANCE[family]
    assert manifest["timesteps"] == pytest.approx((coarse * 1000).tolist()) and manifest["timesteps"][-1] == 0
    if family == "sd3":
        assert manifest["timesteps"] == [1000.0, 750.0, 0.0]  # shift 3 at N = 2: σ 1, 0.75, 0
    else:
        assert manifest["mu"] == pytest.approx(mu) and manifest["latent_shape"] == [16, LATENT, LATENT]
    delta = manifest["delta"]
    assert delta == 1000 // (STEPS * SUBSTEPS)

    store = open_store(store_dir)
    batch = store.get([0, 1])
    cond, velocity = _velocity(family, pipe, PROMPTS[:2])
    x = initial_noise([0, 1], (16, LATENT, LATENT))

    with torch.no_grad():
        positions, _ = ref.teacher_trajectory(velocity, x, coarse, SUBSTEPS, schedule, mu)
        # the Δ-step: one Euler step of Δ / 1000 in σ from each slot's start, with the teacher's velocity there
        steps = [ref.euler_step(positions[:, j], velocity(positions[:, j], (coarse[j] * 1000).expand(2)), coarse[j],
                               coarse[j] - delta / 1000) for j in range(STEPS)]
    torch.testing.assert_close(batch.latents, positions, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.delta_latents, torch.stack(steps, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.cond.pooled_embeds, cond.pooled_prompt_embeds)
    if family == "flux":  # the guidance embedding's value rides with the conditioning, to the student too
        assert batch.cond.guidance.tolist() == [3.5, 3.5]


@pytest.mark.parametrize("method", ["rapm", "sfd", "rapm-paper", "rapm-relative"])  # -paper: D1, D2 on joint blocks
def test_train_through_the_cli_trains_the_transformer_student(flow, method):
    from rapm.families.flow import FLUX_TARGET_MODULES, SD3_TARGET_MODULES
    from rapm.run import load_student, read_run_config

    family, root, teacher, store = flow
    run = _train(root, teacher, store, method)
    config = read_run_config(run)
    targets = SD3_TARGET_MODULES if family == "sd3" else FLUX_TARGET_MODULES
    assert config.preset == family and list(config.lora_targets) == list(targets)
    _, transformer, _ = load_student(run)
    moved = [p for n, p in transformer.named_parameters() if "lora_B" in n and "student" in n]
    assert moved and any(p.abs().max() > 0 for p in moved)  # B starts at zero: the student was stepped


@pytest.mark.parametrize("method", ["pcm", "progressive"])
def test_methods_that_do_not_apply_to_a_flow_teacher_are_refused_by_name(flow, method):
    from rapm.config import ConfigError

    family, root, teacher, store = flow
    with pytest.raises(ConfigError, match=f"'{method}' does not apply to a flow-matching teacher"):
        _train(root, teacher, store, method)


def test_export_loads_in_a_fresh_pipeline_and_gives_rapm_samples_images(flow):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from rapm.export import export_lora
    from rapm.lora import load_lora
    from rapm.run import load_student
    from rapm.sample import generate
    from rapm.teacher import load_teacher

    family, root, teacher, store = flow
    run = root / "rapm" if (root / "rapm").exists() else _train(root, teacher, store, "rapm")
    result = _invoke("export", "--run", run, "--out", root / "lora-cli")  # the verb itself: both files by default
    facts = json.loads((root / "lora-cli" / "rapm_lora.json").read_text())
    card = (root / "lora-cli" / "README.md").read_text()
    # issue 31: a FLUX / SD3 export writes the ComfyUI (sd-scripts layout) file beside the diffusers one
    assert facts["files"] == {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "kohya_lora.safetensors"}
    assert all((root / "lora-cli" / name).exists() for name in facts["files"].values())
    # issue 31: the closing line gives the family's own settings (it said "guidance 1, DDIM trailing" for FLUX too)
    own = ("guidance 1, FlowMatch Euler, sigmas linspace(1, 1/2, 2)" if family == "sd3" else "guidance 3.5, FlowMatch Euler")
    assert f"sample with {STEPS} steps, {own} (README.md there)" in result.output and "DDIM" not in result.output
    assert "## ComfyUI" in card and "LoraLoaderModelOnly" in card and "kohya_lora.safetensors" in card
    assert ("ModelSamplingFlux" in card) == (family == "flux") and ("ModelSamplingSD3" in card) == (family == "sd3")
    assert ("FLUX LoRAs" in card) == (family == "flux")  # diffusers converts sd-scripts FLUX files, not SD3 ones
    if family == "sd3":  # StableDiffusion3Pipeline needs the trailing σ given; CFG is distilled
        assert facts["scheduler"]["sigmas"] == [1.0, 0.5] and "sigmas=[1.0, 0.5]" in card
        assert facts["scheduler"]["guidance_scale"] == 1.0
    else:  # FluxPipeline places the trailing σ itself; the guidance embedding stays as trained
        assert "sigmas" not in facts["scheduler"] and facts["scheduler"]["guidance_scale"] == 3.5
        assert "guidance_scale=3.5" in card
    guidance = facts["scheduler"]["guidance_scale"]

    _, transformer, config = load_student(run)
    with torch.no_grad():  # a trained B is ~lr small: scale it, or the comparison below cannot fail
        for name, p in transformer.named_parameters():
            if "lora_B" in name and "student" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    lora = root / "lora-big"
    export_lora(transformer, teacher, family, lora, STEPS, guidance=guidance)

    t = load_teacher(teacher, text_encoders=True, vae=True)
    load_lora(t, lora)
    x_seeds = [0, 1]
    ours = generate(t, PROMPTS[:2], x_seeds, STEPS, guidance=guidance, role="student")
    base = generate(t, PROMPTS[:2], x_seeds, STEPS, guidance=guidance, role="teacher")
    assert (ours - base).abs().max() > 1e-2

    from rapm.trajectories import initial_noise

    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    fresh = cls.from_pretrained(teacher, torch_dtype=torch.float32)
    fresh.load_lora_weights(str(lora))
    x = initial_noise(x_seeds, (16, LATENT, LATENT))
    kwargs = dict(prompt=PROMPTS[:2], num_inference_steps=STEPS, guidance_scale=guidance, height=IMAGE, width=IMAGE,
                  output_type="latent", max_sequence_length=MAX_TOKENS)
    if family == "sd3":
        kwargs.update(sigmas=list(np.linspace(1.0, 1.0 / STEPS, STEPS)), latents=x)
    else:
        kwargs.update(latents=pack_latents(x))

    def pipeline_latents():
        out = fresh(**kwargs).images
        return out if family == "sd3" else unpack_latents(out, LATENT, LATENT)

    torch.testing.assert_close(pipeline_latents(), ours, rtol=1e-4, atol=1e-4)
    fresh.fuse_lora()
    torch.testing.assert_close(pipeline_latents(), ours, rtol=1e-4, atol=1e-4)

    out = root / "samples"
    _invoke("sample", "--teacher", teacher, "--lora", lora, "--prompt", PROMPTS[0], "--out", out, "--device", "cpu")
    assert (out / "p0000_s0.png").exists()
    row = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert row["guidance"] == guidance  # the LoRA's own: CFG 1 for SD3, the trained guidance embedding for FLUX


def test_evaluate_and_report_measure_the_student_against_the_teacher(flow):
    family, root, teacher, store = flow
    run = root / "sfd" if (root / "sfd").exists() else _train(root, teacher, store, "sfd")
    _invoke("export", "--run", run, "--out", root / "lora-eval")
    out = run / "evaluation.json"
    _invoke("evaluate", "--teacher", teacher, "--model", f"sfd={root / 'lora-eval'}:{STEPS}", "--model",
            f"teacher:ddim:{STEPS}", "--prompts", root / "prompts.txt", "--num", 2, "--reference-steps", 4,
            "--teacher-curve", "1,2", "--out", out)
    result = json.loads(out.read_text())
    rows = {(r["method"], r["steps"]): r for r in result["rows"]}
    assert rows["teacher-ddim", 4]["trajectory_error"] == 0.0 and rows["teacher-ddim", STEPS]["trajectory_error"] > 0
    assert rows["sfd", STEPS]["trajectory_error"] > 0 and [c["steps"] for c in result["teacher_curve"]] == [1, 2]
    assert rows["sfd", STEPS]["guidance"] == (1.0 if family == "sd3" else 3.5)  # CFG distilled; FLUX's embedding as trained
    _invoke("report", run)
    assert (run / "report.html").exists() and "sfd" in (run / "report.md").read_text()


def test_the_flow_schedule_makes_the_ddim_step_the_euler_step_and_renoises_on_the_line():
    from rapm.diffusion import add_noise, ddim_step, predict_x0_eps, renoise, schedule_from_config
    from tests.tiny_flow import SD3_SCHEDULER

    schedule = schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **SD3_SCHEDULER})
    assert schedule.is_flow and schedule.prediction_type == "flow" and schedule.coarse(4) == pytest.approx(
        [1000.0, 900.0, 750.0, 500.0, 0.0])
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t, s = torch.tensor([900.0, 750.0, 500.0]), torch.tensor([750.0, 500.0, 0.0])
    expected = torch.stack([ref.euler_step(z[i:i + 1], v[i:i + 1], t[i] / 1000, s[i] / 1000)[0] for i in range(3)])
    torch.testing.assert_close(ddim_step(schedule, z, v, t, s), expected, rtol=1e-6, atol=1e-6)
    x0, eps = predict_x0_eps(schedule, z, v, t)
    torch.testing.assert_close((eps - x0).float(), v, rtol=1e-6, atol=1e-6)  # v = eps - x0
    # renoising x_s (on the line at σ_s) to σ_t > σ_s gives the line's marginal at σ_t: mean (1 - σ_t) x0, var σ_t^2
    x0 = torch.randn(1, 1, 64, 64, generator=g).expand(2000, 1, 64, 64)
    xs = add_noise(schedule, x0, torch.full((2000,), 300.0), torch.randn(x0.shape, generator=g))
    xt = renoise(schedule, xs, torch.full((2000,), 300.0), torch.full((2000,), 800.0), torch.randn(x0.shape, generator=g))
    assert float((xt.mean(0) - 0.2 * x0[0]).square().mean().sqrt()) < 0.025  # sampling error 0.8 / sqrt(2000) = 0.018
    assert abs(float(xt.std(0).mean()) - 0.8) < 0.01


def test_a_flow_teacher_takes_euler_steps_only(flow):
    from rapm.errors import RapmError

    family, root, teacher, _ = flow
    with pytest.raises(RapmError, match="takes Euler steps"):
        _invoke("trajectories", "--teacher", teacher, "--prompts", root / "prompts.txt", "--out", root / "store-dpm",
                "--solver", "dpmsolver++", "--substeps", 2, "--no-progress")
