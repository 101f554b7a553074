"""Real size: every verb at the published shapes of SD 1.5, SDXL and SD3-medium, through the CLI, on this CPU.

Each teacher is built from its public configs with random weights (SD 1.5: the 860M UNet, CLIP ViT-L/14's text
tower, the 84M KL-f8 VAE; SDXL base: the 2.6B UNet, CLIP-L and OpenCLIP bigG/14's text towers, the same VAE), a
tokenizer built from a small vocabulary (no download), and ``save_pretrained`` to ``--work``. The user's commands
then run on it, each in a fresh process (its peak RSS from ``os.wait4``):

* ``trajectories``: two prompts, N = 4, M = 2 (DDIM), guidance as the family's default;
* ``pass``: one guided teacher pass (cond + uncond, batch 2) of the UNet, timed (median of 3 after a warm-up);
* ``train``: ``rapm`` and ``rapm-paper`` for 2 iterations each, with and without ``gradient_checkpointing``;
* ``export`` (both formats; every targeted module of the real UNet present in both files), ``sample`` (the student,
  4 steps), ``evaluate`` (teacher DDIM-4 and the student against a 4-step reference on the two prompts).

The weights stay at full size. The resolution is lower than the published one where a CPU pass would take too long
(``--latent``, default 32, i.e. 256 px); the training cells also run at a second latent size (``--latent-2``) so that
the activation memory can be fitted against the latent area and read at the published resolution (the table says
which numbers are fitted). Everything is float32 on the CPU (rapm's CPU dtype).

SD3-medium (``--models sd3``): the MMDiT of benchmarks/flow_configs.py, CLIP-L and bigG/14, the 16-channel VAE, files in
bf16 (loaded in float32); T5-XXL stood in by one of its layers (``build_sd3`` says why); ``rapm`` only, both sizes,
with and without checkpointing, a ``no-t5`` cell, export / sample / evaluate (no teacher curve).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/real_size.py --work /work/scratch/real [--models sd15,sdxl,sd3]

The machine's memory may be shared: a cell waits for free memory first, and one that the kernel's OOM killer ends
while it held less than the machine less ``CROWDED_MARGIN_GIB`` (another process held the rest) runs again.

Resumable: each cell's result is saved in ``--work/cells.json`` when it finishes and a finished cell is not rerun.
Writes benchmarks/results/real_size.{json,md} from every finished cell (``--report-only`` rewrites them alone); a
model that ``--work`` has not run keeps the cells the results file already holds (``merged_cells``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/tiny.py's tokenizer; rapm itself

GiB = 2**30
MiB = 2**20
PROMPTS = ["a photo of a red car", "a photo of a blue dog"]
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car"]
CARD_RESERVE_GIB = 1.5  # CUDA context, cuBLAS workspace, allocator fragmentation (an assumption, as flow_memory's)

# The text towers' published configs (openai/clip-vit-large-patch14; laion CLIP-ViT-bigG-14 as SDXL ships it).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
# stable-diffusion-v1-5 vae/config.json (SDXL's VAE has the same layers; its scaling factor is 0.13025)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32)
# The UNet configs are benchmarks/harness.py's (SD15_UNET, SDXL_UNET); this process never imports torch: a child's
# peak RSS (os.wait4) starts from its parent's resident set at the fork, so the parent stays small.
MODELS = {
    "sd15": dict(name="SD 1.5", unet="SD15_UNET", published_latent=64, latent_2=64),
    "sdxl": dict(name="SDXL base", unet="SDXL_UNET", published_latent=128, latent_2=48),
    # SD3-medium: the MMDiT of benchmarks/flow_configs.py, CLIP-L and bigG/14 with projections, the 16-channel VAE; T5-XXL
    # stands in as one of its 24 layers (build_teacher says why); rank 32, the sd3 preset's. Only `rapm` trains.
    # trajectories_delta: rapm trajectories' default Δ here is min(1000 // (N M), the shortest slot) = the shortest slot
    # (shift 3's grid 1000, 900, 750, 500, 0 at N = 4), which rapm train refuses (Δ must be shorter than every slot)
    "sd3": dict(name="SD3-medium", unet="SD3_MEDIUM_TRANSFORMER", published_latent=128, latent_2=48, lora_rank=32,
                trajectories_delta=50),
}
# google/t5-v1_1-xxl, SD3-medium's text_encoder_3/config.json (4.76B parameters: 19 GB float32, 9.5 GB bf16)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6, tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length, which rapm's SD3 family uses
FLOW_MODELS = ("sd3",)


def unet_config(model: str) -> dict:
    if model in FLOW_MODELS:
        import benchmarks.flow_configs as flow_configs

        return getattr(flow_configs, MODELS[model]["unet"])
    import benchmarks.harness as harness

    return getattr(harness, MODELS[model]["unet"])


def denoiser_folder(model: str) -> str:
    return "transformer" if model in FLOW_MODELS else "unet"
TRAIN_METHODS = ("rapm", "rapm-paper")


# ---------------------------------------------------------------------------------------------- the teachers
def build_teacher(model: str, folder: Path) -> dict:
    """Save the full-size random pipeline of ``model`` to ``folder``; return its parameter counts."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from rapm.demo.clip import SD_SCHEDULER, build_clip_tokenizer

    torch.manual_seed(0)
    if model == "sd3":
        return build_sd3(folder)
    spec = MODELS[model]
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=77)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = dict(bos_token_id=0, eos_token_id=eos, pad_token_id=eos)
    unet = UNet2DConditionModel(**unet_config(model))
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids))
    parts = {"unet": unet, "text_encoder": text_encoder}
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    if model == "sd15":
        vae = AutoencoderKL(**VAE, sample_size=512)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        vae = AutoencoderKL(**VAE, sample_size=1024, scaling_factor=0.13025)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG, **ids))
        parts["text_encoder_2"] = text_encoder_2
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=build_clip_tokenizer(WORDS, model_max_length=77),
                                         unet=unet, scheduler=scheduler)
    parts["vae"] = vae
    pipe.save_pretrained(folder)
    return {"parameters": {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()},
            "torch": torch.__version__}


