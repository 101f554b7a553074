"""The folders rapm owns (docs/design.md decision 9): the marker that says rapm made a folder, and the lock of its one writer.

A run directory carries ``.rapm-run.json`` and a store ``.rapm-store.json``: ``{"kind": ..., "version": 1}``, with no
date, so two stores written alike stay byte-identical. rapm writes into, resumes and deletes from only a folder that
carries its kind's marker (or that the previous version of rapm made, recognised by its files), and deletes only the
files it names.

The lock is ``.rapm-lock``: a file holding the writer's pid, host and start time, held with ``flock`` for as long as the
writer runs. The kernel drops the flock when the process dies, however it dies, so a lock left by a killed process is
stale by construction: the next writer takes it over and says whose it was.

A set of files that belong together (evaluate's JSON, grid and table; report's page, twin and curves) is staged:
each written whole beside its final name, then all renamed into place, the commit point last.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import time
import warnings
from pathlib import Path

from rapm.errors import RapmError, WriteError
from rapm.files import atomic_write, fsync_dir, write_temp

MARKER_VERSION = 1
RUN_MARKER = ".rapm-run.json"
STORE_MARKER = ".rapm-store.json"
LOCK = ".rapm-lock"
MARKERS = {"run": RUN_MARKER, "store": STORE_MARKER}


class FolderError(RapmError):
    """A folder rapm may not write to or delete from: names it, why, and what to do."""


class LockError(FolderError):
    """Another process is writing to the folder."""


class StaleLockWarning(UserWarning):
    """The lock of a process that is no longer running was taken over."""


class KeptWarning(UserWarning):
    """Something rapm did not write was left where rapm deletes its own files: a folder that still holds the user's
    files, or a link (never followed, never deleted through)."""


def marker_bytes(kind: str) -> bytes:
    return (json.dumps({"kind": f"rapm-{kind}", "version": MARKER_VERSION}, sort_keys=True) + "\n").encode()


def read_marker(folder: Path, kind: str) -> dict | None:
    """The marker of ``kind`` in ``folder``, None if there is none; FolderError if it is not rapm's or is newer."""
    f = Path(folder) / MARKERS[kind]
    if not f.exists():
        return None
    try:
        marker = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FolderError(f"{f}: not a readable rapm marker ({e}); if rapm made {folder}, delete the file and rerun") from None
    if not isinstance(marker, dict) or marker.get("kind") != f"rapm-{kind}":
        raise FolderError(f"{f}: field 'kind' is {marker.get('kind') if isinstance(marker, dict) else marker!r}, not "
                          f"'rapm-{kind}'; give a new or empty folder")
    if not isinstance(marker.get("version"), int) or marker["version"] > MARKER_VERSION:
        raise FolderError(f"{f}: field 'version' is {marker.get('version')!r}; this rapm reads version {MARKER_VERSION}: "
                          "use the rapm that made the folder")
    return marker


def other_kind(folder: Path, kind: str) -> str | None:
    """The kind of marker of another kind that ``folder`` carries (a store given as a run folder), None if none."""
    for other, name in MARKERS.items():
        if other != kind and (Path(folder) / name).exists():
            return other
    return None


def write_marker(folder: Path, kind: str) -> None:
    f = Path(folder) / MARKERS[kind]
    if not f.exists() or f.read_bytes() != marker_bytes(kind):
        atomic_write(f, marker_bytes(kind))


def is_empty(folder: Path) -> bool:
    """Nothing in ``folder`` but (perhaps) a lock file: a writer may make it its own."""
    folder = Path(folder)
    return not folder.exists() or (folder.is_dir() and all(p.name == LOCK for p in folder.iterdir()))


_warned: set[str] = set()


def warn_kept(path: Path, why: str, once: bool = False) -> None:
    """A KeptWarning naming ``path``; ``once``: at most once per path in this process (a rotation repeats it)."""
    if once and str(path) in _warned:
        return
    _warned.add(str(path))
    warnings.warn(f"{path}: kept, {why}", KeptWarning, stacklevel=3)


