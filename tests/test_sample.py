"""Sampling: rapm's generate matches diffusers' pipelines seed for seed, and `rapm sample` uses a LoRA as a user would."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image
from typer.testing import CliRunner

from rapm.cli import app
from rapm.errors import RapmError
from rapm.export import export_lora
from rapm.images import save_grid, to_pil
from rapm.lora import LoraError, load_lora
from rapm.roles import STUDENT, LoraSpec, add_roles, lora_parameters
from rapm.sample import generate
from rapm.teacher import load_teacher

PROMPTS = ["a photo of a cat", "a blue car"]


def _student(folder, seed=0):
    teacher = load_teacher(folder, vae=True)
    add_roles(teacher.unet, LoraSpec(rank=4, alpha=2.0), LoraSpec(rank=2, alpha=2.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(teacher.unet, STUDENT).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return teacher


@pytest.fixture(scope="module")
def sd_student(tiny_sd, tmp_path_factory):
    teacher = _student(tiny_sd)
    lora = tmp_path_factory.mktemp("sd_lora") / "lora"
    export_lora(teacher.unet, tiny_sd, "sd", lora, 4)
    return teacher, lora


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl, tmp_path_factory):
    teacher = _student(tiny_sdxl)
    lora = tmp_path_factory.mktemp("sdxl_lora") / "lora"
    export_lora(teacher.unet, tiny_sdxl, "sdxl", lora, 4)
    return lora


def _pipeline(folder, scheduler):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, **(
        {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False} if scheduler is DDIMScheduler
        else {"algorithm_type": "dpmsolver++", "timestep_spacing": "trailing"}))
    return pipe


@pytest.mark.parametrize("scheduler, name", [(DDIMScheduler, "ddim"), (DPMSolverMultistepScheduler, "dpmsolver")])
def test_teacher_samples_match_the_diffusers_pipeline_with_guidance(tiny_sd, scheduler, name):
    teacher = load_teacher(tiny_sd)
    latents = generate(teacher, PROMPTS, [3, 4], 5, guidance=7.5, role="teacher", scheduler=name,
                       negative_prompt="red", batch_size=2)
    pipe = _pipeline(tiny_sd, scheduler)
    for i, seed in enumerate([3, 4]):
        expected = pipe(PROMPTS[i], negative_prompt="red", num_inference_steps=5, guidance_scale=7.5,
                        output_type="latent", generator=torch.Generator("cpu").manual_seed(seed)).images
        torch.testing.assert_close(latents[i:i + 1], expected, atol=1e-4 * expected.abs().max(), rtol=0)


def test_batching_does_not_change_a_seeds_sample(sd_student):
    teacher, _ = sd_student
    one = torch.cat([generate(teacher, [p], [s], 2) for p, s in zip(PROMPTS, [5, 6])])
    both = generate(teacher, PROMPTS, [5, 6], 2, batch_size=2)
    torch.testing.assert_close(both, one, atol=1e-5, rtol=1e-5)


def test_student_role_needs_a_student_adapter(tiny_sd):
    with pytest.raises(LoraError, match="no 'student' adapter"):
        generate(load_teacher(tiny_sd), PROMPTS[:1], [0], 2)


def test_sample_verb_writes_pngs_and_samples_jsonl(sd_student, tiny_sd, tmp_path):
    teacher, lora = sd_student
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "samples"
    result = CliRunner().invoke(app, ["sample", "--teacher", str(tiny_sd), "--lora", str(lora), "--prompts", str(prompts),
                                      "--seed", "5", "--num-per-prompt", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [(p, s) for p in PROMPTS for s in (5, 6)]
    assert rows[0]["guidance"] == 1.0 and rows[0]["steps"] == 4  # a LoRA's defaults: cfg 1 and its N from rapm_lora.json
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in rows)
    # The LoRA loaded from disk is the in-memory student: same image, up to 8-bit rounding.
    with torch.no_grad():
        expected = to_pil(teacher.decode(generate(teacher, [PROMPTS[1]], [6], 4))[0])
    got = Image.open(out / rows[3]["file"])
    assert got.size == expected.size
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_sample_verb_without_a_lora_samples_the_teacher_with_its_guidance(tiny_sd, tmp_path):
    out = tmp_path / "teacher"
    result = CliRunner().invoke(app, ["sample", "--teacher", str(tiny_sd), "--prompt", "a red car", "--steps", "2",
                                      "--scheduler", "dpmsolver", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert (row["guidance"], row["scheduler"], row["seed"]) == (7.5, "dpmsolver", 0)
    assert (out / row["file"]).exists()


def test_lora_from_another_base_is_one_clear_error(tiny_sd, sdxl_lora, tmp_path):
    teacher = load_teacher(tiny_sd)
    with pytest.raises(LoraError) as info:
        load_lora(teacher, sdxl_lora)
    message = str(info.value)
    assert "pytorch_lora_weights.safetensors" in message and str(tiny_sd) in message and "exported for" in message
    assert "student" not in getattr(teacher.unet, "peft_config", {})  # nothing half-loaded
    result = CliRunner().invoke(app, ["sample", "--teacher", str(tiny_sd), "--lora", str(sdxl_lora), "--prompt", "a cat",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and isinstance(result.exception, RapmError)
    assert "does not fit the teacher" in str(result.exception)


def test_a_file_that_is_not_a_lora_is_one_clear_error(tiny_sd, tmp_path):
    from safetensors.torch import save_file

    bogus = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(bogus))
    with pytest.raises(LoraError, match="weights.safetensors"):
        load_lora(load_teacher(tiny_sd), bogus)


def test_save_grid_lays_images_out_in_rows(tmp_path):
    images = torch.linspace(-1, 1, 5).reshape(5, 1, 1, 1).expand(5, 3, 4, 6)
    path = save_grid(images, tmp_path / "grid.png", nrow=2)
    grid = Image.open(path)
    assert grid.size == (2 * (6 + 2) + 2, 3 * (4 + 2) + 2)
    assert grid.getpixel((2, 2 + 6)) == (128, 128, 128)  # third image (value 0) starts the second row
    assert grid.getpixel((2, 2 + 12)) == (255, 255, 255) and grid.getpixel((2 + 8, 2 + 12)) == (0, 0, 0)  # fifth, then empty
    grey = save_grid([to_pil(torch.zeros(1, 4, 4))] * 3, tmp_path / "grey.png", nrow=3)
    assert Image.open(grey).mode == "L"


def test_kohya_export_loads_as_the_same_student(sd_student, tiny_sd, tmp_path):
    teacher, _ = sd_student
    kohya = export_lora(teacher.unet, tiny_sd, "sd", tmp_path / "kohya", 4, fmt="kohya")
    fresh = load_teacher(tiny_sd)
    assert load_lora(fresh, kohya.parent) == kohya
    expected = generate(teacher, PROMPTS, [1, 2], 4)
    torch.testing.assert_close(generate(fresh, PROMPTS, [1, 2], 4), expected, atol=1e-5 * expected.abs().max(), rtol=0)


def test_sdxl_kohya_export_with_ldm_names_loads_in_rapm_sample_as_the_same_student(tiny_sdxl, tmp_path):
    teacher = _student(tiny_sdxl)
    kohya = export_lora(teacher.unet, tiny_sdxl, "sdxl", tmp_path / "kohya", 4, fmt="kohya")
    fresh = load_teacher(tiny_sdxl)
    assert load_lora(fresh, kohya) == kohya
    expected = generate(teacher, PROMPTS, [1, 2], 4)
    assert (generate(fresh, PROMPTS, [1, 2], 4, role="teacher") - expected).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(generate(fresh, PROMPTS, [1, 2], 4), expected, atol=1e-5 * expected.abs().max(), rtol=0)


def test_lora_with_other_shapes_names_the_module(sd_student, tmp_path):
    from safetensors.torch import load_file, save_file

    _, lora = sd_student
    state = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    key = next(k for k in sorted(state) if k.endswith("attn2.to_k.lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0], 48)  # a cross-attention width this teacher does not have
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(LoraError, match=r"1 of its \d+ modules does not fit \(.*attn2.to_k: LoRA takes \(48,\) inputs, the layer has 32"):
        load_lora(load_teacher(sd_student[0].path), tmp_path / "other.safetensors")


def test_text_encoder_lora_loads_as_diffusers_loads_it(tiny_sd, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    unet_config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False)
    text_config = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    user = _pipeline(tiny_sd, DDIMScheduler)
    user.load_lora_weights(tmp_path / "lora")
    expected = user(PROMPTS[0], num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(9)).images
    teacher = load_teacher(tiny_sd)
    load_lora(teacher, tmp_path / "lora")
    assert any("lora_A" in n for n, _ in teacher.text_encoders[0].named_parameters())
    torch.testing.assert_close(generate(teacher, PROMPTS[:1], [9], 2), expected, atol=1e-4 * expected.abs().max(), rtol=0)


def test_sample_verb_on_a_pixel_space_teacher_writes_grey_pngs(tmp_path):
    from test_export import build_pixel_teacher

    folder = build_pixel_teacher(tmp_path / "pixel")
    result = CliRunner().invoke(app, ["sample", "--teacher", str(folder), "--prompt", "a red car", "--steps", "2",
                                      "--num-per-prompt", "3", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "out").glob("*.png"))
    assert len(files) == 3 and all(Image.open(f).mode == "L" and Image.open(f).size == (8, 8) for f in files)
