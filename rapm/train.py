"""The training loop (paper Alg. 2 around the method's loss): fetch a stored trajectory, compute the loss,
alternate the updates, log, checkpoint. A run directory resumes to the step (docs/design.md decision 4); its layout,
checkpoints and lock are rapm.run's, the models rapm.models', the data stream rapm.stream's, the reports
rapm.monitor's.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import typer

from rapm import config as cfg
from rapm.config import ConfigError, TrainConfig, split_seed
from rapm.diffusion import schedule_from_config
from rapm.discriminator import ABSOLUTE_BACKBONE
from rapm.families import BUILTIN_NAMES, read_teacher_info
from rapm.files import atomic_write
from rapm.methods import FLOW_METHODS, METHODS, build_method, method_entry, resolve
from rapm.methods.base import Context, Setup
from rapm.models import (build_models, ema_decay_at, lr_factor, lr_schedule, make_optimizer, swap_in, update_ema,
                         weight_dtype)
from rapm.monitor import Monitor, Previews
from rapm.processes import Processes, resolve_device
from rapm.roles import DISCRIMINATOR, STUDENT, lora_parameters, set_trainable
from rapm.run import (CHECKPOINT_PREFIX, ResumeWarning, RunError, TrainState, check_data_position, check_run_dir,
                      clean_stale_files, data_position, load_resume_checkpoint, prepare_run_dir, read_run_config,
                      run_lock, save_checkpoint, truncate_log)
from rapm.store import TrajectoryBatch, open_store
from rapm.stream import batch_indices, batch_positions, sample_generators
from rapm.text import plural, quiet_library_bars
from rapm.trajectories import StepsWarning, steps_do_not_divide
from rapm.validation import Validation, ValidationWarning, held_out_note, split_indices


# ---------------------------------------------------------------------------------------------- the phases

def iteration_phases(updates: str, disc_every: int, with_discriminator: bool, step: int) -> tuple[str, ...]:
    """The updates iteration ``step`` makes, in order.

    ``alternate`` is Alg. 2, lines 17-21: even iterations update D1 and D2, odd ones the student. ``both`` makes every
    iteration a student update, preceded on every ``disc_every``-th one by a discriminator update on the same
    trajectory, so the student is not starved of half its updates.
    """
    if not with_discriminator:
        return ("student",)
    if updates == "alternate":
        return ("discriminator",) if step % 2 == 0 else ("student",)
    return ("discriminator", "student") if step % disc_every == 0 else ("student",)


@dataclass
class Phase:
    """One update of Alg. 2: which adapter trains, its parameters, optimizer and schedule, and the method's losses."""

    name: str  # "student" or "discriminator"
    adapter: str  # the UNet adapter that trains (rapm.roles)
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    losses: Callable  # (ctx, batch) -> yields (loss, logs)


def phase_cycle(phases: dict[str, Phase], updates: str, disc_every: int) -> list[tuple[Phase, ...]]:
    """The updates of iterations 0, 1, ..., one period of ``iteration_phases``: iteration k makes
    ``cycle[k % len(cycle)]``."""
    with_disc = "discriminator" in phases
    period = 1 if not with_disc else 2 if updates == "alternate" else disc_every
    return [tuple(phases[n] for n in iteration_phases(updates, disc_every, with_disc, k)) for k in range(period)]


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