def remove_files(folder: Path, names, what: str = "folder", warn: bool = True) -> bool:
    """Delete from ``folder`` the files rapm writes there, by name (``names``: file names or glob patterns), then the
    folder itself if nothing is left in it; what else it holds stays, and (``warn``) a KeptWarning names the folder.

    Only regular files are deleted: a link or a folder under one of rapm's names is the user's. A ``folder`` that is
    a link is neither followed nor deleted. Return whether the folder is gone.
    """
    folder = Path(folder)
    if folder.is_symlink():
        warn_kept(folder, "a link, which rapm neither follows nor deletes; remove it yourself if it is not needed",
                  once=True)
        return False
    if not folder.is_dir():
        return not folder.exists()
    for pattern in names:
        for p in folder.glob(pattern):
            if p.is_file() and not p.is_symlink():
                try:
                    p.unlink(missing_ok=True)
                except OSError as e:  # a read-only folder: rapm's file stays, and so does the folder
                    if warn:
                        warn_kept(p, f"it cannot be deleted ({e.strerror or e})")
                    return False
    try:
        folder.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        try:
            left = sorted(p.name for p in folder.iterdir())
        except OSError:
            left = []
        if not left:  # not for being non-empty (a read-only parent): leave it, say why
            if warn:
                warn_kept(folder, f"it cannot be removed ({e.strerror or e})")
            return False
        shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        if warn:
            warn_kept(folder, f"this {what} holds files rapm did not write ({shown}); rapm deleted only its own")
        return False


def _lock_nonblocking(fd: int) -> None:
    """An exclusive lock on the open file ``fd`` that the OS drops when the process dies; BlockingIOError while
    another process holds it. POSIX: flock; Windows: msvcrt's lock of the file's first byte (imported here, so that
    importing rapm needs neither)."""
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _write_at_start(fd: int, content: bytes) -> None:
    if hasattr(os, "pwrite"):
        os.pwrite(fd, content, 0)
    else:  # Windows
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, content)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there; whether it runs is not checked
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _current_holder(path: Path, wait: float = 2.0) -> dict:
    """The holder named in the lock file of a held lock, waiting up to ``wait`` seconds for the process that has just
    taken it to write its name: until then the file is empty or still names the previous, dead holder."""
    deadline = time.monotonic() + wait
    while True:
        holder = _read_holder(path)
        pid = holder.get("pid")
        named = isinstance(pid, int) and (holder.get("host") != socket.gethostname() or _alive(pid))
        if named or time.monotonic() >= deadline:
            return holder if named else {}
        time.sleep(0.02)


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (its lock file names no running process)"
    started = holder.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    return f"{holder.get('command', 'rapm')} (pid {holder.get('pid')} on {holder.get('host')}, started {since})"


class FolderLock:
    """The exclusive lock of one writer on ``folder``: ``with FolderLock(folder, "rapm train"):``.

    Refuses at once with LockError naming the holder while another process holds it; takes over, with a
    StaleLockWarning, the lock file of a process that died without removing it. ``path``: the lock file, where it is
    not ``folder/.rapm-lock`` (``output_lock``: the lock of one output file, or of a folder renamed into place).
    """

    def __init__(self, folder: Path, command: str, path: Path | None = None):
        self.folder, self.command = Path(folder), command
        self.path = Path(path) if path is not None else self.folder / LOCK
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise FolderError(f"{self.path}: the lock file cannot be created ({e.strerror or e}); "
                                  f"make {self.path.parent} writable or give another folder") from None
            try:
                _lock_nonblocking(fd)
            except BlockingIOError:
                os.close(fd)
                raise LockError(f"{self.folder} is in use by {_describe(_current_holder(self.path))} ({self.path}); "
                                "one writer per folder: wait for it to finish, or stop it, then rerun") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file that the previous holder unlinked between our open and our flock
                break
            os.close(fd)
        previous = _read_holder(self.path)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            alive = previous.get("host") == socket.gethostname() and _alive(int(previous["pid"]))
            warnings.warn(f"{self.path}: taking over the lock of {_describe(previous)}, which "
                          f"{'no longer holds it' if alive else 'is no longer running'}", StaleLockWarning, stacklevel=3)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": self.command}
        content = (json.dumps(holder) + "\n").encode()
        try:
            _write_at_start(fd, content)  # then cut the tail: the file is never empty while held
            os.ftruncate(fd, len(content))
            os.fsync(fd)
        except OSError as e:  # a full disk: not even the lock's line fits
            self.path.unlink(missing_ok=True)
            os.close(fd)
            raise FolderError(f"{self.path}: the lock file cannot be written ({e.strerror or e}); free space in "
                              f"{self.path.parent} and rerun") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: a waiting opener then retries on a new file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def output_lock(final: Path, command: str) -> FolderLock:
    """The lock of the one writer of ``final`` (an output file such as evaluate's JSON, or a folder that is renamed
    into place): ``.NAME.rapm-lock`` beside it, so two processes writing the same ``--out`` refuse each other, while
    writers of other files in the same folder (``rapm train`` of the run, ``rapm report`` beside it) do not."""
    final = Path(final)
    return FolderLock(final, command, final.parent / f".{final.name}{LOCK}")


