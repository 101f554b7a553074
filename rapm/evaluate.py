"""Metrics for teachers and students on the same prompts and seeds.

Every model generates from the same noise (seed S is the noise a diffusers
pipeline draws for S). Rows report:

* ``trajectory_error``: mean over samples of the RMS distance, in image space, between the
  model's image and the teacher's many-step DDIM image from the same noise; with ``train_steps``
  also ``trajectory_error_train``, against the teacher's DDIM with the training trajectories'
  N M steps (what the student was trained to reach);
* for the built-in digits teacher, ``fd`` (Fréchet distance in the digits classifier's
  feature space against the held-out real digits), ``fd_teacher`` (the same against the
  teacher's many-step images of the same prompts and noise: fidelity to the teacher, which
  distillation aims at; FD to real digits ranks data-free students above their own teacher)
  and ``prompt_accuracy`` (the share of images the classifier reads as the prompt's digit),
  with a floor for each FD at the same sample size (real vs real; the teacher from other
  noise vs the teacher); the same for any teacher whose plug-in has metrics (the scenes
  teacher: prompt accuracy read from the image), and the distribution metrics against the
  teacher's many-step images of the same prompts from *other* noise (``rapm.distribution``):
  ``fd_teacher_other``, ``precision``, ``recall``, ``coverage`` and ``sharpness``;
* for SD/SDXL teachers, ``fid`` (against a folder of real images, in the feature space of a
  local Inception network) and ``clip_score`` (against the prompts, with a local CLIP model),
  each when its files are given (``rapm.metrics_sd``); None otherwise, with a note saying why.

With ``teacher_curve`` (the CLI's default: DDIM at 1, 2, 4, 8, 25, 100 steps) the result also holds
``teacher_curve``, the teacher's quality against its step count on the same prompts and noise, which the
report draws with the students as points on it; ``seconds`` is the evaluation's wall time.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import typer

from rapm.distribution import against_other_noise
from rapm.errors import RapmError
from rapm.families import BUILTIN_NAMES
from rapm.folders import commit, discard, output_lock, refuse_link, stage
from rapm.images import save_grid
from rapm.lora import load_lora
from rapm.metrics_sd import SdMetrics, check_metric_files
from rapm.plugins import plugin_for
from rapm.processes import resolve_device
from rapm.roles import STUDENT
from rapm.run import check_teacher_weights
from rapm.sample import generate, read_prompt_file
from rapm.teacher import Teacher, load_teacher
from rapm.text import quiet_library_bars
from rapm.trajectories import default_guidance
from rapm.validation import rms


class EvaluateError(RapmError):
    pass


TEACHER_CURVE_STEPS = (1, 2, 4, 8, 25, 100)


@dataclass
class ModelSpec:
    """One row: the teacher with a sampler, or a student LoRA (DDIM trailing, guidance 1)."""

    method: str  # row name: teacher-ddim, teacher-dpmsolver, or the student's method (rapm, ...)
    steps: int
    scheduler: str = "ddim"
    lora: Optional[str] = None
    guidance: Optional[float] = None  # None: the trajectories' guidance for the teacher, 1.0 for a student

    @staticmethod
    def parse(text: str) -> "ModelSpec":
        """``teacher:ddim:100``, ``teacher:dpmsolver:4``, or ``NAME=PATH:4`` for a LoRA (file or folder) at 4 steps."""
        try:
            if text.startswith("teacher:"):
                _, scheduler, steps = text.split(":")
                return ModelSpec(f"teacher-{scheduler}", int(steps), scheduler)
            name, rest = text.split("=", 1) if "=" in text else ("student", text)
            path, steps = rest.rsplit(":", 1)
            return ModelSpec(name, int(steps), "ddim", lora=path)
        except ValueError:
            raise EvaluateError(
                f"--model {text!r}: write teacher:ddim:STEPS, teacher:dpmsolver:STEPS or NAME=LORA_PATH:STEPS"
            ) from None


def _decode(teacher: Teacher, latents: torch.Tensor, batch: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([teacher.decode(latents[i:i + batch]).float().cpu() for i in range(0, len(latents), batch)])


def _use_lora(teacher: Teacher, lora: str) -> None:
    if STUDENT in getattr(teacher.unet, "peft_config", {}):
        teacher.unet.delete_adapters(STUDENT)
    load_lora(teacher, lora)


def trajectory_error(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the per-sample RMS distance to the reference images."""
    return float(rms(images, reference).mean())


