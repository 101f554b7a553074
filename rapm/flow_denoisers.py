"""One denoiser call for flow-matching transformers: SD3's MMDiT and FLUX.1's packed-latent transformer.

Everything the trainer sees is a latent [B, 16, H, W] and a velocity of the same shape
(rapm.flowmatch): the differences stay here.

* SD3 (``SD3Transformer2DModel``): patches itself; takes the scheduler timestep (σ · 1000), the
  joint text sequence (two CLIP penultimate states padded to T5's width, then T5) and the pooled
  CLIP projections. Classifier-free guidance is a batched [uncond; cond] pass, as the pipeline does it.
* FLUX.1 (``FluxTransformer2DModel``): takes latents packed into 2x2 patches ([B, HW/4, 64]),
  the rotary position ids of the image tokens (0, row, col) and of the text tokens (zeros), the
  timestep as σ (the pipeline's t / 1000), the CLIP pooled output, the T5 sequence and, for
  FLUX.1-dev, the distilled guidance value as an embedding (no CFG pass).

Prompts are encoded by the pipelines' own ``encode_prompt`` on a pipeline object built from the
loaded components, so the embeddings are the pipelines' exactly. Discriminator features are the
image-token outputs of chosen transformer blocks, reshaped to the token grid (PCM's SD3 script
puts its heads on every joint block's image tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rapm.hooks import block_outputs

SD3 = "sd3"
FLUX = "flux"


@dataclass
class FlowConditioning:
    """The text conditioning of one batch: the token sequence, the pooled vector and, for FLUX, the text ids."""

    prompt_embeds: torch.Tensor  # [B, L, joint_attention_dim]
    pooled_prompt_embeds: torch.Tensor  # [B, pooled_projection_dim]
    text_ids: torch.Tensor | None = None  # FLUX: [L, 3] zeros (rotary ids of the text tokens)

    def to(self, device=None, dtype=None) -> "FlowConditioning":
        ids = None if self.text_ids is None else self.text_ids.to(device=device, dtype=dtype)
        return FlowConditioning(
            self.prompt_embeds.to(device=device, dtype=dtype), self.pooled_prompt_embeds.to(device=device, dtype=dtype), ids
        )

    @staticmethod
    def cat(parts: Sequence["FlowConditioning"]) -> "FlowConditioning":
        """Batch conditionings along B (text ids are per-token, not per-sample: the first one's)."""
        return FlowConditioning(
            torch.cat([p.prompt_embeds for p in parts]), torch.cat([p.pooled_prompt_embeds for p in parts]),
            parts[0].text_ids,
        )


def family_of(transformer: torch.nn.Module) -> str:
    """``sd3`` or ``flux`` from the transformer's class."""
    name = type(transformer).__name__
    if name.startswith("SD3Transformer"):
        return SD3
    if name.startswith("FluxTransformer"):
        return FLUX
    raise ValueError(f"{name} is not a flow-matching transformer rapm knows (SD3Transformer2DModel, FluxTransformer2DModel)")


# ---------------------------------------------------------------------------------------------------------------
# Prompt encoding, through the pipelines' own encode_prompt.


def encode_prompt_sd3(
    pipe, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, max_sequence_length: int = 256,
    guidance: bool = True,
) -> tuple[FlowConditioning, FlowConditioning | None]:
    """(cond, uncond) as StableDiffusion3Pipeline encodes them; uncond (the negative prompt, "" by default) when ``guidance``."""
    prompts = list(prompts)
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=guidance,
        negative_prompt=list(negative_prompts) if negative_prompts is not None else None,
        max_sequence_length=max_sequence_length, device=pipe.transformer.device,
    )
    cond = FlowConditioning(embeds, pooled)
    return cond, (FlowConditioning(negative_embeds, negative_pooled) if guidance else None)


def encode_prompt_flux(pipe, prompts: Sequence[str], max_sequence_length: int = 512) -> FlowConditioning:
    """The conditioning FluxPipeline encodes (CLIP pooled, T5 sequence, zero text ids)."""
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, max_sequence_length=max_sequence_length, device=pipe.transformer.device
    )
    return FlowConditioning(embeds, pooled, text_ids)


# ---------------------------------------------------------------------------------------------------------------
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


