"""Teacher trajectories: what is stored is the teacher's own DDIM from the pipeline's noise; the store resumes, refuses and verifies."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

import rapm.trajectories as trajectories
from rapm.families import BUILTIN_TEACHERS
from rapm.store import StoreError, TrajectoryBatch, open_store
from rapm.teacher import load_teacher
from rapm.trajectories import TruncatedPromptWarning, initial_noise, write_trajectories

PROMPTS = ["a photo of a cat", "a red car", "a blue dog", "a photo of a dog", "a cat"]
SETTINGS = dict(steps=4, substeps=5, seed=7, batch_size=2, shard_size=2, progress=False)  # N*M = 20 divides 1000


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Results depend on the thread count; the multi-process comparison runs one thread per process.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_prompts(path: Path, prompts) -> Path:
    path.write_text("".join(p + "\n" for p in prompts))
    return path


def files_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def pipeline_positions(pipe, prompt, seed, total_steps, guidance, every, **kwargs) -> list[torch.Tensor]:
    """The latents diffusers' DDIM (trailing) passes through: the initial noise, then every ``every`` steps."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    seen = []

    def keep(pipe, i, t, kw):
        seen.append(kw["latents"].clone())
        return kw

    out = pipe(prompt, num_inference_steps=total_steps, guidance_scale=guidance, output_type="latent",
               generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=keep, **kwargs).images
    assert torch.equal(seen[-1], out)
    z_n = torch.randn(out.shape, generator=torch.Generator("cpu").manual_seed(seed))
    return [z_n] + seen[every - 1 :: every]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.txt", PROMPTS)


@pytest.fixture(scope="module")
def sd_store(tiny_sd, prompts_file, tmp_path_factory):
    """5 trajectories in 3 shards (2, 2, 1), stored in float16."""
    return write_trajectories(tiny_sd, prompts_file, tmp_path_factory.mktemp("stores") / "sd", **SETTINGS)


@pytest.fixture
def store_copy(sd_store, tmp_path):
    folder = tmp_path / "store"
    shutil.copytree(sd_store.path, folder)
    return folder


# --- what is stored ---------------------------------------------------------------------------------------------------

def test_stored_positions_are_the_pipelines_ddim_positions_from_the_same_seed(tiny_sd, sd_store, tmp_path):
    """float32 storage matches diffusers' own DDIM (trailing, N*M steps) to float precision; float16 to its rounding."""
    exact = write_trajectories(tiny_sd, write_prompts(tmp_path / "p.txt", PROMPTS[:2]), tmp_path / "f32",
                               **{**SETTINGS, "dtype": "float32"})
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    for i in range(2):
        ref = torch.cat(pipeline_positions(pipe, PROMPTS[i], seed=7 + i, total_steps=20, guidance=7.5, every=5))
        assert torch.equal(exact.get([i]).latents[0, 0], ref[0])  # z_N is the pipeline's noise for seed 7+i, bit for bit
        torch.testing.assert_close(exact.get([i]).latents[0], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sd_store.get([i]).latents[0], ref, rtol=2e-3, atol=2e-3)
    assert exact.guidance == 7.5 and exact.timesteps == [999, 749, 499, 249, -1]


def test_sdxl_store_holds_pooled_embeddings_and_time_ids(tiny_sdxl, tmp_path):
    store = write_trajectories(tiny_sdxl, write_prompts(tmp_path / "p.txt", ["a photo of a dog"]), tmp_path / "xl",
                               steps=2, substeps=2, seed=3, progress=False)
    assert store.guidance == 5.0 and store.manifest["negative_prompt"] is None
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt("a photo of a dog", device="cpu")
    batch = store.get([0])
    torch.testing.assert_close(batch.cond.prompt_embeds, embeds.half().float())
    torch.testing.assert_close(batch.cond.pooled_embeds, pooled.half().float())
    assert batch.cond.time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]
    assert torch.equal(batch.uncond.prompt_embeds, neg) and torch.equal(batch.uncond.pooled_embeds, neg_pooled)  # zeros
    assert torch.equal(batch.uncond.time_ids, batch.cond.time_ids)
    shard = load_file(store.path / "shard-00000.safetensors")
    assert set(shard) == {"latents", "delta_latents", "prompt_embeds", "pooled_embeds", "time_ids", "seeds"}
    assert shard["pooled_embeds"].dtype == torch.float16 and shard["time_ids"].dtype == torch.float32
    ref = pipeline_positions(pipe, "a photo of a dog", seed=3, total_steps=4, guidance=5.0, every=2)
    torch.testing.assert_close(batch.latents[0], torch.cat(ref), rtol=2e-3, atol=2e-3)


