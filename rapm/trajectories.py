"""Precompute and store teacher trajectories: the data RAPM trains on.

Per prompt i: the initial noise z_N drawn from seed ``seed + i`` exactly as a
diffusers pipeline draws it for that seed at batch 1, and the N+1 positions
z~_N..z~_0 at the coarse timesteps (``coarse_timesteps(T, N)``), each slot
crossed by M deterministic DDIM steps of the teacher with classifier-free
guidance (paper eq. 10; Alg. 2 line 13 reads them as z~_n). The whole fine grid is
diffusers' DDIM "trailing" grid at N*M steps, so the final position z~_0 is
what ``pipe(prompt, num_inference_steps=N*M, generator=seed)`` with a trailing
DDIMScheduler returns as latents. ``--solver dpmsolver++`` crosses each slot with
DPM-Solver++(2M) on a log-SNR-uniform grid instead: as accurate with 0.4x the teacher
passes at M = 10 (README; benchmarks/trajectory_accuracy.py).

Beside them, each slot's Δ-step z^Δ_{n+1} = DDIM(z~_{n+1}, t_{n+1}, t_{n+1} - Δ)
of the teacher with the same guidance (Alg. 2, line 8), which depends only on the
trajectory: stored, it keeps the teacher out of training (docs/design.md decision 8).
It costs no teacher pass: the slot's first substep evaluates the teacher at
(z~_{n+1}, t_{n+1}) anyway.

Positions and embeddings are computed in float32 (or ``teacher_dtype``) from
the exact noise and embeddings, then stored rounded to ``dtype``. The format
and the reader live in ``rapm.store``; this module writes.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import typer

from rapm.conditioning import FLOAT32_FIELDS
from rapm.conditioning import Conditioning
from rapm.diffusion import SOLVERS, coarse_timesteps, solve_positions
from rapm.errors import RapmError
from rapm.families import BUILTIN_NAMES, BUILTIN_TEACHERS, resolve_teacher_path
from rapm.folders import refuse_link
from rapm.plugins import teacher_file
from rapm.processes import Processes, resolve_device
from rapm.store import (DTYPES, FORMAT_VERSION, StoreError, TrajectoryStore, num_shards, open_store,
                        shard_span, unet_hash)
from rapm.store_writer import (POLL_SECONDS, check_folder, finish, is_complete, new_manifest, one_writer,
                               open_for_writing, shard_complete, span_count, wait_for_shards, write_shard)
from rapm.teacher import Teacher, guided_output, load_teacher
from rapm.text import plural, quiet_library_bars

__all__ = ["write_trajectories", "teacher_trajectories", "initial_noise", "read_prompts", "default_guidance",
           "default_delta", "TruncatedPromptWarning", "StepsWarning", "cli"]

PAPER_SUBSTEPS = 25  # M of the paper (§4): the fine grid its Δ is one step of


class TruncatedPromptWarning(UserWarning):
    """Prompts longer than the tokenizer allows; they are truncated as diffusers does."""


class StepsWarning(UserWarning):
    """N does not divide the teacher's training timesteps: diffusers' DDIM then steps off the student's grid."""


def steps_do_not_divide(num_train_timesteps: int, steps: int) -> str:
    """What N not dividing the schedule changes (the StepsWarning of rapm trajectories and rapm train)."""
    timesteps = coarse_timesteps(num_train_timesteps, steps)
    return (f"does not divide the teacher's {num_train_timesteps} training timesteps: the student is "
            f"trained on the trailing grid {timesteps[:-1]}, but diffusers' DDIMScheduler steps from t to "
            f"t - {num_train_timesteps // steps}, one timestep off that grid at some steps, so a diffusers pipeline with "
            "the exported LoRA gives slightly other images than rapm sample; for the same images in both, use a --steps "
            f"that divides {num_train_timesteps} ({', '.join(str(d) for d in range(1, 11) if num_train_timesteps % d == 0)})")


# --- the computation -------------------------------------------------------------------------------------------------

