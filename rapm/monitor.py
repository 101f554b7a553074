"""What a run reports while it trains: ``logs.jsonl`` (a line an iteration and a validation), TensorBoard (optional),
the progress bar, and sample grids (the student's N steps above the teacher's end points).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from rapm import config as cfg
from rapm.images import save_grid, screen_scale
from rapm.methods.base import Context, student_trajectory
from rapm.models import swap_in
from rapm.run import GuardedWriter, LogFile, RunError, latest_checkpoint
from rapm.stream import sample_generators
from rapm.teacher import load_teacher
from rapm.trajectories import initial_noise

# logs.jsonl's keys as TensorBoard's tags
_TAGS = {"loss": "loss", "grad_norm": "grad_norm", "disc_loss": "loss", "disc_grad_norm": "grad_norm"}


class Monitor:
    """The main process's reports of one run (the other processes' Monitor writes nothing)."""

    def __init__(self, run: Path, config, main: bool, start: int, progress: bool, validation, student_params, ema_of):
        from tqdm.auto import tqdm

        self.run, self.config, self.validation = run, config, validation
        self.student_params, self.ema_of = student_params, ema_of  # ema_of(): the EMA now (a resume replaces it)
        self.writer = tensorboard_writer(run, start) if main else None
        if self.writer is not None and start == 0:  # the hyperparameters, as TensorBoard's text and hparams views show them
            self.writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(config), indent=2) + "\n```", 0)
            _tensorboard_hparams(self.writer, config)
        self.bar = tqdm(total=config.iterations, initial=start, disable=not (progress and main), desc="train", unit="it",
                        dynamic_ncols=True)
        self.log_file = LogFile(run / "logs.jsonl", lambda: latest_checkpoint(run)) if main else None

    def _write(self, entry: dict) -> None:
        self.log_file.write(json.dumps(entry) + "\n")
        self.log_file.flush()

    def validate(self, step: int, unet) -> None:
        """The student (its EMA where the run keeps one) on the held-out trajectories (rapm.validation)."""
        if self.validation is None or self.log_file is None:
            return
        tick = time.perf_counter()
        ema = self.ema_of()
        with swap_in(self.student_params, ema):
            values = self.validation(unet)
        if ema is not None:
            values["val_raw_trajectory_error"] = self.validation(unet)["val_trajectory_error"]
        self._write({"step": step, "phase": "validation", "trajectories": len(self.validation),
                     "seconds": time.perf_counter() - tick, **values})
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k if "/" in k else f"validation/{k[4:]}", v, step)
        self.bar.write(f"step {step}: " + ", ".join(f"{k[4:]} {v:.4g}" for k, v in values.items() if "/" not in k))

    def iteration(self, entry: dict, step: int, schedulers: dict) -> None:
        """One iteration's line (``step`` is the iteration's index), its TensorBoard scalars, the bar."""
        if self.log_file is not None:
            self._write(entry)
        if self.writer is not None and step % self.config.log_every == 0:
            for k, v in entry.items():
                if k not in ("step", "phase"):
                    group = "discriminator" if k.startswith("disc_") or entry["phase"] == "discriminator" else "student"
                    self.writer.add_scalar(f"{group}/{_TAGS[k]}" if k in _TAGS else k, v, step)
            for name, sched in schedulers.items():
                self.writer.add_scalar(f"{name}/lr", sched.get_last_lr()[0], step)
        self.bar.set_postfix({entry["phase"][:4]: f"{entry['loss']:.4f}"}, refresh=False)
        self.bar.update(1)

    def samples(self, step: int, teacher, store, device, dtype, previews: "Previews | None" = None) -> None:
        with swap_in(self.student_params, self.ema_of()):
            grid = sample_grid(teacher, store, self.run / "samples" / f"step-{step:08d}.png", self.config.num_samples,
                               device, dtype)
            own = previews.grid(teacher, store, self.run / "samples" / f"prompts-step-{step:08d}.png") if previews else None
        _tensorboard_image(self.writer, "samples/student_top_teacher_bottom", grid, step)
        if own is not None:
            _tensorboard_image(self.writer, "samples/sample_prompts", own, step)

    def close(self) -> None:
        self.bar.close()
        if self.log_file is not None:
            self.log_file.close()
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer(run: Path, start: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: logs.jsonl has everything
        return None
    try:
        writer = SummaryWriter(str(run / "tensorboard"), purge_step=start)
    except OSError as e:
        raise RunError(f"{run / 'tensorboard'}: cannot be written ({e.strerror or e}); free space and resume with --resume") from None
    return GuardedWriter(writer, run / "tensorboard", lambda: latest_checkpoint(run))


def _tensorboard_hparams(writer, config) -> None:
    """The run's configuration in TensorBoard's HPARAMS tab (one session: this run), beside its text view; the
    metrics it tabulates are the run's own scalars."""
    from torch.utils.tensorboard.summary import hparams

    values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in cfg.to_dict(config).items()}
    metrics = ["student/loss"] + (["validation/trajectory_error"] if config.eval_every > 0 else [])
    file_writer = writer._get_file_writer()  # add_hparams would write them into a new run folder of its own
    for summary in hparams(values, {m: 0.0 for m in metrics}):
        file_writer.add_summary(summary)