def evaluate(
    teacher_path: str,
    models: Sequence[ModelSpec],
    prompts: Sequence[str],
    seeds: Sequence[int],
    reference_steps: int = 100,
    guidance: float | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    out: Path | None = None,
    progress: bool = True,
    keep_images: bool = False,
    fid_features: str | Path | None = None,
    reference_images: str | Path | None = None,
    clip: str | Path | None = None,
    train_steps: int | None = None,
    teacher_curve: Sequence[int] = (),
) -> dict:
    """Generate with each model from the same (prompt, seed) pairs and measure it; write ``out`` (JSON) if given.

    ``fid_features``, ``reference_images`` and ``clip`` are the local files of FID and CLIP score
    (``rapm.metrics_sd``), for SD/SDXL teachers; they are checked and loaded before any generation.
    """
    if out is None:
        return _evaluate(teacher_path, models, prompts, seeds, reference_steps, guidance, device, batch_size, None,
                         progress, keep_images, fid_features, reference_images, clip, train_steps, teacher_curve)
    out = Path(out)
    with _writer_of(out):  # before the teacher loads: a second writer, a link or a read-only --out is refused at once
        return _evaluate(teacher_path, models, prompts, seeds, reference_steps, guidance, device, batch_size, out,
                         progress, keep_images, fid_features, reference_images, clip, train_steps, teacher_curve)


def output_files(out: Path) -> list[Path]:
    """The set ``write_evaluation`` writes: the grid, the table, then the JSON (its commit point)."""
    return [out.with_suffix(".png"), out.with_suffix(".md"), out]


def _writer_of(out: Path):
    """The lock of the one writer of ``out`` (``.NAME.rapm-lock`` beside it), its folder made, its files not links."""
    for f in output_files(out):
        refuse_link(f, "evaluation")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvaluateError(f"--out {out}: its folder cannot be created ({e.strerror or e}); give a writable folder") from None
    if out.is_dir():
        raise EvaluateError(f"--out {out} is a folder; give a file name for the JSON, such as {out / 'evaluation.json'}")
    return output_lock(out, "rapm evaluate")


def _teacher_curve(steps_list, rows: list[dict], guidance: float, run, reference: torch.Tensor, fd_teacher) -> list[dict]:
    """The teacher's DDIM at each step count of ``steps_list`` (a row of the same teacher at that count is reused):
    its trajectory error to ``reference``, its FD to the teacher (``fd_teacher``, for a teacher with its own
    metrics) and its seconds."""
    curve = []
    for steps in sorted(set(int(s) for s in steps_list)):
        row = next((r for r in rows if r["method"] == "teacher-ddim" and r["steps"] == steps
                    and r["guidance"] == guidance), None)
        if row is None:
            imgs, seconds = run(ModelSpec("teacher-ddim", steps))
            row = {"steps": steps, "seconds": seconds, "trajectory_error": trajectory_error(imgs, reference)}
            if fd_teacher is not None:
                row["fd_teacher"] = fd_teacher(imgs)
        curve.append({k: row[k] for k in ("steps", "trajectory_error", "fd_teacher", "seconds") if k in row})
    return curve


def _metrics(plugin, prompts, fid_features, reference_images, clip, device, batch_size):
    """(the teacher's own metrics, the prompts' labels, None) for a plug-in teacher (digits: its classifier), else
    (None, None, FID and CLIP score from the given files)."""
    if plugin is None:
        return None, None, SdMetrics(fid_features, reference_images, clip, device=device, batch_size=batch_size)
    if fid_features is not None or clip is not None:
        raise EvaluateError("--fid-features, --reference-images and --clip are for SD/SDXL teachers; the digits "
                            "teacher is measured with its own classifier (fd, prompt_accuracy): drop them")
    return plugin.metrics(), [plugin.label_of(p) for p in prompts], None


