"""The paired discriminator, the update schedule, the EMA warm-up and validation during training (issue 14)."""

import json
import math

import pytest
import torch

from rapm.config import ConfigError, TrainConfig, apply_overrides, from_dict, to_dict, validate
from rapm.discriminator import (hinge_discriminator_loss, pair_accuracy, relativistic_discriminator_loss,
                                relativistic_generator_loss)
from rapm.methods import build_method, resolve
from rapm.models import ema_decay_at
from rapm.train import iteration_phases, train
from rapm.validation import split_indices
from test_train import _config, _log  # the tiny run settings, with the discriminators on

def test_relativistic_loss_is_log2_at_chance_and_scores_the_pair():
    real = [torch.randn(3, 1, 4, 4)]
    assert relativistic_discriminator_loss(real, real).item() == pytest.approx(math.log(2))
    assert relativistic_generator_loss(real, real).item() == pytest.approx(math.log(2))
    # A D that scores each real above its own fake: the loss falls below chance, the accuracy is 1.
    fake = [real[0] - 2.0]
    assert relativistic_discriminator_loss(fake, real).item() < 0.2 < math.log(2)
    assert pair_accuracy(fake, real) == 1.0 and pair_accuracy(real, fake) == 0.0 and pair_accuracy(real, real) == 0.5
    # The pairing: shifting every logit of a pair by the same amount changes nothing (unlike the hinge loss).
    shift = torch.randn(3, 1, 1, 1) * 5
    assert relativistic_discriminator_loss([fake[0] + shift], [real[0] + shift]).item() == pytest.approx(
        relativistic_discriminator_loss(fake, real).item(), rel=1e-5)
    assert hinge_discriminator_loss([fake[0] + shift], [real[0] + shift]).item() != pytest.approx(
        hinge_discriminator_loss(fake, real).item(), rel=1e-3)


def test_generator_loss_gives_no_gradient_to_the_reals():
    fake = torch.randn(2, 1, 4, 4, requires_grad=True)
    real = torch.randn(2, 1, 4, 4, requires_grad=True)
    relativistic_generator_loss([fake], [real]).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0 and real.grad is None


def test_update_schedules():
    assert [iteration_phases("alternate", 1, True, k) for k in range(3)] == [("discriminator",), ("student",),
                                                                            ("discriminator",)]
    assert [iteration_phases("both", 1, True, k) for k in range(2)] == [("discriminator", "student")] * 2
    assert [iteration_phases("both", 3, True, k) for k in range(4)] == [
        ("discriminator", "student"), ("student",), ("student",), ("discriminator", "student")]
    assert iteration_phases("alternate", 1, False, 0) == ("student",)  # no discriminator: every iteration trains


def test_the_paper_setting_is_one_flag():
    paper = apply_overrides(TrainConfig(), {"method": "rapm-paper"}, "test")
    default = TrainConfig()
    p, d = build_method(paper, 10), build_method(default, 10)
    assert resolve(paper).updates == "alternate" and p.gan_loss == "hinge" and p.adv_weight == 0.1 and p.relative_weight == 1
    assert p.uses_discriminator
    # The default recipe: the absolute terms alone (no relative position is computed), no discriminator; switched on,
    # the paired one every iteration: D2 alone, and D1 beside it where the relative terms are weighed in.
    assert d.relative_weight == 0 and not d.relative and d.adv_weight == 0 and not d.uses_discriminator
    paired = apply_overrides(default, {"adv_weight": 0.1}, "test")
    assert resolve(paired).updates == "both" and build_method(paired, 10).gan_loss == "relativistic"
    assert build_method(paired, 10).uses_discriminator and build_method(paired, 10).gan_kinds == ["absolute"]
    both = apply_overrides(paired, {"relative_weight": 0.25}, "test")
    assert build_method(both, 10).gan_kinds == ["relative", "absolute"]
    assert build_method(apply_overrides(default, {"relative_weight": 1}, "test"), 10).relative_weight == 1
    assert resolve(apply_overrides(default, {"updates": "alternate"}, "test")).updates == "alternate"
    with pytest.raises(ConfigError, match="'gan_loss'"):
        validate(apply_overrides(TrainConfig(), {"gan_loss": "wasserstein"}, "test"))


