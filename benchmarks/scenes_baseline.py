"""Baseline: the scenes teacher with DDIM at K steps (the reference) and at 4, 2 and 1 steps, from the same noise, with
the distribution metrics of issue 32 and their floor.

For each step count: prompt accuracy per attribute (read from the image, ``rapm.scenes.data.check``), the trajectory
error to the K-step image from the same noise, and the distribution metrics (``rapm.distribution``: FD, precision,
recall, coverage in the scenes classifier's features, sharpness) against the teacher's K-step images of the same
prompts from *other* noise. The floor row is the teacher's K-step images from the first noise against that other
noise: what a perfect student scores at this sample size. With --guidance-sweep, first the K-step metrics at several
guidance scales (how the teacher's guidance in rapm.json was chosen: the smallest at which prompt accuracy stops
rising).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scenes_baseline.py --guidance-sweep 1,2,3,5

writes benchmarks/results/scenes_baseline.{json,md,png}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from teacher_baseline import machine_facts, sample_teacher, save_grid, trajectory_error  # noqa: E402

from rapm.distribution import distribution_metrics, frechet_distance  # noqa: E402
from rapm.scenes.data import draw  # noqa: E402
from rapm.scenes.metrics import ScenesMetrics, attribute_accuracy, evaluation_scenes  # noqa: E402
from rapm.teacher import load_teacher  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def measure(metrics: ScenesMetrics, images: torch.Tensor, scenes, reference: torch.Tensor, reference_features) -> dict:
    row = {f"accuracy_{k}": round(v, 4) for k, v in attribute_accuracy(images, scenes).items()}
    row.update({k: round(v, 4) for k, v in distribution_metrics(reference_features, metrics.features(images),
                                                                reference, images).items()})
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="scenes")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", default="50,4,2,1", help="DDIM step counts; the first is the reference")
    parser.add_argument("--guidance", type=float, default=None, help="default: the teacher's rapm.json, else 3")
    parser.add_argument("--guidance-sweep", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "scenes_baseline"))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    command = ("OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(shlex.quote(a) for a in
               [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    from rapm.plugins import teacher_file

    teacher = load_teacher(args.teacher)
    guidance = args.guidance if args.guidance is not None else float(teacher_file(teacher).get("guidance", 3.0))
    steps = [int(s) for s in args.steps.split(",")]
    metrics = ScenesMetrics()
    scenes = evaluation_scenes(args.samples)
    prompts = [s.prompt() for s in scenes]
    gen = torch.Generator().manual_seed(args.seed)
    noise, other_noise = (torch.randn(args.samples, *teacher.latent_shape, generator=gen) for _ in range(2))
    began = time.time()

    sweep = []
    for g in [float(g) for g in args.guidance_sweep.split(",") if g]:
        images = sample_teacher(teacher, prompts, noise, steps[0], g)
        sweep.append({"guidance": g, **{f"accuracy_{k}": round(v, 4) for k, v in attribute_accuracy(images, scenes).items()},
                      "fd_world": round(frechet_distance(metrics.features(images), metrics.reference_features), 2)})
        print(sweep[-1], flush=True)

    other = sample_teacher(teacher, prompts, other_noise, steps[0], guidance)
    other_features = metrics.features(other)
    images, rows = {}, []
    for n in steps:
        start = time.time()
        images[n] = sample_teacher(teacher, prompts, noise, n, guidance)
        row = {"sampler": "DDIM", "steps": n, "seconds_per_sample": round((time.time() - start) / args.samples, 4),
               "trajectory_error": round(trajectory_error(images[n], images[steps[0]]), 4),
               **measure(metrics, images[n], scenes, other, other_features)}
        rows.append(row)
        print(row, flush=True)
    world = torch.from_numpy(np.stack([draw(s, k) for k, s in enumerate(scenes)]))  # the world's own, same prompts

    training_file = teacher.path / "training.json"
    training = json.loads(training_file.read_text()) if training_file.exists() else {}
    result = dict(
        benchmark="scenes_baseline", date=datetime.datetime.now().isoformat(timespec="seconds"), command=command,
        machine=machine_facts(),
        teacher=str(teacher.path), samples=args.samples, seed=args.seed, guidance=guidance, reference_steps=steps[0],
        rows=rows, guidance_sweep=sweep, seconds=round(time.time() - began),
        world_accuracy=round(attribute_accuracy(world, scenes)["all"], 4),
        teacher_training={k: training.get(k) for k in ("seed", "steps", "batch_size", "lr", "train_seconds", "threads",
                                                       "unet_parameters", "text_encoder_parameters")},
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    save_grid({f"DDIM-{n}": images[n] for n in steps} | {f"DDIM-{steps[0]}, other noise": other}, [""] * 12,
              out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(result, out.with_suffix(".png").name))
    print(markdown(result, out.with_suffix(".png").name))
    return result


def markdown(r: dict, png: str) -> str:
    k = r["reference_steps"]
    lines = [
        "# Scenes teacher baseline: DDIM at N steps, with the distribution metrics", "",
        f"Date: {r['date']}  ", f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']['processor']}, {r['machine']['cpus']} CPUs, {r['machine']['threads']} thread(s), "
        f"torch {r['machine']['torch']}; {r['seconds']} s", "",
        f"{r['samples']} evaluation prompts of the scenes world, guidance {r['guidance']}, the same noise in every row. "
        f"Accuracy: the share of images showing every attribute the prompt names (read from the image; the world's own "
        f"draws of the same prompts: {r['world_accuracy']:.1%}). Trajectory error: RMS pixel distance to the DDIM-{k} "
        f"image from the same noise. FD, precision, recall, coverage (scenes classifier features, k = 3) and sharpness "
        f"(high-frequency energy ratio) are against the teacher's DDIM-{k} images of the same prompts from other noise; "
        f"the DDIM-{k} row is therefore the floor a perfect student reaches.", "",
        "| sampler | steps | accuracy | shape | count | region | trajectory error | FD | precision | recall | coverage "
        "| sharpness |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for x in r["rows"]:
        lines.append(f"| teacher, {x['sampler']} | {x['steps']} | {x['accuracy_all']:.1%} | {x['accuracy_shape']:.1%} | "
                     f"{x['accuracy_count']:.1%} | {x['accuracy_region']:.1%} | {x['trajectory_error']:.4f} | "
                     f"{x['fd']:.1f} | {x['precision']:.3f} | {x['recall']:.3f} | {x['coverage']:.3f} | "
                     f"{x['sharpness']:.3f} |")
    if r["guidance_sweep"]:
        lines += ["", f"Guidance sweep (DDIM-{k}, same prompts and noise; FD against the world's draws):", "",
                  "| guidance | accuracy | shape | count | region | FD to the world |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {s['guidance']} | {s['accuracy_all']:.1%} | {s['accuracy_shape']:.1%} | {s['accuracy_count']:.1%} | "
                  f"{s['accuracy_region']:.1%} | {s['fd_world']:.1f} |" for s in r["guidance_sweep"]]
    t = r["teacher_training"]
    lines += ["", f"Teacher: {t.get('unet_parameters')} UNet parameters, {t.get('steps')} steps at batch "
              f"{t.get('batch_size')}, {t.get('train_seconds')} s on {t.get('threads')} thread(s).", "",
              f"![rows: DDIM step counts, then the other noise; columns: the first prompts]({png})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
