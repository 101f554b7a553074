"""The trajectory store's writer: everything ``rapm.trajectories`` writes into a store, and in what order.

The format and its reader are ``rapm.store``'s. A store is written in four steps, each safe to interrupt:

1. ``check_folder`` (every process, read only): the folder is new, empty or rapm's store of the same settings, with no
   link where a store file goes.
2. ``open_for_writing`` (the main process): the marker, an incomplete manifest, the prompts and the negative prompt.
3. ``write_shard`` per shard (process k % world writes shard k): the shard file atomically, then its done record;
   ``shard_complete`` says which shards a rerun can skip.
4. ``finish`` (the main process, once ``wait_for_shards`` sees every done record): the complete manifest.

``one_writer`` holds the store's lock around the whole call and removes a folder it created when no shard completed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from rapm.files import sha256_text
from rapm.folders import (STORE_MARKER, FolderError, FolderLock, is_empty, other_kind, read_marker, refuse_links_at,
                          remove_files, write_marker)
from rapm.store import (DONE, FORMAT_VERSION, MANIFEST, NEGATIVE, PROMPTS, REQUIRED_FIELDS, StoreError, atomic_write,
                        json_bytes, manifest_bytes, num_shards, read_manifest, schedule_mismatch, shard_name,
                        shard_span)
from rapm.text import plural

POLL_SECONDS = 0.5  # how often a process looks for the others' done records, or the main process's manifest


def _identity(manifest: dict) -> list[tuple[str, object]]:
    """The fields that fix what a store holds: a rerun into the store must agree on all of them."""
    return [
        ("format_version", manifest["format_version"]),
        ("teacher.family", manifest["teacher"]["family"]),
        ("teacher.unet_hash", manifest["teacher"]["unet_hash"]),
        ("teacher.dtype", manifest["teacher"].get("dtype")),
        ("latent_shape", list(manifest["latent_shape"])),
        ("steps", manifest["steps"]),
        ("substeps", manifest["substeps"]),
        ("solver", manifest.get("solver", "ddim")),
        ("delta", manifest.get("delta")),
        ("timesteps", list(manifest["timesteps"])),
        ("guidance", manifest["guidance"]),
        ("guidance_range", manifest.get("guidance_range")),
        ("negative_prompt", manifest.get("negative_prompt")),
        ("seed", manifest.get("seed")),
        ("count", manifest["count"]),
        ("prompts", manifest["prompts"]["sha256"]),
        ("dtype", manifest["dtype"]),
        ("shard_size", manifest["shard_size"]),
    ]


def check_same_settings(out: Path, stored: dict, current: dict, prompts: list[str]) -> None:
    """Refuse, naming every field that differs, when a rerun into ``out`` would mix trajectories of other settings."""
    differences = []
    for (field, old), (_, new) in zip(_identity(stored), _identity(current)):
        if old == new:
            continue
        if field == "prompts":
            differences.append(f"prompts differ from the store's {out / PROMPTS} ({_first_difference(out, prompts)})")
        elif field == "count":
            differences.append(f"count is {old} in the store but this prompts file has {plural(new, 'prompt')}")
        else:
            shown = (lambda v: f"{v[:12]}...") if field == "teacher.unet_hash" else repr
            differences.append(f"{field} is {shown(old)} in the store but {shown(new)} in this run")
    mismatch = schedule_mismatch(stored["scheduler"], current["scheduler"])
    if mismatch:
        differences.append(f"{mismatch} (store vs this run)")
    if differences:
        raise StoreError(f"{out / MANIFEST}: " + "; ".join(differences) + "; rerun with the store's settings to resume "
                         "it, write to another --out, or pass --overwrite to replace it")


def _first_difference(out: Path, prompts: list[str]) -> str:
    try:
        old = (out / PROMPTS).read_text(encoding="utf-8").split("\n")[:-1]
    except (OSError, UnicodeDecodeError):
        return "the store's copy cannot be read"
    for i, (a, b) in enumerate(zip(old, prompts)):
        if a != b:
            return f"first at line {i + 1}: {a!r} in the store, {b!r} now"
    return f"{plural(len(old), 'prompt')} in the store, {len(prompts)} now"



def done_record(out: Path, k: int) -> Path:
    return out / DONE / f"{Path(shard_name(k)).stem}.json"


def shard_complete(out: Path, k: int, start: int, count: int) -> dict | None:
    """The done-record of shard k if it and the shard file agree (name, span, size); None means compute it."""
    try:
        record = json.loads(done_record(out, k).read_text())
        size = (out / shard_name(k)).stat().st_size
    except (OSError, ValueError):
        return None
    if record.get("file") == shard_name(k) and record.get("start") == start and record.get("count") == count and record.get("bytes") == size:
        return record
    return None


def write_shard(out: Path, k: int, tensors: dict[str, torch.Tensor], metadata: dict) -> dict:
    """Write shard k atomically, then its done-record; return the record {file, start, count, sha256, bytes}."""
    from safetensors.torch import save

    # One metadata key: safetensors writes several in a random order, which would break byte-identical reruns.
    data = save(tensors, metadata={"rapm": json.dumps(metadata, sort_keys=True, ensure_ascii=False)})
    for stale in out.glob(f".{shard_name(k)}.*.tmp"):
        stale.unlink(missing_ok=True)
    atomic_write(out / shard_name(k), data)
    record = {"file": shard_name(k), "start": metadata["start"], "count": metadata["count"],
              "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    atomic_write(done_record(out, k), json_bytes(record))
    return record


STORE_FILES = (MANIFEST, PROMPTS, NEGATIVE, "shard-*.safetensors")  # what rapm writes at the top of a store


def temp_files(out: Path) -> list[Path]:
    """atomic_write's temp files of a store's own files (named after them): a killed writer's leftovers."""
    found = [p for name in STORE_FILES + (STORE_MARKER,) for p in out.glob(f".{name}.*.tmp")]
    return found + list((out / DONE).glob(".shard-*.json.*.tmp"))


