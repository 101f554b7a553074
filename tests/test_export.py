"""The exported LoRA is the student: a fresh diffusers pipeline with it (loaded or fused) gives rapm's samples."""

import hashlib
import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from typer.testing import CliRunner

from rapm.export import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, ExportError, adapter_state_dict, export_lora
from rapm.families import BUILTIN_TEACHERS
from rapm.lora import FACTS_NAME, base_unet_fingerprint
from rapm.roles import DISCRIMINATOR, STUDENT, LoraSpec, add_roles, lora_parameters
from rapm.sample import generate
from rapm.teacher import load_teacher


PROMPT, SEED, STEPS = "a photo of a red car", 7, 4
RANK, ALPHA = 4, 2.0  # alpha != rank: a loader that drops alpha gives another student


def build_pixel_teacher(folder: Path) -> Path:
    """A tiny SD pipeline without a VAE (vae [null, null]), shaped like the built-in digits teacher."""
    from diffusers import UNet2DConditionModel

    from rapm.demo.clip import SD_SCHEDULER, build_clip_tokenizer, clip_text_encoder

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(["a", "photo", "of", "red", "car"], model_max_length=16)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=clip_text_encoder(len(tokenizer), 32, None, 16, tokenizer.convert_tokens_to_ids("<|endoftext|>")),
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
    names = {k.split(".")[0] for k in keys}
    if e.family == "sdxl":  # sd-scripts' LDM names (checked module by module in test_sdxl_kohya_keys_are_...)
        assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for n in names)
        assert any("emb_layers_1" in n for n in names) and any("in_layers_2" in n for n in names)
    else:  # SD 1.x / 2.x: sd-scripts keeps diffusers' module names
        assert names == {"lora_unet_" + m.replace(".", "_") for m in modules}
        assert any("time_emb_proj" in k for k in keys) and any("conv1" in k for k in keys)
    assert len(keys) == 3 * len(modules)  # lora_down, lora_up, alpha for each module

    out = pipeline_latents(e.folder, e.family, e.kohya.parent, weight_name=KOHYA_WEIGHT_NAME)
    teacher_only = pipeline_latents(e.folder, e.family)["loaded"]
    assert (out["loaded"] - teacher_only).abs().max() > 1e-2  # the LoRA's B matrices are nonzero: the check has teeth
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

    import rapm.export  # the verb looks load_student up in its own module

    monkeypatch.setattr(rapm.export, "load_student", load_student)
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


# --- what ComfyUI and A1111 users get: sd-scripts' names and metadata -------------------------------------------------

