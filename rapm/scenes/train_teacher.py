"""Train the scenes teacher (issue 32): a Stable-Diffusion-shaped pipeline in pixel space, 3 x 32 x 32.

The digits teacher's trainer (``rapm.demo.train_teacher.train_teacher``: the epsilon objective on SD's
scaled_linear schedule, 10% of prompts dropped for classifier-free guidance, an EMA, a cosine LR) with this
world's modules and batches: every batch draws scenes uniformly from the world (``all_scenes``) and one fresh
image of each (``draw``, from a seed the trainer's generator draws), so no image is seen twice and the teacher
learns each prompt's many modes. Saved like the digits teacher (a ``StableDiffusionPipeline`` folder, ``vae``
null).

    OMP_NUM_THREADS=2 python -m rapm.scenes.train_teacher --out scenes-teacher --steps 3000
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from rapm.demo.clip import SD_SCHEDULER, build_clip_tokenizer, clip_text_encoder
from rapm.demo.train_teacher import save_teacher, train_teacher
from rapm.scenes.data import SIZE, all_scenes, draw

TOKENIZER_MAX_LENGTH = 16  # the longest prompt is 11 tokens with its start and end
TEXT_HIDDEN = 64


def vocabulary() -> list[str]:
    """Every word of the world's prompts, for the teacher's tokenizer."""
    return sorted({w for s in all_scenes() for w in s.prompt().split()})


def build_modules(seed: int = 0):
    """The untrained tokenizer, text encoder, UNet (3 channels, 32 x 32, cross-attention at 16 and 8 px, the pooled
    prompt added to the time embedding) and scheduler of the scenes teacher."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(vocabulary(), model_max_length=TOKENIZER_MAX_LENGTH)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = clip_text_encoder(len(tokenizer), TEXT_HIDDEN, None, TOKENIZER_MAX_LENGTH, eos)
    unet = UNet2DConditionModel(
        # cross-attention at 16 and 8 px: a shape is 6-10 px, below what the 8 px map resolves, and with the prompt at
        # 8 px only the second teacher drew shape, count and region near chance (docs/results/scenes-teacher.md); it
        # costs 2.3x the step time (2.05 against 0.89 s at batch 32, one thread)
        sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 48, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=16,
        # the prompt pooled into the time embedding, so every block sees it: with cross-attention alone the first
        # teacher learnt textures but ignored background, shape and count (docs/results/scenes-teacher.md)
        addition_embed_type="text", addition_embed_type_num_heads=4,
    )
    return tokenizer, text_encoder, unet, DDIMScheduler(**SD_SCHEDULER)


def pyramid_noise(shape, gen: torch.Generator, discount: float = 0.6, offset: float = 0.1) -> torch.Tensor:
    """White noise plus the same at 1/2, 1/4, ... 1/32 of the size (upsampled, weight ``discount`` per octave) and a
    per-channel offset, each sample scaled back to unit variance (kohya's multires noise and noise offset).

    SD's schedule keeps some signal at t = 999 (sqrt(alphabar) = 0.068), and a 32 x 32 image's coarse structure (its
    mean colour, which half holds the shapes) can then be read from the noisy input itself: the first teacher learnt
    to copy the background and layout from the initial noise and ignored them in the prompt. Training noise with
    strong, random coarse components makes the input's coarse structure useless, so the prompt has to give it."""
    import torch.nn.functional as F

    b, c, h, w = shape
    out = torch.randn(shape, generator=gen)
    level, weight = h // 2, discount
    while level >= 1:
        coarse = torch.randn((b, c, level, max(1, level * w // h)), generator=gen)
        out = out + weight * F.interpolate(coarse, size=(h, w), mode="bilinear" if level > 1 else "nearest")
        level, weight = level // 2, weight * discount
    out = out + offset * torch.randn((b, c, 1, 1), generator=gen)
    return out / out.std(dim=(1, 2, 3), keepdim=True)


def scene_batches(tokenizer):
    """``batches(gen, batch_size) -> (images, token ids)``: scenes drawn uniformly, one new image of each."""
    scenes = all_scenes()
    table = tokenizer([s.prompt() for s in scenes], padding="max_length", max_length=TOKENIZER_MAX_LENGTH,
                      truncation=True, return_tensors="pt").input_ids
    if (table[:, -1] != tokenizer.pad_token_id).any():
        raise ValueError(f"a prompt is longer than the tokenizer's {TOKENIZER_MAX_LENGTH} tokens")

    def batches(gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(scenes), (batch_size,), generator=gen)
        seeds = torch.randint(0, 2**31 - 1, (batch_size,), generator=gen)
        images = np.stack([draw(scenes[int(i)], int(s)) for i, s in zip(idx, seeds)])
        return torch.from_numpy(images), table[idx]

    return batches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the scenes teacher (CPU).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="save the EMA teacher to OUT.snapshot every this many steps (0: never), to look at it while "
                             "it trains")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
    modules = build_modules(args.seed)
    callback = None
    if args.snapshot_every:
        def callback(step, ema_unet, ema_text):
            if step % args.snapshot_every == 0:
                save_teacher(modules[0], ema_text, ema_unet, modules[3], {"step": step, "world": "rapm.scenes"},
                             f"{args.out}.snapshot")
    *trained, record = train_teacher(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                     modules=modules, batches=scene_batches(modules[0]), callback=callback,
                                     noise=pyramid_noise)
    record["world"] = "rapm.scenes"
    record["noise"] = "pyramid_noise (discount 0.6, offset 0.1)"
    save_teacher(*trained, record, args.out)
    print(f"trained in {record['train_seconds']} s; saved to {args.out}")


if __name__ == "__main__":
    main()
