"""The public transformer configs of SD3-medium and FLUX.1-dev, built without weights, for memory and speed on paper.

Values are those of the models' ``transformer/config.json`` on the Hugging Face Hub
(stabilityai/stable-diffusion-3-medium-diffusers; black-forest-labs/FLUX.1-dev), as reproduced in
public code found by search (e.g. sglang's FluxArchConfig, diffusers-based SD3 memory tests).
The models are built on the ``meta`` device: shapes and parameter counts with no memory.
"""

from __future__ import annotations

import torch

from rapm.roles import matches_target

SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# Published sizes: SD3-medium "2B" (its MMDiT transformer), FLUX.1 "12B".
SD3_MEDIUM_PARAMS = 2.03e9
FLUX_DEV_PARAMS = 11.9e9


def meta_transformer(family: str, **overrides) -> torch.nn.Module:
    """SD3-medium's (``sd3``) or FLUX.1-dev's (``flux``) transformer on the meta device; ``overrides`` change the config."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if family == "sd3":
        cls, config = SD3Transformer2DModel, {**SD3_MEDIUM_TRANSFORMER, **overrides}
    elif family == "flux":
        cls, config = FluxTransformer2DModel, {**FLUX_DEV_TRANSFORMER, **overrides}
    else:
        raise ValueError(f"family must be 'sd3' or 'flux', got {family!r}")
    with torch.device("meta"):
        return cls(**config)


def parameter_count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def lora_parameter_count(module: torch.nn.Module, target_modules: list[str], rank: int) -> int:
    """Parameters of one rank-``rank`` LoRA on the Linear layers that are targets (``rapm.roles.matches_target``, the
    matching peft is given)."""
    total = 0
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and matches_target(name, target_modules):
            total += rank * (layer.in_features + layer.out_features)
    return total
