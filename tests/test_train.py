"""rapm train: the alternation, the run directory, checkpoints and resume."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from rapm.config import ConfigError, TrainConfig, apply_overrides
from rapm.roles import STUDENT
from rapm.run import RunError, checkpoints, load_checkpoint, load_student
from rapm.stream import batch_indices, batch_positions
from rapm.train import train

# Both discriminators on: D1 needs the relative terms, which the default recipe leaves out (relative weight 0).
SMALL = dict(adv_weight=0.1, relative_weight=0.25, lora_rank=4, lora_alpha=4, disc_lora_rank=2, disc_lora_alpha=2, disc_heads_per_level=1, lr=1e-3,
             disc_lr=1e-3, sample_every=0, batch_size=1, keep_checkpoints=2)


def _config(tiny_sd, sd_store, **kw) -> TrainConfig:
    return apply_overrides(TrainConfig(), {"teacher": str(tiny_sd), "store": str(sd_store), **SMALL, **kw}, "test")


def _log(run):
    return [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]


def _losses(run):
    return [(e["step"], e["phase"], e["loss"]) for e in _log(run)]


def test_alternation_updates_only_the_intended_parameters(tiny_sd, sd_store, tmp_path):
    run = tmp_path / "run"
    train(_config(tiny_sd, sd_store, iterations=1, checkpoint_every=1, method="rapm-paper"), run, progress=False)
    after_d = load_checkpoint(checkpoints(run)[-1])
    train(_config(tiny_sd, sd_store, iterations=2, checkpoint_every=1, method="rapm-paper"), run, resume=True,
          progress=False)
    after_s = load_checkpoint(checkpoints(run)[-1])
    phases = [e["phase"] for e in _log(run)]
    assert phases == ["discriminator", "student"]  # Alg. 2: even iterations D, odd the student
    # Step 0 (D): the student is still zero-initialised in B, its A untouched; the discriminator moved.
    _, unet, _ = load_student(run)
    changed_s = [n for n in after_s["student"] if not torch.equal(after_s["student"][n], after_d["student"][n])]
    changed_d = [n for n in after_s["discriminator"] if not torch.equal(after_s["discriminator"][n], after_d["discriminator"][n])]
    assert changed_s and not changed_d
    assert all(torch.count_nonzero(v) == 0 for n, v in after_d["student"].items() if "lora_B" in n)
    assert any(torch.count_nonzero(v) > 0 for n, v in after_s["student"].items() if "lora_B" in n)
    assert unet is not None


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny_sd, sd_store, tmp_path):
    config = _config(tiny_sd, sd_store, iterations=6, checkpoint_every=2, ema_decay=0.9)
    straight = tmp_path / "straight"
    train(config, straight, progress=False)
    interrupted = tmp_path / "interrupted"
    result = train(config, interrupted, progress=False, stop_after=3)  # stops as a preemption would, with a checkpoint
    assert result.step == 3 and result.checkpoint.name == "step-00000003"
    train(config, interrupted, resume=True, progress=False)
    a, b = _losses(straight), _losses(interrupted)
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 6
    for (_, _, la), (_, _, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-7)
    end_a, end_b = load_checkpoint(checkpoints(straight)[-1]), load_checkpoint(checkpoints(interrupted)[-1])
    for n in end_a["ema"]:
        torch.testing.assert_close(end_a["ema"][n], end_b["ema"][n])
    assert len(checkpoints(straight)) == 2  # rotated: keep_checkpoints=2


def test_a_run_directory_is_not_overwritten_by_accident(tiny_sd, sd_store, tmp_path):
    run = tmp_path / "run"
    config = _config(tiny_sd, sd_store, iterations=1, checkpoint_every=1)
    train(config, run, progress=False)
    before = (run / "logs.jsonl").read_text()
    with pytest.raises(RunError, match="already holds a run.*--resume.*--overwrite"):
        train(config, run, progress=False)
    assert (run / "logs.jsonl").read_text() == before
    train(config, run, overwrite=True, progress=False)
    assert len(_log(run)) == 1


def test_resume_without_a_run_says_so(tiny_sd, sd_store, tmp_path):
    with pytest.raises(RunError, match="no run to resume"):
        train(_config(tiny_sd, sd_store), tmp_path / "empty", resume=True, progress=False)


def test_bad_config_values_name_the_field():
    with pytest.raises(ConfigError, match="'lora_rank' must be int"):
        apply_overrides(TrainConfig(), {"lora_rank": "many"}, "my.toml")
    with pytest.raises(ConfigError, match="my.toml: unknown field 'lora_rnk'"):
        apply_overrides(TrainConfig(), {"lora_rnk": 4}, "my.toml")


def test_data_order_is_a_function_of_the_step():
    seen = [i for k in range(5) for i in batch_indices(batch_positions(k, 2), 10, seed=3)]
    assert sorted(seen) == list(range(10))  # one epoch visits every trajectory once
    # Two processes with batch 1 see what one process with batch 2 sees, step by step.
    assert batch_positions(3, 1, rank=0, world=2) + batch_positions(3, 1, rank=1, world=2) == batch_positions(3, 2)


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(tiny_sd, sd_store, tmp_path):
    run = tmp_path / "run"
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**SMALL, "iterations": 100000, "checkpoint_every": 100000}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rapm", "train", "--teacher", str(tiny_sd), "--store", str(sd_store), "--out", str(run),
         "--config", str(config_file), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = run / "logs.jsonl"
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Resume with: rapm train --out" in err and "Traceback" not in err
    (last,) = checkpoints(run)[-1:]
    assert load_checkpoint(last)["step"] == len(_log(run))


def test_export_of_a_trained_run_loads_in_diffusers(tiny_sd, sd_store, tmp_path):
    """rapm train, then rapm export: the LoRA gives the trained student's samples in a diffusers pipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from rapm.export import export_lora
    from rapm.sample import generate

    run = tmp_path / "run"
    train(_config(tiny_sd, sd_store, iterations=2, checkpoint_every=2), run, progress=False)
    teacher, unet, facts = load_student(run, text_encoders=True)
    assert facts["steps"] == 2 and facts["step"] == 2
    export_lora(unet, str(tiny_sd), teacher.family, tmp_path / "lora", facts["steps"])
    ours = generate(teacher, ["a red car"], [5], steps=2)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.load_lora_weights(tmp_path / "lora")
    theirs = pipe("a red car", num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(5)).images
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4 * ours.abs().max().item())