def clear_store(out: Path) -> None:
    """Remove what rapm wrote into ``out`` (and nothing else: regular files under its names); the marker stays. A
    done/ that holds something else, or is a link, stays, with a warning naming it."""
    for f in temp_files(out) + [f for pattern in STORE_FILES for f in out.glob(pattern)]:
        if f.is_file() and not f.is_symlink():
            f.unlink(missing_ok=True)
    if (out / DONE).exists() or (out / DONE).is_symlink():
        remove_files(out / DONE, ("shard-*.json", ".shard-*.json.*.tmp"))


def is_store(out: Path) -> bool:
    """Whether rapm made the folder ``out``: its store marker, or (before markers) a manifest with rapm's fields."""
    if read_marker(out, "store") is not None:
        return True
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(manifest, dict) and set(REQUIRED_FIELDS) <= set(manifest)
            and isinstance(manifest.get("teacher"), dict) and "unet_hash" in manifest["teacher"])


def one_writer(write):
    """Run a store writer (``rapm.trajectories.write_trajectories``) holding the store's lock (the main process): a second writer refuses at once.

    A folder that the call created is removed again if it fails before any shard is complete, so a refused or failed
    first run leaves no half-made store.
    """
    @functools.wraps(write)
    def locked(teacher, prompts, out, *args, **kwargs):
        out = Path(out)
        main = int(os.environ.get("RANK", "0")) == 0
        kind = other_kind(out, "store") if out.is_dir() else None
        if kind:
            raise StoreError(f"--out {out} is a rapm {kind}, not a trajectory store; give a new or empty folder for --out")
        if not main or (out.exists() and not out.is_dir()) or not (is_empty(out) or is_store(out)):
            return write(teacher, prompts, out, *args, **kwargs)  # refused inside, before anything is written
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"--out {out}: cannot be created ({e.strerror or e}); give a writable folder") from None
        try:
            with FolderLock(out, "rapm trajectories"):
                return write(teacher, prompts, out, *args, **kwargs)
        except FolderError as e:
            raise StoreError(str(e)) from None
        except OSError as e:  # a read-only folder, a full disk before the first shard
            raise StoreError(f"--out {out}: cannot be written ({e.strerror or e}); give a writable folder") from None
        finally:
            if created and not any((out / DONE).glob("shard-*.json")):
                clear_store(out)
                (out / STORE_MARKER).unlink(missing_ok=True)
                try:
                    out.rmdir()
                except OSError:
                    pass

    return locked





def wait_for_shards(out: Path, count: int, shard_size: int, world: int, show: bool) -> list[dict]:
    """Every shard's done-record, waiting for the other processes' shards to appear."""
    said = False
    while True:
        records = [shard_complete(out, k, *span_count(k, shard_size, count)) for k in range(num_shards(count, shard_size))]
        missing = [k for k, r in enumerate(records) if r is None]
        if not missing:
            return records
        if world == 1:  # nothing else will write them
            raise StoreError(f"{out / shard_name(missing[0])}: missing or incomplete after this run; rerun the same command")
        if show and not said:
            print(f"{out}: waiting for {plural(len(missing), 'shard')} from the other processes", file=sys.stderr)
            said = True
        time.sleep(POLL_SECONDS)


