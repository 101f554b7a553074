"""Train the built-in digits teacher: a small Stable-Diffusion-shaped pipeline in pixel space.

A diffusers ``UNet2DConditionModel`` (16x16, one channel, cross-attention on
the prompt) and a tiny ``CLIPTextModel`` are trained jointly on the digits
train split with the epsilon objective on SD's scaled_linear schedule
(``rapm.demo.clip.SD_SCHEDULER``), dropping the prompt to "" 10% of the time so
that classifier-free guidance works. There is no VAE: the "latents" are the
16x16 images. The result is saved as a ``StableDiffusionPipeline`` folder with
``vae`` [null, null], which ``rapm.teacher.load_teacher("digits")`` loads, and
diffusers too: ``StableDiffusionPipeline.from_pretrained(folder, vae=None)`` (diffusers
asks for a null VAE to be passed explicitly), sampling with ``output_type="latent"``.

    python -m rapm.demo.train_teacher --out rapm/demo/teacher --seed 0

The run is deterministic given the seed (float32, two threads): 1,000 steps at
batch 64; the seconds it took are in the saved teacher's record.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Two threads on a CPU shared with other work: OpenMP's default spin-waiting made each step
    # ten times slower there (measured: 14.5 s against 1.1 s). It must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from rapm.files import replace_dir
from rapm.demo.data import IMAGE_SIZE, load_split
from rapm.demo.prompts import PHRASINGS, phrase, vocabulary
from rapm.diffusion import alpha_sigma, schedule_from_config
from rapm.demo.clip import SD_SCHEDULER, build_clip_tokenizer, clip_text_encoder

TEACHER_DIR = Path(__file__).parent / "teacher"
TOKENIZER_MAX_LENGTH = 16
TEXT_HIDDEN = 64


def build_modules(seed: int = 0):
    """The untrained tokenizer, text encoder, UNet and scheduler of the digits teacher."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(vocabulary(), model_max_length=TOKENIZER_MAX_LENGTH)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = clip_text_encoder(len(tokenizer), TEXT_HIDDEN, None, TOKENIZER_MAX_LENGTH, eos)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=16,
    )
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    return tokenizer, text_encoder, unet, scheduler


def _prompt_table(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every phrasing of every digit [10, P, L], and of the empty prompt [L]."""
    def ids(texts):
        return tokenizer(texts, padding="max_length", max_length=TOKENIZER_MAX_LENGTH, truncation=True,
                         return_tensors="pt").input_ids
    table = torch.stack([ids([phrase(d, p) for p in PHRASINGS]) for d in range(10)])
    return table, ids([""])[0]


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def digits_batches(tokenizer):
    """``batches(gen, batch_size) -> (images, prompt token ids)`` over the digits train split, every phrasing."""
    train = load_split("train")
    table, _ = _prompt_table(tokenizer)

    def batches(gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(train), (batch_size,), generator=gen)
        x0, digits = train.images[idx], train.digits[idx]
        phrasing = torch.randint(0, len(PHRASINGS), (batch_size,), generator=gen)
        return x0, table[digits, phrasing]

    return batches


def empty_prompt_ids(tokenizer, max_length: int = TOKENIZER_MAX_LENGTH) -> torch.Tensor:
    return tokenizer([""], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids[0]


def train_teacher(
    seed: int = 0, steps: int = 1000, batch_size: int = 64, lr: float = 2e-3, prompt_dropout: float = 0.1,
    ema_decay: float = 0.998, min_snr_gamma: float | None = None, log_every: int = 100,
    callback: Callable[[int, torch.nn.Module, torch.nn.Module], None] | None = None,
    modules: tuple | None = None, batches: Callable | None = None, noise: Callable | None = None,
):
    """Train the teacher; return (tokenizer, text_encoder, unet, scheduler, record) with the EMA weights.

    ``callback(step, ema_unet, ema_text_encoder)``, if given, runs at every log line (e.g. to save snapshots).
    ``modules`` (tokenizer, text encoder, UNet, scheduler; default the digits teacher's ``build_modules``) and
    ``batches(gen, batch_size) -> (images, token ids)`` (default ``digits_batches``) make it another pixel-space
    teacher's trainer (rapm.scenes.train_teacher). ``noise(shape, gen)``: the training noise (default white
    Gaussian), which the epsilon objective also predicts.
    """
    tokenizer, text_encoder, unet, scheduler = modules if modules is not None else build_modules(seed)
    schedule = schedule_from_config(dict(scheduler.config))
    batches = batches if batches is not None else digits_batches(tokenizer)
    empty = empty_prompt_ids(tokenizer, text_encoder.config.max_position_embeddings)
    gen = torch.Generator().manual_seed(seed)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / max(warmup, 1)) * (0.55 + 0.45 * math.cos(math.pi * min(i / steps, 1.0))))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    unet.train()
    text_encoder.train()

    start, running, log = time.time(), 0.0, []
    for step in range(steps):
        x0, ids = batches(gen, batch_size)
        drop = torch.rand(batch_size, generator=gen) < prompt_dropout
        ids = torch.where(drop[:, None], empty[None], ids)
        t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=gen)
        eps_true = torch.randn(x0.shape, generator=gen) if noise is None else noise(x0.shape, gen)
        a, s = alpha_sigma(schedule, t, x0)
        z = (a * x0 + s * eps_true).float()

        eps = unet(z, t, encoder_hidden_states=text_encoder(ids)[0], return_dict=False)[0]
        loss = (eps - eps_true).square().mean(dim=(1, 2, 3))  # DDPM's simple epsilon objective
        if min_snr_gamma is not None:  # Min-SNR-gamma weighting (Hang et al. 2023): w = min(SNR, gamma) / SNR
            snr = (a / s).reshape(-1) ** 2
            loss = loss * (snr.clamp(max=min_snr_gamma) / snr).float()
        loss = loss.mean()

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # EMA warmup: early weights fade out quickly
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)

        running += float(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            log.append(dict(step=step + 1, loss=round(running / n, 5), seconds=round(time.time() - start, 1)))
            print(f"step {step + 1}/{steps}  loss {running / n:.4f}  {time.time() - start:.0f} s", flush=True)
            running = 0.0
            if callback is not None:
                callback(step + 1, ema_unet, ema_text)

    record = dict(
        seed=seed, steps=steps, batch_size=batch_size, lr=lr, prompt_dropout=prompt_dropout, ema_decay=ema_decay,
        min_snr_gamma=min_snr_gamma, train_seconds=round(time.time() - start, 1), threads=torch.get_num_threads(),
        unet_parameters=sum(p.numel() for p in unet.parameters()),
        text_encoder_parameters=sum(p.numel() for p in text_encoder.parameters()), log=log,
    )
    return tokenizer, ema_text.eval(), ema_unet.eval(), scheduler, record


def save_teacher(tokenizer, text_encoder, unet, scheduler, record: dict, out: str | Path) -> Path:
    """Save a StableDiffusionPipeline folder (no VAE) to ``out`` atomically: a temp folder, then a rename."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp)
    index = json.loads((tmp / "model_index.json").read_text())
    if index.get("vae") != [None, None]:
        raise RuntimeError(f"{tmp / 'model_index.json'}: expected vae [null, null] for a pixel-space teacher, got {index.get('vae')}")
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    replace_dir(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the built-in digits teacher (CPU, about ten minutes).")
    parser.add_argument("--out", default=str(TEACHER_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    *modules, record = train_teacher(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    save_teacher(*modules, record, args.out)
    print(f"trained in {record['train_seconds']} s; saved to {args.out}")


if __name__ == "__main__":
    main()
