"""Export the student adapter as a LoRA the ecosystem loads (docs/design.md, decision 6).

Two layouts of the same weights, both written by default (``fmt="both"``) into one folder:

* ``diffusers``: ``pytorch_lora_weights.safetensors`` as diffusers' ``save_lora_weights`` writes it: peft keys
  under ``unet.``, and the adapter's LoraConfig in the safetensors metadata so that ``lora_alpha`` survives. A
  LoRA loaded without its alpha is scaled by 1 instead of alpha / rank: a different student. diffusers'
  ``load_lora_weights(folder)`` picks this file by its name.
* ``kohya``: ``NAME.safetensors`` (``--name``; ``kohya_lora`` by default), keys ``lora_unet_<module path with '_'>.{lora_down,lora_up}.weight`` and
  ``.alpha`` as kohya-ss/sd-scripts writes them: diffusers' module names for SD 1.x / 2.x, the LDM (sgm) names
  ``input_blocks`` / ``middle_block`` / ``output_blocks`` for SDXL. ComfyUI and A1111 read this one (ComfyUI
  loads the diffusers file only in part and without alpha); diffusers converts it too. For SD3 and FLUX.1 it is
  the layout of sd-scripts' ``networks.lora_sd3`` / ``networks.lora_flux``: the module names of the models'
  reference implementations (SAI's MMDiT ``joint_blocks``, BFL's ``double_blocks`` / ``single_blocks``), which
  ComfyUI's own models use, q / k / v (and FLUX's single-block MLP input) fused (``to_native_kohya``). Its
  metadata is sd-scripts' (``ss_*``, ``sshs_*``) and the SAI model spec's (``modelspec.*``), so A1111 lists it with
  the right base model and the sampling settings travel with the file.

Both files carry rapm's own keys (``rapm.*``: N, the scheduler settings, guidance 1, the teacher). Beside the
weights: ``README.md`` (a model card with the exact sampling settings for diffusers, ComfyUI and A1111, the Hub's
front matter written by ``huggingface_hub.ModelCardData``, and the run's settings that applied), ``rapm_lora.json``
(the same facts, machine-readable; its ``files`` name each weights file) and, exported from a run that sampled the
exported step, ``thumbnail.png`` (the student's images of that step's sample grid, also the kohya file's
``modelspec.thumbnail``). The folder is written whole or not at all, its files mode 0644.
"""

from __future__ import annotations

import base64
import datetime
import errno
import io
import math
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import typer

import rapm
from rapm import config as cfg
from rapm.diffusion import ScheduleError, schedule_from_config
from rapm.errors import RapmError
from rapm.families import family_named, read_teacher_info
from rapm.families.base import TeacherError
from rapm.folders import FolderError, LockError, output_lock, refuse_link
from rapm.images import screen_scale
from rapm.lora import FACTS_NAME, base_unet_fingerprint, read_export_facts
from rapm.methods import REGISTRY, build_method, resolve
from rapm.roles import STUDENT
from rapm.run import load_student
from rapm.store import StoreError, read_manifest
from rapm.text import quiet_library_bars

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
DEFAULT_NAME = "kohya_lora"  # the kohya file's name (and sd-scripts' ss_output_name) without --name
KOHYA_WEIGHT_NAME = f"{DEFAULT_NAME}.safetensors"
CARD_NAME = "README.md"
THUMBNAIL_NAME = "thumbnail.png"
THUMBNAIL_SIZE = 256  # the SAI model spec's recommended thumbnail size: the long side at most this
THUMBNAIL_CELLS = 4  # the student's images in a thumbnail (2 x 2)
FORMATS = ("both", "diffusers", "kohya")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FACTS_VERSION = 2

# sd-scripts' library/sai_model_spec.py: the spec version it writes and its architecture / implementation ids.
SAI_MODEL_SPEC_VERSION = "1.0.1"

# The LoraConfig fields that change what the adapter computes; the rest (dropout, bookkeeping) stay out of
# the metadata so that an older peft can still build the config and inference never sees training dropout.
_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                  "fan_in_fan_out", "lora_bias", "layers_to_transform", "layers_pattern", "exclude_modules")


class ExportError(RapmError):
    """An export that cannot be written as asked."""


def adapter_state_dict(unet: torch.nn.Module, adapter: str = STUDENT) -> dict[str, torch.Tensor]:
    """One adapter's LoRA weights in peft's key form (``<module>.lora_A.weight``), detached, contiguous, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    if adapter not in getattr(unet, "peft_config", {}):
        have = ", ".join(getattr(unet, "peft_config", {})) or "none"
        raise ExportError(f"the UNet carries no '{adapter}' adapter (adapters: {have}); add it with rapm.roles.add_roles")
    state = get_peft_model_state_dict(unet, adapter_name=adapter)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def adapter_metadata(unet: torch.nn.Module, adapter: str = STUDENT) -> dict:
    """The adapter's LoraConfig as diffusers stores it beside the weights (``lora_adapter_metadata``)."""
    from peft import LoraConfig

    config = unet.peft_config[adapter].to_dict()
    default = LoraConfig().to_dict()
    meta = {}
    for key in _CONFIG_FIELDS:
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, (set, tuple)):
            value = sorted(value)
        if key in ("r", "lora_alpha", "target_modules") or value != default.get(key):
            meta[key] = value
    return meta


