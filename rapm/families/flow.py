"""The flow-matching families: SD3 / SD3.5 (``sd3``, ``StableDiffusion3Pipeline``) and FLUX.1 (``flux``, ``FluxPipeline``).

Their denoisers are transformers that predict a velocity v = eps - x0 on x_t = (1 - σ) x0 + σ eps; the schedule is
``rapm.diffusion.Schedule`` of kind "flow" (positions t = σ · 1000, floats), so the DDIM step, the renoising and every
method are the UNet families' code (docs/flow-matching.md: the DDIM step in this (alpha, sigma) form is the Euler
step). What is theirs is here: the pipeline that encodes prompts (its own ``encode_prompt``), the one transformer
call (FLUX packs its latents into 2x2 patches and takes rotary ids and its guidance embedding), the
discriminator's feature blocks (the joint blocks' image tokens on the token grid) and the LoRA export names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rapm.conditioning import Conditioning
from rapm.families.base import PICKLE_SUFFIXES, Family, TeacherError


# diffusers examples/dreambooth/train_dreambooth_lora_sd3.py: the default (no --lora_layers) targets the joint
# attention's image and text projections. PCM's SD3 script (code/text_to_image_sd3/train_pcm_lora_sd3_adv.py) and
# diffusers' FLUX script also target the feed-forward layers of both streams; rapm trains attention and FF.
SD3_TARGET_MODULES = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]
# FLUX: the twelve names above in the double-stream blocks. In the single-stream blocks those names match only the
# attention's to_q / to_k / to_v, while FLUX LoRA trainers train the blocks' MLP too: diffusers'
# examples/dreambooth/train_dreambooth_lora_flux.py adds ``proj_mlp`` to its default list; kohya-ss/sd-scripts'
# networks/lora_flux.py trains every Linear of a SingleStreamBlock: ``linear1`` (q, k, v and the MLP's input in one
# Linear: diffusers' to_q/to_k/to_v + proj_mlp) and ``linear2`` (the attention's and the MLP's output in one Linear:
# diffusers' proj_out); ostris' ai-toolkit's FLUX LoRAs hold proj_mlp and proj_out (and the norms' Linears) too.
# So rapm targets ``proj_mlp`` and the single blocks' ``proj_out`` as well: the single blocks are 38 of FLUX.1's 57
# and hold 45% of its weights, and a single block's linear1 and linear2 are then wholly in the LoRA, as in a FLUX
# LoRA of those trainers (the ComfyUI file's ``lora_unet_single_blocks_N_linear1`` / ``_linear2``).
# The modulation Linears (norm.linear, norm1.linear, norm1_context.linear) stay out in every block, as in diffusers'
# default and rapm's SD3 list (sd-scripts and ai-toolkit train them too). ``single_transformer_blocks.*.proj_out``,
# not "proj_out": that would also match the transformer's final projection (BFL's final_layer.linear), outside
# every trainer's blocks (``peft_targets`` reads the ``*``).
FLUX_TARGET_MODULES = list(SD3_TARGET_MODULES) + ["proj_mlp", "single_transformer_blocks.*.proj_out"]


def transformer_dtype(transformer: torch.nn.Module) -> torch.dtype:
    """The dtype of the transformer's own weights (its LoRA adapters may be float32 beside bfloat16 weights)."""
    proj = getattr(getattr(transformer, "pos_embed", None), "proj", None) or getattr(transformer, "x_embedder", None)
    return proj.weight.dtype if proj is not None else next(transformer.parameters()).dtype