SDXL_BASE_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, the fields that fix its layout
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def ldm_to_diffusers_modules(unet) -> dict[str, str]:
    """{LDM module: diffusers module} for every module with weights, checked through diffusers' own LDM converter.

    rapm names every parameter of the UNet in the LDM layout; diffusers' ``convert_ldm_unet_checkpoint`` (which
    reads original SD/SDXL checkpoints) must turn that checkpoint back into exactly the UNet's own state dict.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from rapm.export import ldm_block_map, ldm_module_name

    blocks = ldm_block_map(unet.config)
    keys = [k for k in unet.state_dict() if "lora_" not in k]
    ldm = {}
    for i, key in enumerate(keys):
        module, _, param = key.rpartition(".")
        ldm[f"model.diffusion_model.{ldm_module_name(module.replace('.base_layer', ''), blocks)}.{param}"] = torch.tensor(i)
    assert len(ldm) == len(keys)  # no two diffusers names share an LDM name
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert {k.replace(".base_layer", ""): int(v) for k, v in back.items()} == {
        k.replace(".base_layer", ""): i for i, k in enumerate(keys)}
    return {k[len("model.diffusion_model."):].rpartition(".")[0]: keys[int(v)].rpartition(".")[0].replace(".base_layer", "")
            for k, v in ldm.items()}


def test_sdxl_kohya_keys_are_sd_scripts_ldm_names_of_real_modules(exported):
    """Every kohya key of the SDXL export is `lora_unet_` + a module of the LDM UNet (ComfyUI's and A1111's lookup),
    and that module, by diffusers' LDM converter, is the one the student's weights belong to."""
    e = exported("sdxl")
    modules = ldm_to_diffusers_modules(e.teacher.unet)
    lookup = {"lora_unet_" + ldm.replace(".", "_"): diffusers for ldm, diffusers in modules.items()}
    student = adapter_state_dict(e.teacher.unet, STUDENT)
    with safe_open(str(e.kohya), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = {k.split(".")[0] for k in tensors}
    assert names <= set(lookup), sorted(names - set(lookup))[:3]
    assert {lookup[n] for n in names} == {k.rsplit(".lora_", 1)[0] for k in student}  # one module each, none left out
    for n in names:
        torch.testing.assert_close(tensors[f"{n}.lora_down.weight"], student[f"{lookup[n]}.lora_A.weight"], atol=0, rtol=0)
        torch.testing.assert_close(tensors[f"{n}.lora_up.weight"], student[f"{lookup[n]}.lora_B.weight"], atol=0, rtol=0)
        assert tensors[f"{n}.alpha"].item() == ALPHA


def test_the_ldm_names_of_the_real_sdxl_unet_are_sd_scripts_names():
    """On SDXL base's own layout (built without weights): all 788 LoRA modules get LDM names diffusers maps back."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from rapm.roles import PCM_TARGET_MODULES

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
    modules = ldm_to_diffusers_modules(unet)
    targets = {d for d in modules.values() if any(d == t or d.endswith("." + t) for t in PCM_TARGET_MODULES)}
    assert len(targets) == 788
    names = {"lora_unet_" + ldm.replace(".", "_") for ldm, d in modules.items() if d in targets}
    for known in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_3_0_op",
                  "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_input_blocks_1_0_emb_layers_1",
                  "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2", "lora_unet_middle_block_2_in_layers_2",
                  "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv",  # the upsamplers A1111's
                  "lora_unet_output_blocks_8_0_out_layers_3"):                             # diffusers-name map misplaces
        assert known in names, known


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_kohya_file_describes_itself_as_sd_scripts_and_the_sai_model_spec_do(exported, name):
    e = exported(name)
    raw = e.kohya.read_bytes()
    with safe_open(str(e.kohya), "pt") as f:
        meta = f.metadata()
    sdxl = name == "sdxl"
    expected = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA),
        "ss_network_args": json.dumps({"conv_dim": str(RANK), "conv_alpha": str(ALPHA)}),  # 3x3 convs are trained
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1", "ss_v2": "False",
        "ss_output_name": KOHYA_WEIGHT_NAME.removesuffix(".safetensors"),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
        "modelspec.resolution": "16x16",  # the tiny teachers: 8x8 latents, VAE factor 2
        "modelspec.prediction_type": "epsilon",
        "rapm.steps": str(STEPS), "rapm.guidance_scale": "1.0", "rapm.teacher_family": e.family,
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert abs(float(meta["ss_training_finished_at"]) - time.time()) < 3600 and meta["modelspec.title"]
    assert json.loads(meta["rapm.scheduler"])["timestep_spacing"] == "trailing"
    for hint in (meta["modelspec.usage_hint"], meta["rapm.usage"]):
        assert f"{STEPS} steps, guidance (CFG) 1.0" in hint and "trailing" in hint and "sgm_uniform" in hint
    # sd-webui-additional-networks' hashes: sha256 of the tensor bytes after the header; the legacy one of the 64 KiB
    # at 1 MiB of the file written with only its ss_* keys (nothing there in a file this small)
    header = 8 + int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[header:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]


def test_the_legacy_hash_reads_the_file_at_one_mebibyte(tmp_path):
    from safetensors.torch import save_file

    from rapm.export import additional_network_hashes

    tensors = {"a.weight": torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))}  # 2 MiB
    meta = {"ss_network_dim": "4", "modelspec.title": "not hashed"}
    save_file(tensors, str(tmp_path / "f.safetensors"), metadata={"ss_network_dim": "4"})
    raw = (tmp_path / "f.safetensors").read_bytes()
    assert additional_network_hashes(tensors, meta) == (
        hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest(), hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8])


def test_sd2_and_v_prediction_teachers_get_their_own_base_model_version():
    from rapm.export import base_model_version, sai_architecture

    assert base_model_version("sd", {"cross_attention_dim": 768}) == ("sd_v1", False)
    assert base_model_version("sd", {"cross_attention_dim": 1024}) == ("sd_v2", True)
    assert sai_architecture("sd", True, "v_prediction") == "stable-diffusion-v2-768-v/lora"
    assert sai_architecture("sd", True, "epsilon") == "stable-diffusion-v2-512/lora"


