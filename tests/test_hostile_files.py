"""Issue 34, point 2: hostile files, bounded. A .safetensors file (a LoRA, a checkpoint, a shard, the teacher's
weights) whose 8-byte header length claims 10^15 bytes, whose offsets run past the file's end, whose header JSON is
nested 100,000 deep, whose dtype and shape disagree with its bytes, or that claims a 2 GB tensor in a 1 KB file:
every verb that reads one gives one `error:` line naming it, no traceback, and its peak memory stays within a few MB
of reading a good file (measured as the peak RSS of one process that reads them all). Where a file carries a
checksum (a checkpoint's state.sha256, a shard's manifest entry), the checksum is updated, as an attacker would.

Bad configs and prompts files are tests/test_config_inputs.py's.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_run import one_error as _one_error, run_main as _main

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("faults_benchmark", ROOT / "benchmarks" / "faults.py")
faults = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
if not hasattr(faults, "main"):
    _spec.loader.exec_module(faults)

KINDS = ("header-length-1e15", "offsets-past-end", "nested-json", "dtype-shape-mismatch", "2gb-claimed-in-1kb")


def hostile(kind: str, good: bytes) -> bytes:
    """``good`` (a safetensors file's bytes) made hostile in one way."""
    n = int.from_bytes(good[:8], "little")
    header, body = json.loads(good[8:8 + n]), good[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")

    def pack(h: dict | str, data: bytes) -> bytes:
        text = (h if isinstance(h, str) else json.dumps(h)).encode()
        return len(text).to_bytes(8, "little") + text + data

    if kind == "header-length-1e15":
        return (10 ** 15).to_bytes(8, "little") + good[8:]
    if kind == "offsets-past-end":
        begin, end = header[names[-1]]["data_offsets"]
        header[names[-1]]["data_offsets"] = [begin, end + 10 ** 9]
        return pack(header, body)
    if kind == "nested-json":
        return pack('{"a":' * 100_000 + "1" + "}" * 100_000, body)
    if kind == "dtype-shape-mismatch":
        entry = header[names[0]]
        entry["shape"] = [2 * d for d in entry["shape"]] or [2]
        entry["dtype"] = "F64" if entry["dtype"] != "F64" else "F32"
        return pack(header, body)
    if kind == "2gb-claimed-in-1kb":
        return pack({"w": {"dtype": "F32", "shape": [536_870_912], "data_offsets": [0, 2 ** 31]}}, b"\0" * 1024)
    raise ValueError(kind)


# --- the files a verb reads, each made hostile -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def made(tiny_sd, sd_store, tmp_path_factory):
    """A run (2 iterations), its LoRA, the store: the good inputs that each case copies and damages."""
    from rapm.config import TrainConfig, apply_overrides
    from rapm.train import train

    base = tmp_path_factory.mktemp("hostile-inputs")
    run = base / "run"
    config = apply_overrides(TrainConfig(), {**faults.TRAIN_CONFIG, "adv_weight": 0.0, "iterations": 2,
                                             "teacher": str(tiny_sd), "store": str(sd_store)}, "test")
    train(config, run, progress=False)
    code, err = _main(["export", "--run", str(run), "--out", str(base / "lora")])
    assert code == 0, err
    return {"teacher": Path(tiny_sd), "store": Path(sd_store), "run": run, "lora": base / "lora"}


def plant(kind: str, where: str, made: dict, folder: Path) -> tuple[Path, list[str]]:
    """A copy of the input ``where`` holding a hostile file; (the hostile file, the argv of a verb that reads it)."""
    teacher = str(made["teacher"])
    if where == "lora":
        f = folder / "lora.safetensors"
        f.write_bytes(hostile(kind, (made["lora"] / "pytorch_lora_weights.safetensors").read_bytes()))
        return f, [["sample", "--teacher", teacher, "--lora", str(f), "--prompt", "a cat", "--steps", "1", "--out",
                    str(folder / "samples")],
                   ["evaluate", "--teacher", teacher, "--prompts", str(_prompts(folder)), "--num", "1", "--model",
                    f"rapm={f}:1", "--reference-steps", "1", "--teacher-curve", "", "--out", str(folder / "e.json")]]
    if where == "checkpoint":
        run = folder / "run"
        shutil.copytree(made["run"], run)
        last = sorted((run / "checkpoints").glob("step-*"))[-1]
        f = last / "state.safetensors"
        f.write_bytes(hostile(kind, f.read_bytes()))
        sums = (last / "state.sha256").read_text().splitlines()
        (last / "state.sha256").write_text("".join(
            (f"{hashlib.sha256(f.read_bytes()).hexdigest()}  state.safetensors" if line.endswith("state.safetensors")
             else line) + "\n" for line in sums))
        return f, [["export", "--run", str(run), "--out", str(folder / "lora")],
                   ["train", "--out", str(run), "--resume", "--no-progress"]]
    if where == "shard":
        store = folder / "store"
        shutil.copytree(made["store"], store)
        f = store / "shard-00000.safetensors"
        data = hostile(kind, f.read_bytes())
        f.write_bytes(data)
        faults.edit_manifest(store, lambda m: m["shards"][0].update(sha256=hashlib.sha256(data).hexdigest(),
                                                                    bytes=len(data)))
        return f, [["train", "--teacher", teacher, "--store", str(store), "--out", str(folder / "run"), "--no-progress",
                    "--iterations", "2"]]  # (trajectories --verify checks sha256s only: the attacker updated them)
    t = folder / "teacher"
    shutil.copytree(made["teacher"], t)
    (f,) = (t / "unet").glob("*.safetensors")
    f.write_bytes(hostile(kind, f.read_bytes()))
    run = folder / "run"  # a run whose teacher is the hostile one
    shutil.copytree(made["run"], run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "teacher": str(t)}))
    return f, [["sample", "--teacher", str(t), "--prompt", "a cat", "--steps", "1", "--out", str(folder / "samples")],
               ["evaluate", "--teacher", str(t), "--prompts", str(_prompts(folder)), "--num", "1", "--reference-steps",
                "1", "--teacher-curve", "", "--out", str(folder / "e.json")],
               ["export", "--run", str(run), "--out", str(folder / "lora")]]


