"""Memory: peak memory of a RAPM iteration against one UNet's weights plus one pass's activations.

Each measurement is a fresh subprocess (peak RSS from ``resource.getrusage``; on a CUDA device also
``torch.cuda.max_memory_allocated``):

* imports: python, torch, diffusers, peft and rapm imported, nothing built (what every row includes);
* one UNet: the teacher's UNet loaded as training loads it (no text encoders, no VAE);
* one pass at a time: the UNet with its adapters and the discriminator heads, then each UNet pass one iteration
  makes (benchmarks/harness.py ``Passes``, the speed benchmark's floor), run once each: one UNet plus the largest
  single pass's activations;
* iteration: ``rapm.train.train`` for two iterations (a discriminator and a student update, optimizers, Adam state);
  and the same with ``gradient_checkpointing``.

The training subprocess also checks decision 1 of docs/design.md where it runs: one UNet2DConditionModel object in the
process, each weight stored once (distinct storage pointers), no text encoder or VAE object anywhere in it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py [--models digits,sd15-reduced] [--device cpu]

Writes benchmarks/results/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

MiB = 2**20


def _peak(device: str) -> dict:
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB, 1)}
    if device.startswith("cuda"):
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MiB, 1)
    return out


def census() -> dict:
    """What lives in this process: UNets, text encoders, VAEs, and whether any weight is stored twice."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import PreTrainedModel

    gc.collect()
    objects = gc.get_objects()
    unets = [o for o in objects if isinstance(o, UNet2DConditionModel)]
    encoders = [type(o).__name__ for o in objects if isinstance(o, PreTrainedModel)]
    vaes = [o for o in objects if isinstance(o, AutoencoderKL)]
    params = [p for u in unets for p in u.parameters()]
    base = [p for u in unets for n, p in u.named_parameters() if "lora_" not in n]
    return {
        "unet_objects": len(unets), "text_encoder_objects": encoders, "vae_objects": len(vaes),
        "unet_base_parameters": sum(p.numel() for p in base),
        "unet_base_weight_mib": round(sum(p.numel() * p.element_size() for p in base) / MiB, 2),
        "lora_parameters": sum(p.numel() for p in params) - sum(p.numel() for p in base),
        "distinct_weight_storages": len({p.untyped_storage().data_ptr() for p in base}),
        "base_weight_tensors": len(base),
    }


def child(kind: str, args: dict) -> dict:
    """One measurement, in this (fresh) process."""
    device = args["device"]
    import diffusers  # noqa: F401
    import peft  # noqa: F401

    from rapm.models import build_models
    from rapm.train import resolve_config, train, training_batch

    torch.set_num_threads(args["threads"])
    if kind == "imports":
        return _peak(device)
    config = resolve_config(args["teacher"], args["store"], args["preset"], None,
                            dict(args["overrides"], sample_every=0, checkpoint_every=10**6, device=device,
                                 iterations=2, delta=10, **args.get("flags", {})))
    if kind == "unet":
        from rapm.teacher import load_teacher

        t = load_teacher(config.teacher, device=device, text_encoders=False)
        return {**_peak(device), **census(), "teacher": str(t.path)}
    if kind in ("passes", "student pass"):
        from harness import Passes

        from rapm.store import open_store

        t, disc = build_models(config, torch.device(device), need_vae=False, with_discriminator=True)
        store = open_store(Path(config.store))
        batch = training_batch(store.get(list(range(config.batch_size))), torch.device(device))
        passes = Passes(t.unet, disc, batch.latents, batch.cond, batch.uncond)
        plan = [passes.student_backward(config.batch_size)] if kind == "student pass" else [
            pair for phase in passes.plan().values() for _, pair in phase.values()]
        for setup, run in plan:
            setup()
            run()
        return {**_peak(device), **census()}
    if kind == "train":
        import rapm.train as rt

        kept = []
        original = rt.build_models

        def keep(*a, **kw):  # keep the training's models alive for the census after train() returns
            kept.append(original(*a, **kw))
            return kept[-1]

        rt.build_models = keep
        start = time.perf_counter()
        train(config, Path(args["run"]), overwrite=True, progress=False)
        seconds = time.perf_counter() - start
        t, disc = kept[0]
        trainable = sum(p.numel() for n, p in t.unet.named_parameters() if "lora_" in n)
        heads = sum(p.numel() for p in disc.parameters())
        return {**_peak(device), **census(), "seconds": round(seconds, 2), "trainable_parameters": trainable + heads,
                "teacher_text_encoders": len(t.text_encoders), "teacher_vae": t.vae is not None,
                "gradient_checkpointing": bool(t.unet.is_gradient_checkpointing)}
    raise ValueError(kind)


def run_child(kind: str, args: dict) -> dict:
    from harness import run_child_script

    env = dict(os.environ, OMP_NUM_THREADS=str(args["threads"]), HF_HUB_OFFLINE="1")
    return run_child_script(__file__, kind, args, env, f"memory child {kind}")


