"""Faults: kill `rapm train` and `rapm trajectories` at random moments, resume, and check nothing is lost.

Each verb runs as a real process (`python -m rapm ...`, one torch thread) on the tiny random SD
pipeline. The harness SIGKILLs it at a random moment (during start-up, or a random time after
its k-th new iteration or shard, so some kills land inside a checkpoint or shard write), checks
what a reader would see on disk, and reruns the same command (`--resume` for train) until the
work is done. Then it compares against an uninterrupted process with the same settings:

- trajectories: every file of the store byte-identical;
- train: the same (step, phase) sequence in logs.jsonl and the same losses (float tolerance),
  the same final student weights;
- after every kill: each checkpoint that `rapm.train.checkpoints()` lists loads (sha256 checked),
  each shard with a done-record matches its sha256, the run's checkpoints/ folder holds at most
  keep_checkpoints + 1 entries; after the final run no temp file or folder is left.

It also feeds `rapm` bad inputs from the command line (one error line naming the file or field,
no traceback, files already written unchanged).

Then the matrix of issue 34 on every verb: `rapm trajectories`, `train`, `export`, `sample`, `evaluate`, `report`,
each under (a) SIGKILL at a random time or inside its writes, (b) a real full disk (its --out on a small tmpfs,
filled), (c) a read-only --out (a read-only bind mount), (d) a second process writing the same --out (and an export
of a run being trained), (e) --out, or a file in it, a link. Mounting needs root; without it those cells say "not run".

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/faults.py [--train-kills 50] [--trajectory-kills 50] [--seed 0]
        [--verb-kills 3] [--verb-tries 1] [--only-verbs [--verbs trajectories,train,export,sample,evaluate,report]]

Writes benchmarks/results/faults.{json,md}. tests/test_faults.py runs the same harness with 3 kills each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the harness and fixtures in tests/

from tests.faults_harness import (ROOT, TRAIN_CONFIG, TRAJECTORY_SETTINGS, edit_manifest, environment, files_digest,
                                  folder_bytes, leftovers, logged_lines, rapm_command, rewrite_shard, run_problems,
                                  run_to_end, store_problems, train_args, train_argv, train_faults, trajectories_args,
                                  trajectories_argv, trajectories_faults, write_prompts)  # noqa: E402



def bad_inputs(teacher: Path, store: Path, folder: Path) -> list[dict]:
    """Each bad input once, as a user types it: exit 1, one `error:` line with the expected words, no traceback, the
    files already written (the run, the store) unchanged."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(folder / "prompts.txt", 4)
    other_teacher = folder / "other-teacher"
    shutil.copytree(teacher, other_teacher)
    from safetensors.torch import load_file, save_file

    weights = next((other_teacher / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    tensors[sorted(tensors)[0]] += 1e-3
    save_file(tensors, weights)
    small = dict(steps=2, substeps=2, shard_size=2, batch_size=2)
    stores = {}
    for name, t, settings in [("other-teacher", other_teacher, small), ("n1", teacher, {**small, "steps": 1}),
                              ("mine", teacher, small)]:
        stores[name] = folder / f"store-{name}"
        made = run_to_end(trajectories_argv(t, prompts, stores[name], settings))
        if made.returncode != 0:
            raise RuntimeError(f"rapm trajectories failed: {made.stderr[-3000:]}")

    config_file = folder / "train.json"
    config_file.write_text(json.dumps({**TRAIN_CONFIG, "iterations": 4}))
    run = folder / "run"
    made = run_to_end(train_argv(teacher, stores["mine"], run, config_file))
    if made.returncode != 0:
        raise RuntimeError(f"rapm train failed: {made.stderr[-3000:]}")
    lora = folder / "lora"
    made = run_to_end(rapm_command("export", "--run", str(run), "--out", str(lora)))
    if made.returncode != 0:
        raise RuntimeError(f"rapm export failed: {made.stderr[-3000:]}")

    def copy(src: Path, name: str) -> Path:
        dst = folder / name
        shutil.copytree(src, dst)
        return dst

    def damage(path: Path, how: str) -> Path:
        data = bytearray(path.read_bytes())
        if how == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        return path

    def checkpoints_damaged() -> Path:
        r = copy(run, "run-damaged")
        for state in r.glob("checkpoints/step-*/state.safetensors"):
            damage(state, "flip")
        return r

    def latest_damaged() -> Path:
        r = copy(run, "run-latest-damaged")
        damage(sorted(r.glob("checkpoints/step-*/state.safetensors"))[-1], "truncate")
        return r

    def shard_damaged(how: str) -> Path:
        s = copy(stores["mine"], f"store-{how}")
        damage(s / "shard-00001.safetensors", how)
        return s

    not_a_store = folder / "not-a-store"
    not_a_store.mkdir()
    (not_a_store / "notes.txt").write_text("mine")
    empty_prompts = folder / "empty.txt"
    empty_prompts.write_text("\n\n")
    bad_toml = folder / "bad.toml"
    bad_toml.write_text("lr = 1e-4\nlora_rank = \n")
    not_a_lora = folder / "weights.safetensors"
    save_file({"conv.weight": load_file(weights)[sorted(tensors)[0]][:2].contiguous()}, str(not_a_lora))
    t, s = str(teacher), str(store)
    train_fresh = ["train", "--teacher", t, "--store", s, "--no-progress"]
    truncated_store, flipped_store = shard_damaged("truncate"), shard_damaged("flip")
    pwned = folder / "PWNED"  # what a planted pickle would write: it must never exist
    unsafe = issue15_inputs(folder, teacher, run, stores["mine"], prompts, pwned, copy)

    # (what, argv after `rapm`, folder that must not change, words the error must hold)
    cases = [
        ("config file that does not parse", [*train_fresh, "--out", str(folder / "r1"), "--config", str(bad_toml)], None,
         [str(bad_toml), "cannot be parsed"]),
        ("unknown config field", [*train_fresh, "--out", str(folder / "r2"), "--set", "lora_rnk=4"], None,
         ["unknown field 'lora_rnk'"]),
        ("ill-typed config value", [*train_fresh, "--out", str(folder / "r3"), "--set", "lora_rank=many"], None,
         ["'lora_rank' must be int"]),
        ("config value out of range", [*train_fresh, "--out", str(folder / "r4"), "--iterations", "0"], None,
         ["'iterations'", "at least 1"]),
        ("missing --store", ["train", "--teacher", t, "--out", str(folder / "r5")], None, ["needs --teacher and --store"]),
        ("--out already holds another run", [*train_fresh, "--out", str(run)], run, ["already holds a run", "--overwrite"]),
        ("--resume without a run", ["train", "--out", str(folder / "r6"), "--resume"], None,
         ["config.json does not exist", "not a rapm run directory"]),
        ("resume on a store from another teacher", ["train", "--out", str(run), "--resume", "--set",
                                                    f"store={stores['other-teacher']}"], run, ["unet_hash", "another UNet"]),
        ("resume on a store with another N", ["train", "--out", str(run), "--resume", "--set", f"store={stores['n1']}"],
         run, ["state.json", "'steps'"]),
        ("resume with another batch size", ["train", "--out", str(run), "--resume", "--batch-size", "2"], run,
         ["state.json", "'batch_size'"]),
        ("resume with every checkpoint damaged", ["train", "--out", str(checkpoints_damaged()), "--resume"], None,
         ["no checkpoint can be read", "--overwrite"]),
        ("export of a run whose latest checkpoint is truncated", ["export", "--run", str(latest_damaged()), "--out",
                                                                   str(folder / "lora2")], None, ["state.safetensors", "sha256 does not match", "delete"]),
        ("train on a store with a truncated shard", [*train_fresh[:4], str(truncated_store), "--out", str(folder / "r7")],
         truncated_store, ["shard-00001.safetensors", "bytes but the manifest records"]),
        ("verify a store with a corrupted shard", ["trajectories", "--verify", str(flipped_store)], flipped_store,
         ["shard-00001.safetensors: sha256"]),
        ("rerun trajectories with other settings", ["trajectories", "--teacher", t, "--prompts", str(prompts), "--out",
                                                    str(stores["mine"]), "--steps", "2", "--substeps", "3",
                                                    "--shard-size", "2", "--batch-size", "2", "--no-progress"],
         stores["mine"], ["substeps is 2 in the store but 3", "--overwrite"]),
        ("trajectories into a folder that is not a store", ["trajectories", "--teacher", t, "--prompts", str(prompts),
                                                            "--out", str(not_a_store)], not_a_store, ["not empty"]),
        ("empty prompts file", ["trajectories", "--teacher", t, "--prompts", str(empty_prompts), "--out",
                                str(folder / "s1")], None, ["no prompts"]),
        ("LoRA from another base model", ["sample", "--teacher", "digits", "--lora", str(lora), "--prompt", "digit 3",
                                          "--out", str(folder / "x1")], lora, ["does not fit the teacher"]),
        ("file that is not a LoRA", ["sample", "--teacher", t, "--lora", str(not_a_lora), "--prompt", "a cat", "--out",
                                     str(folder / "x2")], None, [str(not_a_lora)]),
    ]
    cases = [(*case, None) for case in cases] + unsafe
    results = []
    for what, argv, keep, words, hold in cases:
        before = files_digest(keep, skip=(".rapm-lock",)) if keep else None
        if hold is not None:  # another writer holds the folder (this process, through the same flock)
            from rapm.folders import FolderLock

            lock = FolderLock(hold, "rapm trajectories" if (hold / "manifest.json").exists() else "rapm train").acquire()
        try:
            done = run_to_end(rapm_command(*argv), timeout=300)
        finally:
            if hold is not None:
                lock.release()
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        problems = []
        if done.returncode != 1:
            problems.append(f"exit {done.returncode}")
        if "Traceback" in done.stderr or not last.startswith("error: "):
            problems.append(f"not one error line: {done.stderr[-1500:]}")
        problems += [f"the error does not say {w!r}" for w in words if w not in last]
        if keep and files_digest(keep) != before:
            problems.append(f"{keep} changed")
        if pwned.exists():
            problems.append("a planted pickle ran")
        results.append({"input": what, "command": "rapm " + " ".join(argv), "error": last, "problems": problems})
    return results


class Planted:
    """What an attacker puts into a pickle: unpickling it runs code (here: it writes a file)."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        import builtins

        return builtins.exec, (f"open({self.target!r}, 'w').write('pwned')",)


def issue15_inputs(folder: Path, teacher: Path, run: Path, store: Path, prompts: Path, pwned: Path, copy) -> list:
    """Issue 15's reproductions: files that would run code, folders that are not rapm's, a second writer, tampered
    stores, inputs that used to end in a traceback. (what, argv, folder that must not change, words, folder held)."""
    import torch

    from rapm.run import load_checkpoint

    t = str(teacher)

    def planted_run(name: str) -> Path:
        r = copy(run, name)
        last = sorted((r / "checkpoints").glob("step-*"))[-1]
        state = {**load_checkpoint(last), "note": Planted(pwned)}
        for f in last.iterdir():
            f.unlink()
        torch.save(state, last / "state.pt")
        (last / "state.sha256").write_text(hashlib.sha256((last / "state.pt").read_bytes()).hexdigest() + "\n")
        return r

    def pickle_teacher() -> Path:
        d = folder / "pickle-teacher"
        shutil.copytree(teacher, d)
        for f in (d / "unet").glob("*.safetensors"):
            f.unlink()
        torch.save({"note": Planted(pwned)}, d / "unet" / "diffusion_pytorch_model.bin")
        return d

    def users_folder(name: str, manifest: bool = False) -> Path:
        d = folder / name
        (d / "checkpoints" / "step-500").mkdir(parents=True)
        (d / "checkpoints" / "step-500" / "model.safetensors").write_text("w")
        (d / ".notes.tmp").write_text("n")
        (d / "logs.jsonl").write_text('{"my":"log"}\n')
        if manifest:
            (d / "manifest.json").write_text('{"name": "my web app"}')
        return d

    def edited_store(name: str, edit, checksum: bool = True) -> Path:
        d = copy(store, name)
        edit_manifest(d, edit, checksum)
        return d

    def shard_store(name: str, edit) -> Path:
        d = copy(store, name)
        rewrite_shard(d, 0, edit)
        return d

    def huge_teacher() -> Path:
        d = folder / "huge-teacher"
        shutil.copytree(teacher, d)
        config = json.loads((d / "unet" / "config.json").read_text())
        (d / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 60000}))
        return d

    def nan(tensors):
        tensors["latents"][0, 0, 0, 0, 0] = float("nan")

    def train_on(s: Path, out: str) -> list[str]:
        return ["train", "--teacher", t, "--store", str(s), "--out", str(folder / out), "--no-progress"]

    held = copy(run, "run-held")
    mine = users_folder("users-folder")
    mine_manifest = users_folder("users-folder-manifest", manifest=True)
    resumed, exported = planted_run("run-planted-resume"), planted_run("run-planted-export")
    readonly = Path("/sys/rapm-faults")  # even root cannot create a folder there
    return [
        ("planted pickle in an old state.pt, on resume", ["train", "--out", str(resumed), "--resume"], resumed,
         ["state.pt", "could run code", "--trust-checkpoint"], None),
        ("planted pickle in an old state.pt, on export", ["export", "--run", str(exported), "--out", str(folder / "l3")],
         exported, ["state.pt", "could run code"], None),
        ("teacher whose UNet is a pickle .bin, on sample", ["sample", "--teacher", str(pickle_teacher()), "--prompt", "a cat",
                                                            "--out", str(folder / "x3")], None, ["pickle"], None),
        ("train --out a folder that is not a run", [*train_on(store, "users-folder")[:-3], "--out", str(mine)], mine,
         ["not a rapm run directory"], None),
        ("train --overwrite a folder that is not a run", [*train_on(store, "x")[:-3], "--out", str(mine), "--overwrite"],
         mine, ["not a rapm run directory", "deletes nothing"], None),
        ("train --overwrite a run with a mistyped --store", ["train", "--teacher", t, "--store", str(folder / "stroe"),
                                                             "--out", str(run), "--overwrite"], run, ["does not exist"], None),
        ("trajectories --overwrite a folder with a foreign manifest.json", [
            "trajectories", "--teacher", t, "--prompts", str(prompts), "--out", str(mine_manifest), "--overwrite"],
         mine_manifest, ["not a rapm trajectory store"], None),
        ("a second trainer on a run in use", ["train", "--out", str(held), "--resume"], held, ["is in use by", "pid"], held),
        ("a second trajectories writer on a store in use", [
            "trajectories", "--teacher", t, "--prompts", str(prompts), "--out", str(store), "--steps", "2", "--substeps",
            "2", "--shard-size", "2", "--batch-size", "2"], store, ["is in use by"], store),
        ("manifest edited without its checksum", train_on(edited_store("store-edited", lambda m: m.update(guidance=9.0),
                                                                       checksum=False), "r8"), None,
         ["manifest_sha256"], None),
        ("manifest timesteps ending in 0, checksum updated", train_on(
            edited_store("store-timesteps", lambda m: m.update(timesteps=[999, 499, 0])), "r9"), None, ["timesteps"], None),
        ("manifest count \"5\"", train_on(edited_store("store-count", lambda m: m.update(count="5")), "r10"), None,
         ["field 'count'"], None),
        ("manifest shards null", train_on(edited_store("store-shards", lambda m: m.update(shards=None)), "r11"), None,
         ["field 'shards'"], None),
        ("shard latents int16, sha256 updated", train_on(shard_store(
            "store-int16", lambda x: x.update(latents=x["latents"].to(torch.int16))), "r12"), None,
         ["tensor 'latents' is I16"], None),
        ("shard prompt embeddings of the wrong width", train_on(shard_store(
            "store-width", lambda x: x.update(prompt_embeds=x["prompt_embeds"][..., :-1].contiguous())), "r13"), None,
         ["tensor 'prompt_embeds'"], None),
        ("shard holding a NaN", train_on(shard_store("store-nan", nan), "r14"), None, ["NaN", "not the training"], None),
        ("--prompts /dev/zero", ["trajectories", "--teacher", t, "--prompts", "/dev/zero", "--out", str(folder / "s2")],
         None, ["is a device"], None),
        ("teacher sample_size 60000", ["trajectories", "--teacher", str(huge_teacher()), "--prompts", str(prompts),
                                       "--out", str(folder / "s3")], None, ["sample_size"], None),
        ("train --out in a read-only place", train_on(store, "x")[:-3] + ["--out", str(readonly / "run")], None,
         ["cannot be created"], None),
        ("export --out in a read-only place", ["export", "--run", str(run), "--out", str(readonly / "lora")], None,
         ["cannot be written"], None),
    ]


# --- every verb under every fault ----------------------------------------------------------------------------------------

VERBS = ("trajectories", "train", "export", "sample", "evaluate", "report")
RESUMABLE = ("trajectories", "train")  # a rerun of the same settings resumes; --overwrite replaces other settings
FAULTS = ("kill", "full disk", "read-only --out", "second writer", "link")
VOLATILE = {"seconds", "date", "training_started_at"}  # written anew by each run of the same command


def verb_inputs(teacher: Path, store: Path, folder: Path) -> dict:
    """What the verbs read: the store, two training configs (2 and 3 iterations), a 2-iteration run, its LoRA, a
    prompts file, two evaluations that differ."""
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "train.json"
    config_file.write_text(json.dumps({**TRAIN_CONFIG, "adv_weight": 0.0, "iterations": 2}))
    other_config = folder / "train-3.json"
    other_config.write_text(json.dumps({**TRAIN_CONFIG, "adv_weight": 0.0, "iterations": 3}))
    run, lora, prompts = folder / "run", folder / "lora", folder / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\n")
    inputs = {"teacher": str(teacher), "store": store, "configs": [config_file, other_config], "run": run,
              "lora": lora, "prompts": prompts, "trajectory_prompts": write_prompts(folder / "prompts-4.txt", 4),
              "evaluations": [folder / "evaluation-0.json", folder / "evaluation-1.json"]}
    steps = [train_argv(teacher, store, run, config_file), rapm_command("export", "--run", str(run), "--out", str(lora))]
    steps += [rapm_command("evaluate", "--teacher", str(teacher), "--prompts", str(prompts), "--num", "2", "--model",
                           f"rapm={lora}:1", "--reference-steps", str(2 + k), "--teacher-curve", "", "--out", str(e))
              for k, e in enumerate(inputs["evaluations"])]
    for argv in steps:
        done = run_to_end(argv)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr[-3000:]}")
    return inputs


def verb_argv(verb: str, inputs: dict, out: Path, earlier: bool = False, replace: bool = True) -> list[str]:
    """The verb writing ``out`` (after `rapm`); ``earlier``: other settings, so an earlier result's files differ.
    trajectories and train replace a result of other settings with --overwrite; ``replace=False``: their plain
    command, which resumes a result of the same settings (train with --resume once the run has its config)."""
    if verb == "trajectories":
        settings = {**TRAJECTORY_SETTINGS, "shard_size": 2, "substeps": 3 if earlier else 5}
        return trajectories_args(Path(inputs["teacher"]), inputs["trajectory_prompts"], out, settings, replace)
    if verb == "train":
        return train_args(Path(inputs["teacher"]), inputs["store"], out, inputs["configs"][1 if earlier else 0], replace)
    if verb == "sample":
        return ["sample", "--teacher", inputs["teacher"], "--lora", str(inputs["lora"]), "--prompt", "a cat",
                "--num-per-prompt", "2", "--steps", "1" if earlier else "2", "--out", str(out)]
    if verb == "evaluate":
        return ["evaluate", "--teacher", inputs["teacher"], "--prompts", str(inputs["prompts"]), "--num", "2",
                "--model", f"rapm={inputs['lora']}:1", "--reference-steps", "3" if earlier else "2",
                "--teacher-curve", "", "--out", str(out)]
    if verb == "report":
        return ["report", "--run", str(inputs["run"]), "--evaluation", str(inputs["evaluations"][0 if earlier else 1]),
                "--out", str(out)]
    return ["export", "--run", str(inputs["run"]), "--out", str(out), "--dtype", "float16" if earlier else "float32"]


def verb_out(verb: str, base: Path) -> Path:
    return {"trajectories": base / "store", "train": base / "run", "sample": base / "samples",
            "evaluate": base / "evaluation.json", "report": base / "report.html", "export": base / "lora"}[verb]


def verb_folders(verb: str, out: Path) -> list[Path]:
    """Where the verb's temp files and staging folders appear while it writes."""
    return [out.parent] + {"sample": [out], "trajectories": [out, out / "done"], "train": [out, out / "checkpoints"],
                           "report": [out.parent / "report_files"]}.get(verb, [])


def verb_finals(verb: str, out: Path) -> list[Path]:
    """The final files of the verb's result (what a reader opens), the commit point last."""
    if verb == "trajectories":
        return [out / n for n in ("shard-00000.safetensors", "shard-00001.safetensors", "negative.safetensors",
                                  "prompts.txt", "done/shard-00000.json", "done/shard-00001.json", "manifest.json")]
    if verb == "train":  # the 2-iteration run's; the 3-iteration one's checkpoint has another name
        state = out / "checkpoints" / "step-00000002"
        # state.sha256 is left out: it hashes state.json, which holds the start time; consistent() checks it
        return [state / "state.safetensors", state / "state.json", out / "logs.jsonl", out / "config.json"]
    if verb == "sample":
        return [out / "p0000_s0.png", out / "p0000_s1.png", out / "samples.jsonl"]
    if verb == "evaluate":
        return [out.with_suffix(".png"), out.with_suffix(".md"), out]
    if verb == "report":
        return [out.parent / "report_files" / "losses.png", out.parent / "report_files" / "samples.png",
                out.with_suffix(".md"), out]
    return [out / n for n in ("pytorch_lora_weights.safetensors", "kohya_lora.safetensors", "README.md", "rapm_lora.json")]


def result_content(path: Path):
    """What a reader gets from ``path`` (None: absent); raises for a file that is not whole (a truncated PNG,
    safetensors or JSON, a page without its end). Times of day are left out: two runs of one command agree."""
    import io

    if not path.exists():
        return None
    data = path.read_bytes()
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return hashlib.sha256(im.tobytes()).hexdigest()
    if path.suffix == ".safetensors":
        from safetensors.torch import load

        # Its header's keys come in hash-map order, so two equal files may differ in bytes: compare what a loader
        # reads, the metadata (the kohya dates are the checkpoint's, so they must agree) and the tensors.
        tensors = load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        meta = json.dumps(header.get("__metadata__", {}), sort_keys=True).encode()
        return hashlib.sha256(meta + b"".join(k.encode() + str(v.dtype).encode() + v.numpy().tobytes()
                                              for k, v in sorted(tensors.items()))).hexdigest()
    if path.suffix in (".json", ".jsonl"):
        def drop(x):
            if isinstance(x, dict):
                return {k: drop(v) for k, v in x.items() if k not in VOLATILE}
            return [drop(v) for v in x] if isinstance(x, list) else x

        value = ([drop(json.loads(line)) for line in data.decode().splitlines()] if path.suffix == ".jsonl"
                 else drop(json.loads(data)))
        return json.dumps(value, sort_keys=True)
    if path.suffix == ".html" and not data.rstrip().endswith(b"</html>"):
        raise ValueError(f"{path}: cut short")
    return hashlib.sha256(data).hexdigest()


def result_contents(verb: str, out: Path) -> dict:
    return {str(f): result_content(f) for f in verb_finals(verb, out)}


def verb_leftovers(verb: str, out: Path) -> list[str]:
    """Temp files, staging folders and locks left beside the result after a run that finished."""
    if verb in RESUMABLE:
        return [str(out / x) for x in leftovers(out)] if out.is_dir() else []
    folder = out if verb in ("sample", "export") else out.parent
    places = [folder, out.parent] + ([out.parent / "report_files"] if verb == "report" else [])
    return sorted({str(p) for d in places if d.is_dir() for p in d.iterdir()
                   if ".tmp" in p.name or ".partial-" in p.name or p.name.endswith(".rapm-lock")})


def one_error_line(done, *words: str) -> list[str]:
    """Problems with a failed run's stderr: exit 1, no traceback, one `error:` line (the last), holding ``words``."""
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("warning:")
             and "%|" not in line]
    errors = [line for line in lines if line.startswith("error: ")]
    problems = [] if done.returncode == 1 else [f"exit {done.returncode}"]
    if "Traceback" in done.stderr or len(errors) != 1 or lines[-1] != errors[0]:
        problems.append(f"not one error line: {done.stderr[-800:]}")
    return problems + [f"the error does not say {w!r}: {errors[0] if errors else ''}" for w in words
                       if not errors or w not in errors[0]]


def run_verb(verb: str, inputs: dict, out: Path, earlier: bool = False, replace: bool = True) -> subprocess.CompletedProcess:
    return run_to_end(rapm_command(*verb_argv(verb, inputs, out, earlier, replace)), timeout=300)


def consistent(verb: str, out: Path) -> list[str]:
    """What a reader or a resuming process would take as complete, checked (a store's done-records against their
    shards, a run's listed checkpoints loading): the partial result a fault leaves must be sound to resume from."""
    if verb == "trajectories":
        return store_problems(out)
    return run_problems(out, keep=3) if verb == "train" and out.is_dir() else []


class Cell:
    """One cell of the matrix: tries, survived (every check held), lost (a result damaged or half-written)."""

    def __init__(self, verb: str, fault: str):
        self.verb, self.fault, self.tries, self.survived, self.lost, self.problems = verb, fault, 0, 0, 0, []
        self.notes: list[str] = []

    def record(self, problems: list[str], lost: bool = False) -> None:
        self.tries += 1
        self.survived += not problems
        self.lost += lost
        self.problems += [f"try {self.tries}: {p}" for p in problems]

    def as_dict(self) -> dict:
        return {"verb": self.verb, "fault": self.fault, "tries": self.tries, "survived": self.survived,
                "lost": self.lost, "notes": self.notes, "problems": self.problems}


def _rerun_ok(verb: str, inputs: dict, out: Path, expected: dict | None, earlier: bool = False,
              replace: bool = True) -> list[str]:
    done = run_verb(verb, inputs, out, earlier, replace)
    if done.returncode != 0:
        return [f"the rerun failed: {done.stderr[-800:]}"]
    got = result_contents(verb, out)
    problems = [] if expected is None or got == expected else ["the rerun's result differs from an uninterrupted run's"]
    return problems + [f"left behind {x}" for x in verb_leftovers(verb, out)]


def _whole(verb: str, out: Path, allowed: list[dict] | None) -> list[str]:
    """Each final file absent, or whole and one of the ``allowed`` results' (the earlier one, the new one; None: any,
    for a store or run, whose partial files are sound when ``consistent`` finds nothing)."""
    problems = []
    for f in verb_finals(verb, out):
        try:
            got = result_content(f)
        except Exception as e:  # noqa: BLE001 - any reader's failure is a half-written file
            problems.append(f"{f}: not whole ({type(e).__name__}: {e})")
            continue
        if got is not None and allowed is not None and got not in [a.get(str(f)) for a in allowed]:
            problems.append(f"{f}: neither the earlier result's nor the new one's")
    return problems


def _kill_cell(verb: str, inputs: dict, folder: Path, kills: int, rng: random.Random) -> Cell:
    """SIGKILL the verb ``kills`` times: half at a random time of its run, half a random 0-60 ms after its first temp
    file (or staging folder) appears, which is inside its writes. The commands alternate between two settings, so
    each kill lands on the other setting's complete result: after it each file must be absent, the earlier one or
    the new one, whole (trajectories and train, which --overwrite the other setting's: whole, and what is taken as
    complete sound); then the same command rerun must give an uninterrupted run's result."""
    cell = Cell(verb, "kill")
    out = verb_out(verb, folder)
    references = {}
    for earlier in (False, True):  # uninterrupted results of both settings, at the same path
        began = time.perf_counter()
        done = run_verb(verb, inputs, out, earlier)
        if done.returncode != 0:
            raise RuntimeError(f"rapm {verb} failed: {done.stderr[-2000:]}")
        references[earlier] = (result_contents(verb, out), time.perf_counter() - began)
    watched = verb_folders(verb, out)
    modes = {"any": 0, "write": 0}
    for k in range(kills):
        earlier = k % 2 == 1  # the folder holds the other setting's result (the last reference run's: earlier=True)
        mode = ("any", "write")[(k // 2 + k) % 2]  # each setting killed both ways
        before = result_contents(verb, out)
        proc = subprocess.Popen(rapm_command(*verb_argv(verb, inputs, out, earlier)), env=environment(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if mode == "any":
            time.sleep(rng.uniform(0.2, 0.9 * references[earlier][1]))
        else:
            deadline = time.perf_counter() + 300
            while proc.poll() is None and time.perf_counter() < deadline and not any(
                    ".tmp" in p.name or ".partial-" in p.name for d in watched if d.is_dir() for p in d.iterdir()):
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.06))
        finished = proc.poll() is not None
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        modes[mode] += 1
        # a store or run killed while --overwrite replaced it holds the new settings' partial work, sound to resume
        allowed = None if verb in RESUMABLE else [before, references[earlier][0]]
        problems = _whole(verb, out, allowed) + consistent(verb, out)
        lost = bool(problems)
        problems += _rerun_ok(verb, inputs, out, references[earlier][0], earlier)
        if finished:
            cell.notes.append(f"try {k + 1} ({mode}) finished before its kill")
        cell.record(problems, lost)
    cell.notes.append(f"{modes['any']} at a random time of the run, {modes['write']} inside its writes")
    return cell


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _umount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True)


def _fill(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` but ``leave`` bytes (to the page)."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    os.truncate(filler, max(0, filler.stat().st_size - max(0, leave - free)))
    return filler


def _full_disk_cell(verb: str, inputs: dict, folder: Path, tries: int, rng: random.Random) -> Cell:
    """A real full disk: ``--out`` on a small tmpfs holding an earlier result, filled to a random number of bytes
    short of the new result's size; then space freed and the command rerun. trajectories and train start in an empty
    --out instead (--overwrite deletes the old result first, by design: two stores may not fit): the work they
    finished before the disk filled must be sound, and the rerun resumes it to an uninterrupted run's result."""
    cell = Cell(verb, "full disk")
    folder.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)):
        cell.notes.append("not run: mount -t tmpfs failed (needs root)")
        return cell
    try:
        out = verb_out(verb, folder)
        done = run_verb(verb, inputs, out)
        new = result_contents(verb, out)
        size = folder_bytes(folder)
        for k in range(tries):
            for p in list(folder.iterdir()):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            resumable = verb in RESUMABLE
            if not resumable and run_verb(verb, inputs, out, earlier=True).returncode != 0:
                raise RuntimeError(f"rapm {verb} failed on the tmpfs")
            earlier = result_contents(verb, out)
            leave = rng.randrange(0, max(1, size // 2))
            filler = _fill(folder, leave)
            done = run_verb(verb, inputs, out, replace=not resumable)
            problems = one_error_line(done, "No space left on device", "free space") if done.returncode else [
                f"it fitted in {leave} free bytes"]
            unsound = consistent(verb, out)
            intact = not unsound if resumable else result_contents(verb, out) == earlier
            problems += unsound if resumable else [] if intact else ["the earlier result changed"]
            filler.unlink()
            problems += _rerun_ok(verb, inputs, out, new, replace=not resumable)
            cell.record(problems, lost=not intact)
        cell.notes.append(f"a 64 MiB tmpfs left 0 to {size // 2:,} bytes free (the result: {size:,} bytes)")
    finally:
        _umount(folder)
    return cell


def _read_only_cell(verb: str, inputs: dict, folder: Path) -> Cell:
    """``--out``'s folder (holding an earlier result) made read-only by a read-only bind mount (root writes through
    file modes), or mode 0555 without root."""
    cell = Cell(verb, "read-only --out")
    out = verb_out(verb, folder)
    folder.mkdir(parents=True, exist_ok=True)
    run_verb(verb, inputs, out, earlier=True)
    earlier = result_contents(verb, out)
    mounted = os.geteuid() == 0 and _mount("--bind", str(folder), str(folder))
    if mounted and not _mount("-o", "remount,bind,ro", str(folder)):
        _umount(folder)
        cell.notes.append("not run: no read-only bind mount")
        return cell
    if not mounted:
        folder.chmod(0o555)
    try:
        done = run_verb(verb, inputs, out)
        problems = one_error_line(done, str(folder), "writable")
        intact = result_contents(verb, out) == earlier
    finally:
        _umount(folder) if mounted else folder.chmod(0o755)
    cell.notes.append("a read-only bind mount" if mounted else "mode 0555")
    cell.record(problems + ([] if intact else ["the earlier result changed"]) + _rerun_ok(verb, inputs, out, None),
                lost=not intact)
    return cell


def _second_writer_cell(verb: str, inputs: dict, folder: Path, tries: int, teacher: Path, store: Path) -> Cell:
    """Two processes with the same ``--out`` started together: each exits 0, or 1 with one error line saying who
    holds it; the result is whole (one run's). For export, also an export of a run that rapm train is writing."""
    cell = Cell(verb, "second writer")
    refused = 0
    for k in range(tries):
        base = folder / f"try-{k}"
        base.mkdir(parents=True)
        out = verb_out(verb, base)
        procs = [subprocess.Popen(rapm_command(*verb_argv(verb, inputs, out)), env=environment(), text=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
        problems = []
        codes = []
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            codes.append(proc.returncode)
            if proc.returncode:
                refused += 1
                problems += one_error_line(subprocess.CompletedProcess([], proc.returncode, "", err), "is in use by")
        if 0 not in codes:
            problems.append("neither writer finished")
        whole = _whole(verb, out, [result_contents(verb, out)]) + [
            f"{f}: missing" for f, v in result_contents(verb, out).items() if v is None]
        cell.record(problems + whole + [f"left behind {x}" for x in verb_leftovers(verb, out)], lost=bool(whole))
    cell.notes.append(f"{refused} of {tries} second writers refused (the others started after the first had finished)")
    if verb == "export":  # an export of a run being trained: reads its latest complete checkpoint
        base = folder / "while-training"
        base.mkdir()
        config_file = base / "train.json"
        config_file.write_text(json.dumps({**TRAIN_CONFIG, "adv_weight": 0.0, "iterations": 400, "keep_checkpoints": 1,
                                           "checkpoint_every": 1}))
        run = base / "run"
        trainer = subprocess.Popen(train_argv(teacher, store, run, config_file), env=environment(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and logged_lines(run) < 3:
            time.sleep(0.05)
        exports = []
        for k in range(2):
            done = run_to_end(rapm_command("export", "--run", str(run), "--out", str(base / f"lora-{k}")), timeout=300)
            problems = [] if done.returncode == 0 else one_error_line(done)
            if done.returncode == 0:
                problems += _whole("export", base / f"lora-{k}", [result_contents("export", base / f"lora-{k}")])
            exports.append(done.returncode)
            cell.record(problems)
        trainer.terminate()
        _, err = trainer.communicate(timeout=300)
        if trainer.returncode not in (0, 143):
            cell.problems.append(f"the training beside the exports ended {trainer.returncode}: {err[-800:]}")
        cell.notes.append(f"2 exports while rapm train wrote a checkpoint every iteration, keep 1: exit {exports}")
    return cell


def _link_cell(verb: str, inputs: dict, folder: Path) -> Cell:
    """``--out`` a link (to a folder of the user's for sample and export, to a file for evaluate and report), and a
    link where a file of the result goes (to the user's file): one error line naming the link, the target untouched;
    the link removed, the command succeeds."""
    cell = Cell(verb, "link")
    folder.mkdir(parents=True)
    target = folder / "mine"
    out = verb_out(verb, folder)
    if verb in ("trajectories", "train", "sample", "export"):
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        target.write_text("mine")
    out.symlink_to(target)
    before = files_digest(target) if target.is_dir() else target.read_bytes()
    done = run_verb(verb, inputs, out)
    problems = one_error_line(done, str(out), "link")
    untouched = (files_digest(target) if target.is_dir() else target.read_bytes()) == before
    out.unlink()
    cell.record(problems + ([] if untouched else ["wrote through the link"]) + _rerun_ok(verb, inputs, out, None),
                lost=not untouched)
    victim = folder / "victim.txt"
    victim.write_text("the user's own file")
    link = verb_finals(verb, out)[0]
    link.unlink()
    link.symlink_to(victim)
    done = run_verb(verb, inputs, out, earlier=True)
    problems = one_error_line(done, str(link), "link")
    untouched = victim.read_text() == "the user's own file" and link.is_symlink()
    link.unlink()
    cell.record(problems + ([] if untouched else ["wrote through or replaced the link"]) +
                _rerun_ok(verb, inputs, out, None, earlier=True), lost=not untouched)
    return cell


def verb_faults(teacher: Path, store: Path, folder: Path, kills: int, rng: random.Random, tries: int = 2,
                verbs=VERBS) -> list[dict]:
    """The matrix: each of ``verbs`` under each fault."""
    inputs = verb_inputs(teacher, store, folder / "inputs")
    cells = []
    for verb in verbs:
        print(f"rapm {verb}: {kills} kills, full disk, read-only, second writer, link", flush=True)
        base = folder / verb
        cells.append(_kill_cell(verb, inputs, base / "kill", kills, rng))
        cells.append(_full_disk_cell(verb, inputs, base / "full", tries, rng))
        cells.append(_read_only_cell(verb, inputs, base / "ro"))
        cells.append(_second_writer_cell(verb, inputs, base / "second", tries, teacher, store))
        cells.append(_link_cell(verb, inputs, base / "link"))
    return [c.as_dict() for c in cells]


def verbs_markdown(v: dict) -> list[str]:
    cells = {(c["verb"], c["fault"]): c for c in v["cells"]}
    lines = ["## Every verb under every fault", "",
             f"`{v['command']}` ({v['date']}; {v['machine']}; {v['seconds']} s). Tiny random SD pipeline; each verb "
             "a real process. Each cell: tries / survived / lost. Survived: every check held (a kill: each final file "
             "absent, the earlier result's or the new one's, whole, and the rerun gives an uninterrupted run's "
             "result; a fault: one `error:` line naming the path and the fix, exit 1, no traceback, the earlier result "
             "unchanged, and the rerun succeeds with nothing left behind). Lost: a result damaged or half-written. "
             "trajectories and train: a kill lands while --overwrite replaces the other setting's store or run, and "
             "after it every file must be whole and nothing incomplete taken as complete; a full disk starts from an "
             "empty --out (--overwrite deletes the old result first, as two stores may not fit) and the rerun "
             "resumes; their 50-kill runs are the table above.", "",
             "| verb | " + " | ".join(FAULTS) + " |", "| --- |" + " ---: |" * len(FAULTS)]
    if v.get("earlier"):
        e = v["earlier"]
        lines[2] += f" The rows of {', '.join(e['verbs'])} are from `{e['command']}` ({e['date']})."
    for verb in VERBS:
        row = []
        for fault in FAULTS:
            c = cells.get((verb, fault))
            row.append("—" if c is None or not c["tries"] else f"{c['tries']} / {c['survived']} / {c['lost']}")
        lines.append(f"| `rapm {verb}` | " + " | ".join(row) + " |")
    lines += ["", "How each fault was made: " + "; ".join(
        f"{c['verb']} {c['fault']}: {', '.join(c['notes'])}" for c in v["cells"] if c["notes"]) + ".", ""]
    problems = [f"{c['verb']} / {c['fault']}: {p}" for c in v["cells"] for p in c["problems"]]
    lines += [f"Problems: {len(problems)}" + ("" if not problems else ":"), ""]
    lines += [f"- {p[:400]}" for p in problems] + ([""] if problems else [])
    return lines


# --- the benchmark ------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-kills", type=int, default=50)
    parser.add_argument("--trajectory-kills", type=int, default=50)
    parser.add_argument("--verb-kills", type=int, default=3, help="kills of each verb in the matrix")
    parser.add_argument("--verb-tries", type=int, default=1, help="tries of the full disk and second-writer cells")
    parser.add_argument("--verbs", default=",".join(VERBS), help="which verbs of the matrix (with "
                        "--only-verbs, the other verbs' cells in faults.json are kept)")
    parser.add_argument("--only-verbs", action="store_true",
                        help="run only the verb x fault matrix; keep the rest of faults.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    os.environ.update({k: v for k, v in environment().items() if k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "PYTHONPATH")})
    import torch

    torch.set_num_threads(1)
    from tests.tiny import build_tiny_pipeline

    rng = random.Random(args.seed)
    began = time.perf_counter()
    machine = lambda: (f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread per process, load average "  # noqa: E731
                       f"{os.getloadavg()[0]:.1f} at the end")
    previous = args.out / "faults.json"
    result = json.loads(previous.read_text()) if args.only_verbs and previous.exists() else {}
    with tempfile.TemporaryDirectory(prefix="rapm-faults-") as tmp:
        tmp = Path(tmp)
        teacher = build_tiny_pipeline(tmp / "tiny-sd", family="sd")
        if args.only_verbs:
            store = tmp / "store"
            made = run_to_end(trajectories_argv(teacher, write_prompts(tmp / "prompts.txt", 4), store,
                                                {**TRAJECTORY_SETTINGS, "shard_size": 2}))
            if made.returncode != 0:
                raise RuntimeError(f"rapm trajectories failed: {made.stderr[-3000:]}")
        else:
            prompts = write_prompts(tmp / "prompts.txt", 12 * args.trajectory_kills)  # enough that every kill lands in work
            (tmp / "traj").mkdir()
            print(f"rapm trajectories: {args.trajectory_kills} kills", flush=True)
            traj = trajectories_faults(teacher, prompts, tmp / "traj", TRAJECTORY_SETTINGS, args.trajectory_kills, rng)
            store = tmp / "traj" / "straight"
            (tmp / "train").mkdir()
            print(f"rapm train: {args.train_kills} kills", flush=True)
            trained = train_faults(teacher, store, tmp / "train", iterations=6 * args.train_kills, kills=args.train_kills,
                                   rng=rng)
            print("bad inputs", flush=True)
            bad = bad_inputs(teacher, store, tmp / "bad")
        verbs_began = time.perf_counter()
        verbs_run = [v for v in VERBS if v in args.verbs.split(",")]
        cells = verb_faults(teacher, store, tmp / "verbs", args.verb_kills, rng, tries=args.verb_tries, verbs=verbs_run)
    seconds = time.perf_counter() - began
    verbs = {"command": f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/faults.py --verb-kills {args.verb_kills} "
                        f"--verb-tries {args.verb_tries} --seed {args.seed}" + (" --only-verbs" if args.only_verbs else ""),
             "date": time.strftime("%Y-%m-%d"), "machine": machine(),
             "seconds": round(time.perf_counter() - verbs_began), "cells": cells}
    kept = [c for c in result.get("verbs", {}).get("cells", []) if c["verb"] not in verbs_run]
    if kept:  # the other verbs' cells of an earlier run, which keep their command
        verbs["cells"] = sorted(kept + cells, key=lambda c: (VERBS.index(c["verb"]), FAULTS.index(c["fault"])))
        verbs["earlier"] = {"command": result["verbs"]["command"], "date": result["verbs"]["date"],
                            "verbs": sorted({c["verb"] for c in kept})}
        verbs["command"] += f" --verbs {args.verbs}"
    if not args.only_verbs:
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "command": f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/faults.py --train-kills {args.train_kills} "
                       f"--trajectory-kills {args.trajectory_kills} --verb-kills {args.verb_kills} --seed {args.seed}",
            "machine": machine(), "seconds": round(seconds),
            "trajectories": traj, "train": trained,
            "bad_inputs": {"tried": len(bad), "clear": sum(not b["problems"] for b in bad), "cases": bad},
        }
    result["verbs"] = verbs
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "faults.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    t, tr, b = r["trajectories"], r["train"], r["bad_inputs"]

    def modes(kills):
        return ", ".join(f"{sum(k['mode'] == m for k in kills)} {m}" for m in ("start-up", "work"))

    lines = [
        "# Faults: kills and bad inputs", "",
        f"`{r['command']}` ({r['date']}; {r['machine']}; {r['seconds']} s). Tiny random SD pipeline; each verb a real "
        "process killed with SIGKILL at a random moment (during start-up, or a random time after its k-th new "
        "iteration or shard), checked, and rerun until done; compared with an uninterrupted process.", "",
        "| verb | kills survived | runs | work | lost | checked after every kill | end result |",
        "| --- | ---: | ---: | --- | ---: | --- | --- |",
        f"| `rapm trajectories` | {t['survived']} of {t['kills']} ({modes(t['kill_log'])}) | {t['runs']} | {t['trajectories']} "
        f"trajectories, 1 a shard; {t['shards_redone']} shards recomputed after kills | {t['trajectories_lost']} trajectories | "
        f"every shard with a done-record matches its sha256 | store {'byte-identical' if t['byte_identical'] else 'DIFFERS'} "
        f"({t['store_bytes']:,} bytes; at most {t['max_bytes_while_killed']:,} on disk while killed) |",
        f"| `rapm train` | {tr['survived']} of {tr['kills']} ({modes(tr['kill_log'])}) | {tr['runs']} | {tr['iterations']} "
        f"iterations, checkpoint every 2, keep 2; {tr['iterations_redone']} iterations redone after kills | "
        f"{tr['runs_lost']} runs | every listed checkpoint loads (sha256) and is finite; checkpoints/ holds at most "
        f"keep + 1 entries | losses {'equal' if tr['losses_equal'] else 'DIFFER'}, final weights "
        f"{'equal' if not tr['problems'] else 'see problems'}; run {tr['run_bytes']:,} bytes (at most "
        f"{tr['max_bytes_while_killed']:,} while killed); no temp file left |", "",
        f"Bad inputs: {b['clear']} of {b['tried']} gave one `error:` line naming the file or field and the fix, exit 1, "
        "no traceback, and left the run or store they touched unchanged.", "",
        "| bad input | error (first 150 characters) | ok |", "| --- | --- | --- |",
    ]
    for c in b["cases"]:
        text = c["error"][:150].replace("|", "\\|")
        lines.append(f"| {c['input']} | {text} | {'yes' if not c['problems'] else '; '.join(c['problems'])[:200]} |")
    problems = t["problems"] + tr["problems"]
    lines += ["", f"Problems: {len(problems)}" + ("" if not problems else ": " + "; ".join(problems)[:2000]), ""]
    if "verbs" in r:
        lines += verbs_markdown(r["verbs"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
