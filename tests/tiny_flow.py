"""Tiny random SD3 and FLUX.1 pipelines, saved as diffusers folders, built without any download.

They have the real pipelines' structure (SD3: two CLIP encoders with projections and
a T5 encoder, an MMDiT ``SD3Transformer2DModel``; FLUX: CLIP + T5, a
``FluxTransformer2DModel`` with the guidance embedding of FLUX.1-dev and packed
latents; both a 16-channel VAE with shift and scaling factors and a
``FlowMatchEulerDiscreteScheduler``) at hidden size 32 and one or two layers, so a
CPU runs them in milliseconds. Tokenizers are CLIP BPE tokenizers from an
in-memory vocabulary (tests/tiny.py); one also stands in for the T5 tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rapm.demo.clip import build_clip_tokenizer, clip_text_encoder

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car"]
MAX_TOKENS = 16  # CLIP's model_max_length here, and the T5 max_sequence_length the tests pass
LATENT = 8  # latent side; the image side is LATENT * 2 (a two-level VAE)
IMAGE = LATENT * 2

# The SD3 and FLUX VAE latent statistics (their vae/config.json values), so the decode path is the real one.
SD3_VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)


def _vae(factors: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 16], layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4,
        sample_size=IMAGE, use_quant_conv=False, use_post_quant_conv=False, **factors,
    )


def t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=1, eos_token_id=1,
    )
    return T5EncoderModel(config)


def build_tiny_sd3(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random StableDiffusion3Pipeline to ``folder`` (hidden 32, one MMDiT block per layer, 2 layers)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizers = [build_clip_tokenizer(WORDS, model_max_length=MAX_TOKENS) for _ in range(3)]
    eos = tokenizers[0].convert_tokens_to_ids("<|endoftext|>")
    # CLIP hidden 16 + 16 is padded to T5's 32 (joint_attention_dim); pooled is the two projections, 16 + 16.
    transformer = SD3Transformer2DModel(
        sample_size=LATENT, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=16,
        pos_embed_max_size=LATENT,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=_vae(SD3_VAE_FACTORS),
        text_encoder=clip_text_encoder(len(tokenizers[0]), 16, 16, MAX_TOKENS, eos), tokenizer=tokenizers[0],
        text_encoder_2=clip_text_encoder(len(tokenizers[1]), 16, 16, MAX_TOKENS, eos), tokenizer_2=tokenizers[1],
        text_encoder_3=t5_encoder(len(tokenizers[2])), tokenizer_3=tokenizers[2],
    )
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_flux(folder: str | Path, seed: int = 0, single_layers: int = 1) -> Path:
    """Save a tiny random FluxPipeline (FLUX.1-dev-shaped: guidance embedding, dynamic shift) to ``folder``; one
    double-stream block and ``single_layers`` single-stream blocks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = (build_clip_tokenizer(WORDS, model_max_length=MAX_TOKENS) for _ in range(2))
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=single_layers, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=_vae(FLUX_VAE_FACTORS),
        text_encoder=clip_text_encoder(len(tokenizer), 32, None, MAX_TOKENS, eos), tokenizer=tokenizer,
        text_encoder_2=t5_encoder(len(tokenizer_2)), tokenizer_2=tokenizer_2,
    )
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def load(folder: str | Path):
    """The pipeline saved in ``folder`` (its class from model_index.json), float32 on the CPU."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)


BUILD = {"sd3": build_tiny_sd3, "flux": build_tiny_flux}  # family -> its tiny pipeline's builder
