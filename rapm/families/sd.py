"""The UNet families: SD 1.x / 2.x (``sd``) and SDXL (``sdxl``), both ``UNet2DConditionModel`` denoisers.

They differ only in how prompts become conditioning (one or two CLIP text encoders; SDXL's pooled embeddings and
time ids), in what the UNet takes besides the latents, and in their export names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rapm.conditioning import Conditioning
from rapm.families.base import Family, TeacherError
from rapm.roles import PCM_TARGET_MODULES



def unet_dtype(unet: torch.nn.Module) -> torch.dtype:
    """The dtype of the UNet's own weights (its LoRA adapters may be float32 beside bfloat16 weights)."""
    conv_in = getattr(unet, "conv_in", None)
    return conv_in.weight.dtype if conv_in is not None else next(unet.parameters()).dtype


def token_ids(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


class UNetFamily(Family):
    """A teacher whose denoiser is a diffusers ``UNet2DConditionModel`` (epsilon or v prediction)."""

    denoiser_subfolder = "unet"
    denoiser_class_name = "UNet2DConditionModel"
    lora_targets = tuple(PCM_TARGET_MODULES)  # PCM's (docs/references.md)
    single_file_kwargs = {}  # A1111 / civitai single files convert (``rapm convert``)

    def latent_shape(self, denoiser_config: dict) -> tuple[int, int, int]:
        size = denoiser_config["sample_size"]
        size = size if isinstance(size, int) else size[0]
        return (int(denoiser_config["in_channels"]), int(size), int(size))

    def denoise(self, denoiser: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Call the UNet with SD or SDXL conditioning; the output is float32.

        Only the UNet's inputs take its dtype: positions, targets and the DDIM arithmetic around it stay float32
        under mixed precision (in bfloat16, |z| ~ 1-2 would round to steps of ~0.008, eight times the pseudo-Huber c).
        """
        dtype = unet_dtype(denoiser)
        z, cond = z.to(dtype), cond.to(dtype)
        added = None
        if cond.pooled_embeds is not None:
            added = {"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids}
        t = torch.as_tensor(t, device=z.device)
        if t.ndim == 0:
            t = t.expand(z.shape[0])
        return denoiser(z, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added, return_dict=False)[0].float()

    def feature_blocks(self, denoiser, levels: str):
        """``full``: the down blocks, the mid block and the up blocks (SD 1.5); ``down_mid``: the down blocks and the
        mid block, after which the forward stops (SDXL)."""
        if levels not in ("full", "down_mid"):
            raise ValueError(f"discriminator levels must be 'full' or 'down_mid', got {levels!r}")
        blocks = list(denoiser.down_blocks) + [denoiser.mid_block]
        if levels == "full":
            return blocks + list(denoiser.up_blocks), None
        return blocks, denoiser.mid_block

    def feature_channels(self, denoiser, levels: str) -> list[int]:
        """Channels of the block outputs ``feature_blocks`` gives, in order (down blocks, mid, up blocks)."""
        outs = list(denoiser.config.block_out_channels)
        channels = outs + [outs[-1]]
        if levels == "full":
            channels += list(reversed(outs))
        elif levels != "down_mid":
            raise ValueError(f"discriminator levels must be 'full' or 'down_mid', got {levels!r}")
        return channels

    def load_lora(self, loader, state: dict, alphas, denoiser, adapter: str, metadata) -> None:
        loader.load_lora_into_unet(state, alphas, denoiser, adapter_name=adapter, metadata=metadata)

    def export_kwargs(self, state: dict, meta: dict) -> dict:
        return {"unet_lora_layers": state, "unet_lora_adapter_metadata": meta}


class SDFamily(UNetFamily):
    """SD 1.x and 2.x: one CLIP text encoder; the UNet takes its last hidden states."""

    name = "sd"
    pipeline_class_names = ("StableDiffusionPipeline",)
    # a safety checker is no part of a teacher (and would be fetched)
    single_file_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    text_encoders = (("tokenizer", "text_encoder", "CLIPTextModel"),)
    preset = "sd15"
    presets = {"sd15": {}}  # PCM's SD 1.5 adversarial LoRA script (docs/references.md): the defaults
    hub_tag = "stable-diffusion"
    single_file_signatures = (("cond_stage_model.model.", "SD 2.x"), ("cond_stage_model.transformer.", "SD 1.x"))
    default_guidance = 7.5
    # PCM's SD 1.5 scripts: w ~ U[4, 5] in LCM's form cond + w (cond - uncond), diffusers' g = w + 1; Δ = 1000 // 50
    pcm_guidance = (5.0, 6.0)
    pcm_delta = 20
    kohya_names = "diffusers"  # sd-scripts names SD 1.x / 2.x modules by diffusers' paths

    def encode(self, teacher, prompts: Sequence[str]) -> Conditioning:
        ids = token_ids(teacher.tokenizers[0], prompts, teacher.device)
        return Conditioning(teacher.text_encoders[0](ids)[0])

    def base_model_version(self, denoiser_config) -> tuple[str, bool]:
        """SD 2.x is told from SD 1.x by its text encoder width: OpenCLIP ViT-H, so cross-attention 1024 (SD 1.x: 768)."""
        get = denoiser_config.get if isinstance(denoiser_config, dict) else lambda k, d=None: getattr(denoiser_config, k, d)
        v2 = get("cross_attention_dim") == 1024
        return "sd_v2" if v2 else "sd_v1", v2

    def sai_architecture(self, v2: bool, prediction_type: str, version: str = "") -> str:
        if v2:
            return f"stable-diffusion-v2-{'768-v' if prediction_type == 'v_prediction' else '512'}/lora"
        return "stable-diffusion-v1/lora"


class SDXLFamily(UNetFamily):
    """SDXL: two CLIP text encoders (hidden states concatenated, the second's pooled projection) and time ids."""

    name = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    text_encoders = (("tokenizer", "text_encoder", "CLIPTextModel"),
                     ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"))
    preset = "sdxl"
    presets = {
        # PCM's SDXL script: lower LR, no weight decay, a lighter discriminator (down + mid blocks, 1 head, 1x1 convs).
        "sdxl": dict(lr=2e-6, weight_decay=0.0, disc_levels="down_mid", disc_heads_per_level=1, disc_kernel_size=1),
        # The paper's SDXL run: LoRA rank 1 (RAPM README, ~7 MB).
        "sdxl-rank1": dict(lr=2e-6, weight_decay=0.0, disc_levels="down_mid", disc_heads_per_level=1,
                           disc_kernel_size=1, lora_rank=1, lora_alpha=1.0, disc_lora_rank=1, disc_lora_alpha=1.0),
    }
    hub_tag = "stable-diffusion-xl"
    single_file_signatures = (("conditioner.embedders.1.", "SDXL"),)
    default_guidance = 5.0
    pcm_guidance = (7.0, 8.0)  # PCM's SDXL scripts: w ~ U[6, 7] in LCM's form; Δ = 1000 // 40
    pcm_delta = 25
    disc_levels = "down_mid"
    force_zeros_for_empty_prompt = True
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    kohya_names = "ldm"  # sd-scripts trains SDXL on its LDM UNet, so its files (and A1111's SDXL loader) use LDM names

    def check_denoiser(self, denoiser, path: Path) -> None:
        if denoiser.config.addition_embed_type != "text_time":
            raise TeacherError(f"{path / 'unet' / 'config.json'}: addition_embed_type must be 'text_time' for an SDXL teacher")

    def encode(self, teacher, prompts: Sequence[str]) -> Conditioning:
        hidden, pooled = [], None
        for tok, enc in zip(teacher.tokenizers, teacher.text_encoders):
            out = enc(token_ids(tok, prompts, teacher.device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
            hidden.append(out.hidden_states[-2])
        return Conditioning(torch.cat(hidden, dim=-1), pooled, self.time_ids(teacher, len(prompts)))

    def negative(self, teacher, cond: Conditioning, negative_prompt: str | None) -> Conditioning:
        if negative_prompt is None and teacher.force_zeros_for_empty_prompt:
            uncond = cond.map(torch.zeros_like)
            uncond.time_ids = cond.time_ids.clone()
            return uncond
        return super().negative(teacher, cond, negative_prompt)

    @staticmethod
    def time_ids(teacher, batch: int) -> torch.Tensor:
        """original size, crop top-left, target size: the pipeline's defaults at the teacher's resolution."""
        size = teacher.image_size
        ids = torch.tensor([size, size, 0, 0, size, size], dtype=teacher.dtype, device=teacher.device)
        return ids.expand(batch, 6).clone()

    def base_model_version(self, denoiser_config) -> tuple[str, bool]:
        return "sdxl_base_v1-0", False

    def sai_architecture(self, v2: bool, prediction_type: str, version: str = "") -> str:
        return "stable-diffusion-xl-v1-base/lora"


SD = SDFamily()
SDXL = SDXLFamily()
