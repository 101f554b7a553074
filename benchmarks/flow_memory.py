"""Flow memory: the peak memory of one RAPM student update at batch 1 for FLUX.1-dev and SD3-medium, bf16 +
gradient checkpointing, estimated from exact counts plus measured activations (issue 19, item 6).

The estimate is a sum of three parts:

* weights: the parameter count of the public transformer config (``benchmarks/flow_configs.py``, built on the meta
  device) x 2 bytes (bf16); exact. The store holds the text embeddings, so no text encoder (T5 is 4.7B
  parameters) and no VAE is in memory while training.
* LoRA + optimizer: ``lora_parameter_count`` of the family's ``lora_targets`` at rank 32 (the default;
  ranks 1 and 16 as options) x 16 bytes: float32 parameters (4), gradients (4) and Adam's two moments (8); exact.
* activations: measured. A transformer with the REAL width of the family (FLUX 24 heads x 128 = 3072, SD3-medium
  24 x 64 = 1536) but only a few blocks is built in float32 on the CPU, gets the student LoRA (``add_roles``) and
  rapm's role-aware gradient checkpointing, and runs one student forward + backward (the graph one slot of a
  RAPM iteration holds: slots are detached and backed up one at a time). Each measurement is a fresh subprocess;
  the number is the peak RSS increase over the built model: /proc/self/clear_refs resets VmHWM just before the
  pass, and peak = VmHWM after the backward minus VmRSS before it (the float32 LoRA gradients it allocates are
  subtracted: they are counted in the LoRA column). Two block counts and two token counts give a linear fit

      A(n, T) = c + w T + b n T          (with checkpointing; n blocks, T = image + text tokens)

  b: what each checkpointed block keeps per token (its boundary activations), w: the working set of one block's
  recompute + backward (and the embedders) per token. Without checkpointing A = T (u + k_joint J + k_single S),
  measured at one token count. The fit is checked for linearity across the block and token counts (the json
  and md give each point against the fit), then halved for bf16 and extrapolated to the real depth
  (FLUX 19 joint + 38 single blocks, SD3-medium 24) and the real token counts (512 px and 1024 px).

* attention: measured separately (``scaled_dot_product_attention`` forward + backward alone, fresh subprocess):
  on this CPU PyTorch picks its flash kernel (memory linear in T), as the GPU's flash / memory-efficient kernels
  do; the math path (forced) materializes the T x T matrix. The extrapolation uses the kernel the measurements
  ran (linear); the md gives what the math path would add.

The no-grad passes of an iteration (the teacher's Δ-step when the store lacks it, the frozen student per slot)
run before the slot's student pass and keep nothing: they add only a transient working set smaller than the
recompute + backward one, so they do not raise the peak.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flow_memory.py            # ~6 min, peak ~5.5 GB
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flow_memory.py --quick --out DIR   # tiny width (the test):
        # FLUX only, all points in one subprocess (the code path and the arithmetic, not an estimate)

Writes benchmarks/results/flow_memory.{json,md} (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

GiB = 2**30
MiB = 2**20
ROOT = Path(__file__).resolve().parent.parent
BF16 = 2
LORA_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 parameter, fp32 gradient, Adam exp_avg + exp_avg_sq
CARDS_GIB = (24, 80)
# Kept free on the card for the CUDA context, cuBLAS workspaces and allocator fragmentation (an assumption).
CARD_RESERVE_GIB = 1.5
RANKS = (1, 16, 32)
DEFAULT_RANK = 32
RESOLUTIONS = (512, 1024)
TEXT_TOKENS = {"flux": 512, "sd3": 77 + 256}  # FLUX.1-dev: T5 max_sequence_length 512; SD3: CLIP 77 + T5 256
REAL_DEPTH = {"flux": (19, 38), "sd3": (24, 0)}
# The discriminator (estimate, not measured): heads on every joint block (default_feature_blocks, every=1).
FEATURE_BLOCKS = {"flux": 19, "sd3": 24}
SLOTS = 4  # N of the default few-step student; the discriminator update batches N x (1 + kinds) rows
GAN_KINDS = 2


def image_tokens(px: int) -> int:
    """Transformer image tokens of a px x px image, both families: 8x VAE, then 2x2 patches (FLUX packs, SD3 patches)."""
    return (px // 16) ** 2


# ---------------------------------------------------------------------------------------------------------------
# Exact parts.


def weight_bytes(parameters: int, bytes_per_parameter: int = BF16) -> int:
    return parameters * bytes_per_parameter


def lora_bytes(lora_parameters: int) -> int:
    """The trained adapter's memory: fp32 parameters + fp32 gradients + Adam's two fp32 moments."""
    return lora_parameters * LORA_BYTES_PER_PARAM


def exact_counts(family: str) -> dict:
    """Parameters, Linear parameters (what a quantized base stores in 8 / 4 bits) and LoRA sizes of the public config."""
    import torch

    from flow_configs import lora_parameter_count, meta_transformer, parameter_count

    from rapm.families import family_named

    model = meta_transformer(family)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    targets = list(family_named(family).lora_targets)
    return {"parameters": parameter_count(model), "linear_weight_parameters": linear,
            "lora_parameters": {str(r): lora_parameter_count(model, targets, r) for r in RANKS}}


# ---------------------------------------------------------------------------------------------------------------
# The linear model of activations, its fit and its extrapolation.


def activation_bytes(coef: dict, blocks: int, tokens: int) -> float:
    """Checkpointed activations A = c + w T + b n T (bytes) for n blocks and T tokens."""
    return coef["c"] + coef["w"] * tokens + coef["b"] * blocks * tokens


def no_checkpoint_bytes(coef: dict, joint: int, single: int, tokens: int) -> float:
    """Activations without checkpointing, A = T (u + k_joint J + k_single S) (bytes)."""
    return tokens * (coef["u"] + coef["k_joint"] * joint + coef["k_single"] * single)


def _lstsq(rows, values):
    import numpy as np

    solution, *_ = np.linalg.lstsq(np.array(rows, dtype=float), np.array(values, dtype=float), rcond=None)
    return [float(v) for v in solution]


def fit_checkpointed(points: list[dict]) -> dict:
    """Least-squares c, w, b from points {blocks, tokens, bytes}; each point's relative residual is kept."""
    c, w, b = _lstsq([[1.0, p["tokens"], p["blocks"] * p["tokens"]] for p in points], [p["bytes"] for p in points])
    coef = {"c": c, "w": w, "b": b}
    coef["residuals"] = [round(activation_bytes(coef, p["blocks"], p["tokens"]) / p["bytes"] - 1, 4) for p in points]
    return coef