def to_kohya(state: dict[str, torch.Tensor], alpha: float, module_name=None) -> dict[str, torch.Tensor]:
    """peft keys to kohya's: ``lora_unet_<module with '_'>.lora_down.weight`` (A), ``.lora_up.weight`` (B), ``.alpha``.

    ``module_name`` maps a diffusers module path to the one the file names (``ldm_module_name`` for SDXL);
    without it the diffusers path is kept, as sd-scripts does for SD 1.x and 2.x.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ExportError(f"LoRA key {key!r} has no kohya equivalent (only plain lora_A / lora_B weights do)")
        name = "lora_unet_" + (module_name(module) if module_name else module).replace(".", "_")
        out[f"{name}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


# The LDM ResBlock's submodules (sgm's openaimodel.py, sd-scripts' sdxl_original_unet.py) by diffusers' names.
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_LDM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def ldm_block_map(unet_config) -> dict[str, tuple[str, bool]]:
    """diffusers block paths of a UNet2DConditionModel to the LDM ones: {path: (ldm path, is a ResBlock)}.

    The LDM UNet numbers its blocks in one sequence: ``input_blocks.0`` is conv_in, then per down block
    ``layers_per_block`` entries [ResBlock, SpatialTransformer] and a Downsample (``.0.op``) except after the
    last; ``middle_block`` is [ResBlock, SpatialTransformer, ResBlock]; per up block ``layers_per_block + 1``
    entries [ResBlock, SpatialTransformer], the last one also an Upsample (``.2.conv``, or ``.1.conv`` in a block
    without attention) except in the last block.
    """
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    per_block = get("layers_per_block")
    down, up, mid = tuple(get("down_block_types")), tuple(get("up_block_types")), get("mid_block_type", "UNetMidBlock2DCrossAttn")
    known = {"DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"}
    if not isinstance(per_block, int) or not set(down + up) <= known or mid not in (None, "UNetMidBlock2DCrossAttn"):
        raise ExportError(f"the teacher's UNet (layers_per_block {per_block!r}, blocks {down} / {mid} / {up}) has no LDM "
                          "layout rapm knows; export it with format 'diffusers'")
    blocks: dict[str, tuple[str, bool]] = {}
    k = 1
    for i, kind in enumerate(down):
        for j in range(per_block):
            blocks[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", True)
            if kind.startswith("CrossAttn"):
                blocks[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", False)
            k += 1
        if i < len(down) - 1:
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", False)
            k += 1
    if mid is not None:
        blocks.update({"mid_block.resnets.0": ("middle_block.0", True), "mid_block.attentions.0": ("middle_block.1", False),
                       "mid_block.resnets.1": ("middle_block.2", True)})
    k = 0
    for i, kind in enumerate(up):
        attention = kind.startswith("CrossAttn")
        for j in range(per_block + 1):
            blocks[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", True)
            if attention:
                blocks[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", False)
            if j == per_block and i < len(up) - 1:
                blocks[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{k}.{2 if attention else 1}.conv", False)
            k += 1
    blocks.update({name: (ldm, False) for name, ldm in _LDM_TOP.items()})
    return blocks


def ldm_module_name(module: str, blocks: dict[str, tuple[str, bool]]) -> str:
    """A diffusers UNet module path (``down_blocks.1.attentions.0.proj_in``) as the LDM names it
    (``input_blocks.4.1.proj_in``); ``blocks`` is ``ldm_block_map(unet.config)``."""
    parts = module.split(".")
    for n in range(min(len(parts), 5), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in blocks:
            ldm, resnet = blocks[prefix]
            rest = parts[n:]
            if resnet and rest:
                rest = _LDM_RESNET.get(rest[0], rest[0]).split(".") + rest[1:]
            return ".".join([ldm, *rest])
    raise ExportError(f"UNet module {module!r} has no LDM name; export this LoRA with format 'diffusers'")


# FLUX.1 and SD3 in the names of their reference implementations (BFL's flux, SAI's MMDiT), which ComfyUI's models
# and sd-scripts' training models use: ComfyUI looks a LoRA key up as ``lora_unet_`` + its own module path with '_'
# and sd-scripts (networks/lora_flux.py, lora_sd3.py) writes exactly those names. Those implementations fuse the
# attention's q, k and v (FLUX's single blocks also the MLP's input) into one Linear: such a native module is listed
# with its diffusers parts in row order, a part None where no diffusers module exists. "swap": the native Linear
# orders its output halves (shift, scale) the other way round from diffusers (ComfyUI's swap_scale_shift).
_BFL_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",),
}
_BFL_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",), "modulation.lin": ("norm.linear",),
}
_BFL_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_MMDIT_BLOCK = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # SD3.5's second (dual) attention
    "x_block.attn.proj": ("attn.to_out.0",), "context_block.attn.proj": ("attn.to_add_out",),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",), "x_block.mlp.fc2": ("ff.net.2",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",), "context_block.mlp.fc2": ("ff_context.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",), "context_block.adaLN_modulation.1": ("norm1_context.linear",),
}
_MMDIT_TOP = {
    "x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
# Which native naming a transformer's kohya file uses, by the family's diffusers denoiser class.
NATIVE_NAMES = {"FluxTransformer2DModel": "bfl", "SD3Transformer2DModel": "mmdit"}


def native_layout(transformer: torch.nn.Module, scheme: str) -> dict[str, tuple[tuple[str | None, ...], bool]]:
    """The native modules of a diffusers FLUX (``scheme`` "bfl") or SD3 ("mmdit") transformer:
    {native path: (the diffusers module paths it is made of, in row order, None for a part the model lacks; swap)}."""
    def has(path: str) -> bool:
        try:
            transformer.get_submodule(path)
            return True
        except AttributeError:
            return False

    layout: dict[str, tuple[tuple[str | None, ...], bool]] = {}

    def add(native: str, parts: tuple[str, ...], swap: bool = False) -> None:
        found = tuple(p if has(p) else None for p in parts)
        if any(found):
            layout[native] = (found, swap)

    if scheme == "bfl":
        blocks = (("double_blocks", "transformer_blocks", _BFL_DOUBLE), ("single_blocks", "single_transformer_blocks", _BFL_SINGLE))
        top = _BFL_TOP
    elif scheme == "mmdit":
        blocks = (("joint_blocks", "transformer_blocks", _MMDIT_BLOCK),)
        top = _MMDIT_TOP
    else:
        raise ExportError(f"no native naming {scheme!r}; rapm knows {', '.join(sorted(set(NATIVE_NAMES.values())))}")
    for native_prefix, prefix, table in blocks:
        for i, block in enumerate(getattr(transformer, prefix, None) or []):
            # SD3's last block (context_pre_only) ends the text stream with AdaLayerNormContinuous: (scale, shift)
            pre_only = bool(getattr(block, "context_pre_only", False))
            for native, parts in table.items():
                swap = scheme == "mmdit" and pre_only and native == "context_block.adaLN_modulation.1"
                add(f"{native_prefix}.{i}.{native}", tuple(f"{prefix}.{i}.{p}" for p in parts), swap)
    for native, part in top.items():
        add(native, (part,))
    add("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True)
    return layout


def _out_features(transformer: torch.nn.Module, path: str) -> int:
    module = transformer.get_submodule(path)
    return int(getattr(module, "base_layer", module).weight.shape[0])


def to_native_kohya(state: dict[str, torch.Tensor], alpha: float, transformer: torch.nn.Module,
                    scheme: str) -> dict[str, torch.Tensor]:
    """peft keys of a FLUX / SD3 transformer adapter to sd-scripts' keys in the native names (``native_layout``):
    ``lora_unet_<native path with '_'>.{lora_down,lora_up}.weight`` and ``.alpha``, which ComfyUI loads as they are.

    A fused native Linear (q, k, v; FLUX's single-block linear1 also proj_mlp) gets one LoRA of rank k·r for the k
    parts the adapter targets: lora_down stacks their A (k·r × in), lora_up is block-structured (each part's B in its
    own rows and its own r columns, zero elsewhere, zero rows for an untargeted part), so lora_up @ lora_down is the
    parts' B @ A stacked, exactly. Its alpha is k·alpha: ComfyUI and sd-scripts scale by alpha / rank, here
    k·alpha / (k·r), the trained alpha / r.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ExportError(f"LoRA key {key!r} has no kohya equivalent (only plain lora_A / lora_B weights do)")
        modules.setdefault(module, {})[kind[0]] = value
    layout = native_layout(transformer, scheme)
    owner = {part: native for native, (parts, _) in layout.items() for part in parts if part}
    strays = sorted(m for m in modules if m not in owner)
    if strays:
        raise ExportError(f"transformer module {strays[0]!r} has no native ({scheme}) name for ComfyUI / sd-scripts; "
                          "export this LoRA with format 'diffusers'")
    out: dict[str, torch.Tensor] = {}
    for native, (parts, swap) in layout.items():
        present = [p for p in parts if p in modules]
        if not present:
            continue
        name = "lora_unet_" + native.replace(".", "_")
        if len(parts) == 1:
            down, up = modules[present[0]]["A"], modules[present[0]]["B"]
            if swap:  # rows (shift, scale) -> (scale, shift)
                up = torch.cat(up.chunk(2, dim=0)[::-1], dim=0)
        else:
            sizes = [_out_features(transformer, p) if p else 0 for p in parts]
            down = torch.cat([modules[p]["A"] for p in present], dim=0)
            first = modules[present[0]]["B"]
            up = first.new_zeros((sum(sizes), down.shape[0]) + tuple(first.shape[2:]))
            row, col = 0, 0
            for part, size in zip(parts, sizes):
                if part in modules:
                    b = modules[part]["B"]
                    up[row:row + size, col:col + b.shape[1]] = b
                    col += b.shape[1]
                row += size
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha) * len(present), dtype=torch.float32)
    return out


def sampling_scheduler_settings(scheduler_config: dict, steps: int) -> dict:
    """The DDIMScheduler settings that reproduce the student's N steps in diffusers.

    ``set_alpha_to_one`` follows the teacher's config (False for SD 1.x/2.x and SDXL) because rapm's final
    position uses it; a DDIMScheduler built from a config without the field would default to True.
    """
    return {
        "class": "DDIMScheduler",
        "timestep_spacing": "trailing",
        "clip_sample": False,
        "set_alpha_to_one": bool(scheduler_config.get("set_alpha_to_one", False)),
        "num_inference_steps": int(steps),
        "guidance_scale": 1.0,
    }


