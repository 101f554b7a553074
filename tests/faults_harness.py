"""The fault harness (benchmarks/faults.py's machinery, run briefly by tests/test_faults.py): a verb as a real process
killed at random moments and resumed, the checks of what a reader sees on disk after each kill, and the comparison with
an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repo root
PROMPTS = ["a photo of a cat", "a red car", "a blue dog", "a photo of a dog", "a cat", "a red cat", "a blue car", "a dog"]
# Tiny student and discriminator, as in tests/test_train.py; EMA on, so the EMA state is resumed too.
# The discriminators on (adv_weight): a kill must also keep their adapters, heads and optimizer exact.
TRAIN_CONFIG = dict(adv_weight=0.1, lora_rank=4, lora_alpha=4, disc_lora_rank=2, disc_lora_alpha=2, disc_heads_per_level=1, lr=1e-3,
                    disc_lr=1e-3, sample_every=0, batch_size=1, keep_checkpoints=2, checkpoint_every=2, ema_decay=0.9)
# One trajectory a shard, so kills land between, inside and just after shard writes.
TRAJECTORY_SETTINGS = dict(steps=2, substeps=5, guidance=3.0, seed=0, batch_size=1, shard_size=1, dtype="float16")


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(f"{PROMPTS[i % len(PROMPTS)]} {i}\n" for i in range(count)))
    return path


def environment() -> dict:
    """One torch thread (stores are byte-identical only at the same thread count); this checkout's rapm first."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def rapm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rapm", *args]


def edit_manifest(store: Path, edit, checksum: bool = True) -> Path:
    """Apply ``edit`` to a store's manifest in place; with ``checksum`` its own sha256 is updated as an attacker would."""
    from rapm.store import manifest_bytes

    f = store / "manifest.json"
    manifest = json.loads(f.read_text())
    edit(manifest)
    f.write_bytes(manifest_bytes(manifest) if checksum else json.dumps(manifest).encode())
    return f


