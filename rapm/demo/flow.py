"""`rapm demo`: the whole flow on the built-in digits teacher, on a CPU.

digits teacher -> trajectories -> RAPM training -> export -> evaluate -> report. Each stage
is the library function its CLI verb wraps; rerunning the demo resumes what is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import typer

from rapm.demo.prompts import training_prompts
from rapm.evaluate import ModelSpec, TEACHER_CURVE_STEPS, default_digits_prompts, evaluate, markdown_table
from rapm.export import export_lora
from rapm.report import report
from rapm.run import load_student
from rapm.train import resolve_config, train
from rapm.trajectories import write_trajectories


@dataclass(frozen=True)
class DemoSize:
    trajectories: int
    substeps: int
    iterations: int
    eval_samples: int
    reference_steps: int


# Sized for 2 CPU cores in about 15 minutes (the paper: 1,000 trajectories, M = 25); iterations 0: the preset's.
FULL = DemoSize(trajectories=500, substeps=10, iterations=0, eval_samples=200, reference_steps=100)
QUICK = DemoSize(trajectories=32, substeps=3, iterations=6, eval_samples=40, reference_steps=12)


def run_demo(out: Path, quick: bool = False, progress: bool = True, steps: int = 4) -> dict:
    """Run the flow into ``out``; return the evaluation result (with the report's path under ``report``)."""
    size = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = {}

    def stage(name: str):
        typer.echo(f"\n== {name}", err=True)
        timings[name] = time.perf_counter()

    stage("trajectories: the teacher's DDIM trajectories for the training prompts")
    base = training_prompts()
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("".join(base[i % len(base)] + "\n" for i in range(size.trajectories)))
    store = out / "store"
    write_trajectories("digits", prompts_file, store, steps=steps, substeps=size.substeps, seed=0, batch_size=250,
                       shard_size=250, progress=progress)

    stage("train: RAPM, LoRA student on the teacher's one UNet")
    run = out / "run"
    flags = {"iterations": size.iterations} if size.iterations else {}
    if quick:
        flags.update(checkpoint_every=3, sample_every=3)
    config = resolve_config("digits", str(store), None, None, flags)
    train(config, run, resume=(run / "config.json").exists(), progress=progress)

    stage("export: the student as a diffusers LoRA")
    teacher, unet, facts = load_student(run)
    lora = export_lora(unet, "digits", teacher.family, out / "lora", steps=steps)

    stage("evaluate: teacher and student from the same held-out prompts and noise")
    prompts = default_digits_prompts(size.eval_samples)
    models = [ModelSpec("teacher-ddim", steps), ModelSpec("teacher-dpmsolver", steps, "dpmsolver"),
              ModelSpec(config.method, steps, lora=str(lora))]
    result = evaluate("digits", models, prompts, list(range(10_000, 10_000 + len(prompts))), size.reference_steps,
                      out=run / "evaluation.json", progress=progress, train_steps=steps * size.substeps,
                      teacher_curve=sorted({s for s in TEACHER_CURVE_STEPS if s <= size.reference_steps}
                                           | {size.reference_steps}))  # quick: the curve up to its short reference

    stage("report")
    page = report(run)
    total = time.perf_counter() - started
    typer.echo("\n" + markdown_table(result), err=True)
    typer.echo(f"\ndemo finished in {total / 60:.1f} min; report: {page}", err=True)
    result["report"] = str(page)
    result["seconds"] = total
    return result


def cli(
    out: Path = typer.Option(Path("demo-out"), help="Where the store, the run, the LoRA and the report go."),
    quick: bool = typer.Option(False, help="A small flow (about a minute) for smoke tests."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """The whole flow on the built-in digits teacher, on a CPU."""
    run_demo(out, quick=quick, progress=progress)
