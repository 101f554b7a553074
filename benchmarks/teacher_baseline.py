"""Baseline: the digits teacher with DDIM at 100 steps and at 4, 2 and 1 steps, from the same noise.

For each step count: Fréchet distance in the digits classifier's feature space
against the 300 held-out real digits, prompt accuracy (the classifier reads the
digit the prompt asked for), trajectory error (mean per-sample RMS distance, in
[-1, 1] pixels, of the N-step image to the 100-step image from the same noise),
and the real-vs-real floor: the FD of as many real train-split digits.
With --guidance-sweep, also the 100-step metrics at several guidance scales
(how DIGITS_GUIDANCE was chosen).

    .venv/bin/python benchmarks/teacher_baseline.py

writes benchmarks/results/teacher_baseline.{json,md,png}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two threads on a shared CPU: don't spin-wait

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from rapm.demo import DIGITS_GUIDANCE
from rapm.demo.classifier import CLASSIFIER_DIR
from rapm.demo.metrics import DigitsMetrics
from rapm.demo.prompts import evaluation_prompts
from rapm.diffusion import coarse_timesteps, sample_positions
from rapm.teacher import Teacher, guided_output, load_teacher

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def sample_teacher(
    teacher: Teacher, prompts: list[str], noise: torch.Tensor, steps: int, guidance: float, batch_size: int = 250
) -> torch.Tensor:
    """Images [B, 1, 16, 16] from ``steps``-step DDIM ("trailing" timesteps) with classifier-free guidance."""
    timesteps = coarse_timesteps(teacher.schedule.num_train_timesteps, steps)
    out = []
    for i in range(0, len(prompts), batch_size):
        cond, uncond = teacher.encode_prompts(prompts[i : i + batch_size])
        def model(z, t, cond=cond, uncond=uncond):
            return guided_output(teacher.unet, z, t, cond, uncond, guidance)
        z = sample_positions(model, teacher.schedule, noise[i : i + batch_size], timesteps)[-1]
        out.append(teacher.decode(z))
    return torch.cat(out)


def machine_facts() -> dict:
    """What a baseline records of the machine it ran on."""
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                threads=torch.get_num_threads(), torch=torch.__version__)


def trajectory_error(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the RMS pixel distance between two image sets from the same noise."""
    return float((images - reference).double().pow(2).mean(dim=(1, 2, 3)).sqrt().mean())


