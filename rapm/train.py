"""The training loop (paper Alg. 2 around the method's loss): fetch a stored trajectory, compute the loss,
alternate the updates, log, checkpoint. A run directory resumes to the step (DESIGN.md decision 4); its layout,
checkpoints and lock are rapm.run's.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer

from rapm import config as cfg
from rapm.config import ConfigError, TrainConfig
from rapm.discriminator import Discriminator, DiscriminatorSpec
from rapm.methods import Context, Setup, TrajectoryBatch, build_method, updates_of
from rapm.roles import (DISCRIMINATOR, STUDENT, LoraSpec, add_roles, enable_gradient_checkpointing, lora_parameters,
                        set_trainable)
from rapm.run import (CHECKPOINT_PREFIX, TMP_PREFIX, GuardedWriter, LogFile, ResumeWarning, RunError,  # noqa: F401
                      TrustWarning, check_run_dir, checkpoints, clean_stale_files, latest_checkpoint, load_checkpoint,
                      load_resume_checkpoint, load_student, prepare_run_dir, read_run_config, run_lock, save_checkpoint,
                      state_file, truncate_log)
from rapm.store import atomic_write
from rapm.teacher import load_teacher, read_model_index, resolve_teacher_path
from rapm.validation import Validation, split_indices


# ---------------------------------------------------------------------------------------------- data and RNG

def batch_positions(step: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
    """Positions in the data stream of this process's samples at iteration ``step`` (global batch = world x batch)."""
    first = (step * world + rank) * batch_size
    return list(range(first, first + batch_size))


def batch_indices(positions: list[int], count: int, seed: int) -> list[int]:
    """The trajectories at these stream positions: a fresh seeded permutation each epoch, so any step's batch is known."""
    out = []
    for pos in positions:
        epoch, i = divmod(pos, count)
        perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[i]))
    return out


def sample_generators(seed: int, positions: list[int]) -> list[torch.Generator]:
    """Each sample's noise (discriminator timesteps and renoising): a function of the seed and its stream position."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + pos) % (2**63)) for pos in positions]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- the model

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def weight_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if device.type == "cpu" or config.mixed_precision == "no":
        return torch.float32
    return torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16


def student_spec(config: TrainConfig) -> LoraSpec:
    return LoraSpec(config.lora_rank, config.lora_alpha, list(config.lora_targets))


def build_models(config: TrainConfig, device: torch.device, need_vae: bool, with_discriminator: bool):
    """The teacher's one UNet with its adapters, and the discriminator heads on it."""
    teacher = load_teacher(config.teacher, device=device, dtype=weight_dtype(config, device), text_encoders=False, vae=need_vae)
    disc_spec = LoraSpec(config.disc_lora_rank, config.disc_lora_alpha, list(config.lora_targets))
    add_roles(teacher.unet, student_spec(config), disc_spec if (with_discriminator and config.disc_lora) else None)
    for p in list(lora_parameters(teacher.unet, STUDENT).values()) + list(lora_parameters(teacher.unet, DISCRIMINATOR).values()):
        p.data = p.data.float()  # trainable weights stay float32 under mixed precision
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(teacher.unet)  # role-aware: the recompute uses the forward's adapter
    disc = None
    if with_discriminator:
        spec = DiscriminatorSpec(config.disc_levels, config.disc_heads_per_level, config.disc_kernel_size)
        disc = Discriminator(teacher.unet, spec).to(device)
    return teacher, disc


def make_optimizer(params: list[torch.nn.Parameter], lr: float, betas, weight_decay: float, use_8bit: bool):
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("config field 'use_8bit_adam': bitsandbytes is not installed; pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def constant_schedule(optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], decay: float) -> None:
    for name, p in params.items():
        ema[name].mul_(decay).add_(p.detach().float(), alpha=1 - decay)


class swap_in:
    """Temporarily load other values (the EMA) into parameters."""

    def __init__(self, params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor] | None):
        self.params, self.values, self.saved = params, values, None

    def __enter__(self):
        if self.values is not None:
            self.saved = {n: p.detach().clone() for n, p in self.params.items()}
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.values[n])

    def __exit__(self, *exc):
        if self.saved is not None:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.saved[n])