def comfyui_flow_settings(family, schedule, steps: int, guidance_scale: float, latent_hw: tuple[int, int]) -> dict:
    """The ComfyUI settings of a flow-matching student (the model card's, ``rapm_lora.json``'s ``comfyui``), for the
    teacher's ``family`` (a FlowFamily: its ``comfyui_sampling_node``).

    KSampler's ``simple`` scheduler takes the model's shifted σ table at t = 1 - i/N: the trailing σ the student was
    trained on (exactly when N divides the table's 1000 entries, SD3, or 10000, FLUX). The shift goes in explicitly,
    ModelSamplingSD3 (its static shift) or ModelSamplingFlux (FLUX's μ, from width · height / 256 tokens, the
    formula of diffusers' FluxPipeline with 256 / 4096 tokens; a FLUX teacher with a static shift s gets μ = ln s at
    every size, the same σ); FLUX.1-dev's guidance embedding is a FluxGuidance node; cfg is 1 (SD3's guidance is
    distilled, FLUX.1-dev has none to apply)."""
    import math

    flow = schedule.flow
    settings = {"folder": "ComfyUI/models/loras", "loader": "LoraLoaderModelOnly", "strength": 1.0, "steps": int(steps),
                "cfg": 1.0, "sampler": "euler", "scheduler": "simple", "denoise": 1.0}
    flux_node = family.comfyui_sampling_node == "ModelSamplingFlux"
    if flux_node and not flow.use_dynamic_shifting:  # exp(μ) / (exp(μ) + 1/t - 1) is the static shift at μ = ln s
        h, w = latent_hw
        mu = math.log(float(flow.shift))
        settings["model_sampling"] = {"node": "ModelSamplingFlux", "max_shift": mu, "base_shift": mu,
                                      "width": int(w // 2 * 16), "height": int(h // 2 * 16), "mu": mu}
        settings["flux_guidance"] = float(guidance_scale)
    elif flow.use_dynamic_shifting:
        h, w = latent_hw  # ComfyUI's node counts the tokens as width · height / (8 · 8 · 2 · 2), the image's at VAE scale 8
        settings["model_sampling"] = {"node": "ModelSamplingFlux", "max_shift": float(flow.max_shift),
                                      "base_shift": float(flow.base_shift), "width": int(w // 2 * 16),
                                      "height": int(h // 2 * 16), "mu": float(schedule.mu)}
        if (flow.base_image_seq_len, flow.max_image_seq_len) != (256, 4096):
            settings["model_sampling"]["caveat"] = (
                f"the teacher interpolates μ between {flow.base_image_seq_len} and {flow.max_image_seq_len} tokens, "
                "ComfyUI's node between 256 and 4096: its μ differs")
        settings["flux_guidance"] = float(guidance_scale)
    else:
        settings["model_sampling"] = {"node": "ModelSamplingSD3", "shift": float(flow.shift)}
    return settings


def _guidance_sentence(facts: dict) -> str:
    """How the student is guided, for the model card and the kohya file's description."""
    scheduler = facts["scheduler"]
    if scheduler.get("class") == "FlowMatchEulerDiscreteScheduler" and "sigmas" not in scheduler:
        return (f"sample with the guidance embedding {_number(scheduler['guidance_scale'])} (FLUX.1-dev's distilled "
                "guidance, as the teacher ran) and CFG 1.")
    return "guidance is distilled in, sample at CFG 1."


def _comfyui_flow_section(facts: dict) -> str:
    files, comfy, n = facts["files"], facts.get("comfyui"), facts["steps"]
    again = "export again with `rapm export --format both` (the default) or `--format kohya`"
    if "kohya" not in files or not comfy:
        return (f"This export has no ComfyUI file. ComfyUI reads a LoRA's alpha only from its `.alpha` tensors, which "
                f"the diffusers file does not have (its alpha is in the metadata): it would load that file at scale 1 "
                f"instead of alpha / rank = {facts['lora']['alpha']} / {facts['lora']['rank']}; {again}.")
    ms = comfy["model_sampling"]
    if ms["node"] == "ModelSamplingFlux":
        model = ("Load the FLUX.1 transformer with a Load Diffusion Model node (and its CLIP-L / T5 with DualCLIPLoader, "
                 "type flux)")
        shift = (f"ModelSamplingFlux node after the LoRA: max_shift {_number(ms['max_shift'])}, base_shift "
                 f"{_number(ms['base_shift'])}, width {ms['width']}, height {ms['height']} (μ {ms['mu']:.4g}, the "
                 "teacher's at the resolution it was trained at)")
        if ms.get("caveat"):
            shift += f"; note: {ms['caveat']}"
        guide = (f"FluxGuidance node on the prompt's conditioning: guidance {_number(comfy['flux_guidance'])}, the "
                 "guidance embedding the student was trained at (FLUX.1-dev's distilled guidance; not CFG)")
        cfg = "cfg 1.0 (FLUX.1-dev samples without classifier-free guidance)"
    else:
        model = "Load the SD3 checkpoint (Load Checkpoint, or Load Diffusion Model with its three text encoders)"
        shift = f"ModelSamplingSD3 node after the LoRA: shift {_number(ms['shift'])}, the teacher's"
        guide = None
        cfg = ("cfg 1.0, guidance 1: classifier-free guidance is distilled into the student (a negative prompt has no "
               "effect at cfg 1)")
    nodes = [f"{model}; then a LoraLoaderModelOnly node with `{files['kohya']}` (strength 1.0) on its MODEL", shift]
    if guide:
        nodes.append(guide)
    nodes.append(f"KSampler: steps {n}, {cfg}, sampler `euler`, scheduler `simple`, denoise 1.0")
    steps = "\n".join(f"{i}. {step}." for i, step in enumerate(nodes, 1))
    table = 10000 if ms["node"] == "ModelSamplingFlux" else 1000  # ModelSamplingFlux's table, ModelSamplingSD3's
    divides = "" if table % n == 0 else f": {n} does not, so some steps fall up to 1/{table} in t off the student's"
    return f"""Copy `{files['kohya']}` into `ComfyUI/models/loras/`. Then:

{steps}

`simple` takes the model's own shifted σ at t = 1, 1 - 1/{n}, …, 1/{n}: the trailing σ the student was trained on
(exactly when {n} divides the {table} entries of ComfyUI's σ table{divides}; `sgm_uniform` ends its t grid at
ComfyUI's σ_min instead of 0, close but not the same steps). The file's keys are
`lora_unet_` + the module names of ComfyUI's own {'FLUX' if ms['node'] == 'ModelSamplingFlux' else 'MMDiT'} model,
and each module carries its `.alpha`, the only place ComfyUI reads alpha from (the diffusers file keeps it in its
metadata: ComfyUI would load it at scale 1 instead of alpha / rank). These settings follow from ComfyUI's source;
they were not run in ComfyUI here."""


def _flow_model_card(facts: dict, out_dir: Path) -> str:
    sched, files = facts["scheduler"], facts["files"]
    cls = _family(facts["teacher_family"]).pipeline_class_names[0]
    n, lora, teacher = facts["steps"], facts["lora"], facts["teacher_path"]
    sigmas = f"sigmas={sched['sigmas']}, " if "sigmas" in sched else ""
    flux = "sigmas" not in sched
    what = (f"guidance embedding {sched['guidance_scale']} (FLUX.1-dev's distilled guidance, as the teacher ran)" if flux
            else "guidance 1.0: classifier-free guidance is distilled into the student, so sample without it")
    scheme = native_scheme(facts["teacher_family"])
    if "diffusers" in files:
        diffusers = f"""```python
import torch
from diffusers import {cls}

pipe = {cls}.from_pretrained("{teacher}")
pipe.load_lora_weights("{out_dir}")  # picks {DIFFUSERS_WEIGHT_NAME}
pipe.fuse_lora()  # optional: fold the LoRA into the transformer's weights
image = pipe("a photo of a cat", num_inference_steps={n}, {sigmas}guidance_scale={sched['guidance_scale']},
             generator=torch.Generator("cpu").manual_seed(0)).images[0]
image.save("cat.png")
```"""
    else:
        diffusers = ("This export has no diffusers file: export again with `rapm export --format both` (the default) "
                     "or `--format diffusers`.")
    kohya = files.get("kohya")
    for_diffusers = f"`{files['diffusers']}`" if "diffusers" in files else "none: export with --format diffusers"
    for_comfy = f"`{kohya}`" if kohya else "none: export with --format kohya"
    rows = [f"| diffusers (`load_lora_weights`), rapm | {for_diffusers} |", f"| ComfyUI, kohya sd-scripts | {for_comfy} |"]
    which = ""
    if kohya:
        fused = ("FLUX's fused q / k / v (`img_attn.qkv`, `txt_attn.qkv`, the single blocks' `linear1`)" if scheme == "bfl"
                 else "the MMDiT's fused q / k / v (`attn.qkv`)")
        which = (f"\n\nThe `{kohya}` file is in sd-scripts' layout ({_NATIVE_NETWORK_MODULE[scheme]}): keys "
                 f"`lora_unet_<module>.lora_down/lora_up/alpha` in the native module names. A LoRA on {fused} is the "
                 f"diffusers q, k and v LoRAs in one, of rank k · {lora['rank']} for its k trained parts, with alpha "
                 f"k · {lora['alpha']}: the same alpha / rank, the same weights. It carries sd-scripts' and the SAI "
                 "model spec's metadata and rapm's `rapm.*` keys (N, the scheduler, the guidance).")
        if scheme == "bfl":
            which += (" diffusers reads it too (`load_lora_weights(folder, weight_name=...)`: its converter of "
                      "sd-scripts FLUX LoRAs, which splits a single block's `linear1` at FLUX.1's widths only); the "
                      "diffusers file is the one it loads as trained.")
    return f"""# {n}-step student LoRA for {facts['teacher']}

A LoRA distilled with rapm (Relative and Absolute Position Matching, arXiv 2503.20744) that makes the flow-matching
teacher a {n}-step Euler sampler at {what}.
{_thumbnail_section(facts)}
| field | value |
| --- | --- |
| teacher | `{teacher}` ({facts['teacher_family']}, {cls}) |
| steps (N) | {n}, σ · 1000 = {[round(t, 3) for t in facts['timesteps']]} |
| LoRA | rank {lora['rank']}, alpha {lora['alpha']}, {lora['modules']} modules, {lora['parameters']:,} parameters |
| files | {', '.join(f"`{name}` ({fmt})" for fmt, name in files.items())} |
| base transformer | `{facts['base_unet_fingerprint']}` |

## Sampling settings

- scheduler: the teacher's own `FlowMatchEulerDiscreteScheduler` (its shift{', dynamic shift' if flux else ''})
- `num_inference_steps={n}`, {sigmas}`guidance_scale={sched['guidance_scale']}`

## Which file

| client | file |
| --- | --- |
{chr(10).join(rows)}{which}

## diffusers

{diffusers}

## ComfyUI

{_comfyui_flow_section(facts)}

## rapm

```
rapm sample --teacher {facts['teacher']} --lora {out_dir} --prompt "a photo of a cat" --steps {n} --out samples/
```
{_training_section(facts)}
`{FACTS_NAME}` holds these facts machine-readable.
"""


def sampling_summary(steps: int, scheduler: dict) -> str:
    """The export's closing line's settings, from the facts' scheduler (the model card's)."""
    if scheduler.get("class") == "FlowMatchEulerDiscreteScheduler":
        sigmas = f", sigmas linspace(1, 1/{steps}, {steps})" if "sigmas" in scheduler else ""
        return f"{steps} steps, guidance {_number(scheduler['guidance_scale'])}, FlowMatch Euler{sigmas}"
    return f"{steps} steps, guidance {_number(scheduler.get('guidance_scale', 1.0))}, DDIM trailing"


def _number(x: float) -> str:
    return f"{float(x):g}"


def _family(family: str):
    try:
        return family_named(family)
    except TeacherError as e:
        raise ExportError(str(e)) from None


def base_model_version(family: str, unet_config) -> tuple[str, bool]:
    """sd-scripts' ``ss_base_model_version`` (``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``) and ``ss_v2``, the family's.

    A1111 reads ``ss_base_model_version`` (SDXL) and ``ss_v2`` to show a LoRA only beside checkpoints of its
    version. (sd-scripts appends ``_v`` for a v-prediction run of its own; ``ss_v_parameterization`` says it here.)
    """
    return _family(family).base_model_version(unet_config)


def sai_architecture(family: str, v2: bool, prediction_type: str, version: str = "") -> str:
    """The SAI model spec's architecture id for a LoRA of this teacher (sd-scripts' ``determine_architecture``);
    ``version``: its ``ss_base_model_version`` (SD3's model type)."""
    return _family(family).sai_architecture(v2, prediction_type, version)


def additional_network_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """``sshs_model_hash`` and ``sshs_legacy_hash`` as sd-scripts' ``precalculate_safetensors_hashes`` computes them.

    The file is serialized with only its ``ss_*`` metadata (the keys meant never to change); the model hash is the
    sha256 of the tensor bytes after the header, the legacy hash the first 8 hex digits of the sha256 of the 64 KiB
    at offset 1 MiB (of nothing, for a smaller file). sd-webui-additional-networks reads them instead of hashing.
    """
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[header:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def usage_hint(steps: int, scheduler: dict) -> str:
    """One line a user reads in a client's model info: the sampling settings the student needs."""
    if scheduler.get("class") == "FlowMatchEulerDiscreteScheduler":
        sigmas = f", sigmas={scheduler['sigmas']}" if "sigmas" in scheduler else ""
        flux = "sigmas" not in scheduler  # FLUX.1-dev: the guidance is an embedding, ComfyUI's FluxGuidance node
        comfy = (f"FluxGuidance {scheduler['guidance_scale']}, ModelSamplingFlux at the trained resolution" if flux
                 else "ModelSamplingSD3 with the teacher's shift")
        return (f"{steps} steps, guidance {scheduler['guidance_scale']}, no negative prompt. diffusers: the teacher's "
                f"FlowMatchEulerDiscreteScheduler, num_inference_steps={steps}{sigmas}. ComfyUI: {comfy}, KSampler cfg "
                "1.0, sampler euler, scheduler simple.")
    return (f"{steps} steps, guidance (CFG) 1.0, no negative prompt. diffusers: DDIMScheduler with "
            f"timestep_spacing='trailing', clip_sample=False, set_alpha_to_one={scheduler['set_alpha_to_one']}. ComfyUI: "
            "sampler ddim (or euler), scheduler sgm_uniform. A1111: sampler Euler, schedule type SGM Uniform.")


def rapm_metadata(facts: dict) -> dict[str, str]:
    """rapm's own keys, in both files, so the settings survive when the file is copied alone."""
    return {
        "rapm.version": rapm.__version__,
        "rapm.steps": str(facts["steps"]),
        "rapm.timesteps": json.dumps(facts["timesteps"]),
        "rapm.guidance_scale": str(float(facts["scheduler"].get("guidance_scale", 1.0))),
        "rapm.scheduler": json.dumps(facts["scheduler"], sort_keys=True),
        "rapm.teacher": facts["teacher"],
        "rapm.teacher_family": facts["teacher_family"],
        "rapm.prediction_type": facts["prediction_type"],
        "rapm.base_unet_fingerprint": facts["base_unet_fingerprint"],
        "rapm.usage": usage_hint(facts["steps"], facts["scheduler"]),
    }


def kohya_metadata(kohya: dict[str, torch.Tensor], facts: dict, output_name: str, finished_at: float,
                   thumbnail_uri: str | None = None) -> dict[str, str]:
    """sd-scripts' ``ss_*`` keys, the SAI model spec's ``modelspec.*`` keys and rapm's, with the two hashes;
    ``thumbnail_uri`` (``data:image/png;base64,...``, what sd-scripts' ``--metadata_thumbnail`` writes) as
    ``modelspec.thumbnail``."""
    lora = facts["lora"]
    scheme = native_scheme(facts["teacher_family"])
    conv3x3 = any(v.ndim == 4 and tuple(v.shape[2:]) != (1, 1) for k, v in kohya.items() if k.endswith("lora_down.weight"))
    version, v2 = facts["base_model_version"], facts["v2"]
    meta = {
        "ss_network_module": _NATIVE_NETWORK_MODULE.get(scheme, "networks.lora"),
        "ss_network_dim": str(lora["rank"]),
        "ss_network_alpha": str(lora["alpha"]),
        "ss_base_model_version": version,
        "ss_v2": str(v2),
        "ss_v_parameterization": str(facts["prediction_type"] == "v_prediction"),
        "ss_output_name": output_name,
        "ss_training_finished_at": str(finished_at),
    }
    if conv3x3:  # sd-scripts' LoCon: 3x3 convs get their own dim / alpha, passed as network args (strings)
        meta["ss_network_args"] = json.dumps({"conv_dim": str(lora["rank"]), "conv_alpha": str(lora["alpha"])})
    if facts.get("training_steps") is not None:
        meta["ss_steps"] = str(facts["training_steps"])
    width, height = facts["resolution"]
    meta["ss_sd_model_name"] = sd_model_name(facts["teacher"])
    meta["ss_resolution"] = str((width, height))  # sd-scripts: str(args.resolution), a (width, height) tuple
    run = facts.get("run_settings") or {}  # only what the run recorded: a key rapm does not know is left out
    for key, field_name in (("ss_learning_rate", "learning_rate"), ("ss_seed", "seed"),
                            ("ss_mixed_precision", "mixed_precision"), ("ss_training_started_at", "training_started_at")):
        if run.get(field_name) is not None:
            meta[key] = str(run[field_name])
    meta.update({
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": sai_architecture(facts["teacher_family"], v2, facts["prediction_type"], version),
        "modelspec.implementation": _NATIVE_IMPLEMENTATION.get(scheme) or _family(facts["teacher_family"]).modelspec_implementation,
        "modelspec.title": facts.get("name") or f"{facts['steps']}-step rapm student of {Path(facts['teacher']).name}",
        "modelspec.description": (f"A {facts['steps']}-step LoRA distilled with rapm (arXiv 2503.20744) from "
                                   f"{facts['teacher']}; {_guidance_sentence(facts)}"),
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished_at)).isoformat(),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.usage_hint": usage_hint(facts["steps"], facts["scheduler"]),
        "modelspec.implementation_version": f"rapm/{rapm.__version__}",
    })
    if scheme is None:  # the spec's prediction types are epsilon and v; a flow-matching model has neither
        meta["modelspec.prediction_type"] = "v" if facts["prediction_type"] == "v_prediction" else "epsilon"
    if thumbnail_uri:
        meta["modelspec.thumbnail"] = thumbnail_uri
    meta.update(rapm_metadata(facts))
    model_hash, legacy_hash = additional_network_hashes(kohya, meta)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hash, legacy_hash
    return meta


def sd_model_name(teacher: str) -> str:
    """sd-scripts' ``ss_sd_model_name``: the teacher as given, a local path by its base name."""
    path = Path(teacher).expanduser()
    return path.name if path.exists() and path.name else str(teacher)


def native_scheme(family: str) -> str | None:
    """The native naming of a transformer family's kohya file ("bfl" for FLUX, "mmdit" for SD3); None for a UNet's."""
    return NATIVE_NAMES.get(_family(family).denoiser_class_name)


# sd-scripts' network module and the SAI model spec's implementation id of a file in each native naming.
_NATIVE_NETWORK_MODULE = {"bfl": "networks.lora_flux", "mmdit": "networks.lora_sd3"}
_NATIVE_IMPLEMENTATION = {"bfl": "https://github.com/black-forest-labs/flux",
                          "mmdit": "https://github.com/Stability-AI/generative-models"}


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v if v.ndim == 0 else v.to(dtype).contiguous() for k, v in state.items()}  # kohya's .alpha stays float32


def _os_error(write):
    """Run ``write``; safetensors' writer reports a failed write (a full disk) as a SafetensorError, not an OSError:
    give it back as the OSError it is (errno from its "os error N"), so that the export says it in one line."""
    from safetensors import SafetensorError

    try:
        return write()
    except SafetensorError as e:
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code) if code in errno.errorcode else str(e)) from None


def _save_file(save_file, tensors: dict, path: Path, metadata: dict) -> None:
    _os_error(lambda: save_file(tensors, str(path), metadata=metadata))


def _write_diffusers(folder: Path, state: dict, meta: dict, family: str, facts: dict) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    fam = _family(family)
    _os_error(lambda: fam.pipeline_class().save_lora_weights(str(folder), **fam.export_kwargs(state, meta),
                                                             weight_name=DIFFUSERS_WEIGHT_NAME))
    # diffusers' writer takes no metadata of ours: add rapm's keys beside its own (format, lora_adapter_metadata).
    path = folder / DIFFUSERS_WEIGHT_NAME
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    _save_file(save_file, tensors, path, {**header, **rapm_metadata(facts)})


def _write_kohya(folder: Path, state: dict, meta: dict, family: str, unet: torch.nn.Module, facts: dict,
                 thumbnail_uri: str | None = None, finished_at: float | None = None) -> None:
    from safetensors.torch import save_file

    special = [k for k in ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "fan_in_fan_out", "lora_bias") if meta.get(k)]
    if special:
        raise ExportError(f"the kohya layout holds plain LoRA with one rank and alpha; this adapter sets {', '.join(special)}: "
                          "export it with format 'diffusers'")
    scheme = native_scheme(family)
    if scheme:  # FLUX / SD3: sd-scripts' and ComfyUI's native module names, q / k / v fused
        kohya = to_native_kohya(state, float(meta["lora_alpha"]), unet, scheme)
    else:
        module_name = None
        if _family(family).kohya_names == "ldm":  # sd-scripts trains SDXL on its LDM UNet: its files (and A1111's loader) use LDM names
            blocks = ldm_block_map(unet.config)
            module_name = lambda module: ldm_module_name(module, blocks)  # noqa: E731
        kohya = to_kohya(state, float(meta["lora_alpha"]), module_name)
    name = facts["files"]["kohya"]
    header = kohya_metadata(kohya, facts, Path(name).stem, time.time() if finished_at is None else finished_at,
                            thumbnail_uri)
    _save_file(save_file, kohya, folder / name, header)


