"""Teachers load from diffusers folders saved with save_pretrained; SD and SDXL go through one denoiser call."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from rapm.families.base import TeacherError
from rapm.teacher import load_teacher


def test_sd_teacher_matches_the_diffusers_pipeline(tiny_sd):
    teacher = load_teacher(tiny_sd, vae=True)
    assert teacher.family == "sd" and teacher.latent_shape == (4, 8, 8) and teacher.image_size == 16
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    cond, uncond = teacher.encode_prompts(["a photo of a cat", "a red car"], negative_prompt="dog")
    ref_cond, ref_uncond = pipe.encode_prompt(["a photo of a cat", "a red car"], "cpu", 1, True, negative_prompt=["dog", "dog"])
    torch.testing.assert_close(cond.prompt_embeds, ref_cond)
    torch.testing.assert_close(uncond.prompt_embeds, ref_uncond)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 10])
    ref = pipe.unet(z, t, encoder_hidden_states=ref_cond).sample
    torch.testing.assert_close(teacher.unet_output(z, t, cond), ref)


def test_sdxl_teacher_has_pooled_embeddings_and_time_ids(tiny_sdxl):
    teacher = load_teacher(tiny_sdxl)
    assert teacher.family == "sdxl" and teacher.vae is None  # the VAE is loaded only when asked for
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    cond, uncond = teacher.encode_prompts(["a photo of a dog"])
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt("a photo of a dog", device="cpu")
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    torch.testing.assert_close(cond.pooled_embeds, pooled)
    # SDXL's pipelines use zeros for an absent negative prompt (force_zeros_for_empty_prompt).
    assert uncond.prompt_embeds.abs().sum() == 0 and torch.equal(uncond.prompt_embeds, neg)
    assert cond.time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]
    z = torch.randn(1, 4, 8, 8)
    ref = pipe.unet(z, torch.tensor([500]), encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": cond.time_ids}).sample
    torch.testing.assert_close(teacher.unet_output(z, torch.tensor([500]), cond), ref)


def test_v_prediction_teacher_loads(tiny_sd_v):
    assert load_teacher(tiny_sd_v, text_encoders=False).schedule.prediction_type == "v_prediction"


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        load_teacher(tmp_path / "nope")


def test_folder_without_model_index_says_so(tmp_path):
    with pytest.raises(TeacherError, match="model_index.json is missing"):
        load_teacher(tmp_path)


def test_unsupported_pipeline_class(tmp_path, tiny_sd):
    folder = tmp_path / "kandinsky"
    shutil.copytree(tiny_sd, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(TeacherError, match="_class_name 'KandinskyPipeline' is not supported"):
        load_teacher(folder)


def test_missing_unet_subfolder_is_named(tmp_path, tiny_sd):
    folder = tmp_path / "nounet"
    shutil.copytree(tiny_sd, folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(TeacherError, match="unet is missing"):
        load_teacher(folder)


def test_unsupported_prediction_type_names_the_file(tmp_path, tiny_sd):
    folder = tmp_path / "sample_pred"
    shutil.copytree(tiny_sd, folder)
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "prediction_type": "sample"}))
    with pytest.raises(TeacherError, match=r"scheduler_config.json: prediction_type 'sample'"):
        load_teacher(folder)


def test_cli_prints_the_error_without_a_traceback(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "rapm", "train", "--teacher", str(tmp_path / "missing"), "--store",
                          str(tmp_path / "store"), "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 1 and "error: teacher path" in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr
