"""Few-step generation: the student (or the teacher) from seeded noise, in memory or from disk.

``generate`` runs rapm's own DDIM math over the trailing coarse grid (the positions
the student was trained to hit), or diffusers' DPM-Solver++ for the teacher
baselines. The noise for seed S is what a diffusers pipeline draws for that seed at
batch 1, so a pipeline with the exported LoRA reproduces these samples.

``load_lora`` puts a LoRA file into a loaded teacher through diffusers' own loader
(the code ``pipeline.load_lora_weights`` runs), after checking that it fits.
"""

from __future__ import annotations

import json
import math

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import typer

from rapm.diffusion import coarse_timesteps, sample_positions
from rapm.errors import RapmError
from rapm.files import atomic_write
from rapm.roles import STUDENT, student_role, teacher_role
from rapm.teacher import Teacher, guided_output
from rapm.trajectories import default_guidance, initial_noise

SCHEDULERS = ("ddim", "dpmsolver")
ROLES = ("student", "teacher")
SAMPLES_NAME = "samples.jsonl"


class LoraError(RapmError):
    """A LoRA file that cannot be used with this teacher."""


def _role(teacher: Teacher, role: str):
    unet = teacher.unet
    adapters = getattr(unet, "peft_config", {})
    if role == "teacher":
        return teacher_role(unet) if adapters and getattr(unet, "_hf_peft_config_loaded", False) else nullcontext(unet)
    if role == "student":
        if STUDENT not in adapters:
            raise LoraError(
                f"{teacher.path}: the UNet carries no '{STUDENT}' adapter; load a LoRA (rapm.sample.load_lora) "
                "or add one (rapm.roles.add_roles), or sample the teacher with role='teacher'"
            )
        return student_role(unet)
    raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")


def _dpmsolver(model: Callable, teacher: Teacher, z: torch.Tensor, steps: int) -> torch.Tensor:
    """DPM-Solver++ (2nd order multistep, trailing spacing) from diffusers, on the teacher's schedule."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(
        teacher.scheduler_config, algorithm_type="dpmsolver++", timestep_spacing="trailing"
    )
    scheduler.set_timesteps(steps, device=z.device)
    z = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(z, t), t.expand(z.shape[0]))
        z = scheduler.step(out, t, z).prev_sample
    return z


@torch.no_grad()
def generate(
    teacher: Teacher,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float = 1.0,
    role: str = "student",
    scheduler: str = "ddim",
    negative_prompt: str | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """Latents [B, C, H, W] for each (prompt, seed) pair after ``steps`` sampler steps; ``teacher.decode`` makes images.

    ``ddim`` is rapm's DDIM over ``coarse_timesteps`` (trailing spacing ending at the final position);
    ``dpmsolver`` is diffusers' DPM-Solver++. ``role`` picks the student adapter or the teacher (adapters off).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
    if scheduler not in SCHEDULERS:
        raise RapmError(f"scheduler {scheduler!r} is not supported; use one of {', '.join(SCHEDULERS)}")
    timesteps = coarse_timesteps(teacher.schedule.num_train_timesteps, steps)
    device, dtype = teacher.device, teacher.dtype
    batches = []
    with _role(teacher, role):
        for start in range(0, len(prompts), batch_size):
            batch_prompts = list(prompts[start:start + batch_size])
            cond, uncond = teacher.encode_prompts(batch_prompts, negative_prompt)
            uncond = None if guidance == 1.0 else uncond
            # Drawn in float32 and cast: the same values diffusers draws in the pipeline's dtype.
            z = initial_noise(seeds[start:start + batch_size], teacher.latent_shape).to(device, dtype)

            def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return guided_output(teacher.unet, z, t, cond, uncond, guidance)

            if scheduler == "ddim":
                z = sample_positions(model, teacher.schedule, z, timesteps)[-1]
            else:
                z = _dpmsolver(model, teacher, z, steps)
            batches.append(z)
    return torch.cat(batches)


