"""The ComfyUI file of a FLUX / SD3 student (issue 31): sd-scripts' layout in the native module names.

ComfyUI (comfy/lora.py, ``model_lora_keys_unet``) looks a LoRA key up as ``lora_unet_`` + a key of its own model's
state dict without ``diffusion_model.`` and ``.weight``, dots as underscores; its FLUX and SD3 models are BFL's and
SAI's reference implementations, whose module names and fused Linears (comfy/utils.py ``flux_to_diffusers`` /
``mmdit_to_diffusers``: which diffusers weights sit in which rows, and where (shift, scale) is swapped) the tables
below restate from the diffusers transformer's config, independently of ``rapm.export.native_layout``. Every test
scales the trained B matrices up first: a two-iteration LoRA moves the outputs by ~1e-5 only.
"""

import json

import pytest
import torch
from safetensors import safe_open

from rapm.families.flow import pack_latents
from rapm.roles import STUDENT
from tests import flow_reference as ref
from tests.cli_run import invoke_ok as _invoke
from tests.tiny_flow import BUILD, IMAGE, LATENT, MAX_TOKENS, build_tiny_flux, load

PROMPTS = ["a photo of a cat", "a red car", "a blue dog", "a cat"]
STEPS = 2
RANK, ALPHA = 4, 8.0
KOHYA = "kohya_lora.safetensors"




@pytest.fixture(scope="module", params=["sd3", "flux"])
def run(tmp_path_factory, request):
    """A teacher, its store and a two-iteration `rapm train` run (rank 4, alpha 8), through the CLI."""
    family = request.param
    root = tmp_path_factory.mktemp(f"export_flow_{family}")
    teacher = BUILD[family](root / "teacher")
    (root / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    _invoke("trajectories", "--teacher", teacher, "--prompts", root / "prompts.txt", "--out", root / "store",
            "--steps", STEPS, "--substeps", 3, "--batch-size", 2, "--dtype", "float32", "--no-progress")
    out = root / "run"
    _invoke("train", "--out", out, "--teacher", teacher, "--store", root / "store", "--method", "rapm", "--iterations", 2,
            "--checkpoint-every", 2, "--device", "cpu", "--no-progress", "--set", "sample_every=0", "--set", "eval_every=0",
            "--set", f"lora_rank={RANK}", "--set", f"lora_alpha={ALPHA}", "--set", "disc_lora_rank=4")
    return family, root, teacher, out


def _scale_up(transformer, scale=0.2):
    with torch.no_grad():  # a trained B is ~lr small: make the student far from the teacher, or nothing can fail
        for name, p in transformer.named_parameters():
            if "lora_B" in name and f".{STUDENT}." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * scale)


@pytest.fixture(scope="module")
def exported(run):
    """The run's student with B scaled up, exported (both files) by rapm.export.export_lora."""
    from rapm.export import export_lora
    from rapm.run import load_student

    family, root, teacher, out = run
    _, transformer, _ = load_student(out)
    _scale_up(transformer)
    folder = root / "lora-big"
    export_lora(transformer, teacher, family, folder, STEPS, guidance=3.5 if family == "flux" else None)
    return family, teacher, transformer, folder


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# ---- the native models, restated from the diffusers config (ComfyUI's module names and the diffusers rows) ----

