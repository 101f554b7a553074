"""The trajectory store: its on-disk format, checksums and the reader the trainer uses.

A store is a directory::

    manifest.json            format version, teacher identity, scheduler config, N, M, solver, Δ, guidance,
                             timesteps, latent shape, dtype, count, shard size, each shard's sha256
    prompts.txt              the prompts, one a line; trajectory i is line i
    negative.safetensors     the one unconditional conditioning (batch 1), stored once
    shard-00000.safetensors  latents [B, N+1, C, H, W], delta_latents [B, N, C, H, W] (format 2),
                             prompt_embeds [B, L, D],
                             (SDXL) pooled_embeds [B, D2], time_ids [B, 6]; seeds [B];
                             metadata "rapm": JSON {start, count, prompts, ...}
    done/shard-00000.json    the shard's record {file, start, count, sha256, bytes}, written after it

Shard k holds trajectories [k*S, (k+1)*S) for shard size S, whatever the number of
processes that wrote it. Files are written atomically (temp file in the same
folder, fsync, rename), so a file that exists is complete.

Format 2 adds each slot's Δ-step position z^Δ_{n+1} (``delta_latents[:, j]`` is the
teacher's DDIM step from ``latents[:, j]`` to t_{n+1} - Δ, Alg. 2 line 8) and the
manifest fields ``delta`` (that Δ) and ``solver``. Format 1 stores (without them)
still load: their batches have ``delta_latents`` None and the trainer computes the step.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from dataclasses import field as default
from pathlib import Path
from typing import Sequence

import torch

from rapm.conditioning import FLOAT32_FIELDS
from rapm.conditioning import Conditioning
from rapm.diffusion import ScheduleError, schedule_from_config
from rapm.errors import RapmError
from rapm.families import read_teacher_info
from rapm.files import atomic_write as _atomic_write
from rapm.files import read_json_object, sha256_file, sha256_text
from rapm.text import plural

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no Δ-step positions (delta_latents), no 'delta' and 'solver' in the manifest
MANIFEST = "manifest.json"
PROMPTS = "prompts.txt"
NEGATIVE = "negative.safetensors"
DONE = "done"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
REQUIRED_FIELDS = ("format_version", "complete", "teacher", "scheduler", "steps", "substeps", "guidance", "timesteps",
                   "latent_shape", "dtype", "count", "shard_size", "shards", "prompts")


class StoreError(RapmError):
    """A trajectory store that cannot be used as asked: names the file, the field and the fix."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def shard_span(k: int, shard_size: int, count: int) -> tuple[int, int]:
    """Trajectory indices [start, end) of shard k: fixed by the shard size, not by the process layout."""
    return k * shard_size, min((k + 1) * shard_size, count)


def num_shards(count: int, shard_size: int) -> int:
    return (count + shard_size - 1) // shard_size


_UNET_HASHES: dict[tuple, str] = {}


def unet_hash(teacher_path: str | Path) -> str:
    """sha256 over the UNet folder's config and weight files (names and contents): the teacher's identity."""
    folder = Path(teacher_path) / "unet"
    if not folder.is_dir() and (Path(teacher_path) / "transformer").is_dir():  # a flow-matching family's denoiser
        folder = Path(teacher_path) / "transformer"
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts))
    if not files:
        raise StoreError(f"{folder}: no UNet config or weights to identify the teacher by")
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _UNET_HASHES:
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(folder).as_posix().encode() + b"\0")
            h.update(bytes.fromhex(sha256_file(p)))
        _UNET_HASHES[key] = h.hexdigest()
    return _UNET_HASHES[key]


def atomic_write(path: Path, data: bytes) -> None:
    """rapm.files.atomic_write through this module's ``open`` (the store's files: shards, manifest, prompts)."""
    _atomic_write(path, data, open)


def json_bytes(obj) -> bytes:
    """Deterministic JSON (sorted keys), with short lists and records on one line so a manifest reads at a glance."""
    return (_json_text(obj, 0) + "\n").encode("utf-8")