def build_sd3(folder: Path) -> dict:
    """SD3-medium's pipeline at its published configs, random weights, saved in bfloat16 and loaded by rapm in
    float32 (its dtype on a CPU). Why bf16 files: this machine's disk had 16 GB free, and the float32 folder is
    12.5 GB beside the SD 1.5 / SDXL work. Why not T5-XXL: rapm loads every text encoder in float32 on a CPU, so its
    4.76B parameters would take 19 GB of the 24 GiB beside the 8.1 GB transformer (and 9.5 GB of disk in bf16); rapm
    refuses a folder without it (the ``no-t5`` cell shows it), so ``text_encoder_3`` is T5-XXL's config with one of
    its 24 layers (d_model 4096: the joint sequence the transformer sees is the published one, 77 CLIP + 256 T5
    tokens of 4096) and ``tokenizer_3`` a CLIP tokenizer of the same 8 words with T5's 256 tokens."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from benchmarks.flow_configs import SD3_MEDIUM_TRANSFORMER
    from rapm.demo.clip import build_clip_tokenizer

    bf16 = torch.bfloat16
    tokenizers = [build_clip_tokenizer(WORDS, model_max_length=n) for n in (77, 77, T5_TOKENS)]
    eos = tokenizers[0].convert_tokens_to_ids("<|endoftext|>")
    ids = dict(bos_token_id=0, eos_token_id=eos, pad_token_id=eos)
    parts = {"transformer": SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER).to(bf16)}
    parts["text_encoder"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **ids)).to(bf16)
    parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG, **ids)).to(bf16)
    parts["text_encoder_3"] = T5EncoderModel(T5Config(**{**T5_XXL, "num_layers": 1, "vocab_size": len(tokenizers[2])})).to(bf16)
    # stabilityai/stable-diffusion-3-medium-diffusers vae/config.json
    parts["vae"] = AutoencoderKL(**{**VAE, "latent_channels": 16}, sample_size=1024, scaling_factor=1.5305,
                                 shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).to(bf16)
    pipe = StableDiffusion3Pipeline(transformer=parts["transformer"], vae=parts["vae"],
                                    scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                                    text_encoder=parts["text_encoder"], tokenizer=tokenizers[0],
                                    text_encoder_2=parts["text_encoder_2"], tokenizer_2=tokenizers[1],
                                    text_encoder_3=parts["text_encoder_3"], tokenizer_3=tokenizers[2])
    pipe.save_pretrained(folder)
    with torch.device("meta"):
        t5_xxl = sum(p.numel() for p in T5EncoderModel(T5Config(**T5_XXL)).parameters())
    return {"parameters": {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()},
            "t5_xxl_parameters": t5_xxl, "stored_dtype": "bfloat16", "torch": torch.__version__}


def at_latent(folder: Path, latent: int, out: Path) -> Path:
    """The teacher of ``folder`` with its UNet's ``sample_size`` set to ``latent`` (the resolution the pipelines and
    rapm default to): the same weight files, hard-linked."""
    if (out / "model_index.json").is_file():
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(folder, staging, copy_function=os.link)
    config = next(staging / sub / "config.json" for sub in ("unet", "transformer") if (staging / sub).is_dir())
    data = json.loads(config.read_text())
    data["sample_size"] = latent
    config.unlink()  # a hard link: write a new file, not through it
    config.write_text(json.dumps(data, indent=2))
    staging.rename(out)
    return out


# ---------------------------------------------------------------------------------------------- one cell
# A child's address space is capped (a cell too big fails with a MemoryError, recorded as "does not fit"). The cap
# is on address space, which counts the memory-mapped weight files as well as the resident set: 21 GiB refused
# SDXL's teacher pass at 10 GiB resident. Under the default, a cell that fills the machine's memory is the largest
# process when the kernel's OOM killer chooses (its SIGKILL is recorded the same way).
MEMORY_CAP_GIB = float(os.environ.get("RAPM_REAL_SIZE_CAP_GIB", 64))
OUT_OF_MEMORY = ("MemoryError", "can't allocate memory", "not enough memory", "std::bad_alloc")


class DoesNotFit(Exception):
    pass


class Crowded(Exception):
    """The kernel's OOM killer ended the cell while the machine's memory was shared: the cell itself held less than
    the machine less ``CROWDED_MARGIN_GIB`` (another process held the rest), so the cell is run again, not recorded
    as not fitting."""


CROWDED_MARGIN_GIB = 3.0
CELL_MEMORY_GIB = float(os.environ.get("RAPM_REAL_SIZE_CELL_GIB", 14))  # free memory a cell waits for (about an SD3 verb's peak)
CELL_TRIES = 3
LOAD_BOUND_MARGIN_GIB = 0.25  # a training cell this close to the pass cells' peak is taken as the loading's peak


def _meminfo_gib(field: str) -> float:
    for line in open("/proc/meminfo"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return 0.0


def _oom_kills() -> set[int]:
    """The pids the kernel's OOM killer has killed since boot (``dmesg``; empty where it cannot be read)."""
    import re

    try:
        text = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {int(m) for m in re.findall(r"Killed process (\d+) ", text)}


def wait_for_memory(need_gib: float, limit_s: float = 900) -> float:
    """Wait (at most ``limit_s``) until the machine has ``need_gib`` available (MemAvailable): other processes share
    this machine. Returns the seconds waited."""
    need = min(need_gib, _meminfo_gib("MemTotal") - 1)
    start = time.perf_counter()
    while _meminfo_gib("MemAvailable") < need and time.perf_counter() - start < limit_s:
        time.sleep(15)
    return round(time.perf_counter() - start, 1)


def _cap_memory() -> None:
    import resource

    cap = int(MEMORY_CAP_GIB * GiB)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def run_measured(argv: list[str], log: Path, env: dict | None = None, may_fail: bool = False) -> dict:
    """Run ``argv`` in a fresh process; its wall time and peak RSS (``os.wait4``); its output to ``log``. ``may_fail``:
    a failure that is not memory is returned (``ran`` False, the output's last lines) instead of raised."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_cap_memory)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    peak_gib = usage.ru_maxrss / 2**20
    if proc.returncode == -9 and proc.pid in _oom_kills() and peak_gib < _meminfo_gib("MemTotal") - CROWDED_MARGIN_GIB:
        raise Crowded(json.dumps({"seconds": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss * 1024 / MiB, 1),
                                  "at": time.strftime("%H:%M:%S")}))
    if proc.returncode != 0 and (proc.returncode == -9 or any(m in text for m in OUT_OF_MEMORY)):
        raise DoesNotFit(json.dumps({"fits": False, "memory_cap_gib": MEMORY_CAP_GIB, "seconds": round(wall, 2),
                                     "peak_rss_mib": round(usage.ru_maxrss * 1024 / MiB, 1)}))
    if proc.returncode != 0 and may_fail:
        return {"ran": False, "returncode": proc.returncode, "seconds": round(wall, 2),
                "peak_rss_mib": round(usage.ru_maxrss * 1024 / MiB, 1),
                "error": [line for line in text.strip().splitlines() if line.strip()][-3:]}
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}); its output: {log}\n{log.read_text()[-3000:]}")
    return {"seconds": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss * 1024 / MiB, 1)}


def rapm(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "rapm"), *args]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def teacher_pass(args: dict) -> dict:
    """Child: one guided teacher pass (cond + uncond) of the UNet at its latent size, timed."""
    import statistics

    import torch
    from diffusers import UNet2DConditionModel

    if (Path(args["teacher"]) / "transformer").is_dir():
        return transformer_pass(args)
    unet = UNet2DConditionModel.from_pretrained(args["teacher"], subfolder="unet").eval()
    cfg = unet.config
    size = cfg.sample_size
    x = torch.randn(2, 4, size, size)
    context = torch.randn(2, 77, cfg.cross_attention_dim)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280), "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * 2, dtype=torch.float32)}}
    times = []
    with torch.no_grad():
        for i in range(4):
            tick = time.perf_counter()
            unet(x, torch.tensor([500, 500]), context, **extra)
            if i:
                times.append(time.perf_counter() - tick)
    return {"seconds_per_guided_pass": round(statistics.median(times), 3), "latent": size}


def transformer_pass(args: dict) -> dict:
    """Child: one guided pass (cond + uncond, batch 2) of SD3's transformer in float32 on the published joint sequence
    (77 CLIP + 256 T5 tokens of 4096, the pooled 2048), timed as ``teacher_pass``."""
    import statistics

    import torch
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(args["teacher"], subfolder="transformer", torch_dtype=torch.float32).eval()
    cfg = model.config
    size = cfg.sample_size
    x = torch.randn(2, cfg.in_channels, size, size)
    context = torch.randn(2, 77 + T5_TOKENS, cfg.joint_attention_dim)
    pooled = torch.randn(2, cfg.pooled_projection_dim)
    times = []
    with torch.no_grad():
        for i in range(4):
            tick = time.perf_counter()
            model(hidden_states=x, timestep=torch.tensor([500.0, 500.0]), encoder_hidden_states=context,
                  pooled_projections=pooled)
            if i:
                times.append(time.perf_counter() - tick)
    return {"seconds_per_guided_pass": round(statistics.median(times), 3), "latent": size,
            "tokens": (size // 2) ** 2 + 77 + T5_TOKENS}


def target_modules(model: str, targets: list[str]) -> list[str]:
    """The real UNet's modules that the LoRA targets match (peft's rule: the name, or a dotted suffix of it)."""
    import torch
    from diffusers import UNet2DConditionModel

    if model in FLOW_MODELS:
        from benchmarks.flow_configs import meta_transformer

        unet = meta_transformer(model)
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_config(model))
    return sorted(n for n, m in unet.named_modules() if any(n == t or n.endswith("." + t) for t in targets)
                  and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def check_export(model: str, lora: Path, rapm_tree: str | None = None) -> dict:
    """Key counts of both exported files against the real architecture's targeted modules."""
    from safetensors import safe_open

    from rapm.export import ldm_block_map, ldm_module_name
    from rapm.roles import PCM_TARGET_MODULES

    if rapm_tree:  # the rapm that wrote the files (``--export-rapm``), before this file's own
        sys.path.insert(0, rapm_tree)
    if model in FLOW_MODELS:
        return check_flow_export(model, lora)
    modules = target_modules(model, PCM_TARGET_MODULES)
    with safe_open(str(lora / "pytorch_lora_weights.safetensors"), "pt") as f:
        diffusers_keys = list(f.keys())
    with safe_open(str(lora / "kohya_lora.safetensors"), "pt") as f:
        kohya_keys = list(f.keys())
    in_diffusers = {k.removeprefix("unet.").rpartition(".lora_")[0] for k in diffusers_keys}
    # A1111 / ComfyUI: lora_unet_ + the module's path with '_' (SD 1.x: diffusers' paths as sd-scripts writes
    # them; SDXL: the LDM UNet's paths, which both clients map to their UNet)
    if model == "sdxl":
        blocks = ldm_block_map(unet_config(model))
        expected_kohya = {"lora_unet_" + ldm_module_name(m, blocks).replace(".", "_") for m in modules}
    else:
        expected_kohya = {"lora_unet_" + m.replace(".", "_") for m in modules}
    in_kohya = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya_keys}
    return {
        "targeted_modules": len(modules), "diffusers_keys": len(diffusers_keys), "kohya_keys": len(kohya_keys),
        "diffusers_missing": len(set(modules) - in_diffusers), "diffusers_extra": len(in_diffusers - set(modules)),
        "kohya_missing": len(expected_kohya - in_kohya), "kohya_extra": len(in_kohya - expected_kohya),
        "diffusers_file_bytes": (lora / "pytorch_lora_weights.safetensors").stat().st_size,
        "kohya_file_bytes": (lora / "kohya_lora.safetensors").stat().st_size,
    }


