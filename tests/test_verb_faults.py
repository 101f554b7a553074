"""Issue 34's fault matrix on export, sample, evaluate and report, short: each verb (a) killed at random moments,
among them inside its file writes and between its renames, (b) on a full disk, (c) with a read-only --out, (d) with a
second writer of the same --out, (e) with --out, or a file in it, a link. Each cell: one `error:` line naming the path
and the fix, exit 1, no traceback; each final file absent, the earlier one or complete (never half-written); the
earlier result intact; a rerun that succeeds. The long campaign (real processes, a real tmpfs) is benchmarks/faults.py.

The kills fork this process (the verb's imports are done, so a run takes a second, not the 15 s of a cold `rapm`):
the child runs the verb's CLI and dies by SIGKILL at a chosen rename (its temp file first cut to half: killed while
writing it), or at a random time.
"""

import errno
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_run import one_error as _one_error, run_main as _main

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("faults_benchmark", ROOT / "benchmarks" / "faults.py")
faults = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))  # the harness of the long run
if not hasattr(faults, "main"):
    _spec.loader.exec_module(faults)

VERBS = ("sample", "evaluate", "report", "export")


def _verbs():
    return list(VERBS)


# --- the inputs: a student LoRA, a run, two evaluations -----------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tiny_sd, sd_store, tmp_path_factory):
    from rapm.config import TrainConfig, apply_overrides
    from rapm.evaluate import ModelSpec, evaluate
    from rapm.train import train

    base = tmp_path_factory.mktemp("verb-faults-inputs")
    run = base / "run"
    config = apply_overrides(TrainConfig(), {**faults.TRAIN_CONFIG, "adv_weight": 0.0, "iterations": 2,
                                             "teacher": str(tiny_sd), "store": str(sd_store)}, "test")
    train(config, run, progress=False)
    lora = base / "lora"
    _main(["export", "--run", str(run), "--out", str(lora)])
    prompts = base / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\n")
    evaluations = []
    for k, steps in enumerate((2, 3)):  # two evaluations that differ: the earlier report's and the new one's
        e = base / f"evaluation-{k}.json"
        evaluate(str(tiny_sd), [ModelSpec("rapm", 1, lora=str(lora))], ["a photo of a cat", "a red car"], [0, 1],
                 reference_steps=steps, out=e, progress=False, batch_size=2)
        evaluations.append(e)
    return {"teacher": str(tiny_sd), "run": run, "lora": lora, "prompts": prompts, "evaluations": evaluations}


argv, out_of, finals = faults.verb_argv, faults.verb_out, faults.verb_finals  # the benchmark's, shared
content, contents, leftovers = faults.result_content, faults.result_contents, faults.verb_leftovers


# --- running a verb -------------------------------------------------------------------------------------------------------

def _ok(verb: str, inputs: dict, out: Path, earlier: bool = False) -> None:
    code, err = _main(argv(verb, inputs, out, earlier))
    assert code == 0, err


class Kill:
    """SIGKILL the forked verb at its ``at``-th rename into the test's folder: "mid-write" cuts the file being renamed
    to half first (killed while writing it), "before" / "after" the rename; or (``at`` None) after ``seconds``."""

    def __init__(self, at: int | None = None, mode: str = "before", seconds: float = 0.0):
        self.at, self.mode, self.seconds = at, mode, seconds

    def __repr__(self):
        return f"kill at rename {self.at} ({self.mode})" if self.at is not None else f"kill after {self.seconds:.2f} s"