def training_batch(batch: TrajectoryBatch, device) -> TrajectoryBatch:
    """The store's batch on ``device``, in float32 whatever the weights' dtype: positions and targets keep float32
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


def _delta(config: TrainConfig, store) -> int:
    """Δ of the teacher's Δ-step: the config's, else the store's, else one fine step; shorter than every slot."""
    delta = config.delta or store.manifest.get("delta") or max(1, 1000 // (store.steps * store.substeps))
    min_slot = min(t - s for t, s in zip(store.timesteps[:-1], store.timesteps[1:]))
    if delta >= min_slot:
        source = ("config field 'delta'" if config.delta else "the store's delta" if store.manifest.get("delta") else
                  f"the default, one fine step, 1000 // (N M) with the store's N = {store.steps}, M = {store.substeps}")
        raise ConfigError(f"{Path(config.store) / 'manifest.json'}: Δ = {delta} timesteps ({source}) must be shorter than "
                          f"the store's shortest slot ({min_slot} timesteps; substeps M = {store.substeps}); rebuild the "
                          f"store with rapm trajectories --substeps 2 or more, or pass a smaller Δ such as --set delta={max(1, min_slot // 2)}")
    return delta


def _warn_if_schedule_stretches(config_file: Path, config: TrainConfig, start: int) -> None:
    """A step or cosine schedule is spread over config.iterations: resuming to another total moves the LR."""
    try:
        before = json.loads(config_file.read_text()).get("iterations")
    except (OSError, ValueError):
        return
    if before and before != config.iterations:
        was, now = lr_factor(config.lr_schedule, start, before), lr_factor(config.lr_schedule, start, config.iterations)
        warnings.warn(f"{config_file}: the run was scheduled over {plural(before, 'iteration')} and resumes over "
                      f"{config.iterations}; lr_schedule {config.lr_schedule!r} is spread over the new total, so the LR "
                      f"at step {start} goes from {was:.3g} to {now:.3g} of 'lr'", ResumeWarning, stacklevel=3)


def build_phases(config: TrainConfig, unet, disc, method) -> dict[str, Phase]:
    """The student's phase and, with a discriminator, the discriminator's: built once, before the loop."""
    student = {**lora_parameters(unet, STUDENT), **method.extra_parameters()}  # plus a method's own (RDD's head)
    opt = make_optimizer(list(student.values()), config.lr, config.adam_betas, config.weight_decay, config.use_8bit_adam)
    cycle = [iteration_phases(method.updates, config.disc_every, disc is not None, k) for k in range(2 * config.disc_every)]
    per_iteration = {name: sum(name in c for c in cycle) / len(cycle) for name in ("student", "discriminator")}

    def schedule(optimizer, phase: str):  # over the updates this phase makes in config.iterations
        return lr_schedule(optimizer, config.lr_schedule, max(1, round(config.iterations * per_iteration[phase])))

    phases = {"student": Phase("student", STUDENT, student, opt, schedule(opt, "student"), method.generator_losses)}
    if disc is not None:
        params = {**lora_parameters(unet, DISCRIMINATOR), **lora_parameters(unet, ABSOLUTE_BACKBONE),  # separate: D2's
                  **{f"heads.{n}": p for n, p in disc.named_parameters()}}
        opt = make_optimizer(list(params.values()), config.disc_lr, config.disc_betas, config.disc_weight_decay,
                             config.use_8bit_adam)
        phases["discriminator"] = Phase("discriminator", DISCRIMINATOR, params, opt, schedule(opt, "discriminator"),
                                        method.discriminator_losses)
    return phases


def run_phase(phase: Phase, ctx: Context, batch, unet, disc, procs: Processes, autocast, grad_clip: float,
              step: int, checkpoint) -> tuple[float, float, dict[str, float]]:
    """One update (Alg. 2: the loss of lines 5-16, then the step of line 18 or 20): back-propagate each loss piece, average across processes, clip,
    step; returns the averaged loss, the gradient norm and the method's logs."""
    set_trainable(unet, phase.adapter)
    for p in phase.params.values():  # and any other adapter the phase trains (separate backbones: D2's LoRA)
        p.requires_grad_(True)
    if disc is not None:
        disc.requires_grad_(phase.name == "discriminator")
    phase.optimizer.zero_grad(set_to_none=True)
    record: dict[str, float] = {}
    total = 0.0
    with autocast:
        for loss, logs in phase.losses(ctx, batch):
            loss.backward()
            total += loss.item()
            record.update(logs)
    keys = sorted(record)
    total, *values = procs.mean([total] + [record[k] for k in keys])
    record = dict(zip(keys, values))
    if not math.isfinite(total):  # decided on the averaged loss, so every process stops together
        where = f"{checkpoint}" if checkpoint else "no checkpoint yet"
        raise RunError(f"non-finite {phase.name} loss at step {step} ({record}); the last good checkpoint is "
                       f"{where}; lower 'lr' or 'disc_lr' and resume with --resume")
    params = list(phase.params.values())
    procs.average_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    phase.optimizer.step()
    phase.scheduler.step()
    return total, float(grad_norm), record


def _check_method_applies(config: TrainConfig, store) -> None:
    """Refuse, by name and reason, a method that does not apply to a flow-matching teacher's store."""
    if not schedule_from_config(store.manifest["scheduler"]).is_flow:
        return
    why = method_entry(config.method).cls.flow
    if why is not None:
        raise ConfigError(f"config field 'method': {config.method!r} does not apply to a flow-matching teacher "
                          f"({store.family}): {why}; use {', '.join(FLOW_METHODS[:-1])} or {FLOW_METHODS[-1]}")
    if config.rdd_weight > 0:
        raise ConfigError(f"config field 'rdd_weight': RDD's relational term reads UNet features and is not wired for a "
                          f"flow-matching teacher ({store.family}); set rdd_weight=0")


def _split(config: TrainConfig, store, main: bool) -> tuple[list[int], list[int]]:
    """The training and held-out trajectories of ``store`` (``val_fraction``, ``train_trajectories``); a warning when
    validation is off because the store is too small to hold any out."""
    train_ids, val_ids = split_indices(len(store), config.val_fraction, split_seed(config))
    note = held_out_note(len(store), config.val_fraction) if config.eval_every > 0 else None
    if note is not None and main:
        warnings.warn(f"{config.store}: {note}", ValidationWarning, stacklevel=4)
    if config.train_trajectories:
        if config.train_trajectories > len(train_ids):
            raise ConfigError(f"config field 'train_trajectories': {config.train_trajectories} is more than the "
                              f"{len(train_ids)} training trajectories of {config.store} (after val_fraction "
                              f"{config.val_fraction}); use 0 for all of them")
        train_ids = train_ids[:config.train_trajectories]
    return train_ids, val_ids


def _warn_if_steps_do_not_divide(config: TrainConfig, teacher, store) -> None:
    if teacher.schedule.num_train_timesteps % store.steps and not teacher.schedule.is_flow:
        warnings.warn(f"{Path(config.store) / 'manifest.json'}: the store's N = {store.steps} (rapm trajectories "
                      f"--steps) " + steps_do_not_divide(teacher.schedule.num_train_timesteps, store.steps),
                      StepsWarning, stacklevel=4)


def _ema(config: TrainConfig, method) -> tuple[float, bool]:
    ema_decay, ema_warmup = method.ema_decay, method.ema_warmup
    if config.relative_target == "ema" and ema_decay <= 0:
        raise ConfigError(f"config field 'relative_target': 'ema' needs an EMA, and method {config.method!r} keeps none "
                          "by default; set ema_decay (such as 0.99)")
    return ema_decay, ema_warmup


def _state(phases: dict, student_params: dict, ema_decay: float, method) -> TrainState:
    """What a checkpoint holds: the parameters, the EMA (a copy of the student when the run keeps one), optimizers."""
    ema = {n: p.detach().float().clone() for n, p in student_params.items()} if ema_decay > 0 else None
    disc = phases.get("discriminator")
    return TrainState(student_params, disc.params if disc else {}, ema, phases["student"].optimizer,
                      phases["student"].scheduler, disc and disc.optimizer, disc and disc.scheduler, method)


def _resume(run: Path, resume: bool, trust_checkpoint: bool, state: TrainState, config: TrainConfig, store, device):
    """(the step to start at, the checkpoint resumed from or None, when the run first started) after restoring
    ``state`` from the run's last checkpoint when ``resume``."""
    start = 0
    last, saved = load_resume_checkpoint(run, trust_checkpoint) if resume else (None, None)
    if last is not None:
        check_data_position(last, saved.get("data", {}), data_position(config, store), config.store)
        start = state.restore(saved, device)
    # when the run first started (sd-scripts' ss_training_started_at in the export): a resume keeps the first start;
    # a checkpoint written before rapm recorded it leaves it unknown
    started_at = saved.get("training_started_at") if last is not None else time.time()
    if last is not None and config.lr_schedule != "constant":
        _warn_if_schedule_stretches(run / "config.json", config, start)
    return start, last, started_at


def _seed(seed: int) -> None:
    """The LoRA A matrices and the heads start from the seed; Python's and numpy's generators too (as accelerate's
    set_seed), so a checkpoint, which holds all three, is the same bytes for the same run (benchmarks/faults.py)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _train(config: TrainConfig, run: Path, procs: Processes, resume: bool, overwrite: bool, progress: bool,
           stop_after: int | None, trust_checkpoint: bool) -> TrainResult:
    device = procs.device if (procs.world > 1 and config.device == "auto") else resolve_device(config.device)
    dtype = weight_dtype(config, device)
    config = resolve(config)  # the method's own settings, written into config.json: a resume keeps them
    store = open_store(Path(config.store))
    _check_method_applies(config, store)
    train_ids, val_ids = _split(config, store, procs.main)
    method = build_method(config, _delta(config, store))
    ema_decay, ema_warmup = _ema(config, method)
    _seed(config.seed)
    teacher, disc = build_models(config, device, need_vae=config.sample_every > 0, with_discriminator=method.uses_discriminator)
    store.check_teacher(teacher, steps=store.steps)  # the teacher, and the store's timesteps for its N
    if procs.main:
        _warn_if_steps_do_not_divide(config, teacher, store)
    if procs.main:  # every input is checked: only now may --overwrite delete rapm's files of the old run
        prepare_run_dir(run, resume, overwrite)
        clean_stale_files(run)
    procs.barrier()
    unet = teacher.unet
    method.prepare(Setup(unet, teacher.schedule, store, device, dtype))
    phases = build_phases(config, unet, disc, method)
    student_params = lora_parameters(unet, STUDENT)  # what is exported (and averaged into the EMA)
    state = _state(phases, student_params, ema_decay, method)
    start, last, started_at = _resume(run, resume, trust_checkpoint, state, config, store, device)
    if procs.main:  # only once the store and the checkpoint are known to fit: a refused resume changes nothing
        atomic_write(run / "config.json", json.dumps(cfg.to_dict(config), indent=2).encode())
        truncate_log(run / "logs.jsonl", start)
    procs.barrier()

    def save(step: int) -> Path:
        """The main process writes; the others wait for it, so all resume from the same checkpoint."""
        path = run / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
        if procs.main:
            snapshot = state.snapshot(step, data_position(config, store))
            if started_at is not None:
                snapshot["training_started_at"] = started_at
            path = save_checkpoint(run, step, snapshot, config.keep_checkpoints)
        procs.barrier()
        return path

    validation = None
    if procs.main and config.eval_every > 0 and val_ids:
        validation = Validation(teacher, store, val_ids, device, dtype, config.val_reference_steps)
    monitor = Monitor(run, config, procs.main, start, progress, validation, student_params, lambda: state.ema)
    previews = (Previews(config, unet, store, device, dtype)
                if procs.main and config.sample_prompts and config.sample_every > 0 else None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    cycle = phase_cycle(phases, method.updates, config.disc_every)
    student_updates = sum(phases["student"] in cycle[k % len(cycle)] for k in range(start))  # for the EMA's warm-up
    schedulers = {p.name: p.scheduler for p in phases.values()}
    frozen_student = (lambda: swap_in(student_params, state.ema)) if config.relative_target == "ema" else None
    checkpoint, stopped_by, step = last, None, start
    try:
        with _Preemption() as preemption:
            while step < config.iterations:
                if config.eval_every > 0 and step % config.eval_every == 0:
                    monitor.validate(step, unet)
                tick = time.perf_counter()
                positions = batch_positions(step, config.batch_size, procs.rank, procs.world)
                batch = training_batch(store.get([train_ids[i] for i in batch_indices(positions, len(train_ids),
                                                                                      config.seed)]), device)
                ctx = Context(unet, teacher.schedule, store.timesteps, store.guidance,
                              sample_generators(config.seed, positions), disc, frozen_student=frozen_student)
                method.begin_step(step, unet)
                iteration = cycle[step % len(cycle)]
                entry = {"step": step, "phase": "+".join(p.name for p in iteration)}
                for phase in iteration:
                    total, grad_norm, record = run_phase(phase, ctx, batch, unet, disc, procs, autocast, config.grad_clip,
                                                         step, checkpoint)
                    if phase.name == "student":
                        if state.ema is not None:
                            update_ema(state.ema, student_params,
                                       ema_decay_at(ema_decay, ema_warmup, student_updates))
                        student_updates += 1
                    # One line per iteration: the student's loss is "loss"; a discriminator update beside it "disc_loss".
                    prefix = "disc_" if phase.name == "discriminator" and entry["phase"] != phase.name else ""
                    entry.update({f"{prefix}loss": total, f"{prefix}grad_norm": grad_norm, **record})
                step += 1
                entry["seconds"] = time.perf_counter() - tick
                monitor.iteration(entry, step - 1, schedulers)
                if step % config.checkpoint_every == 0 or step == config.iterations:
                    checkpoint = save(step)
                if procs.main and config.sample_every > 0 and (step % config.sample_every == 0 or step == config.iterations):
                    monitor.samples(step, teacher, store, device, dtype, previews)
                stop = preemption.signal_name is not None or (stop_after is not None and step - start >= stop_after)
                if procs.any(stop):
                    stopped_by = preemption.signal_name or ("SIGTERM" if stop_after is None else "stop_after")
                    if checkpoint is None or not checkpoint.name.endswith(f"{step:08d}"):
                        checkpoint = save(step)
                    break
            if step == config.iterations and config.eval_every > 0:
                monitor.validate(step, unet)
    finally:
        monitor.close()
    return TrainResult(run, step, checkpoint, stopped_by)


# ---------------------------------------------------------------------------------------------- after training

RUN_KEYS = ("out",)  # a config file's keys that are the verb's, not config fields


def resolve_config(teacher: str | None, store: str | None, preset: str | None, config_file: Path | None,
                   flags: dict) -> TrainConfig:
    """The teacher family's defaults < preset (the teacher's or its family's unless named) < config file < flags.

    ``teacher`` and ``store`` (the flags) may be None where the config file sets them; its ``out`` is the verb's.
    """
    values = cfg.read_config_file(Path(config_file)) if config_file else {}
    values = {k: v for k, v in values.items() if k not in RUN_KEYS}
    teacher = flags.get("teacher") or teacher or values.get("teacher")
    store = flags.get("store") or store or values.get("store")
    missing = [n for n, v in (("teacher", teacher), ("store", store)) if not v]
    if missing:
        raise ConfigError(f"rapm train needs --teacher and --store (or 'teacher' and 'store' in the --config file, or "
                          f"--resume with an existing --out); {' and '.join('--' + n for n in missing)} not given")
    family = read_teacher_info(teacher).family
    name = preset or values.get("preset") or cfg.default_preset(teacher, family.name)
    if name not in cfg.PRESETS:
        raise ConfigError(f"preset {name!r} is not one of {', '.join(cfg.PRESETS)}")
    own = {"lora_targets": list(family.lora_targets), "disc_levels": family.disc_levels}
    config = cfg.apply_overrides(TrainConfig(), {**own, **cfg.PRESETS[name], "preset": name}, f"preset {name}")
    if config_file:
        config = cfg.apply_overrides(config, values, str(config_file))
    return cfg.apply_overrides(config, {**flags, "teacher": str(teacher), "store": str(store)}, "command line")


def cli(
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (checkpoints, logs, samples); required unless "
                                       "the --config file sets 'out'."),
    teacher: Optional[str] = typer.Option(None, help=f"Teacher: a local diffusers folder or a built-in teacher ({BUILTIN_NAMES}) (required unless --resume "
                                          "or the --config file sets 'teacher')."),
    store: Optional[Path] = typer.Option(None, help="Trajectory store made by `rapm trajectories` (required unless --resume "
                                         "or the --config file sets 'store')."),
    method: Optional[str] = typer.Option(None, help=f"{METHODS[0]} (default), {', '.join(METHODS[1:-1])} or {METHODS[-1]}."),
    preset: Optional[str] = typer.Option(None, help="sd15, sdxl, sdxl-rank1, sd3, flux or digits (default: by teacher)."),
    config: Optional[Path] = typer.Option(None, help="A JSON, TOML or YAML file of config fields (docs/defaults.md), and "
                                          "perhaps teacher, store and out."),
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
    progress: bool = typer.Option(True, help="Show a progress bar (--no-progress: none, the libraries' neither)."),
) -> None:
    """Train the student LoRA on a trajectory store (store -> run)."""
    if not progress:
        quiet_library_bars()
    flags = {k: v for k, v in dict(method=method, iterations=iterations, checkpoint_every=checkpoint_every,
                                   batch_size=batch_size, seed=seed, device=device).items() if v is not None}
    flags.update(cfg.parse_set(set_))
    if out is None:
        out = cfg.read_config_file(config).get("out") if config is not None else None
        if not out:
            raise ConfigError("rapm train needs --out (or 'out' in the --config file): the run directory")
        out = Path(out)
    if resume:
        config_obj = cfg.apply_overrides(read_run_config(out), flags, "command line")
    else:
        config_obj = resolve_config(teacher, None if store is None else str(store), preset, config, flags)
    result = train(config_obj, out, resume=resume, overwrite=overwrite, progress=progress, trust_checkpoint=trust_checkpoint)
    if os.environ.get("RANK", "0") != "0":  # under a multi-process launch the main process speaks for all
        raise typer.Exit(0 if result.stopped_by is None else 143)
    if result.stopped_by in ("SIGTERM", "SIGINT"):
        typer.echo(f"stopped by {result.stopped_by} after step {result.step}; checkpoint {result.checkpoint}. "
                   f"Resume with: rapm train --out {out} --resume", err=True)
        raise typer.Exit(130 if result.stopped_by == "SIGINT" else 143)
    typer.echo(f"trained {plural(result.step, 'iteration')}; last checkpoint {result.checkpoint}. "
               f"Export with: rapm export --run {out} --out {out}/lora")
