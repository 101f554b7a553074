"""File safety, once (docs/design.md decision 9): a file rapm writes is absent, the old one, or complete.

- ``write_synced``: bytes to a file, flushed to disk.
- ``write_temp``: bytes (or a writer function) to a temp path, synced, hashed; the temp removed if anything fails.
- ``atomic_write``: one file by temp + fsync + rename + directory fsync.
- ``replace_dir``: a finished temp folder put in place of a folder by renames.
- ``fsync_dir``, ``sha256_file``, ``sha256_text``, ``read_json_object``: the small facts the writers and readers share.
- ``check_safetensors``, ``check_weights_folder``: a .safetensors file's header checked before a library loads it.

Staged sets of files (several renamed together) are ``rapm.folders``'; checkpoints (a folder by one rename) are
``rapm.run``'s; both write through these.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from rapm.errors import WriteError


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; some filesystems cannot fsync a directory (the rename is still atomic)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_synced(path: Path, data: bytes, opener: Callable = open) -> None:
    with opener(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_temp(tmp: Path, content: bytes | Callable[[Path], object], failed: Callable[[OSError], str],
               opener: Callable = open) -> str:
    """Write ``content`` (bytes, or a function that writes the file at the path it is given) to ``tmp``, synced;
    return its sha256. On an OSError the temp is removed and WriteError(``failed(error)``) raised."""
    try:
        if callable(content):
            content(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            write_synced(tmp, content, opener)
        with open(tmp, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:  # a full disk: say which file, keep what was there
        tmp.unlink(missing_ok=True)
        raise WriteError(failed(e)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes, opener: Callable = open) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, the old file, or complete (``opener`` opens the
    temp file: a module that writes through this one passes its own ``open``, where the fault tests put a full disk)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    failed = lambda e: (f"{path}: cannot be written ({e.strerror or e}); the files written before it are intact; "  # noqa: E731
                        f"free space in {path.parent} and rerun the same command")
    write_temp(tmp, data, failed, opener)
    try:
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(failed(e)) from None
    fsync_dir(path.parent)


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``out`` (whole folders: the old one renamed aside, then removed)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def read_json_object(file: Path, error: type[Exception], readable: str, kind: str, fix: str) -> dict:
    """The JSON object in ``file``; else ``error``: "FILE: not {readable} (why); {fix}" or "FILE: not {kind}; {fix}"."""
    try:
        value = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{file}: not {readable} ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{file}: not {kind}; {fix}")
    return value


SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors library's own limit on a header


def check_safetensors(path: Path, error: type[Exception], fix: str) -> None:
    """``error`` naming ``path`` unless it is a .safetensors file whose header fits the file and parses and whose
    tensors' dtypes, shapes and offsets cover its bytes exactly. Reads the header only (the library maps the file):
    a header that claims 10^15 bytes, JSON nested 100,000 deep or a 2 GB tensor in a 1 KB file costs no memory."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            claimed = int.from_bytes(f.read(8), "little")
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None
    if size < 8 or claimed > min(size - 8, SAFETENSORS_HEADER_LIMIT):
        raise error(f"{path}: not a safetensors file (its header claims {claimed:,} bytes, the file holds {size:,}); {fix}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # noqa: BLE001 - SafetensorError and what the library raises for a header it refuses
        raise error(f"{path}: not a readable safetensors file ({e}); {fix}") from None


def check_weights_folder(folder: Path, error: type[Exception], fix: str) -> None:
    """``check_safetensors`` of every .safetensors file in ``folder`` and its subfolders (a diffusers pipeline's
    components, one level down)."""
    folder = Path(folder)
    for f in sorted([*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors")]):
        check_safetensors(f, error, fix)
