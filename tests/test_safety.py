"""Files are data, never code, and rapm touches only its own (docs/design.md decision 9; issue 15).

Each test is one reproduction from the issue: a planted pickle runs nothing; a folder rapm did not make is refused and
left as it was; --overwrite checks its inputs before deleting; one writer per run and per store; a tampered store is
refused naming the file and the field.
"""

import builtins
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import rapm.run
from rapm.config import TrainConfig, apply_overrides
from rapm.folders import LOCK, RUN_MARKER, STORE_MARKER, FolderLock, KeptWarning, LockError, StaleLockWarning, marker_bytes
from rapm.run import RunError, TrustWarning, checkpoints, load_checkpoint
from rapm.store import MANIFEST_SHA256, StoreError, open_store
from rapm.train import train
from rapm.trajectories import write_trajectories
from tests import faults_harness as faults  # the fault harness: configs, files_digest, compare_losses

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = dict(steps=2, substeps=3, guidance=3.0, shard_size=2, progress=False)  # conftest's sd_store


def _config(teacher, store, **kw) -> TrainConfig:
    return apply_overrides(TrainConfig(), {**faults.TRAIN_CONFIG, "teacher": str(teacher), "store": str(store), **kw}, "test")


def _cli(*args):
    from typer.testing import CliRunner

    from rapm.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _rapm(*args, timeout=300):
    """`rapm ...` as a user runs it: its exit code and stderr."""
    proc = subprocess.run(faults.rapm_command(*map(str, args)), env=faults.environment(), capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stderr


def _one_error_line(code: int, err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert code == 1 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def run(tiny_sd, sd_store, tmp_path_factory):
    """A finished 4-iteration run, checkpoints at 2 and 4."""
    folder = tmp_path_factory.mktemp("run") / "run"
    train(_config(tiny_sd, sd_store, iterations=4), folder, progress=False)
    return folder


@pytest.fixture
def run_copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def store_copy(sd_store, tmp_path):
    shutil.copytree(sd_store, tmp_path / "store")
    return tmp_path / "store"


# --- 1. no pickle anywhere rapm reads ----------------------------------------------------------------------------------

class Planted:
    """What an attacker puts into a checkpoint: unpickling it runs code."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.target)!r}, 'w').write('pwned')",)


def _as_old_checkpoint(path: Path, extra: dict | None = None) -> Path:
    """Rewrite checkpoint ``path`` as rapm wrote them before (state.pt, torch.save, its sha256 beside it)."""
    state = {**load_checkpoint(path), **(extra or {})}
    for name in ("state.safetensors", "state.json", "state.sha256"):
        (path / name).unlink()
    torch.save(state, path / "state.pt")
    (path / "state.sha256").write_text(hashlib.sha256((path / "state.pt").read_bytes()).hexdigest() + "\n")
    return path / "state.pt"


def test_a_checkpoint_is_safetensors_and_json(run):
    for path in checkpoints(run):
        assert sorted(p.name for p in path.iterdir()) == ["state.json", "state.safetensors", "state.sha256"]
        document = json.loads((path / "state.json").read_text())
        assert document["format"] == "rapm-checkpoint" and document["step"] == int(path.name[5:])
        with safe_open(str(path / "state.safetensors"), "pt") as f:
            assert any(k.startswith("opt_student/state/") for k in f.keys()) and "rng/torch" in f.keys()


@pytest.mark.parametrize("verb", ["resume", "export"])
def test_a_planted_pickle_runs_nothing(verb, run_copy, tmp_path):
    pwned = tmp_path / "PWNED"
    state = _as_old_checkpoint(checkpoints(run_copy)[-1], {"note": Planted(pwned)})
    args = ["train", "--out", run_copy, "--resume"] if verb == "resume" else ["export", "--run", run_copy, "--out", tmp_path / "lora"]
    result = _cli(*args)
    assert isinstance(result.exception, RunError), result.output
    assert f"{state}: an old-format checkpoint" in str(result.exception) and "--trust-checkpoint" in str(result.exception)
    assert not pwned.exists() and not (tmp_path / "lora").exists()


def test_only_trust_checkpoint_lets_an_old_pickle_load_and_it_warns(run_copy, tmp_path):
    pwned = tmp_path / "PWNED"
    path = checkpoints(run_copy)[-1]
    _as_old_checkpoint(path, {"note": Planted(pwned)})
    with pytest.raises(RunError, match="could run code"):
        load_checkpoint(path)
    assert not pwned.exists()
    with pytest.warns(TrustWarning, match="--trust-checkpoint"):
        load_checkpoint(path, trust=True)
    assert pwned.exists()  # the flag is what lets it run


def test_an_old_checkpoint_resumes_through_weights_only_exactly(tiny_sd, sd_store, tmp_path):
    straight, old = tmp_path / "straight", tmp_path / "old"
    train(_config(tiny_sd, sd_store, iterations=6), straight, progress=False)
    train(_config(tiny_sd, sd_store, iterations=6), old, progress=False, stop_after=4)
    for path in checkpoints(old):
        _as_old_checkpoint(path)
    (old / RUN_MARKER).unlink()  # made by the previous rapm: no marker either
    train(_config(tiny_sd, sd_store, iterations=6), old, resume=True, progress=False)
    assert faults.compare_losses(faults.train_losses(straight), faults.train_losses(old)) == []
    assert (old / RUN_MARKER).exists() and (checkpoints(old)[-1] / "state.json").exists()


def test_a_teacher_whose_unet_is_a_pickle_is_refused_unread(tiny_sd, tmp_path):
    pwned = tmp_path / "PWNED"
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd, teacher)
    for f in (teacher / "unet").glob("*.safetensors"):
        f.unlink()
    torch.save({"note": Planted(pwned)}, teacher / "unet" / "diffusion_pytorch_model.bin")
    code, err = _rapm("sample", "--teacher", teacher, "--prompt", "a cat", "--out", tmp_path / "images")
    _one_error_line(code, err, str(teacher / "unet"), "diffusion_pytorch_model.bin", "pickle")
    assert not pwned.exists() and not (tmp_path / "images").exists()


# --- 2. rapm deletes only what it wrote --------------------------------------------------------------------------------

def _users_folder(folder: Path) -> Path:
    """The issue's reproduction: a folder of the user's that looks a little like a run."""
    (folder / "checkpoints" / "step-500").mkdir(parents=True)
    (folder / "checkpoints" / "step-500" / "model.safetensors").write_text("w")
    (folder / ".notes.tmp").write_text("n")
    (folder / "logs.jsonl").write_text('{"my":"log"}\n')
    return folder


@pytest.mark.parametrize("flags", [{}, {"overwrite": True}])
def test_train_into_a_folder_that_is_not_a_run_touches_nothing(flags, tiny_sd, sd_store, tmp_path):
    folder = _users_folder(tmp_path / "f")
    before = faults.files_digest(folder)
    with pytest.raises(RunError, match=rf"--out {folder} is not empty and is not a rapm run directory .*deletes nothing"):
        train(_config(tiny_sd, sd_store, iterations=2), folder, progress=False, **flags)
    assert faults.files_digest(folder) == before and not (folder / LOCK).exists()


def test_overwrite_checks_every_input_before_deleting(tiny_sd, other_sd, sd_store, run_copy, tmp_path):
    before = faults.files_digest(run_copy)
    with pytest.raises(StoreError, match="does not exist"):  # a mistyped --store
        train(_config(tiny_sd, tmp_path / "stroe", iterations=2), run_copy, overwrite=True, progress=False)
    with pytest.raises(StoreError, match="another UNet"):  # a teacher that is not the store's
        train(_config(other_sd, sd_store, iterations=2), run_copy, overwrite=True, progress=False)
    assert faults.files_digest(run_copy) == before


def test_overwrite_removes_only_rapms_files(tiny_sd, sd_store, run_copy):
    (run_copy / "notes.txt").write_text("mine")
    (run_copy / "checkpoints" / "README").write_text("mine too")
    (run_copy / ".my.tmp").write_text("and this")
    train(_config(tiny_sd, sd_store, iterations=2), run_copy, overwrite=True, progress=False)
    assert (run_copy / "notes.txt").read_text() == "mine" and (run_copy / "checkpoints" / "README").exists()
    assert (run_copy / ".my.tmp").exists()
    assert [p.name for p in checkpoints(run_copy)] == ["step-00000002"] and len(faults.train_losses(run_copy)) == 2


USERS_FILES = ("thesis.tex", "checkpoints/README", "checkpoints/step-00000002/photo.jpg", "checkpoints/step-00000004/notes.txt",
               "samples/holiday.png", "samples/step-1.png/album.jpg", "tensorboard/notes.txt", "tensorboard/events.mine/a")


def _plant(folder: Path, names=USERS_FILES) -> dict[str, str]:
    """The user's files at every level of a run (the last two of samples/ and tensorboard/ in folders named like
    rapm's files); return their digests."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"the user's {name}")
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


def _kept(folder: Path, digests: dict[str, str]) -> None:
    assert {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in digests} == digests


def test_overwrite_deletes_only_rapms_files_at_every_level_of_a_run(tiny_sd, sd_store, run_copy):
    """Issue 34: a checkpoint folder holding the user's photo.jpg lost it with the folder; now only rapm's files go."""
    (run_copy / "samples").mkdir(exist_ok=True)
    (run_copy / "samples" / "step-00000004.png").write_bytes(b"a grid rapm wrote")
    (run_copy / "tensorboard").mkdir(exist_ok=True)
    (run_copy / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"events rapm wrote")
    old_events = {p.name for p in (run_copy / "tensorboard").glob("events.out.tfevents.*")}
    users = _plant(run_copy)
    with pytest.warns(KeptWarning) as said:
        train(_config(tiny_sd, sd_store, iterations=2), run_copy, overwrite=True, progress=False)
    _kept(run_copy, users)
    messages = "\n".join(str(w.message) for w in said if issubclass(w.category, KeptWarning))
    for kept in ("checkpoints/step-00000004: kept, this checkpoint folder holds files rapm did not write (notes.txt)",
                 "samples: kept, this folder holds files rapm did not write (holiday.png, step-1.png)"):
        assert str(run_copy / kept) in messages, messages
    four = run_copy / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in four.iterdir()) == ["notes.txt"]  # rapm's state files gone, the folder kept
    assert not (run_copy / "samples" / "step-00000004.png").exists()
    assert not old_events & {p.name for p in (run_copy / "tensorboard").glob("events.out.tfevents.*")}
    # the run restarted: a checkpoint at 2 written beside the photo, and it resumes
    two = run_copy / "checkpoints" / "step-00000002"
    assert [p.name for p in checkpoints(run_copy)] == ["step-00000002"] and (two / "photo.jpg").exists()
    assert load_checkpoint(two)["step"] == 2 and len(faults.train_losses(run_copy)) == 2
    train(_config(tiny_sd, sd_store, iterations=6), run_copy, resume=True, progress=False)
    assert [p.name for p in checkpoints(run_copy)] == ["step-00000004", "step-00000006"]  # keep 2: 2 rotated out
    assert sorted(p.name for p in two.iterdir()) == ["photo.jpg"] and (four / "notes.txt").exists()
    assert len(faults.train_losses(run_copy)) == 6
    _kept(run_copy, users)


def test_overwrite_with_a_forged_marker_keeps_the_users_files(tiny_sd, sd_store, run, tmp_path):
    """The issue's reproduction: a hand-made marker (and a copied config.json) over the user's files."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / RUN_MARKER).write_bytes(marker_bytes("run"))
    shutil.copy(run / "config.json", folder / "config.json")
    users = _plant(folder)
    with pytest.warns(KeptWarning, match="photo.jpg"):
        train(_config(tiny_sd, sd_store, iterations=2), folder, overwrite=True, progress=False)
    _kept(folder, users)
    assert [p.name for p in checkpoints(folder)] == ["step-00000002"] and len(faults.train_losses(folder)) == 2
    assert load_checkpoint(folder / "checkpoints" / "step-00000002")["step"] == 2


def test_a_checkpoint_that_is_a_link_is_never_followed_nor_deleted_and_said_once(tiny_sd, sd_store, run_copy, tmp_path):
    """Issue 34: a link among the checkpoints was left beside the keep newest without a word; it is named once, and
    rapm neither resumes from what it points to (a copy of a real checkpoint, at a later step) nor deletes in it."""
    mine = tmp_path / "my-checkpoint"
    shutil.copytree(run_copy / "checkpoints" / "step-00000004", mine)
    (mine / "photo.jpg").write_text("mine")
    before = faults.files_digest(mine)
    link = run_copy / "checkpoints" / "step-00000099"
    link.symlink_to(mine, target_is_directory=True)
    old = run_copy / "checkpoints" / "step-00000001"
    old.symlink_to(tmp_path / "nowhere")  # a dangling one, older than every checkpoint: a rotation's first candidate
    with pytest.warns(KeptWarning) as said:
        train(_config(tiny_sd, sd_store, iterations=8), run_copy, resume=True, progress=False)
    named = [str(w.message) for w in said if issubclass(w.category, KeptWarning)]
    assert sorted(m.split(":")[0] for m in named) == [str(old), str(link)], named  # each once, over three saves
    assert all("a link" in m and "rotation" in m for m in named)
    assert [p.name for p in checkpoints(run_copy)] == ["step-00000006", "step-00000008"]
    assert link.is_symlink() and old.is_symlink() and faults.files_digest(mine) == before
    assert len(faults.train_losses(run_copy)) == 8  # resumed from 4, not from the link's "99"
    with pytest.warns(KeptWarning, match=r"checkpoints: kept, .*\(step-00000001, step-00000099\)"):  # and --overwrite
        train(_config(tiny_sd, sd_store, iterations=2), run_copy, overwrite=True, progress=False)
    assert link.is_symlink() and faults.files_digest(mine) == before


def test_overwrite_of_a_store_keeps_the_users_files_in_done(tiny_sd, store_copy, tmp_path):
    (store_copy / "done" / "notes.txt").write_text("mine")
    (store_copy / "shard-mine.safetensors").mkdir()  # a folder under a name like rapm's: not a file rapm wrote
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    with pytest.warns(KeptWarning, match=rf"{store_copy / 'done'}: kept, .*notes.txt"):
        store = write_trajectories(tiny_sd, prompts, store_copy, overwrite=True, **SETTINGS)
    assert len(store) == 2 and (store_copy / "done" / "notes.txt").read_text() == "mine"
    assert (store_copy / "shard-mine.safetensors").is_dir() and not (store_copy / "shard-00001.safetensors").exists()


def test_stale_files_are_removed_only_with_rapms_prefix_in_a_marked_run(tiny_sd, sd_store, run_copy):
    (run_copy / ".config.json.123.tmp").write_text("killed atomic_write")
    (run_copy / "checkpoints" / ".tmp-step-00000006").mkdir()
    (run_copy / ".notes.tmp").write_text("the user's")
    train(_config(tiny_sd, sd_store, iterations=6), run_copy, resume=True, progress=False)
    assert not (run_copy / ".config.json.123.tmp").exists() and not (run_copy / "checkpoints" / ".tmp-step-00000006").exists()
    assert (run_copy / ".notes.tmp").read_text() == "the user's"


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_trajectories_into_a_folder_with_a_foreign_manifest_touches_nothing(flags, tiny_sd, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"name": "my web app"}')
    (folder / "notes.txt").write_text("mine")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    before = faults.files_digest(folder)
    with pytest.raises(StoreError, match=r"is not empty and is not a rapm trajectory store .*manifest.json is not rapm's"):
        write_trajectories(tiny_sd, prompts, folder, overwrite=bool(flags), **SETTINGS)
    assert faults.files_digest(folder) == before


def test_trajectories_overwrite_keeps_the_users_files_in_a_store(tiny_sd, store_copy, tmp_path):
    (store_copy / "notes.txt").write_text("mine")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    store = write_trajectories(tiny_sd, prompts, store_copy, overwrite=True, **SETTINGS)
    assert len(store) == 2 and (store_copy / "notes.txt").read_text() == "mine"
    assert not (store_copy / "shard-00001.safetensors").exists()


def test_a_store_made_before_markers_and_checksums_still_opens_and_resumes(tiny_sd, sd_store, store_copy):
    (store_copy / STORE_MARKER).unlink()
    manifest = json.loads((store_copy / "manifest.json").read_text())
    del manifest[MANIFEST_SHA256]
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    assert len(open_store(store_copy)) == 4
    prompts = store_copy.parent / "prompts.txt"
    prompts.write_text((sd_store / "prompts.txt").read_text())
    write_trajectories(tiny_sd, prompts, store_copy, **SETTINGS)  # the same settings: adopted, nothing recomputed
    assert (store_copy / STORE_MARKER).exists()


def test_reexport_replaces_only_the_files_it_writes(tiny_sd, tmp_path):
    from rapm.export import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, export_lora
    from rapm.roles import LoraSpec, add_roles
    from rapm.teacher import load_teacher

    teacher = load_teacher(tiny_sd, text_encoders=False)
    add_roles(teacher.unet, LoraSpec(4, 4, ["to_q", "to_k", "to_v", "to_out.0"]))
    out = tmp_path / "lora"
    export_lora(teacher.unet, tiny_sd, "sd", out, 2, fmt="kohya")
    (out / "NOTES.txt").write_text("mine")
    (out / "my_samples").mkdir()
    (out / "my_samples" / "a.png").write_bytes(b"png")
    stale, foreign = tmp_path / ".lora.partial-old1", tmp_path / ".lora.partial-mine"
    stale.mkdir()
    (stale / "README.md").write_text("a killed export's")
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("not rapm's")
    export_lora(teacher.unet, tiny_sd, "sd", out, 2, fmt="diffusers")
    assert sorted(p.name for p in out.iterdir()) == sorted(["NOTES.txt", "my_samples", "README.md", "rapm_lora.json",
                                                            DIFFUSERS_WEIGHT_NAME])
    assert (out / "my_samples" / "a.png").read_bytes() == b"png" and not (out / KOHYA_WEIGHT_NAME).exists()
    assert not stale.exists() and (foreign / "thesis.tex").exists()


# --- 3. one writer per run and per store -------------------------------------------------------------------------------

def test_two_trainers_started_together_one_refuses_and_the_run_stays_whole(tiny_sd, sd_store, tmp_path):
    out, config_file = tmp_path / "run", tmp_path / "config.json"
    config_file.write_text(json.dumps({**faults.TRAIN_CONFIG, "iterations": 6}))
    procs = [subprocess.Popen(faults.rapm_command("train", "--teacher", str(tiny_sd), "--store", str(sd_store), "--out",
                                                  str(out), "--config", str(config_file), "--seed", str(seed), "--no-progress"),
                              env=faults.environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (0, 1)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    winner = [seed for seed, (code, _) in zip((0, 1), results) if code == 0][0]
    code, err = [r for r in results if r[0] == 1][0]
    _one_error_line(code, err)
    assert "is in use by rapm train (pid" in err or "already holds a run" in err, err
    assert json.loads((out / "config.json").read_text())["seed"] == winner
    assert load_checkpoint(checkpoints(out)[-1])["data"]["seed"] == winner
    assert [e[0] for e in faults.train_losses(out)] == list(range(6)) and not (out / LOCK).exists()
    train(apply_overrides(rapm.run.read_run_config(out), {"iterations": 8}, "test"), out, resume=True, progress=False)
    assert [e[0] for e in faults.train_losses(out)] == list(range(8))


def test_a_second_writer_is_refused_at_once_naming_the_holder(tiny_sd, sd_store, run_copy, store_copy, tmp_path):
    before = faults.files_digest(run_copy, skip=(LOCK,))
    with FolderLock(run_copy, "rapm train"):
        start = time.time()
        with pytest.raises(LockError, match=rf"{run_copy} is in use by rapm train \(pid {os.getpid()} on "
                                            rf"{socket.gethostname()}, started .*\); one writer per folder"):
            train(_config(tiny_sd, sd_store, iterations=6), run_copy, resume=True, progress=False)
        assert time.time() - start < 2  # before the teacher is loaded
    assert faults.files_digest(run_copy) == before
    prompts = tmp_path / "prompts.txt"
    prompts.write_text((store_copy / "prompts.txt").read_text())
    with FolderLock(store_copy, "rapm trajectories"):
        with pytest.raises(StoreError, match=rf"{store_copy} is in use by rapm trajectories \(pid {os.getpid()}"):
            write_trajectories(tiny_sd, prompts, store_copy, **SETTINGS)


def test_the_lock_of_a_dead_process_is_taken_over_with_a_message(tiny_sd, sd_store, run_copy):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_copy / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60,
                                             "command": "rapm train"}))
    with pytest.warns(StaleLockWarning, match=rf"taking over the lock of rapm train \(pid {dead.pid} .*no longer running"):
        train(_config(tiny_sd, sd_store, iterations=6), run_copy, resume=True, progress=False)
    assert not (run_copy / LOCK).exists() and [e[0] for e in faults.train_losses(run_copy)] == list(range(6))


def test_a_writer_refused_while_the_holder_writes_its_name_names_the_new_holder(tmp_path):
    # The window that two trainers started together can hit: the winner holds the flock, but its lock file is still
    # empty or still names the dead process before it. The refusal waits for the new holder's name.
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0,
                                           "command": "rapm export"}))
    fd = os.open(folder / LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, its old content still in the file
    name = (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                        "command": "rapm train"}) + "\n").encode()
    writer = threading.Timer(0.3, lambda: (os.ftruncate(fd, 0), os.pwrite(fd, name, 0)))
    writer.start()
    try:
        with pytest.raises(LockError, match=rf"{folder} is in use by rapm train \(pid {os.getpid()} on "):
            FolderLock(folder, "rapm train").acquire()
    finally:
        writer.join()
        os.close(fd)


# --- 4. a store checked, not trusted -----------------------------------------------------------------------------------

_edit_manifest = faults.edit_manifest  # shared with the fault benchmark's tampered stores


def test_an_edited_manifest_is_refused_by_its_checksum(store_copy):
    f = _edit_manifest(store_copy, lambda m: m.update(timesteps=[999, 499, 0], **{MANIFEST_SHA256: m[MANIFEST_SHA256]}),
                       checksum=False)
    with pytest.raises(StoreError, match=rf"{f}: field 'manifest_sha256' does not match the manifest"):
        open_store(store_copy)


def test_a_manifest_with_other_timesteps_and_a_fresh_checksum_is_refused_by_train(tiny_sd, store_copy, tmp_path):
    f = _edit_manifest(store_copy, lambda m: m.update(timesteps=[999, 499, 0]))
    with pytest.raises(StoreError, match=rf"{f}: timesteps \[999, 499, 0\] in the store, but \[999, 499, -1\]"):
        train(_config(tiny_sd, store_copy, iterations=2), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value", [("count", "5"), ("complete", "false"), ("dtype", "int8"), ("shards", None),
                                         ("shard_size", 0), ("teacher", None), ("latent_shape", "4,8,8"), ("steps", "2"),
                                         ("timesteps", [999, 499])])
def test_ill_typed_manifest_fields_are_refused_naming_the_field(field, value, store_copy):
    f = _edit_manifest(store_copy, lambda m: m.update({field: value}))
    with pytest.raises(StoreError, match=rf"^{f}: field '{field}' ") as e:
        open_store(store_copy)
    assert "\n" not in str(e.value)


_rewrite_shard = faults.rewrite_shard  # changes shard k's tensors and updates its sha256 and size, as an attacker would


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update(latents=(t["latents"].float() * 100).to(torch.int16)), "tensor 'latents' is I16"),
    (lambda t: t.update(prompt_embeds=t["prompt_embeds"][..., :-1].contiguous()), "tensor 'prompt_embeds' is F16"),
    (lambda t: t.pop("prompt_embeds"), "tensor 'prompt_embeds' is missing"),
    (lambda t: t.update(extra=torch.zeros(2)), "tensor 'extra' is not in the manifest"),
])
def test_a_shard_whose_tensors_are_not_the_manifests_is_refused(edit, message, tiny_sd, store_copy, tmp_path):
    f = _rewrite_shard(store_copy, 1, edit)
    store = open_store(store_copy, verify=True)  # every sha256 matches: the check is on what the tensors are
    store.get(0)
    with pytest.raises(StoreError, match=rf"^{f}: {message}"):
        store.get(3)
    with pytest.raises(StoreError, match=rf"{f}: {message}"):
        train(_config(tiny_sd, store_copy, iterations=4, checkpoint_every=4), tmp_path / "run", progress=False)


def test_a_store_whose_embeddings_do_not_fit_the_teacher_is_refused(tiny_sd, store_copy, tmp_path):
    f = _edit_manifest(store_copy, lambda m: m["conditioning"].update(prompt_embeds=[77, 13]))
    with pytest.raises(StoreError, match=rf"{f}: field 'conditioning' gives prompt embeddings of width 13"):
        train(_config(tiny_sd, store_copy, iterations=2), tmp_path / "run", progress=False)


def test_a_nan_in_a_shard_is_blamed_on_the_shard(tiny_sd, store_copy, tmp_path):
    def poison(t):
        t["latents"][1, 0, 0, 0, 0] = float("nan")
    f = _rewrite_shard(store_copy, 0, poison)
    with pytest.raises(StoreError, match=rf"{f}: tensor 'latents' of trajectory 1 holds NaN .*not the training"):
        open_store(store_copy).get([0, 1])


# --- 5. atomic sets; HTML escaped ---------------------------------------------------------------------------------------

def _evaluation(folder: Path, **fields) -> Path:
    result = {"samples": 3, "reference_steps": 50, "date": "2026-12-01", "rows": [
        {"method": "rapm", "steps": 2, "guidance": 1.0, "trajectory_error": 0.1}], **fields}
    (folder / "evaluation.json").write_text(json.dumps(result))
    return folder / "evaluation.json"


def test_report_escapes_every_value_it_puts_into_html(run_copy):
    from rapm.report import report

    _evaluation(run_copy, date="<script>alert(1)</script>", samples="<img src=x onerror=alert(2)>",
                reference_steps="<b>50</b>", rows=[{"method": "<script>m</script>", "steps": 2, "guidance": 1.0,
                                                    "trajectory_error": 0.1}])
    page = report(run_copy).read_text()
    assert "<script" not in page and "<img src=x" not in page and "<b>50" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_report_killed_while_writing_leaves_the_previous_set(run_copy, monkeypatch):
    import rapm.folders
    from rapm.report import report

    _evaluation(run_copy)
    report(run_copy)
    before = faults.files_digest(run_copy)
    real_stage = rapm.folders.stage

    def killed_at_html(final, content):
        if Path(final).suffix == ".html":
            raise KeyboardInterrupt  # a kill while the page is written
        return real_stage(final, content)

    monkeypatch.setattr("rapm.report.stage", killed_at_html)
    (run_copy / "logs.jsonl").write_text((run_copy / "logs.jsonl").read_text().splitlines()[0] + "\n")  # other curves
    after_kill = faults.files_digest(run_copy)
    with pytest.raises(KeyboardInterrupt):
        report(run_copy)
    assert faults.files_digest(run_copy) == after_kill  # report.md, report.html, losses.png: all the previous set's
    assert {k: v for k, v in before.items() if k.startswith("report")} == {k: v for k, v in after_kill.items() if k.startswith("report")}


def test_a_grid_that_is_not_the_evaluations_own_is_left_out_of_the_report(run_copy):
    from PIL import Image

    from rapm.report import report

    Image.new("L", (8, 8), 255).save(run_copy / "evaluation.png")
    _evaluation(run_copy, files={"evaluation.png": "0" * 64})  # the JSON of a later evaluate, killed before its grid
    assert "<h2>Samples</h2>" not in report(run_copy).read_text()
    _evaluation(run_copy, files={"evaluation.png": hashlib.sha256((run_copy / "evaluation.png").read_bytes()).hexdigest()})
    assert "<h2>Samples</h2>" in report(run_copy).read_text()


# --- 6. one `error:` line, nothing half-written ------------------------------------------------------------------------

def test_a_full_disk_while_writing_logs_jsonl_is_one_error_and_no_half_line(tiny_sd, sd_store, tmp_path, monkeypatch):
    real_write, calls = os.write, []

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("logs.jsonl"):
            calls.append(len(data))
            if len(calls) == 3:  # the third line: half of it, then the disk is full
                real_write(fd, data[: len(data) // 2])
                raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(rapm.run.os, "write", write)
    run = tmp_path / "run"
    with pytest.raises(RunError, match=rf"{run / 'logs.jsonl'}: cannot be written \(No space left on device\); the last "
                                       r"complete checkpoint is .*step-00000002; free space .* --resume"):
        train(_config(tiny_sd, sd_store, iterations=6), run, progress=False)
    assert [e[0] for e in faults.train_losses(run)] == [0, 1]  # whole lines only
    monkeypatch.undo()
    train(_config(tiny_sd, sd_store, iterations=6), run, resume=True, progress=False)
    assert [e[0] for e in faults.train_losses(run)] == list(range(6))


def test_a_full_disk_while_writing_tensorboard_is_one_error(tiny_sd, sd_store, tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    run = tmp_path / "run"
    with pytest.raises(RunError, match=rf"{run / 'tensorboard'}: TensorBoard events cannot be written \(No space left"):
        train(_config(tiny_sd, sd_store, iterations=2), run, progress=False)
    assert not (run / LOCK).exists()


@pytest.mark.parametrize("verb", ["trajectories", "train", "export", "report"])
def test_an_out_that_cannot_be_written_is_one_error(verb, tiny_sd, sd_store, run, tmp_path):
    from rapm.errors import RapmError

    readonly = Path("/sys/rapm-test")  # even root cannot create a folder in sysfs
    if not Path("/sys/kernel").is_dir():
        pytest.skip("needs a sysfs /sys")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    args = {"trajectories": ["trajectories", "--teacher", tiny_sd, "--prompts", prompts, "--out", readonly / "store",
                             *"--steps 2 --substeps 3 --no-progress".split()],
            "train": ["train", "--teacher", tiny_sd, "--store", sd_store, "--out", readonly / "run", "--iterations", "2"],
            "export": ["export", "--run", run, "--out", readonly / "lora"],
            "report": ["report", run, "--out", readonly / "report.html"]}[verb]
    result = _cli(*args)
    assert isinstance(result.exception, RapmError), result.output
    assert str(readonly) in str(result.exception) and "cannot be" in str(result.exception)


def test_a_teacher_too_large_for_memory_leaves_no_store(tiny_sd, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd, teacher)
    config = json.loads((teacher / "unet" / "config.json").read_text())
    (teacher / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 60000}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(StoreError, match=rf"{teacher / 'unet' / 'config.json'}: sample_size gives latents \[4, 60000, "
                                         r"60000\], .* GiB for one batch"):
        write_trajectories(teacher, prompts, tmp_path / "store", **SETTINGS)
    assert not (tmp_path / "store").exists()


def test_prompts_from_a_device_are_refused(tiny_sd, tmp_path):
    with pytest.raises(StoreError, match="prompts file /dev/zero is a device"):
        write_trajectories(tiny_sd, "/dev/zero", tmp_path / "store", **SETTINGS)
    assert not (tmp_path / "store").exists()


def test_a_line_separator_inside_a_prompt_does_not_split_it(tmp_path):
    from rapm.trajectories import read_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\u2028on a mat\x0cand more\r\na dog\n", encoding="utf-8")
    assert read_prompts(prompts) == ["a cat\u2028on a mat\x0cand more", "a dog"]


def test_bad_inputs_from_the_command_line_are_one_error_line(tiny_sd, store_copy, tmp_path):
    """The CLI path for a few of the cases above: exit 1, one `error:` line, no traceback."""
    f = _edit_manifest(store_copy, lambda m: m.update(shards=None))
    code, err = _rapm("train", "--teacher", tiny_sd, "--store", store_copy, "--out", tmp_path / "run", "--no-progress")
    _one_error_line(code, err, str(f), "field 'shards'")
    code, err = _rapm("trajectories", "--teacher", tiny_sd, "--prompts", "/dev/zero", "--out", tmp_path / "s")
    _one_error_line(code, err, "/dev/zero")
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()


def test_evaluate_writes_its_json_last_recording_its_grid_and_table(tmp_path, monkeypatch):
    import rapm.evaluate
    import rapm.folders
    from rapm.evaluate import write_evaluation

    out = tmp_path / "evaluation.json"
    result = {"samples": 1, "reference_steps": 5, "date": "d", "rows": [
        {"method": "rapm", "steps": 2, "guidance": 1.0, "trajectory_error": 0.1}]}
    write_evaluation(out, dict(result), {"rapm": torch.zeros(1, 1, 4, 4)}, columns=1)
    files = json.loads(out.read_text())["files"]
    assert files == {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
                     for name in ("evaluation.png", "evaluation.md")}
    before = faults.files_digest(tmp_path)
    real_stage = rapm.folders.stage

    def killed_at_json(final, content):
        if Path(final).suffix == ".json":
            raise KeyboardInterrupt
        return real_stage(final, content)

    monkeypatch.setattr(rapm.evaluate, "stage", killed_at_json)  # where write_evaluation looks it up
    with pytest.raises(KeyboardInterrupt):
        write_evaluation(out, dict(result), {"rapm": torch.ones(1, 1, 4, 4)}, columns=1)
    assert faults.files_digest(tmp_path) == before  # the previous set, whole; no temp file left


def test_tensorboards_writer_thread_adds_no_traceback_to_the_error_line(monkeypatch):
    import threading

    import rapm.cli

    class _AsyncWriterThread(threading.Thread):  # TensorBoard's writer thread, as named there
        def run(self):
            raise OSError(28, "No space left on device")

    class OtherThread(threading.Thread):
        def run(self):
            raise OSError(28, "No space left on device")

    printed = []
    monkeypatch.setattr(rapm.cli, "_default_thread_hook", lambda args: printed.append(type(args.thread).__name__))
    monkeypatch.setattr(threading, "excepthook", rapm.cli._thread_exception)
    for cls in (_AsyncWriterThread, OtherThread):
        t = cls()
        t.start()
        t.join()
    assert printed == ["OtherThread"]  # the traceback of any other thread still shows