def fit_no_checkpoint(points: list[dict]) -> dict:
    """u, k_joint, k_single from points {joint, single, tokens, bytes} (least squares; k_single 0 with no single block)."""
    u, kj, ks = _lstsq([[p["tokens"], p["joint"] * p["tokens"], p["single"] * p["tokens"]] for p in points],
                       [p["bytes"] for p in points])
    coef = {"u": u, "k_joint": kj, "k_single": ks}
    coef["residuals"] = [round(no_checkpoint_bytes(coef, p["joint"], p["single"], p["tokens"]) / p["bytes"] - 1, 4)
                         for p in points]
    return coef


def conservative(coef: dict, width: int) -> dict:
    """The coefficients the extrapolation uses: b at least one fp32 hidden state of the width per token per block.

    Checkpointing keeps every block's input (image + text hidden states: T x width) until its backward, so b cannot
    be below 4 x width bytes. A few-block measurement can show less: the peak comes at the recompute of the joint
    blocks, when the single blocks' inputs are already freed, and a 1-2 block difference is near the noise.
    """
    return {**coef, "b_fit": coef["b"], "b_boundary": 4.0 * width, "b": max(coef["b"], 4.0 * width)}


def slopes(points: list[dict]) -> list[dict]:
    """b measured at each token count alone: (A(n2) - A(n1)) / ((n2 - n1) T): equal across T when A is linear."""
    out = []
    for t in sorted({p["tokens"] for p in points}):
        at = sorted((p for p in points if p["tokens"] == t), key=lambda p: p["blocks"])
        lo, hi = at[0], at[-1]
        out.append({"tokens": t, "b_bytes_per_block_token": round((hi["bytes"] - lo["bytes"]) / ((hi["blocks"] - lo["blocks"]) * t), 1),
                    "rest_per_token": round((lo["bytes"] - lo["blocks"] * (hi["bytes"] - lo["bytes"]) / (hi["blocks"] - lo["blocks"])) / t, 1)})
    return out


def estimate(family: str, counts: dict, ckpt: dict, nockpt: dict | None, px: int, rank: int = DEFAULT_RANK) -> dict:
    """One row of the table (GiB): bf16 weights, LoRA + Adam, activations (bf16 = fp32 measured / 2), totals, fits."""
    joint, single = REAL_DEPTH[family]
    tokens = image_tokens(px) + TEXT_TOKENS[family]
    half = BF16 / 4
    weights = weight_bytes(counts["parameters"]) / GiB
    lora = lora_bytes(counts["lora_parameters"][str(rank)]) / GiB
    act = activation_bytes(ckpt, joint + single, tokens) * half / GiB
    act_plain = None if nockpt is None else no_checkpoint_bytes(nockpt, joint, single, tokens) * half / GiB
    # Discriminator (estimate): a second adapter of the same rank; in the student update its backbone pass keeps
    # the boundaries of the blocks up to the last head alive beside the student's graph; the discriminator update
    # runs N (1 + kinds) rows through them with gradients (heads' own weights and activations not included).
    feat = FEATURE_BLOCKS[family]
    disc_student = (ckpt["b"] * feat * tokens) * half / GiB
    rows = SLOTS * (1 + GAN_KINDS)
    disc_update = rows * (ckpt["b"] * feat + ckpt["w"]) * tokens * half / GiB
    total = weights + lora + act
    row = {"family": family, "px": px, "tokens": tokens, "rank": rank, "weights_gib": weights, "lora_adam_gib": lora,
           "activations_gib": act, "activations_no_checkpointing_gib": act_plain, "total_gib": total,
           "total_no_checkpointing_gib": None if act_plain is None else weights + lora + act_plain,
           "with_discriminator_student_update_gib": total + lora + disc_student,
           "discriminator_update_gib": weights + 2 * lora + disc_update}
    for card in CARDS_GIB:
        row[f"fits_{card}"] = total + CARD_RESERVE_GIB <= card
    return row