def _json_text(obj, indent: int) -> str:
    inline = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))
    if indent > 0 and len(inline) + indent <= 160 or not isinstance(obj, (dict, list)) or not obj:
        return inline
    pad = " " * (indent + 1)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {_json_text(v, indent + 1)}" for k, v in sorted(obj.items())]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return "[\n" + ",\n".join(pad + _json_text(v, indent + 1) for v in obj) + "\n" + " " * indent + "]"


def schedule_mismatch(stored: dict, current: dict) -> str | None:
    """The first field by which two scheduler configs give different noise schedules, as 'field: a vs b'; None if equal."""
    try:
        a, b = schedule_from_config(stored), schedule_from_config(current)
    except ScheduleError as e:
        return f"scheduler ({e})"
    if a.prediction_type != b.prediction_type:
        return f"scheduler prediction_type {a.prediction_type!r} vs {b.prediction_type!r}"
    if a.is_flow:
        if a.flow != b.flow:
            diff = [f for f in type(a.flow).__dataclass_fields__ if getattr(a.flow, f) != getattr(b.flow, f)]
            return "scheduler " + ", ".join(f"{f} {getattr(a.flow, f)!r} vs {getattr(b.flow, f)!r}" for f in diff)
        return None
    if a.num_train_timesteps != b.num_train_timesteps:
        return f"scheduler num_train_timesteps {a.num_train_timesteps} vs {b.num_train_timesteps}"
    if not torch.equal(a.alphas_cumprod, b.alphas_cumprod):
        fields = ("beta_schedule", "beta_start", "beta_end", "trained_betas")
        return "scheduler noise schedule (" + ", ".join(f"{f} {stored.get(f)!r} vs {current.get(f)!r}" for f in fields) + ")"
    if a.final_alpha_cumprod != b.final_alpha_cumprod:
        return f"scheduler set_alpha_to_one {stored.get('set_alpha_to_one')!r} vs {current.get('set_alpha_to_one')!r}"
    return None


@dataclass
class TrajectoryBatch:
    """Stored teacher trajectories z~_N..z~_0 and what they were conditioned on, for a batch of indices; what a
    method sees of them (a method's own batch, in tests, may leave out what the store knows of its source)."""

    latents: torch.Tensor  # float32 [B, N+1, C, H, W]; latents[:, 0] is the initial noise z_N
    cond: Conditioning  # float32, batched
    uncond: Conditioning | None  # float32, the one negative conditioning repeated B times
    delta_latents: torch.Tensor | None = None  # float32 [B, N, C, H, W]: z^Δ_{n+1} of each slot (format 2), else None
    delta: int | None = None  # the Δ of delta_latents, in teacher timesteps
    prompts: list[str] = default(default_factory=list)
    seeds: list[int] = default(default_factory=list)
    indices: list[int] = default(default_factory=list)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def to(self, *args, **kwargs) -> "TrajectoryBatch":
        """On another device or dtype (uncond and the Δ-steps where there are any)."""
        move = lambda v: None if v is None else v.to(*args, **kwargs)  # noqa: E731
        return replace(self, latents=move(self.latents), cond=move(self.cond), uncond=move(self.uncond),
                       delta_latents=move(self.delta_latents))