def test_a_run_records_its_recipe_and_a_resume_reads_it_back(tiny_sd, sd_store, tmp_path):
    """config.json holds the method's own settings written in, so a later rapm whose default recipe differs resumes
    a run with the recipe it started with."""
    recorded = resolve(TrainConfig())
    assert (recorded.relative_weight, recorded.adv_weight, recorded.ema_decay, recorded.ema_warmup) == (0, 0, 0.99, True)
    assert resolve(recorded) == recorded
    assert from_dict(to_dict(recorded), "test") == recorded  # a recorded 0 stays 0
    paper = resolve(apply_overrides(TrainConfig(), {"method": "rapm-paper"}, "test"))
    assert (paper.relative_weight, paper.adv_weight, paper.gan_loss, paper.ema_decay) == (1, 0.1, "hinge", 0)
    run = tmp_path / "run"
    train(_config(tiny_sd, sd_store, iterations=1, checkpoint_every=1, adv_weight=-1, relative_weight=-1), run,
          progress=False)
    written = json.loads((run / "config.json").read_text())
    assert (written["relative_weight"], written["adv_weight"], written["ema_decay"]) == (0, 0, 0.99)
    assert (written["gan_loss"], written["updates"], written["ema_warmup"]) == ("relativistic", "both", True)


def test_ema_warmup_fades_the_initial_adapter():
    assert ema_decay_at(0.99, False, 0) == 0.99
    assert ema_decay_at(0.99, True, 0) == pytest.approx(0.1) and ema_decay_at(0.99, True, 10_000) == 0.99
    # The initial weights' share after k updates: a product of decays. Without warm-up 0.99^150 = 22%.
    share = math.prod(ema_decay_at(0.99, True, k) for k in range(150))
    assert share < 1e-3 < 0.99 ** 150


def test_split_is_seeded_disjoint_and_complete():
    train_ids, val_ids = split_indices(100, 0.1, seed=0)
    assert len(val_ids) == 10 and sorted(train_ids + val_ids) == list(range(100))
    assert split_indices(100, 0.1, seed=0) == (train_ids, val_ids) and split_indices(100, 0.1, seed=1)[1] != val_ids
    assert split_indices(4, 0.05, seed=0) == ([0, 1, 2, 3], [])


def _record_fetches(monkeypatch) -> list[list[int]]:
    """Every TrajectoryStore.get call's indices, in order."""
    from rapm.store import TrajectoryStore

    fetched = []
    original = TrajectoryStore.get

    def get(self, indices):
        fetched.append(list(indices) if not isinstance(indices, int) else [indices])
        return original(self, indices)

    monkeypatch.setattr(TrajectoryStore, "get", get)
    return fetched


def test_training_never_sees_the_validation_split_and_logs_its_curve(tiny_sd, sd_store, tmp_path, monkeypatch):
    _, val_ids = split_indices(4, 0.25, seed=0)
    fetched = _record_fetches(monkeypatch)
    run = tmp_path / "run"
    train(_config(tiny_sd, sd_store, iterations=6, checkpoint_every=3, val_fraction=0.25, eval_every=4), run,
          progress=False)
    log = _log(run)
    validations = [e for e in log if e["phase"] == "validation"]
    assert [e["step"] for e in validations] == [0, 4, 6]  # at the start, every eval_every, at the end
    assert all(e["trajectories"] == 1 and e["val_trajectory_error"] > 0 for e in validations)
    assert all(f"val_slot_error/{n}" in validations[0] for n in range(2))
    trained = {i for e, ids in zip(range(len(fetched)), fetched) for i in ids}
    # The validation batch is fetched once (at the start); no training iteration fetches a held-out trajectory.
    training_fetches = [ids for ids in fetched if ids != val_ids]
    assert len(training_fetches) == 6 and not any(i in val_ids for ids in training_fetches for i in ids)
    assert trained >= set(val_ids)
    # The discriminator's pair accuracy per head and slot on every iteration that updates it.
    iterations = [e for e in log if e["phase"] != "validation"]
    assert all(e["phase"] == "discriminator+student" for e in iterations)
    assert all({"disc_acc_rel/0", "disc_acc_abs/1", "disc_loss", "loss"} <= set(e) for e in iterations)
    # The report draws the curve.
    from rapm.report import report

    page = report(run).read_text()
    assert "Validation during training" in page and (run / "report_files" / "validation.png").exists()