def image_seq_len(family: str, height: int, width: int, patch_size: int = 2) -> int:
    """Transformer image tokens for a latent of height x width (the length FLUX's dynamic shift depends on)."""
    return (height // patch_size) * (width // patch_size)


# ---------------------------------------------------------------------------------------------------------------
# The denoiser calls: latent [B, 16, H, W] and scheduler timestep [B] (σ · 1000) in, velocity [B, 16, H, W] out.


def sd3_velocity(transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: FlowConditioning) -> torch.Tensor:
    """SD3's velocity at ``timestep`` (scheduler units), with the joint text sequence and pooled projections."""
    return transformer(
        hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
        pooled_projections=cond.pooled_prompt_embeds, return_dict=False,
    )[0]


def sd3_guided_velocity(
    transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: FlowConditioning, uncond: FlowConditioning,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guided SD3 velocity, v_u + w (v_c - v_u), in one batched pass as StableDiffusion3Pipeline does."""
    both = sd3_velocity(
        transformer, torch.cat([latents, latents]), torch.cat([timestep, timestep]), FlowConditioning.cat([uncond, cond])
    )
    v_uncond, v_cond = both.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def flux_velocity(
    transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: FlowConditioning, guidance: float | None
) -> torch.Tensor:
    """FLUX's velocity: pack, position ids, σ = timestep / 1000, the guidance embedding (FLUX.1-dev), unpack.

    ``guidance`` must be given exactly when the transformer has ``guidance_embeds`` (FLUX.1-dev, not schnell).
    """
    b, _, h, w = latents.shape
    if bool(transformer.config.guidance_embeds) != (guidance is not None):
        raise ValueError(
            "FLUX guidance: pass the distilled guidance value (e.g. 3.5) for a transformer with guidance_embeds "
            "(FLUX.1-dev) and None for one without (FLUX.1-schnell)"
        )
    guidance_vec = None
    if guidance is not None:
        guidance_vec = torch.full([b], float(guidance), device=latents.device, dtype=torch.float32)
    out = transformer(
        hidden_states=pack_latents(latents), timestep=timestep / 1000, guidance=guidance_vec,
        pooled_projections=cond.pooled_prompt_embeds, encoder_hidden_states=cond.prompt_embeds,
        txt_ids=cond.text_ids, img_ids=latent_image_ids(h, w, latents.device, latents.dtype), return_dict=False,
    )[0]
    return unpack_latents(out, h, w)


def flow_velocity(
    transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: FlowConditioning,
    uncond: FlowConditioning | None = None, guidance_scale: float = 1.0, flux_guidance: float | None = None,
) -> torch.Tensor:
    """The teacher's (or an adapter's) velocity for either family; SD3 uses CFG when ``uncond`` is given."""
    family = family_of(transformer)
    if family == FLUX:
        return flux_velocity(transformer, latents, timestep, cond, flux_guidance)
    if uncond is not None and guidance_scale != 1.0:
        return sd3_guided_velocity(transformer, latents, timestep, cond, uncond, guidance_scale)
    return sd3_velocity(transformer, latents, timestep, cond)


# ---------------------------------------------------------------------------------------------------------------
# Discriminator features: image tokens of chosen blocks, on the token grid.


def transformer_blocks(transformer) -> list[torch.nn.Module]:
    """The blocks features can come from, in forward order: SD3's joint blocks; FLUX's joint then single blocks."""
    blocks = list(transformer.transformer_blocks)
    blocks += list(getattr(transformer, "single_transformer_blocks", []))
    return blocks


def default_feature_blocks(transformer, every: int = 1) -> list[int]:
    """Every ``every``-th joint (two-stream) block: PCM's SD3 discriminator uses all 24 of SD3-medium's (every=1).

    FLUX's 19 joint blocks are 3072 wide: a head there is ~4x an SD3 head, so ``every`` > 1 trades heads for memory.
    """
    return list(range(0, len(transformer.transformer_blocks), every))


def feature_channels(transformer, blocks: Sequence[int]) -> list[int]:
    """Channels of each chosen block's image tokens (the transformer's inner width)."""
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return [inner for _ in blocks]


def block_features(
    transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: FlowConditioning, blocks: Sequence[int],
    flux_guidance: float | None = None,
) -> list[torch.Tensor]:
    """The image-token outputs of ``blocks`` (indices into ``transformer_blocks``) as [B, C, H/2, W/2] maps.

    Forward hooks keep each chosen block's image stream (both SD3's and FLUX's blocks return
    (text, image)); the forward stops after the last chosen block, so later blocks cost nothing.
    Tokens are row-major over the patch grid for both families (SD3's PatchEmbed and FLUX's packing),
    so a reshape puts them back on the grid and the 2-D conv heads of rapm.discriminator apply.

    Under gradient checkpointing the stop waits for the checkpointed call to return (rapm.hooks.block_outputs,
    which the discriminator's backbone features use too; tests: gradients equal without checkpointing).
    """
    all_blocks = transformer_blocks(transformer)
    if not blocks:
        raise ValueError("choose at least one transformer block for discriminator features")
    for i in blocks:
        if not -len(all_blocks) <= i < len(all_blocks):
            raise ValueError(f"block {i} out of range: the transformer has {len(all_blocks)} blocks")
    wanted = sorted({i % len(all_blocks) for i in blocks})
    b, _, h, w = latents.shape
    grid = (h // 2, w // 2)
    index = {id(all_blocks[i]): i for i in wanted}
    kept: dict[int, torch.Tensor] = {}

    def keep(block, output):
        image = output[1] if isinstance(output, tuple) else output
        kept[index[id(block)]] = image.transpose(1, 2).reshape(b, image.shape[-1], *grid)

    if family_of(transformer) == FLUX:
        call = lambda: flux_velocity(transformer, latents, timestep, cond, flux_guidance)  # noqa: E731
    else:
        call = lambda: sd3_velocity(transformer, latents, timestep, cond)  # noqa: E731
    block_outputs(transformer, [all_blocks[i] for i in wanted], all_blocks[wanted[-1]], keep, call)
    return [kept[i % len(all_blocks)] for i in blocks]