def _prompts(folder: Path) -> Path:
    (folder / "prompts.txt").write_text("a photo of a cat\n")
    return folder / "prompts.txt"


@pytest.mark.parametrize("where", ["lora", "checkpoint", "shard", "teacher"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_hostile_safetensors_is_one_error_line_naming_it(kind, where, made, tmp_path):
    f, readers = plant(kind, where, made, tmp_path)
    for args in readers:
        code, err = _main(args)
        _one_error(code, err, f.name)


# --- memory: one process runs the verbs on every hostile file; its peak RSS stays that of a good run ---------------------

_MEASURE = r"""
import io, json, resource, sys
import rapm.cli
runs = json.loads(sys.argv[1])
out = []
for args in runs:
    sys.argv, sys.stderr = ["rapm", *args], io.StringIO()
    try:
        rapm.cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out.append({"args": args, "exit": code, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
sys.stdout.write(json.dumps(out) + "\n")
"""


def test_the_verbs_reading_hostile_files_keep_the_peak_memory_of_a_good_run(made, tmp_path):
    """In one fresh process: `rapm sample` with the good LoRA, then sample with each hostile LoRA and teacher and
    export of each hostile checkpoint. Peak RSS (ru_maxrss) after them all is within 8 MiB of the good run's:
    no hostile header is allocated (10^15 bytes, 2 GB) or parsed recursively (100,000 levels)."""
    good = ["sample", "--teacher", str(made["teacher"]), "--lora", str(made["lora"]), "--prompt", "a cat", "--steps",
            "1", "--out", str(tmp_path / "good")]
    runs = [good]
    for kind in KINDS:
        for where in ("lora", "checkpoint", "teacher"):
            folder = tmp_path / f"{kind}-{where}"
            folder.mkdir()
            runs.append(plant(kind, where, made, folder)[1][0])
    done = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(runs)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    assert rows[0]["exit"] == 0 and all(r["exit"] == 1 for r in rows[1:]), rows
    grown = rows[-1]["peak_kib"] - rows[0]["peak_kib"]
    assert grown < 8 * 1024, (grown, rows)