def _renames(base: Path, kill: Kill | None, counted: list):
    """Wrap os.replace and os.rename: count the renames into ``base``, and die at ``kill``'s."""
    real = {"replace": os.replace, "rename": os.rename}

    def wrap(name):
        def renamed(src, dst, *args, **kwargs):
            if not str(dst).startswith(str(base)):
                return real[name](src, dst, *args, **kwargs)
            counted.append(str(dst))
            if kill is not None and kill.at == len(counted) - 1:
                if kill.mode == "mid-write" and os.path.isfile(src):
                    os.truncate(src, os.path.getsize(src) // 2)
                if kill.mode != "after":
                    os.kill(os.getpid(), signal.SIGKILL)
                real[name](src, dst, *args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
            return real[name](src, dst, *args, **kwargs)
        return renamed

    os.replace, os.rename = wrap("replace"), wrap("rename")


def forked(args: list[str], base: Path, kill: Kill | None = None) -> tuple[int, list[str], str]:
    """Run `rapm ARGS` in a forked child: (how it ended: the exit code, or -9 for SIGKILL; the renames into
    ``base`` it made, in order; its stderr)."""
    log = base.parent / f"{base.name}-child.log"
    counts = base.parent / f"{base.name}-renames.json"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            counted = []
            _renames(base, kill, counted)
            code, err = _main(args)
            log.write_text(err)
            counts.write_text(json.dumps(counted))
        except BaseException as e:  # noqa: BLE001
            log.write_text(f"Traceback: {e!r}")
        finally:
            os._exit(code)
    if kill is not None and kill.at is None:
        time.sleep(kill.seconds)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, json.loads(counts.read_text()) if counts.exists() else [], log.read_text() if log.exists() else ""


# --- (a) kills -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", VERBS)
def test_killed_at_random_moments_each_file_is_absent_earlier_or_whole_and_a_rerun_succeeds(verb, inputs, tmp_path):
    base = tmp_path / "killed"
    base.mkdir()
    out = out_of(verb, base)
    began = time.perf_counter()
    code, renames, err = forked(argv(verb, inputs, out), base)  # uninterrupted, at the same path (export's card names it)
    seconds = time.perf_counter() - began
    assert code == 0 and renames, err
    straight = contents(verb, out)
    shutil.rmtree(base)
    base.mkdir()
    _ok(verb, inputs, out, earlier=True)
    earlier = contents(verb, out)
    assert any(earlier[k] != straight[k] for k in straight)  # the two results tell apart
    rng = random.Random(f"{verb}-34")
    kills = [Kill(rng.randrange(len(renames)), mode) for mode in ("mid-write", "after")]
    kills += [Kill(seconds=rng.uniform(0.1, seconds))]
    for kill in kills:
        code, _, err = forked(argv(verb, inputs, out), base, kill)
        if kill.at is not None:
            assert code == -signal.SIGKILL, (kill, err)
        for f, got in contents(verb, out).items():  # raises for a file that is not whole
            assert got in (earlier[f], straight[f]), (kill, f)
        _ok(verb, inputs, out)  # the rerun
        assert contents(verb, out) == straight, kill
        assert leftovers(verb, out) == [], kill
        _ok(verb, inputs, out, earlier=True)  # the earlier result again, for the next kill
    # the commit point is renamed last: killed at any rename before it, the reader's file is still the earlier one
    code, _, _ = forked(argv(verb, inputs, out), base, Kill(len(renames) - 1, "before"))
    commit_point = finals(verb, out)[-1]
    assert code == -signal.SIGKILL and content(commit_point) == earlier[str(commit_point)]


# --- (b) a full disk --------------------------------------------------------------------------------------------------------

def _full_disk(verb: str, monkeypatch, nth: int) -> list:
    """ENOSPC at the ``nth`` temp file the verb writes (rapm.files' fsync of it; export: safetensors' save, which
    writes half the file first)."""
    seen = []
    if verb == "export":
        import safetensors.torch

        real_save = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            seen.append(filename)
            if len(seen) - 1 == nth:
                Path(filename).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(tensors, filename, metadata=metadata)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        return seen
    import rapm.files

    real_fsync = os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".tmp" in Path(name).name:
            seen.append(name)
            if len(seen) - 1 == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(rapm.files.os, "fsync", fsync)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a file descriptor's file through /proc")
@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("nth", [0, -1], ids=["first-file", "last-file"])
def test_a_full_disk_is_one_error_and_the_earlier_result_stays(verb, nth, inputs, tmp_path, monkeypatch):
    out = out_of(verb, tmp_path)
    _ok(verb, inputs, out, earlier=True)
    earlier = contents(verb, out)
    if nth == -1:  # the last file written: count them in a run on a roomy disk
        counted = _full_disk(verb, monkeypatch, 10 ** 6)
        _ok(verb, inputs, out_of(verb, tmp_path / "count"))
        nth = len(counted) - 1
        monkeypatch.undo()
    _full_disk(verb, monkeypatch, nth)
    code, err = _main(argv(verb, inputs, out))
    line = _one_error(code, err, "No space left on device")
    assert str(out if verb in ("sample", "export") else out.parent) in line and ("free space" in line), line
    assert contents(verb, out) == earlier and leftovers(verb, out) == []
    monkeypatch.undo()  # space freed
    _ok(verb, inputs, out)
    assert contents(verb, out) != earlier and leftovers(verb, out) == []


# --- (c) a read-only --out ---------------------------------------------------------------------------------------------------

class ReadOnly:
    """``folder`` read-only, as a user meets it: a read-only bind mount where this runs as root (root writes
    through file modes), else mode 0555."""

    def __init__(self, folder: Path):
        self.folder, self.mounted = folder, False

    def __enter__(self):
        if os.geteuid() == 0:
            for command in (["mount", "--bind", str(self.folder), str(self.folder)],
                            ["mount", "-o", "remount,bind,ro", str(self.folder)]):
                if subprocess.run(command, capture_output=True).returncode != 0:
                    self.__exit__()
                    pytest.skip("root, and no read-only bind mount here: a mode cannot make a folder read-only")
                self.mounted = True
        else:
            self.mode = self.folder.stat().st_mode
            self.folder.chmod(0o555)
        return self

    def __exit__(self, *exc):
        if self.mounted:
            subprocess.run(["umount", str(self.folder)], check=True)
            self.mounted = False
        elif os.geteuid() != 0:
            self.folder.chmod(self.mode)


@pytest.mark.parametrize("verb", VERBS)
def test_a_read_only_out_is_one_error_and_the_earlier_result_stays(verb, inputs, tmp_path):
    folder = tmp_path / "ro"
    out = out_of(verb, folder)
    _ok(verb, inputs, out, earlier=True)
    earlier = contents(verb, out)
    with ReadOnly(folder):
        code, err = _main(argv(verb, inputs, out))
        _one_error(code, err, str(folder), "writable")
        assert contents(verb, out) == earlier
    _ok(verb, inputs, out)
    assert contents(verb, out) != earlier and leftovers(verb, out) == []


# --- (d) a second writer ----------------------------------------------------------------------------------------------------

def _lock_of(verb: str, out: Path):
    from rapm.folders import FolderLock, output_lock

    return FolderLock(out, "rapm sample") if verb == "sample" else output_lock(out, f"rapm {verb}")


@pytest.mark.parametrize("verb", _verbs())
def test_a_second_writer_of_the_same_out_is_refused(verb, inputs, tmp_path):
    out = out_of(verb, tmp_path)
    _ok(verb, inputs, out, earlier=True)
    earlier = contents(verb, out)
    lock = _lock_of(verb, out).acquire()  # the first writer, still running (this process, through the same flock)
    try:
        code, err = _main(argv(verb, inputs, out))
        _one_error(code, err, "is in use by", f"pid {os.getpid()}", "wait for it to finish")
        assert contents(verb, out) == earlier
    finally:
        lock.release()
    _ok(verb, inputs, out)
    assert contents(verb, out) != earlier and leftovers(verb, out) == []


def test_two_samples_at_once_one_writes_and_the_other_is_refused(inputs, tmp_path):
    """Real concurrency: two forked `rapm sample` on one --out; exactly one error, and the folder is one whole set."""
    out, base = out_of("sample", tmp_path), tmp_path
    pids, logs = [], []
    for k in range(2):
        log = tmp_path / f"second-{k}.log"
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                code, err = _main(argv("sample", inputs, out))
                log.write_text(err)
            finally:
                os._exit(code)
        pids.append(pid), logs.append(log)
    codes = [os.WEXITSTATUS(os.waitpid(pid, 0)[1]) for pid in pids]
    assert 0 in codes, [log.read_text() for log in logs]
    for code, log in zip(codes, logs):
        if code:
            _one_error(code, log.read_text(), "is in use by")
    whole = contents("sample", out)
    assert None not in whole.values() and leftovers("sample", base / "samples") == []


def test_export_while_training_reads_a_complete_checkpoint(inputs, tmp_path):
    """`rapm train` holds the run (its lock) while writing checkpoints; an export of the run reads the latest
    complete one and is not refused (it writes only its --out)."""
    from rapm.folders import FolderLock

    run = tmp_path / "run"
    shutil.copytree(inputs["run"], run)
    (run / "checkpoints" / ".tmp-step-00000004").mkdir()  # a checkpoint being written: not complete, not read
    with FolderLock(run, "rapm train"):
        code, err = _main(["export", "--run", str(run), "--out", str(tmp_path / "lora")])
    assert code == 0, err
    assert json.loads((tmp_path / "lora" / "rapm_lora.json").read_text())["training_steps"] == 2


def test_export_reads_the_newer_checkpoint_when_train_rotates_one_away_under_it(inputs, tmp_path, monkeypatch):
    """A running `rapm train` with keep_checkpoints 1 removes the checkpoint an export has just picked: the export
    reads the latest complete one left instead of failing with a traceback."""
    import rapm.run as run_module

    run = tmp_path / "run"
    shutil.copytree(inputs["run"], run)
    latest = run_module.latest_checkpoint(run)
    newer = latest.with_name(f"{run_module.CHECKPOINT_PREFIX}{int(latest.name[5:]) + 1:08d}")
    shutil.copytree(latest, newer)
    assert run_module.latest_checkpoint(run) == newer
    real, calls = run_module.load_checkpoint, []

    def rotated(path, trust=False):
        calls.append(path)
        if path == newer:  # rotation deletes it while it is read
            shutil.rmtree(newer)
            raise RuntimeError("not reached") if newer.exists() else FileNotFoundError(2, "No such file", str(newer))
        return real(path, trust)

    monkeypatch.setattr(run_module, "load_checkpoint", rotated)
    code, err = _main(["export", "--run", str(run), "--out", str(tmp_path / "lora")])
    assert code == 0, err
    assert calls == [newer, latest]
    assert json.loads((tmp_path / "lora" / "rapm_lora.json").read_text())["training_steps"] == 2


# --- (e) links ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", _verbs())
def test_a_link_where_a_file_of_the_result_goes_is_refused_and_its_target_untouched(verb, inputs, tmp_path):
    out = out_of(verb, tmp_path / "out")
    _ok(verb, inputs, out, earlier=True)
    earlier = contents(verb, out)
    victim = tmp_path / "mine.txt"
    victim.write_text("the user's own file")
    link = finals(verb, out)[0]
    link.unlink()
    link.symlink_to(victim)
    code, err = _main(argv(verb, inputs, out))
    _one_error(code, err, str(link), "a link", "remove the link")
    assert victim.read_text() == "the user's own file" and link.is_symlink()
    assert {str(f): content(f) for f in finals(verb, out) if f != link} == {
        k: v for k, v in earlier.items() if k != str(link)}
    link.unlink()  # the fix the error gives
    _ok(verb, inputs, out)
    assert content(link) is not None and victim.read_text() == "the user's own file"


@pytest.mark.parametrize("verb", _verbs())
def test_an_out_that_is_a_link_is_refused(verb, inputs, tmp_path):
    """sample and export: --out a link to a folder; evaluate and report: --out (the JSON, the page) a link to a file."""
    target = tmp_path / "target"
    if verb in ("sample", "export"):
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        link = out_of(verb, tmp_path)
    else:
        target.write_text("mine")
        link = out_of(verb, tmp_path)
    link.symlink_to(target)
    before = faults.files_digest(target) if target.is_dir() else target.read_bytes()
    code, err = _main(argv(verb, inputs, link))
    _one_error(code, err, str(link), "is a link" if verb in ("sample", "export") else "a link")
    assert (faults.files_digest(target) if target.is_dir() else target.read_bytes()) == before
    link.unlink()
    _ok(verb, inputs, link)


def test_exporting_the_same_checkpoint_twice_writes_the_same_bytes(inputs, tmp_path):
    """The kohya file's ss_training_finished_at / modelspec.date are the checkpoint's time, not the export's: a
    rerun after a kill (or a second export a minute later) gives the same files."""
    import time

    from safetensors import safe_open

    first = tmp_path / "lora"
    _ok("export", inputs, first)
    def files():  # safetensors orders its header's keys by a hash map: compare the metadata and tensors, not bytes
        out = {}
        for p in first.iterdir():
            if p.suffix == ".safetensors":
                with safe_open(str(p), "pt") as f:
                    out[p.name] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()})
            else:
                out[p.name] = p.read_bytes()
        return out

    before = files()
    time.sleep(1.1)  # a wall clock in the metadata would now differ by a second
    _ok("export", inputs, first)  # the same --out: the card names it
    assert files() == before
    kohya = next(p for p in first.iterdir() if p.suffix == ".safetensors" and p.name != "pytorch_lora_weights.safetensors")
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    state = sorted((inputs["run"] / "checkpoints").glob("step-*/state.safetensors"))[-1]
    assert float(meta["ss_training_finished_at"]) == float(int(state.stat().st_mtime))