def check_flow_export(model: str, lora: Path) -> dict:
    """SD3: the diffusers file's keys (``transformer.<module>.lora_A/B.weight``) against the real transformer's
    targeted modules; the kohya file, where the export wrote one (``rapm_lora.json``'s ``files``), its
    ``lora_unet_*.lora_down.weight`` keys against the native (MMDiT) modules that hold a targeted module
    (``rapm.export.native_layout`` where it exists); where none was written, that is reported."""
    import math

    from safetensors import safe_open

    from rapm.families.flow import SD3_TARGET_MODULES

    modules = set(target_modules(model, SD3_TARGET_MODULES))
    path = lora / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        parameters = sum(int(math.prod(f.get_slice(k).get_shape())) for k in keys)
        dtypes = sorted({f.get_slice(k).get_dtype() for k in keys})
    written = {k.removeprefix("transformer.").rpartition(".lora_")[0] for k in keys}
    out = {"targeted_modules": len(modules), "diffusers_keys": len(keys), "diffusers_missing": len(modules - written),
           "diffusers_extra": len(written - modules), "diffusers_file_bytes": path.stat().st_size,
           "lora_parameters": parameters, "file_dtypes": dtypes, "files": sorted(p.name for p in lora.iterdir())}
    facts_file = lora / "rapm_lora.json"
    facts = json.loads(facts_file.read_text()) if facts_file.is_file() else {}
    named = facts.get("files") if isinstance(facts.get("files"), dict) else {}
    kohya = lora / (named.get("kohya") or "kohya_lora.safetensors")
    out["kohya_written"] = kohya.is_file()
    out["facts_files"] = named
    if not kohya.is_file():
        return out
    with safe_open(str(kohya), "pt") as f:
        kohya_keys = list(f.keys())
    downs = {k.removesuffix(".lora_down.weight") for k in kohya_keys if k.endswith(".lora_down.weight")}
    out.update(kohya_file=kohya.name, kohya_file_bytes=kohya.stat().st_size, kohya_keys=len(kohya_keys),
               kohya_lora_down_keys=len(downs),
               kohya_unprefixed=sum(1 for k in downs if not k.startswith("lora_unet_")))
    try:
        from benchmarks.flow_configs import meta_transformer
        from rapm.export import native_layout
    except ImportError as e:  # an export without the native naming
        out["native_modules"] = None
        out["native_note"] = f"no native layout to check against ({e})"
        return out
    layout = native_layout(meta_transformer(model), "mmdit")
    native = {"lora_unet_" + name.replace(".", "_") for name, (parts, _) in layout.items()
              if any(p in modules for p in parts if p)}
    owned = {p for parts, _ in layout.values() for p in parts if p}
    out.update(native_modules=len(native), kohya_missing=len(native - downs), kohya_extra=len(downs - native),
               targeted_without_native_name=len(modules - owned))
    return out


def iteration_seconds(run: Path) -> list[dict]:
    """Every training iteration's phase and seconds from the run's logs.jsonl (the first one also warms up)."""
    rows = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines() if line.strip()]
    return [{"phase": r.get("phase"), "seconds": round(r["seconds"], 2)} for r in rows
            if "seconds" in r and r.get("phase") != "validation"]