def quantized_options(counts: dict, act_gib: float, lora_gib: float) -> list[dict]:
    """FLUX's base in 8 or 4 bits (Linear weights; the rest stays bf16): the totals that decide the 24 GB card."""
    other = counts["parameters"] - counts["linear_weight_parameters"]
    out = []
    # bitsandbytes NF4 with double quantization: ~4.127 bits / weight (QLoRA paper); LLM.int8: 1 byte + a fp32
    # scale per output row (negligible); fp8 (torchao on an H100): 1 byte.
    for name, bits in (("bf16 (as measured)", 16.0), ("8-bit base (bitsandbytes LLM.int8 / fp8)", 8.0),
                       ("NF4 base + double quant (bitsandbytes, QLoRA)", 4.127)):
        weights = (counts["linear_weight_parameters"] * bits / 8 + other * BF16) / GiB
        total = weights + lora_gib + act_gib
        out.append({"base": name, "weights_gib": weights, "total_gib": total,
                    **{f"fits_{c}": total + CARD_RESERVE_GIB <= c for c in CARDS_GIB}})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measurements (each in a fresh subprocess).


def _status() -> dict:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(k + r":\s+(\d+) kB", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)


def _warm_up() -> None:
    """One tiny autograd pass with attention first, so one-time costs (the autograd engine, kernels) are not measured."""
    import torch

    x = torch.randn(1, 2, 8, 16, requires_grad=True)
    torch.nn.functional.scaled_dot_product_attention(x, x, x).sum().backward()
    torch.nn.functional.linear(x, torch.randn(16, 16)).sum().backward()


def _build(family: str, config: dict):
    """The transformer in float32 on the CPU, Linear weights filled by normal_ (diffusers' init skipped: faster)."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from flow_configs import FLUX_DEV_TRANSFORMER, SD3_MEDIUM_TRANSFORMER

    base, cls = (FLUX_DEV_TRANSFORMER, FluxTransformer2DModel) if family == "flux" else (
        SD3_MEDIUM_TRANSFORMER, SD3Transformer2DModel)
    reset = torch.nn.Linear.reset_parameters
    torch.nn.Linear.reset_parameters = lambda self: None
    try:
        model = cls(**{**base, **config})
    finally:
        torch.nn.Linear.reset_parameters = reset
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.02)
                if m.bias is not None:
                    m.bias.zero_()
    return model.float()


def child_activations(args: dict) -> dict:
    import torch

    from rapm.conditioning import Conditioning
    from rapm.families import family_named
    from rapm.roles import (STUDENT, LoraSpec, add_roles, enable_gradient_checkpointing, lora_parameters, set_trainable,
                            student_role)

    torch.manual_seed(0)
    family, config = args["family"], args["config"]
    model = _build(family, config)
    teacher_family = family_named(family)
    add_roles(model, LoraSpec(args["rank"], float(args["rank"]), list(teacher_family.lora_targets)))
    set_trainable(model, STUDENT)  # as the trainer does for the student update
    if args["checkpointing"]:
        enable_gradient_checkpointing(model)
    model.train()
    side = args["latent"]
    cfg = model.config
    latents = torch.randn(1, 16, side, side)
    timestep = torch.full((1,), 700.0)
    length = args["text_tokens"]
    cond = Conditioning(torch.randn(1, length, cfg.joint_attention_dim), torch.randn(1, cfg.pooled_projection_dim))
    if family == "flux":
        cond = teacher_family.with_guidance(cond, 3.5)
    lora = lora_parameters(model, STUDENT)
    _warm_up()
    gc.collect()
    before = _status()["VmRSS"]
    _reset_peak()
    start = time.perf_counter()
    with student_role(model):
        v = teacher_family.denoise(model, latents, timestep, cond)
        z = latents - 0.25 * v  # the student's Euler step of one slot
        loss = (z - latents.detach()).pow(2).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status()["VmHWM"]
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in lora.values() if p.grad is not None)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return {"peak_increase_bytes": peak - before, "lora_grad_bytes": grad_bytes,
            "activation_bytes": peak - before - grad_bytes, "rss_before_bytes": before, "seconds": round(seconds, 2),
            "base_parameters": base, "lora_parameters": sum(p.numel() for p in lora.values()),
            "image_tokens": (side // 2) ** 2, "gradient_checkpointing": bool(model.is_gradient_checkpointing)}


def child_attention(args: dict) -> dict:
    """scaled_dot_product_attention forward + backward alone: PyTorch's default CPU kernel or the math path."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, args["heads"], args["tokens"], args["head_dim"], requires_grad=True) for _ in range(3))
    choice = int(torch._fused_sdp_choice(q, k, v))
    _warm_up()
    gc.collect()
    before = _status()["VmRSS"]
    _reset_peak()
    backends = [SDPBackend.MATH] if args["backend"] == "math" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.pow(2).mean().backward()
    peak = _status()["VmHWM"]
    inputs = 3 * q.numel() * 4  # the three input gradients
    return {"peak_increase_bytes": peak - before, "activation_bytes": peak - before - inputs,
            "default_backend": {0: "math", 1: "flash", 2: "efficient"}.get(choice, str(choice))}


