"""Trajectory precompute: accuracy of the stored positions against teacher passes, for each solver.

For the built-in digits teacher and the SD-1.5-shaped teacher of ``harness.py`` (SD 1.5's UNet config with block
widths / 10, random weights; 4x16x16 latents by default, ``--sd-size 32`` for speed.py's 4x32x32), from the same noise and prompts: the stored positions z~_3..z~_0
(N = 4) of ``rapm.trajectories.teacher_trajectories`` for ``--solver ddim`` and ``--solver dpmsolver++`` at several
``--substeps`` M, against a 1,000-step DDIM reference (M = 250). The error of a position is the RMS over its latents;
a teacher pass is one guided UNet forward (cond and uncond together), counted at the UNet. The table gives, for each
solver, the fewest passes whose error at every position is at most that of DDIM with M = 25 (the paper's setting).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trajectory_accuracy.py [--models digits,sd15-reduced] [--sd-size 16]

About 1 + 3 minutes on one quiet CPU thread (the 1,000-step references dominate).

Writes benchmarks/results/trajectory_accuracy.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import SD15_UNET, build_sd_teacher, machine, reduced, write_results  # noqa: E402

SUBSTEPS = {"ddim": [5, 10, 15, 25, 50], "dpmsolver++": [2, 3, 4, 5, 6, 8, 10]}
REFERENCE_SUBSTEPS = 250  # 4 x 250 = 1,000 DDIM steps
PAPER_SUBSTEPS = 25
MODELS = {
    "digits": dict(prompts=["a handwritten digit 3", "the number seven", "digit 0", "a drawing of a 5"]),
    "sd15-reduced": dict(prompts=["a photo of a cat", "a red car"]),
}


def positions(teacher, z, cond, uncond, guidance, timesteps, solver: str, substeps: int) -> tuple[torch.Tensor, int, float]:
    """z~_N..z~_0 [B, N+1, ...] float32, the teacher passes they took, and the seconds."""
    from rapm.trajectories import teacher_trajectories

    calls = [0]
    hook = teacher.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    start = time.perf_counter()
    try:
        latents, _ = teacher_trajectories(teacher, z, cond, uncond, guidance, timesteps, substeps, solver, delta=None)
    finally:
        hook.remove()
    return latents, calls[0], time.perf_counter() - start


def rms(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """RMS error of each stored position after z_N: [N] (z~_{N-1} .. z~_0)."""
    return (a[:, 1:] - b[:, 1:]).double().square().flatten(2).mean(dim=(0, 2)).sqrt().tolist()


def measure(name: str, teacher_path: str, prompts: list[str]) -> dict:
    from rapm.diffusion import coarse_timesteps
    from rapm.teacher import load_teacher
    from rapm.trajectories import default_guidance, initial_noise

    teacher = load_teacher(teacher_path)
    guidance = default_guidance(teacher)
    timesteps = coarse_timesteps(teacher.schedule.num_train_timesteps, 4)
    cond, uncond = teacher.encode_prompts(prompts)
    z = initial_noise(range(len(prompts)), teacher.latent_shape)
    reference, ref_passes, ref_seconds = positions(teacher, z, cond, uncond, guidance, timesteps, "ddim", REFERENCE_SUBSTEPS)
    scale = reference[:, 1:].double().square().flatten(2).mean(dim=(0, 2)).sqrt().tolist()
    rounding = rms(reference.half().float(), reference)  # the store's float16 rounding, for scale
    rows = []
    for solver, ms in SUBSTEPS.items():
        for m in ms:
            latents, passes, seconds = positions(teacher, z, cond, uncond, guidance, timesteps, solver, m)
            rows.append({"solver": solver, "substeps": m, "teacher_passes": passes, "seconds": round(seconds, 3),
                         "rms_error": rms(latents, reference)})
            print(name, rows[-1], flush=True)
    paper = next(r for r in rows if r["solver"] == "ddim" and r["substeps"] == PAPER_SUBSTEPS)
    matches = {}
    for solver in SUBSTEPS:
        ok = [r for r in rows if r["solver"] == solver and all(e <= p for e, p in zip(r["rms_error"], paper["rms_error"]))]
        best = min(ok, key=lambda r: r["teacher_passes"]) if ok else None
        matches[solver] = None if best is None else {"substeps": best["substeps"], "teacher_passes": best["teacher_passes"],
                                                      "ratio": round(best["teacher_passes"] / paper["teacher_passes"], 3)}
    return {"model": name, "latent_shape": list(teacher.latent_shape), "guidance": guidance, "prompts": prompts,
            "timesteps": timesteps, "reference": {"solver": "ddim", "substeps": REFERENCE_SUBSTEPS,
                                                  "teacher_passes": ref_passes, "seconds": round(ref_seconds, 2)},
            "position_rms": scale, "float16_rounding_rms": rounding, "rows": rows, "match_ddim_25": matches}


def table(results: list[dict], command: str, seconds: float) -> str:
    lines = ["# Trajectory precompute: accuracy against teacher passes", "",
             f"`{command}` ({time.strftime('%Y-%m-%d')}, CPU, 1 thread, {seconds:.0f} s at a load average of "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores). N = 4; error = RMS over the latents of each "
             "stored position z~_3 .. z~_0 against a 1,000-step DDIM reference from the same noise and prompts "
             "(guided, the teacher's default guidance); a teacher pass is one guided UNet forward (cond + uncond). "
             "`dpmsolver++` is DPM-Solver++(2M) on a log-SNR-uniform grid in each slot, its history carried across "
             "the slots; the stored Δ-step costs no pass for either solver.", ""]
    lines += ["## Teacher passes to match DDIM with M = 25 (error at every position at most DDIM-25's)", "",
              "| teacher | solver | M | teacher passes | × DDIM-25's |", "| --- | --- | ---: | ---: | ---: |"]
    for res in results:
        for solver, best in res["match_ddim_25"].items():
            if best is None:
                lines.append(f"| {res['model']} | {solver} | none measured | | |")
            else:
                lines.append(f"| {res['model']} | {solver} | {best['substeps']} | {best['teacher_passes']} | {best['ratio']:.2f} |")
    for res in results:
        shape = "x".join(map(str, res["latent_shape"]))
        lines += ["", f"## {res['model']} ({shape}, guidance {res['guidance']}, {len(res['prompts'])} prompts)", "",
                  "| solver | M | teacher passes | RMS z~_3 | RMS z~_2 | RMS z~_1 | RMS z~_0 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in res["rows"]:
            lines.append(f"| {r['solver']} | {r['substeps']} | {r['teacher_passes']} | "
                         + " | ".join(f"{e:.2e}" for e in r["rms_error"]) + " |")
        lines.append("| (float16 storage rounding) | | | " + " | ".join(f"{e:.2e}" for e in res["float16_rounding_rms"]) + " |")
        lines.append("| (RMS of the position itself) | | | " + " | ".join(f"{e:.2e}" for e in res["position_rms"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,sd15-reduced")
    parser.add_argument("--sd-size", type=int, default=16, help="latent size of the SD-shaped teacher")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    command = f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trajectory_accuracy.py --models {args.models} --sd-size {args.sd_size}"
    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            teacher = "digits" if name == "digits" else str(
                build_sd_teacher(Path(tmp) / name, reduced(SD15_UNET, width=10, sample_size=args.sd_size)))
            results.append(measure(name, teacher, MODELS[name]["prompts"]))
    result = {"benchmark": "trajectory_accuracy", "command": command,
              "machine": machine(torch_threads=1, load_average_end=list(os.getloadavg()),
                                 seconds=round(time.perf_counter() - start, 1)),
              "results": results}
    write_results(args.out, "trajectory_accuracy", result, table(results, command, result["machine"]["seconds"]))


if __name__ == "__main__":
    main()