def test_diffusers_file_carries_the_sampling_settings_too(exported):
    e = exported("sd")
    with safe_open(str(e.diffusers), "pt") as f:
        meta = f.metadata()
    facts = json.loads((e.diffusers.parent / FACTS_NAME).read_text())
    assert meta["rapm.steps"] == str(STEPS) and json.loads(meta["rapm.timesteps"]) == facts["timesteps"]
    assert json.loads(meta["rapm.scheduler"]) == facts["scheduler"]
    assert meta["rapm.base_unet_fingerprint"] == facts["base_unet_fingerprint"]
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == ALPHA  # diffusers' own key kept


def test_default_export_writes_both_files_and_says_which_client_loads_which(exported, tmp_path, monkeypatch):
    from rapm.cli import app

    e = exported("sd")
    import rapm.export  # the verb looks load_student up in its own module

    monkeypatch.setattr(rapm.export, "load_student", lambda run, trust_checkpoint=False: (
        e.teacher, e.teacher.unet, {"teacher": str(e.folder), "steps": STEPS, "step": 7}))
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "lora"
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", FACTS_NAME, DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME])
    assert f"{KOHYA_WEIGHT_NAME} (kohya: ComfyUI" in result.output and f"{DIFFUSERS_WEIGHT_NAME} (diffusers" in result.output
    card = (out / "README.md").read_text()
    assert "ComfyUI/models/loras/" in card and "sgm_uniform" in card and "SGM Uniform" in card
    with safe_open(str(out / KOHYA_WEIGHT_NAME), "pt") as f:
        assert f.metadata()["ss_steps"] == "7"  # the run's training iterations


