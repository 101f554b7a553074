"""GPU: seconds per RAPM iteration and peak GPU memory on SD 1.5, SDXL, SD3-medium and FLUX.1-dev architectures.

The UNets are built from SD 1.5's and SDXL base's public configs (benchmarks/harness.py) with random weights, in
bf16 (trainable LoRA and heads in float32 under bf16 autocast, as ``rapm train --set mixed_precision=bf16``),
batch 1, N = 4, the sd15 / sdxl presets (LoRA rank 64, discriminator heads as PCM). Nothing is downloaded and no
store is needed: the iteration is benchmarks/harness.py ``Loop``, the trainer's loop body (the method's losses,
per-slot backward, clipping, AdamW, EMA) on random stored-trajectory tensors. Each model runs with and without
gradient checkpointing.

Aims on one H100-class card (issue 16): SDXL at most 16 GB peak, SD 1.5 at most 0.3 s per iteration; the iteration
runs no teacher pass (the Δ-steps come from the store, format 2).

SD3-medium and FLUX.1-dev (``sd3``, ``flux``): their transformers from benchmarks/flow_configs.py's public configs, built on
the meta device and materialized with ``to_empty`` and a random init in bf16; LoRA on the flow targets
(the families' `lora_targets`), the sd3 / flux presets (rank 32; FLUX's preset checkpoints), discriminator heads on the joint
blocks (rapm/families/flow.py), the flow ``Schedule`` (the public FlowMatchEulerDiscreteScheduler configs; FLUX's
dynamic shift at its 4096 image tokens), 16x128x128 latents (1024 px; FLUX packs 2x2 inside its family call), text
conditioning of the pipelines' shapes: SD3 [1, 333, 4096] + pooled [1, 2048] with an uncond for CFG 7; FLUX T5
[1, 512, 4096] + pooled [1, 768] + the guidance embedding (3.5, no uncond). No aim is set for them; an iteration that
runs out of GPU memory is recorded as such (FLUX without checkpointing may). benchmarks/results/flow_memory.md has
the memory estimate on paper.

    .venv/bin/python benchmarks/gpu.py                               # a CUDA machine: all four, full size
    .venv/bin/python benchmarks/gpu.py --tiny --device cpu           # the same code path at a tiny size (tests)

Writes benchmarks/results/gpu.{json,md} (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the test fixtures in tests/tiny.py
from harness import SD15_UNET, SDXL_UNET, Loop, machine, median, reduced, write_results  # noqa: E402

AIMS = {"sd15": ("seconds per iteration", 0.3), "sdxl": ("peak GiB", 16.0)}  # issue 16, on an H100-class card
GiB = 2**30
FLOW_MODELS = ("sd3", "flux")
# The flow transformers at a tiny width for --tiny (the code path): 8x8 latents (16 tokens), 16 text tokens.
TINY_FLOW = {
    "sd3": dict(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=8),
    "flux": dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
}
TEXT_TOKENS = {"sd3": 333, "flux": 512}  # SD3: 77 CLIP + 256 T5 tokens; FLUX: FluxPipeline's 512 T5 tokens
TINY_TEXT_TOKENS, TINY_LATENT = 16, 8


def unet_config(model: str, tiny: bool) -> dict:
    config = SD15_UNET if model == "sd15" else SDXL_UNET
    if not tiny:
        return dict(config)
    small = reduced(config, width=20, sample_size=8, transformer_layers=1)
    if model == "sdxl":  # SDXL's attention_head_dim counts heads of 64 channels; keep whole heads at 1/20 width
        small["attention_head_dim"] = [max(1, c // 64) for c in small["block_out_channels"]]
    return small


def add_adapters_and_heads(net, student, discriminator, config, checkpointing: bool, device):
    """The student and discriminator adapters on the one denoiser (trainable weights in float32 under bf16
    autocast, as rapm train keeps them), gradient checkpointing if asked, and the discriminator's heads."""
    from rapm.discriminator import Discriminator, DiscriminatorSpec
    from rapm.roles import DISCRIMINATOR, STUDENT, add_roles, enable_gradient_checkpointing, lora_parameters

    add_roles(net, student, discriminator)
    for p in list(lora_parameters(net, STUDENT).values()) + list(lora_parameters(net, DISCRIMINATOR).values()):
        p.data = p.data.float()
    if checkpointing:
        enable_gradient_checkpointing(net)
    return Discriminator(net, DiscriminatorSpec(config.disc_levels, config.disc_heads_per_level,
                                                config.disc_kernel_size)).to(device)


def bench_config(model: str, device: torch.device, checkpointing: bool, rank: int | None):
    """The model's preset as rapm-paper in bf16 at batch 1 (the iteration with both discriminators; the default rapm
    recipe trains none, its iteration is the student phase here), and its weight dtype on ``device``."""
    from rapm import config as cfg
    from rapm.models import weight_dtype

    overrides = dict(cfg.PRESETS[model], method="rapm-paper", mixed_precision="bf16", gradient_checkpointing=checkpointing,
                     batch_size=1)
    if rank is not None:
        overrides.update(lora_rank=rank, disc_lora_rank=rank)
    config = cfg.apply_overrides(cfg.TrainConfig(), overrides, f"preset {model}")
    return config, weight_dtype(config, device)