class TrajectoryStore:
    """A complete trajectory store, opened read-only. Random access by trajectory index."""

    def __init__(self, path: Path, manifest: dict, cache_shards: int = 4):
        self.path = Path(path)
        self.manifest = manifest
        self.cache_shards = max(1, cache_shards)
        self._handles: OrderedDict[int, tuple] = OrderedDict()
        self._negative: dict[str, torch.Tensor] | None = None
        self._prompts: list[str] | None = None

    # What the trainer needs to know about the store.
    @property
    def steps(self) -> int:
        return int(self.manifest["steps"])

    @property
    def substeps(self) -> int:
        return int(self.manifest["substeps"])

    @property
    def timesteps(self) -> list:
        """Integer timesteps (DDPM teachers), or float σ · 1000 (flow-matching teachers, ending at 0)."""
        ts = self.manifest["timesteps"]
        return [float(t) for t in ts] if any(isinstance(t, float) for t in ts) else [int(t) for t in ts]

    @property
    def guidance(self) -> float:
        """The teacher's guidance: its one scale, or, in a store built with a range, the range's middle (each
        trajectory's own value is in its conditioning, ``TrajectoryBatch.cond.guidance``)."""
        return float(self.manifest["guidance"])

    @property
    def guidance_range(self) -> tuple[float, float] | None:
        """(lo, hi) that each trajectory's guidance was drawn from (``rapm trajectories --guidance LO:HI``); None for
        one fixed guidance."""
        span = self.manifest.get("guidance_range")
        return (float(span[0]), float(span[1])) if span else None

    @property
    def delta(self) -> int | None:
        """Δ of the stored Δ-step positions; None for a format 1 store, which has none."""
        return int(self.manifest["delta"]) if self.manifest["format_version"] >= 2 else None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.manifest["latent_shape"])

    @property
    def family(self) -> str:
        return self.manifest["teacher"]["family"]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    @property
    def prompts(self) -> list[str]:
        if self._prompts is None:
            self._prompts = read_store_prompts(self.path, self.manifest)
        return self._prompts

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TrajectoryStore({str(self.path)!r}, {plural(len(self), 'trajectory', 'trajectories')}, {m['teacher']['family']}, N={self.steps}, "
                f"M={self.substeps}, guidance={self.guidance}, latents {self.latent_shape} {m['dtype']})")

    def __getstate__(self) -> dict:  # open shard handles stay with their process (DataLoader workers reopen)
        return {**self.__dict__, "_handles": OrderedDict()}

    def __getitem__(self, index: int) -> TrajectoryBatch:
        return self.get([index])

    def check_teacher(self, teacher, steps: int | None = None) -> None:
        """Raise StoreError naming the field if ``teacher`` (a loaded Teacher or its path) or ``steps`` is not what the store was computed with."""
        where = self.path / MANIFEST
        if hasattr(teacher, "unet"):
            family, path, shape, scheduler = teacher.family, Path(teacher.path), tuple(teacher.latent_shape), teacher.scheduler_config
        else:
            family, path, shape, scheduler = _teacher_identity_from_folder(teacher)
        fix = (f"train with the teacher the store was computed with ({self.manifest['teacher'].get('path')}), "
               f"or rebuild the store for this teacher: rapm trajectories --teacher {path} --out NEW_STORE")
        if family != self.family:
            raise StoreError(f"{where}: teacher family {self.family!r} does not match teacher {path} ({family!r}); {fix}")
        if shape != self.latent_shape:
            raise StoreError(f"{where}: latent shape {self.latent_shape} does not match teacher {path} {shape}; {fix}")
        mismatch = schedule_mismatch(self.manifest["scheduler"], scheduler)
        if mismatch:
            raise StoreError(f"{where}: {mismatch} (store vs teacher {path}); {fix}")
        stored_hash, current = self.manifest["teacher"]["unet_hash"], unet_hash(path)
        if stored_hash != current:
            raise StoreError(f"{where}: teacher unet_hash {stored_hash[:12]}... does not match teacher {path} "
                             f"({current[:12]}...): the store was computed with another UNet; {fix}")
        width = getattr(getattr(getattr(teacher, "unet", None), "config", None), "cross_attention_dim", None)
        stored = (self.manifest.get("conditioning") or {}).get("prompt_embeds")
        if isinstance(width, int) and stored and stored[-1] != width:
            raise StoreError(f"{where}: field 'conditioning' gives prompt embeddings of width {stored[-1]}, teacher {path} "
                             f"takes {width} (cross_attention_dim); {fix}")
        if steps is not None:
            if int(steps) != self.steps:
                raise StoreError(f"{where}: steps N={self.steps} in the store, but {steps} asked for; train with "
                                 f"--steps {self.steps} or rebuild the store with rapm trajectories --steps {steps}")
            expected = self._schedule_for(scheduler).coarse(int(steps))
            if expected != self.timesteps:
                raise StoreError(f"{where}: timesteps {self.timesteps} in the store, but {expected} for N={steps}; "
                                 f"rebuild the store with this version of rapm")

    def _schedule_for(self, scheduler: dict):
        """The teacher's schedule as the store's trajectories used it (a flow schedule with the stored μ)."""
        from dataclasses import replace

        schedule = schedule_from_config(scheduler)
        mu = self.manifest.get("mu")
        return replace(schedule, mu=float(mu)) if schedule.is_flow and mu is not None else schedule

    def get(self, indices: Sequence[int] | int | torch.Tensor) -> TrajectoryBatch:
        """The trajectories at ``indices`` (in that order), latents and conditioning as float32 on the CPU."""
        if isinstance(indices, torch.Tensor):
            indices = indices.reshape(-1).tolist()
        elif isinstance(indices, int):
            indices = [indices]
        indices = [int(i) for i in indices]
        if not indices:
            raise IndexError("store.get needs at least one index")
        n = len(self)
        rows: list[dict[str, torch.Tensor]] = []
        prompts, seeds = [], []
        for i in indices:
            if not -n <= i < n:
                raise IndexError(f"trajectory index {i} out of range for a store of {n}")
            i %= n
            k = i // int(self.manifest["shard_size"])
            handle, meta = self._shard(k)
            j = i - meta["start"]
            try:
                row = {name: handle.get_slice(name)[j : j + 1] for name in handle.keys()}
            except Exception as e:  # noqa: BLE001 - any read failure means a damaged file
                raise self._damaged(k, e) from None
            rows.append(row)
            prompts.append(meta["prompts"][j])
            seeds.append(int(row["seeds"][0]))
        cat = {name: torch.cat([r[name] for r in rows]) for name in rows[0]}
        for name, v in cat.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                row = next(i for i, r in zip(indices, rows) if not torch.isfinite(r[name]).all()) % n
                raise StoreError(f"{self.path / self.manifest['shards'][row // int(self.manifest['shard_size'])]['file']}: "
                                 f"tensor {name!r} of trajectory {row} holds NaN or infinite values (the shard, not the "
                                 "training, is at fault); delete the shard and rerun the same rapm trajectories command")
        cond = Conditioning(cat["prompt_embeds"].float(), _float(cat.get("pooled_embeds")), _float(cat.get("time_ids")),
                            _float(cat.get("guidance")))
        negative = self._negative_tensors()
        b = len(indices)
        uncond = Conditioning(*(None if negative.get(f) is None else negative[f].float().expand(b, *negative[f].shape[1:]).contiguous()
                                for f in ("prompt_embeds", "pooled_embeds", "time_ids", "guidance")))
        return TrajectoryBatch(cat["latents"].float(), cond, uncond, _float(cat.get("delta_latents")), self.delta,
                               prompts, seeds, indices)

    def verify(self) -> None:
        """Re-hash every shard against the manifest; one StoreError lists every bad shard."""
        bad = []
        negative = self.manifest.get("negative")
        if negative and sha256_file(self.path / NEGATIVE) != negative["sha256"]:
            bad.append(f"{self.path / NEGATIVE}: sha256 does not match the manifest")
        for entry in self.manifest["shards"]:
            f = self.path / entry["file"]
            digest = sha256_file(f)
            if digest != entry["sha256"]:
                bad.append(f"{f}: sha256 {digest[:12]}... but the manifest records {entry['sha256'][:12]}...")
        if bad:
            raise StoreError("; ".join(bad) + f" ({len(bad)} of {plural(len(self.manifest['shards']), 'shard')} corrupted); "
                             "delete those files and rerun the same rapm trajectories command to rewrite them")

    def _shard(self, k: int):
        if k in self._handles:
            self._handles.move_to_end(k)
            return self._handles[k]
        from safetensors import safe_open

        entry = self.manifest["shards"][k]
        f = self.path / entry["file"]
        try:
            handle = safe_open(str(f), framework="pt")
            meta = json.loads(handle.metadata()["rapm"])
            shape = handle.get_slice("latents").get_shape()
            delta_shape = handle.get_slice("delta_latents").get_shape() if "delta_latents" in handle.keys() else None
        except Exception as e:  # noqa: BLE001 - a header that does not parse means a damaged file
            raise self._damaged(k, e) from None
        expected = [entry["count"], self.steps + 1, *self.latent_shape]
        expected_delta = [entry["count"], self.steps, *self.latent_shape] if self.delta is not None else None
        replaced = "the file was replaced: delete it and rerun the same rapm trajectories command to recompute it"
        if meta.get("start") != entry["start"] or list(shape) != expected:
            raise StoreError(f"{f}: holds trajectories from {meta.get('start')} with latents {list(shape)}, but the manifest "
                             f"records {entry['start']} with {expected}; {replaced}")
        if (None if delta_shape is None else list(delta_shape)) != expected_delta:
            raise StoreError(f"{f}: delta_latents {delta_shape if delta_shape is None else list(delta_shape)}, but "
                             f"format_version {self.manifest['format_version']} in {MANIFEST} records "
                             f"{expected_delta}; {replaced}")
        self._check_tensors(f, handle, entry["count"])
        self._handles[k] = (handle, meta)
        while len(self._handles) > self.cache_shards:
            self._handles.popitem(last=False)
        return self._handles[k]

    def _check_tensors(self, f: Path, handle, batch: int) -> None:
        """Refuse a file whose tensors (names, dtypes, shapes) are not the ones the manifest describes."""
        spec = shard_tensors(self.manifest)
        names = set(handle.keys())
        fix = "the file is not this store's: delete it and rerun the same rapm trajectories command to recompute it"
        # a manifest without 'conditioning' (older stores) does not say which embeddings there are: check those it names
        extra = sorted(names - set(spec)) if "conditioning" in self.manifest else []
        missing = sorted(set(spec) - names)
        if extra or missing:
            raise StoreError(f"{f}: tensor {(missing or extra)[0]!r} is {'missing' if missing else 'not in the manifest'} "
                             f"(the manifest lists {', '.join(sorted(spec))}); {fix}")
        for name, (dtype, shape) in spec.items():
            got = handle.get_slice(name)
            got_dtype, got_shape = got.get_dtype(), list(got.get_shape())
            want_dtype = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}[dtype]
            want_shape = [batch, *(shape if shape is not None else got_shape[1:])]  # older stores: the batch only
            if got_dtype != want_dtype or got_shape != want_shape:
                raise StoreError(f"{f}: tensor {name!r} is {got_dtype} {got_shape}, the manifest gives {want_dtype} "
                                 f"{want_shape}; {fix}")

    def _damaged(self, k: int, error: Exception) -> StoreError:
        entry = self.manifest["shards"][k]
        f = self.path / entry["file"]
        digest = sha256_file(f)
        state = ("its sha256 does not match the manifest" if digest != entry["sha256"]
                 else "its sha256 matches the manifest, so the store was written by an incompatible safetensors")
        return StoreError(f"{f}: cannot be read ({type(error).__name__}: {error}); {state}; delete it and rerun "
                          "the same rapm trajectories command to recompute it")

    def _negative_tensors(self) -> dict[str, torch.Tensor]:
        if self._negative is None:
            from safetensors.torch import load_file

            f = self.path / NEGATIVE
            try:
                negative = load_file(str(f))
            except Exception as e:  # noqa: BLE001
                raise StoreError(f"{f}: cannot be read ({type(e).__name__}: {e}); rerun the same rapm trajectories "
                                 "command to rewrite it") from None
            conditioning = self.manifest.get("conditioning") or {"prompt_embeds": None}
            spec = {k: v for k, v in shard_tensors(self.manifest).items() if k in conditioning}
            if self.manifest.get("guidance_range") and "guidance" not in negative:
                spec.pop("guidance", None)  # a CFG teacher's per-trajectory guidance: the negative carries none
            for name, (_, shape) in spec.items():
                if name not in negative or (shape is not None and list(negative[name].shape) != [1, *shape]):
                    got = list(negative[name].shape) if name in negative else "missing"
                    raise StoreError(f"{f}: tensor {name!r} is {got}, the manifest gives {[1, *(shape or [])]}; delete it "
                                     "and rerun the same rapm trajectories command to rewrite it")
            self._negative = negative
        return self._negative