def _native_modules(family, config):
    """{native module path: (out_features, in_features, [(diffusers module, first row, rows, swapped)])} of every
    Linear of the native (ComfyUI) model. FLUX: BFL's flux (double_blocks / single_blocks); SD3: SAI's MMDiT."""
    h = config.num_attention_heads * config.attention_head_dim
    mlp = 4 * h  # both models' mlp_ratio
    out = {}

    def plain(native, shape, diffusers, swapped=False):
        out[native] = (*shape, [(diffusers, 0, shape[0], swapped)])

    def fused(native, in_features, parts):  # parts [(diffusers, rows)] in row order
        rows, row = [], 0
        for name, size in parts:
            rows.append((name, row, size, False))
            row += size
        out[native] = (row, in_features, rows)

    if family == "flux":
        for i in range(config.num_layers):
            d, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
            fused(f"{d}.img_attn.qkv", h, [(f"{t}.attn.to_q", h), (f"{t}.attn.to_k", h), (f"{t}.attn.to_v", h)])
            fused(f"{d}.txt_attn.qkv", h, [(f"{t}.attn.add_q_proj", h), (f"{t}.attn.add_k_proj", h),
                                           (f"{t}.attn.add_v_proj", h)])
            plain(f"{d}.img_attn.proj", (h, h), f"{t}.attn.to_out.0")
            plain(f"{d}.txt_attn.proj", (h, h), f"{t}.attn.to_add_out")
            plain(f"{d}.img_mlp.0", (mlp, h), f"{t}.ff.net.0.proj")
            plain(f"{d}.img_mlp.2", (h, mlp), f"{t}.ff.net.2")
            plain(f"{d}.txt_mlp.0", (mlp, h), f"{t}.ff_context.net.0.proj")
            plain(f"{d}.txt_mlp.2", (h, mlp), f"{t}.ff_context.net.2")
            plain(f"{d}.img_mod.lin", (6 * h, h), f"{t}.norm1.linear")
            plain(f"{d}.txt_mod.lin", (6 * h, h), f"{t}.norm1_context.linear")
        for i in range(config.num_single_layers):
            s, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
            fused(f"{s}.linear1", h, [(f"{t}.attn.to_q", h), (f"{t}.attn.to_k", h), (f"{t}.attn.to_v", h),
                                      (f"{t}.proj_mlp", mlp)])
            plain(f"{s}.linear2", (h, h + mlp), f"{t}.proj_out")
            plain(f"{s}.modulation.lin", (3 * h, h), f"{t}.norm.linear")
        plain("img_in", (h, config.in_channels), "x_embedder")
        plain("txt_in", (h, config.joint_attention_dim), "context_embedder")
        for native, emb, width in (("time_in", "timestep_embedder", 256), ("vector_in", "text_embedder",
                                                                            config.pooled_projection_dim),
                                   ("guidance_in", "guidance_embedder", 256)):
            plain(f"{native}.in_layer", (h, width), f"time_text_embed.{emb}.linear_1")
            plain(f"{native}.out_layer", (h, h), f"time_text_embed.{emb}.linear_2")
        out_channels = config.out_channels or config.in_channels
        plain("final_layer.linear", (config.patch_size ** 2 * out_channels, h), "proj_out")
    else:
        depth = config.num_layers
        for i in range(depth):
            j, t = f"joint_blocks.{i}", f"transformer_blocks.{i}"
            fused(f"{j}.x_block.attn.qkv", h, [(f"{t}.attn.to_q", h), (f"{t}.attn.to_k", h), (f"{t}.attn.to_v", h)])
            plain(f"{j}.x_block.attn.proj", (h, h), f"{t}.attn.to_out.0")
            plain(f"{j}.x_block.mlp.fc1", (mlp, h), f"{t}.ff.net.0.proj")
            plain(f"{j}.x_block.mlp.fc2", (h, mlp), f"{t}.ff.net.2")
            plain(f"{j}.x_block.adaLN_modulation.1", (6 * h, h), f"{t}.norm1.linear")
            fused(f"{j}.context_block.attn.qkv", h, [(f"{t}.attn.add_q_proj", h), (f"{t}.attn.add_k_proj", h),
                                                     (f"{t}.attn.add_v_proj", h)])
            if i < depth - 1:
                plain(f"{j}.context_block.attn.proj", (h, h), f"{t}.attn.to_add_out")
                plain(f"{j}.context_block.mlp.fc1", (mlp, h), f"{t}.ff_context.net.0.proj")
                plain(f"{j}.context_block.mlp.fc2", (h, mlp), f"{t}.ff_context.net.2")
                plain(f"{j}.context_block.adaLN_modulation.1", (6 * h, h), f"{t}.norm1_context.linear")
            else:  # the last block ends the text stream (pre_only): ComfyUI swaps its (shift, scale)
                plain(f"{j}.context_block.adaLN_modulation.1", (2 * h, h), f"{t}.norm1_context.linear", swapped=True)
        plain("context_embedder", (h, config.joint_attention_dim), "context_embedder")
        plain("t_embedder.mlp.0", (h, 256), "time_text_embed.timestep_embedder.linear_1")
        plain("t_embedder.mlp.2", (h, h), "time_text_embed.timestep_embedder.linear_2")
        plain("y_embedder.mlp.0", (h, config.pooled_projection_dim), "time_text_embed.text_embedder.linear_1")
        plain("y_embedder.mlp.2", (h, h), "time_text_embed.text_embedder.linear_2")
        plain("final_layer.linear", (config.patch_size ** 2 * config.out_channels, h), "proj_out")
    plain("final_layer.adaLN_modulation.1", (2 * h, h), "norm_out.linear", swapped=True)
    return out