def rewrite_shard(store: Path, k: int, edit) -> Path:
    """Change shard k's tensors and update its sha256 and size everywhere, as an attacker would."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    f = store / f"shard-{k:05d}.safetensors"
    with safe_open(str(f), "pt") as h:
        metadata = h.metadata()
    tensors = load_file(str(f))
    edit(tensors)
    data = save(tensors, metadata=metadata)
    f.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    edit_manifest(store, lambda m: m["shards"][k].update(sha256=digest, bytes=len(data)))
    return f


def files_digest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part in skip for part in p.relative_to(folder).parts)}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


# --- one verb, killed and resumed ---------------------------------------------------------------------------------------

@dataclass
class Job:
    """How to run one verb, see its progress and check its files; the harness does the rest."""

    name: str
    out: Path
    command: callable  # () -> argv for the next run (fresh or resume)
    launched: callable  # () -> units of work the next run starts from (called just before it starts)
    progress: callable  # () -> units of work complete on disk (iterations logged, shards done)
    check: callable  # () -> list of problems a reader would meet now
    unit_seconds: float  # about how long one unit takes, to spread kills over it


@dataclass
class KillReport:
    kills: list[dict] = field(default_factory=list)
    runs: int = 0
    problems: list[str] = field(default_factory=list)
    max_bytes: int = 0
    seconds: float = 0.0
    redone: int = 0  # units of work done before a kill and done again after it


def run_to_end(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=environment(), capture_output=True, text=True, timeout=timeout)


def start(argv: list[str]) -> subprocess.Popen:
    """The uninterrupted run, in the background while the killed one runs (both one thread; the result is the same)."""
    return subprocess.Popen(argv, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted {what} failed: {err[-3000:]}")


def kill_and_resume(job: Job, kills: int, rng: random.Random, startup_kills: float = 0.2, max_units: int = 4,
                    startup_seconds: tuple[float, float] = (0.5, 6.0), timeout: float = 600) -> KillReport:
    """SIGKILL ``job`` ``kills`` times at random moments, checking its files after each, then let it finish."""
    report = KillReport()
    start = time.perf_counter()
    while len(report.kills) < kills:
        base = job.launched()
        if report.kills:
            report.kills[-1]["units_resumed_from"] = base
        err = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the process
        proc = subprocess.Popen(job.command(), env=environment(), stdout=subprocess.DEVNULL, stderr=err, text=True,
                                start_new_session=True)
        report.runs += 1
        launched = time.perf_counter()
        if rng.random() < startup_kills:  # somewhere in start-up: imports, loading, the first files
            mode, wait_units = "start-up", 0
            deadline = launched + rng.uniform(*startup_seconds)
            while time.perf_counter() < deadline and proc.poll() is None:
                time.sleep(0.02)
        else:  # a random moment after the k-th new unit of work: inside work, or inside a write
            mode, wait_units = "work", rng.randint(1, max_units)
            while proc.poll() is None and job.progress() < base + wait_units:
                if time.perf_counter() - launched > timeout:
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0, job.unit_seconds))
        if proc.poll() is not None:  # it finished (or failed) before the kill: nothing left to kill
            if proc.returncode != 0:
                err.seek(0)
                report.problems.append(f"{job.name}: run {report.runs} exited {proc.returncode} before its kill: "
                                       f"{err.read()[-2000:]}")
            err.close()
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        err.close()
        problems = job.check()
        report.max_bytes = max(report.max_bytes, folder_bytes(job.out))
        report.kills.append({"mode": mode, "seconds_after_start": round(time.perf_counter() - launched, 3),
                             "units_before": base, "units_at_kill": job.progress(), "problems": problems})
        report.problems += [f"{job.name}: after kill {len(report.kills)}: {p}" for p in problems]
    if report.kills:
        report.kills[-1]["units_resumed_from"] = job.launched()
    done = run_to_end(job.command(), timeout)
    report.runs += 1
    if done.returncode != 0:
        report.problems.append(f"{job.name}: the final run exited {done.returncode}: {done.stderr[-2000:]}")
    report.max_bytes = max(report.max_bytes, folder_bytes(job.out))
    report.seconds = time.perf_counter() - start
    report.redone = sum(k["units_at_kill"] - k.get("units_resumed_from", k["units_at_kill"]) for k in report.kills)
    return report


# --- rapm trajectories --------------------------------------------------------------------------------------------------

def trajectories_args(teacher: Path, prompts: Path, out: Path, settings: dict, overwrite: bool = False) -> list[str]:
    """`rapm trajectories`'s arguments (after `rapm`): the same settings resume a store; ``overwrite`` replaces one."""
    return ["trajectories", "--teacher", str(teacher), "--prompts", str(prompts), "--out", str(out), "--no-progress",
            *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()], *(["--overwrite"] if overwrite else [])]


def trajectories_argv(teacher: Path, prompts: Path, out: Path, settings: dict) -> list[str]:
    return rapm_command(*trajectories_args(teacher, prompts, out, settings))