def _float(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float()


def _teacher_identity_from_folder(teacher) -> tuple[str, Path, tuple, dict]:
    """family, path, latent shape and scheduler config of a teacher folder, without loading its weights."""
    info = read_teacher_info(teacher)
    return info.family.name, info.path, tuple(info.latent_shape), info.scheduler_config


MANIFEST_SHA256 = "manifest_sha256"  # the manifest's own checksum: sha256 of its JSON without this field


def manifest_sha256(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != MANIFEST_SHA256}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def manifest_bytes(manifest: dict) -> bytes:
    """The manifest file, carrying its own checksum (read_manifest refuses a manifest edited after it was written)."""
    return json_bytes({**manifest, MANIFEST_SHA256: manifest_sha256(manifest)})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(v, length: int | None = None) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v) and (length is None or len(v) == length)


# field: (check, what it must be); a manifest whose field fails its check is refused naming the field
_FIELD_TYPES = {
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "teacher": (lambda v: isinstance(v, dict) and isinstance(v.get("family"), str) and isinstance(v.get("unet_hash"), str),
                "an object with 'family' and 'unet_hash' strings"),
    "scheduler": (lambda v: isinstance(v, dict), "the teacher's scheduler config (an object)"),
    "steps": (lambda v: _is_int(v) and v >= 1, "an integer, at least 1"),
    "substeps": (lambda v: _is_int(v) and v >= 1, "an integer, at least 1"),
    "guidance": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number"),
    "guidance_range": (lambda v: isinstance(v, list) and len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v) and v[0] <= v[1],
        "a list [lo, hi] of two numbers, lo <= hi"),
    "timesteps": (lambda v: isinstance(v, list) and len(v) >= 2 and (_ints(v) or all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)),
        "a list of timesteps (integers; σ · 1000 numbers for a flow-matching teacher)"),
    "latent_shape": (lambda v: _ints(v, 3) and all(x >= 1 for x in v), "a list of 3 positive integers [C, H, W]"),
    "dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "count": (lambda v: _is_int(v) and v >= 1, "an integer, at least 1"),
    "shard_size": (lambda v: _is_int(v) and v >= 1, "an integer, at least 1"),
    "shards": (lambda v: isinstance(v, list) and all(
        isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("sha256"), str)
        and all(_is_int(e.get(k)) for k in ("start", "count", "bytes")) for e in v),
        "a list of {file, start, count, sha256, bytes} records"),
    "delta": (lambda v: _is_int(v) and v >= 1, "an integer number of teacher timesteps, at least 1"),
    "solver": (lambda v: isinstance(v, str), "a solver name"),
    "prompts": (lambda v: isinstance(v, dict) and isinstance(v.get("sha256"), str), "an object with a 'sha256' string"),
    "negative": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("sha256"), str)),
                 "an object with a 'sha256' string"),
    "conditioning": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _ints(s) for k, s in v.items()),
                     "an object of tensor name -> shape without the batch"),
}