def flux_weights(args: dict) -> dict:
    """Child: FLUX.1-dev's transformer at its published config, quantized by rapm's own ``quantize_base`` (``kind``):
    the stored bytes of the whole model. Its 19 joint and 38 single-stream blocks are each the same shapes, so one
    block of each kind is materialized (random bf16) and quantized, and its bytes count for every block of its kind;
    everything outside the blocks is materialized whole. No forward pass: the weights are what decides whether a
    24 GB card holds the base at all."""
    import torch

    from benchmarks.flow_configs import meta_transformer
    from rapm.quantize import quantize_base, weight_bytes

    torch.manual_seed(0)
    model = meta_transformer("flux")
    kind = args["kind"]
    count = sum(p.numel() for p in model.parameters())
    if not kind:  # bf16: 2 bytes a parameter
        return {"kind": "bf16", "weight_bytes": 2 * count, "parameters": count, "counted_on_meta": True}

    def materialize(part):
        part.to_empty(device="cpu")
        with torch.no_grad():
            for p in part.parameters():
                p.normal_(0, 0.02)
        part.to(torch.bfloat16)
        layers = quantize_base(part, kind)
        return weight_bytes(part), layers

    start, total, layers = time.perf_counter(), 0, 0
    for group in ("transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(model, group)
        one, n = materialize(blocks[0])
        total, layers = total + one * len(blocks), layers + n * len(blocks)
        setattr(model, group, torch.nn.ModuleList())
    rest, n = materialize(model)
    return {"kind": kind, "weight_bytes": total + rest, "quantized_linear_layers": layers + n, "parameters": count,
            "seconds_to_build": round(time.perf_counter() - start, 1), "blocks_materialized": "one of each kind"}


def _hwm_mib() -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 1024


def iteration_peak(args: dict) -> dict:
    """Child: the models as ``rapm train`` builds them (``build_models``, with ``base_quantization``), then two student
    updates through rapm.train's own phases (benchmarks/harness.py ``Loop``); the resident set's high-water mark is
    reset after the build (``/proc/self/clear_refs``), so the figure is the training's own peak, not the loading's
    (which holds the float32 weights before they are quantized)."""
    import torch

    from benchmarks.harness import Loop
    from rapm.models import build_models
    from rapm.store import open_store
    from rapm.train import resolve_config, training_batch

    store = open_store(Path(args["store"]))
    config = resolve_config(args["teacher"], args["store"], None, None,
                            {"base_quantization": args["quantization"], "gradient_checkpointing": True})
    teacher, disc = build_models(config, torch.device("cpu"), need_vae=False, with_discriminator=False)
    built = _hwm_mib()
    rss_built = int(open("/proc/self/statm").read().split()[1]) * 4096 / MiB
    open("/proc/self/clear_refs", "w").write("5")
    delta = int(store.manifest.get("delta") or max(1, 1000 // (store.steps * store.substeps)))
    loop = Loop(teacher.unet, disc, teacher.schedule, config, store.timesteps, store.guidance, delta)
    batch = training_batch(store.get([0]), torch.device("cpu"))
    seconds = []
    for _ in range(2):
        tick = time.perf_counter()
        loop.iteration(batch, "student")
        seconds.append(round(time.perf_counter() - tick, 2))
    return {"quantization": args["quantization"] or "none", "build_peak_mib": round(built, 1),
            "rss_after_build_mib": round(rss_built, 1), "training_peak_mib": round(_hwm_mib(), 1),
            "seconds_per_iteration": seconds}


CHILDREN = {"iteration-peak": iteration_peak, "flux-weights": flux_weights, "pass": lambda a: teacher_pass(a), "build": lambda a: build_teacher(a["model"], Path(a["folder"])),
            "check-export": lambda a: check_export(a["model"], Path(a["lora"]), a.get("rapm_tree"))}


def child(kind: str, args: dict, log: Path) -> dict:
    """A function of this file in a fresh process, measured; the JSON object its last line prints, with the measure."""
    result = run_measured([sys.executable, __file__, "--child", kind, json.dumps(args)], log)
    return {**result, **json.loads(log.read_text().strip().splitlines()[-1])}


# ---------------------------------------------------------------------------------------------- the plan
EXPORT_RAPM: tuple[str, str] | None = None  # --export-rapm TREE:LABEL


def cells(model: str, work: Path, latent: int, latent_2: int) -> list[list[tuple[str, callable]]]:
    """(name, function) of every cell of one model, in the order they run, in two stages: every verb at ``latent``,
    then the training cells at ``latent_2`` (every model's first stage runs before any second one)."""
    base = work / model / "teacher"
    prompts = work / "prompts.txt"

    def teacher(size):
        return at_latent(base, size, work / model / f"teacher-{size}")

    def trajectories(size):
        def cell():
            store = work / model / f"store-{size}"
            shutil.rmtree(store, ignore_errors=True)
            delta = MODELS[model].get("trajectories_delta")
            result = run_measured(rapm("trajectories", "--teacher", str(teacher(size)), "--prompts", str(prompts), "--out",
                                       str(store), "--steps", "4", "--substeps", "2", "--batch-size", "2", "--no-progress",
                                       *(["--delta", str(delta)] if delta else [])),
                                  work / model / f"trajectories-{size}.log")
            manifest = json.loads((store / "manifest.json").read_text())
            count = manifest.get("count", len(PROMPTS))
            return {**result, "latent": size, "trajectories": count, "store_bytes": folder_bytes(store),
                    "delta": manifest.get("delta"), "timesteps": manifest.get("timesteps"),
                    "store_bytes_per_trajectory": round(folder_bytes(store) / count)}
        return cell

    def train(size, method, checkpointing, quantization="", light_heads=False):
        def cell():
            run = work / model / (f"run-{size}-{method}{'-ckpt' if checkpointing else ''}"
                                  f"{'-' + quantization if quantization else ''}{'-light' if light_heads else ''}")
            light = ["--set", "disc_heads_per_level=1", "--set", "disc_kernel_size=1"] if light_heads else []
            shutil.rmtree(run, ignore_errors=True)
            result = run_measured(rapm("train", "--teacher", str(teacher(size)), "--store", str(work / model / f"store-{size}"),
                                       "--out", str(run), "--method", method, "--iterations", "2", "--checkpoint-every", "2",
                                       "--set", "eval_every=0", "--set", "sample_every=100", "--set", "val_fraction=0",
                                       "--set", f"gradient_checkpointing={str(checkpointing).lower()}",
                                       "--set", f"base_quantization={quantization}", *light, "--no-progress"),
                                  work / model / f"{run.name}.log")
            result = {**result, "latent": size, "method": method, "gradient_checkpointing": checkpointing,
                      "base_quantization": quantization, "light_heads": light_heads,
                      "iterations": iteration_seconds(run)}
            if model in FLOW_MODELS:  # the disk: only the run that export reads keeps its checkpoint
                result["checkpoint_bytes"] = folder_bytes(run / "checkpoints")
                if run.name != f"run-{latent}-rapm":
                    shutil.rmtree(run / "checkpoints")
            return result
        return cell

    def export():
        lora = work / model / "lora"
        shutil.rmtree(lora, ignore_errors=True)
        result = run_measured(rapm("export", "--run", str(work / model / f"run-{latent}-rapm"), "--out", str(lora)),
                              work / model / "export.log")
        checked = child("check-export", {"model": model, "lora": str(lora)}, work / model / "export-check.log")
        return {**result, **{k: v for k, v in checked.items() if k not in ("seconds", "peak_rss_mib")}}

    def export_by():
        tree, label = EXPORT_RAPM
        lora = work / model / f"lora-{label}"
        shutil.rmtree(lora, ignore_errors=True)
        result = run_measured(rapm("export", "--run", str(work / model / f"run-{latent}-rapm"), "--out", str(lora)),
                              work / model / f"export-{label}.log", env={"PYTHONPATH": tree})
        checked = child("check-export", {"model": model, "lora": str(lora), "rapm_tree": tree},
                        work / model / f"export-{label}-check.log")
        return {**result, **{k: v for k, v in checked.items() if k not in ("seconds", "peak_rss_mib")},
                "rapm": label}

    def sample():
        out = work / model / "samples"
        shutil.rmtree(out, ignore_errors=True)
        result = run_measured(rapm("sample", "--teacher", str(teacher(latent)), "--lora", str(work / model / "lora"),
                                   "--prompt", PROMPTS[0], "--steps", "4", "--out", str(out), "--device", "cpu"),
                              work / model / "sample.log")
        return {**result, "latent": latent, "images": len(list(out.glob("*.png")))}

    def evaluate():
        # SD 1.5 ran evaluate's default teacher curve (DDIM at 1-32 steps, guided: 23 of its 25 minutes here); SDXL
        # leaves it out, or the cell alone would take an hour on one core
        curve = ["--teacher-curve", ""] if model in ("sdxl", *FLOW_MODELS) else []
        out = work / model / "evaluation.json"
        result = run_measured(rapm("evaluate", "--teacher", str(teacher(latent)), "--model", "teacher:ddim:4",
                                   "--model", f"student={work / model / 'lora'}:4", "--prompts", str(prompts), "--num", "2",
                                   "--reference-steps", "4", "--out", str(out), *curve), work / model / "evaluate.log")
        return {**result, "latent": latent, "teacher_curve": not curve,
                "models": [r.get("method") for r in json.loads(out.read_text()).get("rows", [])]}

    def without_t5():
        """``rapm trajectories`` on the teacher with ``text_encoder_3`` / ``tokenizer_3`` left out (null in
        model_index.json, as diffusers' StableDiffusion3Pipeline allows: it then feeds zeros for T5's tokens)."""
        out = work / model / f"teacher-{latent}-no-t5"
        if not (out / "model_index.json").is_file():
            staging = out.with_name(out.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(teacher(latent), staging, copy_function=os.link,
                            ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
            index = json.loads((staging / "model_index.json").read_text())
            index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
            (staging / "model_index.json").unlink()
            (staging / "model_index.json").write_text(json.dumps(index, indent=2))
            staging.rename(out)
        store = work / model / f"store-{latent}-no-t5"
        shutil.rmtree(store, ignore_errors=True)
        result = run_measured(rapm("trajectories", "--teacher", str(out), "--prompts", str(prompts), "--out", str(store),
                                   "--steps", "4", "--substeps", "2", "--batch-size", "2", "--no-progress"),
                              work / model / f"trajectories-{latent}-no-t5.log", may_fail=True)
        if result.get("ran") is False:
            return {**result, "latent": latent}
        return {**result, "ran": True, "latent": latent, "store_bytes": folder_bytes(store)}

    def passes(size):
        return lambda: child("pass", {"teacher": str(teacher(size))}, work / model / f"pass-{size}.log")

    def build():
        shutil.rmtree(base, ignore_errors=True)
        built = child("build", {"model": model, "folder": str(base)}, work / model / "build.log")
        return {**built, "teacher_bytes": folder_bytes(base)}

    plan = [("build", build), (f"pass-{latent}", passes(latent)), (f"trajectories-{latent}", trajectories(latent))]
    if model in FLOW_MODELS:  # rapm only (the brief's time: an SD3 iteration is minutes on one core), both sizes
        plan = plan[:1] + [(f"no-t5-{latent}", without_t5)] + plan[1:]
        for size, stage in ((latent, plan), (latent_2, second := [(f"pass-{latent_2}", passes(latent_2)),
                                                                    (f"trajectories-{latent_2}", trajectories(latent_2))])):
            stage += [(f"train-{size}-rapm{'-ckpt' if c else ''}", train(size, "rapm", c)) for c in (False, True)]
            if size == latent:
                stage += [("export", export), ("sample", sample)]
        second.append(("evaluate", evaluate))
        if EXPORT_RAPM:  # the export again, by another rapm source tree (e.g. a newer commit's kohya file)
            second.append((f"export-{EXPORT_RAPM[1]}", export_by))
        # the training's own peak with checkpointing: the train cells' peak can be the loading's (bf16 files to float32)
        second.append((f"peak-{latent}-float32", lambda: child(
            "iteration-peak", {"teacher": str(teacher(latent)), "store": str(work / model / f"store-{latent}"),
                               "quantization": ""}, work / model / f"peak-{latent}-float32.log")))
        return [plan, second]
    for method in TRAIN_METHODS:
        for checkpointing in (False, True):
            plan.append((f"train-{latent}-{method}{'-ckpt' if checkpointing else ''}", train(latent, method, checkpointing)))
    plan += [("export", export), ("sample", sample), ("evaluate", evaluate)]
    plan += [(f"train-{latent}-rapm-ckpt-{q}", train(latent, "rapm", True, q)) for q in ("int8", "nf4")]
    for q in ("", "int8", "nf4"):  # the training's own peak, after the build (the quantized base's saving)
        plan.append((f"peak-{latent}-{q or 'float32'}", lambda q=q: child(
            "iteration-peak", {"teacher": str(teacher(latent)), "store": str(work / model / f"store-{latent}"),
                               "quantization": q}, work / model / f"peak-{latent}-{q or 'float32'}.log")))
    if model == "sd15":  # the preset's heads (4 a level, 3x3, two sets) are 1.3B parameters: SDXL's lighter ones
        plan.append((f"train-{latent}-rapm-paper-ckpt-light", train(latent, "rapm-paper", True, light_heads=True)))
    second = [(f"pass-{latent_2}", passes(latent_2)), (f"trajectories-{latent_2}", trajectories(latent_2))]
    for method in TRAIN_METHODS:
        for checkpointing in (False, True):
            second.append((f"train-{latent_2}-{method}{'-ckpt' if checkpointing else ''}", train(latent_2, method, checkpointing)))
    return [plan, second]


# ---------------------------------------------------------------------------------------------- the report
def fit_activation(cells_of: dict, suffix: str, target: int) -> dict | None:
    """Peak RSS of the training cells ``train-<latent>-<suffix>`` as a + b * latent area, read at ``target``."""
    points = sorted((int(n.split("-")[1]), c["peak_rss_mib"]) for n, c in cells_of.items()
                    if n.startswith("train-") and n.split("-", 2)[2] == suffix and c.get("fits") is not False
                    and not c.get("failed"))
    if not points:
        return None
    if len(points) == 1 or target == points[-1][0]:
        latent, mib = next(((l, m) for l, m in points if l == target), points[-1])
        return {"peak_rss_gib": mib / 1024, "fitted": False, "latent": latent}
    (l1, m1), (l2, m2) = points[0], points[-1]
    slope = (m2 - m1) / (l2**2 - l1**2)
    at = m1 + slope * (target**2 - l1**2)
    return {"peak_rss_gib": at / 1024, "fitted": True, "mib_per_latent_pixel": slope, "latent": target,
            "from_latents": [l1, l2]}


def merged_cells(work: Path, results: Path, latent: int) -> tuple[dict, dict, dict, dict, dict]:
    """The cells of ``--work/cells.json`` with, for every model that work folder has not run, the cells that
    ``results/real_size.json`` already holds (a run of ``--models sd3`` keeps the SD 1.5 / SDXL rows), the same for
    the FLUX weights; and each model's date, command and notes (``--work/notes.json``: {model: [line]}, what the
    run did beside the plan, e.g. which rapm it ran; the earlier file's for the models kept from it)."""
    data = json.loads((work / "cells.json").read_text()) if (work / "cells.json").is_file() else {}
    flux = json.loads((work / "flux.json").read_text()) if (work / "flux.json").is_file() else {}
    prior_file = results / "real_size.json"
    prior = json.loads(prior_file.read_text()) if prior_file.is_file() else {}
    today = time.strftime("%Y-%m-%d")
    ran_here = [m for m in MODELS if m in data] + [m for m in data if m not in MODELS]
    here = (f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/real_size.py --work WORK --models {','.join(ran_here)} "
            f"--latent {latent}")
    # the SD 1.5 / SDXL run's file (2026-12-06) predates "dates" / "commands"; its command was this one
    legacy = (f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/real_size.py --work WORK --models sd15,sdxl "
              f"--latent {prior.get('latent', latent)}")
    dates, commands = {}, {}
    notes = json.loads((work / "notes.json").read_text()) if (work / "notes.json").is_file() else {}
    for model, got in (prior.get("cells") or {}).items():
        if model not in data:
            data[model] = got
            dates[model] = (prior.get("dates") or {}).get(model, prior.get("date", "?"))
            commands[model] = (prior.get("commands") or {}).get(model, legacy)
            if (prior.get("notes") or {}).get(model):
                notes[model] = prior["notes"][model]
    for model in ran_here:
        dates[model], commands[model] = today, here
    if not flux and prior.get("flux"):
        flux = prior["flux"]
    return {m: data[m] for m in [*MODELS, *data] if m in data}, flux, dates, commands, notes


def report(work: Path, results: Path, latent: int) -> None:
    data, flux, dates, commands, notes = merged_cells(work, results, latent)
    import platform

    runs = {}
    for model in data:
        runs.setdefault((dates.get(model, "?"), commands.get(model, "?")), []).append(MODELS.get(model, {}).get("name", model))
    torch_versions = sorted({m["build"].get("torch") for m in data.values() if m.get("build") and m["build"].get("torch")})
    lines = [f"# Real size: SD 1.5, SDXL and SD3-medium at their published shapes, on this CPU",
             "", f"`benchmarks/real_size.py`, torch {', '.join(torch_versions) or '?'}, {os.cpu_count()} "
             f"CPU cores, {platform.platform()}, one torch thread (`OMP_NUM_THREADS=1`). Commands:", ""]
    for (date, command), names in runs.items():
        lines += [f"- {' and '.join(names)}, {date}:", "", f"      {command}", ""]
    lines += [
             "Random weights at the published configs (full-size UNet, text towers and VAE; a tokenizer of 8 words), "
             "saved with `save_pretrained` and run through the CLI, each verb a fresh process. Float32 everywhere "
             f"(rapm's dtype on a CPU). The verbs ran at a {latent * 8} px latent ({latent}x{latent}); training also at "
             "a second size (the table names both), and the published resolution's training peak is fitted from the two (peak = a + b x "
             "latent area; marked *fitted*). Peak RSS is the process's maximum resident set (`os.wait4`), which includes "
             "Python, torch and the libraries (~0.5 GiB).", ""]
    table = {}
    for model, spec in MODELS.items():
        got = data.get(model, {})
        if not got or model in FLOW_MODELS:  # after the caveats of the UNet families (flow_section)
            continue
        table[model] = {}
        params = (got.get("build") or {}).get("parameters") or {}
        lines += [f"## {spec['name']}", "", "Parameters: " + ", ".join(f"{k} {v / 1e6:,.0f}M" for k, v in params.items())
                  + f"; the saved folder {got.get('build', {}).get('teacher_bytes', 0) / GiB:.2f} GiB.", "",
                  "| verb | latent | peak RSS GiB | wall s | measured |", "| --- | ---: | ---: | ---: | --- |"]
        for name, cell in got.items():
            if name == "build":
                continue
            facts = cell_facts(cell, f"rapm, checkpointing, {cell.get('quantization')} base", "peaked", "teacher", "")
            if "targeted_modules" in cell:
                facts.append(f"{cell['targeted_modules']} targeted modules of the real UNet; diffusers file "
                             f"{cell['diffusers_keys']} keys ({cell['diffusers_missing']} missing, {cell['diffusers_extra']} "
                             f"extra), {cell['diffusers_file_bytes'] / MiB:.1f} MiB; kohya file {cell['kohya_keys']} keys "
                             f"({cell['kohya_missing']} missing, {cell['kohya_extra']} extra against A1111's / ComfyUI's "
                             f"names), {cell['kohya_file_bytes'] / MiB:.1f} MiB")
            if "images" in cell:
                facts.append(f"{cell['images']} image(s)")
            if cell.get("models"):
                facts.append("models " + ", ".join(map(str, cell["models"])))
            if "teacher_curve" in cell or name == "evaluate":
                facts.append("with the default teacher curve (guided DDIM at 1-32 steps)" if cell.get("teacher_curve", True)
                             else "without the teacher curve")
            lines.append(f"| {name} | {cell.get('latent', name.split('-')[1] if name.count('-') else '')} | {cell['peak_rss_mib'] / 1024:.2f} | {cell['seconds']:.0f} | "
                         f"{'; '.join(facts)} |")
        unet_bytes = params.get("unet", 0) * 4
        export = got.get("export")
        if export:
            lora = export["diffusers_file_bytes"] / 4  # float32 parameters
            lines += ["", f"Where a training cell's memory goes: the float32 UNet {unet_bytes / GiB:.2f} GiB; the "
                      f"student LoRA (rank 64) {lora / 1e6:.0f}M parameters, {16 * lora / GiB:.2f} GiB with its gradient "
                      "and Adam's two moments; Python, torch and the libraries ~0.5 GiB; the rest is activations and "
                      "the discriminator's adapter, heads and their Adam where the method has them (the sd15 preset's "
                      "heads, two sets of 9 levels x 4 heads of 3x3 convs, are 1.33B parameters: 19.8 GiB with Adam)."]
        lines += ["", f"What card training needs at {spec['published_latent'] * 8} px (N = 4, batch 1, LoRA rank 64, "
                  "float32 base as measured; the bf16 row halves the base's weight bytes, the rest as measured, "
                  f"an estimate; a card fits when the figure + {CARD_RESERVE_GIB} GiB is at most its memory; CPU RSS "
                  "stands in for GPU memory, which also holds no Python heap but does hold the CUDA context):", "",
                  "| method | checkpointing | float32 GiB | bf16 base GiB (est.) | source | 8 GB | 12 GB | 24 GB |",
                  "| --- | --- | ---: | ---: | --- | --- | --- | --- |"]
        for method, checkpointing, suffix in [(m, c, f"{m}{'-ckpt' if c else ''}") for m in TRAIN_METHODS
                                              for c in (False, True)] + [("rapm-paper, one 1x1 head a level", True,
                                                                          "rapm-paper-ckpt-light")]:
                fit = fit_activation(got, suffix, spec["published_latent"])
                failed = [c for n, c in got.items() if n.startswith("train-") and n.split("-", 2)[2] == suffix
                          and c.get("fits") is False]
                if failed and not fit:
                    c = failed[0]
                    lines.append(f"| {method} | {'on' if checkpointing else 'off'} | > {c['peak_rss_mib'] / 1024:.1f} "
                                 f"| - | ran out of memory at {int(next(n for n, v in got.items() if v is c).split('-')[1]) * 8}"
                                 f" px under a {c['memory_cap_gib']:g} GiB address-space cap (24 GiB machine) | no | no | "
                                 f"{'no' if c['memory_cap_gib'] >= 22 else '?'} |")
                    continue
                if not fit:
                    continue
                fp32 = fit["peak_rss_gib"]
                bf16 = fp32 - unet_bytes / 2 / GiB
                src = (f"fitted from {fit['from_latents'][0] * 8} and {fit['from_latents'][1] * 8} px" if fit["fitted"]
                       else f"measured at {fit['latent'] * 8} px")
                if not fit["fitted"] and fit["latent"] != spec["published_latent"]:
                    src += " (not the published size)"
                fits = lambda gib, card: "yes" if gib + CARD_RESERVE_GIB <= card * 1e9 / GiB else "no"  # noqa: E731
                lines.append(f"| {method} | {'on' if checkpointing else 'off'} | {fp32:.2f} | {bf16:.2f} | {src} | "
                             + " | ".join(f"{fits(fp32, c)} / {fits(bf16, c)}" for c in (8, 12, 24)) + " |")
                table[model][suffix] = {**fit, "bf16_base_gib_est": bf16}
        plain, fit = got.get(f"train-{latent}-rapm-ckpt"), fit_activation(got, "rapm-ckpt", spec["published_latent"])
        for q in ("int8", "nf4"):
            quantized = got.get(f"train-{latent}-rapm-ckpt-{q}")
            if not (plain and fit and quantized):
                continue
            saving = (plain["peak_rss_mib"] - quantized["peak_rss_mib"]) / 1024
            gib = fit["peak_rss_gib"] - saving
            fits = lambda gib, card: "yes" if gib + CARD_RESERVE_GIB <= card * 1e9 / GiB else "no"  # noqa: E731
            lines.append(f"| rapm, {q} base | on | {gib:.2f} | - | the row above less the {saving:.2f} GiB that {q} "
                         f"saved at {latent * 8} px (measured: {quantized['peak_rss_mib'] / 1024:.2f} against "
                         f"{plain['peak_rss_mib'] / 1024:.2f} GiB) | " + " | ".join(fits(gib, c) for c in (8, 12, 24)) + " |")
            table[model][f"rapm-ckpt-{q}"] = {"peak_rss_gib": gib, "saving_gib": saving, "fitted": True}
        lines += ["", "(8 / 12 / 24 GB columns: float32 / bf16 base.)", ""]
    lines += ["## Caveats (2026-12-06)", "",
              "- Cells that peaked at ~23.1 GiB hit this machine's physical memory (24 GiB, no swap): the kernel then "
              "drops the memory-mapped weight pages, so their RSS is capped, not measured. The SDXL 1024 px fits built "
              "on them (every SDXL row above with a 384 px cell at 22.6-23.1 GiB) are not figures: read SDXL's card "
              "needs from the 256 px cells and a GPU run.",
              "- On the CPU the quantized base saves nothing: quantizing needs the float32 layer first and the process "
              "keeps the freed memory, and a float32 build's weights are memory-mapped and counted only as they are "
              "touched. The `peak-*` cells (VmHWM reset after the build) show it: SDXL 14.9 GiB float32, 19.9 int8, "
              "16.6 nf4. What the quantized weights take is measured exactly (the FLUX.1-dev table); what a GPU run "
              "peaks at with them is not measured here.", ""]
    for model in FLOW_MODELS:
        if data.get(model):
            table[model] = {}
            lines += flow_section(model, data[model], latent, table[model], notes.get(model, []))
    if flux:
        lines += flux_table(flux, results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "real_size.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "latent": latent,
                                                         "dates": dates, "commands": commands, "notes": notes,
                                                         "cells": data, "cards": table, "flux": flux}, indent=1) + "\n")
    (results / "real_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cell_facts(cell: dict, training: str, peaked: str, denoiser: str, store_note: str, first=(),
               say_checkpointing: bool = False) -> list[str]:
    """What a cell measured, in the words both sections use: whether it fitted, the training peak (``training``
    names the setting), the guided ``denoiser`` pass, the store and the iterations; ``first``: facts said after the
    fit; ``say_checkpointing``: an iteration cell says so where it ran with checkpointing."""
    facts = []
    if cell.get("fits") is False:
        facts.append(f"**did not fit**: ran out of memory under a {cell['memory_cap_gib']:g} GiB address-space cap")
    facts += first
    if denoiser == "transformer" and "seconds_per_guided_pass" in cell:
        facts.append(f"{cell['seconds_per_guided_pass']} s per guided transformer pass (batch 2)")
    if "training_peak_mib" in cell:
        facts.append(f"{training}: after the build {cell['rss_after_build_mib'] / 1024:.2f} GiB resident (the build "
                     f"peaked at {cell['build_peak_mib'] / 1024:.2f}); two student updates {peaked} at "
                     f"**{cell['training_peak_mib'] / 1024:.2f} GiB** ({', '.join(map(str, cell['seconds_per_iteration']))} s)")
    if denoiser == "teacher" and "seconds_per_guided_pass" in cell:
        facts.append(f"{cell['seconds_per_guided_pass']} s per guided teacher pass (batch 2)")
    if "store_bytes_per_trajectory" in cell:
        facts.append(f"{cell['trajectories']} trajectories{store_note}, {cell['store_bytes_per_trajectory'] / MiB:.2f} "
                     "MiB each")
    if "iterations" in cell:
        facts.append(("checkpointing; " if say_checkpointing and cell.get("gradient_checkpointing") else "")
                     + "s per iteration: " + ", ".join(f"{r['seconds']:.0f} ({r['phase']})" for r in cell["iterations"]))
    return facts


def kohya_facts(cell: dict) -> str:
    """The export cell's kohya file as ``check_flow_export`` found it: its LoRA modules against the native ones."""
    if not cell.get("kohya_written"):
        return ("no kohya file was written (files: " + ", ".join(f"`{f}`" for f in cell.get("files", [])) + ")")
    text = (f"kohya file `{cell['kohya_file']}` {cell['kohya_keys']} keys, {cell['kohya_lora_down_keys']} LoRA modules "
            f"(`lora_unet_*.lora_down.weight`), {cell['kohya_file_bytes'] / MiB:.1f} MiB")
    if cell.get("native_modules") is None:
        return text + "; " + cell.get("native_note", "not checked against native names")
    return (text + f", against {cell['native_modules']} native (MMDiT) modules that hold a targeted one: "
            f"{cell['kohya_missing']} missing, {cell['kohya_extra']} extra"
            + (f"; {cell['targeted_without_native_name']} targeted modules have no native name"
               if cell.get("targeted_without_native_name") else ""))


def flow_section(model: str, got: dict, latent: int, table: dict, notes: list[str] = ()) -> list[str]:
    """SD3-medium's section: what ran and how (bf16 files, the T5 stand-in, rapm only), every cell, and the card rows
    (``fit_activation`` as for SD 1.5 / SDXL)."""
    spec, build = MODELS[model], got.get("build") or {}
    params = build.get("parameters") or {}
    transformer_bytes = params.get("transformer", 0) * 4
    t5 = build.get("t5_xxl_parameters", 0)
    cap = next((c.get("memory_cap_gib") for c in got.values() if c.get("memory_cap_gib")), None)
    no_t5 = got.get(f"no-t5-{latent}") or {}
    lines = [f"## {spec['name']} ({params.get('transformer', 0) / 1e9:.2f}B transformer)", "",
             "Parameters: " + ", ".join(f"{k} {v / 1e6:,.0f}M" for k, v in params.items())
             + f"; the saved folder {build.get('teacher_bytes', 0) / GiB:.2f} GiB. What ran, exactly:", "",
             "- The transformer at benchmarks/flow_configs.py's published config (24 joint blocks, 1536 wide), CLIP-L and "
             "OpenCLIP bigG/14 with their projections, the 16-channel VAE, FlowMatchEuler (shift 3): random weights, "
             f"**stored in bfloat16** (half the folder's bytes) and loaded in **float32** by rapm, its CPU dtype.",
             f"- **T5-XXL did not run.** Its {t5 / 1e9:.2f}B parameters are {4 * t5 / GiB:.1f} GiB in float32 (rapm "
             f"loads every text encoder in float32 on a CPU; {2 * t5 / GiB:.1f} GiB in bf16) beside the "
             f"{transformer_bytes / GiB:.1f} GiB transformer: more than this 24 GiB machine. `text_encoder_3` is T5-XXL's "
             f"config with 1 of its 24 layers ({params.get('text_encoder_3', 0) / 1e6:,.0f}M; d_model 4096, so the "
             f"transformer sees the published joint sequence: 77 CLIP + {T5_TOKENS} T5 tokens of 4096) and `tokenizer_3` "
             "a CLIP tokenizer of the 8 words padding to 256. Training never loads a text encoder (the store holds the "
             "embeddings): the train and export cells are the real cost; trajectories and sample lack T5-XXL's encode.",
             "- Leaving T5 out as diffusers allows (`text_encoder_3` / `tokenizer_3` null in model_index.json; the "
             "pipeline then feeds zeros for T5's tokens), cell `no-t5-" + str(latent) + "`: "
             + (("rapm refused it: `" + " / ".join(no_t5.get("error", [])[-1:]) + "`") if no_t5.get("ran") is False
                else "ran" if no_t5 else "not run") + ".",
             f"- Only `rapm` (no discriminator) trained, 2 iterations a cell, at {latent * 8} and "
             f"{spec['latent_2'] * 8} px, with and without gradient checkpointing; LoRA rank {spec['lora_rank']} (the "
             "sd3 preset). Not run: rapm-paper, the quantized bases, evaluate's teacher curve (time"
             + (f": a guided transformer pass took {got[f'pass-{latent}']['seconds_per_guided_pass']} s at {latent * 8} px "
                "on one core" if "seconds_per_guided_pass" in got.get(f"pass-{latent}", {}) else "") + ")." + (f" Every cell ran under a {cap:g} GiB address-space cap." if cap else ""),
             *[f"- {note}" for note in notes],
             "", "| verb | latent | tokens | peak RSS GiB | wall s | measured |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, cell in got.items():
        if name == "build":
            continue
        facts = []
        if cell.get("ran") is False:
            facts.append(f"**exited {cell.get('returncode')}**: " + " / ".join(f"`{line.strip()}`" for line in cell.get("error", [])[-1:]))
        if cell.get("failed"):
            facts.append("**failed**: " + " / ".join(f"`{line.strip()}`" for line in cell.get("error", [])[-2:]))
        if cell.get("crowded_retries"):
            facts.append(f"run again after {len(cell['crowded_retries'])} kernel OOM kill(s) beside another process's memory")
        facts = cell_facts(cell, "rapm, checkpointing, float32", "then peaked", "transformer", " (N = 4, M = 2)",
                           first=facts, say_checkpointing=True)
        if cell.get("checkpoint_bytes"):
            facts.append(f"checkpoint {cell['checkpoint_bytes'] / MiB:.0f} MiB")
        if cell.get("rapm"):
            facts.append(f"`rapm export` of `run-{latent}-rapm` by rapm at {cell['rapm']}")
        if "targeted_modules" in cell:
            facts.append(f"{cell['targeted_modules']} targeted modules of the real transformer; diffusers file "
                         f"{cell['diffusers_keys']} keys ({cell['diffusers_missing']} missing, {cell['diffusers_extra']} "
                         f"extra), {cell['lora_parameters'] / 1e6:.1f}M parameters ({', '.join(cell['file_dtypes'])}), "
                         f"{cell['diffusers_file_bytes'] / MiB:.1f} MiB; "
                         + kohya_facts(cell))
        if "images" in cell:
            facts.append(f"{cell['images']} image(s), 4 student steps")
        if cell.get("models"):
            facts.append("models " + ", ".join(map(str, cell["models"])) + ", without the teacher curve")
        size = cell.get("latent")
        tokens = (size // 2) ** 2 + 77 + T5_TOKENS if size else ""
        peak = f"{cell['peak_rss_mib'] / 1024:.2f}" if "peak_rss_mib" in cell else "-"
        wall = f"{cell['seconds']:.0f}" if "seconds" in cell else "-"
        lines.append(f"| {name} | {size or ''} | {tokens} | {peak} | {wall} | "
                     f"{'; '.join(facts)} |")
    export = got.get("export")
    if export:
        lora = export["lora_parameters"]
        lines += ["", f"Where a training cell's memory goes: the float32 transformer {transformer_bytes / GiB:.2f} GiB; the "
                  f"student LoRA (rank {spec['lora_rank']}) {lora / 1e6:.0f}M parameters, {16 * lora / GiB:.2f} GiB with its "
                  "gradient and Adam's two moments; Python, torch and the libraries ~0.5 GiB; the rest is activations "
                  "(`rapm` has no discriminator)."]
    published = spec["published_latent"]
    rows = []
    # the pass cells load the transformer alone (bf16 files into float32) and run inference: their peak is the
    # loading's, a floor under every cell that loads it; a training cell at that floor hides its own need
    passes = [c["peak_rss_mib"] / 1024 for n, c in got.items() if n.startswith("pass-") and "peak_rss_mib" in c]
    floor = max(passes) if passes else 0.0
    fits = lambda gib, card: "yes" if gib + CARD_RESERVE_GIB <= card * 1e9 / GiB else "no"  # noqa: E731
    bound = lambda c: c.get("peak_rss_mib", 0) / 1024 <= floor + LOAD_BOUND_MARGIN_GIB  # noqa: E731
    for checkpointing, suffix in ((False, "rapm"), (True, "rapm-ckpt")):
        trains = {n: c for n, c in got.items() if n.startswith("train-") and n.split("-", 2)[2] == suffix
                  and "peak_rss_mib" in c and not c.get("failed") and c.get("fits") is not False}
        at_floor = sorted(n for n, c in trains.items() if bound(c))
        fit = fit_activation(got, suffix, published)
        if at_floor and fit:  # no fit through a point that is the loading's peak
            name = at_floor[0]
            c = trains[name]
            rows.append(f"| rapm | {'on' if checkpointing else 'off'} | <= {c['peak_rss_mib'] / 1024:.2f} | - | `{name}`"
                        f"'s peak is the loading's (the pass cells' {floor:.2f} GiB): the training's own need is under it, "
                        "not measured here | - | - | - |")
            fit = None
        failed = [c for n, c in got.items() if n.startswith("train-") and n.split("-", 2)[2] == suffix
                  and c.get("fits") is False]
        fits = lambda gib, card: "yes" if gib + CARD_RESERVE_GIB <= card * 1e9 / GiB else "no"  # noqa: E731
        if failed and not fit:
            c = failed[0]
            rows.append(f"| rapm | {'on' if checkpointing else 'off'} | > {c['peak_rss_mib'] / 1024:.1f} | - | ran out of "
                        f"memory under a {c['memory_cap_gib']:g} GiB address-space cap | no | no | ? |")
            continue
        if not fit:
            continue
        fp32 = fit["peak_rss_gib"]
        bf16 = fp32 - transformer_bytes / 2 / GiB
        src = (f"fitted from {fit['from_latents'][0] * 8} and {fit['from_latents'][1] * 8} px (an extrapolation: "
               f"{published * 8} px is {published ** 2 / fit['from_latents'][1] ** 2:.1f}x the larger one's latent area)"
               if fit["fitted"] else
               f"measured at {fit['latent'] * 8} px" + (" (not the published size)" if fit["latent"] != published else ""))
        rows.append(f"| rapm | {'on' if checkpointing else 'off'} | {fp32:.2f} | {bf16:.2f} | {src} | "
                    + " | ".join(f"{fits(fp32, c)} / {fits(bf16, c)}" for c in (8, 12, 24)) + " |")
        table[suffix] = {**fit, "bf16_base_gib_est": bf16}
    for name, c in got.items():
        if name.startswith("peak-") and "training_peak_mib" in c:
            fp32 = c["training_peak_mib"] / 1024
            bf16 = fp32 - transformer_bytes / 2 / GiB
            rows.append(f"| rapm, the training's own peak | on | {fp32:.2f} | {bf16:.2f} | `{name}`: two student updates "
                        f"after the build, VmHWM reset, at {int(name.split('-')[1]) * 8} px (not the published size) | "
                        + " | ".join(f"{fits(fp32, k)} / {fits(bf16, k)}" for k in (8, 12, 24)) + " |")
            table[name] = {"peak_rss_gib": fp32, "bf16_base_gib_est": bf16, "fitted": False}
    if rows:
        lines += ["", f"What card training needs at {published * 8} px (N = 4, batch 1, LoRA rank {spec['lora_rank']}, "
                  "float32 base as measured; the bf16 row halves the transformer's weight bytes, the rest as measured, "
                  f"an estimate; a card fits when the figure + {CARD_RESERVE_GIB} GiB is at most its memory; CPU RSS "
                  "stands in for GPU memory; the fit is linear in the latent area, i.e. in the image tokens, "
                  f"{published ** 2 // 4} at {published * 8} px beside the 333 text tokens, which holds for attention "
                  "whose memory is linear in the tokens (SDPA's fused kernels), not for one that stores the attention map; "
                  f"training needs no text encoder: T5-XXL's {2 * t5 / 1e9:.1f} GB in bf16 is the trajectories' cost, "
                  "not this):", "",
                  "| method | checkpointing | float32 GiB | bf16 base GiB (est.) | source | 8 GB | 12 GB | 24 GB |",
                  "| --- | --- | ---: | ---: | --- | --- | --- | --- |", *rows, "", "(8 / 12 / 24 GB columns: float32 / bf16 base.)"]
    return lines + [""]


def flux_table(flux: dict, results: Path) -> list[str]:
    """FLUX.1-dev at 512 px: the measured stored weights by base, with flow_memory.md's LoRA + Adam (an exact count)
    and activation estimate (gradient checkpointing) beside them."""
    est = next(r for r in json.loads((results / "flow_memory.json").read_text())["summary"]["rows"]
               if r["family"] == "flux" and r["px"] == 512)
    lines = ["## FLUX.1-dev (11.9B), the base's weights measured", "",
             "The published transformer quantized by rapm's own `quantize_base` (random bf16 weights; one of the 19 "
             "joint and one of the 38 single-stream blocks materialized, each counted for every block of its kind, "
             "and everything outside the blocks whole; no forward pass): the stored bytes (`rapm.quantize."
             "weight_bytes`). The bf16 row is counted on the meta device. The totals add "
             f"[flow_memory.md](flow_memory.md)'s LoRA + Adam (rank 32, an exact count: {est['lora_adam_gib']:.2f} GiB) and "
             f"its activation estimate with gradient checkpointing at 512 px ({est['activations_gib']:.2f} GiB; the "
             "student update without a discriminator), and a card fits when the total + "
             f"{CARD_RESERVE_GIB} GiB is at most its memory.", "",
             "| base | weights GiB (measured) | total GiB at 512 px | 16 GB | 24 GB |",
             "| --- | ---: | ---: | --- | --- |"]
    for kind in ("bf16", "int8", "nf4"):
        got = flux.get(kind)
        if not got or got.get("fits") is False:
            continue
        weights = got["weight_bytes"] / GiB
        total = weights + est["lora_adam_gib"] + est["activations_gib"]
        fits = lambda card: "yes" if total + CARD_RESERVE_GIB <= card * 1e9 / GiB else "no"  # noqa: E731
        lines.append(f"| {kind} | {weights:.2f} | {total:.2f} | {fits(16)} | {fits(24)} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/rapm-real-size"))
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--latent-2", type=int, default=0, help="the second latent size of the training cells "
                        "(default: each model's own, SD 1.5 64 = its published 512 px, SDXL 48)")
    parser.add_argument("--only", default="", help="comma-separated cell names to run (default: all)")
    parser.add_argument("--export-rapm", default="", metavar="TREE:LABEL", help="SD3: also export the student with "
                        "the rapm of another source tree (cell export-LABEL; e.g. a git archive of a newer commit)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--flux-weights", default="", help="also measure FLUX.1-dev's stored weights for these "
                        "bases (comma-separated: bf16, int8, nf4), into --work/flux.json; run alone, not beside "
                        "another real_size.py on the same --work")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return
    if args.export_rapm:
        global EXPORT_RAPM
        tree, _, label = args.export_rapm.rpartition(":")
        EXPORT_RAPM = (str(Path(tree).resolve()), label)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    saved = args.work / "cells.json"
    data = json.loads(saved.read_text()) if saved.is_file() else {}
    only = set(filter(None, args.only.split(",")))
    flux_file = args.work / "flux.json"
    for kind in filter(None, args.flux_weights.split(",")):
        flux = json.loads(flux_file.read_text()) if flux_file.is_file() else {}
        if kind in flux:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] flux weights {kind} ...", flush=True)
        try:
            flux[kind] = child("flux-weights", {"kind": "" if kind == "bf16" else kind}, args.work / f"flux-{kind}.log")
        except DoesNotFit as e:
            flux[kind] = json.loads(str(e))
        flux_file.write_text(json.dumps(flux, indent=1))
        print(f"[{time.strftime('%H:%M:%S')}] flux weights {kind}: {flux[kind]}", flush=True)
    if args.flux_weights:
        report(args.work, args.results, args.latent)
        return
    if not args.report_only:
        models = args.models.split(",")
        for model in models:
            (args.work / model).mkdir(exist_ok=True)
        stages = [(model, stage) for stage in (0, 1) for model in models]
        for model, stage in stages:
            for name, fn in cells(model, args.work, args.latent, args.latent_2 or MODELS[model]["latent_2"])[stage]:
                done = data.get(model, {}).get(name)
                if (done and not done.get("failed")) or (only and name not in only and name != "build"):
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {model} {name} ...", flush=True)
                crowded, need = [], CELL_MEMORY_GIB
                for _ in range(CELL_TRIES):
                    waited = wait_for_memory(need)
                    try:
                        result = fn()
                    except DoesNotFit as e:  # recorded: the figure is "more than the cap"
                        result = json.loads(str(e))
                    except Crowded as e:  # another process's memory: again, once enough is free
                        crowded.append({**json.loads(str(e)), "waited_s_before": waited})
                        need = crowded[-1]["peak_rss_mib"] / 1024 + CROWDED_MARGIN_GIB
                        print(f"[{time.strftime('%H:%M:%S')}] {model} {name}: killed by the kernel beside another "
                              f"process's memory ({crowded[-1]}); again once {need:.1f} GiB is free", flush=True)
                        continue
                    except RuntimeError as e:  # recorded and run again on a resume; the next cells go on
                        result = {"failed": True, "error": [l for l in str(e).splitlines() if l.strip()][-4:]}
                    break
                else:
                    result = {"failed": True, "error": [f"killed by the kernel {len(crowded)} times while another "
                                                        "process held the machine's memory"]}
                if crowded:
                    result["crowded_retries"] = crowded
                data.setdefault(model, {})[name] = result
                tmp = saved.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=1))
                tmp.replace(saved)
                print(f"[{time.strftime('%H:%M:%S')}] {model} {name}: {result}", flush=True)
    report(args.work, args.results, args.latent)


if __name__ == "__main__":
    main()