def _model_card(facts: dict, out_dir: Path, has_vae: bool) -> str:
    sched = facts["scheduler"]
    cls = _family(facts["teacher_family"]).pipeline_class_names[0]
    n = facts["steps"]
    lora = facts["lora"]
    teacher = facts["teacher_path"]
    if has_vae:
        call = (f'image = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale=1.0,\n'
                f'             generator=torch.Generator("cpu").manual_seed(0)).images[0]\nimage.save("cat.png")')
    else:
        call = (f'# This teacher has no VAE (hence vae=None above): it works in pixel space, its latents are the images.\n'
                f'images = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale=1.0, output_type="latent",\n'
                f'              generator=torch.Generator("cpu").manual_seed(0)).images')
    weights_kw = "" if facts["weights"] == DIFFUSERS_WEIGHT_NAME else f', weight_name="{facts["weights"]}"'
    files = facts["files"]
    if "kohya" in files:
        comfy = (f"Copy `{files['kohya']}` into `ComfyUI/models/loras/` (rename it as you like) and load it with a "
                 "LoraLoaderModelOnly node (strength 1.0)")
        a1111 = (f"Copy `{files['kohya']}` into `stable-diffusion-webui/models/Lora/` and add `<lora:NAME:1>` to the "
                 f"prompt (NAME: the file name without `.safetensors`). A1111 lists it with {facts['base_model_version']} "
                 "checkpoints")
        which = ("The kohya file carries kohya-ss/sd-scripts' metadata (base model "
                 f"{facts['base_model_version']}, rank, alpha) and the SAI model spec (`modelspec.*`: architecture, "
                 "resolution, prediction type, a usage hint with these settings). Every file carries rapm's `rapm.*` "
                 "keys (N, the scheduler, guidance 1), so the settings go with a file copied alone.")
        if "diffusers" in files:
            which = "Both hold the same weights. " + which
    else:
        which = "The file carries rapm's `rapm.*` metadata keys (N, the scheduler, guidance 1)."
        again = "export again with `rapm export --format both` (the default) or `--format kohya`"
        comfy = f"This export has no kohya file: ComfyUI loads the diffusers file only in part and without alpha; {again}"
        a1111 = f"This export has no kohya file, which A1111 needs; {again}"
    caveat = ""
    if facts["num_train_timesteps"] % n:
        caveat = (f"\nNote: {n} does not divide {facts['num_train_timesteps']}. diffusers' DDIMScheduler steps from t to "
                  f"t - {facts['num_train_timesteps']} // {n}, which is one timestep off rapm's trailing grid "
                  f"{facts['timesteps']} at some steps; `rapm sample` follows the grid the student was trained on.\n")
    training = _training_section(facts)
    return f"""# {n}-step student LoRA for {facts['teacher']}

A LoRA distilled with rapm (Relative and Absolute Position Matching, arXiv 2503.20744) that makes the teacher a
{n}-step sampler at guidance 1.0: classifier-free guidance is distilled into the student, so sample without it.
{_thumbnail_section(facts)}
| field | value |
| --- | --- |
| teacher | `{teacher}` ({facts['teacher_family']}, {cls}) |
| steps (N) | {n}, timesteps {facts['timesteps'][:-1]} then the final position |
| LoRA | rank {lora['rank']}, alpha {lora['alpha']}, {lora['modules']} modules, {lora['parameters']:,} parameters |
| files | {', '.join(f"`{name}` ({fmt})" for fmt, name in files.items())} |
| base UNet | `{facts['base_unet_fingerprint']}` |

## Sampling settings

- scheduler: `DDIMScheduler` from the teacher's scheduler config with `timestep_spacing="trailing"`,
  `clip_sample=False`, `set_alpha_to_one={sched['set_alpha_to_one']}`
- `num_inference_steps={n}`, `guidance_scale=1.0`
{caveat}
## diffusers

```python
import torch
from diffusers import DDIMScheduler, {cls}

pipe = {cls}.from_pretrained("{teacher}"{'' if has_vae else ', vae=None'})
pipe.scheduler = DDIMScheduler.from_config(
    pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one={sched['set_alpha_to_one']}
)
pipe.load_lora_weights("{out_dir}"{weights_kw})
pipe.fuse_lora()  # optional: fold the LoRA into the UNet's weights
{call}
```

## Which file

| client | file |
| --- | --- |
| diffusers (`load_lora_weights`), rapm | {f"`{files['diffusers']}`" if 'diffusers' in files else f"`{facts['weights']}`"} |
| ComfyUI, A1111 / Forge | {f"`{files['kohya']}`" if 'kohya' in files else "none: export with --format kohya"} |

{which}

## ComfyUI

{comfy}. KSampler: steps {n}, cfg 1.0, sampler `ddim` (or `euler`, the same step), scheduler `sgm_uniform`:
its timesteps, 999 down in steps of 999 / {n}, lie within one timestep of the trailing grid {facts['timesteps'][:-1]}
the student was trained on (close to diffusers' images, not bit-identical).

## A1111 / Forge

{a1111}. Sampling method Euler, schedule type SGM Uniform, {n} steps, CFG scale 1, no negative prompt.

## rapm

```
rapm sample --teacher {facts['teacher']} --lora {out_dir} --prompt "a photo of a cat" --steps {n} --out samples/
```
{training}
`{FACTS_NAME}` holds these facts machine-readable.
"""


