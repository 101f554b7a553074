"""The regimes where the paper says RAPM's terms pay (issue 32, point 3): 1 and 2 steps besides 4, LoRA rank 1 and 4
besides the preset's, and a small store, on both built-in teachers (digits; scenes: colour, texture, many modes per
prompt), for the default recipe, rapm-paper, the paired discriminator on the absolute term alone, SFD + EMA, PCM at
batch 1 and 4, and progressive-rdd.

Every run is a `rapm train` at the teacher's own preset (``digits``, ``scenes``) with the convergence benchmark's
learning rate at batch 1 (3e-4, ``convergence.PRESET_LR``), and batch 1 unless a row says otherwise, with the method's own settings (the default's EMA, rapm-paper's hinge loss and alternation), validated by
rapm itself every ``--eval-every`` iterations on the same held-out trajectories of the same store
(``val_seed=0``, ``val_reference_steps=100``): trajectory error, FD to the teacher's images of the same noise, and
the distribution metrics against the teacher's images from other noise (FD, precision, recall, coverage,
sharpness; rapm.distribution) and prompt accuracy, each with its floor in the teacher's own row.

One store per (teacher, N): 600 trajectories of the teacher's training prompts, N M = 40 DDIM steps, the teacher's
own guidance. Each (teacher, regime, row) is one run directory under --work; a rerun continues unfinished runs and
skips finished ones, so the benchmark can be stopped and restarted at any time. Runs go --jobs at a time, each a
fresh process with one torch thread.

    OMP_NUM_THREADS=1 python benchmarks/regimes.py --work /tmp/regimes --jobs 2          # many hours on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/regimes.py --work /tmp/regimes --teachers digits --regimes n1 n2
    python benchmarks/regimes.py --work /tmp/regimes --report-only

writes benchmarks/results/regimes.{json,md}: every validation of every run, and a table of the last three
validations' mean per run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from convergence import PRESET_LR, teacher_rows, train_run, validations  # noqa: E402  (the convergence benchmark's machinery)

RESULTS = Path(__file__).parent / "results"
TRAJECTORIES = 600
FINE_STEPS = 40  # N M, the stored trajectories' DDIM steps
VAL_FRACTION = 1 / 6  # 100 of the 600 held out
TEACHERS = ("digits", "scenes")
# (row, --method, batch, --set fields)
ROWS = [
    ("rapm", "rapm", 1, []),  # the default recipe: the absolute terms, pseudo-Huber, the EMA; no discriminator
    ("rapm-paper", "rapm-paper", 1, []),  # Alg. 2 as written: both terms and both discriminators (hinge), alternating
    ("paired-abs", "rapm", 1, ["adv_weight=0.1"]),  # the default with the paired discriminator D2 (relative weight 0)
    ("sfd-ema", "sfd", 1, ["ema_decay=0.99", "ema_warmup=true"]),  # SFD (L1, absolute only) with the default's EMA
    ("pcm-b1", "pcm", 1, []),
    ("pcm-b4", "pcm", 4, []),
    ("progressive-rdd", "progressive-rdd", 1, []),
]
# regime: (N, --set fields on top of the row's)
REGIMES = {
    "n1": (1, []),
    "n2": (2, []),
    "n4": (4, []),
    "rank1": (4, ["lora_rank=1", "lora_alpha=1"]),  # the paper's SDXL student is rank 1
    "rank4": (4, ["lora_rank=4", "lora_alpha=4"]),
    "small": (4, ["train_trajectories=50"]),  # 50 of the 500 training trajectories, used many times over
}
METRICS = ("trajectory_error", "reference_error", "fd_teacher", "fd_teacher_other", "precision", "recall", "coverage",
           "sharpness", "prompt_accuracy")


def training_prompts(teacher: str) -> list[str]:
    if teacher == "digits":
        from rapm.demo.prompts import training_prompts as digits

        return digits()
    from rapm.scenes.metrics import training_scenes

    return [s.prompt() for s in training_scenes()]


def make_store(work: Path, teacher: str, steps: int) -> Path:
    from rapm.trajectories import write_trajectories

    store = work / f"{teacher}-store-n{steps}"
    if (store / "manifest.json").exists() and json.loads((store / "manifest.json").read_text()).get("complete"):
        return store
    base = training_prompts(teacher)
    prompts = work / f"{teacher}-prompts.txt"
    prompts.write_text("".join(base[i % len(base)] + "\n" for i in range(TRAJECTORIES)))
    write_trajectories(teacher, prompts, store, steps=steps, substeps=FINE_STEPS // steps, seed=0, batch_size=100,
                       shard_size=200, progress=False, overwrite=True)
    return store


def run_dir(work: Path, teacher: str, regime: str, row: str) -> Path:
    return work / f"{teacher}-{regime}-{row}"


def train(work: Path, teacher: str, regime: str, row: tuple, iterations: int, eval_every: int) -> str:
    name, method, batch, sets = row
    steps, extra = REGIMES[regime]
    base = ["sample_every=0", f"eval_every={eval_every}", f"val_fraction={VAL_FRACTION:.4f}", "val_seed=0",
            "val_reference_steps=100", "keep_checkpoints=1", *PRESET_LR]
    return train_run(run_dir(work, teacher, regime, name), teacher, work / f"{teacher}-store-n{steps}", method, batch,
                     [*base, *extra, *sets], iterations, eval_every)


def read_curve(run: Path) -> list[dict]:
    """One entry per validation (the last of each iteration: a resume may repeat one), with the iterations' seconds
    before it."""
    out = {}
    for e, wall in validations(run):
        out[e["step"]] = {"iteration": e["step"], "run_wall_s": round(wall, 1),
                          **{m: e.get(f"val_{m}") for m in METRICS}}
    return [out[k] for k in sorted(out)]


def summary(curve: list[dict]) -> dict:
    """The mean of the last three validations, metric by metric, and the worst rise of the trajectory error."""
    last = curve[-3:]
    out = {"iterations": curve[-1]["iteration"] if curve else 0}
    for m in METRICS:
        values = [r[m] for r in last if isinstance(r.get(m), (int, float))]
        out[m] = round(statistics.mean(values), 5) if values else None
    errors = [r["trajectory_error"] for r in curve if isinstance(r.get("trajectory_error"), (int, float))]
    out["worst_rise"] = round(max([b - a for a, b in zip(errors, errors[1:])] + [0.0]), 5)
    return out


def teacher_floor(work: Path, teacher: str, steps: int) -> list[dict]:
    """The teacher's own rows on the held-out split of its N-step store (once, cached in --work): its DDIM-N, and its
    DDIM-100 from other noise, the floor of every distribution metric (a perfect student that draws other noise)."""
    cache = work / "teacher-rows.json"
    table = json.loads(cache.read_text()) if cache.exists() else {}
    key = f"{teacher}-n{steps}"
    store = work / f"{teacher}-store-n{steps}"
    if key not in table and (store / "manifest.json").exists():
        rows, floors = teacher_rows(store, steps, VAL_FRACTION, teacher)
        ddim = next(r for r in rows if r["steps"] == steps)
        other = floors["other_noise"]
        table[key] = [{"row": f"teacher DDIM-{steps}", **{m: ddim.get(m) for m in METRICS}},
                      {"row": "teacher DDIM-100, other noise (floor)", **{m: other.get(f"val_{m}") for m in METRICS}}]
        cache.write_text(json.dumps(table, indent=1) + "\n")
    return table.get(key, [])


def report(work: Path, teachers, regimes, iterations: int = 3000) -> dict:
    runs = []
    for teacher in teachers:
        for regime in regimes:
            for name, method, batch, sets in ROWS:
                curve = read_curve(run_dir(work, teacher, regime, name))
                if curve:
                    runs.append({"teacher": teacher, "regime": regime, "row": name, "method": method, "batch": batch,
                                 "set": [*REGIMES[regime][1], *sets], "steps": REGIMES[regime][0],
                                 **summary(curve), "curve": curve})
    result = {"benchmark": "regimes", "date": datetime.date.today().isoformat(), "trajectories": TRAJECTORIES,
              "fine_steps": FINE_STEPS, "runs": runs}
    lines = ["# Regimes (issue 32, point 3)", "",
             f"`benchmarks/regimes.py` ({result['date']}): one `rapm train` per row, the teacher's preset at batch 1 "
             f"unless the row says otherwise, {TRAJECTORIES} trajectories per store (N M = {FINE_STEPS}), 100 held out. "
             "Each figure is the mean of the run's last three validations; *worst rise*: the largest rise of the "
             "trajectory error between two validations. *FD other*: to the teacher's DDIM-100 images from other noise "
             "(distribution, not pairing). A run short of its "
             f"{iterations:,} iterations is still training: its row is marked *partial*.", ""]
    head = ("| row | iterations | trajectory error ↓ | FD to teacher ↓ | FD other ↓ | precision ↑ | recall ↑ | "
            "sharpness | prompt acc. ↑ | worst rise |")
    for teacher in teachers:
        for regime in regimes:
            rows = [r for r in runs if r["teacher"] == teacher and r["regime"] == regime]
            if not rows:
                continue
            steps, extra = REGIMES[regime]
            lines += [f"## {teacher}, {regime} (N = {steps}{', ' + ' '.join(extra) if extra else ''})", "", head,
                      "| --- " * 10 + "|"]
            floor = teacher_floor(work, teacher, steps)
            result.setdefault("teacher_rows", {})[f"{teacher}-n{steps}"] = floor
            for r in [*floor, *rows]:
                def f(key, fmt="{:.4f}"):
                    return fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else "-"
                partial = "row" in r and "steps" in r and r["iterations"] < iterations
                lines.append(f"| {r['row']}{' (*partial*)' if partial else ''} | {r.get('iterations', '-')} | {f('trajectory_error')} | {f('fd_teacher', '{:.1f}')} | "
                             f"{f('fd_teacher_other', '{:.1f}')} | {f('precision', '{:.3f}')} | {f('recall', '{:.3f}')} | "
                             f"{f('sharpness', '{:.3f}')} | {f('prompt_accuracy', '{:.3f}')} | {f('worst_rise')} |")
            lines.append("")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "regimes.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "regimes.md").write_text("\n".join(lines))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--teachers", nargs="*", default=list(TEACHERS), choices=TEACHERS)
    parser.add_argument("--regimes", nargs="*", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--rows", nargs="*", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for teacher in args.teachers:
            for steps in sorted({REGIMES[r][0] for r in args.regimes}):
                print(f"[{time.strftime('%H:%M:%S')}] store {teacher} N = {steps}: "
                      f"{make_store(args.work, teacher, steps)}", flush=True)
        queue = [(t, g, row) for g in args.regimes for t in args.teachers for row in ROWS if row[0] in args.rows]
        with ThreadPoolExecutor(args.jobs) as pool:
            for line in pool.map(lambda job: train(args.work, *job, args.iterations, args.eval_every), queue):
                print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
                report(args.work, args.teachers, args.regimes, args.iterations)
    report(args.work, args.teachers, args.regimes, args.iterations)


if __name__ == "__main__":
    main()
