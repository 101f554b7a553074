"""Speed: seconds per RAPM iteration against its floor and against a per-slot loop; trajectory precompute against
the floor of its teacher passes.

For the built-in digits teacher and for an SD-1.5-shaped UNet at reduced width (SD 1.5's UNet config with
block widths / 10, 4 blocks, cross-attention 768, 4x32x32 latents, random weights), on the CPU:

* iteration: the real training loop, ``rapm.train.train`` on a trajectory store, its own per-iteration timer
  (``seconds`` in logs.jsonl: data fetch, losses, per-slot backward, clipping, optimizer step, EMA). Medians of
  many, the first two iterations of each chunk dropped as warm-up. Discriminator and student iterations apart,
  and their mean. Twice, interleaved chunk by chunk: on the store with its Δ-steps (format 2, no teacher pass)
  and on the same store without them (format 1: the teacher's Δ-step computed every iteration, as before).
* floor: the UNet passes one iteration must make (frozen-student steps, student steps with their backward,
  discriminator passes with theirs; and the teacher Δ-steps for the iteration computing them), each timed alone at
  the batch size the implementation uses.
* per-slot loop: the same iteration without batching across slots (one trajectory, one slot, one pass at a time).
* trajectories: ``write_trajectories`` (N=4, M=25) end to end, against 100 guided teacher passes per batch.

Chunks of training, the floor's passes and the per-slot loop are interleaved round by round, so that other work on
the machine weighs on all of them alike.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speed.py [--rounds 6] [--per-round 4] [--models digits,sd15-reduced]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speed.py --models flux-reduced --name speed_flux  # the FLUX-shaped one

Writes benchmarks/results/speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import (FLUX_REDUCED, SD15_UNET, Loop, Passes, build_flux_teacher, build_sd_teacher, machine,  # noqa: E402
                     median, reduced, timed, without_delta_steps, write_results)

MODELS = {
    # name: (teacher, preset, overrides, trajectories to store, write batch size, prompts)
    # Every row times RAPM with its discriminators, alternating (rapm-paper): the iteration Alg. 2 describes. The default
    # rapm recipe trains no discriminator; its iteration is the student phase of these rows.
    "digits": dict(preset="digits", overrides=dict(method="rapm-paper"), count=16, write_batch=8,
                   prompts=["a handwritten digit 3", "the number seven", "digit 0", "a drawing of a 5"]),
    # SD 1.5's preset with the LoRA ranks scaled like the widths (64 -> 8 for 320 -> 32 channels).
    "sd15-reduced": dict(preset="sd15", overrides=dict(method="rapm-paper", lora_rank=8, disc_lora_rank=8), count=2, write_batch=2,
                         prompts=["a photo of a cat", "a red car"]),
    # A FLUX.1-dev-shaped transformer at reduced width (harness.FLUX_REDUCED: 4 x 32 heads, 2 joint + 4 single blocks,
    # 16x32x32 latents = 256 image tokens + 16 text tokens), the flux preset (gradient checkpointing; float32 on the
    # CPU) with the LoRA ranks scaled like the width (32 -> 4 for 3072 -> 128).
    "flux-reduced": dict(preset="flux", overrides=dict(method="rapm-paper", lora_rank=4, disc_lora_rank=4), count=2,
                         write_batch=2, prompts=["a photo of a cat", "a red car"]),
}
SD15_REDUCED = reduced(SD15_UNET, width=10, sample_size=32)


def teacher_for(name: str, folder: Path) -> str:
    if name == "digits":
        return "digits"
    if name == "flux-reduced":
        return str(build_flux_teacher(folder / "flux-reduced", FLUX_REDUCED))
    return str(build_sd_teacher(folder / "sd15-reduced", SD15_REDUCED))


def trajectory_throughput(teacher: str, spec: dict, folder: Path, repeat: int, repeats: int) -> tuple[Path, dict]:
    """Write the store the training uses, timed, and time its teacher passes alone."""
    from rapm.teacher import guided_output, load_teacher
    from rapm.trajectories import default_guidance, write_trajectories

    prompts = folder / "prompts.txt"
    prompts.write_text("".join(spec["prompts"][i % len(spec["prompts"])] + "\n" for i in range(spec["count"])))
    store_dir = folder / "store"
    start = time.perf_counter()
    t = load_teacher(teacher)
    load = time.perf_counter() - start
    b = spec["write_batch"]
    c, h, w = t.latent_shape
    cond, uncond = t.encode_prompts(spec["prompts"][:1] * b)
    guidance = default_guidance(t)
    cond = t.family_def.with_guidance(cond, guidance)  # FLUX.1-dev: its guidance embedding (one pass, no uncond)
    x, tt = torch.randn(b, c, h, w), torch.full((b,), 500)

    def guided_pass():
        with torch.no_grad():
            guided_output(t.unet, x, tt, cond, uncond, guidance)

    guided_pass()  # warm-up
    walls, passes = [], []
    for _ in range(repeats):  # interleaved: a whole store write, then the passes alone
        start = time.perf_counter()
        store = write_trajectories(teacher, prompts, store_dir, steps=4, substeps=25, batch_size=b, progress=False,
                                   overwrite=True)
        walls.append(time.perf_counter() - start)
        passes += timed(guided_pass, repeat)
    wall = median(walls)
    per_pass = median(passes)
    batches = math.ceil(spec["count"] / b)
    floor = batches * store.steps * store.substeps * per_pass
    return store_dir, {
        "count": spec["count"], "batch_size": b, "writes": len(walls), "passes_timed": len(passes), "steps": store.steps, "substeps": store.substeps,
        "seconds": round(wall, 3), "trajectories_per_s": round(spec["count"] / wall, 4),
        "teacher_load_s": round(load, 3), "guided_pass_s": round(per_pass, 5), "guided_pass_rows": 2 * b if t.family_def.cfg else b,
        "floor_s": round(floor, 3), "floor_trajectories_per_s": round(spec["count"] / floor, 4),
        "seconds_over_floor": round(wall / floor, 3), "seconds_less_load_over_floor": round((wall - load) / floor, 3),
    }


def measure(name: str, spec: dict, rounds: int, per_round: int, traj_repeats: int, folder: Path) -> dict:
    from rapm import config as cfg
    from rapm.models import build_models
    from rapm.train import resolve_config, train, training_batch

    teacher = teacher_for(name, folder)
    store_dir, trajectories = trajectory_throughput(teacher, spec, folder, repeat=max(3, per_round),
                                                   repeats=traj_repeats)
    print(f"[{name}] trajectories: {trajectories}", flush=True)

    def config(iterations: int, store: Path | None = None):
        flags = dict(spec["overrides"], iterations=iterations, sample_every=0, checkpoint_every=10**6, device="cpu")
        return resolve_config(teacher, str(store or store_dir), spec["preset"], None, flags)

    base = config(1)
    cfg.validate(base)
    from rapm.store import open_store

    store = open_store(store_dir)
    delta = base.delta or store.manifest.get("delta") or max(1, 1000 // (store.steps * store.substeps))
    computed_dir = without_delta_steps(store_dir, folder / "store-format1")
    torch.manual_seed(base.seed)
    t, disc = build_models(base, torch.device("cpu"), need_vae=False, with_discriminator=True)
    batch = training_batch(store.get(list(range(base.batch_size))), torch.device("cpu"))
    loop = Loop(t.unet, disc, t.schedule, base, store.timesteps, store.guidance, delta)
    passes = Passes(t.unet, disc, batch.latents, batch.cond, batch.uncond)
    plan = passes.plan()  # with the teacher's Δ-step pass; the stored iteration's floor leaves it out
    teacher_pass = next(k for k in plan["student"] if k.startswith("teacher"))

    iteration = {"discriminator": [], "student": []}
    computed = {"discriminator": [], "student": []}
    per_slot = {"discriminator": [], "student": []}
    batched = {"discriminator": [], "student": []}
    floor_samples = {phase: {k: [] for k in p} for phase, p in plan.items()}
    chunk = 2 * per_round
    for r in range(rounds):
        # 1. The real loop: a chunk of iterations (resumed), its own timer per iteration; with the stored Δ-steps,
        # then computing them.
        for run, samples, store_path in ((folder / "run", iteration, store_dir), (folder / "run-format1", computed, computed_dir)):
            c = config((r + 1) * (chunk + 2), store_path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the format 1 store's DeltaStepWarning: computing it is the point
                train(c, run, resume=r > 0, overwrite=r == 0, progress=False)
            log = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
            for entry in log[r * (chunk + 2) + 2:]:  # the first two of each chunk are warm-up
                samples[entry["phase"]].append(entry["seconds"])
        # 2. The floor: each pass alone.
        for phase, p in plan.items():
            for key, (_, (setup, fn)) in p.items():
                if r == 0:
                    timed(fn, 1, setup)  # warm-up
                floor_samples[phase][key] += timed(fn, per_round, setup)
        # 3. The per-slot loop and (a check on the harness) the batched loss in the same loop.
        for kind, out in (("per_slot", per_slot), ("batched", batched)):
            for i in range(chunk + (2 if r == 0 else 0)):
                phase = "discriminator" if i % 2 == 0 else "student"
                start = time.perf_counter()
                loop.iteration(batch, phase, per_slot=kind == "per_slot")
                if r > 0 or i >= 2:
                    out[phase].append(time.perf_counter() - start)
        print(f"[{name}] round {r + 1}/{rounds}: iteration D {median(iteration['discriminator']):.3f} s, "
              f"S {median(iteration['student']):.3f} s; computing the Δ-step D {median(computed['discriminator']):.3f}, "
              f"S {median(computed['student']):.3f}; per-slot D {median(per_slot['discriminator']):.3f}, "
              f"S {median(per_slot['student']):.3f}", flush=True)

    def phases(samples: dict[str, list[float]]) -> dict:
        d, s = median(samples["discriminator"]), median(samples["student"])
        return {"discriminator": round(d, 5), "student": round(s, 5), "mean": round((d + s) / 2, 5),
                "samples": {k: len(v) for k, v in samples.items()}}

    floor_passes = {phase: {k: {"count": plan[phase][k][0], "median_s": round(median(v), 5), "samples": len(v)}
                            for k, v in fp.items()} for phase, fp in floor_samples.items()}
    floor_computed = {phase: sum(v["count"] * v["median_s"] for v in fp.values()) for phase, fp in floor_passes.items()}
    floor = {phase: sum(v["count"] * v["median_s"] for k, v in fp.items() if k != teacher_pass)
             for phase, fp in floor_passes.items()}
    for f in (floor, floor_computed):
        f["mean"] = (f["discriminator"] + f["student"]) / 2
    it, ps, hb, itc = phases(iteration), phases(per_slot), phases(batched), phases(computed)
    c, h, w = t.latent_shape
    return {
        "model": name,
        "unet_parameters": sum(p.numel() for n, p in t.unet.named_parameters() if "lora_" not in n),
        "gradient_checkpointing": base.gradient_checkpointing,
        "latent_shape": [c, h, w], "batch_size": base.batch_size, "steps": store.steps, "delta": delta,
        "lora_rank": base.lora_rank, "disc_lora_rank": base.disc_lora_rank, "disc_levels": base.disc_levels,
        "disc_heads_per_level": base.disc_heads_per_level, "guidance": store.guidance, "ema_decay": base.ema_decay,
        "iteration_s": it,
        "floor_s": {k: round(v, 5) for k, v in floor.items()},
        "floor_passes": floor_passes,
        "floor_teacher_pass": teacher_pass,
        "iteration_over_floor": round(it["mean"] / floor["mean"], 3),
        "iteration_over_floor_by_phase": {p: round(it[p] / floor[p], 3) for p in ("discriminator", "student")},
        "iteration_computing_delta_step_s": itc,
        "floor_computing_delta_step_s": {k: round(v, 5) for k, v in floor_computed.items()},
        "stored_over_computing": {p: round(it[p] / itc[p], 3) for p in ("discriminator", "student", "mean")},
        "computing_over_its_floor": {p: round(itc[p] / floor_computed[p], 3) for p in ("discriminator", "student", "mean")},
        "per_slot_loop_s": ps,
        "iteration_over_per_slot_loop": round(it["mean"] / ps["mean"], 3),
        "iteration_over_per_slot_loop_by_phase": {p: round(it[p] / ps[p], 3) for p in ("discriminator", "student")},
        "harness_batched_s": hb,
        "trajectories": trajectories,
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Speed: RAPM iteration against its floor and a per-slot loop", "",
        f"`{result['command']}` on {m['date']}: CPU, {m['torch_threads']} torch thread of {m['cpu_count']} cores shared "
        f"with other jobs (load average {m['load_average_start'][0]:.1f} at the start, {m['load_average_end'][0]:.1f} at "
        f"the end), torch {m['torch']}. Medians; iteration = `rapm.train.train`'s own per-iteration timer, on the "
        "store with its Δ-steps (no teacher pass) and, interleaved, on the same store without them (computing the "
        "teacher's Δ-step, as before); floor = the UNet passes of one iteration, each timed alone (no teacher pass "
        "for the stored Δ-step); per-slot loop = the iteration without batching across slots (computing the Δ-step).", "",
        "| model | B | N | phase | iteration s | computing the Δ-step s | stored / computing | floor s | iteration / floor "
        "| computing / its floor | per-slot loop s | iteration / per-slot |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["models"]:
        for phase in ("discriminator", "student", "mean"):
            ratio = r["iteration_over_floor"] if phase == "mean" else r["iteration_over_floor_by_phase"][phase]
            slot = r["iteration_over_per_slot_loop"] if phase == "mean" else r["iteration_over_per_slot_loop_by_phase"][phase]
            lines.append(f"| {r['model']} | {r['batch_size']} | {r['steps']} | {phase} | {r['iteration_s'][phase]:.3f} | "
                         f"{r['iteration_computing_delta_step_s'][phase]:.3f} | **{r['stored_over_computing'][phase]:.2f}** | "
                         f"{r['floor_s'][phase]:.3f} | **{ratio:.2f}** | {r['computing_over_its_floor'][phase]:.2f} | "
                         f"{r['per_slot_loop_s'][phase]:.3f} | **{slot:.2f}** |")
    lines += ["", "The floor's passes (median seconds each, times per iteration):", "",
              "| model | phase | pass | per iteration | median s |", "| --- | --- | --- | ---: | ---: |"]
    for r in result["models"]:
        for phase, fp in r["floor_passes"].items():
            for k, v in fp.items():
                lines.append(f"| {r['model']} | {phase} | {k} | {v['count']} | {v['median_s']:.4f} |")
    lines += ["", "Trajectory precompute (`write_trajectories`, N=4, M=25: 100 guided teacher passes per batch), "
              "against the floor of those passes timed alone:", "",
              "| model | trajectories | batch | seconds | trajectories/s | teacher load s | floor s | floor trajectories/s | "
              "seconds / floor | (seconds - load) / floor |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["models"]:
        t = r["trajectories"]
        lines.append(f"| {r['model']} | {t['count']} | {t['batch_size']} | {t['seconds']:.2f} | {t['trajectories_per_s']:.3f} | "
                     f"{t['teacher_load_s']:.2f} | {t['floor_s']:.2f} | {t['floor_trajectories_per_s']:.3f} | "
                     f"{t['seconds_over_floor']:.2f} | {t['seconds_less_load_over_floor']:.2f} |")
    lines += ["", "Models: " + "; ".join(
        f"{r['model']}: {r['unet_parameters'] / 1e6:.1f}M UNet parameters, latents {'x'.join(map(str, r['latent_shape']))}, "
        f"LoRA rank {r['lora_rank']} (discriminator {r['disc_lora_rank']}), discriminator levels {r['disc_levels']} with "
        f"{r['disc_heads_per_level']} head(s) per level, EMA {r['ema_decay']}" for r in result["models"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,sd15-reduced")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=4, help="iterations of each phase (and passes) per round")
    parser.add_argument("--trajectory-repeats", type=int, default=3, help="store writes, each followed by its passes alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="speed", help="results file name: OUT/NAME.{json,md}")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    load_start = list(os.getloadavg())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            results.append(measure(name, MODELS[name], args.rounds, args.per_round, args.trajectory_repeats, folder))
    result = {
        "benchmark": "speed",
        "command": f"OMP_NUM_THREADS={args.threads} benchmarks/speed.py --models {args.models} --rounds {args.rounds} "
                   f"--per-round {args.per_round} --trajectory-repeats {args.trajectory_repeats} --threads {args.threads}"
                   + (f" --name {args.name}" if args.name != "speed" else ""),
        "machine": machine(torch_threads=args.threads, load_average_start=load_start,
                           load_average_end=list(os.getloadavg()), device="cpu"),
        "models": results,
    }
    write_results(args.out, args.name, result, markdown(result))


if __name__ == "__main__":
    main()
