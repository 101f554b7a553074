"""Bit identity of what rapm writes, before and after a change of structure (issue 30's check).

One run of ``rapm trajectories``, ``rapm train`` (rapm, rapm-paper, sfd, pcm, progressive-rdd; two iterations) and
``rapm export`` (the diffusers and kohya formats) per teacher (the built-in digits teacher and tiny random SD, SDXL,
SD3 and FLUX folders built once), every verb a fresh process on the code under ``--code`` (a checkout of any
revision). What each wrote is hashed: every tensor of every .safetensors file by its bytes, every JSON and JSONL
file without its wall-clock fields. Two revisions write the same files when their hash files are equal:

    python benchmarks/bit_identity.py --code /tmp/before --work /tmp/bi --out /tmp/before.json
    python benchmarks/bit_identity.py --code . --work /tmp/bi --out /tmp/after.json
    python benchmarks/bit_identity.py --compare /tmp/before.json /tmp/after.json

``--work`` keeps the teachers (built by this checkout's tests/tiny*.py), so both runs train on the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
METHODS = ("rapm", "rapm-paper", "sfd", "pcm", "progressive-rdd")
FLOW_METHODS = ("rapm", "rapm-paper", "sfd")  # pcm and progressive distillation refuse a flow-matching teacher
TEACHERS = ("digits", "sd", "sdxl", "sd3", "flux")
PROMPTS = ["a photo of a cat", "a red car", "a blue dog", "a photo of a dog"]
DIGIT_PROMPTS = ["a handwritten digit 3", "the number seven", "digit 0", "a drawing of a 5"]
# wall-clock and machine fields: they differ between any two runs
VOLATILE = {"seconds", "time", "created", "created_at", "written_at", "training_started_at", "saved_at", "elapsed",
            "wall_seconds", "it_per_s", "host", "pid", "path", "rapm_version", "rapm.version", "exported_at", "date",
            "modelspec.implementation_version"}


def build_teachers(work: Path) -> dict[str, str]:
    """The tiny SD/SDXL/SD3/FLUX folders (once) and a captioned real-image folder for PCM."""
    sys.path.insert(0, str(HERE))
    from tests.tiny import build_tiny_pipeline
    from tests.tiny_flow import BUILD

    out = {"digits": "digits"}
    for family in ("sd", "sdxl"):
        if not (work / "teachers" / family).exists():
            build_tiny_pipeline(work / "teachers" / family, family=family)
        out[family] = str(work / "teachers" / family)
    for family in ("sd3", "flux"):
        if not (work / "teachers" / family).exists():
            BUILD[family](work / "teachers" / family)
        out[family] = str(work / "teachers" / family)
    real = work / "teachers" / "real"
    if not real.exists():
        import numpy as np
        from PIL import Image

        real.mkdir(parents=True)
        for i, text in enumerate(["a red car", "a blue dog", "a cat"]):
            Image.fromarray((np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8")).save(real / f"{i}.png")
            (real / f"{i}.txt").write_text(text)
    (work / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    (work / "digit_prompts.txt").write_text("".join(p + "\n" for p in DIGIT_PROMPTS))
    return out


def rapm(code: Path, *args) -> None:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "rapm", *map(str, args)], env=env, cwd=code,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"rapm {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")


def _clean(value):
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in sorted(value.items()) if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def hashes(folder: Path) -> dict[str, str]:
    """relative path -> hash of every file rapm wrote that carries a result (tensors, JSON, JSONL)."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            for name, tensor in sorted(load_file(path).items()):
                out[f"{rel}:{name}"] = hashlib.sha256(tensor.contiguous().view(-1).view_as_real().numpy().tobytes()
                                                      if tensor.is_complex() else
                                                      tensor.contiguous().view(-1).numpy().tobytes()).hexdigest()[:16]
        elif path.suffix == ".json":
            out[rel] = hashlib.sha256(json.dumps(_clean(json.loads(path.read_text())), sort_keys=True).encode()).hexdigest()[:16]
        elif path.suffix == ".jsonl":
            rows = [_clean(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
            out[rel] = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    return out


def run(code: Path, work: Path, teachers: tuple[str, ...]) -> dict:
    paths = build_teachers(work)
    scratch = work / "runs"
    shutil.rmtree(scratch, ignore_errors=True)
    result = {}
    for name in teachers:
        teacher, root = paths[name], scratch / name
        store = root / "store"
        steps = ["--steps", 4] if name == "digits" else ["--steps", 2, "--substeps", 3]
        prompts = ["--prompts", work / ("digit_prompts.txt" if name == "digits" else "prompts.txt")]
        rapm(code, "trajectories", "--teacher", teacher, *prompts, "--out", store, *steps, "--batch-size", 2,
             *([] if name == "digits" else ["--dtype", "float32"]), "--no-progress")
        result[f"{name}/store"] = hashes(store)
        for method in (METHODS if name in ("digits", "sd", "sdxl") else FLOW_METHODS):
            run_dir = root / method
            extra = ["--set", f"real_data={paths['digits'] if name == 'digits' else work / 'teachers' / 'real'}"] \
                if method == "pcm" else []
            if method == "progressive-rdd":
                extra += ["--set", f"progressive_start_steps={8 if name == 'digits' else 4}"]
            rapm(code, "train", "--out", run_dir, "--teacher", teacher, "--store", store, "--method", method,
                 "--iterations", 2, "--checkpoint-every", 2, "--device", "cpu", "--no-progress", "--set",
                 "sample_every=0", "--set", "eval_every=0", "--set", "lora_rank=4", "--set", "lora_alpha=8", "--set",
                 "disc_lora_rank=4", *extra)
            files = hashes(run_dir)
            result[f"{name}/{method}/train"] = {k: v for k, v in files.items()
                                                if k.endswith((".jsonl", "config.json")) or ".safetensors:" in k}
            for fmt in ("diffusers", "kohya"):
                out = root / f"{method}-{fmt}"
                rapm(code, "export", "--run", run_dir, "--out", out, "--format", fmt)
                result[f"{name}/{method}/export-{fmt}"] = hashes(out)
            print(f"{name} {method}: {len(files)} files hashed", flush=True)
    return result


def compare(a: Path, b: Path) -> int:
    left, right = json.loads(a.read_text()), json.loads(b.read_text())
    differ = 0
    for key in sorted(set(left) | set(right)):
        x, y = left.get(key, {}), right.get(key, {})
        bad = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
        differ += bool(bad)
        print(f"{key}: {'same' if not bad else 'DIFFERS: ' + ', '.join(bad[:6])} ({len(x)} vs {len(y)} entries)")
    print(f"{differ} of {len(set(left) | set(right))} outputs differ")
    return 1 if differ else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=HERE, help="a checkout of the revision to run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bit_identity"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--teachers", nargs="*", default=list(TEACHERS))
    parser.add_argument("--compare", nargs=2, type=Path)
    args = parser.parse_args()
    if args.compare:
        raise SystemExit(compare(*args.compare))
    result = run(args.code.resolve(), args.work.resolve(), tuple(args.teachers))
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {args.out}: {sum(len(v) for v in result.values())} hashes")


if __name__ == "__main__":
    main()
