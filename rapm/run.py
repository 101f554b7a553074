"""The run directory (docs/design.md decisions 4 and 9): config, checkpoints and their schema (``TrainState``), marker,
lock, resume, and ``load_student`` (N from the checkpoint, so a run whose store is gone still exports).

run/
  .rapm-run.json              the marker: rapm made this folder (rapm.folders)
  .rapm-lock                  while a trainer runs: its pid, host and start time
  config.json                 the full configuration (preset, file and flags resolved)
  checkpoints/step-00000100/  state.safetensors (every tensor), state.json (the rest, as JSON), state.sha256
  logs.jsonl                  every loss term of every iteration
  tensorboard/                the same, for TensorBoard
  samples/step-00000100.png   student N-step vs stored teacher end point, same noise

A checkpoint is data, never code: its tensors (adapters, heads, EMA, optimizer moments, the torch RNG state, a
method's tensors) are one safetensors file, and everything else (step, counters, learning rates, the Python and numpy
RNG states, the data position) is JSON in which each tensor is a reference ``{"__tensor__": name}``. An old
``state.pt`` (rapm before this format) loads with ``torch.load(weights_only=True)``, or, only when the user says
``--trust-checkpoint``, with a full unpickler and a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rapm import config as cfg
from rapm.config import TrainConfig, split_seed
from rapm.errors import RapmError
from rapm.families import BUILTIN_TEACHERS, resolve_teacher_path
from rapm.families.base import TeacherError
from rapm.files import (atomic_write, check_safetensors, check_weights_folder, fsync_dir, read_json_object, sha256_file,
                        write_synced)
from rapm.folders import (RUN_MARKER, FolderError, FolderLock, is_empty, other_kind, read_marker, refuse_link,
                          refuse_links_at, remove_files, warn_kept, write_marker)
from rapm.roles import LoraSpec, STUDENT, add_roles, lora_parameters
from rapm.store import read_manifest
from rapm.teacher import load_teacher

CHECKPOINT_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
TENSORS = "state.safetensors"
STATE = "state.json"
SUMS = "state.sha256"
LEGACY = "state.pt"  # rapm's checkpoints before safetensors + JSON
# Every file rapm writes into a checkpoint folder, the commit points first: a checkpoint deleted half-way (a kill) is
# incomplete, never complete and damaged. Only these are deleted (rotation, --overwrite); anything else keeps the folder.
CHECKPOINT_FILES = (STATE, LEGACY, TENSORS, SUMS)
CHECKPOINT_FORMAT = "rapm-checkpoint"
CHECKPOINT_VERSION = 1


class RunError(RapmError):
    pass


class UnsafeCheckpointError(RunError):
    """An old pickle checkpoint that weights_only loading refuses: loading it could run code."""


class ResumeWarning(UserWarning):
    """A damaged checkpoint was skipped on resume."""


class TrustWarning(UserWarning):
    """An old pickle checkpoint was loaded with the full unpickler because the user trusts it."""


# ---------------------------------------------------------------------------------------------- tensors + JSON

def _join(path: str, key) -> str:
    return f"{path}/{key}" if path else str(key)


def _encode(obj, path: str, tensors: dict[str, torch.Tensor]):
    """``obj`` as JSON, its tensors moved into ``tensors`` under their path in the state ("opt_student/state/0/exp_avg")."""
    if isinstance(obj, torch.Tensor):
        key = path
        while key in tensors:
            key += "'"
        t = obj.detach().cpu()
        if not t.is_contiguous() or t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()  # safetensors stores whole, unshared storages
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, _join(path, k), tensors) for k, v in obj.items()}
        # an optimizer's state is keyed by parameter index: keep the keys' types
        return {"__items__": [[_encode(k, _join(path, "key"), tensors), _encode(v, _join(path, k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint field {path or '/'}: a {type(obj).__name__} is not data a checkpoint can hold")


def _decode(obj, tensors: dict[str, torch.Tensor], where: str):
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise RunError(f"{where}: tensor {obj['__tensor__']!r} is missing from {TENSORS}; the checkpoint is damaged")
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------- checkpoints

def _complete(path: Path) -> bool:
    return (path / STATE).exists() or (path / LEGACY).exists()


def _warn_link(path: Path) -> None:
    warn_kept(path, "a link, not a checkpoint folder rapm wrote: rapm neither reads it, nor follows it, nor deletes "
                    f"it, and it stays beside the checkpoints that rotation keeps; move it out of {path.parent}", once=True)


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temp directory is never one: it is renamed only when whole).

    A link named like a checkpoint is none (rapm never writes one): it is skipped, with a warning once.
    """
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if not (p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()):
            continue
        if p.is_symlink():
            _warn_link(p)
        elif p.is_dir() and _complete(p):
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def remove_checkpoint(path: Path, warn: bool = True) -> bool:
    """Delete checkpoint folder ``path``'s files (CHECKPOINT_FILES), then the folder if nothing else is in it; a folder
    holding anything else stays, named in a warning. Return whether it is gone."""
    return remove_files(path, CHECKPOINT_FILES, "checkpoint folder", warn=warn)


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished checkpoint ``tmp`` to ``final``: whole when ``final`` is gone, else file by file into it
    (``final`` holds the user's files), its commit point last."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"{final}: not a checkpoint folder rapm wrote ({'a link' if final.is_symlink() else 'a file'}); "
                       f"rapm deletes nothing there: move it out of {final.parent} and resume with --resume")
    if remove_checkpoint(final, warn=False):
        os.replace(tmp, final)
        return
    for name in (TENSORS, SUMS, STATE):  # the user's files beside it stay
        os.replace(tmp / name, final / name)
    tmp.rmdir()
    fsync_dir(final)