def _plugin_row(plugin, metrics, images, feats, labels, teacher_features, other) -> dict:
    """A plug-in teacher's metrics of one model's images: FD to its real reference set and to the teacher's images from
    the same noise, prompt accuracy, and the distribution metrics (rapm.distribution) against the teacher's images of
    the same prompts from other noise (``other``: images, features)."""
    return {"fd": plugin.frechet_distance(feats, metrics.reference_features),
            "fd_teacher": plugin.frechet_distance(feats, teacher_features),
            "prompt_accuracy": metrics.prompt_accuracy(images, labels),
            **against_other_noise(other[1], feats, other[0], images)}


def _evaluate(teacher_path, models, prompts, seeds, reference_steps, guidance, device, batch_size, out, progress,
              keep_images, fid_features, reference_images, clip, train_steps, teacher_curve) -> dict:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if len(prompts) != len(seeds):
        raise EvaluateError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
    check_metric_files(fid_features, reference_images, clip)
    device = str(resolve_device(device))
    check_teacher_weights(teacher_path)
    teacher = load_teacher(teacher_path, device=device, vae=True)
    teacher_guidance = default_guidance(teacher) if guidance is None else guidance
    # a student samples at CFG 1 (guidance distilled); FLUX.1-dev's guidance is an input the student was trained with
    student_guidance = 1.0 if teacher.family_def.cfg else teacher_guidance
    plugin = plugin_for(teacher)  # the teacher's own metrics (the digits teacher's classifier), if it has them
    metrics, labels, sd_metrics = _metrics(plugin, prompts, fid_features, reference_images, clip, device, batch_size)

    bar = tqdm(total=0, desc="evaluate", unit="image", disable=not progress, dynamic_ncols=True)

    def images_of(count: int):  # the one bar, per image, over every model, the teacher's curve and its floor
        bar.total += count
        bar.refresh()
        return bar

    def run(spec: ModelSpec) -> tuple[torch.Tensor, float]:
        tick = time.perf_counter()
        if spec.lora:
            _use_lora(teacher, spec.lora)
        g = spec.guidance if spec.guidance is not None else (student_guidance if spec.lora else teacher_guidance)
        latents = generate(teacher, prompts, seeds, spec.steps, guidance=g, role="student" if spec.lora else "teacher",
                           scheduler=spec.scheduler, batch_size=batch_size, bar=images_of(len(prompts)))
        return _decode(teacher, latents), time.perf_counter() - tick

    rows, images = [], {}
    reference_spec = ModelSpec("teacher-ddim", reference_steps)
    todo = [reference_spec] + [m for m in models if asdict(m) != asdict(reference_spec)]
    train_reference = None
    if train_steps:  # the teacher as the training trajectories ran it (DDIM, N M steps), from the same noise
        train_reference, _ = run(ModelSpec("teacher-ddim", train_steps))
    teacher_features = other = None
    if metrics is not None:  # the teacher from other noise: the distribution metrics' reference and the FD's floor
        latents = generate(teacher, prompts, [s + 1_000_000 for s in seeds], reference_steps, guidance=teacher_guidance,
                           role="teacher", scheduler="ddim", batch_size=batch_size, bar=images_of(len(prompts)))
        other_images = _decode(teacher, latents)
        other = (other_images, metrics.features(other_images))
    for spec in todo:
        imgs, seconds = run(spec)
        key = f"{spec.method}-{spec.steps}"
        images[key] = imgs
        row = {
            "method": spec.method, "steps": spec.steps, "scheduler": spec.scheduler, "lora": spec.lora,
            "guidance": spec.guidance if spec.guidance is not None else (student_guidance if spec.lora else teacher_guidance),
            "trajectory_error": trajectory_error(imgs, images[f"teacher-ddim-{reference_steps}"]),
            "seconds": seconds, "samples": len(prompts),
        }
        if train_reference is not None:
            row["trajectory_error_train"] = trajectory_error(imgs, train_reference)
        if metrics is not None:
            feats = metrics.features(imgs)
            if teacher_features is None:  # the reference comes first
                teacher_features = feats
            row.update(_plugin_row(plugin, metrics, imgs, feats, labels, teacher_features, other))
        if sd_metrics is not None:
            row["fid"] = sd_metrics.fid(imgs)
            row["clip_score"] = sd_metrics.clip_score(imgs, prompts)
        rows.append(row)
    fd_teacher = (lambda imgs: plugin.frechet_distance(metrics.features(imgs), teacher_features)) if metrics is not None else None
    curve = _teacher_curve(teacher_curve, rows, teacher_guidance, run, images[f"teacher-ddim-{reference_steps}"],
                           fd_teacher)
    result = {
        "teacher": str(teacher_path), "reference_steps": reference_steps, "teacher_guidance": teacher_guidance,
        "samples": len(prompts), "rows": rows, "date": time.strftime("%Y-%m-%d"),
    }
    if curve:
        result["teacher_curve"] = curve
    if train_steps:
        result["train_steps"] = train_steps
    if metrics is not None:
        result["real_floor_fd"] = metrics.real_floor(len(prompts))
        # The teacher from other noise against the teacher: what an independent perfect sampler scores at this n.
        result["teacher_floor_fd"] = plugin.frechet_distance(other[1], teacher_features)
    if sd_metrics is not None:
        result["fid_features"] = None if fid_features is None else str(fid_features)
        result["fid_reference_images"] = sd_metrics.reference_count
        result["clip"] = None if clip is None else str(clip)
        result["notes"] = sd_metrics.notes
    bar.close()
    result["seconds"] = time.perf_counter() - started
    if out is not None:
        write_evaluation(Path(out), result, images, columns=min(10, len(prompts)))
    if keep_images:
        result["images"] = images
    return result