def test_float16_export_is_half_the_size_and_the_same_student(exported, tmp_path):
    e = exported("sd")
    half = export_lora(e.teacher.unet, e.folder, "sd", tmp_path / "half", STEPS, dtype="float16")
    with safe_open(str(half.parent / KOHYA_WEIGHT_NAME), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {d for k, d in dtypes.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {d for k, d in dtypes.items() if k.endswith(".alpha")} == {torch.float32}
    assert half.stat().st_size < 0.6 * e.diffusers.stat().st_size
    out = pipeline_latents(e.folder, e.family, half.parent)["loaded"]
    torch.testing.assert_close(out, e.latents, atol=2e-3 * e.latents.abs().max(), rtol=0)
    with pytest.raises(ExportError, match="dtype 'float8' is not supported"):
        export_lora(e.teacher.unet, e.folder, "sd", tmp_path / "bad", STEPS, dtype="float8")


# --- issue 31: named exports, their metadata, the files' mode, --step ------------------------------------------------

def _metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_named_export_names_the_kohya_file_its_alias_and_title(exported, tmp_path):
    from rapm.lora import resolve_lora_file

    e = exported("sd")
    out = tmp_path / "lora"
    weights = export_lora(e.teacher.unet, e.folder, "sd", out, STEPS, name="my_style.safetensors")  # suffix dropped
    assert weights == out / DIFFUSERS_WEIGHT_NAME  # the name load_lora_weights(folder) finds is kept
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", FACTS_NAME, DIFFUSERS_WEIGHT_NAME, "my_style.safetensors"])
    facts = json.loads((out / FACTS_NAME).read_text())
    assert facts["files"] == {"diffusers": DIFFUSERS_WEIGHT_NAME, "kohya": "my_style.safetensors"} and facts["name"] == "my_style"
    meta = _metadata(out / "my_style.safetensors")
    assert meta["ss_output_name"] == "my_style" and meta["modelspec.title"] == "my_style"
    assert "`my_style.safetensors`" in (out / "README.md").read_text()
    for p in out.iterdir():  # safetensors writes 0600: a LoRA folder is read by other users' clients
        assert p.stat().st_mode & 0o777 == 0o644, (p.name, oct(p.stat().st_mode))
    torch.testing.assert_close(pipeline_latents(e.folder, e.family, out, weight_name="my_style.safetensors")["loaded"],
                               e.latents, atol=1e-4 * e.latents.abs().max(), rtol=0)

    (out / "NOTES.txt").write_text("mine")
    export_lora(e.teacher.unet, e.folder, "sd", out, STEPS, fmt="kohya", name="other")  # the earlier name's file goes
    assert sorted(p.name for p in out.iterdir()) == sorted(["NOTES.txt", "README.md", FACTS_NAME, "other.safetensors"])
    (out / "unrelated.safetensors").write_bytes(b"the user's")  # the folder's only LoRA is found by its facts
    assert resolve_lora_file(out) == out / "other.safetensors"


@pytest.mark.parametrize("bad", ["", "../up", "a/b", ".hidden", "pytorch_lora_weights"])
def test_a_name_that_is_no_plain_file_name_is_refused_before_anything_is_written(exported, tmp_path, bad):
    e = exported("sd")
    with pytest.raises(ExportError, match="--name"):
        export_lora(e.teacher.unet, e.folder, "sd", tmp_path / "lora", STEPS, name=bad)
    assert list(tmp_path.iterdir()) == []


def test_the_kohya_file_carries_the_runs_sd_scripts_keys_and_omits_what_rapm_does_not_know(exported, tmp_path):
    e = exported("sd")
    export_lora(e.teacher.unet, e.folder, "sd", tmp_path / "run", STEPS, run_settings={
        "learning_rate": 5e-6, "seed": 3, "mixed_precision": "bf16", "training_started_at": 1700000000.5})
    meta = _metadata(tmp_path / "run" / KOHYA_WEIGHT_NAME)
    assert {k: meta[k] for k in ("ss_sd_model_name", "ss_resolution", "ss_learning_rate", "ss_seed", "ss_mixed_precision",
                                 "ss_training_started_at")} == {
        "ss_sd_model_name": Path(e.folder).name, "ss_resolution": "(16, 16)", "ss_learning_rate": "5e-06", "ss_seed": "3",
        "ss_mixed_precision": "bf16", "ss_training_started_at": "1700000000.5"}
    export_lora(e.teacher.unet, e.folder, "sd", tmp_path / "bare", STEPS, run_settings={"seed": 0, "training_started_at": None})
    meta = _metadata(tmp_path / "bare" / KOHYA_WEIGHT_NAME)
    assert meta["ss_seed"] == "0" and meta["ss_sd_model_name"] == Path(e.folder).name
    assert not {"ss_learning_rate", "ss_mixed_precision", "ss_training_started_at"} & set(meta)  # not invented
    assert "ss_learning_rate" not in _metadata(e.kohya)  # an export of a student in memory: no run, no run keys


def test_export_verb_names_the_file_and_passes_the_runs_settings(exported, tmp_path, monkeypatch):
    from rapm.cli import app

    e = exported("sd")
    import rapm.export  # the verb looks load_student up in its own module

    calls = []

    def load_student(run, trust_checkpoint=False, step=None):
        calls.append(step)
        return e.teacher, e.teacher.unet, {"teacher": str(e.folder), "steps": STEPS, "step": 4, "lr": 1e-4, "seed": 2,
                                           "mixed_precision": "no", "training_started_at": 1.5}

    monkeypatch.setattr(rapm.export, "load_student", load_student)
    out = tmp_path / "lora"
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "run"), "--out", str(out), "--name", "cars",
                                      "--step", "4"])
    assert result.exit_code == 0, result.output
    assert calls == [4] and f"wrote {out / 'cars.safetensors'} (kohya" in result.output
    assert f"sample with {STEPS} steps, guidance 1, DDIM trailing" in result.output
    meta = _metadata(out / "cars.safetensors")
    assert (meta["ss_output_name"], meta["ss_learning_rate"], meta["ss_seed"], meta["ss_mixed_precision"],
            meta["ss_training_started_at"], meta["ss_steps"]) == ("cars", "0.0001", "2", "no", "1.5", "4")


