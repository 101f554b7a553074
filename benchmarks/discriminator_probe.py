"""Does the discriminator learn at batch 1? Train D alone against a fixed student and measure held-out accuracy.

For each GAN loss (the paper's unpaired hinge, the paired relativistic loss) and backbone (discriminator LoRA +
heads, or heads only as PCM), D is trained for --updates updates at batch 1 on the store's training trajectories
against a fixed student (the undistilled one, or a run's checkpoint), then scored on held-out trajectories with fresh
renoising noise: accuracy = the share of (fake, real) pairs in which the real scores above its fake (0.5 = chance).

    OMP_NUM_THREADS=1 python benchmarks/discriminator_probe.py --store STORE [--run RUN] --updates 200

writes benchmarks/results/discriminator_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def probe(store_path: Path, run: Path | None, gan_loss: str, disc_lora: bool, updates: int, held_out: int,
          seed: int = 0, disc_lr: float | None = None, points: int = 4) -> dict:
    from rapm import config as cfg
    from rapm.methods import build_method
    from rapm.methods.base import Context
    from rapm.models import build_models, make_optimizer
    from rapm.roles import DISCRIMINATOR, STUDENT, lora_parameters, set_trainable
    from rapm.store import open_store
    from rapm.stream import sample_generators
    from rapm.train import training_batch
    from rapm.validation import split_indices

    store = open_store(store_path)
    config = cfg.apply_overrides(cfg.TrainConfig(), {**cfg.PRESETS["digits"], "teacher": "digits",
                                                     "store": str(store_path)}, "probe")
    # relative_weight 1: D1's and D2's losses weigh the same, as when the results were measured (the default recipe
    # weighs the relative terms 0.25 and trains no discriminator).
    config = cfg.apply_overrides(config, {"gan_loss": gan_loss, "disc_lora": disc_lora, "batch_size": 1,
                                          "relative_weight": 1,
                                          **({"disc_lr": disc_lr} if disc_lr else {})}, "probe")
    torch.manual_seed(seed)
    device = torch.device("cpu")
    delta = 1000 // (store.steps * store.substeps)
    method = build_method(config, delta)
    teacher, disc = build_models(config, device, need_vae=False, with_discriminator=True)
    unet = teacher.unet
    if run is not None:
        from rapm.run import latest_checkpoint, load_checkpoint

        state = load_checkpoint(latest_checkpoint(run))
        with torch.no_grad():
            for n, p in lora_parameters(unet, STUDENT).items():
                p.copy_(state["student"][n])
    params = {**lora_parameters(unet, DISCRIMINATOR), **{f"heads.{n}": p for n, p in disc.named_parameters()}}
    if not disc_lora:
        params = {n: p for n, p in params.items() if n.startswith("heads.")}
    opt = make_optimizer(list(params.values()), config.disc_lr, config.disc_betas, config.disc_weight_decay, False)
    train_ids, _ = split_indices(len(store), 0.0, 0)
    val_ids = train_ids[-held_out:]
    train_ids = train_ids[:-held_out]
    set_trainable(unet, DISCRIMINATOR if disc_lora else None)
    disc.requires_grad_(True)

    def accuracy(ids: list[int], noise_seed: int) -> tuple[float, float]:
        accs = {"relative": [], "absolute": []}
        with torch.no_grad():
            for k, i in enumerate(ids):
                batch = training_batch(store.get([i]), device)
                ctx = Context(unet, teacher.schedule, store.timesteps, store.guidance,
                              sample_generators(noise_seed, [k]), disc)
                _, logs = next(method.discriminator_losses(ctx, batch))
                for kind in accs:
                    accs[kind] += [v for key, v in logs.items() if key.startswith(f"disc_acc_{kind[:3]}/")]
        return tuple(sum(v) / len(v) for v in accs.values())

    curve = [(0, *accuracy(val_ids, 10_000))]
    tick = time.perf_counter()
    for step in range(updates):
        i = train_ids[step % len(train_ids)]
        batch = training_batch(store.get([i]), device)
        ctx = Context(unet, teacher.schedule, store.timesteps, store.guidance, sample_generators(seed, [step]), disc)
        opt.zero_grad(set_to_none=True)
        for loss, _ in method.discriminator_losses(ctx, batch):
            loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
        opt.step()
        if (step + 1) % max(1, updates // points) == 0:
            curve.append((step + 1, *accuracy(val_ids, 10_000)))
    return {"gan_loss": gan_loss, "backbone": "lora+heads" if disc_lora else "heads", "student": str(run or "undistilled"),
            "updates": updates, "held_out": len(val_ids), "seconds": time.perf_counter() - tick,
            "curve": [{"updates": u, "acc_relative": r, "acc_absolute": a} for u, r, a in curve]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--run", type=Path, nargs="*", default=[None])
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--losses", nargs="+", default=["hinge", "relativistic"])
    ap.add_argument("--backbones", nargs="+", default=["lora", "heads"])
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for run in args.run:
        for loss in args.losses:
            for backbone in args.backbones:
                r = probe(args.store, run, loss, backbone == "lora", args.updates, args.held_out)
                print(json.dumps(r), file=sys.stderr, flush=True)
                rows.append(r)
    out = {"date": datetime.date.today().isoformat(),
           "command": "python benchmarks/discriminator_probe.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "discriminator_probe.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Does the discriminator learn at batch 1?", "", f"Command: `{out['command']}` ({out['date']}).", "",
             "Held-out pair accuracy (the real scores above its own fake; 0.5 = chance) after K updates of D alone "
             "against a fixed student.", "",
             "| student | GAN loss | backbone | updates | acc. D1 (relative) | acc. D2 (absolute) |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        for c in r["curve"]:
            lines.append(f"| {Path(r['student']).name} | {r['gan_loss']} | {r['backbone']} | {c['updates']} | "
                         f"{c['acc_relative']:.2f} | {c['acc_absolute']:.2f} |")
    (args.results / "discriminator_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