def build(model: str, tiny: bool, device: torch.device, checkpointing: bool, rank: int | None):
    """The one UNet with its adapters and the discriminator heads, as rapm.train.build_models makes them."""
    if model in FLOW_MODELS:
        return build_flow(model, tiny, device, checkpointing, rank)
    from diffusers import UNet2DConditionModel

    from rapm.conditioning import Conditioning
    from rapm.diffusion import coarse_timesteps, schedule_from_config
    from rapm.models import student_spec
    from rapm.roles import LoraSpec
    from rapm.demo.clip import SD_SCHEDULER

    config, dtype = bench_config(model, device, checkpointing, rank)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(model, tiny))
    unet.to(dtype).requires_grad_(False)
    disc = add_adapters_and_heads(unet, student_spec(config),
                                  LoraSpec(config.disc_lora_rank, config.disc_lora_alpha, list(config.lora_targets)),
                                  config, checkpointing, device)
    c = unet.config
    n = 4
    # Positions stay float32 under mixed precision (only the UNet's inputs take its dtype); the Δ-steps come from the
    # store (format 2), so the iteration runs no teacher pass, as rapm train's does.
    latents = torch.randn(1, n + 1, c.in_channels, c.sample_size, c.sample_size, device=device)
    delta_latents = torch.randn(1, n, c.in_channels, c.sample_size, c.sample_size, device=device)
    embeds = torch.randn(1, 77, c.cross_attention_dim, device=device, dtype=dtype)
    if c.addition_embed_type == "text_time":
        pooled = torch.randn(1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, device=device,
                             dtype=dtype)
        size = 8 * c.sample_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype)
        cond = Conditioning(embeds, pooled, time_ids)
        uncond = cond.map(torch.zeros_like)
        uncond.time_ids = time_ids
        guidance = 5.0
    else:
        cond, uncond, guidance = Conditioning(embeds), Conditioning(torch.randn_like(embeds)), 7.5
    from rapm.store import TrajectoryBatch

    schedule = schedule_from_config(SD_SCHEDULER, source="benchmarks/gpu.py")
    loop = Loop(unet, disc, schedule, config, coarse_timesteps(1000, n), guidance, delta=10)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    return loop, TrajectoryBatch(latents, cond, uncond, delta_latents, 10), autocast, config, sum(p.numel() for p in unet.parameters())