def test_a_full_disk_is_one_error_line_and_the_earlier_export_stays_byte_identical(exported, tmp_path, monkeypatch, capsys):
    """Issue 34: safetensors reports ENOSPC as a SafetensorError, which printed a traceback."""
    import errno
    import threading
    import warnings

    import rapm.export  # the verb looks load_student up in its own module
    import safetensors.torch
    from safetensors import SafetensorError

    from rapm.cli import main

    e = exported("sd")
    monkeypatch.setattr(rapm.export, "load_student", lambda run, trust_checkpoint=False: (
        e.teacher, e.teacher.unet, {"teacher": str(e.folder), "steps": STEPS, "step": 7}))
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets them: put back after
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    out = tmp_path / "lora"
    export_lora(e.teacher.unet, e.folder, "sd", out, STEPS)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = safetensors.torch.save_file
    faults = [SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
              OSError(errno.ENOSPC, "No space left on device")]
    for fault in faults:
        def full(tensors, filename, metadata=None, _fault=fault):
            if "kohya" in str(filename):  # the second file: the first one is already in the staging folder
                raise _fault
            return real(tensors, filename, metadata=metadata)

        monkeypatch.setattr(safetensors.torch, "save_file", full)
        monkeypatch.setattr(sys, "argv", ["rapm", "export", "--run", str(tmp_path / "run"), "--out", str(out)])
        with pytest.raises(SystemExit) as exited:
            main()
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert exited.value.code == 1 and "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith(f"error: --out {out}: cannot be written (No space left on device)"), err
        assert f"free space in {tmp_path} or choose another --out" in lines[0], err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export, byte for byte
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no staging folder left


# ---- issue 31, point 3: a thumbnail, the Hub's front matter, only the settings that applied ----

def _cells(colors, size):
    from PIL import Image

    return [Image.new("RGB", (size, size), c) for c in colors]