# ---------------------------------------------------------------------------------------------- processes

class Processes:
    """This process's place under ``accelerate launch`` (data parallel, batch per process), or a single process.

    Gradients are averaged by an all-reduce after each backward pass rather than by wrapping the UNet in DDP: the
    alternation trains different parameter sets on alternate steps, which DDP's fixed bucket plan does not allow.
    """

    def __init__(self):
        self.rank, self.world, self.device = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world, self.device = state.process_index, state.num_processes, state.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return (t / self.world).tolist()

    def any(self, flag: bool) -> bool:
        return self.mean([float(flag)])[0] > 0

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten().float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n


# ---------------------------------------------------------------------------------------------- the loop

def iteration_phases(updates: str, disc_every: int, with_discriminator: bool, step: int) -> tuple[str, ...]:
    """The updates iteration ``step`` makes, in order.

    ``alternate`` is Alg. 2, lines 3-4: even iterations update D1 and D2, odd ones the student. ``both`` makes every
    iteration a student update, preceded on every ``disc_every``-th one by a discriminator update on the same
    trajectory, so the student is not starved of half its updates.
    """
    if not with_discriminator:
        return ("student",)
    if updates == "alternate":
        return ("discriminator",) if step % 2 == 0 else ("student",)
    return ("discriminator", "student") if step % disc_every == 0 else ("student",)


def ema_decay_at(decay: float, warmup: bool, updates_done: int) -> float:
    """The EMA's decay after ``updates_done`` student updates; with warm-up min(decay, (1 + k) / (10 + k))."""
    return min(decay, (1 + updates_done) / (10 + updates_done)) if warmup else decay

@dataclass
class TrainResult:
    run: Path
    step: int
    checkpoint: Path | None
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when preempted


class _Preemption:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop after the current iteration; a second SIGINT stops at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, _frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _to_device(batch, device, dtype) -> TrajectoryBatch:
    """The store's batch on ``device``, in float32 whatever the weights' ``dtype``: positions and targets keep float32
    under mixed precision, and only the UNet's inputs take its dtype (``rapm.teacher.unet_output``)."""
    return batch.to(device, torch.float32)


def train(config: TrainConfig, run: Path, resume: bool = False, overwrite: bool = False, progress: bool = True,
          stop_after: int | None = None, trust_checkpoint: bool = False) -> TrainResult:
    """Train the student of ``config`` into the run directory ``run``; see rapm.run for its layout.

    One trainer per run: a second one refuses at once, naming the first. ``stop_after`` stops (with a checkpoint)
    after that many iterations in this call, as a preemption would. ``trust_checkpoint`` lets an old pickle
    checkpoint load with the full unpickler (rapm.run.load_checkpoint).
    """
    run = Path(run)
    cfg.validate(config)
    procs = Processes()
    check_run_dir(run, resume, overwrite)  # every process, reading only: an error must stop all of them
    with run_lock(run, procs.main, procs.any, lambda: check_run_dir(run, resume, overwrite)):
        return _train(config, run, procs, resume, overwrite, progress, stop_after, trust_checkpoint)