# ---------------------------------------------------------------------------------------------- LoRA files


def resolve_lora_file(lora: str | Path) -> Path:
    """A LoRA file, or the folder holding one (diffusers' ``pytorch_lora_weights.safetensors`` first)."""
    path = Path(lora).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise LoraError(f"LoRA {path} does not exist; give a .safetensors file or the folder rapm export wrote")
    preferred = path / "pytorch_lora_weights.safetensors"
    if preferred.is_file():
        return preferred
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        what = "no .safetensors file" if not found else f"{len(found)} .safetensors files ({', '.join(f.name for f in found)})"
        raise LoraError(f"LoRA folder {path} holds {what}; give the LoRA file itself")
    return found[0]


def _base_module(unet: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        module = unet.get_submodule(name)
    except AttributeError:
        return None
    return getattr(module, "base_layer", module)


def _misfit(module: torch.nn.Module, kind: str, weight: torch.Tensor) -> str | None:
    """Why a LoRA factor cannot sit on ``module`` (None when it fits)."""
    if isinstance(module, torch.nn.Linear):
        if kind == "A" and weight.shape[1:] != (module.in_features,):
            return f"LoRA takes {tuple(weight.shape[1:])} inputs, the layer has {module.in_features}"
        if kind == "B" and weight.shape[:1] != (module.out_features,):
            return f"LoRA gives {weight.shape[0]} outputs, the layer has {module.out_features}"
    elif isinstance(module, torch.nn.Conv2d):
        if kind == "A" and tuple(weight.shape[1:]) != (module.in_channels // module.groups, *module.kernel_size):
            return f"LoRA down is {tuple(weight.shape[1:])} per rank, the conv is ({module.in_channels}, {module.kernel_size})"
        if kind == "B" and weight.shape[0] != module.out_channels:
            return f"LoRA gives {weight.shape[0]} channels, the conv has {module.out_channels}"
    return None


def _as_peft_keys(unet_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' older key forms (``to_q_lora.down``, ``lora.up``) in peft's (``to_q.lora_A``), as its loader converts them."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    if unet_state and not any("lora_A" in k for k in unet_state):
        return convert_unet_state_dict_to_peft(dict(unet_state))
    return unet_state


def check_lora_fits(unet: torch.nn.Module, unet_state: dict[str, torch.Tensor]) -> list[str]:
    """Every module of a UNet LoRA (diffusers' converted keys, ``unet.`` stripped) that the UNet lacks or that has other shapes."""
    problems = []
    for key, weight in _as_peft_keys(unet_state).items():
        module_name, _, rest = key.partition(".lora_")
        if rest not in ("A.weight", "B.weight"):
            continue
        module = _base_module(unet, module_name)
        if module is None:
            problems.append(f"{module_name}: not in the teacher's UNet")
            continue
        why = _misfit(module, rest[0], weight)
        if why:
            problems.append(f"{module_name}: {why}")
    return sorted(set(problems))


def load_lora(teacher: Teacher, lora: str | Path, adapter: str = STUDENT) -> Path:
    """Load a LoRA file (diffusers or kohya layout) into the teacher as ``adapter``, as ``load_lora_weights`` does.

    The LoRA is checked against the teacher first: a LoRA for another base model gives one ``LoraError`` that
    names the file and the teacher, instead of a partial load (diffusers only warns about keys it cannot place).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    weights = resolve_lora_file(lora)
    loader = StableDiffusionXLPipeline if teacher.family == "sdxl" else StableDiffusionPipeline
    where = f"LoRA {weights} does not fit the teacher {teacher.path} ({teacher.family})"
    try:
        state, alphas, metadata = loader.lora_state_dict(
            str(weights.parent), weight_name=weights.name, unet_config=teacher.unet.config, return_lora_metadata=True,
        )
    except Exception as e:  # diffusers raises ValueError, KeyError, SafetensorError... for files it cannot read
        raise LoraError(f"LoRA {weights}: not a LoRA diffusers can read ({type(e).__name__}: {e})") from None
    if not state or not all("lora" in k for k in state):
        odd = next((k for k in state if "lora" not in k), None)
        raise LoraError(f"LoRA {weights}: not a LoRA state dict (key {odd!r}); give a diffusers or kohya LoRA file")
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise LoraError(f"{where}: it holds no UNet weights (keys start with {sorted({k.split('.')[0] for k in state})})")
    if adapter in getattr(teacher.unet, "peft_config", {}):
        raise LoraError(f"the teacher {teacher.path} already carries a '{adapter}' adapter; load LoRA {weights} into a fresh teacher")
    problems = check_lora_fits(teacher.unet, unet_state)
    if problems:
        total = len({k.partition(".lora_")[0] for k in _as_peft_keys(unet_state)})
        hint = ""
        facts = _export_facts(weights)
        if facts and facts.get("teacher_path"):
            hint = f"; it was exported for {facts['teacher_path']} ({facts.get('teacher_family')})"
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise LoraError(f"{where}: {len(problems)} of its {total} modules do not fit ({shown}){hint}; use the teacher it was trained for")
    encoders = {p: i for i, p in enumerate(("text_encoder", "text_encoder_2")) if any(k.startswith(p + ".") for k in state)}
    missing = [p for p, i in encoders.items() if i >= len(teacher.text_encoders)]
    if missing:
        raise LoraError(f"{where}: it has weights for {', '.join(missing)}, which this teacher (as loaded) does not have")
    try:
        loader.load_lora_into_unet(state, alphas, teacher.unet, adapter_name=adapter, metadata=metadata)
        for prefix, i in encoders.items():  # as load_lora_weights does, for LoRAs trained with their text encoders
            loader.load_lora_into_text_encoder(
                state, alphas, teacher.text_encoders[i], prefix=prefix, adapter_name=adapter, metadata=metadata,
            )
    except RapmError:
        raise
    except Exception as e:
        raise LoraError(f"{where}: diffusers could not load it ({type(e).__name__}: {e})") from None
    return weights


def _export_facts(weights: Path) -> dict | None:
    from rapm.export import read_export_facts

    return read_export_facts(weights)


# ---------------------------------------------------------------------------------------------- images


def to_pil(image: torch.Tensor):
    """One image [C, H, W] in [-1, 1] as a PIL image (grey for 1 channel, RGB for 3)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image [C, H, W] with 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], mode="L")
    return Image.fromarray(array, mode="RGB" if array.shape[2] == 3 else "RGBA")


def save_grid(images, path: str | Path, nrow: int = 8, padding: int = 2):
    """Save images (a tensor [B, C, H, W] in [-1, 1], or a list of such [C, H, W] tensors or PIL images) as one grid.

    ``nrow`` images a row, ``padding`` black pixels between and around them (torchvision's make_grid layout).
    """
    from PIL import Image

    pils = [im if isinstance(im, Image.Image) else to_pil(im) for im in images]
    if not pils:
        raise ValueError("save_grid needs at least one image")
    mode = "L" if all(p.mode == "L" for p in pils) else "RGB"
    pils = [p.convert(mode) for p in pils]
    w, h = max(p.width for p in pils), max(p.height for p in pils)
    ncol = min(nrow, len(pils))
    nrows = math.ceil(len(pils) / ncol)
    grid = Image.new(mode, (ncol * (w + padding) + padding, nrows * (h + padding) + padding), 0)
    for i, p in enumerate(pils):
        row, col = divmod(i, ncol)
        grid.paste(p, (padding + col * (w + padding), padding + row * (h + padding)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# ---------------------------------------------------------------------------------------------- from disk


def sample_to_folder(
    teacher: Teacher,
    prompts: Sequence[str],
    out: str | Path,
    steps: int,
    seed: int = 0,
    num_per_prompt: int = 1,
    guidance: float = 1.0,
    role: str = "student",
    scheduler: str = "ddim",
    negative_prompt: str | None = None,
    batch_size: int = 8,
    record: dict | None = None,
) -> list[dict]:
    """One PNG per prompt and seed (seeds ``seed .. seed + num_per_prompt - 1``) and ``samples.jsonl`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(i, p, seed + k) for i, p in enumerate(prompts) for k in range(num_per_prompt)]
    rows = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        latents = generate(
            teacher, [p for _, p, _ in chunk], [s for _, _, s in chunk], steps, guidance=guidance, role=role,
            scheduler=scheduler, negative_prompt=negative_prompt, batch_size=batch_size,
        )
        with torch.no_grad():
            images = teacher.decode(latents)
        for (i, prompt, s), image in zip(chunk, images):
            name = f"p{i:04d}_s{s}.png"
            to_pil(image).save(out / name)
            rows.append({"prompt": prompt, "seed": s, "file": name, **(record or {})})
    atomic_write(out / SAMPLES_NAME, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return rows


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cli(
    teacher: str = typer.Option(..., "--teacher", help="A diffusers SD/SDXL folder, or 'digits'."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="A student LoRA (file, or the folder rapm export wrote)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One prompt."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A text file with one prompt a line."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default: the LoRA's N from its rapm_lora.json, else 4)."),
    seed: int = typer.Option(0, "--seed", help="First seed; each prompt gets seeds SEED .. SEED+K-1."),
    num_per_prompt: int = typer.Option(1, "--num-per-prompt", help="Images per prompt (K)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="CFG scale (default: 1.0 with --lora, else the teacher's usual: 7.5 SD, 5.0 SDXL, 2.0 digits)."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim (rapm's trailing grid) or dpmsolver (DPM-Solver++)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt (used when guidance > 1)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per forward pass."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNGs and samples.jsonl."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
) -> None:
    """Generate images with a teacher and an optional student LoRA."""
    from rapm.export import read_export_facts
    from rapm.teacher import load_teacher

    if (prompt is None) == (prompts is None):
        raise RapmError("give exactly one of --prompt TEXT or --prompts FILE")
    if scheduler not in SCHEDULERS:
        raise RapmError(f"--scheduler {scheduler!r} is not supported; use one of {', '.join(SCHEDULERS)}")
    if num_per_prompt < 1:
        raise RapmError(f"--num-per-prompt must be at least 1, got {num_per_prompt}")
    from rapm.trajectories import read_prompts

    prompt_list = [prompt] if prompt is not None else read_prompts(prompts)
    facts = read_export_facts(resolve_lora_file(lora)) if lora is not None else None
    if steps is None:
        steps = int(facts["steps"]) if facts and "steps" in facts else 4
    t = load_teacher(teacher, device=_device(device), text_encoders=True, vae=True)
    if guidance is None:
        guidance = 1.0 if lora is not None else default_guidance(t)  # a student has guidance distilled into it
    record = {"teacher": teacher, "steps": steps, "guidance": guidance, "scheduler": scheduler}
    if lora is not None:
        weights = load_lora(t, lora)
        record["lora"] = str(weights)
        if facts and facts.get("base_unet_fingerprint"):
            from rapm.export import base_unet_fingerprint

            if facts["base_unet_fingerprint"] != base_unet_fingerprint(t.unet):
                typer.echo(f"note: {weights} was exported from another base UNet ({facts.get('teacher_path')}); "
                           "its shapes fit this teacher, so it is used anyway", err=True)
    rows = sample_to_folder(
        t, prompt_list, out, steps, seed=seed, num_per_prompt=num_per_prompt, guidance=guidance,
        role="student" if lora is not None else "teacher", scheduler=scheduler, negative_prompt=negative_prompt,
        batch_size=batch_size, record=record,
    )
    typer.echo(f"wrote {len(rows)} images and {SAMPLES_NAME} to {out}")
