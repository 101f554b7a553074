"""The exported LoRA is the student: a fresh diffusers pipeline with it (loaded or fused) gives rapm's samples."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from typer.testing import CliRunner

from rapm.export import (DIFFUSERS_WEIGHT_NAME, FACTS_NAME, KOHYA_WEIGHT_NAME, ExportError, adapter_state_dict,
                         base_unet_fingerprint, export_lora)
from rapm.roles import DISCRIMINATOR, STUDENT, LoraSpec, add_roles, lora_parameters
from rapm.sample import generate
from rapm.teacher import BUILTIN_TEACHERS, load_teacher


PROMPT, SEED, STEPS = "a photo of a red car", 7, 4
RANK, ALPHA = 4, 2.0  # alpha != rank: a loader that drops alpha gives another student


def build_pixel_teacher(folder: Path) -> Path:
    """A tiny SD pipeline without a VAE (vae [null, null]), shaped like the built-in digits teacher."""
    from diffusers import UNet2DConditionModel

    from rapm.tiny import SD_SCHEDULER, _text_encoder, build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(["a", "photo", "of", "red", "car"], model_max_length=16)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=_text_encoder(len(tokenizer), 32, None, 16, tokenizer.convert_tokens_to_ids("<|endoftext|>")),
        tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def make_student(folder, seed: int = 0):
    """The teacher with a student adapter (random nonzero B) and a discriminator adapter, as after training."""
    teacher = load_teacher(folder)
    add_roles(teacher.unet, LoraSpec(rank=RANK, alpha=ALPHA), LoraSpec(rank=2, alpha=2.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(teacher.unet, STUDENT).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for p in lora_parameters(teacher.unet, DISCRIMINATOR).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return teacher


def pipeline_latents(folder, family, lora_dir=None, weight_name=None, fuse=False):
    """What a user gets: a fresh pipeline, the LoRA, DDIM trailing at N steps, guidance 1, a seeded CPU generator."""
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    index = json.loads((Path(folder) / "model_index.json").read_text())
    pipe = cls.from_pretrained(folder, **({"vae": None} if index["vae"][0] is None else {}))  # a pixel-space teacher
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False
    )
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir), **({"weight_name": weight_name} if weight_name else {}))
    out = {"pipe": pipe}
    run = lambda: pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(SEED)).images
    out["loaded"] = run()
    if fuse:
        pipe.fuse_lora()
        out["fused"] = run()
    return out


FAMILIES = ["sd", "sdxl", "pixel", "digits"]


@pytest.fixture(scope="module")
def exported(tiny_sd, tiny_sdxl, tmp_path_factory):
    """Per family: the teacher folder, the student in memory, its samples, and both exports."""
    cache = {}

    def get(name):
        if name in cache:
            return cache[name]
        if name == "digits":
            folder = BUILTIN_TEACHERS["digits"]
            if not (folder / "model_index.json").exists():
                pytest.skip("the built-in digits teacher is not built yet (rapm/demo/teacher)")
        elif name == "pixel":
            folder = build_pixel_teacher(tmp_path_factory.mktemp("pixel") / "teacher")
        else:
            folder = {"sd": tiny_sd, "sdxl": tiny_sdxl}[name]
        teacher = make_student(folder)
        root = tmp_path_factory.mktemp(f"export_{name}")
        item = types.SimpleNamespace(
            folder=folder, teacher=teacher, family=teacher.family,
            latents=generate(teacher, [PROMPT], [SEED], STEPS),
            diffusers=export_lora(teacher.unet, folder, teacher.family, root / "diffusers", STEPS),
            kohya=export_lora(teacher.unet, folder, teacher.family, root / "kohya", STEPS, fmt="kohya"),
        )
        cache[name] = item
        return item

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_diffusers_pipeline_with_the_export_reproduces_the_student(exported, name):
    e = exported(name)
    assert e.diffusers == e.diffusers.parent / DIFFUSERS_WEIGHT_NAME
    teacher_only = generate(e.teacher, [PROMPT], [SEED], STEPS, role="teacher")
    assert (teacher_only - e.latents).abs().max() > 1e-2  # the LoRA changes the samples: the check has teeth
    out = pipeline_latents(e.folder, e.family, e.diffusers.parent, fuse=True)
    scale = e.latents.abs().max()
    torch.testing.assert_close(out["loaded"], e.latents, atol=1e-4 * scale, rtol=0)
    torch.testing.assert_close(out["fused"], e.latents, atol=1e-4 * scale, rtol=0)
    config = out["pipe"].unet.peft_config[next(iter(out["pipe"].unet.peft_config))]
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)  # alpha came through the metadata


@pytest.mark.parametrize("name", ["sd", "sdxl", "pixel"])
def test_kohya_export_loads_every_module_and_gives_the_same_latents(exported, name):
    e = exported(name)
    student = adapter_state_dict(e.teacher.unet, STUDENT)
    with safe_open(str(e.kohya), "pt") as f:
        keys = set(f.keys())
    modules = {k.rsplit(".lora_", 1)[0] for k in student}
    assert {k.split(".")[0] for k in keys} == {"lora_unet_" + m.replace(".", "_") for m in modules}
    assert any("time_emb_proj" in k for k in keys) and any("conv1" in k for k in keys)
    assert len(keys) == 3 * len(modules)  # lora_down, lora_up, alpha for each module

    out = pipeline_latents(e.folder, e.family, e.kohya.parent, weight_name=KOHYA_WEIGHT_NAME)
    unet = out["pipe"].unet
    loaded = adapter_state_dict(unet, next(iter(unet.peft_config)))
    assert set(loaded) == set(student)  # diffusers' converter placed every key, conv and time_emb_proj included
    for k, v in student.items():
        torch.testing.assert_close(loaded[k], v, atol=0, rtol=0)
    reference = pipeline_latents(e.folder, e.family, e.diffusers.parent)["loaded"]
    torch.testing.assert_close(out["loaded"], reference, atol=1e-5 * reference.abs().max(), rtol=0)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_discriminator_adapter_is_never_exported(exported, fmt):
    e = exported("sd")
    path = getattr(e, fmt)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert not any(DISCRIMINATOR in k for k in tensors)
    ranks = {v.shape[0] for k, v in tensors.items() if "lora_A" in k or "lora_down" in k}
    assert ranks == {RANK}  # the discriminator's rank is 2
    student = adapter_state_dict(e.teacher.unet, STUDENT)
    assert len(tensors) == len(student) * (1 if fmt == "diffusers" else 1.5)
    if fmt == "diffusers":
        assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == ALPHA


def test_model_card_and_facts_say_how_to_sample(exported):
    e = exported("sd")
    folder = e.diffusers.parent
    facts = json.loads((folder / FACTS_NAME).read_text())
    assert facts["teacher_family"] == "sd" and facts["steps"] == STEPS
    assert facts["timesteps"] == [999, 749, 499, 249, -1]
    assert facts["scheduler"] == {"class": "DDIMScheduler", "timestep_spacing": "trailing", "clip_sample": False,
                                  "set_alpha_to_one": False, "num_inference_steps": STEPS, "guidance_scale": 1.0}
    assert (facts["lora"]["rank"], facts["lora"]["alpha"]) == (RANK, ALPHA)
    assert facts["base_unet_fingerprint"] == base_unet_fingerprint(load_teacher(e.folder, text_encoders=False).unet)
    card = (folder / "README.md").read_text()
    for needle in (str(e.folder), 'timestep_spacing="trailing"', "clip_sample=False", "set_alpha_to_one=False",
                   f"num_inference_steps={STEPS}", "guidance_scale=1.0", "load_lora_weights", "fuse_lora"):
        assert needle in card
    assert sorted(p.name for p in folder.parent.iterdir()) == ["diffusers", "kohya"]  # no temp folders left


def test_export_is_all_or_nothing(exported, tmp_path):
    e = exported("sd")
    out = tmp_path / "lora"
    with pytest.raises(ExportError, match="no 'nope' adapter"):
        export_lora(e.teacher.unet, e.folder, "sd", out, STEPS, adapter="nope")
    assert list(tmp_path.iterdir()) == []
    export_lora(e.teacher.unet, e.folder, "sd", out, STEPS)
    export_lora(e.teacher.unet, e.folder, "sd", out, STEPS, fmt="kohya")  # an earlier export is replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["README.md", KOHYA_WEIGHT_NAME, FACTS_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier rapm export"):
        export_lora(e.teacher.unet, e.folder, "sd", foreign, STEPS)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_export_verb_writes_the_run_students_lora(exported, tmp_path, monkeypatch):
    from rapm.cli import app

    e = exported("sd")
    calls = []

    def load_student(run, trust_checkpoint=False):  # rapm.run's contract: the run's config with the teacher and N (the store's)
        calls.append(run)
        return e.teacher, e.teacher.unet, {"teacher": str(e.folder), "steps": STEPS, "method": "rapm"}

    import rapm.run

    monkeypatch.setattr(rapm.run, "load_student", load_student)
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "lora"), "--format", "kohya"])
    assert result.exit_code == 0, result.output
    assert calls == [tmp_path / "run"]
    facts = json.loads((tmp_path / "lora" / FACTS_NAME).read_text())
    assert facts["format"] == "kohya" and facts["steps"] == STEPS and facts["training"]["method"] == "rapm"
    assert (tmp_path / "lora" / KOHYA_WEIGHT_NAME).exists()


def test_card_warns_when_n_does_not_divide_the_schedule(exported, tmp_path):
    e = exported("sd")
    export_lora(e.teacher.unet, e.folder, "sd", tmp_path / "lora3", 3)
    facts = json.loads((tmp_path / "lora3" / FACTS_NAME).read_text())
    assert facts["timesteps"] == [999, 666, 332, -1]  # diffusers' DDIMScheduler steps 666 -> 333 instead
    assert "3 does not divide 1000" in (tmp_path / "lora3" / "README.md").read_text()
