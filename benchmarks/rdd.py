"""RDD's relational term (rapm/methods/rdd.py): where the teacher's features come from, what the term costs, and
whether it helps, on the digits teacher and the SD-1.5-shaped UNet.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rdd.py probe     # seconds: which block and timestep (digits)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rdd.py cost      # minutes: seconds/iteration and peak RSS (sd15-reduced)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rdd.py quality   # ~30 min: the methods with and without the term

* probe: the digits teacher's block outputs (down blocks, mid block; spatially pooled) for the digits images,
  re-noised to t with seeded noise, under the empty prompt (so that only the image says which digit it is):
  nearest-class-mean accuracy on the held-out split (class means from the train split), and the correlation of
  the pairwise cosine similarities of held-out images with those of the digits classifier's map (RDD's source).
* cost: `rapm train --method rapm` on benchmarks/memory.py's SD-1.5-shaped UNet (sd15-reduced), two iterations in
  a fresh process each (memory.py's training child: peak RSS, and the second iteration's seconds from
  logs.jsonl), without and with `rdd_weight=1` (teacher features).
* quality: the quality benchmark's flow (benchmarks/quality.py: store, `rapm train` in a fresh process, export,
  `rapm.evaluate`) at N = 4 for progressive, progressive-rdd with classifier and with teacher features, rapm and
  sfd without and with the term (teacher features).

Each command updates its section of benchmarks/results/rdd.json and rewrites rdd.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

RESULTS = Path(__file__).parent / "results"
TIMESTEPS = [0, 50, 100, 150, 250, 500, 750]
# (row name, --method, extra --set fields)
RUNS = [
    ("progressive", "progressive", {}),
    ("progressive-rdd, classifier", "progressive-rdd", {"rdd_features": "classifier"}),
    ("progressive-rdd, teacher", "progressive-rdd", {"rdd_features": "teacher"}),
    ("rapm", "rapm", {}),
    ("rapm + rdd, teacher", "rapm", {"rdd_weight": 1.0, "rdd_features": "teacher"}),
    ("sfd", "sfd", {}),
    ("sfd + rdd, teacher", "sfd", {"rdd_weight": 1.0, "rdd_features": "teacher"}),
]


def probe() -> dict:
    import torch

    from rapm.demo.classifier import load_classifier
    from rapm.demo.data import load_split
    from rapm.diffusion import alpha_sigma
    from rapm.discriminator import backbone_features
    from rapm.teacher import load_teacher

    teacher = load_teacher("digits")
    cond, _ = teacher.encode_prompts([""])
    unet = teacher.unet.eval()
    train, held = load_split("train"), load_split("held_out")
    classifier = load_classifier().eval()

    def pooled_blocks(images: torch.Tensor, t: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(t)
        out = []
        for chunk in images.split(250):
            tt = torch.full((len(chunk),), t)
            a, s = alpha_sigma(teacher.schedule, tt, chunk)
            z = (a * chunk.double() + s * torch.randn(chunk.shape, generator=g).double()).float()
            with torch.no_grad():
                feats = backbone_features(unet, z, tt, cond.repeat(len(chunk)), "down_mid")
            out.append([f.mean((2, 3)) for f in feats])
        return [torch.cat(level) for level in zip(*out)]

    def ncm_accuracy(train_f, held_f) -> float:
        means = torch.stack([train_f[train.digits == d].mean(0) for d in range(10)])
        pred = torch.cdist(held_f, means).argmin(1)
        return float((pred == held.digits).float().mean())

    def similarity(f: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional.normalize(f - f.mean(0), dim=1)
        sim = f @ f.T
        return sim[~torch.eye(len(f), dtype=torch.bool)]

    with torch.no_grad():
        ref = classifier.conv(held.images).mean((2, 3))
        ref_train = classifier.conv(train.images).mean((2, 3))
    ref_sim = similarity(ref)
    names = [f"down {i}" for i in range(len(unet.down_blocks))] + ["mid"]
    rows = [{"block": "classifier map (RDD's source)", "t": None, "ncm_accuracy": ncm_accuracy(ref_train, ref),
             "similarity_correlation": 1.0}]
    for t in TIMESTEPS:
        tr, he = pooled_blocks(train.images, t), pooled_blocks(held.images, t)
        for name, a, b in zip(names, tr, he):
            corr = float(torch.corrcoef(torch.stack([similarity(b), ref_sim]))[0, 1])
            rows.append({"block": name, "t": t, "channels": a.shape[1], "ncm_accuracy": ncm_accuracy(a, b),
                         "similarity_correlation": corr})
    return {"rows": rows, "held_out": len(held), "train": len(train)}


def cost(threads: int) -> dict:
    from memory import run_child
    from speed import MODELS, teacher_for

    from rapm.trajectories import write_trajectories

    spec = MODELS["sd15-reduced"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher = teacher_for("sd15-reduced", folder)
        prompts = folder / "prompts.txt"
        prompts.write_text("".join(spec["prompts"][i % len(spec["prompts"])] + "\n" for i in range(spec["count"])))
        write_trajectories(teacher, prompts, folder / "store", steps=4, substeps=2, batch_size=spec["write_batch"],
                           progress=False)
        for name, flags in [("rapm", {}), ("rapm + rdd (teacher features)", {"rdd_weight": 1.0})]:
            run = folder / name.replace(" ", "_")
            args = dict(device="cpu", threads=threads, teacher=teacher, store=str(folder / "store"), preset="sd15",
                        overrides=spec["overrides"], run=str(run), flags=dict(flags, eval_every=0))
            record = run_child("train", args)
            logs = [json.loads(x) for x in (run / "logs.jsonl").read_text().splitlines()]
            rows[name] = {"peak_rss_mib": record["peak_rss_mib"], "second_iteration_s": round(logs[-1]["seconds"], 3),
                          "phase": logs[-1]["phase"], "batch_size": 1, "trainable_parameters": record["trainable_parameters"]}
            print(name, rows[name], flush=True)
    return {"model": "sd15-reduced (SD 1.5's UNet config, widths / 10, 4x32x32 latents)", "rows": rows,
            "load_average": list(os.getloadavg())}


def quality(work: Path, iterations: int, trajectories: int, samples: int, threads: int, seed: int = 0,
            only: list[str] | None = None) -> dict:
    import torch

    from quality import LAUNCH, export, make_store

    from rapm.evaluate import ModelSpec, default_digits_prompts, evaluate

    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    store = make_store(work, 4, trajectories, 40)
    specs, records = [ModelSpec("teacher-ddim", 4)], {}
    for row, method, sets in RUNS:
        if only and row.split(",")[0].replace(" ", "") not in only:
            continue
        run = work / (row.replace(" ", "").replace(",", "-").replace("+", "-") + (f"-s{seed}" if seed else ""))
        record_file = run / "bench.json"
        if not record_file.exists():
            cmd = [sys.executable, "-c", LAUNCH, "train", "--teacher", "digits", "--store", str(store), "--out", str(run),
                   "--method", method, "--iterations", str(iterations), "--seed", str(seed), "--no-progress", "--overwrite",
                   "--set", "sample_every=0", "--set", f"checkpoint_every={iterations}", "--set", "eval_every=0"]
            for k, v in sets.items():
                cmd += ["--set", f"{k}={v}"]
            peak = work / f".peak-{run.name}"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "RAPM_PEAK_FILE": str(peak)}
            print(f"== train {row}", file=sys.stderr, flush=True)
            tick = time.perf_counter()
            if subprocess.run(cmd, env=env).returncode != 0:
                raise SystemExit(f"training {row} failed: {shlex.join(cmd)}")
            logs = [json.loads(x) for x in (run / "logs.jsonl").read_text().splitlines() if '"phase": "validation"' not in x]
            per_it = sorted(e["seconds"] for e in logs)
            record_file.write_text(json.dumps({"train_seconds": time.perf_counter() - tick,
                                               "seconds_per_iteration": per_it[len(per_it) // 2],
                                               "peak_rss_mb": int(peak.read_text()) / 1024 if peak.exists() else None}))
        records[row] = {**json.loads(record_file.read_text()), "method": method, "sets": sets}
        specs.append(ModelSpec(row, 4, lora=str(export(run, 4))))
    prompts = default_digits_prompts(samples)
    seeds = list(range(10_000, 10_000 + len(prompts)))
    result = evaluate("digits", specs, prompts, seeds, reference_steps=100,
                      out=work / f"evaluation{f'-s{seed}' if seed else ''}.json")
    rows = []
    for r in result["rows"]:
        row = {k: r.get(k) for k in ("steps", "fd", "prompt_accuracy", "trajectory_error")}
        row.update(records.get(r["method"], {}), label=f"{r['method']} ({r['steps']} steps)" if r["method"].startswith(
            "teacher") else r["method"])
        rows.append(row)
    return {"rows": rows, "iterations": iterations, "trajectories": trajectories, "samples": len(prompts),
            "real_floor_fd": result["real_floor_fd"], "fine_steps": 40, "steps": 4, "batch_size": 4, "seed": seed}


def markdown(results: dict) -> str:
    out = ["# RDD's relational term: feature source, cost, quality", ""]
    if "probe" in results:
        p = results["probe"]
        out += ["## Which teacher features (digits teacher)", "", f"`{p['command']}` ({p['date']}). Pooled block "
                f"outputs of the {p['train']} train and {p['held_out']} held-out digits images re-noised to t (empty "
                "prompt): nearest-class-mean accuracy on the held-out images, and the correlation of their pairwise "
                "cosine similarities with the digits classifier map's.", "",
                "| block | t | NCM accuracy ↑ | similarity correlation with the classifier ↑ |", "| --- | ---: | ---: | ---: |"]
        for r in p["rows"]:
            out.append(f"| {r['block']} | {'' if r['t'] is None else r['t']} | {100 * r['ncm_accuracy']:.1f}% | "
                       f"{r['similarity_correlation']:.3f} |")
        out.append("")
    if "cost" in results:
        c = results["cost"]
        out += ["## Cost (SD-1.5-shaped UNet, CPU)", "", f"`{c['command']}` ({c['date']}; load average "
                f"{c['load_average'][0]:.1f}). {c['model']}, batch 1, N = 4; `rapm train` for two iterations in a fresh "
                "process each; the second iteration's seconds (a discriminator and a student update) and the "
                "process's peak RSS.", "", "| run | second iteration s | peak RSS MiB |", "| --- | ---: | ---: |"]
        for name, r in c["rows"].items():
            out.append(f"| {name} | {r['second_iteration_s']:.2f} | {r['peak_rss_mib']:.0f} |")
        out.append("")
    for key in [k for k in results if k.startswith("quality")]:
        q = results[key]
        out += ["## Quality (digits teacher, N = 4)", "", f"`{q['command']}` ({q['date']}). {q['trajectories']} "
                f"trajectories ({q['fine_steps']} DDIM steps each), {q['iterations']} iterations per run, the digits "
                f"preset (batch {q['batch_size']}), seed {q['seed']}; {q['samples']} held-out prompts and seeds; "
                "trajectory error against the teacher's DDIM-100 from the same noise.", "",
                "| run | FD ↓ | prompt acc. ↑ | trajectory error ↓ | s/iteration |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in q["rows"]:
            spi = f"{r['seconds_per_iteration']:.2f}" if r.get("seconds_per_iteration") else ""
            out.append(f"| {r['label']} | {r['fd']:.1f} | {100 * r['prompt_accuracy']:.1f}% | "
                       f"{r['trajectory_error']:.4f} | {spi} |")
        out += ["", f"Real-vs-real FD floor at {q['samples']} samples: {q['real_floor_fd']:.1f}.", ""]
    if results.get("notes"):
        out += ["## What the numbers support", "", results["notes"], ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["probe", "cost", "quality", "markdown"])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--work", type=Path, default=Path("runs/rdd"))
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--trajectories", type=int, default=500)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--seed", type=int, default=0, help="quality: the training seed (section quality_sSEED if not 0)")
    ap.add_argument("--only", nargs="*", help="quality: these rows only (progressive, progressive-rdd, rapm, rapm+rdd, ...)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    file = args.results / "rdd.json"
    results = json.loads(file.read_text()) if file.exists() else {}
    if args.what != "markdown":
        tick = time.perf_counter()
        section = {"probe": probe, "cost": lambda: cost(args.threads),
                   "quality": lambda: quality(args.work, args.iterations, args.trajectories, args.samples,
                                              args.threads, args.seed, args.only)}[args.what]()
        command = "OMP_NUM_THREADS=%d python benchmarks/rdd.py " % args.threads + shlex.join(
            argv if argv is not None else sys.argv[1:])
        section.update(command=command, date=datetime.date.today().isoformat(),
                       wall_seconds=round(time.perf_counter() - tick, 1), machine=f"{os.cpu_count()} CPUs, "
                       f"torch {torch.__version__}, {args.threads} threads")
        results[args.what + (f"_s{args.seed}" if args.what == "quality" and args.seed else "")] = section
    args.results.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results)
    (args.results / "rdd.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
