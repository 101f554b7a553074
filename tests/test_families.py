"""Teacher families (rapm.families): a folder's facts without loading weights, and the family each module asks."""

import pytest

from rapm.families import FAMILIES, denoiser_family, family_named, read_teacher_info, supported_pipelines
from rapm.families.base import TeacherError
from rapm.teacher import load_teacher


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_read_teacher_info_gives_a_folders_facts_as_the_loaded_teacher_has_them(name, tiny_sd, tiny_sdxl):
    folder = {"sd": tiny_sd, "sdxl": tiny_sdxl}[name]
    info = read_teacher_info(folder)
    teacher = load_teacher(folder, text_encoders=False)
    assert info.family is family_named(name) and teacher.family_def is info.family
    assert info.latent_shape == teacher.latent_shape and info.scheduler_config == teacher.scheduler_config
    assert info.vae_scale_factor == teacher.vae_scale_factor and info.has_vae
    assert denoiser_family(teacher.unet).denoiser_class_name == "UNet2DConditionModel"
    assert info.family.pipeline_class().__name__ == info.index["_class_name"]
    assert info.family.export_kwargs({"w": 1}, {"r": 4}) == {"unet_lora_layers": {"w": 1}, "unet_lora_adapter_metadata": {"r": 4}}


def test_the_family_defaults_are_the_ones_the_presets_and_pipelines_use():
    sd, sdxl = family_named("sd"), family_named("sdxl")
    assert (sd.preset, sdxl.preset) == ("sd15", "sdxl")
    assert (sd.default_guidance, sdxl.default_guidance) == (7.5, 5.0)  # diffusers' pipelines' guidance_scale
    assert (sd.disc_levels, sdxl.disc_levels) == ("full", "down_mid")
    assert (sd.kohya_names, sdxl.kohya_names) == ("diffusers", "ldm")
    assert supported_pipelines() == ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                                     "FluxPipeline")
    assert [f.name for f in FAMILIES] == ["sd", "sdxl", "sd3", "flux"]


def test_an_unknown_family_name_is_one_clear_error():
    with pytest.raises(TeacherError, match="teacher family must be one of 'sd', 'sdxl', 'sd3', 'flux', got 'kandinsky'"):
        family_named("kandinsky")


def test_the_digits_teacher_is_an_sd_folder_with_its_own_guidance_and_preset():
    from rapm.config import PRESETS, default_preset
    from rapm.plugins import plugin_for, teacher_file

    assert read_teacher_info("digits").family.name == "sd" and not read_teacher_info("digits").has_vae
    assert teacher_file("digits")["guidance"] == 1.5 and default_preset("digits", "sd") == "digits" in PRESETS
    assert plugin_for("digits").name == "digits"