def latest_checkpoint(run: Path) -> Path | None:
    found = checkpoints(run)
    return found[-1] if found else None


def state_file(path: Path) -> Path:
    """The file that names checkpoint ``path`` in messages: state.json, or an old checkpoint's state.pt."""
    return path / LEGACY if (path / LEGACY).exists() and not (path / STATE).exists() else path / STATE


def _write(path: Path, data: bytes) -> None:
    write_synced(path, data, open)  # this module's ``open``: where the fault tests put a full disk


def save_checkpoint(run: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` (tensors + JSON) and their sha256s to a temp directory, rename it into place, keep the last ``keep``.

    A write that fails (a full disk) removes the temp directory and raises RunError; the checkpoints before stay.
    """
    from safetensors.torch import save

    folder = Path(run) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = folder / f"{TMP_PREFIX}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors: dict[str, torch.Tensor] = {}
    try:
        tree = _encode(state, "", tensors)
    except TypeError as e:  # an optimizer or method whose state is not tensors and data: say which field
        raise RunError(f"{final}: cannot be written: {e}; the last complete checkpoint is "
                       f"{latest_checkpoint(run) or 'none yet'}") from None
    tensor_bytes = save(tensors)
    state_bytes = (json.dumps({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, "state": tree},
                              indent=1) + "\n").encode()
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in ((TENSORS, tensor_bytes), (STATE, state_bytes)))
    try:
        tmp.mkdir()
        _write(tmp / TENSORS, tensor_bytes)
        _write(tmp / SUMS, sums.encode())
        _write(tmp / STATE, state_bytes)  # last: the file whose presence makes a checkpoint complete
    except OSError as e:  # a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"{final / TENSORS}: cannot be written ({e.strerror or e}); the last complete checkpoint is "
                       f"{latest_checkpoint(run) or 'none yet'}; free space in {folder} and resume with --resume") from None
    _put_in_place(tmp, final)
    fsync_dir(folder)
    for old in checkpoints(run)[:-keep]:
        remove_checkpoint(old)
    return final


def load_checkpoint(path: Path, trust: bool = False) -> dict:
    """The state of the checkpoint folder ``path``, checked against its sha256s. Nothing in it can run code.

    ``trust=True`` (``--trust-checkpoint``) lets an old ``state.pt`` that ``weights_only=True`` refuses load with the
    full unpickler, with a warning: only for a checkpoint the user made.
    """
    path = Path(path)
    if not (path / STATE).exists() and (path / LEGACY).exists():
        return _load_legacy(path, trust)
    fix = f"delete {path} to resume from the checkpoint before it"
    where = path / STATE
    try:
        recorded = dict(reversed(line.split("  ", 1)) for line in (path / SUMS).read_text().splitlines() if line)
    except (OSError, ValueError) as e:
        raise RunError(f"{path / SUMS}: cannot be read ({e}); {fix}") from None
    for name in (TENSORS, STATE):
        try:
            digest = sha256_file(path / name)
        except OSError as e:
            raise RunError(f"{path / name}: cannot be read ({e.strerror or e}); {fix}") from None
        if recorded.get(name) != digest:
            raise RunError(f"{path / name}: sha256 does not match {SUMS} (damaged after it was written); {fix}")
    from safetensors.torch import load_file

    try:
        document = json.loads((path / STATE).read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - a checkpoint damaged after it was written
        raise RunError(f"{where}: cannot be read ({type(e).__name__}: {e}); {fix}") from None
    check_safetensors(path / TENSORS, RunError, fix)  # its header first: a hostile one costs no memory
    try:
        tensors = load_file(str(path / TENSORS))
    except Exception as e:  # noqa: BLE001
        raise RunError(f"{path / TENSORS}: cannot be read ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT or not isinstance(document.get("state"), dict):
        raise RunError(f"{where}: field 'format' is not {CHECKPOINT_FORMAT!r}: not a rapm checkpoint; {fix}")
    if document.get("version") != CHECKPOINT_VERSION:
        raise RunError(f"{where}: field 'version' is {document.get('version')!r}, this rapm reads {CHECKPOINT_VERSION}; "
                       "use the rapm that wrote it")
    return _decode(document["state"], tensors, str(where))


def _numpy_globals() -> list:
    """What a numpy array in an old checkpoint (the numpy RNG state) needs from weights_only's unpickler: no code."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load_legacy(path: Path, trust: bool) -> dict:
    fix = f"delete {path} to resume from the checkpoint before it"
    pt = path / LEGACY
    recorded = path / "state.sha256"
    if recorded.exists() and sha256_file(pt) != recorded.read_text().strip():
        raise RunError(f"{pt}: sha256 does not match {recorded.name} (damaged after it was written); {fix}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        # refused (an object weights_only does not allow), as opposed to damaged
        refused = isinstance(e, pickle.UnpicklingError) and "WeightsUnpickler error" in str(e)
        if not refused:
            raise RunError(f"{pt}: cannot be read ({type(e).__name__}: {str(e)[:200]}); {fix}") from None
        if not trust:
            first = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line or "GLOBAL" in line), "")
            raise UnsafeCheckpointError(
                f"{pt}: an old-format checkpoint holding objects other than tensors and data ({first or 'refused'}); "
                "loading it could run code, so rapm does not; if you wrote this run yourself, pass --trust-checkpoint "
                "once (then its next checkpoint is safetensors + JSON)") from None
    warnings.warn(f"{pt}: loading an old pickle checkpoint with the full unpickler because of --trust-checkpoint; "
                  "this runs any code the file holds", TrustWarning, stacklevel=3)
    try:
        return torch.load(pt, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise RunError(f"{pt}: cannot be read ({type(e).__name__}: {str(e)[:200]}); {fix}") from None


def load_resume_checkpoint(run: Path, trust: bool = False) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that loads; a damaged one is skipped with a warning (resume is exact from any of them)."""
    damaged = []
    for path in reversed(checkpoints(run)):
        try:
            state = load_checkpoint(path, trust)
        except UnsafeCheckpointError:  # refused, not damaged: say so rather than resume quietly from an older one
            raise
        except RunError as e:
            damaged.append(str(e))
            warnings.warn(f"{e}; resuming from the checkpoint before it", ResumeWarning, stacklevel=2)
            continue
        return path, state
    if damaged:
        raise RunError(f"{Path(run) / 'checkpoints'}: no checkpoint can be read ({'; '.join(damaged)}); "
                       f"start over with --overwrite")
    return None, None


# ---------------------------------------------------------------------------------------------- the folder

RUN_FILES = ("config.json", "logs.jsonl")  # rapm's files at the top of a run; the rest is under these folders:
RUN_FOLDERS = {"checkpoints": (f"{CHECKPOINT_PREFIX}*", f"{TMP_PREFIX}*"), "samples": ("step-*.png",),
               "tensorboard": ("events.out.tfevents.*",)}


def _legacy_run(run: Path) -> bool:
    """A run made by rapm before markers: a config.json that is a rapm training config, beside checkpoints/ or logs."""
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and {"teacher", "store", "method", "iterations"} <= set(config)
            and ((run / "checkpoints").is_dir() or (run / "logs.jsonl").exists()))


def is_run(run: Path) -> bool:
    """Whether rapm made ``run`` (its marker, or an older rapm's files). FolderError if its marker is not a run's."""
    run = Path(run)
    if read_marker(run, "run") is not None:
        return True
    return _legacy_run(run)


def check_run_dir(run: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse to resume nothing, to overwrite a run by accident, or to write into a folder rapm did not make.

    Return whether a run exists there. Reads only.
    """
    run = Path(run)
    refuse_link(run)  # a FolderError: a run is never written through a link
    if run.exists() and not run.is_dir():
        raise RunError(f"--out {run} is a file; give a new or empty folder for the run")
    kind = other_kind(run, "run") if run.is_dir() else None
    if kind:
        raise RunError(f"--out {run} is a rapm {kind} ({'.rapm-' + kind + '.json'}), not a run directory; give a new or "
                       "empty folder for the run")
    owned = run.is_dir() and is_run(run)
    # a FolderError: rapm's own files are never read or written through a link (a checkpoint folder that is a link
    # is the user's, warned about and left alone: _remove_checkpoint_entries)
    inside = [f"{folder}/{pattern}" for folder, patterns in RUN_FOLDERS.items() if folder != "checkpoints"
              for pattern in patterns] + [f"checkpoints/{CHECKPOINT_PREFIX}*/{name}" for name in CHECKPOINT_FILES]
    refuse_links_at(run, [*RUN_FILES, *RUN_FOLDERS, *inside], "run")
    existing = owned and (run / "config.json").exists()
    if resume and not existing:
        raise RunError(f"{run / 'config.json'} does not exist: there is no run to resume in {run}; drop --resume to start one")
    if not owned and not is_empty(run):
        raise RunError(f"--out {run} is not empty and is not a rapm run directory (no {RUN_MARKER}); rapm writes only "
                       "into a new or empty folder or its own run, and deletes nothing here: give another --out")
    if existing and not (resume or overwrite):
        raise RunError(f"{run} already holds a run (config.json); pass --resume to continue it or --overwrite to start over")
    return existing


def _remove_checkpoint_entries(folder: Path, stale_only: bool = False) -> None:
    """Delete rapm's files from the checkpoint folders (and temp ones) in ``folder``, each folder if then empty.

    ``stale_only``: only what a killed run leaves (temp folders, incomplete checkpoints). A link is never followed,
    a file is never rapm's: both stay.
    """
    for p in sorted(folder.iterdir()):
        if not p.name.startswith((CHECKPOINT_PREFIX, TMP_PREFIX)):
            continue
        if p.is_symlink():
            _warn_link(p)
        elif p.is_dir() and not (stale_only and p.name.startswith(CHECKPOINT_PREFIX) and _complete(p)):
            remove_checkpoint(p)


def remove_run_files(run: Path) -> None:
    """Delete what rapm wrote into the run ``run`` (its files by name, nothing else); keep the marker.

    A folder (checkpoints/, a checkpoint, samples/, tensorboard/) that still holds something else stays, with a
    warning naming it: rapm deletes only the file names it writes (RUN_FILES, RUN_FOLDERS, CHECKPOINT_FILES).
    """
    for name in RUN_FILES:
        if (run / name).is_file() and not (run / name).is_symlink():
            (run / name).unlink(missing_ok=True)
    if (run / "checkpoints").is_dir() and not (run / "checkpoints").is_symlink():
        _remove_checkpoint_entries(run / "checkpoints")
    for folder, patterns in RUN_FOLDERS.items():
        if (run / folder).exists() or (run / folder).is_symlink():  # checkpoints/ holds folders, not files, of rapm's
            remove_files(run / folder, () if folder == "checkpoints" else patterns)


def prepare_run_dir(run: Path, resume: bool, overwrite: bool) -> None:
    """Make ``run`` a run directory: create it with its marker, or (--overwrite) empty a run of rapm's files."""
    if check_run_dir(run, resume, overwrite) and overwrite and not resume:
        remove_run_files(run)
    run.mkdir(parents=True, exist_ok=True)
    write_marker(run, "run")  # a run made before markers is adopted


def clean_stale_files(run: Path) -> None:
    """Remove what a killed run leaves behind, in a run rapm made: temp checkpoint folders, half-rotated ones, temp files."""
    if read_marker(run, "run") is None:
        return
    folder = run / "checkpoints"
    if folder.is_dir() and not folder.is_symlink():
        _remove_checkpoint_entries(folder, stale_only=True)
    for name in RUN_FILES + (RUN_MARKER,):  # atomic_write's temp files of rapm's own files
        for p in run.glob(f".{name}.*tmp"):
            p.unlink(missing_ok=True)


def truncate_log(log_file: Path, last_step: int) -> None:
    """Keep only the log lines of iterations the checkpoint includes (a resume recomputes the rest)."""
    if not log_file.exists():
        return
    kept = []
    for line in log_file.read_text().splitlines():
        try:
            if json.loads(line)["step"] < last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut by the kill: everything after it is unsure
    atomic_write(log_file, "".join(line + "\n" for line in kept).encode())


@contextmanager
def run_lock(run: Path, main: bool, agree: Callable[[bool], bool], check: Callable[[], object]):
    """Hold the run's lock (the main process takes it) for the body; ``check`` runs under it.

    ``agree(failed)`` tells every process whether any failed (an all-reduce under a multi-process launch), so a refusal
    stops all of them. A folder that this call created and that is left empty is removed again.
    """
    run = Path(run)
    created = not run.exists()
    lock, error = None, None
    if main:
        try:
            run.mkdir(parents=True, exist_ok=True)
            lock = FolderLock(run, "rapm train").acquire()
            check()  # again, now that no other trainer can change the folder
        except OSError as e:  # a read-only or missing parent
            error = RunError(f"--out {run}: cannot be created or written ({e.strerror or e}); give a writable folder")
        except RapmError as e:
            error = e
    try:
        if agree(error is not None):
            raise error or RunError(f"{run}: the main process refused to train here; see its error")
        yield
    finally:
        if lock is not None:
            lock.release()
        if created and main and is_empty(run):
            try:
                run.rmdir()
            except OSError:
                pass


class LogFile:
    """``logs.jsonl`` opened for appending: each line is one write, and a write that fails (a full disk) takes back
    what it wrote and raises RunError, so the file holds whole lines only."""

    def __init__(self, path: Path, checkpoint: Callable[[], Path | None] = lambda: None):
        self.path, self.checkpoint = Path(path), checkpoint
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise self._error(e) from None

    def _error(self, e: OSError) -> RunError:
        return RunError(f"{self.path}: cannot be written ({e.strerror or e}); the last complete checkpoint is "
                        f"{self.checkpoint() or 'none yet'}; free space in {self.path.parent} and resume with --resume")

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        size = os.fstat(self.fd).st_size
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            try:
                os.ftruncate(self.fd, size)  # no half line
            except OSError:
                pass
            raise self._error(e) from None

    def flush(self) -> None:  # every write is already the file's
        pass

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class GuardedWriter:
    """A TensorBoard SummaryWriter whose failed writes (a full disk; they surface on a later call) raise RunError."""

    def __init__(self, writer, folder: Path, checkpoint: Callable[[], Path | None] = lambda: None):
        self.writer, self.folder, self.checkpoint = writer, Path(folder), checkpoint

    def _call(self, name: str, *args, **kwargs):
        try:
            return getattr(self.writer, name)(*args, **kwargs)
        except OSError as e:
            raise RunError(f"{self.folder}: TensorBoard events cannot be written ({e.strerror or e}); the last complete "
                           f"checkpoint is {self.checkpoint() or 'none yet'}; free space and resume with --resume "
                           "(logs.jsonl has every value)") from None

    def __getattr__(self, name: str):  # add_scalar, add_image, add_text ...: each write guarded
        method = getattr(self.writer, name)
        if not callable(method):
            return method
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)

    def close(self):
        try:  # in the loop's finally: a failure is reported by the add_scalar that met it, not masked here
            self.writer.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------- the checkpoint schema

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_position(config: TrainConfig, store) -> dict:
    """What fixes the data stream a checkpoint's step counts in: a resume must see the same."""
    return {"seed": config.seed, "batch_size": config.batch_size, "count": len(store), "steps": store.steps,
            "val_fraction": config.val_fraction, "train_trajectories": config.train_trajectories,
            "split_seed": split_seed(config)}


def check_data_position(checkpoint: Path, saved: dict, current: dict, store: str) -> None:
    """Refuse a resume whose data stream differs from the checkpoint's (its step would count other samples)."""
    # checkpoints from before the validation split held nothing out; from before val_seed, the split's seed was seed
    saved = {"val_fraction": 0.0, **({"split_seed": saved["seed"]} if "seed" in saved else {}), **saved}
    for field, value in saved.items():
        if field in current and current[field] != value:
            what = {"count": f"the store's trajectory count ({store})",
                    "steps": f"the store's N, manifest field 'steps' ({store})",
                    "split_seed": "the held-out split's seed (config field 'val_seed', else 'seed')"}.get(
                field, f"config field {field!r}")
            raise RunError(f"{state_file(checkpoint)}: {what} was {value} when it was written but is {current[field]} "
                           f"now; resume with the run's own store and settings, or start a new run in another --out")



class TrainState:
    """Everything a checkpoint holds, and the one place its schema is written and read: the student's weights (and
    a method's own, RDD's head), the discriminator's, the EMA, the optimizers and their schedules, the method's
    state, the RNG and the data position (which also records N, the store's steps, for ``load_student``)."""

    def __init__(self, student: dict, discriminator: dict, ema: dict | None, opt_student, sched_student, opt_disc,
                 sched_disc, method):
        self.student, self.discriminator, self.ema = student, discriminator, ema
        self.opt_student, self.sched_student, self.opt_disc, self.sched_disc = opt_student, sched_student, opt_disc, sched_disc
        self.method = method

    def snapshot(self, step: int, data: dict) -> dict:
        return {
            "step": step,
            "student": {n: p.detach().cpu() for n, p in self.student.items()},
            "method": self.method.state_dict(),
            "discriminator": {n: p.detach().cpu() for n, p in self.discriminator.items()},
            "ema": {n: v.cpu() for n, v in self.ema.items()} if self.ema is not None else None,
            "opt_student": self.opt_student.state_dict(),
            "sched_student": self.sched_student.state_dict(),
            "opt_disc": self.opt_disc.state_dict() if self.opt_disc is not None else None,
            "sched_disc": self.sched_disc.state_dict() if self.sched_disc is not None else None,
            "rng": rng_state(),
            "data": data,
        }

    def restore(self, state: dict, device) -> int:
        """Load a checkpoint's ``state`` (its data position already checked); return its step."""
        with torch.no_grad():
            for n, p in self.student.items():
                p.copy_(state["student"][n])
            for n, p in self.discriminator.items():
                p.copy_(state["discriminator"][n])
        self.opt_student.load_state_dict(state["opt_student"])
        self.sched_student.load_state_dict(state["sched_student"])
        if self.opt_disc is not None:
            self.opt_disc.load_state_dict(state["opt_disc"])
            self.sched_disc.load_state_dict(state["sched_disc"])
        if self.ema is not None:
            self.ema = {n: v.to(device) for n, v in state["ema"].items()}
        self.method.load_state_dict(state.get("method") or {})
        set_rng_state(state["rng"])
        return state["step"]


# ---------------------------------------------------------------------------------------------- after training

def read_run_config(run: Path) -> TrainConfig:
    file = Path(run) / "config.json"
    if not file.exists():
        raise RunError(f"{file} does not exist: {run} is not a rapm run directory (made by rapm train --out)")
    values = read_json_object(file, RunError, "readable JSON", "a config object", "restore it or start over with --overwrite")
    return cfg.from_dict(values, str(file))


def checkpoint_of_step(run: Path, step: int) -> Path:
    """The complete checkpoint of iteration ``step``; a RunError naming the steps there are when it is not one."""
    found = checkpoints(run)
    for path in found:
        if int(path.name[len(CHECKPOINT_PREFIX):]) == step:
            return path
    if not found:
        raise RunError(f"{Path(run) / 'checkpoints'}: no complete checkpoint yet, none of step {step}; train longer or "
                       "lower --checkpoint-every")
    have = ", ".join(str(int(p.name[len(CHECKPOINT_PREFIX):])) for p in found)
    raise RunError(f"{Path(run) / 'checkpoints'}: no complete checkpoint of step {step}; the run has step"
                   f"{'s' if len(found) > 1 else ''} {have} (rotation keeps the newest keep_checkpoints); give "
                   f"{'one of them' if len(found) > 1 else 'it'} to --step, or leave --step out for the latest")


def check_teacher_weights(teacher: str | Path) -> None:
    """Every .safetensors file of the teacher's folder checked (rapm.files.check_safetensors) before diffusers loads
    it: a damaged or hostile one is one error naming it, not a library's traceback."""
    if str(teacher) in BUILTIN_TEACHERS:
        return
    folder = resolve_teacher_path(teacher)
    if folder.is_dir():
        check_weights_folder(folder, TeacherError, f"the teacher's weights are damaged: copy {folder} again from "
                             "where it came from")


def load_student(run: Path, device: str = "cpu", text_encoders: bool = False, trust_checkpoint: bool = False,
                 step: int | None = None):
    """The teacher's UNet carrying the run's latest student (its EMA where the run keeps one), for export and sampling;
    ``step``: the student of that iteration's checkpoint instead."""
    run = Path(run)
    config = read_run_config(run)
    last, state, written_at = _read_student_checkpoint(run, step, trust_checkpoint)
    check_teacher_weights(config.teacher)
    teacher = load_teacher(config.teacher, device=device, text_encoders=text_encoders)
    add_roles(teacher.unet, LoraSpec(config.lora_rank, config.lora_alpha, list(config.lora_targets)))
    params = lora_parameters(teacher.unet, STUDENT)
    values = state["ema"] if state.get("ema") else state["student"]
    missing = [n for n in params if n not in values]
    if missing:
        raise RunError(f"{state_file(last)}: student weight {missing[0]!r} is missing ({len(missing)} in all); the "
                       "checkpoint is not from this run's config")
    with torch.no_grad():
        for n, p in params.items():
            if tuple(values[n].shape) != tuple(p.shape):
                raise RunError(f"{state_file(last)}: student weight {n!r} has shape {tuple(values[n].shape)}, the run's "
                               f"config gives {tuple(p.shape)}; the checkpoint is not from this run's config")
            p.copy_(values[n])
    out = cfg.to_dict(config)
    steps = state.get("data", {}).get("steps")  # N, for export and sampling: the checkpoint's, so no store is needed
    out["steps"] = int(steps) if steps is not None else int(read_manifest(Path(config.store))["steps"])
    out["step"] = state["step"]
    out["checkpoint"] = str(last)
    if isinstance(state.get("training_started_at"), (int, float)):  # recorded by runs since 2026-12 (rapm.train)
        out["training_started_at"] = float(state["training_started_at"])
    # when this checkpoint was written (its state file's time): the export's ss_training_finished_at and
    # modelspec.date, so that exporting the same checkpoint twice writes the same bytes
    out["checkpoint_written_at"] = written_at
    return teacher, teacher.unet, out


def _read_student_checkpoint(run: Path, step: int | None, trust: bool) -> tuple[Path, dict, float]:
    """(folder, state, time written) of the latest checkpoint (or of ``step``'s). A ``rapm train`` still running
    rotates checkpoints away: one removed while it is read gives way to the newer one, not to an error."""
    for _ in range(10):
        last = latest_checkpoint(run) if step is None else checkpoint_of_step(run, step)
        if last is None:
            raise RunError(f"{run / 'checkpoints'}: no complete checkpoint yet; train longer or lower --checkpoint-every")
        try:
            written_at = float(int(state_file(last).stat().st_mtime))
            return last, load_checkpoint(last, trust), written_at
        except (OSError, RunError) as e:
            if last.exists():
                if isinstance(e, RunError):
                    raise
                raise RunError(f"{state_file(last)}: cannot be read ({e.strerror or e})") from None
            if step is not None:
                raise RunError(f"{last}: removed while it was read (a rapm train still running rotates its "
                               "checkpoints); give a newer --step, or raise keep_checkpoints") from None
    raise RunError(f"{run / 'checkpoints'}: each checkpoint was removed while it was read (a rapm train still running "
                   "rotates them); rerun when it has finished")


__all__ = ["CHECKPOINT_PREFIX", "TMP_PREFIX", "RunError", "UnsafeCheckpointError", "ResumeWarning", "TrustWarning", "FolderError", "checkpoints",
           "latest_checkpoint", "save_checkpoint", "load_checkpoint", "load_resume_checkpoint", "check_run_dir",
           "prepare_run_dir", "run_lock", "LogFile", "GuardedWriter", "clean_stale_files", "truncate_log", "read_run_config", "load_student", "checkpoint_of_step", "state_file",
           "TrainState", "rng_state", "set_rng_state", "data_position", "check_data_position"]