def test_resume_with_both_updates_and_validation_gives_the_same_log(tiny_sd, sd_store, tmp_path):
    config = _config(tiny_sd, sd_store, iterations=5, checkpoint_every=2, val_fraction=0.25, eval_every=2,
                     ema_decay=0.9, ema_warmup=True, disc_every=2)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(config, straight, progress=False)
    train(config, interrupted, progress=False, stop_after=3)
    train(config, interrupted, resume=True, progress=False)
    a = [(e["step"], e["phase"], e.get("loss", e.get("val_trajectory_error"))) for e in _log(straight)]
    b = [(e["step"], e["phase"], e.get("loss", e.get("val_trajectory_error"))) for e in _log(interrupted)]
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert [x[1] for x in a if x[1] != "validation"] == ["discriminator+student", "student"] * 2 + ["discriminator+student"]
    for x, y in zip(a, b):
        assert x[2] == pytest.approx(y[2], rel=1e-4, abs=1e-6)


def test_paired_discriminator_learns_on_the_digits_teacher(tmp_path):
    """Against a fixed (undistilled) student, the paired discriminator's held-out accuracy rises well above chance
    within a few dozen batch-1 updates; the paper's hinge discriminator is measured beside it and reported."""
    import importlib.util
    import sys
    from pathlib import Path

    from rapm.demo.prompts import training_prompts
    from rapm.trajectories import write_trajectories

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in training_prompts()[:24]))
    store = tmp_path / "store"
    write_trajectories("digits", prompts, store, steps=2, substeps=2, seed=0, batch_size=24, shard_size=24,
                       progress=False)
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "discriminator_probe.py"
    spec = importlib.util.spec_from_file_location("benchmarks_discriminator_probe", path)
    probe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = probe
    spec.loader.exec_module(probe)
    paired = probe.probe(store, None, "relativistic", True, updates=16, held_out=8, points=1)
    hinge = probe.probe(store, None, "hinge", True, updates=16, held_out=8, points=1)
    start, end = paired["curve"][0], paired["curve"][-1]
    print("paired:", paired["curve"], "\nhinge:", hinge["curve"])
    assert end["acc_relative"] >= 0.8 and end["acc_absolute"] >= 0.8
    assert end["acc_relative"] + end["acc_absolute"] > start["acc_relative"] + start["acc_absolute"] + 0.3


def test_tensorboard_shows_losses_learning_rates_samples_validation_and_config(tiny_sd, sd_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(_config(tiny_sd, sd_store, iterations=2, checkpoint_every=2, sample_every=2, num_samples=2,
                  val_fraction=0.25, eval_every=2), run, progress=False)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"student/loss", "discriminator/loss", "student/lr", "discriminator/lr", "validation/trajectory_error",
            "val_slot_error/0", "disc_acc_rel/0"} <= scalars
    assert events.Tags()["images"] == ["samples/student_top_teacher_bottom"]
    image = events.Images("samples/student_top_teacher_bottom")[0]
    assert image.step == 2 and image.width >= 4 * 2 * 8  # two samples of 8 px, shown at 4x
    assert any(t.startswith("config") for t in events.Tags()["tensors"])