def _export_run(monkeypatch, tmp_path, e, config, *args):
    from rapm.cli import app
    import rapm.export  # the verb looks load_student up in its own module

    monkeypatch.setattr(rapm.export, "load_student",
                        lambda run, trust_checkpoint=False, step=None: (e.teacher, e.teacher.unet, config))
    out = tmp_path / "lora"
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "run"), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_an_export_of_a_sampled_step_has_the_students_images_as_thumbnail_in_the_folder_and_the_kohya_file(
        exported, tmp_path, monkeypatch):
    import base64
    import io

    from PIL import Image

    from rapm.images import save_grid, screen_scale

    e = exported("sd")
    size = 16 * screen_scale(16)  # the tiny teacher's 16 px images as the run's grids hold them (ss_resolution (16, 16))
    student = [(250, 10 * i, 0) for i in range(6)]  # six samples: the top row is the student's, the bottom the teacher's
    save_grid(_cells(student + [(0, 0, 250)] * 6, size), tmp_path / "run" / "samples" / "step-00000004.png", nrow=6)
    save_grid(_cells([(0, 0, 250)] * 12, size), tmp_path / "run" / "samples" / "step-00000002.png", nrow=6)  # another step
    config = {"teacher": str(e.folder), "steps": STEPS, "step": 4}
    out, output = _export_run(monkeypatch, tmp_path, e, config)

    png = (out / "thumbnail.png").read_bytes()
    thumb = Image.open(io.BytesIO(png)).convert("RGB")
    assert max(thumb.size) <= 256 and thumb.size == (2 * size + 6, 2 * size + 6)  # the first four, 2 x 2, at 1x
    centers = [thumb.getpixel((2 + c * (size + 2) + size // 2, 2 + r * (size + 2) + size // 2))
               for r in (0, 1) for c in (0, 1)]
    assert centers == student[:4]  # the student's own images, in order; none of the teacher's (blue) row
    assert not any(b > 100 for _, _, b in thumb.getdata())
    meta = _metadata(out / KOHYA_WEIGHT_NAME)
    assert meta["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    assert "modelspec.thumbnail" not in _metadata(out / DIFFUSERS_WEIGHT_NAME)
    facts = json.loads((out / FACTS_NAME).read_text())
    assert facts["thumbnail"] == {"file": "thumbnail.png", "size": list(thumb.size), "bytes": len(png),
                                  "source": "samples/step-00000004.png"}
    assert "![the student's samples](thumbnail.png)" in (out / "README.md").read_text()
    assert (out / "thumbnail.png").stat().st_mode & 0o777 == 0o644

    # the user's own preview prompts' grid (student only) goes first: its three images, not the training grid's
    own = [(0, 200, 0), (0, 210, 0), (0, 220, 0)]
    save_grid(_cells(own, size), tmp_path / "run" / "samples" / "prompts-step-00000004.png")
    out, _ = _export_run(monkeypatch, tmp_path, e, {**config, "sample_prompts": ["a", "b", "c"]})
    thumb = Image.open(out / "thumbnail.png").convert("RGB")
    assert thumb.size == (3 * size + 8, size + 4)
    assert [thumb.getpixel((2 + c * (size + 2) + size // 2, 2 + size // 2)) for c in range(3)] == own

    # a step with no grid of its own (checkpointed, not sampled): no thumbnail, not an earlier step's; the old one goes
    out, output = _export_run(monkeypatch, tmp_path, e, {**config, "step": 3}, "--step", "3")
    assert not (out / "thumbnail.png").exists() and "modelspec.thumbnail" not in _metadata(out / KOHYA_WEIGHT_NAME)
    assert "no thumbnail: the run has no sample grid of step 3" in output
    assert "thumbnail" not in json.loads((out / FACTS_NAME).read_text())


def test_a_big_grid_makes_a_thumbnail_of_at_most_256_pixels():
    from PIL import Image

    from rapm.export import _fit, _tile

    thumb = _fit(_tile(_cells([(1, 2, 3)] * 4, 1024)))
    assert max(thumb.size) == 256 and thumb.size[0] == thumb.size[1]
    assert _fit(Image.new("RGB", (100, 50))).size == (100, 50)  # never enlarged


def test_the_card_has_the_hubs_front_matter_and_only_the_settings_that_applied(exported, tmp_path):
    from huggingface_hub import ModelCard

    from rapm import config as cfg
    from rapm.export import applied_settings
    from rapm.methods import resolve

    e = exported("sd")
    full = cfg.to_dict(resolve(cfg.TrainConfig(teacher=str(e.folder), store=str(tmp_path / "store"))))
    assert full["adv_weight"] == 0 and full["ema_decay"] > 0  # the default recipe: no discriminator, an EMA
    export_lora(e.teacher.unet, e.folder, "sd", tmp_path / "plain", STEPS, extra_card={"run": "r", **applied_settings(full)})
    card = ModelCard.load(tmp_path / "plain" / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.tags == ["lora", "text-to-image", "diffusers", "rapm", "stable-diffusion"]
    assert card.data.base_model is None  # a local teacher: no Hub id to name
    assert card.content.startswith("---\n") and card.text.lstrip().startswith("# 4-step student LoRA")
    training = card.text.split("## Training", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip() for line in training.splitlines() if line.startswith("| ") and "---" not in line}
    assert not {r for r in rows if r.startswith("disc_") or r in ("gan_loss", "updates")}  # the unused discriminator
    assert {"adv_weight", "ema_decay", "ema_warmup", "lr", "lora_rank", "huber_c"} <= rows
    assert not {"rdd_features", "rdd_queue_size", "progressive_start_steps", "real_data", "preset"} & rows
    assert "Not listed, as this run trains no discriminator: `gan_loss`" in training and "`disc_lr`" in training
    facts = json.loads((tmp_path / "plain" / FACTS_NAME).read_text())
    assert "disc_lr" in facts["training_left_out"]["this run trains no discriminator"] and "disc_lr" not in facts["training"]

    adversarial = cfg.to_dict(resolve(cfg.TrainConfig(teacher=str(e.folder), store="s", adv_weight=0.1,
                                                          relative_weight=0.25, ema_decay=0.0)))
    settings = applied_settings(adversarial)
    assert {"disc_lr", "gan_loss", "disc_lora_rank", "adv_weight"} <= set(settings)  # trained: listed
    assert "ema_warmup" not in settings and "the student has no EMA" in settings["__left_out__"]


def test_the_cards_base_model_is_the_teachers_hub_id_where_it_has_one(tmp_path):
    from rapm.export import hub_model_id

    cache = tmp_path / "hub" / "models--stabilityai--sdxl-turbo" / "snapshots" / "abc123"
    cache.mkdir(parents=True)
    assert hub_model_id(str(cache), cache) == "stabilityai/sdxl-turbo"
    assert hub_model_id("stabilityai/sdxl-turbo", cache) == "stabilityai/sdxl-turbo"
    local = tmp_path / "my_model"
    local.mkdir()
    (local / "model_index.json").write_text(json.dumps({"_name_or_path": "runwayml/stable-diffusion-v1-5"}))
    assert hub_model_id(str(local), local) == "runwayml/stable-diffusion-v1-5"
    (local / "model_index.json").write_text(json.dumps({"_name_or_path": str(local)}))
    assert hub_model_id(str(local), local) is None and hub_model_id("digits", local) is None