# FLUX's packed latents and position ids (the layout of FluxPipeline._pack_latents / _prepare_latent_image_ids).


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] to [B, (H/2)(W/2), 4C]: each 2x2 patch a token, channels-major within the patch."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` x ``width``."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[(H/2)(W/2), 3] rotary ids of the image tokens: (0, row, col) in packing order."""
    rows = torch.arange(height // 2).repeat_interleave(width // 2)
    cols = torch.arange(width // 2).repeat(height // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)
    return ids.to(device=device, dtype=dtype)


class FlowFamily(Family):
    """A teacher whose denoiser is a diffusers flow-matching transformer."""

    denoiser_subfolder = "transformer"
    disc_levels = "full"
    max_sequence_length = 256  # T5 tokens, the pipeline's default (capped by the tokenizer's model_max_length)

    def latent_shape(self, denoiser_config: dict) -> tuple[int, int, int]:
        size = denoiser_config.get("sample_size", 128)
        size = size if isinstance(size, int) else size[0]
        return (int(denoiser_config.get("out_channels") or 16), int(size), int(size))

    def load_prompt_encoder(self, path: Path, device, dtype, denoiser):
        """The family's diffusers pipeline with its tokenizers and text encoders (no VAE): it encodes the prompts with
        its own ``encode_prompt``, so the embeddings are the pipeline's exactly. Safetensors weights only."""
        for _, enc_name, _ in self.text_encoders:
            folder = path / enc_name
            if not folder.is_dir():
                raise TeacherError(f"{folder} is missing: encoding prompts for a {self.pipeline_class_names[0]} needs it")
            if not any(folder.glob("*.safetensors")):
                pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
                raise TeacherError(f"{folder}: {'its weights are ' + ', '.join(pickles) if pickles else 'no weights'}; "
                                   "rapm loads .safetensors weights only")
        pipe = self.pipeline_class().from_pretrained(path, transformer=denoiser, vae=None, torch_dtype=dtype,
                                                     use_safetensors=True)
        pipe.to(device)
        for _, enc_name, _ in self.text_encoders:
            getattr(pipe, enc_name).requires_grad_(False).eval()
        return pipe

    def image_seq_len(self, latent_shape) -> int:
        """Image tokens of the transformer (2x2 patches): the length FLUX's dynamic shift μ depends on."""
        return (latent_shape[1] // 2) * (latent_shape[2] // 2)

    def sequence_length(self, teacher) -> int:
        tok = teacher.tokenizers[-1]
        return min(self.max_sequence_length, int(getattr(tok, "model_max_length", self.max_sequence_length)))

    def feature_blocks(self, denoiser, levels: str):
        """The joint (double-stream) blocks, PCM's SD3 discriminator's; the whole forward runs (None)."""
        if levels != "full":
            raise ValueError(f"discriminator levels must be 'full' for a {self.name} teacher, got {levels!r}")
        return list(denoiser.transformer_blocks), None

    def feature_channels(self, denoiser, levels: str) -> list[int]:
        self.feature_blocks(denoiser, levels)
        inner = int(denoiser.config.num_attention_heads) * int(denoiser.config.attention_head_dim)
        return [inner] * len(denoiser.transformer_blocks)

    def feature_map(self, output, z: torch.Tensor) -> torch.Tensor:
        """A joint block's image tokens [B, L, C] (its output is (text, image)) on the 2x2-patch grid [B, C, H/2, W/2]."""
        tokens = output[1] if isinstance(output, tuple) else output
        b, _, h, w = z.shape
        return tokens.transpose(1, 2).reshape(b, tokens.shape[-1], h // 2, w // 2)

    def lora_state_dict(self, loader, weights: Path, denoiser):
        state, metadata = loader.lora_state_dict(str(weights.parent), weight_name=weights.name, return_lora_metadata=True)
        return state, None, metadata

    def load_lora(self, loader, state: dict, alphas, denoiser, adapter: str, metadata) -> None:
        loader.load_lora_into_transformer(state, denoiser, adapter_name=adapter, metadata=metadata)

    def export_kwargs(self, state: dict, meta: dict) -> dict:
        return {"transformer_lora_layers": state, "transformer_lora_adapter_metadata": meta}

    def base_model_version(self, denoiser_config) -> tuple[str, bool]:
        return self.name, False  # a family without sd-scripts' own id (each family below has its id)

    def sai_architecture(self, v2: bool, prediction_type: str, version: str = "") -> str:
        return f"{self.sai_name}/lora"

    sai_name = ""
    # ComfyUI's node for the model's σ shift (its ``model_sampling``): SD3's static shift, or FLUX's μ
    comfyui_sampling_node = "ModelSamplingSD3"

    def sampling_settings(self, steps: int, guidance: float | None) -> dict:
        """The pipeline arguments that reproduce the student's N Euler steps on the trailing σ in diffusers (FluxPipeline
        places them so itself), at the guidance embedding value it was trained with (``rapm_lora.json``'s scheduler)."""
        return {"class": "FlowMatchEulerDiscreteScheduler", "num_inference_steps": int(steps),
                "guidance_scale": float(guidance if guidance is not None else self.default_guidance)}


class SD3Family(FlowFamily):
    """SD3 / SD3.5: two CLIP encoders with projections and T5; the MMDiT takes the joint sequence and pooled vector."""

    name = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    denoiser_class_name = "SD3Transformer2DModel"
    text_encoders = (("tokenizer", "text_encoder", "CLIPTextModelWithProjection"),
                     ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
                     ("tokenizer_3", "text_encoder_3", "T5EncoderModel"))
    preset = "sd3"
    # PCM's SD3 run.sh (rank 32, lr 5e-6, weight decay 1e-3) with alpha = rank (diffusers' LoRA scripts), diffusers'
    # SD3 LoRA targets, PCM's SD3 discriminator heads (1x1 convs, one per joint block); docs/flow-matching.md
    presets = {"sd3": dict(lora_rank=32, lora_alpha=32.0, lora_targets=list(SD3_TARGET_MODULES), disc_lora_rank=32,
                           disc_lora_alpha=32.0, disc_heads_per_level=1, disc_kernel_size=1)}
    hub_tag = "sd3"
    single_file_signatures = (("model.diffusion_model.joint_blocks.", "SD3"),)
    default_guidance = 7.0  # StableDiffusion3Pipeline's guidance_scale
    lora_targets = tuple(SD3_TARGET_MODULES)
    sai_name = "stable-diffusion-3"

    def sai_architecture(self, v2: bool, prediction_type: str, version: str = "") -> str:
        """sd-scripts' ``determine_architecture``: "stable-diffusion-3-" + the model type (``base_model_version``:
        medium, 5-large, 5-medium)."""
        return f"{self.sai_name}-{version or 'medium'}/lora"

    def sampling_settings(self, steps: int, guidance: float | None) -> dict:
        """StableDiffusion3Pipeline needs ``sigmas=linspace(1, 1/N, N)`` (which it shifts) for the trailing σ, and
        guidance 1: the student's CFG is distilled."""
        import numpy as np

        return {"class": "FlowMatchEulerDiscreteScheduler", "num_inference_steps": int(steps),
                "sigmas": [float(x) for x in np.linspace(1.0, 1.0 / steps, steps)], "guidance_scale": 1.0}

    def base_model_version(self, denoiser_config) -> tuple[str, bool]:
        """sd-scripts' ``ss_base_model_version`` of an SD3 LoRA: its MMDiT's ``model_type`` (library/sd3_utils.py
        ``analyze_state_dict_state``): "medium" for SD3-medium, "5-large" (QK norm) and "5-medium" (QK norm and
        SD3.5-medium's second attention, diffusers' ``dual_attention_layers``)."""
        get = denoiser_config.get if isinstance(denoiser_config, dict) else lambda k, d=None: getattr(denoiser_config, k, d)
        if not get("qk_norm", None):
            return "medium", False
        return ("5-medium" if get("dual_attention_layers", None) else "5-large"), False

    def encode(self, teacher, prompts: Sequence[str]) -> Conditioning:
        """The joint sequence (two CLIP penultimate states padded to T5's width, then T5) and the pooled CLIP
        projections, as StableDiffusion3Pipeline's ``encode_prompt`` makes them."""
        pipe = teacher.pipeline
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=self.sequence_length(teacher), device=pipe.transformer.device)
        return Conditioning(embeds.float(), pooled.float())

    def denoise(self, denoiser, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """SD3's velocity at the scheduler timestep t = σ · 1000 (float), in float32."""
        dtype = transformer_dtype(denoiser)
        t = torch.as_tensor(t, device=z.device).float()
        if t.ndim == 0:
            t = t.expand(z.shape[0])
        cond = cond.to(dtype)
        return denoiser(hidden_states=z.to(dtype), timestep=t, encoder_hidden_states=cond.prompt_embeds,
                        pooled_projections=cond.pooled_embeds, return_dict=False)[0].float()


class FluxFamily(FlowFamily):
    """FLUX.1: CLIP (pooled) and T5 (sequence); the transformer takes 2x2-packed latents, rotary ids, σ and, for
    FLUX.1-dev, the distilled guidance value as an embedding instead of classifier-free guidance (``cfg`` False: the
    value rides in ``Conditioning.guidance``; the store records it as its guidance)."""

    name = "flux"
    pipeline_class_names = ("FluxPipeline",)
    denoiser_class_name = "FluxTransformer2DModel"
    text_encoders = (("tokenizer", "text_encoder", "CLIPTextModel"), ("tokenizer_2", "text_encoder_2", "T5EncoderModel"))
    preset = "flux"
    # SD3's preset with FLUX's targets, in bf16 with gradient checkpointing (docs/defaults.md)
    presets = {"flux": dict(lora_rank=32, lora_alpha=32.0, lora_targets=list(FLUX_TARGET_MODULES), disc_lora_rank=32,
                            disc_lora_alpha=32.0, disc_heads_per_level=1, disc_kernel_size=1, mixed_precision="bf16",
                            gradient_checkpointing=True)}
    hub_tag = "flux"
    single_file_signatures = (("double_blocks.", "FLUX.1"), ("model.diffusion_model.double_blocks.", "FLUX.1"))
    default_guidance = 3.5  # FluxPipeline's guidance_scale (FLUX.1-dev's guidance embedding)
    lora_targets = tuple(FLUX_TARGET_MODULES)
    max_sequence_length = 512  # FluxPipeline's default
    cfg = False
    sai_name = "flux-1-dev"
    comfyui_sampling_node = "ModelSamplingFlux"

    def base_model_version(self, denoiser_config) -> tuple[str, bool]:
        return "flux1", False  # sd-scripts' ss_base_model_version of a FLUX.1 LoRA (flux_utils.MODEL_VERSION_FLUX_V1)

    def latent_shape(self, denoiser_config: dict) -> tuple[int, int, int]:
        return self.latent_shape_of(denoiser_config, None, 8)

    def latent_shape_of(self, denoiser_config: dict, vae_sample_size: int | None, vae_scale: int) -> tuple[int, int, int]:
        """16 channels (the transformer's 64 are 2x2 packed) at FluxPipeline's default size: the VAE's sample_size
        (1024 px for FLUX.1) over its scale factor, else 128 (1024 px / 8)."""
        size = (vae_sample_size // vae_scale) if vae_sample_size else 128
        return (int(denoiser_config.get("in_channels", 64)) // 4, int(size), int(size))

    def encode(self, teacher, prompts: Sequence[str]) -> Conditioning:
        """The T5 sequence and CLIP's pooled output, as FluxPipeline's ``encode_prompt`` makes them (its text ids are
        zeros, which ``denoise`` builds)."""
        pipe = teacher.pipeline
        embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None,
                                               max_sequence_length=self.sequence_length(teacher),
                                               device=pipe.transformer.device)
        return Conditioning(embeds.float(), pooled.float())

    def with_guidance(self, cond: Conditioning, guidance: float | torch.Tensor) -> Conditioning:
        from dataclasses import replace

        device = cond.prompt_embeds.device
        if isinstance(guidance, torch.Tensor):  # one value per trajectory (a store's guidance range)
            return replace(cond, guidance=guidance.float().reshape(-1).expand(len(cond)).to(device))
        return replace(cond, guidance=torch.full((len(cond),), float(guidance), device=device))

    def denoise(self, denoiser, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """FLUX's velocity at the scheduler timestep t = σ · 1000 (the transformer takes σ), in float32."""
        dtype = transformer_dtype(denoiser)
        b, _, h, w = z.shape
        t = torch.as_tensor(t, device=z.device).float()
        if t.ndim == 0:
            t = t.expand(b)
        guidance = None
        if denoiser.config.guidance_embeds:
            if cond.guidance is None:
                raise TeacherError("this FLUX transformer has a guidance embedding (FLUX.1-dev) and the conditioning "
                                   "carries no guidance value; rebuild the store with this rapm's `rapm trajectories`")
            guidance = cond.guidance.float().reshape(-1).expand(b) if cond.guidance.numel() == 1 else cond.guidance.float()
        c = cond.to(dtype)
        text_ids = torch.zeros(c.prompt_embeds.shape[1], 3, device=z.device, dtype=dtype)
        out = denoiser(hidden_states=pack_latents(z.to(dtype)), timestep=t / 1000, guidance=guidance,
                       pooled_projections=c.pooled_embeds, encoder_hidden_states=c.prompt_embeds, txt_ids=text_ids,
                       img_ids=latent_image_ids(h, w, z.device, dtype), return_dict=False)[0]
        return unpack_latents(out, h, w).float()

    def lora_state_dict(self, loader, weights: Path, denoiser):
        return loader.lora_state_dict(str(weights.parent), weight_name=weights.name, return_alphas=True,
                                      return_lora_metadata=True)

    def load_lora(self, loader, state: dict, alphas, denoiser, adapter: str, metadata) -> None:
        loader.load_lora_into_transformer(state, alphas, denoiser, adapter_name=adapter, metadata=metadata)


SD3 = SD3Family()
FLUX = FluxFamily()

__all__ = ["FlowFamily", "SD3Family", "SD3", "FluxFamily", "FLUX", "transformer_dtype", "pack_latents", "unpack_latents",
           "latent_image_ids"]