def save_grid(rows: dict[str, torch.Tensor], labels: list[str], path: Path) -> None:
    """One row of images per step count, the same noise in each column (an empty label: no title); one-channel
    images in grey, three-channel ones in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(labels)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(0.7 * n_cols + 1.2, 0.75 * n_rows + 0.4), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r][c]
            if images.shape[1] == 1:
                ax.imshow(images[c, 0].numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            else:
                ax.imshow(((images[c].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and labels[c]:
                ax.set_title(labels[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", default="100,4,2,1", help="DDIM step counts; the first is the reference")
    parser.add_argument("--guidance", type=float, default=DIGITS_GUIDANCE)
    parser.add_argument("--guidance-sweep", default="", help="e.g. 1,1.5,2,3,4: 100-step metrics at each scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", default="digits")
    parser.add_argument("--out", default=str(RESULTS / "teacher_baseline"), help="path stem of the .json/.md/.png")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    steps = [int(s) for s in args.steps.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    teacher = load_teacher(args.teacher)
    metrics = DigitsMetrics()
    pairs = evaluation_prompts(args.samples, seed=args.seed)
    prompts, digits = [p for p, _ in pairs], [d for _, d in pairs]
    noise = torch.randn(args.samples, *teacher.latent_shape, generator=torch.Generator().manual_seed(args.seed))

    rows, images = [], {}
    for n in steps:
        start = time.time()
        images[n] = sample_teacher(teacher, prompts, noise, n, args.guidance)
        seconds = time.time() - start
        row = dict(
            sampler="DDIM", steps=n, guidance=args.guidance, unet_passes=n * (2 if args.guidance != 1 else 1),
            fd=round(metrics.fd(images[n]), 2), prompt_accuracy=round(metrics.prompt_accuracy(images[n], digits), 4),
            trajectory_error=round(trajectory_error(images[n], images[steps[0]]), 4),
            seconds_per_sample=round(seconds / args.samples, 4),
        )
        rows.append(row)
        print(row, flush=True)
    floor = round(metrics.real_floor(args.samples, seed=args.seed), 2)

    sweep = []
    for g in [float(g) for g in args.guidance_sweep.split(",") if g]:
        imgs = images[steps[0]] if g == args.guidance else sample_teacher(teacher, prompts, noise, steps[0], g)
        sweep.append(dict(guidance=g, steps=steps[0], fd=round(metrics.fd(imgs), 2),
                          prompt_accuracy=round(metrics.prompt_accuracy(imgs, digits), 4)))
        print(sweep[-1], flush=True)

    classifier_cfg = json.loads((CLASSIFIER_DIR / "config.json").read_text())
    training_file = teacher.path / "training.json"
    training = json.loads(training_file.read_text()) if training_file.exists() else {}
    result = dict(
        benchmark="teacher_baseline", date=datetime.datetime.now().isoformat(timespec="seconds"), command=command,
        machine=machine_facts(),
        teacher=str(teacher.path), samples=args.samples, seed=args.seed, guidance=args.guidance,
        reference_steps=steps[0], rows=rows, real_floor=floor,
        classifier_held_out_accuracy=classifier_cfg.get("held_out_accuracy"),
        teacher_training={k: training.get(k) for k in ("seed", "steps", "batch_size", "train_seconds", "threads",
                                                       "unet_parameters", "text_encoder_parameters")},
        guidance_sweep=sweep,
    )
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    labels = [f"{d}" for d in digits[:20]]
    save_grid({f"{n} step{'s' if n > 1 else ''}": images[n][:20] for n in steps}, labels, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(result, out.with_suffix(".png").name))
    print(markdown(result, out.with_suffix(".png").name))
    return result


def markdown(result: dict, png_name: str) -> str:
    lines = [
        "# Digits teacher baseline: DDIM at N steps",
        "",
        f"Date: {result['date']}  ",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['processor']}, {result['machine']['cpus']} CPUs, {result['machine']['threads']} threads, "
        f"torch {result['machine']['torch']}",
        "",
        f"{result['samples']} held-out prompts (digits balanced), the same noise for every row (seed {result['seed']}), "
        f"classifier-free guidance {result['guidance']}. FD: Fréchet distance of the digits classifier's 64-d features "
        f"against the 300 held-out real digits (lower is better). Trajectory error: mean per-sample RMS pixel distance "
        f"(images in [-1, 1]) to the {result['reference_steps']}-step image from the same noise. UNet evaluations count "
        f"the conditional and unconditional halves of guidance (one batched forward per step).",
        "",
        "| sampler | steps | UNet evaluations | FD | prompt accuracy | trajectory error | s / sample |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(f"| teacher, {r['sampler']} | {r['steps']} | {r['unet_passes']} | {r['fd']:.2f} | "
                     f"{r['prompt_accuracy']:.1%} | {r['trajectory_error']:.4f} | {r['seconds_per_sample']:.4f} |")
    lines.append(f"| real digits (train split), floor | | | {result['real_floor']:.2f} | | | |")
    lines += [
        "",
        f"Floor: FD of {result['samples']} real train-split digits against the same held-out set, the best an FD "
        f"can be at this sample size. Classifier held-out accuracy: {result['classifier_held_out_accuracy']:.1%}.",
    ]
    if result["guidance_sweep"]:
        lines += ["", f"Guidance sweep ({result['reference_steps']}-step DDIM, same prompts and noise):", "",
                  "| guidance | FD | prompt accuracy |", "| ---: | ---: | ---: |"]
        lines += [f"| {s['guidance']} | {s['fd']:.2f} | {s['prompt_accuracy']:.1%} |" for s in result["guidance_sweep"]]
    lines += ["", f"![samples: rows are step counts, columns the same noise and prompt digit]({png_name})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
