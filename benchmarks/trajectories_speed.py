"""Trajectory precompute: trajectories per second and bytes per trajectory.

Runs `write_trajectories` (the library call behind `rapm trajectories`) on the tiny random
SD pipeline (and on the built-in digits teacher when it is built) at N=4, M=25, and
reports end-to-end throughput (teacher load, prompt encoding, 100 guided DDIM steps per
trajectory, writing) and the store's bytes per trajectory. It also gives the bytes per
trajectory of real SD 1.5 and SDXL stores, computed from their tensor shapes.

    .venv/bin/python benchmarks/trajectories_speed.py [--count 64] [--threads 1] [--batch-sizes 1,8]

Writes benchmarks/results/trajectories_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import sys
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the test fixtures in tests/tiny.py

PROMPTS = ["a photo of a cat", "a red car", "a blue dog", "a photo of a dog", "a cat", "a red cat", "a blue car", "a dog"]
DIGIT_PROMPTS = ["a handwritten digit 3", "the number seven", "digit 0", "a drawing of a 5"]
TYPICAL_PROMPT = "a photograph of an astronaut riding a horse on mars, highly detailed"  # 68 characters

# (name, latent shape, prompt_embeds [L, D], pooled dim or None): the public SD 1.5 and SDXL base configs.
REAL = [("SD 1.5 (512 px)", (4, 64, 64), (77, 768), None), ("SDXL (1024 px)", (4, 128, 128), (77, 2048), 1280)]


def bytes_per_trajectory(latent_shape, embeds, pooled, steps: int = 4, itemsize: int = 2, prompt: str = TYPICAL_PROMPT,
                         delta_steps: bool = True) -> dict:
    """Bytes one trajectory adds to a shard: latents [N+1, C, H, W], (format 2) its Δ-steps delta_latents [N, C, H, W],
    embeddings, (SDXL) pooled and float32 time ids, int64 seed, its prompt."""
    c, h, w = latent_shape
    parts = {"latents": (steps + 1) * c * h * w * itemsize}
    if delta_steps:
        parts["delta_latents"] = steps * c * h * w * itemsize
    parts["prompt_embeds"] = embeds[0] * embeds[1] * itemsize
    if pooled:
        parts["pooled_embeds"] = pooled * itemsize
        parts["time_ids"] = 6 * 4
    parts["seeds"] = 8
    parts["prompt (metadata)"] = len(json.dumps(prompt)) + 2
    parts["total"] = sum(parts.values())
    return parts


def measure(teacher, prompts: list[str], count: int, batch_size: int, folder: Path) -> dict:
    from rapm.trajectories import write_trajectories

    prompts_file = folder / "prompts.txt"
    prompts_file.write_text("".join(prompts[i % len(prompts)] + "\n" for i in range(count)))
    out = folder / f"store-b{batch_size}"
    start = time.perf_counter()
    store = write_trajectories(teacher, prompts_file, out, steps=4, substeps=25, batch_size=batch_size,
                               shard_size=max(batch_size, 32), progress=False)
    seconds = time.perf_counter() - start
    shard_bytes = sum(s["bytes"] for s in store.manifest["shards"])
    total_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"count": count, "batch_size": batch_size, "seconds": round(seconds, 2),
            "trajectories_per_s": round(count / seconds, 2), "shard_bytes_per_trajectory": round(shard_bytes / count),
            "store_bytes_per_trajectory": round(total_bytes / count), "latent_shape": list(store.latent_shape),
            "guidance": store.guidance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from rapm.families import BUILTIN_TEACHERS
    from tests.tiny import build_tiny_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teachers = [("tiny SD (4x8x8 latents)", build_tiny_pipeline(tmp / "tiny-sd"), PROMPTS)]
        if (BUILTIN_TEACHERS["digits"] / "model_index.json").exists():
            teachers.append(("digits (1x16x16 pixels)", "digits", DIGIT_PROMPTS))
        for name, teacher, prompts in teachers:
            for b in [int(x) for x in args.batch_sizes.split(",")]:
                folder = tmp / f"{len(rows)}"
                folder.mkdir()
                rows.append({"teacher": name, **measure(teacher, prompts, args.count, b, folder)})
                print(rows[-1], flush=True)

    real = {name: bytes_per_trajectory(shape, embeds, pooled) for name, shape, embeds, pooled in REAL}
    result = {
        "benchmark": "trajectories_speed",
        "command": f"benchmarks/trajectories_speed.py --count {args.count} --threads {args.threads} --batch-sizes {args.batch_sizes}",
        "settings": {"steps": 4, "substeps": 25, "dtype": "float16", "teacher_dtype": "float32", "device": "cpu"},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__,
                    "platform": platform.platform(), "load_average": list(os.getloadavg())},
        "measured": rows,
        "bytes_per_trajectory_real": real,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trajectories_speed.json").write_text(json.dumps(result, indent=1) + "\n")

    lines = ["# Trajectory precompute: speed and size", "",
             f"`{result['command']}`; N=4, M=25 (100 guided DDIM steps, each one UNet pass over cond+uncond), "
             f"float16 storage, CPU, {args.threads} torch thread(s) of {os.cpu_count()} cores, load average "
             f"{os.getloadavg()[0]:.1f} at the end.", "",
             "| teacher | batch | trajectories | seconds | trajectories/s | shard bytes/trajectory | store bytes/trajectory |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['teacher']} | {r['batch_size']} | {r['count']} | {r['seconds']} | {r['trajectories_per_s']} | "
              f"{r['shard_bytes_per_trajectory']:,} | {r['store_bytes_per_trajectory']:,} |" for r in rows]
    lines += ["", "Bytes per trajectory of real teachers (N=4, float16; computed from the tensor shapes, prompt of "
              f"{len(TYPICAL_PROMPT)} characters; a shard's header adds well under 1 KB per shard):", "",
              "| teacher | latents | Δ-steps (format 2) | prompt_embeds | pooled + time ids | seed + prompt | total | "
              "per 1M prompts | format 1 total |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, p in real.items():
        extra = p.get("pooled_embeds", 0) + p.get("time_ids", 0)
        lines.append(f"| {name} | {p['latents']:,} | {p['delta_latents']:,} | {p['prompt_embeds']:,} | {extra:,} | "
                     f"{p['seeds'] + p['prompt (metadata)']:,} | {p['total']:,} | {p['total'] * 1e6 / 2**30:,.0f} GiB | "
                     f"{p['total'] - p['delta_latents']:,} |")
    (args.out / "trajectories_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