def refuse_link(path: Path, what: str = "--out") -> None:
    """FolderError when ``path`` (a final file or folder rapm is about to write) is a link: rapm writes no result
    through a link (into a folder the user did not name) nor replaces the user's link with a file."""
    path = Path(path)
    if not path.is_symlink():
        return
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    if what == "--out":  # the folder itself
        raise FolderError(f"--out {path} is a link (to {target}); rapm writes no result through a link: give the "
                          f"folder it points to as --out ({os.path.realpath(path)}), or remove the link")
    raise FolderError(f"{path}: a link (to {target}), where rapm writes its {what}; rapm writes no result through a "
                      "link, nor replaces one: remove the link or give another --out")


def refuse_links_at(folder: Path, patterns, what: str) -> None:
    """``refuse_link`` for every entry of ``folder`` under one of rapm's own names (glob ``patterns``, relative to it,
    e.g. ``done/shard-*.json``): a result rapm would resume from, rewrite or replace is never read or written through
    a link, nor is the user's link replaced by rapm's file. The user's links under other names stay untouched."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            refuse_link(path, what)


# ---------------------------------------------------------------------------------------------- sets of files

class Staged:
    """One file of a set, written whole beside its final name and not yet renamed into place."""

    def __init__(self, final: Path, tmp: Path, sha256: str):
        self.final, self.tmp, self.sha256 = final, tmp, sha256


def _temp_name(final: Path, pid: int | str) -> Path:
    return final.with_name(f".{final.stem}.{pid}.tmp{final.suffix}")  # the suffix stays: image writers read it


def remove_stale_temps(final: Path) -> None:
    """Remove the temp files of ``final`` that a killed writer left (``.STEM.PID.tmpSUFFIX`` of a process that is no
    longer running); a running writer's stay. The writers call it holding their lock."""
    final = Path(final)
    for p in final.parent.glob(f".{glob.escape(final.stem)}.*.tmp{glob.escape(final.suffix)}"):
        pid = p.name[len(final.stem) + 2:-len(f".tmp{final.suffix}")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


def stage(final: Path, content, what: str = "file") -> Staged:
    """Write ``content`` (bytes, or a function that writes the file at the path it is given) beside ``final``.

    A ``final`` that is a link is refused (FolderError): its rename would replace the user's link, and a writer that
    follows it would write outside ``--out``."""
    final = Path(final)
    refuse_link(final, what)
    tmp = _temp_name(final, os.getpid())
    failed = lambda e: (f"{final}: cannot be written ({e.strerror or e}); the files there before are unchanged; free "  # noqa: E731
                        f"space in {final.parent} or give a writable folder")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final)
    except OSError as e:
        raise WriteError(failed(e)) from None
    return Staged(final, tmp, write_temp(tmp, content, failed))


def discard(staged: list[Staged]) -> None:
    for s in staged:
        s.tmp.unlink(missing_ok=True)


def commit(staged: list[Staged]) -> None:
    """Rename a staged set into place in order: the last file is the set's commit point (a reader trusts the others
    only where the last one records their sha256)."""
    try:
        for s in staged:
            os.replace(s.tmp, s.final)
    except OSError as e:
        discard(staged)
        raise WriteError(f"{staged[-1].final}: cannot be written ({e.strerror or e}); give a writable folder") from None
    for folder in {s.final.parent for s in staged}:  # the renames durable
        fsync_dir(folder)
