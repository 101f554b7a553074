"""Faults and bad input: a killed run resumes to what an uninterrupted one gives; a bad input is one clear error that
leaves what was written intact. The long kill campaign is benchmarks/faults.py; this file runs its harness
(tests/faults_harness.py) briefly.

Bad inputs tested elsewhere (the README's Faults section lists them all): test_train.py (ill-typed or unknown config
field, a folder that already holds a run, --resume without a run), test_trajectories.py (a rerun with other settings,
a folder that is not a store, bad prompts files, a missing store, a truncated shard, a corrupted shard, a teacher
that does not match the store), test_sample.py (a LoRA from another base model, a file that is not a LoRA, a LoRA
with other shapes).
"""

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import rapm.run
import rapm.store
import rapm.train
from rapm.config import ConfigError, TrainConfig, apply_overrides
from rapm.errors import WriteError
from rapm.run import ResumeWarning, RunError, checkpoints, load_checkpoint
from rapm.store import StoreError
from rapm.store import open_store
from rapm.train import train
from rapm.trajectories import write_trajectories
from tests import faults_harness as faults

ROOT = Path(__file__).resolve().parents[1]


def _config(teacher, store, **kw) -> TrainConfig:
    return apply_overrides(TrainConfig(), {**faults.TRAIN_CONFIG, "teacher": str(teacher), "store": str(store), **kw}, "test")


def _losses(run: Path):
    return faults.train_losses(run)


