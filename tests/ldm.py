"""A diffusers SD 1.x pipeline folder written as one original-format (LDM / A1111 / civitai) ``.safetensors`` file,
for the single-file teacher tests: the UNet in the LDM UNet's names (``rapm.export.ldm_block_map``), the VAE in
LDM's first-stage names (its mid attention as 1x1 convolutions), the CLIP text encoder under
``cond_stage_model.transformer.``. diffusers' ``from_single_file`` converts it back; the test checks it gives the
same weights, so a wrong name here cannot pass."""

from __future__ import annotations

from pathlib import Path

import torch

from rapm.export import ldm_block_map, ldm_module_name

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_name(key: str, blocks: int) -> str:
    """A diffusers AutoencoderKL key in LDM's first-stage names (without the ``first_stage_model.`` prefix)."""
    p = key.split(".")
    top = {"conv_norm_out": "norm_out"}
    if p[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, rest = p[0], p[1:]
    if rest[0] in top:
        return ".".join([side, top[rest[0]], *rest[1:]])
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] in ("down_blocks", "up_blocks"):
        i = int(rest[1]) if side == "encoder" else blocks - 1 - int(rest[1])  # the decoder's up blocks run backwards
        where = "down" if side == "encoder" else "up"
        if rest[2] == "resnets":
            inner = _VAE_RESNET.get(rest[4], rest[4])
            return ".".join([side, where, str(i), "block", rest[3], inner, *rest[5:]])
        sampler = "downsample" if side == "encoder" else "upsample"
        return ".".join([side, where, str(i), sampler, *rest[4:]])  # downsamplers.0.conv -> downsample.conv
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return ".".join([side, "mid", f"block_{int(rest[2]) + 1}", *rest[3:]])
        inner = ".".join(rest[3:-1])
        return ".".join([side, "mid", "attn_1", _VAE_ATTENTION[inner], rest[-1]])
    raise KeyError(key)


def save_single_file(folder: str | Path, out: str | Path) -> Path:
    """The SD 1.x pipeline of ``folder`` as one LDM-format file ``out``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    state: dict[str, torch.Tensor] = {}
    blocks = ldm_block_map(unet.config)
    for key, value in unet.state_dict().items():
        module, _, leaf = key.rpartition(".")
        state[f"model.diffusion_model.{ldm_module_name(module, blocks)}.{leaf}"] = value
    n = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        name = _vae_name(key, n)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        state[f"first_stage_model.{name}"] = value
    for key, value in text.state_dict().items():  # transformers >= 5.6 drops CLIPTextModel's ``text_model.`` level
        state[f"cond_stage_model.transformer.{key if key.startswith('text_model.') else 'text_model.' + key}"] = value
    out = Path(out)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
