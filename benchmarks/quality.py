"""Quality: every method on the digits teacher, one iteration budget, the same held-out prompts and noise.

For N = 4 and N = 2: one trajectory store each (the same training prompts, M such that N M = 40 DDIM steps, so
both stores follow the same 25-timestep fine grid), then RAPM, RAPM relative-only, SFD, PCM at batch 1 and 4, and
progressive distillation + RDD, each trained for the same number of iterations with the digits preset's settings
(lr, LoRA rank, EMA, batch 4 unless named), each in a fresh process (its wall time and peak RSS measured), exported
as a diffusers LoRA and evaluated with `rapm.evaluate` beside the teacher's DDIM-100, DDIM-N and DPM-Solver++-N.

    .venv/bin/python benchmarks/quality.py            # about an hour on 2 CPU cores
    .venv/bin/python benchmarks/quality.py --quick    # the same flow at toy size (a few minutes)

writes benchmarks/results/quality.{json,md,png} (the grid: one row per model, N = 4 then N = 2). Work files go to
--work (default runs/quality); a rerun reuses finished stores and runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# `rapm` run in a child that records its own peak RSS (VmHWM) at exit: the fork's ru_maxrss would count this
# process's memory too, since Linux keeps the pre-exec high-water mark.
LAUNCH = ("import atexit, os, runpy, sys\n"
          "def peak():\n"
          "    for line in open('/proc/self/status'):\n"
          "        if line.startswith('VmHWM'):\n"
          "            open(os.environ['RAPM_PEAK_FILE'], 'w').write(line.split()[1])\n"
          "atexit.register(peak)\n"
          "sys.argv = ['rapm'] + sys.argv[1:]\n"
          "runpy.run_module('rapm', run_name='__main__')\n")
# (row name, --method, batch size or None for the preset's)
METHODS = [
    ("rapm", "rapm", None),
    ("rapm-relative", "rapm-relative", None),
    ("sfd", "sfd", None),
    ("pcm-b1", "pcm", 1),
    ("pcm-b4", "pcm", 4),
    ("progressive-rdd", "progressive-rdd", None),
]


def make_store(work: Path, steps: int, trajectories: int, fine_steps: int) -> Path:
    from rapm.demo.prompts import training_prompts
    from rapm.trajectories import write_trajectories

    store = work / f"store-n{steps}"
    prompts = work / "prompts.txt"
    base = training_prompts()
    prompts.write_text("".join(base[i % len(base)] + "\n" for i in range(trajectories)))
    write_trajectories("digits", prompts, store, steps=steps, substeps=fine_steps // steps, seed=0, batch_size=250,
                       shard_size=250, progress=True)
    return store


def train_one(work: Path, store: Path, steps: int, row: str, method: str, batch: int | None, iterations: int,
              seed: int, threads: int) -> dict:
    """`rapm train` in a fresh process; its wall time and peak RSS (VmHWM), kept in run/bench.json."""
    run = work / f"n{steps}-{row}-s{seed}"
    record_file = run / "bench.json"
    if record_file.exists():
        return json.loads(record_file.read_text())
    cmd = [sys.executable, "-c", LAUNCH, "train", "--teacher", "digits", "--store", str(store), "--out", str(run),
           "--method", method, "--iterations", str(iterations), "--seed", str(seed), "--no-progress",
           "--set", "sample_every=0", "--set", f"checkpoint_every={iterations}"]
    if batch is not None:
        cmd += ["--batch-size", str(batch)]
    cmd += ["--overwrite"]
    peak_file = work / f".peak-{run.name}"
    peak_file.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "RAPM_PEAK_FILE": str(peak_file)}
    tick = time.perf_counter()
    code = subprocess.run(cmd, env=env).returncode
    seconds = time.perf_counter() - tick
    if code != 0:
        raise SystemExit(f"training {row} (N={steps}) failed: {shlex.join(cmd)}")
    peak_kb = int(peak_file.read_text()) if peak_file.exists() else None  # /proc: Linux only
    logs = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    per_it = sorted(e["seconds"] for e in logs)
    record = {"run": str(run), "train_seconds": seconds, "peak_rss_mb": peak_kb / 1024 if peak_kb else None,
              "seconds_per_iteration": per_it[len(per_it) // 2], "iterations": len(logs),
              "batch_size": json.loads((run / "config.json").read_text())["batch_size"]}
    record_file.write_text(json.dumps(record, indent=2))
    return record


def export(run: Path, steps: int) -> Path:
    from rapm.export import export_lora
    from rapm.run import load_student

    out = run / "lora"
    weights = out / "pytorch_lora_weights.safetensors"
    if weights.exists():
        return out
    teacher, unet, _ = load_student(run)
    export_lora(unet, "digits", teacher.family, out, steps=steps)
    return out


def table(rows: list[dict], floor: float, samples: int) -> str:
    head = ("| method | N | batch | FD ↓ | prompt acc. ↑ | trajectory error ↓ | train wall time | s/iteration | "
            "peak RSS |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        train = r.get("train_seconds")
        cells = [r.get("label", r["method"]), str(r["steps"]), str(r.get("batch_size", "")), f"{r['fd']:.1f}",
                 f"{100 * r['prompt_accuracy']:.1f}%", f"{r['trajectory_error']:.4f}",
                 f"{train / 60:.1f} min" if train else "", f"{r['seconds_per_iteration']:.2f}" if train else "",
                 f"{r['peak_rss_mb']:.0f} MB" if train and r.get("peak_rss_mb") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nReal-vs-real FD floor at {samples} samples: {floor:.1f}.")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Trained methods over their seeds: mean, and min..max in brackets."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if "seed" in r:
            groups.setdefault((r["label"].rsplit("-s", 1)[0], r["steps"]), []).append(r)
    lines = ["| method | N | seeds | FD ↓ | prompt acc. ↑ | trajectory error ↓ |", "|" + " --- |" * 6]
    for (name, n), rs in groups.items():
        def cell(key, fmt, scale=1.0):
            v = [scale * r[key] for r in rs]
            return fmt.format(sum(v) / len(v)) + (f" [{fmt.format(min(v))}..{fmt.format(max(v))}]" if len(v) > 1 else "")
        lines.append(f"| {name} | {n} | {len(rs)} | {cell('fd', '{:.1f}')} | {cell('prompt_accuracy', '{:.1f}', 100)}% | "
                     f"{cell('trajectory_error', '{:.4f}')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/quality"))
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--trajectories", type=int, default=500)
    ap.add_argument("--fine-steps", type=int, default=40, help="N M: the DDIM steps of each stored trajectory")
    ap.add_argument("--iterations", type=int, default=300, help="the one iteration budget (digits preset: 300)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (one row per method and seed)")
    ap.add_argument("--samples", type=int, default=500, help="held-out prompts and seeds evaluated")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--quick", action="store_true", help="toy sizes, for a smoke run")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.trajectories, args.fine_steps, args.iterations, args.samples = 16, 8, 4, 20
    import torch

    torch.set_num_threads(args.threads)
    from rapm.evaluate import ModelSpec, default_digits_prompts, evaluate

    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    trained: dict[tuple[int, str, int], dict] = {}
    specs = []
    for n in args.steps:
        print(f"== N = {n}: trajectories", file=sys.stderr, flush=True)
        tick = time.perf_counter()
        store = make_store(args.work, n, args.trajectories, args.fine_steps)
        print(f"   store {store} ({time.perf_counter() - tick:.0f} s)", file=sys.stderr, flush=True)
        specs += [ModelSpec("teacher-ddim", n), ModelSpec("teacher-dpmsolver", n, "dpmsolver")]
        for row, method, batch in METHODS:
            for seed in args.seeds:
                print(f"== N = {n}: train {row} (seed {seed})", file=sys.stderr, flush=True)
                record = train_one(args.work, store, n, row, method, batch, args.iterations, seed, args.threads)
                lora = export(Path(record["run"]), n)
                name = f"{row}-s{seed}"
                trained[(n, name)] = {**record, "method": method, "seed": seed}
                specs.append(ModelSpec(name, n, lora=str(lora)))
    print("== evaluate", file=sys.stderr, flush=True)
    prompts = default_digits_prompts(args.samples)
    seeds = list(range(10_000, 10_000 + len(prompts)))
    result = evaluate("digits", specs, prompts, seeds, reference_steps=100, out=args.work / "evaluation.json")
    rows = []
    for r in result["rows"]:
        row = {k: r.get(k) for k in ("method", "steps", "scheduler", "guidance", "fd", "fd_teacher", "prompt_accuracy",
                                     "trajectory_error")}
        record = trained.get((r["steps"], r["method"]))
        if record is not None:
            row["label"] = r["method"]
            row.update({k: record[k] for k in ("method", "seed", "batch_size", "train_seconds", "seconds_per_iteration",
                                               "peak_rss_mb", "iterations")})
        rows.append(row)
    args.results.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = {
        "date": datetime.date.today().isoformat(), "command": command.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads",
        "teacher": "digits", "teacher_guidance": result["teacher_guidance"], "samples": len(prompts),
        "trajectories": args.trajectories, "fine_steps": args.fine_steps, "iterations": args.iterations,
        "seeds": args.seeds, "real_floor_fd": result["real_floor_fd"], "wall_seconds": time.perf_counter() - started,
        "rows": rows,
    }
    stem = "quality_quick" if args.quick else "quality"
    (args.results / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    md = (f"# Quality on the digits teacher\n\nCommand: `{out['command']}` ({out['date']}, {out['machine']}). "
          f"{args.trajectories} trajectories per N ({args.fine_steps} DDIM steps each, guidance "
          f"{out['teacher_guidance']:g}), {args.iterations} iterations per method, {len(prompts)} held-out prompts and "
          f"seeds; wall time {out['wall_seconds'] / 60:.0f} min. Student rows are named METHOD-sSEED (the training "
          f"seed); s/iteration is the median, peak RSS the training process's high-water mark.\n\n"
          + table(rows, out["real_floor_fd"], len(prompts)) + "\n\nOver the training seeds (mean [min..max]):\n\n"
          + summary(rows) + "\n")
    (args.results / f"{stem}.md").write_text(md)
    grid = (args.work / "evaluation.png")
    if grid.exists():
        (args.results / f"{stem}.png").write_bytes(grid.read_bytes())
    print(md)


if __name__ == "__main__":
    main()