# glibc's malloc raises its mmap threshold dynamically (up to 32 MiB) after the first large free; tensors below it
# then live in the heap, whose freed holes stay resident, and RSS grows with fragmentation rather than with live
# tensors (seen here: +156 MiB per FLUX block instead of a block's boundary). A fixed threshold of 256 KiB makes
# every tensor above it its own mapping, returned to the OS when freed, so the peak RSS follows the live bytes.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024)}


def run_child(kind: str, args: dict) -> dict:
    from harness import run_child_script

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **MALLOC_ENV)
    return run_child_script(__file__, kind, args, env, f"flow memory child {kind} {args}")


# ---------------------------------------------------------------------------------------------------------------
# The plan: which models are measured.


def plan(quick: bool) -> dict:
    """Per family: width overrides, the (joint, single) block counts and latent sides of the measurements."""
    if quick:  # tiny width: the code path and the arithmetic, in seconds
        flux = dict(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6), joint_attention_dim=32,
                    pooled_projection_dim=16)
        return {"flux": dict(width=flux, ckpt_blocks=[(1, 1), (2, 2)], latents=[8, 16], text_tokens=16,
                             nockpt_blocks=[], heads=2, head_dim=16)}
    return {
        # FLUX at its real width (3072): 1 + 1 and 2 + 2 blocks; 256 px and 512 px images (latents 32 / 64:
        # 256 / 1024 image tokens) + 512 text tokens. Without checkpointing: 1+1, 2+1, 2+2 at 256 px.
        "flux": dict(width={}, ckpt_blocks=[(1, 1), (2, 2)], latents=[32, 64], text_tokens=TEXT_TOKENS["flux"],
                     nockpt_blocks=[(1, 1), (2, 1), (2, 2)], heads=24, head_dim=128),
        # SD3-medium at its real width (1536): 2 and 3 joint blocks (the last is context_pre_only in both, so the
        # difference is one full block), the same images + 77 + 256 text tokens.
        "sd3": dict(width={}, ckpt_blocks=[(2, 0), (3, 0)], latents=[32, 64], text_tokens=TEXT_TOKENS["sd3"],
                    nockpt_blocks=[(2, 0), (3, 0)], heads=24, head_dim=64),
    }


def _config(family: str, width: dict, joint: int, single: int) -> dict:
    if family == "flux":
        return {**width, "num_layers": joint, "num_single_layers": single}
    return {**width, "num_layers": joint}


def run_children(jobs: list[tuple[str, dict]], fresh: bool) -> list[dict]:
    """Each job in its own fresh subprocess, or (``fresh`` False: --quick, tiny sizes) all in one, in order."""
    if fresh:
        return [run_child(kind, args) for kind, args in jobs]
    return run_child("batch", {"jobs": [[kind, args] for kind, args in jobs]})


def child_batch(args: dict) -> list[dict]:
    fns = {"activations": child_activations, "attention": child_attention}
    return [fns[kind](a) for kind, a in args["jobs"]]