def sample_indices(prompts: list[str], count: int) -> list[int]:
    """``count`` trajectories spread over the store's distinct prompts (in store order): a store written prompt by
    prompt (the digits demo: every phrasing of 0, then of 1 ...) shows many classes, not the first prompt's."""
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    distinct = list(first.values())
    if len(distinct) >= count:
        return [distinct[k * len(distinct) // count] for k in range(count)]
    chosen = set(distinct)
    rest = [i for i in range(len(prompts)) if i not in chosen]
    return sorted(distinct + rest[:count - len(distinct)])


class Previews:
    """The user's own preview prompts (config field ``sample_prompts``), encoded once when training starts, with the
    training's UNet and the teacher's text encoders loaded beside it only for that: rendered by the student in its N
    steps from the noise of seeds 0, 1, ... at every ``sample_every``, one row, in prompt order."""

    def __init__(self, config, unet, store, device, dtype):
        self.prompts = list(config.sample_prompts)
        encoder = load_teacher(config.teacher, device=device, dtype=dtype, text_encoders=True, vae=False, unet=unet)
        cond, _ = encoder.encode_prompts(self.prompts)
        self.cond = encoder.family_def.with_guidance(cond, store.guidance).to("cpu").map(lambda v: v.float())
        self.noise = initial_noise(range(len(self.prompts)), store.latent_shape)
        del encoder  # the text encoders go; the UNet stays training's

    @torch.no_grad()
    def grid(self, teacher, store, path: Path) -> Path:
        device = teacher.device
        ends = []
        for k in range(0, len(self.prompts), 8):  # a few at a time: the UNet's activations at batch 8
            ctx = Context(teacher.unet, teacher.schedule, store.timesteps, store.guidance, [])
            cond = self.cond[k:k + 8].to(device)
            ends.append(student_trajectory(ctx, self.noise[k:k + 8].to(device), cond)[:, -1])
        images = teacher.decode(torch.cat(ends)).float().cpu()
        return save_grid(images, path, nrow=min(8, len(self.prompts)), scale=screen_scale(images.shape[-1]))


@torch.no_grad()
def sample_grid(teacher, store, path: Path, count: int, device, dtype) -> Path:
    """Top row: the student's N steps from the stored noise; bottom row: the stored teacher end point; the same
    trajectories (spread over the prompts, ``sample_indices``) at every step."""
    count = min(count, len(store))
    batch = store.get(sample_indices(list(store.prompts), count)).to(device, torch.float32)
    ctx = Context(teacher.unet, teacher.schedule, store.timesteps, store.guidance, sample_generators(0, list(range(count))))
    student_end = student_trajectory(ctx, batch.latents[:, 0], batch.cond)[:, -1]
    images = teacher.decode(torch.cat([student_end, batch.latents[:, -1]])).float().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_grid(images, path, nrow=count, scale=screen_scale(images.shape[-1]))


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