def test_training_samples_spread_over_the_stores_prompts():
    from rapm.monitor import sample_indices

    digit_major = [f"digit {d} phrasing {k}" for d in range(10) for k in range(5)] * 2  # the demo's store order
    picked = sample_indices(digit_major, 8)
    assert len({digit_major[i].split()[1] for i in picked}) == 8 and len(set(picked)) == 8
    assert sample_indices(["a", "a", "b"], 3) == [0, 1, 2]  # fewer prompts than samples: every one, then repeats


def test_a_run_whose_store_was_deleted_still_exports(tiny_sd, sd_store, tmp_path):
    """load_student reads N from the checkpoint, so rapm export needs the run directory alone."""
    import shutil

    from typer.testing import CliRunner

    from rapm.cli import app

    store = tmp_path / "store"
    shutil.copytree(sd_store, store)
    run = tmp_path / "run"
    train(_config(tiny_sd, store, iterations=1, checkpoint_every=1), run, progress=False)
    shutil.rmtree(store)
    _, _, facts = load_student(run)
    assert facts["steps"] == 2 and facts["step"] == 1
    result = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_export_step_exports_that_checkpoint_with_the_runs_sd_scripts_keys(tiny_sd, sd_store, tmp_path):
    """Issue 31: `rapm export --step N` exports an earlier checkpoint; the kohya file carries the run's lr, seed,
    mixed precision and start time (recorded in the checkpoints)."""
    import time

    from safetensors import safe_open
    from typer.testing import CliRunner

    from rapm.cli import app

    run = tmp_path / "run"
    started = time.time()
    train(_config(tiny_sd, sd_store, iterations=4, checkpoint_every=2, seed=5, lr=2e-3), run, progress=False)
    assert [c.name for c in checkpoints(run)] == ["step-00000002", "step-00000004"]
    _, latest, _ = load_student(run)
    _, earlier, facts = load_student(run, step=2)
    assert facts["step"] == 2 and started <= facts["training_started_at"] <= time.time()
    names = [n for n, _ in earlier.named_parameters() if "lora_B" in n and STUDENT in n]
    assert any(not torch.equal(earlier.get_parameter(n), latest.get_parameter(n)) for n in names)

    result = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "lora"), "--step", "2"])
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "lora" / "kohya_lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_steps"], meta["ss_learning_rate"], meta["ss_seed"], meta["ss_mixed_precision"]) == ("2", "0.002", "5", "no")
    assert float(meta["ss_training_started_at"]) == facts["training_started_at"]
    with pytest.raises(RunError, match=r"no complete checkpoint of step 3; the run has steps 2, 4"):
        load_student(run, step=3)
    result = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "lora3"), "--step", "3"])
    assert result.exit_code == 1 and not (tmp_path / "lora3").exists()
    train(_config(tiny_sd, sd_store, iterations=6, checkpoint_every=2, seed=5, lr=2e-3), run, resume=True, progress=False)
    assert load_student(run)[2]["training_started_at"] == facts["training_started_at"]  # a resume keeps the first start