def materialize(model: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The family's transformer from its public config (benchmarks/flow_configs.py), built on the meta device, then given
    storage on ``device`` in ``dtype`` and a random init (each layer's own ``reset_parameters``; SD3's sincos position
    table recomputed)."""
    from flow_configs import meta_transformer

    net = meta_transformer(model, **(TINY_FLOW[model] if tiny else {}))
    net = torch.nn.Module.to(net, dtype).to_empty(device=device)  # (Module's own .to: no fp32-modules warning; none)
    with torch.no_grad():
        for module in net.modules():
            if hasattr(module, "reset_parameters") and any(True for _ in module.parameters(recurse=False)):
                module.reset_parameters()
        pe = getattr(net, "pos_embed", None)
        if getattr(pe, "pos_embed", None) is not None:
            from diffusers.models.embeddings import get_2d_sincos_pos_embed

            table = get_2d_sincos_pos_embed(pe.pos_embed.shape[-1], pe.pos_embed_max_size, base_size=pe.base_size,
                                            interpolation_scale=pe.interpolation_scale, output_type="pt")
            pe.pos_embed.copy_(table.float().unsqueeze(0))
    return net.requires_grad_(False)


def build_flow(model: str, tiny: bool, device: torch.device, checkpointing: bool, rank: int | None):
    """SD3-medium's or FLUX.1-dev's transformer with its adapters and discriminator heads, the sd3 / flux presets."""
    from dataclasses import replace

    from rapm.conditioning import Conditioning
    from rapm.diffusion import flow_schedule_from_config
    from rapm.families import family_named
    from rapm.models import student_spec
    from rapm.roles import LoraSpec
    from rapm.store import TrajectoryBatch
    from tests.tiny_flow import FLUX_SCHEDULER, SD3_SCHEDULER

    config, dtype = bench_config(model, device, checkpointing, rank)
    family = family_named(model)
    torch.manual_seed(0)
    net = materialize(model, tiny, device, dtype)
    disc = add_adapters_and_heads(net, student_spec(config),
                                  LoraSpec(config.disc_lora_rank, config.disc_lora_alpha, list(config.lora_targets)),
                                  config, checkpointing, device)
    c = net.config
    channels, h, w = family.latent_shape(dict(c))
    if tiny:
        h = w = TINY_LATENT
    n = 4
    latents = torch.randn(1, n + 1, channels, h, w, device=device)
    delta_latents = torch.randn(1, n, channels, h, w, device=device)
    tokens = TINY_TEXT_TOKENS if tiny else TEXT_TOKENS[model]
    embeds = torch.randn(1, tokens, c.joint_attention_dim, device=device, dtype=dtype)
    pooled = torch.randn(1, c.pooled_projection_dim, device=device, dtype=dtype)
    cond = Conditioning(embeds, pooled)
    schedule = flow_schedule_from_config(SD3_SCHEDULER if model == "sd3" else FLUX_SCHEDULER, source="benchmarks/gpu.py")
    if schedule.flow.use_dynamic_shifting:  # FLUX: μ at the image's token count, as rapm.teacher sets it
        schedule = replace(schedule, mu=schedule.flow.mu(family.image_seq_len((channels, h, w))))
    guidance = family.default_guidance
    if family.cfg:
        uncond = Conditioning(torch.randn_like(embeds), torch.randn_like(pooled))
    else:  # FLUX.1-dev: the guidance value is an input (its embedding), no uncond pass
        cond, uncond = family.with_guidance(cond, guidance), None
    loop = Loop(net, disc, schedule, config, schedule.coarse(n), guidance, delta=10)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    return (loop, TrajectoryBatch(latents, cond, uncond, delta_latents, 10), autocast, config,
            sum(p.numel() for name, p in net.named_parameters() if "lora_" not in name))


def measure(model: str, tiny: bool, device: torch.device, checkpointing: bool, warmup: int, iterations: int,
            rank: int | None) -> dict:
    cuda = device.type == "cuda"
    loop, batch, autocast, config, params = build(model, tiny, device, checkpointing, rank)
    for i in range(warmup):
        loop.iteration(batch, "discriminator" if i % 2 == 0 else "student", autocast=autocast)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = {"discriminator": [], "student": []}
    for i in range(2 * iterations):
        phase = "discriminator" if i % 2 == 0 else "student"
        start = time.perf_counter()
        loop.iteration(batch, phase, autocast=autocast)
        if cuda:
            torch.cuda.synchronize()
        seconds[phase].append(time.perf_counter() - start)
    d, s = median(seconds["discriminator"]), median(seconds["student"])
    row = {"model": model, "tiny": tiny, "gradient_checkpointing": checkpointing, "unet_parameters": params,
           "latent_shape": [batch.latents.shape[2], batch.latents.shape[3], batch.latents.shape[4]],
           "lora_rank": config.lora_rank, "dtype": str(next(loop.unet.parameters()).dtype).replace("torch.", ""),
           "seconds": {"discriminator": round(d, 4), "student": round(s, 4), "mean": round((d + s) / 2, 4)},
           "iterations_timed": {k: len(v) for k, v in seconds.items()}}
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
    if model in AIMS:
        what, limit = AIMS[model]
        value = row["seconds"]["mean"] if what.startswith("seconds") else row.get("peak_gib")
        row["aim"] = f"{what} <= {limit}"
        row["aim_met"] = (value <= limit) if (cuda and not tiny and value is not None) else None
    else:
        row["aim"], row["aim_met"] = "none set", None
    del loop, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def markdown(result: dict) -> str:
    lines = ["# GPU: RAPM iteration on SD 1.5, SDXL, SD3-medium and FLUX.1-dev architectures (random weights)", "",
             f"`{result['command']}` on {result['machine']['date']}, {result['machine']['device']}, torch "
             f"{result['machine']['torch']}. Batch 1, N = 4, medians.", "",
             "| model | denoiser parameters | latents | gradient checkpointing | D iteration s | student iteration s | mean s | "
             "peak GiB | aim | met |", "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']}{' (tiny)' if r['tiny'] else ''} | | | "
                         f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['error']} | | | | | |")
            continue
        met = {True: "yes", False: "no", None: "n/a"}[r["aim_met"]]
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "n/a (CPU)"
        lines.append(f"| {r['model']}{' (tiny)' if r['tiny'] else ''} | {r['unet_parameters'] / 1e6:,.1f}M | "
                     f"{'x'.join(map(str, r['latent_shape']))} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
                     f"{r['seconds']['discriminator']:.3f} | {r['seconds']['student']:.3f} | {r['seconds']['mean']:.3f} | "
                     f"{peak} | {r['aim']} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl,sd3,flux")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="1/20 width, 8x8 latents: the code path, not the numbers")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations of each phase")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the preset's)")
    parser.add_argument("--checkpointing", default="no,yes", help="gradient checkpointing settings to run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --tiny --device cpu to check the code path")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for model in args.models.split(","):
        for ckpt in args.checkpointing.split(","):
            try:
                rows.append(measure(model, args.tiny, device, ckpt == "yes", args.warmup, args.iterations, args.rank))
            except torch.cuda.OutOfMemoryError:  # recorded, and the next setting still runs
                rows.append({"model": model, "tiny": args.tiny, "gradient_checkpointing": ckpt == "yes",
                             "error": "CUDA out of memory", "aim_met": None})
            if "error" in rows[-1]:  # out of the handler: its traceback no longer holds the models
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    command = "benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"benchmark": "gpu", "command": command.strip(), "rows": rows, "machine": machine(device=name)}
    write_results(args.out, "gpu", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