def write_evaluation(out: Path, result: dict, images: dict[str, torch.Tensor], columns: int) -> None:
    """``out`` (JSON), its grid (.png) and table (.md) as one set: the JSON is written last and records the sha256 of
    the other two, so a kill between leaves a set whose JSON says which of its files are its own."""
    staged = []
    try:
        staged.append(stage(out.with_suffix(".png"), lambda tmp: save_comparison_grid(images, tmp, columns=columns)))
        staged.append(stage(out.with_suffix(".md"), (markdown_table(result) + "\n").encode()))
        result["files"] = {s.final.name: s.sha256 for s in staged}
        staged.append(stage(out, json.dumps(result, indent=2).encode()))
    except BaseException:
        discard(staged)
        raise
    commit(staged)


def save_comparison_grid(images: dict[str, torch.Tensor], path: Path, columns: int = 10) -> None:
    """One row per model (in row order), the same prompts and noise in each column."""
    save_grid(torch.cat([imgs[:columns] for imgs in images.values()]), path, nrow=columns)


def markdown_table(result: dict) -> str:
    """The rows as a markdown table."""
    first = result["rows"][0] if result["rows"] else {}
    digits, sd = "fd" in first, "fid" in first or "clip_score" in first
    fd_teacher, train = "fd_teacher" in first, "trajectory_error_train" in first
    spread = "recall" in first  # the distribution metrics against the teacher from other noise
    head = ("| method | steps | guidance | " + ("FD ↓ | " if digits else "") + ("FD to teacher ↓ | " if fd_teacher else "")
            + ("prompt acc. ↑ | " if digits else "")
            + ("precision ↑ | recall ↑ | sharpness (1 = teacher) | " if spread else "")
            + ("FID ↓ | CLIP score ↑ | " if sd else "") + "trajectory error ↓ |"
            + (f" trajectory error to DDIM-{result.get('train_steps')} ↓ |" if train else ""))
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in result["rows"]:
        cells = [r["method"], str(r["steps"]), f"{r['guidance']:g}"]
        if digits:
            cells += [f"{r['fd']:.2f}"] + ([f"{r['fd_teacher']:.2f}"] if fd_teacher else []) + [
                f"{100 * r['prompt_accuracy']:.1f}%"]
        if spread:
            cells += [f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['sharpness']:.3f}"]
        if sd:
            cells += ["—" if r.get(k) is None else f"{r[k]:.2f}" for k in ("fid", "clip_score")]
        cells.append(f"{r['trajectory_error']:.4f}")
        if train:
            cells.append(f"{r['trajectory_error_train']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    if "real_floor_fd" in result:
        lines.append(f"\nReal-vs-real FD floor at {result['samples']} samples: {result['real_floor_fd']:.2f}.")
    if "teacher_floor_fd" in result:
        lines.append(f"FD-to-teacher floor at {result['samples']} samples (the teacher's DDIM-{result['reference_steps']} "
                     f"from other noise): {result['teacher_floor_fd']:.2f}.")
    if result.get("fid_reference_images"):
        lines.append(f"\nFID: {result['samples']} generated vs {result['fid_reference_images']} reference images; "
                     "compare FIDs only at the same counts.")
    lines += ["\n" + note for note in result.get("notes", [])]
    return "\n".join(lines)


def default_digits_prompts(n: int) -> list[str]:
    """The digits teacher's held-out prompts (its plug-in's)."""
    return plugin_for("digits").evaluation_prompts(n)


def cli(
    teacher: str = typer.Option("digits", help=f"Teacher: a local diffusers folder or a built-in teacher ({BUILTIN_NAMES})."),
    model: list[str] = typer.Option([], "--model", help="teacher:ddim:N, teacher:dpmsolver:N, or NAME=LORA:N (repeatable)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts file, one a line (digits: held-out prompts by default)."),
    num: int = typer.Option(500, help="Samples (prompts are cycled; seeds are seed..seed+num-1)."),
    seed: int = typer.Option(1000, help="First seed."),
    reference_steps: int = typer.Option(100, help="Steps of the teacher's reference DDIM."),
    train_steps: Optional[int] = typer.Option(
        None, help="N M, the DDIM steps of the training trajectories: also report the trajectory error against them."),
    guidance: Optional[float] = typer.Option(None, help="Teacher guidance (default: the trajectories' default)."),
    device: str = typer.Option("cpu", help="cpu (default), auto (cuda if available), cuda ..."),
    out: Path = typer.Option(Path("evaluation.json"), help="Results JSON (a markdown table is written beside it)."),
    fid_features: Optional[Path] = typer.Option(
        None, help="FID feature network, a TorchScript file: the StyleGAN2-ADA / clean-fid Inception "
                   "inception-2015-12-05.pt (SD/SDXL; needs --reference-images)."),
    reference_images: Optional[Path] = typer.Option(
        None, help="Folder of real .png/.jpg images that FID compares the generated images with."),
    clip: Optional[Path] = typer.Option(
        None, help="Local CLIP folder (CLIPModel + CLIPProcessor save_pretrained) for the CLIP score (SD/SDXL)."),
    teacher_curve: str = typer.Option(
        ",".join(map(str, TEACHER_CURVE_STEPS)), help="The teacher's DDIM step counts of the quality-vs-steps curve "
        "that rapm report draws, comma-separated; empty: none."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar per image "
                                  "(--no-progress: none, the libraries' neither)."),
) -> None:
    """Compute metrics for teachers and students on held-out prompts and seeds."""
    if not progress:
        quiet_library_bars()
    if prompts is not None:
        base = read_prompt_file(prompts)
        prompt_list = [base[i % len(base)] for i in range(num)]
    elif plugin_for(teacher) is not None:  # a built-in teacher's own held-out prompts (digits, scenes)
        prompt_list = plugin_for(teacher).evaluation_prompts(num)
    else:
        raise EvaluateError(f"--prompts is needed for the teacher {teacher}: only a teacher with its own plug-in "
                            f"({BUILTIN_NAMES}) has held-out prompts of its own")
    specs = [ModelSpec.parse(m) for m in model] or [ModelSpec("teacher-ddim", 4)]
    result = evaluate(teacher, specs, prompt_list, list(range(seed, seed + len(prompt_list))), reference_steps, guidance,
                      device, out=out, fid_features=fid_features, reference_images=reference_images, clip=clip,
                      train_steps=train_steps, teacher_curve=_step_list(teacher_curve), progress=progress)
    typer.echo(markdown_table(result))  # also in OUT's .md, written with it


def _step_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        steps = [0]
    if any(s < 1 for s in steps):
        raise EvaluateError(f"--teacher-curve {text!r}: write step counts of 1 or more, comma-separated, such as 1,2,4,8")
    return steps