def measure(quick: bool, log=print) -> dict:
    families = {}
    for family, p in plan(quick).items():
        runs = {"checkpointed": [], "no_checkpointing": [], "attention": []}
        jobs, tags = [], []
        for checkpointing, blocks, sides in ((True, p["ckpt_blocks"], p["latents"]),
                                             (False, p["nockpt_blocks"], p["latents"][:1])):
            for joint, single in blocks:
                for side in sides:
                    jobs.append(("activations", dict(
                        family=family, config=_config(family, p["width"], joint, single), rank=DEFAULT_RANK, latent=side,
                        text_tokens=p["text_tokens"], checkpointing=checkpointing)))
                    tags.append(("checkpointed" if checkpointing else "no_checkpointing", joint, single))
        for side in p["latents"][:1] if quick else p["latents"]:
            tokens = (side // 2) ** 2 + p["text_tokens"]
            for backend in ("default",) if quick else ("default", "math"):
                jobs.append(("attention", dict(heads=p["heads"], head_dim=p["head_dim"], tokens=tokens, backend=backend)))
                tags.append(("attention", tokens, backend))
        for (kind, args), tag, r in zip(jobs, tags, run_children(jobs, fresh=not quick)):
            if tag[0] == "attention":
                r.update(tokens=tag[1], backend=tag[2], heads=p["heads"], t_by_t_fp32_bytes=p["heads"] * tag[1] ** 2 * 4)
                runs["attention"].append(r)
                log(f"{family} attention {tag[2]} ({r['default_backend']} by default), {tag[1]} tokens: "
                    f"{r['activation_bytes'] / MiB:.1f} MiB")
                continue
            joint, single = tag[1], tag[2]
            r.update(joint=joint, single=single, blocks=joint + single, tokens=r["image_tokens"] + p["text_tokens"],
                     bytes=r["activation_bytes"])
            runs[tag[0]].append(r)
            log(f"{family} {'ckpt' if tag[0] == 'checkpointed' else 'plain'} {joint}+{single} blocks, {r['tokens']} "
                f"tokens: {r['activation_bytes'] / MiB:.1f} MiB in {r['seconds']} s")
        fam = {"plan": {k: v for k, v in p.items()}, "runs": runs,
               "fit_checkpointed": fit_checkpointed(runs["checkpointed"]), "slopes": slopes(runs["checkpointed"])}
        fam["extrapolation"] = conservative(fam["fit_checkpointed"], p["heads"] * p["head_dim"])
        if runs["no_checkpointing"]:
            fam["fit_no_checkpointing"] = fit_no_checkpoint(runs["no_checkpointing"])
        families[family] = fam
    return families


def refit(families: dict) -> dict:
    """The fits again from stored runs (``--from-json``): the measurements are kept, the arithmetic redone."""
    for fam in families.values():
        p = fam["plan"]
        fam["fit_checkpointed"] = fit_checkpointed(fam["runs"]["checkpointed"])
        fam["slopes"] = slopes(fam["runs"]["checkpointed"])
        fam["extrapolation"] = conservative(fam["fit_checkpointed"], p["heads"] * p["head_dim"])
        if fam["runs"]["no_checkpointing"]:
            fam["fit_no_checkpointing"] = fit_no_checkpoint(fam["runs"]["no_checkpointing"])
    return families


def math_attention_extra_gib(attention: list[dict], tokens: int) -> float | None:
    """bf16 GiB the math SDPA path would add over the default kernel at ``tokens``: measured at the largest T, x (T/T0)^2."""
    at = {(r["backend"], r["tokens"]) for r in attention}
    both = [t for (b, t) in at if b == "math" and ("default", t) in at]
    if not both:
        return None
    t0 = max(both)
    get = {(r["backend"], r["tokens"]): r["activation_bytes"] for r in attention}
    return (get[("math", t0)] - get[("default", t0)]) * (tokens / t0) ** 2 * (BF16 / 4) / GiB


def summarize(families: dict, quick: bool) -> dict:
    rows, options, lora_table = [], {}, []
    for family in ("flux", "sd3"):
        counts = exact_counts(family)
        for rank in RANKS:
            lora_table.append({"family": family, "rank": rank, "lora_parameters": counts["lora_parameters"][str(rank)],
                               "lora_adam_gib": lora_bytes(counts["lora_parameters"][str(rank)]) / GiB})
        if family not in families:
            continue
        fam = families[family]
        fam["counts"] = counts
        for px in RESOLUTIONS:
            row = estimate(family, counts, fam["extrapolation"], fam.get("fit_no_checkpointing"), px)
            row["math_attention_extra_gib"] = math_attention_extra_gib(fam["runs"]["attention"], row["tokens"])
            rows.append(row)
        if family == "flux":
            for row in rows:
                if row["family"] == "flux":
                    options[str(row["px"])] = quantized_options(counts, row["activations_gib"], row["lora_adam_gib"])
    return {"rows": rows, "lora": lora_table, "flux_quantized": options}


# ---------------------------------------------------------------------------------------------------------------
# Markdown.


def _g(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def _yes(x):
    return "yes" if x else "**no**"


def markdown(result: dict) -> str:
    s, fams = result["summary"], result["families"]
    lines = [
        "# Flow memory: one RAPM iteration at batch 1, FLUX.1-dev and SD3-medium, bf16, gradient checkpointing",
        "",
        f"`{result['command']}` on {result['date']}, torch {result['torch']}, diffusers {result['diffusers']}, "
        f"{result['seconds']:.0f} s. "
        + ("**--quick: activations measured at a tiny width; the activation columns below are NOT an estimate of the "
           "real models (the code path and the arithmetic only).** " if result["quick"] else "")
        + "**Estimates**: weights and LoRA + Adam are exact counts; activations are "
        "measured on reduced-depth, real-width float32 models on the CPU and extrapolated (method below). "
        f"GiB = 2^30 bytes; a card \"fits\" when the total + {CARD_RESERVE_GIB} GiB (CUDA context, cuBLAS "
        "workspace, allocator fragmentation: an assumption) is at most 24 / 80 GiB.",
        "",
        "## The estimate (student update: the slot's student pass with gradients; LoRA rank 32)",
        "",
        "| family | resolution | tokens (image + text) | weights GiB (bf16) | LoRA + Adam GiB | activations GiB (checkpointing) "
        "| activations GiB (no checkpointing, est.) | total GiB | total, no checkpointing | fits 24 GB? | fits 80 GB? |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    names = {"flux": "FLUX.1-dev", "sd3": "SD3-medium"}
    for r in s["rows"]:
        lines.append(
            f"| {names[r['family']]} | {r['px']} px | {r['tokens']} | {_g(r['weights_gib'])} | {_g(r['lora_adam_gib'], 3)} "
            f"| {_g(r['activations_gib'])} | {_g(r['activations_no_checkpointing_gib'])} | {_g(r['total_gib'])} "
            f"| {_g(r['total_no_checkpointing_gib'])} | {_yes(r['fits_24'])} | {_yes(r['fits_80'])} |")
    lines += ["", "If the math attention path ran instead of a flash / memory-efficient kernel (e.g. an attention mask "
              "that rules them out), one block's recompute would add (bf16, scaled as T^2 from the largest measured "
              "SDPA forward + backward): " + "; ".join(
                  f"{names[r['family']]} {r['px']} px +{_g(r['math_attention_extra_gib'])} GiB" for r in s["rows"]
                  if r.get("math_attention_extra_gib") is not None) + ". Not in the totals: the CPU kernel the "
              "model measurements ran (flash) is linear in T, as SDPA's flash / memory-efficient GPU kernels are.", ""]
    lines += ["With the optional discriminator (estimate; a second LoRA adapter of the same rank; heads on every "
              "joint block, their own weights and activations not included): the student update keeps the "
              "discriminator backbone's checkpointed boundaries up to the last head beside the student's graph; the "
              f"discriminator update runs N (1 + kinds) = {SLOTS * (1 + GAN_KINDS)} rows (N = {SLOTS}, relative + "
              "absolute) through those blocks with gradients, batched as rapm does it (decision 2).", "",
              "| family | resolution | student update with discriminator GiB | discriminator update GiB |",
              "| --- | --- | ---: | ---: |"]
    for r in s["rows"]:
        lines.append(f"| {names[r['family']]} | {r['px']} px | {_g(r['with_discriminator_student_update_gib'])} "
                     f"| {_g(r['discriminator_update_gib'])} |")
    lines += ["", "LoRA + Adam by rank (float32 parameters, gradients, two Adam moments: 16 bytes / parameter; the "
              "targets of `Family.lora_targets`):", "", "| family | rank | LoRA parameters | LoRA + Adam GiB |",
              "| --- | ---: | ---: | ---: |"]
    for r in s["lora"]:
        lines.append(f"| {names[r['family']]} | {r['rank']} | {r['lora_parameters']:,} | {_g(r['lora_adam_gib'], 3)} |")
    if s["flux_quantized"]:
        flux512 = next(r for r in s["rows"] if r["family"] == "flux" and r["px"] == 512)
        rank1_flux = next(r["lora_adam_gib"] for r in s["lora"] if r["family"] == "flux" and r["rank"] == 1)
        # 8-bit Adam: each moment 1 byte instead of 4, 6 bytes a parameter fewer
        adam8_saving = next(r["lora_parameters"] for r in s["lora"]
                            if r["family"] == "flux" and r["rank"] == DEFAULT_RANK) * 6 / GiB
        lines += ["", "## What would make FLUX.1-dev fit a 24 GB card (estimates; rapm does not quantize the base today)",
                  "", "The bf16 weights alone are "
                  f"{_g(s['rows'][0]['weights_gib'])} GiB: no choice of LoRA rank, optimizer or checkpointing brings "
                  "the total under 24 GiB with a bf16 base. Storing the Linear weights of the frozen base in 8 or 4 "
                  "bits does (the LoRA adapters stay float32 on top; peft supports LoRA on bitsandbytes' Linear8bitLt "
                  "/ Linear4bit layers; the non-Linear parameters stay bf16):", "",
                  "| resolution | base | weights GiB | total GiB | fits 24 GB? | fits 80 GB? |",
                  "| --- | --- | ---: | ---: | --- | --- |"]
        for px, opts in s["flux_quantized"].items():
            for o in opts:
                lines.append(f"| {px} px | {o['base']} | {_g(o['weights_gib'])} | {_g(o['total_gib'])} | "
                             f"{_yes(o['fits_24'])} | {_yes(o['fits_80'])} |")
        lines += ["", "Public facts for comparison (found with search; Hugging Face blog \"(LoRA) Fine-Tuning FLUX.1-dev "
                  "on Consumer Hardware\", 2025-06-19, https://huggingface.co/blog/flux-qlora, built on diffusers' "
                  "`examples/research_projects/flux_lora_quantization/train_dreambooth_lora_flux_miniature.py`): QLoRA "
                  "(NF4 base via bitsandbytes, 8-bit AdamW, gradient checkpointing, cached latents) peaks at ~9 GB on "
                  "an RTX 4090, against ~26 GB for a bf16 LoRA; FP8 training with torchao on an H100 at 36.57 GB. "
                  f"Our 512 px bf16 total, {_g(flux512['total_gib'], 1)} GiB = {_g(flux512['total_gib'] * GiB / 1e9, 1)} GB, "
                  "is of the blog's bf16 figure's size (its LoRA is rank 4, "
                  "4.67M parameters, against rank 32 here); our NF4 total at 512 px, "
                  f"{_g(s['flux_quantized'].get('512', [{}, {}, {'total_gib': None}])[2]['total_gib'])} GiB, is near "
                  "its QLoRA peak. Those are plain LoRA fine-tunes (one forward + backward per step); a RAPM iteration's peak is also "
                  "one pass with gradients (slots are backed up one at a time), so the two are comparable in kind. "
                  "Other levers are too small for FLUX on 24 GB: a lower rank shrinks the LoRA column (rank 1: "
                  f"{_g(rank1_flux, 3)} GiB; the 512 px bf16 total then {_g(flux512['total_gib'] - flux512['lora_adam_gib'] + rank1_flux, 1)} "
                  "GiB, under 24 only with nothing left for the CUDA context), 8-bit Adam (`use_8bit_adam`) cuts "
                  f"the moments from 8 to 2 bytes per LoRA parameter ({_g(adam8_saving)} GiB at rank {DEFAULT_RANK}); "
                  "the text encoders and VAE "
                  "are never loaded in training (embeddings come from the store)."]
    lines += ["", "## Method", "",
              "* **Weights**: `parameter_count(meta_transformer(family))` (the public config, benchmarks/flow_configs.py) x 2 "
              "bytes. Exact. No text encoder or VAE (the store holds the embeddings).",
              "* **LoRA + optimizer**: `lora_parameter_count` with the family's `lora_targets` x 16 bytes. "
              "Exact (AdamW's two moments; 8-bit Adam would make the moments 2 bytes).",
              "* **Activations, measured**: for each point a fresh subprocess builds the transformer at the family's "
              "real width with few blocks in float32 on the CPU, adds the student LoRA (`add_roles`, rank 32), turns "
              "on rapm's `enable_gradient_checkpointing` (or not), and runs one student pass (`flux_velocity` / "
              "`sd3_velocity` under `student_role`, an Euler step, a squared loss) forward and backward. The "
              "number is the peak RSS increase of that pass: `/proc/self/clear_refs` (5) resets VmHWM just before "
              "it; activation bytes = VmHWM after the backward - VmRSS before, minus the float32 LoRA gradients "
              "(counted in the LoRA column). It also counts allocator slack and small allocations (see Allocator), "
              "which errs on the high side.",
              "* **Fit**: A(n, T) = c + w T + b n T by least squares over 2 block counts x 2 token counts "
              "(residuals below); without checkpointing A = T (u + k_joint J + k_single S) at one token count. "
              "Halved for bf16 (every saved tensor is a bf16 tensor under bf16 weights and inputs; fp32 upcasts "
              "inside norms and RoPE are transient) and extrapolated to FLUX 19 + 38 and SD3-medium 24 blocks at "
              "the tokens of 512 px and 1024 px ((px / 16)^2 image tokens + 512 text tokens for FLUX, + 77 + 256 for "
              "SD3).",
              "* **No-grad passes** (teacher Δ-step when the store lacks it, frozen student per slot) run before "
              "the slot's pass with gradients and keep nothing: their transient working set is smaller than one "
              "block's recompute + backward, so they do not add to the peak.",
              "* **Allocator**: the children run with `MALLOC_MMAP_THRESHOLD_=262144` (and a 1 MiB trim threshold): "
              "every tensor above 256 KiB is its own mapping, returned to the OS when freed, so the peak RSS follows "
              "the live bytes. With glibc's default dynamic threshold the first run of this benchmark measured 513 "
              "MiB for FLUX 1 + 1 blocks at 768 tokens and +156 MiB per extra block (freed heap holes stay "
              "resident); with the fixed threshold 249 MiB and about +1 MiB per block.",
              "* **Attention**: measured alone (fresh subprocess, SDPA forward + backward at the family's heads x "
              "head dim). PyTorch's CPU default kernel is reported below; the extrapolation uses what the model "
              "measurements ran, i.e. that kernel. On a GPU, SDPA's flash / memory-efficient kernels are linear in "
              "tokens as well, so the linear extrapolation is the one that applies there; the math path's T x T "
              "matrix is given for comparison.",
              ""]
    for family, fam in fams.items():
        f = fam["fit_checkpointed"]
        lines += [f"### Measured: {names[family]} (real width, reduced depth, float32)", "",
                  "| checkpointing | joint + single blocks | tokens | activations MiB | fit MiB | pass s |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in fam["runs"]["checkpointed"]:
            fit = activation_bytes(f, r["blocks"], r["tokens"])
            lines.append(f"| yes | {r['joint']} + {r['single']} | {r['tokens']} | {r['bytes'] / MiB:.1f} | {fit / MiB:.1f} "
                         f"| {r['seconds']} |")
        g = fam.get("fit_no_checkpointing")
        for r in fam["runs"]["no_checkpointing"]:
            fit = no_checkpoint_bytes(g, r["joint"], r["single"], r["tokens"])
            lines.append(f"| no | {r['joint']} + {r['single']} | {r['tokens']} | {r['bytes'] / MiB:.1f} | {fit / MiB:.1f} "
                         f"| {r['seconds']} |")
        e = fam["extrapolation"]
        lines += ["", f"Checkpointed fit (float32): b = {f['b']:.0f} bytes per block per token, w = {f['w']:.0f} "
                  f"bytes per token (one block's recompute + backward, embedders, output), c = {f['c'] / MiB:.1f} MiB; "
                  f"relative residuals {f['residuals']}. Linearity: b from each token count alone: "
                  + ", ".join(f"{x['b_bytes_per_block_token']:.0f} at {x['tokens']} tokens" for x in fam["slopes"])
                  + "; the rest per token: " + ", ".join(f"{x['rest_per_token']:.0f} at {x['tokens']}"
                                                         for x in fam["slopes"]) + ". "
                  f"Checkpointing keeps each block's input, one hidden state of the width per token: "
                  f"{e['b_boundary']:.0f} bytes (fp32). The extrapolation uses b = max(fit, boundary) = {e['b']:.0f} "
                  "(conservative: the few-block difference can come out lower because the peak is at the joint "
                  "blocks' recompute, after the single blocks' inputs are freed, and it is near the noise)."]
        if g:
            lines += ["", f"No-checkpointing fit (float32): k_joint = {g['k_joint']:.0f}, k_single = {g['k_single']:.0f}, "
                      f"u = {g['u']:.0f} bytes per token; residuals {g['residuals']}."]
        lines += ["", "| attention kernel | tokens | SDPA fwd + bwd MiB | heads x T x T fp32 MiB |",
                  "| --- | ---: | ---: | ---: |"]
        for r in fam["runs"]["attention"]:
            name = f"{r['default_backend']} (default)" if r["backend"] == "default" else "math (forced)"
            lines.append(f"| {name} | {r['tokens']} | {r['activation_bytes'] / MiB:.1f} | {r['t_by_t_fp32_bytes'] / MiB:.1f} |")
        lines.append("")
    flux_lora = [r["lora_parameters"] for r in result["summary"]["lora"]
                 if r["family"] == "flux" and r["rank"] == DEFAULT_RANK]
    autocast_copies = f"{_g(flux_lora[0] * BF16 / GiB)} GiB for FLUX.1-dev at rank {DEFAULT_RANK}" if flux_lora else "-"
    lines += ["## Caveats", "",
              "* Estimates, not GPU measurements: CUDA's caching allocator, cuBLAS workspaces and kernel choice "
              "differ from the CPU's; the reserve of "
              f"{CARD_RESERVE_GIB} GiB is a guess. bf16 activations are taken as half the float32 ones.",
              "* The math attention path is not in the totals (its cost is given under the first table).",
              "* Mixed precision in rapm is bf16 weights + float32 adapters under `torch.autocast`: peft casts each "
              "adapted layer's input to the adapter's float32 and autocast casts it back to bf16 for the matmul, "
              "so each LoRA target saves its own bf16 copy of its input (the fp32 measurement shares the base "
              "layer's). In a FLUX joint block that is about 55 KB per token (to_q/k/v, to_out, ff in, ff out: "
              "27,648 values x 2 bytes, per stream) inside one block's recompute: +0.08 GiB at 512 px, +0.24 GiB "
              "at 1024 px, not in the totals. Autocast's cached bf16 copies of the LoRA weights add half the LoRA "
              f"parameter bytes ({autocast_copies}). The no-checkpointing coefficients come from one token count.",
              "* The discriminator rows are extrapolated from the same coefficients, not measured, and leave out the "
              "heads. The LoRA rank of the discriminator adapter is taken equal to the student's.",
              "* The fit is over 2-4 blocks; the 57 (FLUX) / 24 (SD3) block extrapolation assumes each block keeps "
              "the same per-token boundary (true by construction of checkpointing: each block's inputs).",
              ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny width, FLUX only: the code path and the arithmetic")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for flow_memory.{json,md}")
    parser.add_argument("--from-json", help="recompute the fits, the table and the md from a json this script wrote")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARGS"), help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.child:
        import torch

        torch.set_num_threads(1)
        fn = {"activations": child_activations, "attention": child_attention, "batch": child_batch}[a.child[0]]
        print(json.dumps(fn(json.loads(a.child[1]))))
        return 0
    import diffusers
    import torch

    start = time.perf_counter()
    if a.from_json:
        old = json.loads(Path(a.from_json).read_text())
        families = refit(old["families"])
        a.quick, start = old["quick"], start - old["seconds"]
    else:
        families = measure(a.quick)
    result = {"command": "benchmarks/flow_memory.py" + (" --quick" if a.quick else ""), "quick": a.quick,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "families": families}
    if a.from_json:
        result["date"] = old["date"]  # of the measurements; the arithmetic is redone
    result["summary"] = summarize(families, a.quick)
    result["seconds"] = time.perf_counter() - start
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flow_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "flow_memory.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
