"""Convergence: every method on the digits teacher at batch 1, with the validation metrics every 250 iterations.

The paper's Fig. 5 is a curve over iterations; this benchmark draws it for every method, against iterations and
against wall-clock seconds, from the validation that `rapm train` itself runs (``eval_every``, ``val_fraction``:
rapm.validation). One store per N (600 trajectories of the digits teacher, N M = 40 DDIM steps, guidance 1.5), 100
of them held out by every run (the same split: seed 0, or ``val_seed=0`` in the seed rows), so every row is measured
on the same 100 prompts and noises:

* trajectory error: image-space RMS to the stored teacher end point (the N M-step DDIM the student was trained on),
  and to the teacher's 100-step DDIM from the same noise (``reference``);
* FD to the teacher: Fréchet distance, in the digits classifier's features, to the teacher's 100-step images of the
  same prompts and noises (fidelity to the teacher: what distillation aims at);
* FD to real digits (against the 300 held-out real digits), and prompt accuracy.

Each (row, N) is one rapm run directory under --work; a rerun continues unfinished runs (``--resume``, also to a
larger --iterations) and skips finished ones, so it can be stopped and restarted at any time. Runs go --jobs at a
time, each a fresh process with one torch thread.

    OMP_NUM_THREADS=1 python benchmarks/convergence.py --jobs 2            # hours on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/convergence.py --report-only       # tables and plots from what has run
    python benchmarks/convergence.py --quick                               # the flow at toy size

writes benchmarks/results/convergence.{json,md}, convergence-n{4,2}.png and convergence-long.png (the long rows:
the closest rows continued to --long-iterations, last in the queue); `python benchmarks/convergence_readme.py` then
writes the tables of docs/results/convergence.md from the JSON.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TRAJECTORIES = 600
HELD_OUT = 100
FINE_STEPS = 40

# (row name, --method, batch, --set fields). Base: the digits preset at batch 1 (the paper's setting), no EMA (the row sets
# come after the base: "rapm" turns its EMA back on).
PAIRED = ["adv_weight=0.1", "relative_weight=1"]  # the paired discriminators, updated every iteration (gan_loss, updates)
EMA = ["ema_decay=0.99", "ema_warmup=true"]  # the default recipe's EMA (every run here starts from ema_decay=0)
# The default recipe's relative weight until 2026-12-02, when the rows below moved it to 0. Every row of method rapm
# that leaves the weight to the method was run with 0.25: the row lists pin it (``_pin_old_default`` below), so a
# fresh run of such a row is the computation it names.
OLD_DEFAULT = ["relative_weight=0.25"]  # the weight those rows ran with
# The digits preset's learning rate when every row ran (1e-3 since 2026-12-08, tuned for the demo's batch 4 at 300
# iterations: benchmarks/results/demo_recipe.md): pinned, so a fresh run of a row is the computation it names
PRESET_LR = ["lr=3e-4"]
MAIN_ROWS = [  # in the order they run
    # the default recipe (rapm.methods.rapm.DEFAULT_RECIPE): the absolute terms alone (relative weight 0), no discriminator,
    # EMA 0.99 with warm-up; the run was first the ablation "abl-rel0-ema" (renamed with its seeds and long row)
    ("rapm", "rapm", 1, ["relative_weight=0", *EMA]),
    ("rapm-rel0.25", "rapm", 1, EMA),  # the default until 2026-12-02: the relative terms at a quarter of the absolute
    ("sfd", "sfd", 1, []),
    ("rapm-paper", "rapm-paper", 1, []),  # Alg. 2 as written: unpaired hinge, alternating updates, weights 1
    ("rapm-paired", "rapm", 1, PAIRED),  # the paired (relativistic) discriminators, both updates every iteration
    ("rapm-nogan", "rapm", 1, ["adv_weight=0", "relative_weight=1"]),  # the two Huber terms only, weight 1
    ("pcm-b1", "pcm", 1, []),
    ("progressive-rdd", "progressive-rdd", 1, []),
    ("rapm-relative", "rapm-relative", 1, ["adv_weight=0.1"]),  # eq. 16 with D1: the paper's Fig. 3 ablation
    ("pcm-b4", "pcm", 4, []),
]
ABLATION_ROWS = [  # N = 4 only unless named; the first ones change one thing of rapm-paired
    ("abl-disc4", "rapm", 1, PAIRED + ["disc_every=4"]),  # a discriminator update every 4th iteration
    ("abl-l1", "rapm", 1, PAIRED + ["distance=l1"]),
    ("abl-rel0.5", "rapm", 1, ["adv_weight=0.1", "relative_weight=0.5"]),
    ("abl-alternate", "rapm", 1, PAIRED + ["updates=alternate"]),  # the paired loss with the paper's alternation
    ("abl-d1", "rapm", 1, PAIRED + ["disc_absolute=false"]),  # Huber terms + D1
    ("abl-d2", "rapm", 1, PAIRED + ["disc_relative=false"]),  # Huber terms + D2
    ("abl-hinge-both", "rapm", 1, PAIRED + ["gan_loss=hinge"]),  # the paper's loss with updates in every iteration
    # the rest change one thing of the previous default (rapm-rel0.25) without its EMA (abl-no-ema: no
    # discriminator, relative weight 0.25), or name their weight
    ("abl-no-ema", "rapm", 1, []),  # the previous default without its EMA (the default before the EMA joined it)
    ("abl-ema", "rapm", 1, ["ema_decay=0.99"]),  # the EMA without the warm-up
    ("abl-sfd-ema", "sfd", 1, ["ema_decay=0.99"]),  # SFD with the EMA (no warm-up): what the EMA does for the peer
    ("abl-wn", "rapm", 1, ["slot_weights=2,1,1,1"]),  # w_0 = 2: the last slot's absolute terms count double
    ("abl-delta2", "rapm", 1, ["delta=50"]),  # Δ = two fine steps (1000 / (N M) = 25 at N = 4)
    ("abl-nogan-rel0.5", "rapm", 1, ["relative_weight=0.5"]),  # the default recipe with the relative terms at 0.5
    ("abl-rel0.1", "rapm", 1, ["relative_weight=0.1"]),  # the default recipe with the relative terms at 0.1
    ("abl-rel0", "rapm", 1, ["relative_weight=0"]),  # the absolute pseudo-Huber terms alone (SFD with RAPM's distance)
    ("abl-l1-rel0.25", "rapm", 1, ["distance=l1"]),  # the default recipe with SFD's L1 distance
    ("abl-huber0.001", "rapm", 1, ["huber_c=0.001"]),  # the default recipe with a 10x smaller pseudo-Huber c
    ("abl-huber0.1", "rapm", 1, ["huber_c=0.1"]),  # c at the error's scale: quadratic (L2-like) below it
    ("abl-huber1", "rapm", 1, ["huber_c=1"]),  # c far above the errors: the pseudo-Huber is a scaled L2 throughout
    ("abl-l2", "rapm", 1, ["distance=l2"]),  # the default recipe with a plain mean squared error
    ("abl-sfd-l2", "sfd", 1, ["distance=l2"]),  # SFD with the squared error: what the distance does for the peer
    ("abl-step", "rapm", 1, ["lr_schedule=step"]),  # the learning rate / 10 from half the iterations on (SFD's)
    ("abl-sfd-step", "sfd", 1, ["lr_schedule=step"]),  # SFD with its own recipe's step schedule
    ("abl-cosine", "rapm", 1, ["lr_schedule=cosine"]),
    ("abl-sfd-cosine", "sfd", 1, ["lr_schedule=cosine"]),
    # The step schedule over a 3,000-iteration run (run with --ablation-iterations 3000): LR / 10 from 1,500 on, for
    # the default recipe, SFD with the same EMA, and SFD's own code recipe (L1, the step schedule, no EMA)
    ("abl-step-3k", "rapm", 1, [*EMA, "lr_schedule=step"]),
    ("abl-sfd-ema-step-3k", "sfd", 1, ["ema_decay=0.99", "lr_schedule=step"]),
    ("abl-sfd-step-3k", "sfd", 1, ["lr_schedule=step"]),
    # The relative position's frozen student is the EMA (a mean teacher): the relative term pulls toward the average
    ("abl-ema-target", "rapm", 1, ["ema_decay=0.99", "relative_target=ema"]),
    ("abl-ema-target-rel1", "rapm", 1, ["ema_decay=0.99", "relative_target=ema", "relative_weight=1"]),
    # Few trajectories, many passes (the paper: 1,000 trajectories for 20K iterations, 20 passes): 50 of the 500
    # training trajectories, the same 100 held out. Does the relative term regularise where the absolute one overfits?
    ("abl-few-rapm", "rapm", 1, ["train_trajectories=50"]),
    ("abl-few-sfd", "sfd", 1, ["train_trajectories=50"]),
    ("abl-few-rel0", "rapm", 1, ["train_trajectories=50", "relative_weight=0"]),
    ("abl-few-rel1", "rapm", 1, ["train_trajectories=50", "relative_weight=1"]),
    # the same three with the EMA (the default recipe, its absolute terms alone, SFD + EMA), and at 150 trajectories:
    # 20 passes in 3,000 iterations, the paper's ratio of iterations to trajectories
    ("abl-few-ema", "rapm", 1, ["train_trajectories=50", *EMA]),
    ("abl-few-rel0-ema", "rapm", 1, ["train_trajectories=50", "relative_weight=0", *EMA]),
    ("abl-few-sfd-ema", "sfd", 1, ["train_trajectories=50", "ema_decay=0.99"]),
    ("abl-t150-ema", "rapm", 1, ["train_trajectories=150", *EMA]),
    ("abl-t150-rel0-ema", "rapm", 1, ["train_trajectories=150", "relative_weight=0", *EMA]),
    ("abl-t150-sfd-ema", "sfd", 1, ["train_trajectories=150", "ema_decay=0.99"]),
    # What the default trails SFD + EMA by at N = 4 at 10,000 iterations (run with --ablation-iterations 10000): the
    # distance or the EMA's warm-up? The default with SFD's L1 (SFD + the default's EMA, warm-up included), and with
    # a 10x smaller pseudo-Huber c (RAPM's distance, L1-like down to smaller errors)
    ("abl-l1-ema", "rapm", 1, ["relative_weight=0", *EMA, "distance=l1"]),
    ("abl-huber0.001-ema", "rapm", 1, ["relative_weight=0", *EMA, "huber_c=0.001"]),
]
# Other seeds (LoRA init, data order, noise) of the closest rows, validated on the same held-out trajectories
# (val_seed=0): how much of a gap between them is one seed's luck. Each is its base row with seed=k added, named
# after the base (without "abl-") and the seed, in the order they run.
SEED_RUNS = [("rapm-rel0.25", 1), ("sfd", 1), ("abl-sfd-ema", 1), ("rapm-rel0.25", 2), ("abl-sfd-ema", 2),
             ("rapm", 1), ("rapm", 2),  # these two (then "rel0-ema-seed1", "-seed2"): is the old default's gap its relative term?
             ("abl-few-rapm", 1), ("abl-few-rel0", 1),  # few trajectories, many passes (no EMA): the relative term vs none
             ("abl-few-ema", 1), ("abl-few-rel0-ema", 1), ("abl-few-sfd-ema", 1),  # the same with the EMA
             ("abl-t150-ema", 1), ("abl-t150-rel0-ema", 1), ("abl-t150-sfd-ema", 1)]  # and on 150 trajectories


def _pin_old_default(rows: list[tuple]) -> list[tuple]:
    """Rows of method rapm that leave the relative weight to the method, with the 0.25 they were run with."""
    return [(name, method, batch, sets if method != "rapm" or any(x.startswith("relative_weight=") for x in sets)
             else [*OLD_DEFAULT, *sets]) for name, method, batch, sets in rows]


MAIN_ROWS, ABLATION_ROWS = _pin_old_default(MAIN_ROWS), _pin_old_default(ABLATION_ROWS)
_BASES = {row[0]: row for row in MAIN_ROWS + ABLATION_ROWS}
SEED_ROWS = [(f"{base.removeprefix('abl-')}-seed{k}", _BASES[base][1], _BASES[base][2],
              _BASES[base][3] + [f"seed={k}", "val_seed=0"]) for base, k in SEED_RUNS]
MAIN_ROWS += SEED_ROWS  # run to --iterations, like the main rows
# The closest rows run on to 20 passes over the 500 training trajectories (the paper's ratio: 20K iterations on 1,000
# trajectories), to --long-iterations: each is its base row under another name, and starts from a copy of the base's
# finished run directory where there is one (the same computation: a resumed run gives the losses of an uninterrupted
# one), so its first 3,000 iterations are the base's own.
LONG_OF = {"long-rapm": "rapm", "long-sfd-ema": "abl-sfd-ema", "long-rapm-rel0.25": "rapm-rel0.25",
           # and a second seed (the first two at N = 2 ran as "long-rapm-seed1" / "long-sfd-ema-seed1" of the old default)
           "long-rapm-rel0.25-seed1": "rapm-rel0.25-seed1", "long-sfd-ema-seed1": "sfd-ema-seed1",
           "long-rapm-seed1": "rapm-seed1"}
_BASES.update((row[0], row) for row in SEED_ROWS)
LONG_ROWS = [(row, *_BASES[base][1:]) for row, base in LONG_OF.items()]
SEED_OF = {row[0]: base for row, (base, _) in zip(SEED_ROWS, SEED_RUNS)}  # the seeds table: each beside its seed 0
COLUMNS = ("method", "steps", "batch", "iteration", "wall_s", "trajectory_error", "reference_error", "fd_teacher",
           "fd_real", "prompt_accuracy")


def make_store(work: Path, steps: int, trajectories: int, fine_steps: int) -> Path:
    from rapm.demo.prompts import training_prompts
    from rapm.trajectories import write_trajectories

    store = work / f"store-n{steps}"
    if (store / "manifest.json").exists() and json.loads((store / "manifest.json").read_text()).get("complete"):
        return store
    prompts = work / "prompts.txt"
    base = training_prompts()
    prompts.write_text("".join(base[i % len(base)] + "\n" for i in range(trajectories)))
    write_trajectories("digits", prompts, store, steps=steps, substeps=fine_steps // steps, seed=0, batch_size=200,
                       shard_size=200, progress=False, overwrite=True)
    return store


def run_dir(work: Path, steps: int, row: str) -> Path:
    return work / f"n{steps}-{row}"


def finished_iterations(run: Path) -> int:
    from rapm.run import latest_checkpoint

    last = latest_checkpoint(run) if (run / "config.json").exists() else None
    return int(last.name.split("-")[-1]) if last is not None else 0


def start_from_base(work: Path, steps: int, row: str, base_iterations: int) -> str:
    """A long row's run directory, copied from its base row's run once that has finished ``base_iterations`` (the
    lock file left out); "" where there is nothing to copy (the long row then trains from its start)."""
    import shutil

    run, base = run_dir(work, steps, row), run_dir(work, steps, LONG_OF[row])
    if run.exists() or finished_iterations(base) < base_iterations:
        return ""
    tmp = run.with_name(run.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns(".rapm-lock"))
    tmp.rename(run)
    return f" (from {base.name} at {finished_iterations(run)})"


def train_run(run: Path, teacher: str, store: Path, method: str, batch: int, sets: list[str], iterations: int,
              eval_every: int, note: str = "") -> str:
    """Train (or resume) ``run`` to ``iterations`` in a fresh `rapm train` process with one torch thread: a
    checkpoint every ``eval_every``, the ``--set`` fields ``sets`` on a fresh start. A line saying what happened."""
    done = finished_iterations(run)
    if done >= iterations:
        return f"{run.name}: finished ({done} iterations)"
    common = ["--iterations", str(iterations), "--no-progress", "--checkpoint-every", str(eval_every)]
    if done > 0:
        cmd = ["train", "--out", str(run), "--resume", *common]
    else:
        cmd = ["train", "--teacher", teacher, "--store", str(store), "--out", str(run), "--method", method,
               "--batch-size", str(batch), "--seed", "0", *common, "--overwrite"]
        for s in sets:
            cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = run.parent / f"{run.name}.log"
    tick = time.perf_counter()
    with open(log, "a") as f:
        code = subprocess.run([sys.executable, "-m", "rapm", *cmd], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        return f"{run.name}: FAILED (exit {code}; see {log})"
    return f"{run.name}: trained to {iterations}{note} in {time.perf_counter() - tick:.0f} s"


def train_row(work: Path, store: Path, steps: int, row: str, method: str, batch: int, sets: list[str],
              iterations: int, eval_every: int, val_fraction: float, base_iterations: int = 0) -> str:
    run = run_dir(work, steps, row)
    copied = start_from_base(work, steps, row, base_iterations) if row in LONG_OF else ""
    base = ["sample_every=0", "ema_decay=0", f"eval_every={eval_every}", f"val_fraction={val_fraction}",
            "val_reference_steps=100", "keep_checkpoints=1", *PRESET_LR]
    return train_run(run, "digits", store, method, batch, [*base, *sets], iterations, eval_every, copied)


def calibrate(work: Path, store: Path, steps: int, row: str, method: str, batch: int, sets: list[str],
              iterations: int = 30) -> float:
    """Seconds per iteration of a row on this machine, alone: the median of the last 2/3 of a short fresh run (no
    validation). The runs' own wall clocks are kept too, but on a shared machine they measure the neighbours."""
    cal = work / "calibration.json"
    table = json.loads(cal.read_text()) if cal.exists() else {}
    key = f"n{steps}-{row}"
    if key in table:
        return table[key]
    run = work / f".calibrate-{key}"
    cmd = [sys.executable, "-m", "rapm", "train", "--teacher", "digits", "--store", str(store), "--out", str(run),
           "--method", method, "--batch-size", str(batch), "--seed", "0", "--iterations", str(iterations),
           "--no-progress", "--checkpoint-every", str(iterations), "--overwrite", "--set", "sample_every=0",
           "--set", "ema_decay=0", "--set", "eval_every=0"]
    for x in sets:
        cmd += ["--set", x]
    subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, check=True)
    seconds = sorted(json.loads(line)["seconds"] for line in (run / "logs.jsonl").read_text().splitlines()
                     [iterations // 3:])
    table = {**(json.loads(cal.read_text()) if cal.exists() else {}), key: seconds[len(seconds) // 2]}  # re-read:
    cal.write_text(json.dumps(table, indent=1) + "\n")  # two calibrations (disjoint --rows) may share the file
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    return table[key]


def timing_row(row: str) -> str:
    """The row whose calibrated seconds per iteration ``row`` is charged at. A long row is its base's computation and
    a seed row makes its base's passes (another seed changes the numbers, not the work), so both are charged at the
    base's timing: one computation, one clock, not the clocks of the sessions its repeats were timed in (those
    came out up to 15% apart for the same work)."""
    while row in LONG_OF or row in SEED_OF:
        row = LONG_OF.get(row) or SEED_OF[row]
    return row


def validations(run: Path):
    """Each validation entry of a run's logs.jsonl with the training seconds before it (the iterations' own clocks),
    up to a torn last line."""
    wall = 0.0
    if not (run / "logs.jsonl").exists():
        return
    for line in (run / "logs.jsonl").read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            break
        if e.get("phase") != "validation":
            wall += e.get("seconds", 0.0)
            continue
        yield e, wall


def read_curve(run: Path, row: str, steps: int, batch: int) -> list[dict]:
    """One row per validation: the training wall time before it (sum of the iterations' seconds) and its metrics."""
    out = []
    for e, wall in validations(run):
        out.append({"method": row, "steps": steps, "batch": batch, "iteration": e["step"], "run_wall_s": round(wall, 2),
                    "trajectory_error": e["val_trajectory_error"], "reference_error": e.get("val_reference_error"),
                    "fd_teacher": e.get("val_fd_teacher"), "fd_real": e.get("val_fd_real"),
                    "prompt_accuracy": e.get("val_prompt_accuracy"),
                    **{k[4:]: v for k, v in e.items() if k.startswith("val_slot_error/")}})
    # A resumed run may log a validation twice (before and after a kill): keep the last of each iteration.
    last = {r["iteration"]: r for r in out}
    curve = [last[k] for k in sorted(last)]
    cal = run.parent / "calibration.json"
    timed = json.loads(cal.read_text()) if cal.exists() else {}
    per_it = timed.get(run_dir(run.parent, steps, timing_row(row)).name, timed.get(run.name))
    for r in curve:  # wall_s: the training time on this machine alone (calibrated), else the run's own clock
        r["seconds_per_iteration"] = per_it
        r["wall_s"] = round(r["iteration"] * per_it, 1) if per_it else r["run_wall_s"]
    return curve


def teacher_rows(store: Path, steps: int, val_fraction: float, teacher_name: str = "digits") -> list[dict]:
    """The teacher's DDIM at N steps and at 100 steps (the reference) on the same held-out split, same metrics; and
    the floors, the teacher's DDIM-100 from other noise measured as a student would be among them (``other_noise``)."""
    import torch

    from rapm.distribution import frechet_distance
    from rapm.store import open_store
    from rapm.teacher import load_teacher
    from rapm.validation import Validation, split_indices

    teacher = load_teacher(teacher_name)
    st = open_store(store)
    _, val_ids = split_indices(len(st), val_fraction, 0)
    validation = Validation(teacher, st, val_ids, torch.device("cpu"), torch.float32, reference_steps=100)
    rows = []
    for k in (steps, 100):
        images = (validation.reference_images if k == 100 else  # the 100-step DDIM is the validation's reference
                  validation.decode([validation.teacher_ddim(b, k) for b in validation.batches]))
        m = validation.measure(images)
        rows.append({**{key[4:]: v for key, v in m.items()},  # every metric, the distribution ones too
                     "method": f"teacher-ddim{k}", "steps": k, "batch": None, "iteration": None, "wall_s": None,
                     "trajectory_error": m["val_trajectory_error"], "reference_error": m.get("val_reference_error"),
                     "fd_teacher": m.get("val_fd_teacher"), "fd_real": m.get("val_fd_real"),
                     "prompt_accuracy": m.get("val_prompt_accuracy"), "for_steps": steps})
    # Floors at the same sample size: real digits vs the held-out reals; the teacher's 100-step images from other
    # noise vs its images of the same prompts (what a perfect student drawing independent noise would score).
    floors = {"fd_real_floor": validation.metrics.real_floor(len(val_ids))}
    gen = torch.Generator().manual_seed(123)
    finals = [validation.teacher_ddim(b, 100, torch.randn(b.latents[:, 0].shape, generator=gen))
              for b in validation.batches]
    floors["fd_teacher_floor"] = frechet_distance(validation.metrics.features(validation.decode(finals)),
                                                  validation.teacher_features)
    floors["other_noise"] = validation.measure(validation.decode(finals))
    return rows, floors


def at_budget(curve: list[dict], seconds: float) -> dict | None:
    """The last validation whose training wall time is within ``seconds``."""
    within = [r for r in curve if r["wall_s"] <= seconds]
    return within[-1] if within else None


def plot(curves: dict[str, list[dict]], teacher: list[dict], steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("trajectory_error", "trajectory error (to stored z~_0)"), ("fd_teacher", "FD to the teacher"),
               ("fd_real", "FD to real digits")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for row, curve in curves.items():
        if not curve:
            continue
        style = dict(linewidth=2.4 if row in ("rapm", "sfd") else 1.1, linestyle="--" if row.startswith("abl-") else "-")
        for col, (key, title) in enumerate(metrics):
            pts = [(r["iteration"], r["wall_s"], r[key]) for r in curve if r[key] is not None]
            if not pts:
                continue
            it, wall, v = zip(*pts)
            axes[0, col].plot(it, v, label=row, **style)
            axes[1, col].plot(wall, v, label=row, **style)
            axes[0, col].set_title(title)
    for col, (key, _) in enumerate(metrics):
        for t in teacher:
            if t["steps"] == steps and t[key] is not None:
                for ax in axes[:, col]:
                    ax.axhline(t[key], color="gray", linestyle=":", linewidth=1)
                    ax.text(ax.get_xlim()[0], t[key], f" teacher DDIM-{steps}", fontsize=7, color="gray", va="bottom")
        axes[0, col].set_xlabel("iteration")
        axes[1, col].set_xlabel("training wall-clock seconds")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.set_yscale("log")
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"digits teacher, N = {steps}, batch 1 unless named: validation on {HELD_OUT} held-out trajectories")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_long(curves: dict[int, dict[str, list[dict]]], path: Path) -> None:
    """The long rows' trajectory error against iterations, one panel per N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    for ax, (steps, rows) in zip(axes[0], sorted(curves.items(), reverse=True)):
        for row, curve in rows.items():
            pts = [(r["iteration"], r["trajectory_error"]) for r in curve if r["iteration"] > 0]
            ax.plot(*zip(*pts), label=f"{row} (as {LONG_OF[row]})", linewidth=2.0 if row == "long-rapm" else 1.2)
        ax.set_title(f"N = {steps}: trajectory error on {HELD_OUT} held-out trajectories")
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def last_mean(curve: list[dict], k: int = 3) -> float | None:
    """The trajectory error averaged over the last k validations (one validation's noise is ~0.002 here)."""
    tail = [r["trajectory_error"] for r in curve[-k:] if r["iteration"] > 0]
    return sum(tail) / len(tail) if len(tail) == k else None


def worst_rise(curve: list[dict]) -> float | None:
    """The largest rise of the trajectory error from one validation to the next (0: the curve never goes up): how
    smooth the curve is (the paper's Fig. 5)."""
    errors = [r["trajectory_error"] for r in curve if r["iteration"] > 0]
    return max([0.0] + [b - a for a, b in zip(errors, errors[1:])]) if len(errors) > 1 else None


def fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def seeds_table(done: dict[str, list[dict]]) -> list[str]:
    """Each seeded row beside its seed-0 row: the last-3 mean of every seed, their mean and spread (max - min)."""
    groups: dict[str, list[str]] = {}
    for row, base in SEED_OF.items():
        if row in done and base in done:
            groups.setdefault(base, [base]).append(row)
    if not groups:
        return []
    md = ["", "Seeds (LoRA init, data order, noise; every seed validated on the same held-out trajectories): the "
          "last-3 mean trajectory error of each seed, and the last FD to the teacher:", "",
          "| method | seeds | last 3 mean, by seed | mean | spread | FD to teacher, by seed |",
          "| --- | ---: | --- | ---: | ---: | --- |"]
    for base, rows in groups.items():
        means = [last_mean(done[r]) for r in rows]
        if None in means:
            continue
        md.append(f"| {base} | {len(rows)} | {' / '.join(f'{m:.4f}' for m in means)} | {sum(means) / len(means):.4f} | "
                  f"{max(means) - min(means):.4f} | {' / '.join(fmt(done[r][-1]['fd_teacher'], '.1f') for r in rows)} |")
    return md


def report(work: Path, steps_list: list[int], rows_by_n: dict[int, list], results: Path, command: str, val_fraction: float,
           extra: dict) -> None:
    all_rows: list[dict] = []
    long_curves: dict[int, dict[str, list[dict]]] = {}
    md = ["# Convergence on the digits teacher", "",
          f"Command: `{command}` ({datetime.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPUs, one "
          f"torch thread per run). Wall-clock seconds are iterations x each row's seconds per iteration timed alone on "
          f"this machine (`--calibrate`: the runs themselves shared it with other work, so their own clocks measure the "
          f"neighbours; both are in the JSON). "
          f"{TRAJECTORIES} trajectories per N ({FINE_STEPS} DDIM steps each, guidance 1.5), {HELD_OUT} held out "
          f"(never trained on) and measured every 250 iterations. Trajectory error: image RMS to the stored teacher end "
          f"point; FD to the teacher: to the teacher's 100-step images of the same prompts and noise; FD to real: to the "
          f"held-out real digits. Last 3 mean: the trajectory error averaged over the last three validations; worst "
          f"rise: the largest rise of the trajectory error between two validations (0 = the curve never goes up). Base "
          f"settings: the digits preset at batch 1, no EMA, unless a row's name says otherwise.", ""]
    for steps in steps_list:
        store = work / f"store-n{steps}"
        curves = {row: read_curve(run_dir(work, steps, row), row, steps, batch) for row, _, batch, _ in rows_by_n[steps]}
        teacher, floors = teacher_rows(store, steps, val_fraction) if (store / "manifest.json").exists() else ([], {})
        all_rows += teacher + [r for c in curves.values() for r in c]
        plot({row: c for row, c in curves.items() if row not in SEED_OF and row not in LONG_OF}, teacher, steps,
             results / f"convergence-n{steps}.png")
        long_curves[steps] = {row: curves[row] for row in LONG_OF if curves.get(row)}
        done = {row: c for row, c in curves.items() if c}
        if not done:
            continue
        md += [f"## N = {steps}", "", f"![curves](convergence-n{steps}.png)", ""]
        md += [f"FD floors at {HELD_OUT} samples: real digits vs held-out real {fmt(floors.get('fd_real_floor'), '.1f')}; "
               f"the teacher's images from independent noise vs the same prompts {fmt(floors.get('fd_teacher_floor'), '.1f')}.", ""]
        md += ["At the last validation of each run:", "",
               "| method | batch | iterations | wall s | trajectory error ↓ | last 3 mean ↓ | worst rise | to 100-step ↓ | "
               "FD to teacher ↓ | FD to real ↓ | prompt acc. ↑ |",
               "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for t in teacher:
            md.append(f"| {t['method']} |  |  |  | {fmt(t['trajectory_error'], '.4f')} |  |  | {fmt(t['reference_error'], '.4f')} | "
                      f"{fmt(t['fd_teacher'], '.1f')} | {fmt(t['fd_real'], '.1f')} | {fmt(100 * t['prompt_accuracy'], '.1f')}% |")
        for row, c in done.items():
            r = c[-1]
            md.append(f"| {row} | {r['batch']} | {r['iteration']} | {r['wall_s']:.0f} | {r['trajectory_error']:.4f} | "
                      f"{fmt(last_mean(c), '.4f')} | {fmt(worst_rise(c), '.4f')} | "
                      f"{fmt(r['reference_error'], '.4f')} | {fmt(r['fd_teacher'], '.1f')} | {fmt(r['fd_real'], '.1f')} | "
                      f"{fmt(100 * r['prompt_accuracy'], '.1f')}% |")
        main = [c for row, c in done.items() if not row.startswith("abl-") and row not in SEED_OF and row not in LONG_OF]
        ends = sorted(c[-1]["wall_s"] for c in main if c[-1]["iteration"] > 0)
        if ends:  # the default's own training time (else the median run's), its half and its quarter
            top = done["rapm"][-1]["wall_s"] if "rapm" in done and done["rapm"][-1]["iteration"] > 0 else ends[len(ends) // 2]
            budgets = [top / 4, top / 2, top]  # unrounded: the default's own last validation is within the last
            md += ["", f"At equal training wall-clock budgets ({', '.join(f'{b:.0f} s' for b in budgets)}): the last validation "
                   "within each budget, trajectory error / FD to teacher (* = the run had ended before the budget; "
                   "its last value):", "",
                   "| method | " + " | ".join(f"{b:.0f} s" for b in budgets) + " |", "| --- |" + " ---: |" * len(budgets)]
            for row, c in done.items():
                if row in LONG_OF:
                    continue  # its base's curve to the base's end
                cells = []
                for b in budgets:
                    r = at_budget(c, b)
                    mark = "*" if r is c[-1] and c[-1]["wall_s"] < b else ""
                    cells.append(f"{r['trajectory_error']:.4f} / {fmt(r['fd_teacher'], '.1f')}{mark}" if r else "")
                md.append(f"| {row} | " + " | ".join(cells) + " |")
        md += seeds_table(done)
        md.append("")
    if any(long_curves.values()):
        plot_long(long_curves, results / "convergence-long.png")
    results.mkdir(parents=True, exist_ok=True)
    out = {"date": datetime.date.today().isoformat(), "command": command, "trajectories": TRAJECTORIES,
           "held_out": HELD_OUT, "fine_steps": FINE_STEPS, **extra, "rows": all_rows}
    (results / "convergence.json").write_text(json.dumps(out, indent=1) + "\n")
    (results / "convergence.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/convergence"))
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--iterations", type=int, default=3000, help="the main rows' iterations")
    ap.add_argument("--ablation-iterations", type=int, default=1000)
    ap.add_argument("--long-iterations", type=int, default=10_000, help="the long rows' iterations (LONG_OF)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--rows", nargs="*", help="only these rows (names as in the tables)")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--report-only", action="store_true", help="tables and plots from the runs as they are")
    ap.add_argument("--no-report", action="store_true", help="train only (a queue of calls reports once, at its end)")
    ap.add_argument("--calibrate", action="store_true",
                    help="time each row that has a run alone on this machine (30 iterations; run it on an idle machine)")
    ap.add_argument("--quick", action="store_true", help="toy sizes, for a smoke run")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    global TRAJECTORIES, HELD_OUT
    if args.quick:
        TRAJECTORIES, HELD_OUT = 24, 8
        args.iterations, args.ablation_iterations, args.long_iterations, args.eval_every = 4, 2, 6, 2
    val_fraction = HELD_OUT / TRAJECTORIES
    import torch

    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    rows_by_n = {n: [r for r in MAIN_ROWS + LONG_ROWS + ([] if args.no_ablations or (n != 4 and not args.rows) else ABLATION_ROWS)
                     if not args.rows or r[0] in args.rows] for n in args.steps}  # ablations at N = 2 when named
    command = "python benchmarks/convergence.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    if args.calibrate:
        for n in args.steps:
            for row, method, batch, sets in rows_by_n[n]:
                if (run_dir(args.work, n, row) / "logs.jsonl").exists():
                    per_it = calibrate(args.work, args.work / f"store-n{n}", n, row, method, batch, sets)
                    print(f"n{n}-{row}: {per_it:.3f} s/iteration", file=sys.stderr, flush=True)
    elif not args.report_only:
        stores = {n: make_store(args.work, n, TRAJECTORIES, FINE_STEPS if not args.quick else 8) for n in args.steps}
        # The first N's main rows, then its ablations, then the other N's rows: what finishes first is what matters most.
        first = args.steps[0]
        main_rows = [r for r in rows_by_n[first] if not r[0].startswith("abl-") and r[0] not in LONG_OF]
        ablations = [r for r in rows_by_n[first] if r[0].startswith("abl-")]
        jobs = [(first, r) for r in main_rows[:5]] + [(first, r) for r in ablations[:3]]
        jobs += [(first, r) for r in main_rows[5:]] + [(first, r) for r in ablations[3:]]
        jobs += [(n, r) for n in args.steps[1:] for r in rows_by_n[n] if r[0] not in LONG_OF]
        jobs += [(n, r) for n in args.steps for r in rows_by_n[n] if r[0] in LONG_OF]  # last: from their bases
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(train_row, args.work, stores[n], n, row, method, batch, sets,
                                   args.long_iterations if row in LONG_OF else
                                   args.ablation_iterations if row.startswith("abl-") else args.iterations,
                                   args.eval_every, val_fraction, args.iterations) for n, (row, method, batch, sets) in jobs]
            for f in futures:
                print(f.result(), file=sys.stderr, flush=True)
    if args.no_report:
        return
    report(args.work, args.steps, rows_by_n, args.results if not args.quick else args.work / "results", command,
           val_fraction, {"iterations": args.iterations, "ablation_iterations": args.ablation_iterations,
                          "wall_seconds_this_call": round(time.perf_counter() - started)})


if __name__ == "__main__":
    main()