def store_problems(out: Path) -> list[str]:
    """What a reader or a resuming writer would take as complete, checked: done-records against their shards' bytes."""
    from rapm.files import sha256_file
    from rapm.store import MANIFEST, open_store
    from rapm.store_writer import done_record, shard_complete

    problems = []
    manifest = out / MANIFEST
    if not manifest.exists():
        return problems
    m = json.loads(manifest.read_text())  # atomic: it parses or it is absent
    for k in range((m["count"] + m["shard_size"] - 1) // m["shard_size"]):
        start = k * m["shard_size"]
        record = shard_complete(out, k, start, min(m["shard_size"], m["count"] - start))
        if record is not None and sha256_file(out / record["file"]) != record["sha256"]:
            problems.append(f"{out / record['file']}: taken as complete by {done_record(out, k)} but its sha256 differs")
    if m.get("complete"):
        try:
            open_store(out, verify=True)
        except Exception as e:  # noqa: BLE001 - any failure is a problem to report
            problems.append(f"{out}: marked complete but does not open: {e}")
    return problems


def trajectories_job(teacher: Path, prompts: Path, out: Path, settings: dict, unit_seconds: float) -> Job:
    from rapm.store import DONE

    def done() -> int:
        return len(list((out / DONE).glob("*.json"))) if (out / DONE).is_dir() else 0

    return Job("trajectories", out, lambda: trajectories_argv(teacher, prompts, out, settings), done, done,
               lambda: store_problems(out), unit_seconds)


def trajectories_faults(teacher: Path, prompts: Path, folder: Path, settings: dict, kills: int, rng: random.Random,
                        unit_seconds: float = 0.05, max_units: int = 3, startup_seconds=(0.5, 6.0)) -> dict:
    """An uninterrupted store, and one killed ``kills`` times and rerun; returns the figures and any problems."""
    straight = folder / "straight"
    plain = start(trajectories_argv(teacher, prompts, straight, settings))
    killed = folder / "killed"
    report = kill_and_resume(trajectories_job(teacher, prompts, killed, settings, unit_seconds), kills, rng,
                             max_units=max_units, startup_seconds=startup_seconds)
    finish(plain, "rapm trajectories")
    problems = list(report.problems)
    a, b = files_digest(straight), files_digest(killed)
    if a != b:
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        problems.append(f"the resumed store differs from the uninterrupted one in {differ}")
    count = json.loads((straight / "manifest.json").read_text())["count"]
    lost = count if a != b else 0
    survived = sum(not k["problems"] for k in report.kills) if not problems else 0
    return {"kills": len(report.kills), "survived": survived, "runs": report.runs, "trajectories": count, "trajectories_lost": lost,
            "byte_identical": a == b, "store_bytes": folder_bytes(straight), "max_bytes_while_killed": report.max_bytes,
            "shards_redone": report.redone, "seconds": round(report.seconds, 1), "kill_log": report.kills,
            "problems": problems}


# --- rapm train ---------------------------------------------------------------------------------------------------------

def train_args(teacher: Path, store: Path, run: Path, config_file: Path, overwrite: bool = False) -> list[str]:
    """`rapm train`'s arguments (after `rapm`): --resume once the run has its config, unless ``overwrite`` starts
    it over."""
    if (run / "config.json").exists() and not overwrite:
        return ["train", "--out", str(run), "--resume", "--no-progress"]
    return ["train", "--teacher", str(teacher), "--store", str(store), "--out", str(run), "--config", str(config_file),
            "--no-progress", *(["--overwrite"] if overwrite else [])]


def train_argv(teacher: Path, store: Path, run: Path, config_file: Path) -> list[str]:
    return rapm_command(*train_args(teacher, store, run, config_file))


def logged_lines(run: Path) -> int:
    """Complete lines of logs.jsonl (a kill can cut the last one)."""
    try:
        return (run / "logs.jsonl").read_text().count("\n")
    except OSError:
        return 0


class TrainProgress:
    """Iterations done by the current process: the resume point, then the lines of the logs.jsonl it rewrote.

    A resume first cuts logs.jsonl back to its checkpoint (a new file, by rename); until then the lines of the killed
    process are still there and do not count.
    """

    def __init__(self, run: Path):
        self.log, self.run, self.base, self.inode = run / "logs.jsonl", run, 0, None

    def launched(self) -> int:
        from rapm.run import CHECKPOINT_PREFIX, latest_checkpoint

        last = latest_checkpoint(self.run)
        self.base = int(last.name[len(CHECKPOINT_PREFIX):]) if last else 0
        self.inode = self.log.stat().st_ino if self.log.exists() else None
        return self.base

    def __call__(self) -> int:
        try:
            if self.inode is not None and self.log.stat().st_ino == self.inode:
                return self.base
        except OSError:
            return self.base
        return logged_lines(self.run)


def run_problems(run: Path, keep: int) -> list[str]:
    """Every checkpoint that checkpoints() lists loads and is the step it names; checkpoints/ stays bounded."""
    import torch

    from rapm.run import CHECKPOINT_PREFIX, checkpoints, load_checkpoint

    problems = []
    for path in checkpoints(run):
        try:
            state = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{path}: listed as complete but does not load: {e}")
            continue
        if state["step"] != int(path.name[len(CHECKPOINT_PREFIX):]):
            problems.append(f"{path}: holds step {state['step']}")
        if not all(torch.isfinite(v).all() for v in state["student"].values()):
            problems.append(f"{path}: non-finite student weights")
    folder = run / "checkpoints"
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if len(entries) > keep + 1:  # keep complete ones, plus one being written or not yet rotated out
        problems.append(f"{folder} holds {len(entries)} entries ({entries}), more than keep_checkpoints + 1 = {keep + 1}")
    return problems


def leftovers(run: Path) -> list[str]:
    """Temp files or folders (and a lock), after a run that finished; the marker that says rapm made the folder stays."""
    from rapm.folders import MARKERS

    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if (p.name.startswith(".") or p.name.endswith(".tmp")) and p.name not in MARKERS.values())


