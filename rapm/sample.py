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

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import typer

from rapm.diffusion import sample_positions
from rapm.errors import RapmError
from rapm.families import BUILTIN_NAMES
from rapm.folders import FolderLock, commit, discard, refuse_link, stage
from rapm.images import to_pil
from rapm.lora import LoraError, base_unet_fingerprint, load_lora, read_export_facts, resolve_lora_file
from rapm.processes import resolve_device
from rapm.roles import STUDENT, student_role, teacher_role
from rapm.run import check_teacher_weights
from rapm.teacher import Teacher, guided_output, load_teacher
from rapm.text import plural, quiet_library_bars
from rapm.trajectories import default_guidance, initial_noise, read_prompts

SCHEDULERS = ("ddim", "dpmsolver")
ROLES = ("student", "teacher")
SAMPLES_NAME = "samples.jsonl"


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
    bar=None,
) -> torch.Tensor:
    """Latents [B, C, H, W] for each (prompt, seed) pair after ``steps`` sampler steps; ``teacher.decode`` makes images.

    ``ddim`` is rapm's DDIM over ``coarse_timesteps`` (trailing spacing ending at the final position);
    ``dpmsolver`` is diffusers' DPM-Solver++. ``role`` picks the student adapter or the teacher (adapters off).
    ``bar``: a tqdm bar advanced by each batch's images.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
    if scheduler not in SCHEDULERS:
        raise RapmError(f"scheduler {scheduler!r} is not supported; use one of {', '.join(SCHEDULERS)}")
    timesteps = teacher.schedule.coarse(steps)
    if scheduler != "ddim" and teacher.schedule.is_flow:
        raise RapmError(f"scheduler {scheduler!r} is for DDPM teachers; a flow-matching teacher samples with ddim "
                        "(its Euler steps on the trailing σ)")
    device, dtype = teacher.device, teacher.dtype
    batches = []
    with _role(teacher, role):
        for start in range(0, len(prompts), batch_size):
            batch_prompts = list(prompts[start:start + batch_size])
            cond, uncond = teacher.encode_prompts(batch_prompts, negative_prompt)
            cond = teacher.family_def.with_guidance(cond, guidance)  # FLUX.1-dev: the guidance embedding's value
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
            if bar is not None:
                bar.update(len(batch_prompts))
    return torch.cat(batches)


# ---------------------------------------------------------------------------------------------- from disk


def sample_to_folder(teacher: Teacher, prompts: Sequence[str], out: str | Path, steps: int, seed: int = 0,
                     num_per_prompt: int = 1, guidance: float = 1.0, role: str = "student", scheduler: str = "ddim",
                     negative_prompt: str | None = None, batch_size: int = 8, record: dict | None = None,
                     progress: bool = False) -> list[dict]:
    """One PNG per prompt and seed (seeds ``seed .. seed + num_per_prompt - 1``) and ``samples.jsonl`` in ``out``.

    The set is written as evaluate's is (docs/design.md decision 9): each PNG whole beside its final name, then all
    renamed into place with ``samples.jsonl`` last, which records each PNG's sha256; a kill or a full disk leaves
    the previous set. One writer per folder (``out/.rapm-lock``); an ``out`` that is a link, or a link where a file
    of the set goes, is refused before anything is generated.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    pairs = [(i, p, seed + k) for i, p in enumerate(prompts) for k in range(num_per_prompt)]
    names = [f"p{i:04d}_s{s}.png" for i, _, s in pairs]
    refuse_link(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only parent, a file in the way
        raise RapmError(f"--out {out}: cannot be created ({e.strerror or e}); give a writable folder") from None
    with FolderLock(out, "rapm sample"):
        for name in [*names, SAMPLES_NAME]:
            refuse_link(out / name, "samples")
        rows, staged = [], []
        bar = tqdm(total=len(pairs), desc="sample", unit="image", disable=not progress, dynamic_ncols=True)
        try:
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                latents = generate(
                    teacher, [p for _, p, _ in chunk], [s for _, _, s in chunk], steps, guidance=guidance, role=role,
                    scheduler=scheduler, negative_prompt=negative_prompt, batch_size=batch_size, bar=bar,
                )
                with torch.no_grad():
                    images = teacher.decode(latents)
                for (i, prompt, s), image in zip(chunk, images):
                    name = f"p{i:04d}_s{s}.png"
                    png = stage(out / name, lambda tmp, image=image: to_pil(image).save(tmp, format="PNG"), "samples")
                    staged.append(png)
                    rows.append({"prompt": prompt, "seed": s, "file": name, **(record or {}), "sha256": png.sha256})
            staged.append(stage(out / SAMPLES_NAME, "".join(json.dumps(r) + "\n" for r in rows).encode(), "samples"))
        except BaseException:
            discard(staged)
            raise
        finally:
            bar.close()
        commit(staged)
    return rows


PROMPT_CHARACTERS = 10_000  # far beyond what a text encoder reads (CLIP 77 tokens, T5 512): a longer line is no prompt


def read_prompt_file(path: Path) -> list[str]:
    """``rapm.trajectories.read_prompts`` (UTF-8, one prompt a line, CRLF too, blank lines skipped), and a file that
    is not one prompt a line refused before the teacher loads: a NUL byte (a UTF-16 or binary file) or a line longer
    than PROMPT_CHARACTERS (a tokenizer takes minutes over 50 MB, and reads only its first few hundred characters)."""
    prompts = read_prompts(path)
    for i, p in enumerate(prompts):
        if "\0" in p:
            raise RapmError(f"{path}: prompt {i + 1} holds a NUL byte: not a UTF-8 text file (UTF-16, or binary?); "
                            "save it as UTF-8 text with one prompt a line")
        if len(p) > PROMPT_CHARACTERS:
            raise RapmError(f"{path}: prompt {i + 1} is {len(p):,} characters long; a prompt is at most "
                            f"{PROMPT_CHARACTERS:,} (the text encoders read its first few hundred): put one prompt a line")
    return prompts


def cli(
    teacher: str = typer.Option(..., "--teacher", help=f"A diffusers SD/SDXL/SD3/FLUX folder, or a built-in teacher ({BUILTIN_NAMES})."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="A student LoRA (file, or the folder rapm export wrote)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One prompt (this or --prompts is required)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A text file with one prompt a line (this or --prompt is required)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default: the LoRA's N from its rapm_lora.json, else 4)."),
    seed: int = typer.Option(0, "--seed", help="First seed; each prompt gets seeds SEED .. SEED+K-1."),
    num_per_prompt: int = typer.Option(1, "--num-per-prompt", help="Images per prompt (K)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="CFG scale (default: 1.0 with --lora, else the teacher's own: 7.5 SD, 5.0 SDXL, 1.5 digits)."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim (rapm's trailing grid) or dpmsolver (DPM-Solver++)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt (used when guidance > 1)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per forward pass."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNGs and samples.jsonl."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar per image "
                                  "(--no-progress: none, the libraries' neither)."),
) -> None:
    """Generate images with a teacher and an optional student LoRA."""
    if not progress:
        quiet_library_bars()
    if (prompt is None) == (prompts is None):
        raise RapmError("give exactly one of --prompt TEXT or --prompts FILE")
    if scheduler not in SCHEDULERS:
        raise RapmError(f"--scheduler {scheduler!r} is not supported; use one of {', '.join(SCHEDULERS)}")
    if num_per_prompt < 1:
        raise RapmError(f"--num-per-prompt must be at least 1, got {num_per_prompt}")
    prompt_list = [prompt] if prompt is not None else read_prompt_file(prompts)
    facts = read_export_facts(resolve_lora_file(lora)) if lora is not None else None
    if steps is None:
        steps = int(facts["steps"]) if facts and "steps" in facts else 4
    check_teacher_weights(teacher)
    t = load_teacher(teacher, device=resolve_device(device), text_encoders=True, vae=True)
    if guidance is None:
        # a student has guidance distilled into it (CFG 1); a FLUX student keeps the guidance embedding it was trained at
        guidance = float(((facts or {}).get("scheduler") or {}).get("guidance_scale", 1.0)) if lora is not None else default_guidance(t)
    record = {"teacher": teacher, "steps": steps, "guidance": guidance, "scheduler": scheduler}
    if lora is not None:
        weights = load_lora(t, lora)
        record["lora"] = str(weights)
        if facts and facts.get("base_unet_fingerprint"):
            if facts["base_unet_fingerprint"] != base_unet_fingerprint(t.unet):
                typer.echo(f"note: {weights} was exported from another base UNet ({facts.get('teacher_path')}); "
                           "its shapes fit this teacher, so it is used anyway", err=True)
    rows = sample_to_folder(
        t, prompt_list, out, steps, seed=seed, num_per_prompt=num_per_prompt, guidance=guidance,
        role="student" if lora is not None else "teacher", scheduler=scheduler, negative_prompt=negative_prompt,
        batch_size=batch_size, record=record, progress=progress,
    )
    typer.echo(f"wrote {plural(len(rows), 'image')} and {SAMPLES_NAME} to {out}")