def is_complete(out: Path) -> bool:
    """Whether the manifest says the store is complete (the main process writes it last)."""
    try:
        return bool(json.loads((out / MANIFEST).read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def span_count(k: int, shard_size: int, count: int) -> tuple[int, int]:
    """(first trajectory, how many) of shard k."""
    start, end = shard_span(k, shard_size, count)
    return start, end - start


def check_folder(out: Path, overwrite: bool, manifest: dict, prompts: list[str]) -> None:
    """Refuse ``out`` unless it is new, empty or this store (of the same settings unless ``overwrite``), with no link
    where a store file goes: read only, so a refusal leaves the folder untouched."""
    existing = out / MANIFEST
    refuse_links_at(out, (DONE,) + STORE_FILES + (f"{DONE}/shard-*.json",), "store")  # a FolderError, before any write
    if out.is_dir() and not is_empty(out) and not is_store(out):  # with or without --overwrite: not rapm's to touch
        raise StoreError(f"--out {out} is not empty and is not a rapm trajectory store (no {STORE_MARKER}"
                         f"{', and its manifest.json is not rapm' + chr(39) + 's' if existing.exists() else ''}); rapm "
                         "writes only into a new or empty folder or its own store, and deletes nothing here: give another --out")
    if not overwrite and existing.exists():
        check_same_settings(out, read_manifest(out), manifest, prompts)


def open_for_writing(out: Path, overwrite: bool, manifest: dict, prompts_text: str, negative_bytes: bytes) -> None:
    """The main process's writes before the shards: the marker, the (incomplete) manifest, the prompts, the negative."""
    count, shard_size = manifest["count"], manifest["shard_size"]
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "store")  # a store made before markers is adopted
    (out / DONE).mkdir(exist_ok=True)
    if overwrite:
        clear_store(out)
        (out / DONE).mkdir(exist_ok=True)
    all_done = all(shard_complete(out, k, *span_count(k, shard_size, count)) is not None
                   for k in range(num_shards(count, shard_size)))
    existing = out / MANIFEST
    if not existing.exists() or not all_done:  # readers see an incomplete store until the manifest is rewritten
        atomic_write(existing, manifest_bytes(manifest))
    atomic_write(out / PROMPTS, prompts_text.encode("utf-8"))
    atomic_write(out / NEGATIVE, negative_bytes)


def finish(out: Path, manifest: dict, shards: list[dict]) -> None:
    """The last write: killed writers' temp files removed, then the complete manifest listing every shard."""
    for stale in temp_files(out):
        stale.unlink(missing_ok=True)
    atomic_write(out / MANIFEST, manifest_bytes({**manifest, "complete": True, "shards": shards}))


def new_manifest(teacher: dict, scheduler: dict, settings: dict, latent_shape, mu: float | None, prompts_text: str,
                 negative_bytes: bytes, truncated: list[int], conditioning: dict) -> dict:
    """The store's manifest.json, incomplete (no shards yet): every setting that fixes what the store holds.
    ``teacher``: its path, family, unet_hash and dtype; ``conditioning``: each stored field's shape per trajectory."""
    s = settings
    low, high = s["guidance_range"]
    return {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "teacher": teacher,
        "scheduler": scheduler,
        "steps": s["steps"],
        "substeps": s["substeps"],
        "solver": s["solver"],
        "delta": s["delta"],
        "guidance": s["guidance"],
        **({"guidance_range": [low, high]} if low < high else {}),
        "negative_prompt": s["negative_prompt"],
        "seed": s["seed"],
        "timesteps": s["timesteps"],
        **({"mu": mu} if mu is not None else {}),
        "latent_shape": list(latent_shape),
        "dtype": s["dtype"],
        "count": s["count"],
        "shard_size": s["shard_size"],
        "prompts": {"file": PROMPTS, "sha256": sha256_text(prompts_text)},
        "negative": {"file": NEGATIVE, "sha256": hashlib.sha256(negative_bytes).hexdigest()},
        "truncated_prompts": truncated,
        "conditioning": conditioning | ({"guidance": []} if low < high else {}),
        "shards": [],
    }