def _check_fields(f: Path, manifest: dict) -> None:
    for field, (ok, must) in _FIELD_TYPES.items():
        if field in manifest and not ok(manifest[field]):
            raise StoreError(f"{f}: field {field!r} is {json.dumps(manifest[field])[:60]}, it must be {must}; the manifest "
                             "was edited or damaged: rebuild the store with rapm trajectories --overwrite")
    if len(manifest["timesteps"]) != manifest["steps"] + 1:
        raise StoreError(f"{f}: field 'timesteps' has {len(manifest['timesteps'])} entries, steps N={manifest['steps']} "
                         f"needs N+1; rebuild the store with rapm trajectories --overwrite")


def shard_tensors(manifest: dict) -> dict[str, tuple[torch.dtype, list[int]]]:
    """What each shard holds: tensor name -> (dtype, shape without the batch), from the manifest."""
    store_dtype = DTYPES[manifest["dtype"]]
    spec = {"latents": (store_dtype, [manifest["steps"] + 1, *manifest["latent_shape"]]), "seeds": (torch.int64, [])}
    if manifest["format_version"] >= 2:  # each slot's Δ-step position
        spec["delta_latents"] = (store_dtype, [manifest["steps"], *manifest["latent_shape"]])
    for name, shape in (manifest.get("conditioning") or {"prompt_embeds": None}).items():
        spec[name] = (torch.float32 if name in FLOAT32_FIELDS else store_dtype, shape)
    return spec