def test_batch_size_changes_the_result_only_within_float_tolerance(tiny_sd, tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:3])
    common = dict(steps=2, substeps=2, dtype="float32", progress=False)
    one = write_trajectories(tiny_sd, prompts, tmp_path / "b1", batch_size=1, **common)
    three = write_trajectories(tiny_sd, prompts, tmp_path / "b3", batch_size=3, **common)
    torch.testing.assert_close(one.get([0, 1, 2]).latents, three.get([0, 1, 2]).latents, rtol=1e-4, atol=5e-4)  # CFG 7.5 scales float noise


def test_get_returns_what_was_written(tiny_sd, sd_store):
    batch = sd_store.get([3, 0, 4])  # across shards, in the order asked
    assert isinstance(batch, TrajectoryBatch) and len(sd_store) == 5
    assert batch.indices == [3, 0, 4] and batch.seeds == [10, 7, 11]
    assert batch.prompts == [PROMPTS[3], PROMPTS[0], PROMPTS[4]] and sd_store.prompts == PROMPTS
    assert batch.latents.dtype == torch.float32 and batch.latents.shape == (3, 5, 4, 8, 8)
    assert torch.equal(batch.latents[:, 0], initial_noise([10, 7, 11], (4, 8, 8)).half().float())
    shard = load_file(sd_store.path / "shard-00001.safetensors")
    assert torch.equal(batch.latents[0], shard["latents"][1].float())
    teacher = load_teacher(tiny_sd)
    cond, uncond = teacher.encode_prompts([PROMPTS[3], PROMPTS[0], PROMPTS[4]])
    assert torch.equal(batch.cond.prompt_embeds, cond.prompt_embeds.half().float())
    assert torch.equal(batch.uncond.prompt_embeds, uncond.prompt_embeds.half().float())  # the "" prompt, stored once
    assert batch.cond.pooled_embeds is None and batch.uncond.prompt_embeds.shape == (3, 16, 32)
    assert (sd_store.steps, sd_store.substeps, sd_store.latent_shape) == (4, 5, (4, 8, 8))
    small_cache = open_store(sd_store.path, cache_shards=1)  # random access with one open shard at a time
    for i in [4, 0, 3, 1, 2, 0]:
        assert torch.equal(small_cache.get([i]).latents, sd_store.get(i).latents)
    with pytest.raises(IndexError):
        sd_store.get([5])
    assert torch.equal(pickle.loads(pickle.dumps(sd_store)).get([1]).latents, sd_store.get([1]).latents)  # DataLoader workers


# --- resume and process layout ----------------------------------------------------------------------------------------