def _train(config: TrainConfig, run: Path, procs: Processes, resume: bool, overwrite: bool, progress: bool,
           stop_after: int | None, trust_checkpoint: bool) -> TrainResult:
    from tqdm.auto import tqdm

    from rapm.trajectories import open_store

    device = procs.device if (procs.world > 1 and config.device == "auto") else resolve_device(config.device)
    store = open_store(Path(config.store))
    train_ids, val_ids = split_indices(len(store), config.val_fraction, config.seed)
    delta = config.delta or store.manifest.get("delta") or max(1, 1000 // (store.steps * store.substeps))
    method = build_method(config, delta)
    min_slot = min(t - s for t, s in zip(store.timesteps[:-1], store.timesteps[1:]))
    if delta >= min_slot:
        source = ("config field 'delta'" if config.delta else "the store's delta" if store.manifest.get("delta") else
                  f"the default, one fine step, 1000 // (N M) with the store's N = {store.steps}, M = {store.substeps}")
        raise ConfigError(f"{Path(config.store) / 'manifest.json'}: Δ = {delta} timesteps ({source}) must be shorter than "
                          f"the store's shortest slot ({min_slot} timesteps; substeps M = {store.substeps}); rebuild the "
                          f"store with rapm trajectories --substeps 2 or more, or pass a smaller Δ such as --set delta={max(1, min_slot // 2)}")
    torch.manual_seed(config.seed)  # the LoRA A matrices and the heads start from the seed
    teacher, disc = build_models(config, device, need_vae=config.sample_every > 0, with_discriminator=method.uses_discriminator)
    store.check_teacher(teacher, steps=store.steps)  # the teacher, and the store's timesteps for its N
    if procs.main:  # every input is checked: only now may --overwrite delete rapm's files of the old run
        prepare_run_dir(run, resume, overwrite)
        clean_stale_files(run)
    procs.barrier()
    unet = teacher.unet
    method.prepare(Setup(unet, teacher.schedule, store, config, device, weight_dtype(config, device)))

    student_params = lora_parameters(unet, STUDENT)  # what is exported (and averaged into the EMA)
    student_trainable = {**student_params, **method.extra_parameters()}  # plus a method's own (RDD's projection head)
    opt_student = make_optimizer(list(student_trainable.values()), config.lr, config.adam_betas, config.weight_decay,
                                 config.use_8bit_adam)
    sched_student = constant_schedule(opt_student)
    disc_params: dict[str, torch.nn.Parameter] = {}
    opt_disc = sched_disc = None
    if disc is not None:
        disc_params = {**lora_parameters(unet, DISCRIMINATOR), **{f"heads.{n}": p for n, p in disc.named_parameters()}}
        opt_disc = make_optimizer(list(disc_params.values()), config.disc_lr, config.disc_betas, config.disc_weight_decay,
                                  config.use_8bit_adam)
        sched_disc = constant_schedule(opt_disc)
    ema = {n: p.detach().float().clone() for n, p in student_params.items()} if config.ema_decay > 0 else None

    start = 0
    last, state = load_resume_checkpoint(run, trust_checkpoint) if resume else (None, None)
    if last is not None:
        check_data_position(last, state.get("data", {}), data_position(config, store), config.store)
        with torch.no_grad():
            for n, p in student_params.items():
                p.copy_(state["student"][n])
            for n, p in disc_params.items():
                p.copy_(state["discriminator"][n])
        opt_student.load_state_dict(state["opt_student"])
        sched_student.load_state_dict(state["sched_student"])
        if opt_disc is not None:
            opt_disc.load_state_dict(state["opt_disc"])
            sched_disc.load_state_dict(state["sched_disc"])
        if ema is not None:
            ema = {n: v.to(device) for n, v in state["ema"].items()}
        method.load_state_dict(state.get("method") or {})
        set_rng_state(state["rng"])
        start = state["step"]
    if procs.main:  # only once the store and the checkpoint are known to fit: a refused resume changes nothing
        atomic_write(run / "config.json", json.dumps(cfg.to_dict(config), indent=2).encode())
        truncate_log(run / "logs.jsonl", start)
    procs.barrier()

    def snapshot(step: int) -> dict:
        return {
            "step": step,
            "student": {n: p.detach().cpu() for n, p in student_params.items()},
            "method": method.state_dict(),
            "discriminator": {n: p.detach().cpu() for n, p in disc_params.items()},
            "ema": {n: v.cpu() for n, v in ema.items()} if ema is not None else None,
            "opt_student": opt_student.state_dict(),
            "sched_student": sched_student.state_dict(),
            "opt_disc": opt_disc.state_dict() if opt_disc is not None else None,
            "sched_disc": sched_disc.state_dict() if sched_disc is not None else None,
            "rng": rng_state(),
            "data": data_position(config, store),
        }

    def save(step: int) -> Path:
        """The main process writes; the others wait for it, so all resume from the same checkpoint."""
        path = run / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
        if procs.main:
            path = save_checkpoint(run, step, snapshot(step), config.keep_checkpoints)
        procs.barrier()
        return path

    writer = _tensorboard(run, start) if procs.main else None
    if writer is not None and start == 0:  # the hyperparameters, as TensorBoard's text and hparams views show them
        writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(config), indent=2) + "\n```", 0)
    dtype = weight_dtype(config, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    checkpoint = last
    bar = tqdm(total=config.iterations, initial=start, disable=not (progress and procs.main), desc="train", unit="it",
               dynamic_ncols=True)
    log_file = LogFile(run / "logs.jsonl", lambda: latest_checkpoint(run)) if procs.main else None
    updates = updates_of(config)
    phases_at = lambda k: iteration_phases(updates, config.disc_every, disc is not None, k)  # noqa: E731
    student_updates = sum("student" in phases_at(k) for k in range(start))  # for the EMA's warm-up
    validation = None
    if procs.main and config.eval_every > 0 and val_ids:
        validation = Validation(teacher, store, val_ids, device, dtype, config.val_reference_steps)

    def validate(step: int) -> None:
        if validation is None or log_file is None:
            return
        tick = time.perf_counter()
        with swap_in(student_params, ema):
            values = validation(unet)
        if ema is not None:
            values["val_raw_trajectory_error"] = validation(unet)["val_trajectory_error"]
        entry = {"step": step, "phase": "validation", "trajectories": len(validation),
                 "seconds": time.perf_counter() - tick, **values}
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()
        if writer is not None:
            for k, v in values.items():
                writer.add_scalar(k if "/" in k else f"validation/{k[4:]}", v, step)
        bar.write(f"step {step}: " + ", ".join(f"{k[4:]} {v:.4g}" for k, v in values.items() if "/" not in k))

    stopped_by = None
    step = start
    try:
        with _Preemption() as preemption:
            while step < config.iterations:
                if config.eval_every > 0 and step % config.eval_every == 0:
                    validate(step)
                tick = time.perf_counter()
                positions = batch_positions(step, config.batch_size, procs.rank, procs.world)
                batch = _to_device(store.get([train_ids[i] for i in batch_indices(positions, len(train_ids), config.seed)]),
                                   device, dtype)
                ctx = Context(unet, teacher.schedule, store.timesteps, store.guidance,
                              sample_generators(config.seed, positions), disc)
                method.begin_step(step, unet)
                phases = phases_at(step)
                entry = {"step": step, "phase": "+".join(phases)}
                for phase in phases:
                    set_trainable(unet, DISCRIMINATOR if phase == "discriminator" else STUDENT)
                    if disc is not None:
                        disc.requires_grad_(phase == "discriminator")
                    params = disc_params if phase == "discriminator" else student_trainable
                    optimizer = opt_disc if phase == "discriminator" else opt_student
                    optimizer.zero_grad(set_to_none=True)
                    losses = method.discriminator_losses if phase == "discriminator" else method.generator_losses
                    record: dict[str, float] = {}
                    total = 0.0
                    with autocast:
                        for loss, logs in losses(ctx, batch):
                            loss.backward()
                            total += loss.item()
                            record.update(logs)
                    keys = sorted(record)
                    total, *values = procs.mean([total] + [record[k] for k in keys])
                    record = dict(zip(keys, values))
                    if not math.isfinite(total):  # decided on the averaged loss, so every process stops together
                        where = f"{checkpoint}" if checkpoint else "no checkpoint yet"
                        raise RunError(f"non-finite {phase} loss at step {step} ({record}); the last good checkpoint is "
                                       f"{where}; lower 'lr' or 'disc_lr' and resume with --resume")
                    procs.average_gradients(list(params.values()))
                    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
                    optimizer.step()
                    (sched_disc if phase == "discriminator" else sched_student).step()
                    if ema is not None and phase == "student":
                        update_ema(ema, student_params, ema_decay_at(config.ema_decay, config.ema_warmup, student_updates))
                    student_updates += phase == "student"
                    # One line per iteration: the student's loss is "loss"; a discriminator update beside it "disc_loss".
                    prefix = "disc_" if phase == "discriminator" and entry["phase"] != phase else ""
                    entry.update({f"{prefix}loss": total, f"{prefix}grad_norm": float(grad_norm), **record})
                step += 1
                entry["seconds"] = time.perf_counter() - tick
                if log_file is not None:
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()
                if writer is not None and (step - 1) % config.log_every == 0:
                    for k, v in entry.items():
                        if k not in ("step", "phase"):
                            name = {"loss": "loss", "grad_norm": "grad_norm", "disc_loss": "loss",
                                    "disc_grad_norm": "grad_norm"}.get(k)
                            group = "discriminator" if k.startswith("disc_") or entry["phase"] == "discriminator" else "student"
                            writer.add_scalar(f"{group}/{name}" if name else k, v, step - 1)
                    writer.add_scalar("student/lr", sched_student.get_last_lr()[0], step - 1)
                    if sched_disc is not None:
                        writer.add_scalar("discriminator/lr", sched_disc.get_last_lr()[0], step - 1)
                bar.set_postfix({entry["phase"][:4]: f"{entry['loss']:.4f}"}, refresh=False)
                bar.update(1)
                if step % config.checkpoint_every == 0 or step == config.iterations:
                    checkpoint = save(step)
                if procs.main and config.sample_every > 0 and (step % config.sample_every == 0 or step == config.iterations):
                    with swap_in(student_params, ema):
                        grid = sample_grid(teacher, store, run / "samples" / f"step-{step:08d}.png", config.num_samples,
                                           device, dtype)
                    _tensorboard_image(writer, "samples/student_top_teacher_bottom", grid, step)
                stop = preemption.signal_name is not None or (stop_after is not None and step - start >= stop_after)
                if procs.any(stop):
                    stopped_by = preemption.signal_name or ("SIGTERM" if stop_after is None else "stop_after")
                    if checkpoint is None or not checkpoint.name.endswith(f"{step:08d}"):
                        checkpoint = save(step)
                    break
            if step == config.iterations and config.eval_every > 0:
                validate(step)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
        if writer is not None:
            writer.close()
    return TrainResult(run, step, checkpoint, stopped_by)


def data_position(config: TrainConfig, store) -> dict:
    """What fixes the data stream a checkpoint's step counts in: a resume must see the same."""
    return {"seed": config.seed, "batch_size": config.batch_size, "count": len(store), "steps": store.steps,
            "val_fraction": config.val_fraction}


def check_data_position(checkpoint: Path, saved: dict, current: dict, store: str) -> None:
    """Refuse a resume whose data stream differs from the checkpoint's (its step would count other samples)."""
    saved = {"val_fraction": 0.0, **saved}  # checkpoints from before the validation split held nothing out
    for field, value in saved.items():
        if field in current and current[field] != value:
            what = {"count": f"the store's trajectory count ({store})",
                    "steps": f"the store's N, manifest field 'steps' ({store})"}.get(field, f"config field {field!r}")
            raise RunError(f"{state_file(checkpoint)}: {what} was {value} when it was written but is {current[field]} "
                           f"now; resume with the run's own store and settings, or start a new run in another --out")


def _tensorboard(run: Path, start: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: logs.jsonl has everything
        return None
    try:
        writer = SummaryWriter(str(run / "tensorboard"), purge_step=start)
    except OSError as e:
        raise RunError(f"{run / 'tensorboard'}: cannot be written ({e.strerror or e}); free space and resume with --resume") from None
    return GuardedWriter(writer, run / "tensorboard", lambda: latest_checkpoint(run))


@torch.no_grad()
def sample_grid(teacher, store, path: Path, count: int, device, dtype) -> Path:
    """Top row: the student's N steps from the stored noise; bottom row: the stored teacher end point."""
    from rapm.methods.base import student_trajectory
    from rapm.sample import save_grid

    count = min(count, len(store))
    batch = _to_device(store.get(list(range(count))), device, dtype)
    ctx = Context(teacher.unet, teacher.schedule, store.timesteps, store.guidance, sample_generators(0, list(range(count))))
    student_end = student_trajectory(ctx, batch.latents[:, 0], batch.cond)[:, -1]
    images = teacher.decode(torch.cat([student_end, batch.latents[:, -1]]))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_grid(images.float().cpu(), path, nrow=count)


def _tensorboard_image(writer, tag: str, png: Path, step: int) -> None:
    """A saved grid into TensorBoard's images tab (shown at 4x: a 16x16 digit is unreadable at 1x)."""
    if writer is None:
        return
    from PIL import Image

    with Image.open(png) as im:
        im = im.convert("RGB")
        scale = max(1, min(4, 512 // max(im.width, 1)))
        arr = np.asarray(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
    writer.add_image(tag, arr, step, dataformats="HWC")


# ---------------------------------------------------------------------------------------------- after training

def resolve_config(teacher: str, store: str, preset: str | None, config_file: Path | None, flags: dict) -> TrainConfig:
    """Preset (by teacher family unless named) < config file < command-line flags."""
    values = cfg.read_config_file(Path(config_file)) if config_file else {}
    teacher = flags.get("teacher") or values.get("teacher") or teacher
    family = "sdxl" if read_model_index(resolve_teacher_path(teacher))["_class_name"].startswith("StableDiffusionXL") else "sd"
    name = preset or values.get("preset") or cfg.default_preset(teacher, family)
    if name not in cfg.PRESETS:
        raise ConfigError(f"preset {name!r} is not one of {', '.join(cfg.PRESETS)}")
    config = cfg.apply_overrides(TrainConfig(), {**cfg.PRESETS[name], "preset": name}, f"preset {name}")
    if config_file:
        config = cfg.apply_overrides(config, values, str(config_file))
    return cfg.apply_overrides(config, {"teacher": teacher, "store": store, **flags}, "command line")


def cli(
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints, logs, samples)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher: a local diffusers folder or 'digits'."),
    store: Optional[Path] = typer.Option(None, help="Trajectory store made by `rapm trajectories`."),
    method: Optional[str] = typer.Option(None, help="rapm (default), rapm-relative, sfd, pcm, progressive or progressive-rdd."),
    preset: Optional[str] = typer.Option(None, help="sd15, sdxl, sdxl-rank1 or digits (default: by teacher)."),
    config: Optional[Path] = typer.Option(None, help="A JSON or TOML file of config fields (docs/defaults.md)."),
    iterations: Optional[int] = typer.Option(None, help="Total iterations (each one trajectory batch)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Write a checkpoint every K iterations."),
    batch_size: Optional[int] = typer.Option(None, help="Trajectories per iteration (paper: 1)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the data order and the discriminator noise."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1 ..."),
    set_: list[str] = typer.Option([], "--set", help="Any config field, as key=value (repeatable)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last complete checkpoint."),
    overwrite: bool = typer.Option(False, help="Start over in an --out that already holds a run (rapm's files only)."),
    trust_checkpoint: bool = typer.Option(False, help="Resume from an old pickle state.pt that weights_only loading "
                                          "refuses; it can run code: only for a run you made."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train the student LoRA on a trajectory store (store -> run)."""
    flags = {k: v for k, v in dict(method=method, iterations=iterations, checkpoint_every=checkpoint_every,
                                   batch_size=batch_size, seed=seed, device=device).items() if v is not None}
    flags.update(cfg.parse_set(set_))
    if resume:
        config_obj = cfg.apply_overrides(read_run_config(out), flags, "command line")
    else:
        if teacher is None or store is None:
            raise ConfigError("rapm train needs --teacher and --store (or --resume with an existing --out)")
        config_obj = resolve_config(teacher, str(store), preset, config, flags)
    result = train(config_obj, out, resume=resume, overwrite=overwrite, progress=progress, trust_checkpoint=trust_checkpoint)
    if os.environ.get("RANK", "0") != "0":  # under a multi-process launch the main process speaks for all
        raise typer.Exit(0 if result.stopped_by is None else 143)
    if result.stopped_by in ("SIGTERM", "SIGINT"):
        typer.echo(f"stopped by {result.stopped_by} after step {result.step}; checkpoint {result.checkpoint}. "
                   f"Resume with: rapm train --out {out} --resume", err=True)
        raise typer.Exit(130 if result.stopped_by == "SIGINT" else 143)
    typer.echo(f"trained {result.step} iterations; last checkpoint {result.checkpoint}. "
               f"Export with: rapm export --run {out} --out {out}/lora")