@pytest.fixture(scope="module")
def straight_run(tiny_sd, sd_store, tmp_path_factory):
    """An uninterrupted 6-iteration run in this process, checkpoints every 2 (kept: 4 and 6)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(_config(tiny_sd, sd_store, iterations=6, checkpoint_every=2), run, progress=False)
    return run


@pytest.fixture
def stopped_run(tiny_sd, sd_store, tmp_path):
    """The same run stopped after 4 iterations, checkpoints at 2 and 4."""
    run = tmp_path / "run"
    train(_config(tiny_sd, sd_store, iterations=6, checkpoint_every=2), run, progress=False, stop_after=4)
    assert [p.name for p in checkpoints(run)] == ["step-00000002", "step-00000004"]
    return run


def _store_of(teacher, folder: Path, steps: int = 2) -> Path:
    folder.mkdir()
    prompts = folder / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\na blue dog\na photo of a dog\n")
    write_trajectories(teacher, prompts, folder / "store", steps=steps, substeps=3, guidance=3.0, shard_size=2, progress=False)
    return folder / "store"


# --- kills ------------------------------------------------------------------------------------------------------------

def test_training_killed_at_random_moments_resumes_to_the_uninterrupted_losses(tiny_sd, sd_store, tmp_path):
    """3 SIGKILLs of `rapm train` (a real process); after each every listed checkpoint loads; then the same losses."""
    result = faults.train_faults(tiny_sd, sd_store, tmp_path, iterations=16, kills=3, rng=random.Random(1), max_units=3,
                                 startup_seconds=(0.5, 4.0))
    assert result["problems"] == [] and result["kills"] == 3 and result["losses_equal"]
    assert result["max_bytes_while_killed"] < 2 * result["run_bytes"]  # old checkpoints rotated out, temp dirs removed


def test_trajectories_killed_at_random_moments_end_byte_identical(tiny_sd, tmp_path):
    """3 SIGKILLs of `rapm trajectories`; after each every shard with a done-record matches its sha256; same bytes."""
    prompts = faults.write_prompts(tmp_path / "prompts.txt", 30)  # more than 3 kills can get through
    result = faults.trajectories_faults(tiny_sd, prompts, tmp_path, faults.TRAJECTORY_SETTINGS, kills=3,
                                        rng=random.Random(2), max_units=2, startup_seconds=(0.5, 4.0))
    assert result["problems"] == [] and result["kills"] == 3 and result["byte_identical"]


def test_sigint_writes_a_checkpoint_and_exits_130(tiny_sd, sd_store, tmp_path):
    """Ctrl-C (SIGTERM: tests/test_train.py, exit 143) stops after the iteration with a checkpoint and the resume command."""
    run, config_file = tmp_path / "run", tmp_path / "config.json"
    config_file.write_text(json.dumps({**faults.TRAIN_CONFIG, "iterations": 100000, "checkpoint_every": 100000}))
    proc = subprocess.Popen(faults.train_argv(tiny_sd, sd_store, run, config_file), env=faults.environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and faults.logged_lines(run) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err and f"Resume with: rapm train --out {run} --resume" in err and "Traceback" not in err
    (last,) = checkpoints(run)
    assert load_checkpoint(last)["step"] == faults.logged_lines(run) >= 3


# --- bad inputs: one clear error, nothing already written changes -------------------------------------------------------

def test_a_malformed_config_file_is_named_and_nothing_is_written(tiny_sd, sd_store, tmp_path):
    from typer.testing import CliRunner

    from rapm.cli import app

    bad = tmp_path / "my.toml"
    bad.write_text("lr = 1e-4\nlora_rank = \n")
    result = CliRunner().invoke(app, ["train", "--teacher", str(tiny_sd), "--store", str(sd_store), "--out",
                                      str(tmp_path / "run"), "--config", str(bad)])
    assert isinstance(result.exception, ConfigError)
    assert f"{bad}: cannot be parsed" in str(result.exception) and "TOML" in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_a_config_value_out_of_range_names_the_field_and_writes_nothing(tiny_sd, sd_store, tmp_path):
    with pytest.raises(ConfigError, match="config field 'keep_checkpoints': must be at least 1, got 0"):
        train(_config(tiny_sd, sd_store, keep_checkpoints=0), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_train_without_a_store_names_the_missing_flag(tiny_sd, tmp_path):
    from typer.testing import CliRunner

    from rapm.cli import app

    result = CliRunner().invoke(app, ["train", "--teacher", str(tiny_sd), "--out", str(tmp_path / "run")])
    assert isinstance(result.exception, ConfigError) and "needs --teacher and --store" in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_resuming_on_a_store_from_another_sd_is_refused_and_the_run_kept(tiny_sd, other_sd, stopped_run, tmp_path):
    other_store = _store_of(other_sd, tmp_path / "other")
    before = faults.files_digest(stopped_run)
    with pytest.raises(StoreError, match=rf"{other_store / 'manifest.json'}: teacher unet_hash .*another UNet.*rebuild"):
        train(_config(tiny_sd, other_store, iterations=6, checkpoint_every=2), stopped_run, resume=True, progress=False)
    assert faults.files_digest(stopped_run) == before


def test_resuming_on_a_store_with_other_n_is_refused_and_the_run_kept(tiny_sd, stopped_run, tmp_path):
    store_n1 = _store_of(tiny_sd, tmp_path / "n1", steps=1)
    before = faults.files_digest(stopped_run)
    with pytest.raises(RunError, match=r"step-00000004/state.json: the store's N, manifest field 'steps' .* was 2 when it "
                                       r"was written but is 1 now; resume with the run's own store"):
        train(_config(tiny_sd, store_n1, iterations=6, checkpoint_every=2), stopped_run, resume=True, progress=False)
    assert faults.files_digest(stopped_run) == before


def test_resuming_with_another_batch_size_is_refused_and_the_run_kept(tiny_sd, sd_store, stopped_run):
    before = faults.files_digest(stopped_run)
    with pytest.raises(RunError, match="state.json: config field 'batch_size' was 1 when it was written but is 2 now"):
        train(_config(tiny_sd, sd_store, iterations=6, checkpoint_every=2, batch_size=2), stopped_run, resume=True,
              progress=False)
    assert faults.files_digest(stopped_run) == before


@pytest.mark.parametrize("damage", ["truncated", "bit flipped"])
def test_a_damaged_checkpoint_is_skipped_with_a_warning_and_resume_stays_exact(damage, tiny_sd, sd_store, stopped_run,
                                                                                straight_run):
    """Decision: --resume falls back to the newest checkpoint that loads (sha256 checked), warning with the file's name."""
    state = checkpoints(stopped_run)[-1] / "state.safetensors"
    data = bytearray(state.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01  # in the tensor data: torch.load alone would not notice
    state.write_bytes(bytes(data))
    with pytest.raises(RunError, match=rf"{state}: (sha256 does not match|cannot be read)"):
        load_checkpoint(state.parent)
    with pytest.warns(ResumeWarning, match=rf"{state}: .*resuming from the checkpoint before it"):
        train(_config(tiny_sd, sd_store, iterations=6, checkpoint_every=2), stopped_run, resume=True, progress=False)
    assert faults.compare_losses(_losses(straight_run), _losses(stopped_run)) == []
    assert [p.name for p in checkpoints(stopped_run)] == ["step-00000004", "step-00000006"]
    load_checkpoint(checkpoints(stopped_run)[0])  # the damaged one was rewritten by the resumed run


def test_when_no_checkpoint_loads_resume_names_each_file(tiny_sd, sd_store, stopped_run):
    for path in checkpoints(stopped_run):
        (path / "state.safetensors").write_bytes(b"\0" * 100)
    before = faults.files_digest(stopped_run)
    with pytest.raises(RunError, match=r"no checkpoint can be read .*step-00000004/state.safetensors.*step-00000002/state.safetensors.*--overwrite"):
        with pytest.warns(ResumeWarning):
            train(_config(tiny_sd, sd_store, iterations=6, checkpoint_every=2), stopped_run, resume=True, progress=False)
    assert faults.files_digest(stopped_run) == before


class _NanAt:
    """The run's method, with a NaN loss at one step."""

    def __init__(self, method, step: int):
        self.method, self.step, self.calls = method, step, 0

    def __getattr__(self, name):
        return getattr(self.method, name)

    def _losses(self, losses):
        step, self.calls = self.calls, self.calls + 1
        for loss, logs in losses:
            yield (loss * float("nan") if step == self.step else loss), logs

    def generator_losses(self, ctx, batch):
        return self._losses(self.method.generator_losses(ctx, batch))

    def discriminator_losses(self, ctx, batch):
        return self._losses(self.method.discriminator_losses(ctx, batch))


def _all_finite(run: Path) -> bool:
    return all(torch.isfinite(v).all() for p in checkpoints(run) for part in ("student", "discriminator")
               for v in load_checkpoint(p)[part].values())


def test_a_non_finite_loss_stops_training_naming_the_step(tiny_sd, sd_store, tmp_path, monkeypatch):
    build = rapm.train.build_method
    monkeypatch.setattr(rapm.train, "build_method", lambda config, delta: _NanAt(build(config, delta), step=3))
    run = tmp_path / "run"
    with pytest.raises(RunError, match=r"non-finite student loss at step 3 .*last good checkpoint is .*step-00000003; "
                                       r"lower 'lr'"):
        # The paper's alternation (rapm-paper): step 3 is a student iteration.
        train(_config(tiny_sd, sd_store, iterations=6, checkpoint_every=1, method="rapm-paper"), run, progress=False)
    assert [p.name for p in checkpoints(run)] == ["step-00000002", "step-00000003"] and _all_finite(run)
    assert [e[0] for e in _losses(run)] == [0, 1, 2]


def test_a_huge_learning_rate_stops_at_the_first_non_finite_loss(tiny_sd, sd_store, tmp_path):
    """lr 1e30 makes the student's first update explode (step 1, the paper's alternation); the next loss (step 2) is
    NaN: stop, name it."""
    run = tmp_path / "run"
    with pytest.raises(RunError, match=r"non-finite discriminator loss at step 2 .*step-00000002; lower 'lr'"):
        train(_config(tiny_sd, sd_store, iterations=6, checkpoint_every=1, lr=1e30, method="rapm-paper"), run,
              progress=False)
    assert [p.name for p in checkpoints(run)] == ["step-00000001", "step-00000002"] and _all_finite(run)
    assert [e[0] for e in _losses(run)] == [0, 1]


class _FullDisk:
    """A file on a disk that fills up: its first write stores half the bytes, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, where every write fails with ENOSPC")
def test_disk_full_while_writing_a_checkpoint(tiny_sd, sd_store, straight_run, tmp_path, monkeypatch):
    """The disk fills while checkpoint 4 is written (its writes go to /dev/full: the kernel's own ENOSPC)."""
    real_open, opened = open, []

    def open_(path, mode="r", *args, **kwargs):
        if Path(path).name == "state.safetensors" and "w" in mode:
            opened.append(Path(path).parent.name)
            if path.parent.name.endswith("step-00000004"):
                return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(rapm.run, "open", open_, raising=False)
    run = tmp_path / "run"
    config = _config(tiny_sd, sd_store, iterations=6, checkpoint_every=2)
    with pytest.raises(RunError, match=r"step-00000004/state.safetensors: cannot be written \(No space left on device\); the last "
                                       r"complete checkpoint is .*step-00000002; free space .* --resume"):
        train(config, run, progress=False)
    assert opened == [".tmp-step-00000002", ".tmp-step-00000004"]
    assert os.listdir(run / "checkpoints") == ["step-00000002"]  # no temp folder left, none taken as complete
    assert load_checkpoint(checkpoints(run)[0])["step"] == 2
    monkeypatch.undo()  # space freed
    train(config, run, resume=True, progress=False)
    assert faults.compare_losses(_losses(straight_run), _losses(run)) == []


def test_disk_full_while_writing_a_shard(tiny_sd, sd_store, tmp_path, monkeypatch):
    """Same settings as conftest's sd_store (2 shards); the disk fills while shard 1 is written."""
    real_open = open

    def open_(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return _FullDisk(f) if ".shard-00001.safetensors" in str(path) else f

    monkeypatch.setattr(rapm.store, "open", open_, raising=False)
    out = tmp_path / "store"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\na blue dog\na photo of a dog\n")
    settings = dict(steps=2, substeps=3, guidance=3.0, shard_size=2, progress=False)
    with pytest.raises(WriteError, match=rf"{out / 'shard-00001.safetensors'}: cannot be written \(No space left on device\); "
                                         r"the files written before it are intact; free space .* rerun the same command"):
        write_trajectories(tiny_sd, prompts, out, **settings)
    assert not list(out.rglob(".*.tmp")) and not (out / "shard-00001.safetensors").exists()
    shard0 = json.loads((out / "done" / "shard-00000.json").read_text())
    assert hashlib.sha256((out / "shard-00000.safetensors").read_bytes()).hexdigest() == shard0["sha256"]
    with pytest.raises(StoreError, match="incomplete"):
        open_store(out)
    monkeypatch.undo()  # space freed
    write_trajectories(tiny_sd, prompts, out, **settings)
    assert faults.files_digest(out) == faults.files_digest(sd_store)


def test_an_error_after_a_progress_bar_starts_a_line_of_its_own(tiny_sd, tmp_path, monkeypatch, capsys):
    """Issue 34: `trajectories: 100%|...| 4/4 ...error: ...` on one line; the error now starts its own (grep ^error:)."""
    real_open = open

    def open_(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return _FullDisk(f) if ".shard-00001.safetensors" in str(path) else f

    monkeypatch.setattr(rapm.store, "open", open_, raising=False)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets them: put back after
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\na blue dog\na photo of a dog\n")
    out = tmp_path / "store"
    monkeypatch.setattr(sys, "argv", ["rapm", "trajectories", "--teacher", str(tiny_sd), "--prompts", str(prompts),
                                      "--out", str(out), "--steps", "2", "--substeps", "3", "--guidance", "3.0",
                                      "--shard-size", "2", "--device", "cpu"])
    from rapm.cli import main

    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 1 and "trajectories:" in err and "Traceback" not in err, err  # the bar was drawn
    lines = err.split("\n")  # lines as grep sees them: a bar's redraws (\r) are one line with it
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: {out / 'shard-00001.safetensors'}: cannot be written"), err
    assert "trajectories:" in lines[lines.index(errors[0]) - 1], err  # the bar kept, on the line before


def test_a_huge_learning_rate_stops_the_default_recipe_at_its_first_non_finite_loss(tiny_sd, sd_store, tmp_path):
    """With a discriminator and a student update in every iteration, the student's update at step 0 explodes and the
    discriminator's loss at step 1 is the first non-finite one: stop there, name it, keep the checkpoint before."""
    run = tmp_path / "run"
    with pytest.raises(RunError, match=r"non-finite discriminator loss at step 1 .*step-00000001; lower 'lr'"):
        train(_config(tiny_sd, sd_store, iterations=6, checkpoint_every=1, lr=1e30), run, progress=False)
    assert [p.name for p in checkpoints(run)] == ["step-00000001"] and _all_finite(run)
    assert [e[0] for e in _losses(run)] == [0]


@pytest.mark.parametrize("verb", ["trajectories", "train"])
def test_an_out_that_is_a_link_is_refused_for_a_store_and_a_run(verb, tiny_sd, sd_store, tmp_path):
    """As for export, sample, evaluate and report: a store or a run is never written through a link (into a folder
    the user did not name); one error line names the link and its target, which stays empty."""
    from cli_run import one_error, run_main

    target = tmp_path / "elsewhere"
    target.mkdir()
    out = tmp_path / "out"
    out.symlink_to(target)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    args = (["trajectories", "--teacher", tiny_sd, "--prompts", prompts, "--steps", 2, "--substeps", 2]
            if verb == "trajectories" else
            ["train", "--teacher", tiny_sd, "--store", sd_store, "--iterations", 1, "--set", "eval_every=0"])
    code, err = run_main([*args, "--out", out, "--no-progress"])
    one_error(code, err, str(out), "is a link", str(target))
    assert list(target.iterdir()) == [] and out.is_symlink()


@pytest.mark.parametrize("verb", ["trajectories", "train"])
@pytest.mark.parametrize("again", ["resume", "--overwrite"])
def test_a_link_where_a_file_of_a_store_or_run_goes_is_refused(verb, again, tiny_sd, sd_store, tmp_path):
    """A link placed where rapm's own file goes (a shard, a checkpoint's tensors) is neither read, written through nor
    replaced, on a resume or an --overwrite: one error line names it, its target and the link stay (fault matrix,
    benchmarks/faults.py)."""
    from cli_run import one_error, run_main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "out"
    args = (["trajectories", "--teacher", tiny_sd, "--prompts", prompts, "--steps", 2, "--substeps", 2]
            if verb == "trajectories" else
            ["train", "--teacher", tiny_sd, "--store", sd_store, "--iterations", 1, "--set", "eval_every=0"])
    code, err = run_main([*args, "--out", out, "--no-progress"])
    assert code == 0, err
    link = out / ("shard-00000.safetensors" if verb == "trajectories" else "checkpoints/step-00000001/state.safetensors")
    victim = tmp_path / "mine.bin"
    victim.write_bytes(b"the user's own file")
    link.unlink()
    link.symlink_to(victim)
    rerun = ([*args, "--out", out] if verb == "trajectories" or again == "--overwrite" else ["train", "--out", out, "--resume"])
    code, err = run_main([*rerun, *(["--overwrite"] if again == "--overwrite" else []), "--no-progress"])
    one_error(code, err, str(link), "a link", str(victim))
    assert link.is_symlink() and victim.read_bytes() == b"the user's own file"


def test_two_fresh_runs_write_the_same_checkpoint_but_for_the_start_time(tiny_sd, sd_store, tmp_path):
    """Python's and numpy's generators start from the seed too, so a checkpoint (which holds their states) is the
    same for the same run: the fault matrix compares a rerun's result with an uninterrupted run's."""
    import random

    import numpy as np

    states = []
    for k in range(2):
        random.seed(1000 + k)  # as two fresh processes: their generators start anywhere
        np.random.seed(1000 + k)
        train(_config(tiny_sd, sd_store, iterations=1, checkpoint_every=1, eval_every=0), tmp_path / f"run-{k}",
              progress=False)
        state = json.loads((tmp_path / f"run-{k}" / "checkpoints" / "step-00000001" / "state.json").read_text())
        state["state"].pop("training_started_at")
        states.append(state)
    assert states[0] == states[1]