def measure(name: str, spec: dict, device: str, threads: int, folder: Path) -> dict:
    from speed import teacher_for

    from rapm.trajectories import write_trajectories

    teacher = teacher_for(name, folder)
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(spec["prompts"][i % len(spec["prompts"])] + "\n" for i in range(spec["count"])))
    # Memory does not depend on the stored trajectories' fine grid: M = 2 keeps the store quick to write (Δ set to 10).
    write_trajectories(teacher, prompts, folder / "store", steps=4, substeps=2, batch_size=spec["write_batch"],
                       progress=False)
    args = dict(device=device, threads=threads, teacher=teacher, store=str(folder / "store"), preset=spec["preset"],
                overrides=spec["overrides"], run=str(folder / "run"))
    rows = {"imports": run_child("imports", args), "one UNet": run_child("unet", args),
            "one UNet + one student step with backward (B rows)": run_child("student pass", args),
            "one pass at a time (every pass of an iteration, the largest decides)": run_child("passes", args), "iteration": run_child("train", args),
            "iteration, gradient checkpointing": run_child("train", dict(args, flags={"gradient_checkpointing": True}))}
    if device.startswith("cuda"):
        for precision in ("bf16", "fp16"):
            rows[f"iteration, {precision}"] = run_child("train", dict(args, flags={"mixed_precision": precision}))
        try:
            import bitsandbytes  # noqa: F401

            rows["iteration, 8-bit Adam"] = run_child("train", dict(args, flags={"use_8bit_adam": True}))
        except ImportError:
            pass
    base = rows["imports"]["peak_rss_mib"]
    for r in rows.values():
        r["above_imports_mib"] = round(r["peak_rss_mib"] - base, 1)
    it, ref = rows["iteration"], rows["one pass at a time (every pass of an iteration, the largest decides)"]
    weights = rows["one UNet"]["unet_base_weight_mib"]
    trainable_mib = it["trainable_parameters"] * 4 / MiB
    return {
        "model": name, "rows": rows,
        "unet_weight_mib": weights,
        "trainable_mib": round(trainable_mib, 2), "adam_state_mib": round(2 * trainable_mib, 2),
        "iteration_over_one_pass_at_a_time": round(it["above_imports_mib"] / ref["above_imports_mib"], 3),
        "iteration_minus_one_pass_at_a_time_mib": round(it["peak_rss_mib"] - ref["peak_rss_mib"], 1),
        "one_unet_in_training": it["unet_objects"] == 1 and it["distinct_weight_storages"] == it["base_weight_tensors"],
        "text_encoders_in_training": it["text_encoder_objects"],
        "bitsandbytes_installed": _has_bitsandbytes(),
    }


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def markdown(result: dict) -> str:
    m = result["machine"]
    cuda = result["device"].startswith("cuda")
    lines = ["# Memory: one RAPM iteration against one UNet plus one pass", "",
             f"`{result['command']}` on {m['date']}: {result['device']}, {m['torch_threads']} torch thread(s), torch "
             f"{m['torch']}. Each row is a fresh subprocess; peak RSS from getrusage (ru_maxrss)"
             + ("; CUDA: torch.cuda.max_memory_allocated" if cuda else "") + ". float32 weights (mixed precision "
             "applies on a GPU only).", "",
             "| model | measured | peak RSS MiB | above imports MiB |" + (" CUDA max allocated MiB |" if cuda else ""),
             "| --- | --- | ---: | ---: |" + (" ---: |" if cuda else "")]
    for r in result["models"]:
        for k, v in r["rows"].items():
            lines.append(f"| {r['model']} | {k} | {v['peak_rss_mib']:.0f} | {v['above_imports_mib']:.0f} |"
                         + (f" {v.get('cuda_max_allocated_mib', float('nan')):.0f} |" if cuda else ""))
    lines += ["", "| model | UNet weights MiB | trainable (LoRA + heads) MiB | Adam state MiB | iteration - one pass at a "
              "time MiB | iteration / one pass at a time (above imports) | UNet objects | distinct weight storages / "
              "weights | text encoders in training |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["models"]:
        it = r["rows"]["iteration"]
        lines.append(f"| {r['model']} | {r['unet_weight_mib']:.1f} | {r['trainable_mib']:.1f} | {r['adam_state_mib']:.1f} | "
                     f"{r['iteration_minus_one_pass_at_a_time_mib']:.0f} | {r['iteration_over_one_pass_at_a_time']:.2f} | "
                     f"{it['unet_objects']} | {it['distinct_weight_storages']} / {it['base_weight_tensors']} | "
                     f"{', '.join(it['text_encoder_objects']) or 'none'} |")
    bnb = result["models"][0]["bitsandbytes_installed"] if result["models"] else False
    lines += ["", f"bitsandbytes installed: {'yes' if bnb else 'no'} (8-bit Adam is measured only on a CUDA device "
              "with bitsandbytes; without it `use_8bit_adam` is a ConfigError naming the fix)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,sd15-reduced")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from speed import MODELS

    from harness import machine, write_results

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            results.append(measure(name, MODELS[name], args.device, args.threads, folder))
            print(json.dumps(results[-1]), flush=True)
    result = {
        "benchmark": "memory", "device": args.device,
        "command": f"OMP_NUM_THREADS={args.threads} benchmarks/memory.py --models {args.models} --device {args.device} "
                   f"--threads {args.threads}",
        "machine": machine(torch_threads=args.threads, load_average=list(os.getloadavg())),
        "models": results,
    }
    write_results(args.out, "memory", result, markdown(result))


if __name__ == "__main__":
    main()