def initial_noise(seeds: Sequence[int], latent_shape: Sequence[int]) -> torch.Tensor:
    """z_N for each seed: what a diffusers pipeline draws with ``generator=torch.Generator("cpu").manual_seed(seed)`` at batch 1."""
    return torch.cat([torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def teacher_trajectories(
    teacher: Teacher, z: torch.Tensor, cond: Conditioning, uncond: Conditioning | None, guidance: float,
    timesteps: Sequence[int], substeps: int, solver: str = "ddim", delta: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's positions z~_N..z~_0 [B, N+1, C, H, W] and, with ``delta``, its Δ-steps z^Δ_{N}..z^Δ_{1}
    [B, N, C, H, W] (both float32) from noise z: ``substeps`` guided ``solver`` steps per slot (``solve_positions``).

    cond and uncond go through the UNet in one batched forward (``guided_output``);
    the positions themselves are kept in float32 whatever the UNet's dtype.
    """
    unet = teacher.unet

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_output(unet, x, t, cond, uncond, guidance)

    positions, delta_positions = solve_positions(model, teacher.schedule, z.float(), timesteps, substeps, solver, delta)
    return torch.stack(positions, dim=1), torch.stack(delta_positions, dim=1) if delta_positions else None


def default_delta(num_train_timesteps: int, steps: int, substeps: int, solver: str) -> int:
    """Δ of the stored Δ-steps unless given: one step of the DDIM fine grid, T // (N M) (what ``rapm train`` has
    always defaulted to); for DPM-Solver++, whose few steps are no fine grid, the paper's, T // (N 25)."""
    return max(1, num_train_timesteps // (steps * (substeps if solver == "ddim" else PAPER_SUBSTEPS)))


PCM = "pcm"  # ``--guidance pcm`` / ``--delta pcm``: the family's values in PCM's public code (Family.pcm_*)


def _number(text: str, flag: str, fix: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RapmError(f"{flag} {text!r} is not a number; {fix}") from None
    if not math.isfinite(value):
        raise RapmError(f"{flag} {text!r} is not a finite number; {fix}")
    return value


def guidance_range(value, teacher: Teacher) -> tuple[float, float]:
    """The teacher guidance ``rapm trajectories`` runs at, as (lo, hi): lo == hi for one fixed scale.

    ``value``: None (the teacher's default, ``default_guidance``), a number, ``"LO:HI"`` or a (lo, hi) pair (a
    range, each trajectory's guidance drawn uniformly from it, as PCM draws one per sample), or ``"pcm"`` (PCM's
    range for the teacher's family, ``Family.pcm_guidance``: SD 1.x/2.x [5, 6], SDXL [7, 8])."""
    fix = "give one number (e.g. 7.5), a range LO:HI drawn per trajectory (e.g. 5:6), or pcm"
    family = teacher.family_def
    if value is None:
        g = default_guidance(teacher)
        return g, g
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == PCM:
            own = teacher_file(teacher).get("guidance")
            if own is not None:  # a built-in teacher (digits) is no SD 1.5 even where it is of the sd family
                raise RapmError(f"--guidance pcm: PCM's range is SD 1.5's and SDXL's, and this teacher has its own "
                                f"guidance, {own}; give a number or a range LO:HI around it")
            if family.pcm_guidance is None:
                raise RapmError(f"--guidance pcm: PCM's public code trains no {family.name} teacher and gives no "
                                f"guidance for it; give a number or a range LO:HI (its default is {default_guidance(teacher)})")
            return tuple(float(x) for x in family.pcm_guidance)
        if ":" in text:
            lo_text, _, hi_text = text.partition(":")
            value = (_number(lo_text, "--guidance", fix), _number(hi_text, "--guidance", fix))
        else:
            value = _number(text, "--guidance", fix)
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise RapmError(f"--guidance {value!r}: a range has two ends, LO:HI; {fix}")
        lo, hi = (_number(str(v), "--guidance", fix) for v in value)
    else:
        lo = hi = _number(str(value), "--guidance", fix)
    if lo > hi:
        raise RapmError(f"--guidance {lo:g}:{hi:g}: the range's low end is above its high end; give LO:HI with LO <= HI")
    return lo, hi


def resolve_delta(value, teacher: Teacher) -> int | None:
    """``--delta``: None (the default, ``default_delta``), an integer, or ``"pcm"`` (PCM's Δ for the family,
    ``Family.pcm_delta``: SD 1.x/2.x 1000 // 50 = 20, SDXL 1000 // 40 = 25)."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip()
    family = teacher.family_def
    if text.lower() == PCM:
        if family.pcm_delta is None:
            raise RapmError(f"--delta pcm: PCM's public code trains no {family.name} teacher and gives no Δ for it; give "
                            "a number of teacher timesteps, or leave --delta out for the default")
        return int(family.pcm_delta)
    try:
        return int(text)
    except ValueError:
        raise RapmError(f"--delta {text!r} is not an integer number of teacher timesteps; give e.g. 20, or pcm") from None


def trajectory_guidance(manifest: dict, seeds: Sequence[int]) -> torch.Tensor | None:
    """Each trajectory's teacher guidance [B] (float32) in a store with a ``guidance_range``, drawn uniformly from
    it by the trajectory's seed (seed + i) alone, so it does not depend on batches, shards or processes; None in a
    store with one fixed guidance."""
    span = manifest.get("guidance_range")
    if not span:
        return None
    lo, hi = float(span[0]), float(span[1])
    return torch.tensor([lo + (hi - lo) * random.Random(f"rapm-guidance:{int(s)}").random() for s in seeds],
                        dtype=torch.float32)


def default_guidance(teacher: Teacher) -> float:
    """The teacher's own scale (its rapm.json, rapm.plugins: the digits teacher's), else its family's pipeline's
    (SD 7.5, SDXL 5.0)."""
    own = teacher_file(teacher).get("guidance")
    return float(own) if own is not None else float(teacher.family_def.default_guidance)


# --- inputs ----------------------------------------------------------------------------------------------------------

def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line, surrounding whitespace stripped; blank lines are skipped.

    A UTF-8 byte-order mark (Windows editors write one) is not part of the first prompt. Lines end at ``\n``
    (or ``\r\n``) only: ``str.splitlines`` would also split at ``\x0b``, ``\x0c``, ``\x1c``..``\x1e``, ``\x85``,
    ``\u2028`` and ``\u2029``, which can sit inside a prompt copied from a web page or a caption file.
    """
    path = Path(path)
    fix = "give a UTF-8 text file with one prompt a line"
    if not path.exists():
        raise StoreError(f"prompts file {path} does not exist; {fix}")
    if path.is_dir():
        raise StoreError(f"prompts file {path} is a folder; {fix}")
    if path.is_char_device() or path.is_block_device():  # /dev/zero would be read for ever
        raise StoreError(f"prompts file {path} is a device, not a text file; {fix}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # read_text would also turn a lone \r into a line end
    except UnicodeDecodeError as e:
        raise StoreError(f"{path}: not UTF-8 text ({e}); {fix}") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot be read ({e.strerror}); {fix}") from None
    # Lines end at "\n" (and "\r\n") only: str.splitlines would also split a prompt at \u2028, \x0c, \x1c ...
    prompts = [line.strip() for line in text.split("\n") if line.strip()]
    if not prompts:
        raise StoreError(f"{path}: no prompts (the file is empty or blank); {fix}")
    return prompts


def truncated_prompts(teacher: Teacher, prompts: Sequence[str]) -> list[int]:
    """Indices of prompts longer than any of the teacher's tokenizers allows (diffusers truncates them)."""
    long = set()
    for tok in teacher.tokenizers:
        for i, ids in enumerate(tok(list(prompts)).input_ids):
            if len(ids) > tok.model_max_length:
                long.add(i)
    return sorted(long)


def _teacher_label(name_or_path: str | Path) -> str:
    return str(name_or_path) if str(name_or_path) in BUILTIN_TEACHERS else str(resolve_teacher_path(name_or_path).resolve())


def _to_store(x: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    y = x.detach().to("cpu", dtype).contiguous()
    if not torch.isfinite(y).all():
        source = "the teacher produced non-finite values" if not torch.isfinite(x).all() else f"values overflow {dtype}"
        raise RapmError(f"{what}: {source}; try --teacher-dtype float32 or --dtype float32")
    return y


# --- the writer's phases ---------------------------------------------------------------------------------------------

def _check_arguments(steps: int, substeps: int, solver: str, delta: int | None, batch_size: int, shard_size: int,
                     dtype: str, teacher_dtype: str) -> None:
    """What the arguments alone can refuse, before the teacher loads."""
    for name, value in (("steps", steps), ("substeps", substeps), ("batch_size", batch_size), ("shard_size", shard_size)):
        if value < 1:
            raise RapmError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if solver not in SOLVERS:
        raise RapmError(f"--solver {solver!r} is not one of {', '.join(SOLVERS)}")
    if substeps == 1 and solver == "ddim" and delta is None:  # the default Δ, one fine step T // (N M), is the whole slot
        raise RapmError(f"--substeps 1 leaves no teacher step inside a slot: rapm train's default Δ (one step of the "
                        f"fine grid, 1000 // (N M) = {1000 // steps} timesteps at N = {steps}) would be a whole slot, "
                        "and train refuses such a store; use --substeps 2 or more (default 25), or give a shorter --delta")
    for name, value in (("dtype", dtype), ("teacher_dtype", teacher_dtype)):
        if value not in DTYPES:
            raise RapmError(f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(DTYPES)}")


def _coarse_grid(teacher_model: Teacher, steps: int, substeps: int, solver: str, delta: int | None) -> tuple[list, int]:
    """The coarse timesteps t_N..t_0 and Δ (the given one, checked, else ``default_delta`` capped at the shortest slot)."""
    schedule = teacher_model.schedule
    if schedule.is_flow and solver != "ddim":
        raise RapmError(f"--solver {solver}: a flow-matching teacher ({teacher_model.family}) takes Euler steps, "
                        "which are --solver ddim (the DDIM step of a flow schedule is the Euler step)")
    timesteps = schedule.coarse(steps)
    num_train_timesteps = schedule.num_train_timesteps
    if num_train_timesteps % steps and not schedule.is_flow:
        warnings.warn(f"--steps {steps} " + steps_do_not_divide(num_train_timesteps, steps), StepsWarning, stacklevel=4)
    fallback = default_delta(num_train_timesteps, steps, substeps, solver)
    shortest = min(t - s for t, s in zip(timesteps[:-1], timesteps[1:]))
    if schedule.is_flow:
        shortest = int(math.floor(shortest))
    delta = min(fallback, shortest) if delta is None else int(delta)
    if not 1 <= delta <= shortest:  # (rapm train needs it shorter: at Δ = the slot the Δ-step is the next position)
        raise RapmError(f"--delta {delta}: Δ must be at least 1 and at most the shortest slot ({shortest} timesteps "
                        f"at --steps {steps}); leave it out for the default, {min(fallback, shortest)}")
    return timesteps, delta


def _negative(teacher_model: Teacher, negative_prompt: str | None, guidance: float,
              store_dtype: torch.dtype) -> tuple[Conditioning, bytes]:
    """The one negative conditioning, as the pipeline builds it (SD: "" when None; SDXL: zeros when None), and its
    file's bytes."""
    from safetensors.torch import save

    _, uncond_one = teacher_model.encode_prompts([""], negative_prompt)
    uncond_one = teacher_model.family_def.with_guidance(uncond_one, guidance)  # FLUX: the same fields as cond
    negative = {k: _to_store(v, torch.float32 if k in FLOAT32_FIELDS else store_dtype, "negative prompt")
                for k, v in uncond_one.tensors().items()}
    return uncond_one, save(negative, metadata={"rapm": json.dumps({"negative_prompt": negative_prompt})})


def _check_out(out: Path, overwrite: bool, manifest: dict, prompt_list: list[str], teacher_model: Teacher,
               batch_size: int, steps: int) -> None:
    """Every process checks (read only) before any writes, so a refusal leaves the store untouched and no process
    waits."""
    check_folder(out, overwrite, manifest, prompt_list)
    need = batch_size * (steps + 2) * math.prod(teacher_model.latent_shape) * 4  # one batch of float32 positions
    if need > _memory_bytes():
        raise StoreError(f"{teacher_model.path / teacher_model.family_def.denoiser_subfolder / 'config.json'}: sample_size gives latents "
                         f"{list(teacher_model.latent_shape)}, {need / 2**30:.1f} GiB for one batch of {batch_size} "
                         f"trajectories, more than this machine's {_memory_bytes() / 2**30:.1f} GiB; check the teacher's "
                         "config, or lower --batch-size")


def _warn_truncated(teacher_model: Teacher, prompts, prompt_list: list[str]) -> list[int]:
    """The prompts longer than the tokenizers take (``truncated_prompts``), with one warning naming the first."""
    long = truncated_prompts(teacher_model, prompt_list)
    if long:
        count = len(prompt_list)
        limit = min(tok.model_max_length for tok in teacher_model.tokenizers)
        warnings.warn(f"{prompts}: {len(long)} of {plural(count, 'prompt')} {'is' if len(long) == 1 else 'are'} longer than "
                      f"the tokenizer's {limit} tokens and {'is' if len(long) == 1 else 'are'} "
                      f"truncated as diffusers does (first: line {long[0] + 1}); manifest.json lists them in "
                      "truncated_prompts", TruncatedPromptWarning, stacklevel=4)
    return long


def _manifest(teacher, teacher_model: Teacher, teacher_dtype: str, settings: dict, prompts_text: str,
              negative_bytes: bytes, long: list[int], uncond_one: Conditioning) -> dict:
    """The store's manifest.json for this teacher, incomplete (``rapm.store_writer.new_manifest``)."""
    schedule = teacher_model.schedule
    return new_manifest(
        {"path": _teacher_label(teacher), "family": teacher_model.family, "unet_hash": unet_hash(teacher_model.path),
         "dtype": teacher_dtype}, teacher_model.scheduler_config, settings, teacher_model.latent_shape,
        schedule.mu if schedule.is_flow else None, prompts_text, negative_bytes, long,
        {name: list(v.shape[1:]) for name, v in uncond_one.tensors().items()})


def _write_my_shards(out: Path, teacher_model: Teacher, prompt_list: list[str], manifest: dict, batch_size: int,
                     uncond_one: Conditioning, rank: int, world: int, show: bool) -> None:
    """This process's shards (shard k is process k % world's) that are not complete yet, with the progress bar."""
    from tqdm.auto import tqdm

    count, shard_size = manifest["count"], manifest["shard_size"]
    mine = [k for k in range(num_shards(count, shard_size)) if k % world == rank]
    todo = [k for k in mine if shard_complete(out, k, *span_count(k, shard_size, count)) is None]
    done_count = sum(span_count(k, shard_size, count)[1] for k in mine if k not in todo)
    if show and done_count:
        print(f"{out}: resuming, {len(mine) - len(todo)} of {plural(len(mine), 'shard')} of this process already complete",
              file=sys.stderr)
    bar = tqdm(total=sum(span_count(k, shard_size, count)[1] for k in mine), initial=done_count, unit="traj",
               desc="trajectories" if world == 1 else f"trajectories (process 0 of {world})", disable=not show,
               dynamic_ncols=True)
    uncond_dev = uncond_one.to(teacher_model.device)
    for k in todo:
        start, end = shard_span(k, shard_size, count)
        tensors = _shard_tensors(teacher_model, prompt_list, start, end, manifest, batch_size, uncond_dev, bar)
        write_shard(out, k, tensors, {"format_version": FORMAT_VERSION, "start": start, "count": end - start,
                                       "prompts": prompt_list[start:end], "batch_size": batch_size})
    bar.close()


def _shard_tensors(teacher_model: Teacher, prompt_list: list[str], start: int, end: int, manifest: dict,
                   batch_size: int, uncond_dev: Conditioning, bar) -> dict[str, torch.Tensor]:
    """One shard's tensors, with the settings the manifest records: its trajectories in batches of ``batch_size``
    from the shard's start, so the batches (and bytes) of a shard do not depend on the process layout."""
    m, store_dtype = manifest, DTYPES[manifest["dtype"]]
    parts: dict[str, list[torch.Tensor]] = {}
    for b0 in range(start, end, batch_size):
        b1 = min(b0 + batch_size, end)
        seeds = list(range(m["seed"] + b0, m["seed"] + b1))
        cond, _ = teacher_model.encode_prompts(prompt_list[b0:b1], m["negative_prompt"])
        per_trajectory = trajectory_guidance(m, seeds)  # a guidance range: one value per trajectory, in cond.guidance
        if per_trajectory is None:
            cond = teacher_model.family_def.with_guidance(cond, m["guidance"])  # FLUX: the guidance embedding's value
        elif teacher_model.family_def.cfg:  # CFG's scale, per sample (teacher.guided_output reads it from cond)
            cond = replace(cond, guidance=per_trajectory.to(teacher_model.device))
        else:
            cond = teacher_model.family_def.with_guidance(cond, per_trajectory)
        uncond = uncond_dev.map(lambda v: v.expand(b1 - b0, *v.shape[1:]))
        z = initial_noise(seeds, teacher_model.latent_shape).to(teacher_model.device)
        latents, delta_latents = teacher_trajectories(teacher_model, z, cond, uncond, m["guidance"], m["timesteps"],
                                                      m["substeps"], m["solver"], m["delta"])
        what = f"trajectories {b0}..{b1 - 1} (prompt {prompt_list[b0]!r})"
        batch = {"latents": _to_store(latents, store_dtype, what),
                 "delta_latents": _to_store(delta_latents, store_dtype, what)}
        for name, v in cond.tensors().items():
            batch[name] = _to_store(v, torch.float32 if name in FLOAT32_FIELDS else store_dtype, what)
        batch["seeds"] = torch.tensor(seeds, dtype=torch.int64)
        for name, v in batch.items():
            parts.setdefault(name, []).append(v)
        bar.update(b1 - b0)
    return {name: torch.cat(vs).contiguous() for name, vs in parts.items()}


# --- the writer ------------------------------------------------------------------------------------------------------

@one_writer
def write_trajectories(
    teacher: str | Path,
    prompts: str | Path,
    out: str | Path,
    steps: int = 4,
    substeps: int = 25,
    solver: str = "ddim",
    delta: int | str | None = None,
    guidance: float | str | tuple[float, float] | None = None,
    negative_prompt: str | None = None,
    seed: int = 0,
    batch_size: int = 8,
    shard_size: int = 1000,
    dtype: str = "float16",
    teacher_dtype: str = "float32",
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TrajectoryStore:
    """Compute the teacher's trajectories for every prompt and write them to the store ``out``; return it opened.

    Resumable: shards already complete are skipped, so rerunning the same call after
    an interruption ends byte-identical to an uninterrupted run (at the same batch
    size, device and thread count). Under ``accelerate launch`` shard k is written by
    process k % world and the main process writes the manifest.

    ``solver`` crosses each slot in ``substeps`` steps: ``ddim`` (the paper's, M = 25) or ``dpmsolver++``
    (DPM-Solver++(2M) on a log-SNR-uniform grid, its multistep history carried across the slots; see
    ``rapm.diffusion.solve_positions``).
    Either way each slot also stores its Δ-step, exact DDIM from z~_{n+1} with Δ = ``delta`` (default
    ``default_delta``; ``"pcm"`` PCM's for the family, ``resolve_delta``), at no extra teacher pass: the trainer then
    needs no teacher (docs/design.md decision 8).

    ``guidance``: one scale, or a range drawn per trajectory (``guidance_range``); a range is recorded in the
    manifest (``guidance_range``, and ``guidance`` its middle) and each trajectory's value in its shard (tensor
    ``guidance``), which training's teacher steps then use.
    """
    _check_arguments(steps, substeps, solver, None if delta is None else 1, batch_size, shard_size, dtype, teacher_dtype)
    out = Path(out)
    prompt_list = read_prompts(prompts)
    refuse_link(out)  # a FolderError: a store is never written through a link
    if out.exists() and not out.is_dir():
        raise StoreError(f"store {out} is a file; give a new or empty folder for --out")

    procs = Processes(cpu=not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu"))
    if device is None or (device == "cuda" and procs.world > 1):
        device = procs.device if procs.world > 1 else resolve_device("auto")
    teacher_model = load_teacher(teacher, device=device, dtype=DTYPES[teacher_dtype])
    low, high = guidance_range(guidance, teacher_model)
    guidance = (low + high) / 2  # the store's one guidance: the fixed scale, or the range's middle
    delta = resolve_delta(delta, teacher_model)
    store_dtype = DTYPES[dtype]
    count = len(prompt_list)
    timesteps, delta = _coarse_grid(teacher_model, steps, substeps, solver, delta)

    long = _warn_truncated(teacher_model, prompts, prompt_list)
    uncond_one, negative_bytes = _negative(teacher_model, negative_prompt, guidance, store_dtype)
    prompts_text = "".join(p + "\n" for p in prompt_list)
    manifest = _manifest(teacher, teacher_model, teacher_dtype, dict(
        steps=steps, substeps=substeps, solver=solver, delta=int(delta), guidance=float(guidance),
        guidance_range=(low, high), negative_prompt=negative_prompt, seed=seed, timesteps=timesteps, dtype=dtype,
        count=count, shard_size=shard_size), prompts_text, negative_bytes, long, uncond_one)

    _check_out(out, overwrite, manifest, prompt_list, teacher_model, batch_size, steps)
    procs.barrier()
    if procs.main:
        open_for_writing(out, overwrite, manifest, prompts_text, negative_bytes)
    procs.barrier()

    show = progress and procs.main
    world = procs.world
    _write_my_shards(out, teacher_model, prompt_list, manifest, batch_size, uncond_one, procs.rank, world, show)

    # No collective barrier here: it would time out (30 min) while a process with less left to do waits for the
    # others. The shards' done-records on the shared filesystem say when every process has finished;
    # under accelerate launch / torchrun a failed process stops them all.
    if procs.main:
        finish(out, manifest, wait_for_shards(out, count, shard_size, world, show))
    else:
        while not is_complete(out):
            time.sleep(POLL_SECONDS)
    return open_store(out)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**62


# --- the verb --------------------------------------------------------------------------------------------------------

def cli(
    teacher: Optional[str] = typer.Option(None, "--teacher", help=f"Teacher: a local diffusers SD/SDXL/SD3/FLUX folder, or a built-in teacher ({BUILTIN_NAMES}) (required unless --verify)."),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help="Text file, one prompt a line (required unless --verify; blank lines skipped). Prompts longer than the tokenizer's "
        "limit (77 tokens for SD/SDXL) are truncated as diffusers does, with a warning; manifest.json lists them in "
        "truncated_prompts."),
    out: Optional[Path] = typer.Option(None, "--out", help="Store folder to create, or to resume with the same settings (required unless --verify)."),
    steps: int = typer.Option(4, "--steps", help="N: coarse steps of the student; N+1 positions are stored. "
                       "An N dividing 1000 (1, 2, 4, 5, 8, 10) samples the same in diffusers."),
    substeps: int = typer.Option(25, "--substeps", help="M: teacher solver steps per coarse slot (N*M teacher passes in "
                                 "all); at least 2 with ddim."),
    solver: str = typer.Option("ddim", "--solver", help="ddim (the paper's, with M = 25) or dpmsolver++ (DPM-Solver++(2M) "
                               "across the slots: the same accuracy with fewer --substeps, see the README)."),
    delta: Optional[str] = typer.Option(None, "--delta", help="Δ of the stored Δ-step positions, in teacher timesteps, "
                                        "or pcm (PCM's: SD 20, SDXL 25). Default: 1000/(N*M) for ddim, 1000/(N*25) "
                                        "for dpmsolver++."),
    guidance: Optional[str] = typer.Option(
        None, "--guidance", help="CFG scale, diffusers' form uncond + g (cond - uncond); FLUX: its guidance embedding. "
        "A range LO:HI draws each trajectory's scale uniformly from it (PCM draws one per sample); pcm: PCM's range "
        "(SD 5:6, SDXL 7:8). Default: SD 7.5, SDXL 5.0, SD3 7.0, FLUX 3.5, digits its own."),
    negative_prompt: Optional[str] = typer.Option(
        None, "--negative-prompt", help="Default: what the pipeline does (SD: empty prompt; SDXL: zeros)."),
    seed: int = typer.Option(0, "--seed", help="Base seed: trajectory i starts from the noise that a diffusers pipeline "
                             "draws with a CPU torch.Generator seeded with seed+i."),
    batch_size: int = typer.Option(8, "--batch-size", help="Trajectories per teacher pass (each pass runs cond and uncond)."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Trajectories per shard file; shard k holds [k*S, (k+1)*S)."),
    dtype: str = typer.Option("float16", "--dtype", help="Storage dtype of latents and embeddings: float16, bfloat16, float32."),
    teacher_dtype: str = typer.Option("float32", "--teacher-dtype", help="Dtype the teacher runs in."),
    device: Optional[str] = typer.Option(None, "--device", help="Default: cuda if available, else cpu "
                                         "(under accelerate launch: each process's own device)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store written with other settings."),
    verify: Optional[Path] = typer.Option(None, "--verify", help="Only check STORE: re-hash every shard against its manifest."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (--no-progress: none, "
                                  "the libraries' neither)."),
) -> None:
    """Precompute teacher trajectories (prompts -> store), resumable; or --verify a store."""
    if not progress:
        quiet_library_bars()
    if verify is not None:
        store = open_store(verify, verify=True)
        typer.echo(f"{verify}: {plural(len(store), 'trajectory', 'trajectories')} in {plural(len(store.manifest['shards']), 'shard')}; "
                   "every sha256 matches the manifest")
        return
    missing = [flag for flag, value in (("--teacher", teacher), ("--prompts", prompts), ("--out", out)) if value is None]
    if missing:
        raise RapmError(f"rapm trajectories needs {', '.join(missing)} (or --verify STORE to check a store)")
    main_process = int(os.environ.get("RANK", "0")) == 0  # the processes are set up inside write_trajectories
    with warnings.catch_warnings():
        show_other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, (TruncatedPromptWarning, StepsWarning)):
                show_other(message, category, filename, lineno, file, line)
            elif main_process:
                typer.echo(f"warning: {message}", err=True)

        warnings.showwarning = show
        store = write_trajectories(teacher, prompts, out, steps=steps, substeps=substeps, solver=solver, delta=delta,
                                   guidance=guidance,
                                   negative_prompt=negative_prompt, seed=seed, batch_size=batch_size, shard_size=shard_size,
                                   dtype=dtype, teacher_dtype=teacher_dtype, device=device, overwrite=overwrite,
                                   progress=progress)
    if main_process:
        size = sum(s["bytes"] for s in store.manifest["shards"])
        typer.echo(f"{out}: {plural(len(store), 'trajectory', 'trajectories')}, {size / len(store):,.0f} bytes each, "
                   f"N={store.steps} M={store.substeps} {store.manifest['solver']} Δ={store.manifest['delta']} "
                   f"guidance={_guidance_text(store.manifest)}")


def _guidance_text(manifest: dict) -> str:
    """The store's guidance as the closing line shows it: the scale, or the range it was drawn from."""
    span = manifest.get("guidance_range")
    return f"U[{span[0]:g}, {span[1]:g}] per trajectory" if span else f"{manifest['guidance']:g}"