def read_manifest(path: Path) -> dict:
    """The manifest of the store at ``path``, checked for the fields this version reads (complete or not)."""
    path = Path(path)
    create = f"create it with: rapm trajectories --teacher TEACHER --prompts PROMPTS --out {path}"
    if not path.exists():
        raise StoreError(f"store {path} does not exist; {create}")
    if not path.is_dir():
        raise StoreError(f"store {path} is a file; a trajectory store is a folder with manifest.json; {create}")
    f = path / MANIFEST
    if not f.exists():
        raise StoreError(f"{f} is missing: {path} is not a trajectory store; {create}")
    manifest = read_json_object(f, StoreError, "a readable JSON manifest", "a manifest object",
                                "rebuild the store with rapm trajectories --overwrite")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StoreError(f"{f}: format_version {version!r} is not one this rapm reads ({', '.join(map(str, READABLE_VERSIONS))}); "
                         "rebuild the store with this version of rapm (rapm trajectories --overwrite)")
    missing = [k for k in REQUIRED_FIELDS + (("delta", "solver") if version >= 2 else ()) if k not in manifest]
    if missing:
        raise StoreError(f"{f}: field {missing[0]!r} is missing; rebuild the store with rapm trajectories --overwrite")
    recorded = manifest.get(MANIFEST_SHA256)  # absent in a store written before checksums: still read
    if recorded is not None and recorded != manifest_sha256(manifest):
        raise StoreError(f"{f}: field {MANIFEST_SHA256!r} does not match the manifest (it was edited after it was written); "
                         "restore it, or rebuild the store with rapm trajectories --overwrite")
    _check_fields(f, manifest)
    return manifest