def test_tensorboard_hparams_hold_the_runs_configuration(tiny_sd, sd_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    config = _config(tiny_sd, sd_store, iterations=2, checkpoint_every=2, val_fraction=0.25, eval_every=2)
    train(config, run, progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hp = dict(start.hparams)
    assert hp["lr"].number_value == pytest.approx(config.lr) and hp["method"].string_value == config.method
    assert hp["iterations"].number_value == 2 and hp["store"].string_value == str(sd_store)
    assert hp["adam_betas"].string_value == json.dumps(list(config.adam_betas))
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"student/loss", "validation/trajectory_error"}
    assert {"student/loss", "validation/trajectory_error"} <= set(events.Tags()["scalars"])  # what the table reads


def test_the_default_recipe_builds_no_discriminator_and_trains_the_student_every_iteration(tiny_sd, sd_store, tmp_path):
    from rapm.run import load_checkpoint, checkpoints

    run = tmp_path / "run"
    train(_config(tiny_sd, sd_store, iterations=2, checkpoint_every=2, adv_weight=-1), run, progress=False)
    assert [e["phase"] for e in _log(run) if e["phase"] != "validation"] == ["student", "student"]
    state = load_checkpoint(checkpoints(run)[-1])
    assert not state["discriminator"] and state["opt_disc"] is None  # no discriminator adapter, heads or optimizer


def test_lr_schedules_step_and_cosine_over_each_phases_updates(tiny_sd, sd_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rapm.models import lr_factor

    assert [lr_factor("step", k, 4) for k in range(5)] == [1.0, 1.0, 0.1, 0.1, 0.1]  # SFD: lr / 10 from half on
    assert lr_factor("cosine", 0, 8) == 1.0 and lr_factor("cosine", 4, 8) == pytest.approx(0.5)
    assert lr_factor("cosine", 8, 8) == pytest.approx(0.0) and lr_factor("constant", 7, 8) == 1.0
    with pytest.raises(ConfigError, match="'lr_schedule'"):
        validate(apply_overrides(TrainConfig(), {"lr_schedule": "linear"}, "test"))
    # Alternating updates: 8 iterations are 4 student and 4 discriminator updates, each phase's schedule over its 4.
    run = tmp_path / "run"
    config = _config(tiny_sd, sd_store, iterations=8, checkpoint_every=8, lr_schedule="step", updates="alternate")
    train(config, run, progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for phase, base in (("student", config.lr), ("discriminator", config.disc_lr)):
        done = [sum(phase in iteration_phases("alternate", 1, True, k) for k in range(i + 1)) for i in range(8)]
        assert done == ([0, 1, 1, 2, 2, 3, 3, 4] if phase == "student" else [1, 1, 2, 2, 3, 3, 4, 4])
        lrs = [e.value for e in events.Scalars(f"{phase}/lr")]  # logged after every iteration
        assert lrs == pytest.approx([base * (1.0 if k < 2 else 0.1) for k in done], rel=1e-6), phase


def test_train_trajectories_trains_on_a_subset_and_keeps_the_held_out_split(tiny_sd, sd_store, tmp_path, monkeypatch):
    train_ids, val_ids = split_indices(4, 0.25, seed=0)
    fetched = _record_fetches(monkeypatch)
    run = tmp_path / "run"
    train(_config(tiny_sd, sd_store, iterations=6, checkpoint_every=6, val_fraction=0.25, eval_every=6,
                  train_trajectories=1), run, progress=False)
    training = [ids for ids in fetched if ids != val_ids]
    assert len(training) == 6 and {i for ids in training for i in ids} == {train_ids[0]}
    assert any(ids == val_ids for ids in fetched)  # the same held-out trajectories are measured
    with pytest.raises(ConfigError, match="'train_trajectories': 4 is more than the 3 training trajectories"):
        train(_config(tiny_sd, sd_store, iterations=1, train_trajectories=4, val_fraction=0.25), tmp_path / "r2",
              progress=False)
    assert not (tmp_path / "r2").exists()


def test_val_seed_holds_out_the_same_trajectories_under_another_seed(tiny_sd, sd_store, tmp_path, monkeypatch):
    import rapm.train as train_module
    from rapm.run import RunError

    fixed, own = split_indices(4, 0.25, seed=0)[1], split_indices(4, 0.25, seed=1)[1]
    assert fixed != own  # else the test could not tell the two splits apart
    held_out = []

    class Recording(train_module.Validation):
        def __init__(self, teacher, store, val_ids, *args):
            held_out.append(list(val_ids))
            super().__init__(teacher, store, val_ids, *args)

    monkeypatch.setattr(train_module, "Validation", Recording)
    run = tmp_path / "run"
    train(_config(tiny_sd, sd_store, iterations=4, checkpoint_every=2, val_fraction=0.25, eval_every=4, seed=1,
                  val_seed=0), run, progress=False)
    assert held_out == [fixed]  # seed 0's held-out trajectories, not seed 1's
    with pytest.raises(RunError, match=r"the held-out split's seed \(config field 'val_seed', else 'seed'\) was 0 when "
                                       r"it was written but is 1 now"):
        train(_config(tiny_sd, sd_store, iterations=6, checkpoint_every=2, val_fraction=0.25, eval_every=4, seed=1),
              run, resume=True, progress=False)
    assert held_out == [fixed]


def test_relative_target_ema_makes_the_frozen_student_the_ema(tiny_sd, sd_store, tmp_path, monkeypatch):
    from rapm.methods import rapm as rapm_method

    with pytest.raises(ConfigError, match="'relative_target': 'ema' needs an EMA"):
        validate(apply_overrides(TrainConfig(), {"relative_target": "ema", "ema_decay": 0}, "test"))
    with pytest.raises(ConfigError, match="'relative_target': 'ema' needs an EMA, and method 'rapm-paper' keeps none"):
        train(_config(tiny_sd, sd_store, iterations=1, method="rapm-paper", relative_target="ema"), tmp_path / "r0",
              progress=False)
    assert not (tmp_path / "r0").exists()
    seen = []  # the frozen student's first LoRA B matrix at every relative-position forward
    original = rapm_method.student_step

    def student_step(ctx, *args, **kw):
        if not torch.is_grad_enabled():  # the frozen student (the relative position is computed without gradient)
            b = next(p for n, p in ctx.unet.named_parameters() if "lora_B" in n and ".student." in n)
            seen.append(b.detach().clone())
        return original(ctx, *args, **kw)

    monkeypatch.setattr(rapm_method, "student_step", student_step)
    runs = {}
    for target in ("student", "ema"):
        seen.clear()
        run = tmp_path / target
        train(_config(tiny_sd, sd_store, iterations=3, checkpoint_every=3, adv_weight=0, relative_weight=1,
                      ema_decay=0.9, relative_target=target), run, progress=False)
        runs[target] = ([e["huber_rel/0"] for e in _log(run) if "huber_rel/0" in e], [s.clone() for s in seen])
    (rel_s, b_s), (rel_e, b_e) = runs["student"], runs["ema"]
    assert len(b_s) == len(b_e) == 3 and torch.equal(b_s[0], b_e[0])  # iteration 0: the EMA is the student
    assert rel_s[0] == pytest.approx(rel_e[0])
    # Later the EMA's B lags the student's by its decay: 0.9 of the way back to the previous average.
    assert not torch.allclose(b_s[2], b_e[2]) and (b_e[2].abs().sum() < b_s[2].abs().sum())


def test_resuming_a_step_schedule_to_more_iterations_says_the_lr_moves(tiny_sd, sd_store, tmp_path):
    from rapm.run import ResumeWarning

    run = tmp_path / "run"
    train(_config(tiny_sd, sd_store, iterations=4, checkpoint_every=4, adv_weight=0, lr_schedule="step"), run,
          progress=False)
    with pytest.warns(ResumeWarning, match=r"scheduled over 4 iterations and resumes over 12; .* goes from 0.1 to 1"):
        train(_config(tiny_sd, sd_store, iterations=12, checkpoint_every=4, adv_weight=0, lr_schedule="step"), run,
              resume=True, progress=False, stop_after=1)


def test_the_default_recipe_is_sfds_target_with_rapms_distance_and_the_ema(tiny_sd, sd_store, tmp_path):
    """What the README says the default is: relative weight 0 leaves RAPM's absolute terms alone, the computation of
    `--method sfd` with the pseudo-Huber distance and the same EMA (the same weights, to the bit)."""
    from rapm.run import load_checkpoint, latest_checkpoint

    common = dict(iterations=2, checkpoint_every=2, adv_weight=-1, relative_weight=-1)
    train(_config(tiny_sd, sd_store, **common), tmp_path / "rapm", progress=False)
    train(_config(tiny_sd, sd_store, **common, method="sfd", distance="pseudo_huber", ema_decay=0.99, ema_warmup=True),
          tmp_path / "sfd", progress=False)
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / name)) for name in ("rapm", "sfd"))
    assert a["student"].keys() == b["student"].keys() and a["ema"].keys() == b["ema"].keys()
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert any(a["student"][k].abs().sum() > 0 for k in a["student"] if "lora_B" in k)  # it trained
    losses = [[e["loss"] for e in _log(tmp_path / name)] for name in ("rapm", "sfd")]
    assert losses[0] == losses[1]