def test_a_yaml_or_toml_config_gives_the_teacher_store_and_out(tiny_sd, sd_store, tmp_path):
    """Issue 31: `--config cfg.yaml`; a config file setting teacher and store (and out) needs no flags for them."""
    from typer.testing import CliRunner

    from rapm.cli import app
    from rapm.run import read_run_config

    small = {**SMALL, "iterations": 1, "checkpoint_every": 1, "eval_every": 0, "seed": 3}
    run = tmp_path / "yaml-run"
    lines = [f"{k}: {json.dumps(v)}" for k, v in small.items()]  # JSON values are YAML flow values
    (tmp_path / "cfg.yaml").write_text("\n".join([f"teacher: {tiny_sd}", f"store: {sd_store}", f"out: {run}", *lines]) + "\n")
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "cfg.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    config = read_run_config(run)
    assert (config.teacher, config.store, config.seed, config.lora_rank) == (str(tiny_sd), str(sd_store), 3, 4)
    assert [c.name for c in checkpoints(run)] == ["step-00000001"]

    toml = "\n".join([f'teacher = "{tiny_sd}"', f'store = "{sd_store}"', "iterations = 1", "checkpoint_every = 1",
                      "eval_every = 0", "lora_rank = 4", "lora_alpha = 4.0", "sample_every = 0", "seed = 9"]) + "\n"
    (tmp_path / "cfg.toml").write_text(toml)  # it was refused with "rapm train needs --teacher and --store"
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "toml-run"),
                                      "--seed", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (read_run_config(tmp_path / "toml-run").teacher, read_run_config(tmp_path / "toml-run").seed) == (str(tiny_sd), 4)

    (tmp_path / "bare.yaml").write_text("iterations: 1\n")
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "bare.yaml")])
    assert isinstance(result.exception, ConfigError) and "needs --out" in str(result.exception)
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "bare.yaml"), "--out", str(tmp_path / "r")])
    assert isinstance(result.exception, ConfigError) and "--teacher and --store not given" in str(result.exception)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text, words", [("lr: [1\n", "cannot be parsed"), ("- lr\n- 1\n", "holds a list, not a mapping")])
def test_a_yaml_config_that_is_no_mapping_of_fields_is_named(tmp_path, text, words):
    from rapm.config import read_config_file

    (tmp_path / "cfg.yml").write_text(text)
    with pytest.raises(ConfigError, match=f"cfg.yml: {words}"):
        read_config_file(tmp_path / "cfg.yml")
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert read_config_file(tmp_path / "empty.yaml") == {}


def test_validation_off_because_the_store_is_small_is_said_with_the_fix(tiny_sd, sd_store, tmp_path):
    """Issue 31: val_fraction 0.05 of a 4-trajectory store rounds to 0: validation was silently off."""
    import warnings

    from rapm.validation import ValidationWarning

    one = dict(iterations=1, checkpoint_every=1)
    with pytest.warns(ValidationWarning, match=r"validation is off: val_fraction 0.05 of the store's 4 trajectories "
                                               r"rounds down to 0 held out; hold some out with --set val_fraction=0.25"):
        train(_config(tiny_sd, sd_store, **one), tmp_path / "small", progress=False)
    assert not any("val_" in line for line in (tmp_path / "small" / "logs.jsonl").read_text().splitlines())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValidationWarning)  # the fix it names works; off by choice says nothing
        train(_config(tiny_sd, sd_store, val_fraction=0.25, **one), tmp_path / "held", progress=False)
        train(_config(tiny_sd, sd_store, eval_every=0, **one), tmp_path / "off", progress=False)
        train(_config(tiny_sd, sd_store, val_fraction=0.0, **one), tmp_path / "none", progress=False)
    assert any("val_" in line for line in (tmp_path / "held" / "logs.jsonl").read_text().splitlines())