def _comfyui_load(kohya: dict, family, config):
    """What ComfyUI's load_lora does with the file on the native model: {native module: (up, down, alpha)}, and the
    keys it would warn about ("lora key not loaded")."""
    key_map = {"lora_unet_" + native.replace(".", "_"): native for native in _native_modules(family, config)}
    patches, loaded = {}, set()
    for x, native in key_map.items():
        if f"{x}.lora_up.weight" in kohya:
            names = (f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.alpha")
            patches[native] = tuple(kohya.get(n) for n in names)
            loaded.update(n for n in names if n in kohya)
    return patches, sorted(set(kohya) - loaded)


def _delta(up, down, alpha):
    """The weight change ComfyUI (and sd-scripts) apply: up @ down · alpha / rank, rank = down's rows."""
    return (up.double() @ down.double()) * (float(alpha) / down.shape[0])


def _peft_delta(transformer, module):
    """A diffusers module's student weight change as peft computes it: B @ A · lora_alpha / r."""
    layer = transformer.get_submodule(module)
    a, b = layer.lora_A[STUDENT].weight, layer.lora_B[STUDENT].weight
    return (b.double() @ a.double()) * layer.scaling[STUDENT]


def _swap(rows):
    shift, scale = rows.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _targeted(transformer):
    return sorted(n for n, m in transformer.named_modules() if hasattr(m, "lora_A") and STUDENT in m.lora_A)


# ---- (a) every key maps, by ComfyUI's rules, to a module of the native model ----

def test_every_key_of_the_comfyui_file_maps_to_a_native_module_by_comfyuis_rules(exported):
    family, _, transformer, folder = exported
    kohya, _ = _read(folder / KOHYA)
    patches, not_loaded = _comfyui_load(kohya, family, transformer.config)
    assert not_loaded == []  # ComfyUI would warn "lora key not loaded" for each of these
    native = _native_modules(family, transformer.config)
    for name, (up, down, alpha) in patches.items():
        out_features, in_features, _ = native[name]
        assert up.shape[0] == out_features and down.shape[1] == in_features, name  # ComfyUI adds up @ down to it
        assert up.shape[1] == down.shape[0]
        assert alpha is not None and alpha.ndim == 0 and alpha.dtype == torch.float32, name
    # which native modules: exactly those holding a targeted diffusers module
    owners = {n for n, (_, _, parts) in native.items() for part, *_ in parts if part in set(_targeted(transformer))}
    assert set(patches) == owners
    if family == "flux":  # the single blocks' fused q/k/v + MLP input and their output, as FLUX trainers have them
        assert {"single_blocks.0.linear1", "single_blocks.0.linear2", "double_blocks.0.img_attn.qkv"} <= set(patches)
        assert "final_layer.linear" not in patches  # the final projection is not a target
    else:
        assert {"joint_blocks.1.context_block.attn.qkv", "joint_blocks.0.context_block.mlp.fc1"} <= set(patches)
        assert "joint_blocks.1.context_block.mlp.fc1" not in native  # the last block's text stream ends before it


# ---- (b) un-fusing the file gives each diffusers module's B @ A · alpha / r exactly ----

def _unfused(kohya, family, transformer):
    """Each diffusers module's weight change read back from the file: up @ down · alpha / rank, split by rows as
    ComfyUI's tables place the diffusers weights (swapped back where ComfyUI swaps)."""
    patches, not_loaded = _comfyui_load(kohya, family, transformer.config)
    assert not not_loaded
    native = _native_modules(family, transformer.config)
    deltas = {}
    for name, (up, down, alpha) in patches.items():
        delta = _delta(up, down, alpha)
        for part, row, size, swapped in native[name][2]:
            rows = delta[row:row + size]
            deltas[part] = _swap(rows) if swapped else rows
    return deltas


def test_unfusing_the_comfyui_file_gives_each_diffusers_modules_lora_exactly(exported):
    family, _, transformer, folder = exported
    kohya, _ = _read(folder / KOHYA)
    deltas = _unfused(kohya, family, transformer)
    targeted = _targeted(transformer)
    assert targeted and set(targeted) <= set(deltas)
    for module in targeted:
        expected = _peft_delta(transformer, module)
        assert expected.abs().max() > 1e-2, module  # scaled up: a wrong row or scale cannot hide
        torch.testing.assert_close(deltas[module], expected, rtol=1e-6, atol=1e-7, msg=module)
    for module in set(deltas) - set(targeted):  # a fused module's untargeted part: its rows are zero
        assert deltas[module].abs().max() == 0, module


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_swapped_and_partly_targeted_modules_unfuse_exactly(tmp_path, family):
    """Targets beyond the defaults: the modulation Linears ComfyUI swaps (norm_out; SD3's last norm1_context) and not
    all parts of a fused Linear (q and v only): the file still un-fuses to each module's LoRA, zero rows elsewhere."""
    from rapm.export import adapter_state_dict, to_native_kohya
    from rapm.roles import LoraSpec, add_roles

    pipe = load(BUILD[family](tmp_path / "teacher"))
    transformer = pipe.transformer
    targets = ["attn.to_q", "attn.to_v", "attn.add_k_proj", "norm_out.linear", "norm1.linear", "norm1_context.linear"]
    add_roles(transformer, LoraSpec(rank=3, alpha=5.0, target_modules=targets))
    _scale_up(transformer)
    kohya = to_native_kohya(adapter_state_dict(transformer), 5.0, transformer, "bfl" if family == "flux" else "mmdit")
    deltas = _unfused(kohya, family, transformer)
    for module in _targeted(transformer):
        torch.testing.assert_close(deltas[module], _peft_delta(transformer, module), rtol=1e-6, atol=1e-7, msg=module)
    qkv = "double_blocks.0.img_attn.qkv" if family == "flux" else "joint_blocks.0.x_block.attn.qkv"
    down = kohya[f"lora_unet_{qkv.replace('.', '_')}.lora_down.weight"]
    alpha = kohya[f"lora_unet_{qkv.replace('.', '_')}.alpha"]
    assert down.shape[0] == 2 * 3 and alpha.item() == 2 * 5.0  # q and v: rank 2 · 3, alpha 2 · 5, the same scale
    assert deltas["transformer_blocks.0.attn.to_k"].abs().max() == 0  # k untargeted: zero rows in the fused LoRA
    if family == "flux":
        assert deltas["single_transformer_blocks.0.proj_mlp"].abs().max() == 0
    # the swap itself: ComfyUI's native rows are (shift, scale) where diffusers' are (scale, shift)
    final = kohya["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    b = transformer.get_submodule("norm_out.linear").lora_B[STUDENT].weight
    torch.testing.assert_close(final, _swap(b))
    assert not torch.equal(final, b)


# ---- (c) diffusers loads the file back: the same latents as the diffusers file ----

def test_diffusers_loads_the_flux_comfyui_file_to_the_diffusers_files_latents(tmp_path):
    """FluxPipeline.load_lora_weights(weight_name=the kohya file) runs diffusers' converter of sd-scripts FLUX LoRAs.
    It splits a single block's linear1 at FLUX.1's widths (3072 x 3 + 12288, written into the converter), so at the
    tiny width only a transformer without single blocks can load; the single blocks are checked at FLUX.1's widths in
    the next test. SD3: diffusers has no reader of sd-scripts SD3 files; the un-fusing test above is its check."""
    from diffusers import FluxPipeline

    from rapm.export import export_lora
    from rapm.roles import add_roles
    from rapm.trajectories import initial_noise

    teacher = build_tiny_flux(tmp_path / "teacher", single_layers=0)
    pipe = load(teacher)
    add_roles(pipe.transformer, ref.flow_lora_spec("flux", rank=RANK, alpha=ALPHA))
    _scale_up(pipe.transformer)
    export_lora(pipe.transformer, teacher, "flux", tmp_path / "lora", STEPS, guidance=3.5)

    x = pack_latents(initial_noise([0, 1], (16, LATENT, LATENT)))
    kwargs = dict(prompt=PROMPTS[:2], num_inference_steps=STEPS, guidance_scale=3.5, height=IMAGE, width=IMAGE,
                  output_type="latent", max_sequence_length=MAX_TOKENS, latents=x)

    def latents(weight_name=None):
        fresh = FluxPipeline.from_pretrained(teacher, torch_dtype=torch.float32)
        if weight_name is not None:
            fresh.load_lora_weights(str(tmp_path / "lora"), weight_name=weight_name)
        return fresh(**kwargs).images

    diffusers_file, comfyui_file, base = latents("pytorch_lora_weights.safetensors"), latents(KOHYA), latents()
    assert (diffusers_file - base).abs().max() > 1e-2  # the LoRA matters: the comparison below can fail
    torch.testing.assert_close(comfyui_file, diffusers_file, rtol=1e-5, atol=1e-5)


def test_diffusers_reads_the_flux_comfyui_file_at_flux1_widths_as_each_modules_lora(tmp_path):
    """FLUX.1-dev's own transformer (19 double, 38 single blocks, on the meta device: shapes only) with a random
    rank-2 LoRA on rapm's targets: diffusers' converter gives every module back its B @ A · alpha / r (compared on
    random probe vectors: the full 3072-wide products of 418 modules would take gigabytes)."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    from rapm.export import to_native_kohya
    from benchmarks.flow_configs import meta_transformer
    from rapm.families.flow import FLUX_TARGET_MODULES
    from rapm.roles import matches_target

    transformer = meta_transformer("flux")
    g = torch.Generator().manual_seed(0)
    rank, alpha = 2, 6.0
    state, expected = {}, {}
    for name, layer in transformer.named_modules():
        if isinstance(layer, torch.nn.Linear) and matches_target(name, FLUX_TARGET_MODULES):
            a = torch.randn(rank, layer.in_features, generator=g)
            b = torch.randn(layer.out_features, rank, generator=g)
            state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
            probe = torch.randn(layer.in_features, 3, generator=g, dtype=torch.float64)
            expected[name] = (probe, (b.double() @ (a.double() @ probe)) * (alpha / rank))
    assert len(expected) == 19 * 12 + 38 * 5  # double: the twelve; single: q, k, v, proj_mlp, proj_out
    path = tmp_path / KOHYA
    save_file(to_native_kohya(state, alpha, transformer, "bfl"), str(path))
    read = FluxPipeline.lora_state_dict(str(path))
    assert {k.rsplit(".lora_", 1)[0] for k in read} == {f"transformer.{n}" for n in expected}
    for name, (probe, delta) in expected.items():
        a, b = read[f"transformer.{name}.lora_A.weight"], read[f"transformer.{name}.lora_B.weight"]
        assert delta.abs().max() > 1
        torch.testing.assert_close(b.double() @ (a.double() @ probe), delta, rtol=1e-5, atol=1e-4, msg=name)


# ---- (d) alpha tensors, metadata, the card's ComfyUI section ----

def test_the_comfyui_file_carries_alpha_tensors_sd_scripts_metadata_and_the_card_says_how_to_load_it(exported, run):
    family, teacher, transformer, folder = exported
    kohya, meta = _read(folder / KOHYA)
    modules = {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".lora_down.weight")}
    for m in modules:  # every module its alpha as a tensor, at the trained scale alpha / r = 8 / 4
        alpha, down = kohya[f"{m}.alpha"], kohya[f"{m}.lora_down.weight"]
        assert alpha.ndim == 0 and alpha.dtype == torch.float32
        assert alpha.item() / down.shape[0] == ALPHA / RANK, m
    assert len(kohya) == 3 * len(modules)
    flux = family == "flux"
    assert meta["ss_network_module"] == ("networks.lora_flux" if flux else "networks.lora_sd3")
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["modelspec.architecture"] == ("flux-1-dev/lora" if flux else "stable-diffusion-3-medium/lora")
    assert meta["modelspec.implementation"] == ("https://github.com/black-forest-labs/flux" if flux
                                                else "https://github.com/Stability-AI/generative-models")
    assert "modelspec.prediction_type" not in meta  # the spec's epsilon / v: a flow model has neither
    assert meta["modelspec.sai_model_spec"] and meta["sshs_model_hash"] and meta["sshs_legacy_hash"]
    assert "ComfyUI" in meta["modelspec.usage_hint"] and "scheduler simple" in meta["modelspec.usage_hint"]
    assert float(meta["rapm.guidance_scale"]) == (3.5 if flux else 1.0)
    assert ("guidance embedding 3.5" in meta["modelspec.description"]) == flux

    facts = json.loads((folder / "rapm_lora.json").read_text())
    comfy = facts["comfyui"]
    assert comfy["loader"] == "LoraLoaderModelOnly" and (comfy["sampler"], comfy["scheduler"]) == ("euler", "simple")
    assert comfy["steps"] == STEPS and comfy["cfg"] == 1.0
    card = (folder / "README.md").read_text()
    section = card.split("## ComfyUI", 1)[1].split("\n## ", 1)[0]
    for words in ("LoraLoaderModelOnly", f"`{KOHYA}`", "ComfyUI/models/loras", f"steps {STEPS}", "cfg 1.0",
                  "sampler `euler`", "scheduler `simple`"):
        assert words in section, words
    if flux:  # ModelSamplingFlux's own formula (μ from width · height / 256 tokens) must give the student's μ
        manifest = json.loads((run[1] / "store" / "manifest.json").read_text())
        ms = comfy["model_sampling"]
        tokens = ms["width"] * ms["height"] / (8 * 8 * 2 * 2)
        mu = ms["base_shift"] + (ms["max_shift"] - ms["base_shift"]) / (4096 - 256) * (tokens - 256)
        assert ms["node"] == "ModelSamplingFlux" and mu == pytest.approx(manifest["mu"]) == pytest.approx(ms["mu"])
        assert tokens == (LATENT // 2) ** 2  # the student's image tokens
        assert comfy["flux_guidance"] == 3.5
        assert f"width {ms['width']}, height {ms['height']}" in section and "FluxGuidance" in section
        assert "guidance 3.5" in section and "ModelSamplingSD3" not in section
    else:
        assert comfy["model_sampling"] == {"node": "ModelSamplingSD3", "shift": 3.0}
        assert "ModelSamplingSD3 node after the LoRA: shift 3" in section and "FluxGuidance" not in section


# ---- (e) the CLI writes both files by default; --format kohya / diffusers ----

def test_rapm_export_writes_the_comfyui_file_by_default_and_each_format_alone(run):
    family, root, _, out = run
    result = _invoke("export", "--run", out, "--out", root / "both")
    facts = json.loads((root / "both" / "rapm_lora.json").read_text())
    assert facts["files"] == {"diffusers": "pytorch_lora_weights.safetensors", "kohya": KOHYA}
    assert f"{KOHYA} (kohya: ComfyUI (models/loras, LoraLoaderModelOnly), kohya sd-scripts)" in result.output
    assert "pytorch_lora_weights.safetensors (diffusers: diffusers' load_lora_weights, rapm sample)" in result.output
    kohya, _ = _read(root / "both" / KOHYA)
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)

    result = _invoke("export", "--run", out, "--out", root / "kohya-only", "--format", "kohya", "--name", "my_student")
    facts = json.loads((root / "kohya-only" / "rapm_lora.json").read_text())
    assert facts["files"] == {"kohya": "my_student.safetensors"}
    assert sorted(p.name for p in (root / "kohya-only").iterdir()) == ["README.md", "my_student.safetensors",
                                                                        "rapm_lora.json"]
    alone, meta = _read(root / "kohya-only" / "my_student.safetensors")
    assert alone.keys() == kohya.keys() and all(torch.equal(alone[k], kohya[k]) for k in kohya)  # the same file
    assert meta["ss_output_name"] == "my_student" and meta["modelspec.title"] == "my_student"
    card = (root / "kohya-only" / "README.md").read_text()
    assert "This export has no diffusers file" in card and "`my_student.safetensors`" in card

    _invoke("export", "--run", out, "--out", root / "diffusers-only", "--format", "diffusers")
    card = (root / "diffusers-only" / "README.md").read_text()
    assert "This export has no ComfyUI file" in card and not (root / "diffusers-only" / KOHYA).exists()


# ---- issue 31, point 3: sd-scripts' base model version, the thumbnail and the Hub's front matter on FLUX / SD3 ----

def test_the_comfyui_file_names_sd_scripts_base_model_version(exported):
    family, _, transformer, folder = exported
    _, meta = _read(folder / KOHYA)
    # sd-scripts: flux_utils.MODEL_VERSION_FLUX_V1 "flux1"; SD3 the MMDiT's model_type ("medium" without QK norm)
    assert meta["ss_base_model_version"] == ("flux1" if family == "flux" else "medium")
    assert meta["ss_v2"] == "False"
    if family == "sd3":
        from rapm.export import base_model_version

        assert base_model_version("sd3", {**transformer.config, "qk_norm": "rms_norm"}) == ("5-large", False)
        assert base_model_version("sd3", {**transformer.config, "qk_norm": "rms_norm",
                                          "dual_attention_layers": [0, 1]}) == ("5-medium", False)


def test_a_flow_export_of_a_sampled_step_has_its_thumbnail_front_matter_and_training_settings(run, tmp_path):
    import base64
    import shutil

    from huggingface_hub import ModelCard
    from PIL import Image

    from rapm.images import save_grid, screen_scale

    family, root, _, out = run
    sampled = tmp_path / "run"
    shutil.copytree(out, sampled)  # the module's run stays unsampled for the other tests
    size = IMAGE * screen_scale(IMAGE)
    cells = [Image.new("RGB", (size, size), c) for c in [(200, 0, 0), (0, 200, 0), (0, 0, 200), (9, 9, 9)]]
    save_grid(cells, sampled / "samples" / "step-00000002.png", nrow=2)  # student row (red, green), teacher row
    _invoke("export", "--run", sampled, "--out", tmp_path / "lora")
    folder = tmp_path / "lora"
    thumb = Image.open(folder / "thumbnail.png").convert("RGB")
    assert thumb.size == (2 * size + 6, size + 4)
    assert [thumb.getpixel((2 + c * (size + 2) + size // 2, 2 + size // 2)) for c in (0, 1)] == [(200, 0, 0), (0, 200, 0)]
    _, meta = _read(folder / KOHYA)
    png = (folder / "thumbnail.png").read_bytes()
    assert meta["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.tags == ["lora", "text-to-image", "diffusers", "rapm", family]
    assert "![the student's samples](thumbnail.png)" in card.text and "## Training" in card.text
    training = card.text.split("## Training", 1)[1]
    assert "| lora_rank | 4 |" in training and "| disc_lora_rank |" not in training
    assert "Not listed, as this run trains no discriminator" in training and "`disc_lora_rank`" in training