def train_losses(run: Path) -> list[tuple[int, str, float]]:
    return [(e["step"], e["phase"], e["loss"]) for e in map(json.loads, (run / "logs.jsonl").read_text().splitlines())
            if e["phase"] != "validation"]  # validation lines (eval_every) carry no training loss


def compare_losses(a: list, b: list, rel: float = 1e-5, abs_: float = 1e-7) -> list[str]:
    if [x[:2] for x in a] != [x[:2] for x in b]:
        return [f"logs.jsonl steps differ: {len(a)} entries uninterrupted, {len(b)} resumed"]
    return [f"step {sa} ({pa}): loss {la!r} uninterrupted, {lb!r} resumed" for (sa, pa, la), (_, _, lb) in zip(a, b)
            if abs(la - lb) > abs_ + rel * abs(la)]


def train_faults(teacher: Path, store: Path, folder: Path, iterations: int, kills: int, rng: random.Random,
                 unit_seconds: float = 0.1, max_units: int = 4, startup_seconds=(0.5, 6.0)) -> dict:
    """An uninterrupted run, then one killed ``kills`` times and resumed; returns the figures and any problems."""
    import torch

    from rapm.run import checkpoints, load_checkpoint

    config = {**TRAIN_CONFIG, "iterations": iterations}
    config_file = folder / "train.json"
    config_file.write_text(json.dumps(config))
    straight = folder / "run-straight"
    plain = start(train_argv(teacher, store, straight, config_file))
    killed = folder / "run-killed"
    keep = config["keep_checkpoints"]
    progress = TrainProgress(killed)
    job = Job("train", killed, lambda: train_argv(teacher, store, killed, config_file), progress.launched, progress,
              lambda: run_problems(killed, keep), unit_seconds)
    report = kill_and_resume(job, kills, rng, max_units=max_units, startup_seconds=startup_seconds)
    finish(plain, "rapm train")
    problems = list(report.problems)
    problems += compare_losses(train_losses(straight), train_losses(killed)) if (killed / "logs.jsonl").exists() else ["no logs.jsonl"]
    problems += [f"{killed}: left behind {x}" for x in leftovers(killed)]
    ends = [checkpoints(r) for r in (straight, killed)]
    if [p.name for p in ends[0]] != [p.name for p in ends[1]]:
        problems.append(f"final checkpoints differ: {[p.name for p in ends[0]]} vs {[p.name for p in ends[1]]}")
    elif ends[0]:
        a, b = load_checkpoint(ends[0][-1]), load_checkpoint(ends[1][-1])
        for part in ("student", "ema"):
            if any(not torch.allclose(a[part][n], b[part][n], rtol=1e-5, atol=1e-7) for n in a[part]):
                problems.append(f"final {part} weights differ from the uninterrupted run's")
    lost = 0 if not problems else 1
    survived = sum(not k["problems"] for k in report.kills) if not problems else 0
    ckpt_bytes = folder_bytes(straight / "checkpoints")
    return {"kills": len(report.kills), "survived": survived, "runs": report.runs, "iterations": iterations, "runs_lost": lost,
            "losses_equal": not any("loss" in p or "steps differ" in p for p in problems),
            "run_bytes": folder_bytes(straight), "checkpoint_bytes": ckpt_bytes,
            "max_bytes_while_killed": report.max_bytes, "iterations_redone": report.redone,
            "seconds": round(report.seconds, 1),
            "kill_log": report.kills, "problems": problems}


# --- bad inputs from the command line -----------------------------------------------------------------------------------

