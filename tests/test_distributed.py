"""Data-parallel training under a multi-process launch (CPU, gloo): two processes with batch 1 each train the
same student as one process with batch 2 (the per-step gradient averaged over the same two trajectories)."""

import json
import os
import subprocess
import sys

import torch

from rapm.run import checkpoints, load_checkpoint


def _launch(nproc, args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "rapm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_two_processes_train_the_same_student_as_one_with_the_same_global_batch(tiny_sd, sd_store, tmp_path):
    common = ["train", "--teacher", str(tiny_sd), "--store", str(sd_store), "--iterations", "4", "--checkpoint-every", "2",
              "--no-progress", "--set", "lora_rank=4", "--set", "disc_lora_rank=2", "--set", "disc_heads_per_level=1",
              "--set", "sample_every=0", "--set", "lr=1e-3", "--set", "disc_lr=1e-3",
              "--method", "rapm-paper"]  # with its discriminators (their gradients are averaged too), alternating
    two = _launch(2, common + ["--out", str(tmp_path / "two"), "--batch-size", "1"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "rapm", *common, "--out", str(tmp_path / "one"), "--batch-size", "2"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_checkpoint(checkpoints(tmp_path / "two")[-1])
    b = load_checkpoint(checkpoints(tmp_path / "one")[-1])
    assert a["step"] == b["step"] == 4
    # Adam (the discriminator's with beta1 = 0) turns float noise on a near-zero gradient element into a step of
    # up to lr: allow a few such elements, while a run that did not average would differ almost everywhere.
    for part in ("student", "discriminator"):
        diff = torch.cat([(a[part][n] - b[part][n]).abs().flatten() for n in b[part]])
        assert (diff > 1e-5).float().mean() < 0.05, part
        assert diff.max() <= 2 * 1e-3 * 4, part
    # The logged loss is the mean over processes, and the gradient norm is that of the averaged gradient
    # (Adam hides a gradient summed instead of averaged; the norm does not).
    for key in ("loss", "grad_norm"):
        log_two = [json.loads(x)[key] for x in (tmp_path / "two" / "logs.jsonl").read_text().splitlines()]
        log_one = [json.loads(x)[key] for x in (tmp_path / "one" / "logs.jsonl").read_text().splitlines()]
        assert len(log_two) == 4 and all(abs(x - y) <= 1e-3 * abs(y) for x, y in zip(log_two, log_one)), key
    # ... and they resume together.
    more = _launch(2, ["train", "--out", str(tmp_path / "two"), "--resume", "--iterations", "6", "--no-progress"], tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert load_checkpoint(checkpoints(tmp_path / "two")[-1])["step"] == 6