def read_store_prompts(path: Path, manifest: dict) -> list[str]:
    f = Path(path) / PROMPTS
    fix = "rerun the same rapm trajectories command to rewrite it"
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"{f}: cannot be read ({e}); {fix}") from None
    if sha256_text(text) != manifest["prompts"]["sha256"]:
        raise StoreError(f"{f}: sha256 does not match manifest.json prompts.sha256 (the file was edited); {fix}")
    return text.split("\n")[:-1]


def open_store(path: str | Path, verify: bool = False, cache_shards: int = 4) -> TrajectoryStore:
    """Open a complete trajectory store.

    Always checks that the manifest is present and valid and that every shard is
    present with its recorded size; ``verify=True`` also re-hashes every shard.
    """
    path = Path(path)
    manifest = read_manifest(path)
    f = path / MANIFEST
    shards = manifest["shards"]
    expected = num_shards(int(manifest["count"]), int(manifest["shard_size"]))
    if not manifest["complete"]:
        raise StoreError(f"{f}: the store is incomplete (its writing run was interrupted); rerun the same "
                         f"rapm trajectories command to finish it")
    if len(shards) != expected:
        raise StoreError(f"{f}: {plural(len(shards), 'shard')} recorded, {expected} expected for count {manifest['count']} and "
                         f"shard_size {manifest['shard_size']}; rebuild the store with rapm trajectories --overwrite")
    for k, entry in enumerate(shards):
        start, end = shard_span(k, int(manifest["shard_size"]), int(manifest["count"]))
        if entry.get("file") != shard_name(k) or entry.get("start") != start or entry.get("count") != end - start:
            raise StoreError(f"{f}: shards[{k}] is {entry}, expected {shard_name(k)} from {start} with count "
                             f"{end - start}; rebuild the store with rapm trajectories --overwrite")
        shard = path / entry["file"]
        if not shard.exists():
            raise StoreError(f"{shard} is missing; rerun the same rapm trajectories command to recompute it")
        size = shard.stat().st_size
        if size != entry["bytes"]:
            raise StoreError(f"{shard}: {size} bytes but the manifest records {entry['bytes']} (truncated or replaced); "
                             "delete it and rerun the same rapm trajectories command to recompute it")
    for name in (PROMPTS, NEGATIVE):
        if not (path / name).exists():
            raise StoreError(f"{path / name} is missing; rerun the same rapm trajectories command to rewrite it")
    store = TrajectoryStore(path, manifest, cache_shards=cache_shards)
    if len(store.prompts) != len(store):
        raise StoreError(f"{path / PROMPTS}: {plural(len(store.prompts), 'prompt')} but the manifest count is {len(store)}; "
                         "rerun the same rapm trajectories command to rewrite it")
    if verify:
        store.verify()
    return store
