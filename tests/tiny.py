"""Test fixture: tiny random SD and SDXL pipelines, saved as diffusers folders, for tests and CPU benchmarks.

They have the real architectures' structure (cross-attention UNet, CLIP text
encoders, a VAE, SDXL's pooled embeddings and time ids) at a size a CPU runs
in milliseconds. Nothing is downloaded: the tokenizer is built from an
in-memory vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rapm.demo.clip import SD_SCHEDULER, build_clip_tokenizer, clip_text_encoder


def build_tiny_pipeline(
    folder: str | Path, family: str = "sd", prediction_type: str = "epsilon", seed: int = 0, sample_size: int = 8
) -> Path:
    """Save a tiny random SD (``family="sd"``) or SDXL (``"sdxl"``) pipeline to ``folder``."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    torch.manual_seed(seed)
    folder = Path(folder)
    tokenizer = build_clip_tokenizer(["a", "photo", "of", "cat", "dog", "red", "blue", "car"], model_max_length=16)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=4, sample_size=sample_size * 2,
    )
    scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    if family == "sd":
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        )
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=clip_text_encoder(len(tokenizer), 32, None, 16, eos), tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    elif family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=8,
        )
        tokenizer_2 = build_clip_tokenizer(["a", "photo", "of", "cat", "dog", "red", "blue", "car"], model_max_length=16)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=clip_text_encoder(len(tokenizer), 32, None, 16, eos),
            text_encoder_2=clip_text_encoder(len(tokenizer_2), 32, 32, 16, eos), tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
        )
    else:
        raise ValueError(f"family must be 'sd' or 'sdxl', got {family!r}")
    pipe.save_pretrained(folder)
    return folder