def test_resume_after_an_interrupted_run_is_byte_identical(tiny_sd, prompts_file, sd_store, tmp_path, monkeypatch):
    real_write, written = trajectories.write_shard, []

    def killed_while_writing_the_second_shard(out, k, tensors, metadata):
        if written:
            (out / f".shard-{k:05d}.safetensors.999.tmp").write_bytes(b"partial")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        written.append(k)
        return real_write(out, k, tensors, metadata)

    monkeypatch.setattr(trajectories, "write_shard", killed_while_writing_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        write_trajectories(tiny_sd, prompts_file, tmp_path / "store", **SETTINGS)
    with pytest.raises(StoreError, match="incomplete.*rerun the same"):
        open_store(tmp_path / "store")

    recomputed = []
    monkeypatch.setattr(trajectories, "write_shard", lambda out, k, *a: recomputed.append(k) or real_write(out, k, *a))
    write_trajectories(tiny_sd, prompts_file, tmp_path / "store", **SETTINGS)
    assert recomputed == [1, 2]  # the complete shard 0 was skipped
    assert files_digest(tmp_path / "store") == files_digest(sd_store.path)  # no temp file left, every byte the same

    recomputed.clear()
    write_trajectories(tiny_sd, prompts_file, tmp_path / "store", **SETTINGS)  # a complete store: nothing to do
    assert recomputed == []


def test_two_processes_write_the_same_shards_as_one(tiny_sd, prompts_file, sd_store, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU): shard k is written by process k % 2; every byte equals the 1-process run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    def args(out):
        return (["-m", "rapm", "trajectories", "--teacher", str(tiny_sd), "--prompts", str(prompts_file), "--out", str(out),
                 "--no-progress"] + [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items() if k != "progress"])

    # Both runs in fresh processes, so both use the same CPU kernels (the test process turns oneDNN off).
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *args(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert files_digest(tmp_path / "two") == files_digest(tmp_path / "one")
    assert set(files_digest(tmp_path / "one")) == set(files_digest(sd_store.path))


# --- refusals: each names the field, and nothing already written changes ------------------------------------------------

@pytest.mark.parametrize("change,field", [
    (dict(guidance=5.0), "guidance"), (dict(steps=2), "steps"), (dict(substeps=3), "substeps"), (dict(seed=8), "seed"),
    (dict(negative_prompt="dog"), "negative_prompt"), (dict(dtype="float32"), "dtype"), (dict(shard_size=3), "shard_size"),
    (dict(prompts=["a photo of a cat", "a red dog", "a blue dog", "a photo of a dog", "a cat"]), "prompts.*line 2"),
    (dict(teacher="other"), "teacher.unet_hash"), (dict(teacher="sdxl"), "teacher.family"),
])
def test_a_rerun_with_other_settings_refuses_and_leaves_the_store_untouched(
        change, field, tiny_sd, tiny_sdxl, other_sd, prompts_file, store_copy, tmp_path):
    change = dict(change)
    teacher = {"other": other_sd, "sdxl": tiny_sdxl}.get(change.pop("teacher", None), tiny_sd)
    prompts = write_prompts(tmp_path / "p.txt", change.pop("prompts")) if "prompts" in change else prompts_file
    before = files_digest(store_copy)
    with pytest.raises(StoreError, match=rf"manifest.json: {field}.*--overwrite"):
        write_trajectories(teacher, prompts, store_copy, **{**SETTINGS, **change})
    assert files_digest(store_copy) == before


def test_overwrite_replaces_a_store_with_other_settings(tiny_sd, prompts_file, store_copy):
    store = write_trajectories(tiny_sd, prompts_file, store_copy, overwrite=True, **{**SETTINGS, "guidance": 1.0, "substeps": 2})
    assert store.guidance == 1.0 and store.substeps == 2 and len(store) == 5


def test_a_folder_that_is_not_a_store_is_refused(tiny_sd, prompts_file, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and is not a rapm trajectory store"):
        write_trajectories(tiny_sd, prompts_file, tmp_path, **SETTINGS)


@pytest.mark.parametrize("content,message", [
    (b"", "no prompts"), (b"\n  \n", "no prompts"), (b"\xff\xfe a cat\n", "not UTF-8"), (None, "does not exist"), ("dir", "is a folder"),
])
def test_bad_prompts_files_are_refused_before_anything_is_written(content, message, tiny_sd, store_copy, tmp_path):
    prompts = tmp_path / "prompts.txt"
    if content == "dir":
        prompts.mkdir()
    elif content is not None:
        prompts.write_bytes(content)
    before = files_digest(store_copy)
    with pytest.raises(StoreError, match=message):
        write_trajectories(tiny_sd, prompts, store_copy, **SETTINGS)
    assert files_digest(store_copy) == before


def test_a_bom_is_not_part_of_the_first_prompt_and_lines_end_only_at_newlines(tmp_path):
    from rapm.trajectories import read_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffa photo of a cat\r\na red\u2028car\x85\n\n  a blue dog \x0c\x1c b\n".encode("utf-8"))
    assert read_prompts(prompts) == ["a photo of a cat", "a red\u2028car", "a blue dog \x0c\x1c b"]


def test_steps_that_do_not_divide_the_schedule_warn_and_substeps_1_is_refused(tiny_sd, prompts_file, tmp_path):
    from typer.testing import CliRunner

    from rapm.cli import app
    from rapm.trajectories import StepsWarning

    with pytest.warns(StepsWarning, match=r"--steps 3 does not divide the teacher's 1000 .*\[999, 666, 332\].*t - 333"):
        write_trajectories(tiny_sd, prompts_file, tmp_path / "n3", steps=3, substeps=2, shard_size=5, progress=False)
    from rapm.config import TrainConfig, apply_overrides
    from rapm.train import train

    config = apply_overrides(TrainConfig(), {"teacher": str(tiny_sd), "store": str(tmp_path / "n3"), "iterations": 1,
                                             "sample_every": 0, "eval_every": 0, "device": "cpu"}, "test")
    with pytest.warns(StepsWarning, match=r"n3/manifest.json: the store's N = 3 \(rapm trajectories --steps\) does "
                                          r"not divide the teacher's 1000 .*t - 333"):
        train(config, tmp_path / "run3", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepsWarning)  # N = 4 divides 1000: no warning
        write_trajectories(tiny_sd, prompts_file, tmp_path / "n4", steps=4, substeps=2, shard_size=5, progress=False)
    result = CliRunner().invoke(app, ["trajectories", "--teacher", str(tiny_sd), "--prompts", str(prompts_file),
                                      "--out", str(tmp_path / "m1"), "--substeps", "1", "--no-progress"])
    assert "--substeps 1" in str(result.exception) and "--substeps 2 or more" in str(result.exception)
    assert not (tmp_path / "m1").exists()


def test_train_names_the_stores_substeps_and_the_fix_when_delta_fills_a_slot(tiny_sd, prompts_file, tmp_path):
    from rapm.config import ConfigError, TrainConfig, apply_overrides
    from rapm.train import train

    store = write_trajectories(tiny_sd, prompts_file, tmp_path / "store", steps=4, substeps=2, shard_size=5, progress=False)
    manifest = json.loads((store.path / "manifest.json").read_text())
    for key in ("delta", "solver", "manifest_sha256"):  # as an older rapm wrote it (format 1): no stored Δ, so train takes T / (N M)
        manifest.pop(key, None)
    (store.path / "manifest.json").write_text(json.dumps({**manifest, "substeps": 1, "format_version": 1}))
    config = apply_overrides(TrainConfig(), {"teacher": str(tiny_sd), "store": str(store.path), "iterations": 1}, "test")
    with pytest.raises(ConfigError, match=r"manifest.json: Δ = 250 timesteps \(the default.*M = 1\).*shortest slot \(250 "
                                          r"timesteps; substeps M = 1\).*--substeps 2 or more.*--set delta=125"):
        train(config, tmp_path / "run", progress=False)


def test_long_prompts_are_truncated_as_diffusers_does_with_a_warning(tiny_sd, tmp_path):
    long = "a photo of a red cat and a blue dog and a car"  # more than the tiny tokenizer's 16 tokens
    with pytest.warns(TruncatedPromptWarning, match="1 of 2 prompts is longer than the tokenizer's 16 tokens"):
        store = write_trajectories(tiny_sd, write_prompts(tmp_path / "p.txt", ["a cat", long]), tmp_path / "s",
                                   steps=1, substeps=2, progress=False)
    assert store.manifest["truncated_prompts"] == [1] and store.prompts[1] == long
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    embeds, _ = pipe.encode_prompt(long, "cpu", 1, False)
    torch.testing.assert_close(store.get([1]).cond.prompt_embeds, embeds.half().float())


# --- the reader's checks ----------------------------------------------------------------------------------------------

def test_missing_store_or_manifest_is_named(tmp_path):
    with pytest.raises(StoreError, match="does not exist.*rapm trajectories"):
        open_store(tmp_path / "nowhere")
    with pytest.raises(StoreError, match=r"manifest.json is missing.*rapm trajectories"):
        open_store(tmp_path)


def test_a_truncated_shard_is_caught_on_open(store_copy):
    shard = store_copy / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreError, match=r"shard-00001.safetensors: \d+ bytes but the manifest records \d+.*rerun"):
        open_store(store_copy)


def test_a_corrupted_shard_is_caught_by_verify_and_when_its_load_fails(store_copy):
    shard = store_copy / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: same size, only a re-hash sees it
    shard.write_bytes(bytes(data))
    store = open_store(store_copy)  # the fast check passes
    with pytest.raises(StoreError, match=r"shard-00002.safetensors: sha256 .*1 of 3 shards corrupted"):
        open_store(store_copy, verify=True)
    data[12] = ord("#")  # inside the JSON header: the shard no longer loads
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard-00002.safetensors: cannot be read .*sha256 does not match"):
        store.get([4])


def test_check_teacher_names_the_mismatch(tiny_sd, tiny_sdxl, other_sd, sd_store, tmp_path):
    teacher = load_teacher(tiny_sd, text_encoders=False)
    sd_store.check_teacher(teacher, steps=4)
    sd_store.check_teacher(tiny_sd)  # a path works too, without loading the weights
    with pytest.raises(StoreError, match="steps N=4 in the store, but 2"):
        sd_store.check_teacher(teacher, steps=2)
    with pytest.raises(StoreError, match="teacher unet_hash .* another UNet"):
        sd_store.check_teacher(other_sd)
    with pytest.raises(StoreError, match="teacher family 'sd'"):
        sd_store.check_teacher(tiny_sdxl)
    edited = tmp_path / "edited"
    shutil.copytree(tiny_sd, edited)
    for sub, file, key, value in [("scheduler", "scheduler_config.json", "prediction_type", "v_prediction"),
                                  ("unet", "config.json", "sample_size", 4)]:
        cfg = json.loads((edited / sub / file).read_text())
        (edited / sub / file).write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(StoreError, match=r"latent shape \(4, 8, 8\) does not match .* \(4, 4, 4\)"):
        sd_store.check_teacher(edited)
    shutil.copy(tiny_sd / "unet" / "config.json", edited / "unet" / "config.json")
    with pytest.raises(StoreError, match="scheduler prediction_type 'epsilon' vs 'v_prediction'"):
        sd_store.check_teacher(edited)


def test_cli_verify_and_its_one_line_error(sd_store, store_copy):
    from typer.testing import CliRunner

    from rapm.cli import app

    ok = CliRunner().invoke(app, ["trajectories", "--verify", str(sd_store.path)])
    assert ok.exit_code == 0 and "5 trajectories in 3 shards; every sha256 matches" in ok.output
    shard = store_copy / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    bad = CliRunner().invoke(app, ["trajectories", "--verify", str(store_copy)])
    assert isinstance(bad.exception, StoreError) and "shard-00000.safetensors: sha256" in str(bad.exception)
    missing = CliRunner().invoke(app, ["trajectories", "--teacher", "digits"])
    assert "needs --prompts, --out" in str(missing.exception)


@pytest.mark.skipif(not (BUILTIN_TEACHERS["digits"] / "model_index.json").exists(), reason="the digits teacher is not built yet")
def test_digits_teacher_trajectories(tmp_path):
    store = write_trajectories("digits", write_prompts(tmp_path / "p.txt", ["digit 3", "the number seven"]), tmp_path / "d",
                               steps=2, substeps=2, progress=False)
    assert store.manifest["teacher"]["path"] == "digits" and store.latent_shape[0] == 1
    try:
        from rapm.demo import DIGITS_GUIDANCE
    except ImportError:
        DIGITS_GUIDANCE = trajectories.FALLBACK_DIGITS_GUIDANCE
    assert store.guidance == DIGITS_GUIDANCE
    store.check_teacher("digits", steps=2)


def test_counts_in_messages_take_the_right_number(tiny_sd, tmp_path):
    """Issue 31: "1 shards", "1 grids"."""
    from typer.testing import CliRunner

    from rapm.cli import app
    from rapm.text import plural

    assert (plural(1, "shard"), plural(2, "shard"), plural(0, "grid")) == ("1 shard", "2 shards", "0 grids")
    assert plural(1, "trajectory", "trajectories") == "1 trajectory" and plural(3, "trajectory", "trajectories") == "3 trajectories"
    write_trajectories(tiny_sd, write_prompts(tmp_path / "p.txt", ["a cat", "a dog"]), tmp_path / "s", steps=1,
                       substeps=2, shard_size=2, progress=False)
    result = CliRunner().invoke(app, ["trajectories", "--verify", str(tmp_path / "s")])
    assert result.exit_code == 0 and "2 trajectories in 1 shard; every sha256 matches" in result.output, result.output