def teacher_schedule(info):
    """The teacher's schedule (a flow schedule with the μ of the teacher's resolution, when it has dynamic shifting),
    as ``rapm.teacher.load_teacher`` builds it."""
    from dataclasses import replace

    try:
        schedule = schedule_from_config(info.scheduler_config)
    except ScheduleError as e:
        raise ExportError(str(e)) from None
    if schedule.is_flow and schedule.flow.use_dynamic_shifting:
        schedule = replace(schedule, mu=schedule.flow.mu(info.family.image_seq_len(info.latent_shape)))
    return schedule


def export_lora(
    unet: torch.nn.Module,
    teacher_path: str | Path,
    family: str,
    out_dir: str | Path,
    steps: int,
    fmt: str = "both",
    adapter: str = STUDENT,
    extra_card: dict | None = None,
    dtype: str = "float32",
    training_steps: int | None = None,
    guidance: float | None = None,
    name: str | None = None,
    run_settings: dict | None = None,
    thumbnail=None,
    thumbnail_source: str | None = None,
    finished_at: float | None = None,
) -> Path:
    """Write the ``adapter`` LoRA of ``unet`` (never the discriminator's) to ``out_dir``; return the weights file.

    ``fmt`` "both" (the default) writes the diffusers file and the kohya file beside it and returns the diffusers
    one (what ``load_lora_weights(out_dir)`` picks); "diffusers" or "kohya" writes only that one. ``dtype`` is the
    weights' storage dtype (float16 halves the files; kohya's ``.alpha`` stays float32). ``training_steps`` is
    written as sd-scripts' ``ss_steps``. ``name`` names the kohya file (``NAME.safetensors``), its ``ss_output_name``
    (A1111's alias) and ``modelspec.title``; the diffusers file keeps the name ``load_lora_weights`` finds.
    ``run_settings`` are the run's facts sd-scripts records (``learning_rate``, ``seed``, ``mixed_precision``,
    ``training_started_at``); one that is absent or None is left out of the metadata. ``thumbnail`` (a PIL image,
    ``run_thumbnail``'s) is written as ``thumbnail.png`` and into the kohya file as ``modelspec.thumbnail`` (a data
    URI); ``thumbnail_source`` says where it came from (the facts' and the card's). ``finished_at`` (seconds since
    the epoch; the export's own time when None) is the kohya file's ``ss_training_finished_at`` and
    ``modelspec.date``: ``rapm export`` passes the checkpoint's time, so exporting it again writes the same bytes.

    ``out_dir`` gets the weights, ``README.md`` and ``rapm_lora.json``, written in a temporary folder beside it and
    renamed into place, so it is never half-written. An ``out_dir`` that holds an earlier export is replaced; any
    other non-empty folder is left alone and refused.
    """
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"export dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    _family(family)
    name = check_name(name)
    out_dir = Path(out_dir)
    try:  # no result written through a link, nor a link of the user's replaced by a file
        refuse_link(out_dir)
        for file_name in (*EXPORT_FILES, f"{name or DEFAULT_NAME}.safetensors"):
            refuse_link(out_dir / file_name, "export")
    except FolderError as e:
        raise ExportError(str(e)) from None
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / FACTS_NAME).exists())):
        raise ExportError(f"{out_dir} exists and is not an earlier rapm export; give a new or empty folder")
    info = read_teacher_info(teacher_path)
    schedule = teacher_schedule(info)
    if schedule.is_flow and native_scheme(family) is None:  # a transformer whose native module names rapm does not know
        if fmt == "kohya":
            raise ExportError(f"format 'kohya' is not written for a {family} teacher: rapm knows no ComfyUI / sd-scripts "
                              "module names for its transformer; export with format 'diffusers'")
        fmt = "diffusers"
    files = {f: DIFFUSERS_WEIGHT_NAME if f == "diffusers" else f"{name or DEFAULT_NAME}.safetensors"
             for f in (("diffusers", "kohya") if fmt == "both" else (fmt,))}
    state = _cast(adapter_state_dict(unet, adapter), DTYPES[dtype])
    meta = adapter_metadata(unet, adapter)
    facts = _export_facts(unet, adapter, family, teacher_path, info, schedule, steps, guidance, fmt, files, dtype, meta,
                          len(state) // 2)
    if name:
        facts["name"] = name
    if training_steps is not None:
        facts["training_steps"] = int(training_steps)
    settings = {k: v for k, v in (run_settings or {}).items() if v is not None}
    if settings:
        facts["run_settings"] = settings
    if extra_card:
        facts["training"] = dict(extra_card)
        left_out = facts["training"].pop(LEFT_OUT_KEY, None)
        if left_out:
            facts["training_left_out"] = left_out
    png = thumbnail_png(thumbnail) if thumbnail is not None else None
    if png is not None:
        facts["thumbnail"] = {"file": THUMBNAIL_NAME, "size": list(thumbnail.size), "bytes": len(png),
                              **({"source": thumbnail_source} if thumbnail_source else {})}

    def write(staging: Path) -> None:
        thumbnail_uri = None
        if png is not None:
            (staging / THUMBNAIL_NAME).write_bytes(png)
            thumbnail_uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        if "diffusers" in files:
            _write_diffusers(staging, state, meta, family, facts)
        if "kohya" in files:
            _write_kohya(staging, state, meta, family, unet, facts, thumbnail_uri, finished_at)
        (staging / FACTS_NAME).write_text(json.dumps(facts, indent=2, default=str) + "\n")
        card = _flow_model_card(facts, out_dir) if schedule.is_flow else _model_card(facts, out_dir, info.has_vae)
        (staging / CARD_NAME).write_text(hub_model_card(facts, info.path, card))

    _write_export_dir(out_dir, write)
    return out_dir / facts["weights"]


def _export_facts(unet, adapter: str, family: str, teacher_path, info, schedule, steps: int, guidance: float | None,
                  fmt: str, files: dict, dtype: str, meta: dict, modules: int) -> dict:
    """``rapm_lora.json``'s facts of the student and its teacher: what every reader of an export is told."""
    family_def = family_named(family)
    scheduler_config = info.scheduler_config
    version, v2 = base_model_version(family, unet.config)
    _, height, width = info.latent_shape
    facts = {
        "format_version": FACTS_VERSION,
        "rapm_version": rapm.__version__,
        "format": fmt,
        "weights": next(iter(files.values())),
        "files": files,
        "dtype": dtype,
        "teacher": str(teacher_path),
        "teacher_path": str(info.path.resolve()),
        "teacher_family": family,
        "base_model_version": version,
        "v2": v2,
        "prediction_type": (schedule.prediction_type if schedule.is_flow
                            else scheduler_config.get("prediction_type", "epsilon")),
        "resolution": [width * info.vae_scale_factor, height * info.vae_scale_factor],
        "num_train_timesteps": int(scheduler_config.get("num_train_timesteps", 1000)),
        "steps": int(steps),
        "timesteps": schedule.coarse(steps),
        "scheduler": (family_def.sampling_settings(steps, guidance) if schedule.is_flow
                      else sampling_scheduler_settings(scheduler_config, steps)),
        "lora": {
            "rank": meta["r"],
            "alpha": meta["lora_alpha"],
            "target_modules": meta["target_modules"],
            "modules": modules,
            "parameters": sum(p.numel() for n, p in unet.named_parameters() if f".{adapter}." in n and "lora_" in n),
        },
        "base_unet_fingerprint": base_unet_fingerprint(unet),
    }
    if schedule.is_flow:
        facts["comfyui"] = comfyui_flow_settings(family_def, schedule, steps, facts["scheduler"]["guidance_scale"],
                                                 (height, width))
    return facts


def _write_export_dir(out_dir: Path, write) -> None:
    """Run ``write(staging)`` in a temporary folder beside ``out_dir`` and rename it into place, holding ``out_dir``'s
    lock: one writer at a time, never a half-written folder, the earlier export kept when anything fails."""
    try:  # one writer of out_dir at a time: a second export (or one while another renames its files) is refused
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = output_lock(out_dir, "rapm export").acquire()
    except LockError as e:
        raise ExportError(str(e)) from None
    except (OSError, FolderError) as e:  # a read-only parent
        raise ExportError(f"--out {out_dir}: cannot be written ({getattr(e, 'strerror', None) or e}); give a writable "
                          "folder") from None
    try:
        try:
            _remove_stale_staging(out_dir)
            staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out_dir), dir=out_dir.parent))
        except OSError as e:  # a read-only parent
            raise ExportError(f"--out {out_dir}: cannot be written ({e.strerror or e}); give a writable folder") from None
        try:
            write(staging)
            for f in staging.iterdir():  # safetensors writes its files 0600: a LoRA is shared, read by other users' clients
                os.chmod(f, 0o644)
            os.chmod(staging, 0o755)  # mkdtemp makes it 0700
            _replace_dir(staging, out_dir)
        except OSError as e:  # a full disk, a read-only folder
            shutil.rmtree(staging, ignore_errors=True)
            fix = (f"free space in {out_dir.parent} or choose another --out" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                   else "give a writable folder")
            raise ExportError(f"--out {out_dir}: cannot be written ({e.strerror or e}); the earlier export there (if any) is "
                              f"unchanged; {fix}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        lock.release()


EXPORT_FILES = (DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, CARD_NAME, FACTS_NAME, THUMBNAIL_NAME)  # all an export writes by default


def check_name(name: str | None) -> str | None:
    """``--name``: the kohya file's name without ``.safetensors`` (given with it, it is dropped); None for the default."""
    if name is None:
        return None
    name = name.strip().removesuffix(".safetensors")
    if (not name or name.startswith(".") or any(c in name for c in '/\\:*?"<>|') or not name.isprintable()
            or name == Path(DIFFUSERS_WEIGHT_NAME).stem):
        raise ExportError(f"--name {name!r}: give a file name without a folder, such as my_style (letters, digits, "
                          f"'-', '_'; not {Path(DIFFUSERS_WEIGHT_NAME).stem!r}, the diffusers file's)")
    return name


def _export_weights(folder: Path) -> set[str]:
    """The weights files the export in ``folder`` wrote, as its facts' ``files`` name them (plain file names only)."""
    facts = read_export_facts(folder) or {}
    named = facts.get("files") if isinstance(facts.get("files"), dict) else {}
    return {n for n in named.values() if isinstance(n, str) and n.endswith(".safetensors") and Path(n).name == n}


def _staging_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.partial-"


def _remove_stale_staging(out_dir: Path) -> None:
    """Remove what a killed export left beside ``out_dir``: its staging folders, holding only files an export writes."""
    for p in out_dir.parent.glob(_staging_prefix(out_dir) + "*"):
        if p.is_dir() and not p.is_symlink() and all(f.is_file() and (f.name in EXPORT_FILES or f.suffix == ".safetensors")
                                                    for f in p.iterdir()):  # a --name's weights too
            shutil.rmtree(p, ignore_errors=True)


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Put the finished export in place: a new folder by one rename; into an earlier export, file by file.

    An earlier export keeps whatever the user put beside it: only the files an export writes are replaced (the
    earlier export's weights that this one does not write removed: the other format's, another --name's), and
    ``rapm_lora.json`` is replaced last, the commit point of the set.
    """
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    written = {p.name for p in staging.iterdir()}
    earlier = _export_weights(out_dir) | set(EXPORT_FILES)  # read before its facts are replaced
    for name in sorted(written - {FACTS_NAME}):
        os.replace(staging / name, out_dir / name)
    for name in earlier - written:
        (out_dir / name).unlink(missing_ok=True)
    os.replace(staging / FACTS_NAME, out_dir / FACTS_NAME)
    staging.rmdir()


# ---------------------------------------------------------------------------------------------- thumbnail

def _grid_cells(grid, cell: tuple[int, int], padding: int = 2) -> list[list] | None:
    """The images of a ``save_grid`` PNG whose images are ``cell`` (width, height) pixels, row by row; None when the
    grid is not of that layout."""
    cw, ch = cell
    ncol, nrows = (grid.width - padding) // (cw + padding), (grid.height - padding) // (ch + padding)
    size = (ncol * (cw + padding) + padding, nrows * (ch + padding) + padding)
    if ncol < 1 or nrows < 1 or (grid.width, grid.height) != size:
        return None
    return [[grid.crop((padding + c * (cw + padding), padding + r * (ch + padding),
                        padding + c * (cw + padding) + cw, padding + r * (ch + padding) + ch)) for c in range(ncol)]
            for r in range(nrows)]


def _tile(images: list, padding: int = 2):
    """Up to THUMBNAIL_CELLS images as one picture (2 x 2 for four), black padding as the grids have."""
    from PIL import Image

    images = images[:THUMBNAIL_CELLS]
    ncol = 2 if len(images) == 4 else len(images)
    nrows = math.ceil(len(images) / ncol)
    w, h = max(im.width for im in images), max(im.height for im in images)
    out = Image.new(images[0].mode, (ncol * (w + padding) + padding, nrows * (h + padding) + padding), 0)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        out.paste(im, (padding + c * (w + padding), padding + r * (h + padding)))
    return out


def _fit(image, size: int = THUMBNAIL_SIZE):
    """``image`` shrunk (never enlarged) so that its long side is at most ``size`` pixels, as RGB."""
    from PIL import Image

    image = image.convert("RGB")
    scale = size / max(image.width, image.height)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    return image


def run_thumbnail(run: Path, step: int | None, resolution: tuple[int, int], prompts: int = 0):
    """The export's thumbnail from the run's own sample grid of the exported ``step``, and the grid's path; None when
    the run has none of that step (``sample_every=0``, or a step that was checkpointed but not sampled).

    The grid of the step itself and no other: an earlier grid shows an earlier student. The user's own preview
    prompts' grid (``prompts-step-*.png``, ``sample_prompts``; ``prompts`` of them) first, else the training grid's
    top row (``step-*.png``: the student's N steps; its bottom row is the stored teacher's). Up to four of its images,
    2 x 2, shrunk to at most 256 px on the long side. Taken from the PNG, not rendered again: an export loads no VAE
    and runs no denoiser (rendering would cost a FLUX export N transformer passes an image, minutes on a CPU), and
    the grid is the images the run's report shows. ``resolution`` is the teacher's (width, height): with
    ``rapm.images.screen_scale`` it gives the grid's cell size.
    """
    from PIL import Image

    if step is None:
        return None
    samples = Path(run) / "samples"
    width, height = resolution
    s = screen_scale(width)
    for path, own in ((samples / f"prompts-step-{int(step):08d}.png", True), (samples / f"step-{int(step):08d}.png", False)):
        if not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                grid = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):  # not a PNG rapm wrote: no thumbnail from it
            continue
        rows = _grid_cells(grid, (width * s, height * s))
        if rows is None:  # not the layout rapm writes: the whole grid (its top half: the student's row)
            picture = grid if own else grid.crop((0, 0, grid.width, (grid.height + 2) // 2))
        else:
            cells = [c for row in rows for c in row][:prompts or None] if own else rows[0]
            picture = _tile(cells)
        return _fit(picture), path
    return None


def thumbnail_png(image) -> bytes:
    """The thumbnail's PNG bytes (``thumbnail.png`` and the data URI of ``modelspec.thumbnail``)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _thumbnail_section(facts: dict) -> str:
    thumb = facts.get("thumbnail")
    if not thumb:
        return ""
    source = f" (from the run's `{thumb['source']}`)" if thumb.get("source") else ""
    return (f"\n![the student's samples]({thumb['file']})\n\nThe student's {facts['steps']}-step samples{source}; the "
            "kohya file carries the same image as its `modelspec.thumbnail`.\n")


# ---------------------------------------------------------------------------------------------- the card's settings

LEFT_OUT_KEY = "__left_out__"  # in extra_card: {reason: [fields]} the card names as left out
DISCRIMINATOR_FIELDS = ("disc_", "gan_loss", "updates")


def applied_settings(config: dict) -> dict:
    """The run's scalar settings that applied to the student (the card's Training table), with ``LEFT_OUT_KEY``:
    {why: [fields]} for those that did not: the discriminator's fields when the method trained none, the EMA's
    warm-up without an EMA, the relational loss's fields with that loss off, the fields only another method reads
    (progressive distillation's, PCM's), the relative position's target without relative terms, validation's with
    validation off, and the fields left empty (the method's own, or off)."""
    scalars = {k: v for k, v in config.items() if k not in ("teacher", "steps") and isinstance(v, (str, int, float, bool))}
    left: dict[str, list[str]] = {}

    def drop(why: str, names) -> None:
        names = [n for n in names if n in scalars]
        for n in names:
            del scalars[n]
        if names:
            left.setdefault(why, []).extend(names)

    method = str(config.get("method", "rapm"))
    try:
        built = resolve(cfg.from_dict({k: v for k, v in config.items() if k in cfg.to_dict(cfg.TrainConfig())},
                                      "config.json"))
        disc = bool(build_method(built, 1).uses_discriminator)
        ema, rdd, reads = built.ema_decay > 0, built.rdd_weight > 0, REGISTRY[method].cls.reads
    except (RapmError, TypeError, ValueError, KeyError, AttributeError):  # a config rapm cannot rebuild: its adv_weight
        disc = float(config.get("adv_weight", 0) or 0) > 0
        ema = float(config.get("ema_decay", 0) or 0) > 0
        rdd, reads = float(config.get("rdd_weight", 0) or 0) > 0, ()
    if not disc:
        drop("this run trains no discriminator", [k for k in list(scalars) if k.startswith(DISCRIMINATOR_FIELDS)])
    if not ema:
        drop("the student has no EMA", ["ema_warmup", "ema_decay"])
    if not rdd:
        drop("the relational (RDD) loss is off", ["rdd_weight", "rdd_features", "rdd_queue_size"])
    drop(f"method {method} does not read them",
         sorted({k for entry in REGISTRY.values() for k in entry.cls.reads} - set(reads)))
    if not float(config.get("relative_weight", 0) or 0) > 0 and not disc:
        drop("the relative terms are off", ["relative_target"])
    if config.get("eval_every") == 0:
        drop("validation is off (eval_every 0)", ["val_seed", "val_reference_steps"])
    drop("they are empty (the method's own, or off)", [k for k, v in list(scalars.items()) if v == ""])
    if left:
        scalars[LEFT_OUT_KEY] = left
    return scalars


def _training_section(facts: dict) -> str:
    if not facts.get("training"):
        return ""
    rows = "\n".join(f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in facts["training"].items())
    left = facts.get("training_left_out") or {}
    note = "".join(f"\nNot listed, as {why}: {', '.join(f'`{n}`' for n in names)}.\n" for why, names in left.items())
    return (f"\n## Training\n\nThe settings of the run that applied to this student.\n\n| field | value |\n"
            f"| --- | --- |\n{rows}\n{note}")


# ---------------------------------------------------------------------------------------------- Hub front matter

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hub_model_id(teacher: str, teacher_dir: Path) -> str | None:
    """The teacher's Hugging Face Hub id, for the card's ``base_model``: the id it was given as, the id of the Hub
    cache folder it lies in (``models--owner--name/snapshots/...``) or its model_index.json's ``_name_or_path``; None
    for a local model with none of them (a local path is no ``base_model``)."""
    def hub(x) -> str | None:
        return x if isinstance(x, str) and _HUB_ID.match(x) and not Path(x).expanduser().exists() else None

    if hub(teacher):
        return teacher
    for part in Path(teacher_dir).resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--"):].replace("--", "/", 1)
    try:
        return hub(json.loads((Path(teacher_dir) / "model_index.json").read_text()).get("_name_or_path"))
    except (OSError, ValueError, AttributeError):
        return None


def hub_model_card(facts: dict, teacher_dir: Path, body: str) -> str:
    """The model card with the Hub's front matter, written by ``huggingface_hub``'s ModelCard / ModelCardData
    (offline): base_model (when the teacher has a Hub id), library_name diffusers (the diffusers file loads with
    ``load_lora_weights``), pipeline_tag text-to-image, and tags (lora, text-to-image, diffusers, rapm, the family)."""
    from huggingface_hub import ModelCard, ModelCardData

    family = facts["teacher_family"]
    tags = ["lora", "text-to-image", "diffusers", "rapm", _family(family).hub_tag]
    base = hub_model_id(facts["teacher"], teacher_dir)
    data = ModelCardData(base_model=base, library_name="diffusers", pipeline_tag="text-to-image",
                         tags=list(dict.fromkeys(tags)))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _run_thumbnail_of(run: Path, config: dict, teacher):
    """``run_thumbnail`` of the exported checkpoint's step, at the teacher's image size."""
    try:
        info = read_teacher_info(config["teacher"])
    except (RapmError, OSError, ValueError, KeyError):
        return None
    _, h, w = info.latent_shape
    prompts = config.get("sample_prompts")
    return run_thumbnail(Path(run), config.get("step"), (w * info.vae_scale_factor, h * info.vae_scale_factor),
                         len(prompts) if isinstance(prompts, list) else 0)


def _store_guidance(config: dict, teacher) -> float | None:
    """The guidance the run's trajectories were computed at (a FLUX student samples with it as its embedding), from
    the store's manifest; the family's default when the store is gone."""
    if teacher.family_def.cfg:
        return None
    try:
        return float(read_manifest(Path(config["store"]))["guidance"])
    except (StoreError, OSError, KeyError, ValueError):
        return float(teacher.family_def.default_guidance)


def cli(
    run: Path = typer.Option(..., "--run", help="The training run directory (rapm train --out)."),
    out: Path = typer.Option(..., "--out", help="Folder to write the LoRA files, README.md, rapm_lora.json and "
                             "thumbnail.png (the student's samples of the exported step, when the run sampled it) to."),
    format: str = typer.Option(
        "both", "--format", help="both (default): pytorch_lora_weights.safetensors for diffusers and "
        "NAME.safetensors (kohya) for ComfyUI / A1111; or only one: diffusers, kohya."),
    name: Optional[str] = typer.Option(None, "--name", help=f"The kohya file's name (NAME.safetensors, default "
                                       f"{DEFAULT_NAME}), A1111's alias for it (ss_output_name) and its modelspec.title."),
    step: Optional[int] = typer.Option(None, "--step", help="Export the checkpoint of iteration N instead of the "
                                       "latest (one that rotation kept: keep_checkpoints)."),
    dtype: str = typer.Option("float32", "--dtype", help="Storage dtype of the weights: float32, float16 (half the "
                              "size), bfloat16."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Read an old pickle state.pt that "
                                          "weights_only loading refuses; it can run code: only for a run you made."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="--no-progress: no progress bars, the "
                                  "libraries' (loading the teacher) neither."),
) -> None:
    """Export the trained student of RUN as a LoRA."""
    if not progress:
        quiet_library_bars()

    if format not in FORMATS:
        raise ExportError(f"--format {format!r} is not supported; use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    name = check_name(name)  # before the teacher loads
    teacher, unet, config = load_student(run, trust_checkpoint=trust_checkpoint, **({"step": step} if step is not None else {}))
    steps = config["steps"]  # N, from the store the run trained on
    extra = {"run": str(run), **applied_settings(config)}
    settings = {"learning_rate": config.get("lr"), "seed": config.get("seed"), "mixed_precision": config.get("mixed_precision"),
                "training_started_at": config.get("training_started_at")}
    thumb = _run_thumbnail_of(run, config, teacher)
    export_lora(unet, config["teacher"], teacher.family, out, int(steps), fmt=format, extra_card=extra, dtype=dtype,
                training_steps=config.get("step"), guidance=_store_guidance(config, teacher), name=name,
                run_settings=settings, thumbnail=thumb[0] if thumb else None,
                thumbnail_source=str(thumb[1].relative_to(run)) if thumb else None,
                finished_at=config.get("checkpoint_written_at"))
    facts = read_export_facts(out) or {}
    flow = "comfyui" in facts  # a FLUX / SD3 student: its kohya file is sd-scripts' FLUX / SD3 layout
    for fmt, file_name in facts.get("files", {}).items():
        use = ("diffusers' load_lora_weights, rapm sample" if fmt == "diffusers" else
               "ComfyUI (models/loras, LoraLoaderModelOnly), kohya sd-scripts" if flow else
               "ComfyUI (models/loras), A1111 (models/Lora)")
        typer.echo(f"wrote {out / file_name} ({fmt}: {use})")
    if not thumb and config.get("step") is not None:
        typer.echo(f"no thumbnail: the run has no sample grid of step {config.get('step')} (sample_every)")
    summary = sampling_summary(int(steps), facts["scheduler"]) if "scheduler" in facts else f"{steps} steps"
    typer.echo(f"sample with {summary} (README.md there): "
               f"rapm sample --teacher {config['teacher']} --lora {out} --prompt '...'")
