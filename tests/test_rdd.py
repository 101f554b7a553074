"""RDD's relational loss on every teacher (its own UNet's features) and as a term rapm, sfd and progressive add."""

import json

import pytest
import torch
from typer.testing import CliRunner

from rapm.cli import app
from rapm.config import ConfigError, TrainConfig, apply_overrides, from_dict
from rapm.discriminator import backbone_features
from rapm.methods import build_method, resolve
from rapm.methods.base import Context, Setup
from rapm.methods.rdd import FEATURE_TIMESTEP, RelationalTerm, rdd_features_of
from rapm.roles import DISCRIMINATOR, STUDENT, LoraSpec, add_roles, lora_parameters, set_trainable
from rapm.stream import sample_generators
from rapm.teacher import load_teacher
from rapm.train import train

SMALL = ["--set", "lora_rank=4", "--set", "lora_alpha=4", "--set", "sample_every=0", "--set", "eval_every=0",
         "--set", "progressive_start_steps=8", "--set", "lr=1e-3"]


@pytest.fixture(scope="module")
def sdxl_store(tiny_sdxl, tmp_path_factory):
    from rapm.trajectories import write_trajectories

    folder = tmp_path_factory.mktemp("xl")
    (folder / "prompts.txt").write_text("a photo of a dog\na red car\na blue cat\n")
    write_trajectories(tiny_sdxl, folder / "prompts.txt", folder / "store", steps=2, substeps=2, seed=0,
                       progress=False)
    return folder / "store"


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_progressive_rdd_trains_on_sd_and_sdxl_teachers_through_the_cli(family, tiny_sd, sd_store, tiny_sdxl,
                                                                       sdxl_store, tmp_path):
    teacher, store = (tiny_sd, sd_store) if family == "sd" else (tiny_sdxl, sdxl_store)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--teacher", str(teacher), "--store", str(store), "--out", str(run),
                                      "--method", "progressive-rdd", "--iterations", "2", "--batch-size", "2",
                                      "--checkpoint-every", "2", "--no-progress", *SMALL])
    assert result.exit_code == 0, result.output
    logs = [json.loads(x) for x in (run / "logs.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    assert {"rdd_cfd", "rdd_isp2p", "rdd_mp2p"} <= set(logs[0]) and logs[1]["rdd_mp2p"] > 0  # queue filled at step 0
    assert logs[0]["loss"] > logs[0]["pd_mse"]  # the term is in the loss
    config = json.loads((run / "config.json").read_text())
    assert config["rdd_features"] == "" and rdd_features_of(from_dict(config, "t")) == "teacher"


def _prepared(teacher_path, store_path, **kw):
    """The teacher's UNet in its roles (a student that differs from the teacher), the method prepared."""
    from rapm.store import open_store

    config = apply_overrides(TrainConfig(), {"teacher": str(teacher_path), "store": str(store_path), "lora_rank": 4,
                                             "lora_alpha": 4, "batch_size": 2, "progressive_start_steps": 8, **kw}, "t")
    store = open_store(store_path)
    teacher = load_teacher(teacher_path, text_encoders=False)
    method = build_method(config, delta=10)
    torch.manual_seed(0)
    add_roles(teacher.unet, LoraSpec(4, 4), LoraSpec(2, 2))
    with torch.no_grad():
        for p in lora_parameters(teacher.unet, STUDENT).values():
            p.add_(torch.randn_like(p) * 0.05)
        for p in lora_parameters(teacher.unet, DISCRIMINATOR).values():
            p.add_(torch.randn_like(p) * 0.05)
    method.prepare(Setup(teacher.unet, teacher.schedule, store, torch.device("cpu"), torch.float32))
    batch = store.get([0, 1])
    ctx = lambda: Context(teacher.unet, teacher.schedule, store.timesteps, store.guidance,  # noqa: E731
                          sample_generators(0, [0, 1]))
    return teacher, method, ctx, batch


def test_teacher_features_are_the_frozen_teachers_and_their_gradient_reaches_only_the_prediction(tiny_sd, sd_store):
    teacher, method, ctx, batch = _prepared(tiny_sd, sd_store, method="progressive-rdd")
    term = method.rdd
    assert isinstance(term, RelationalTerm) and term.kind == "teacher" and term.weight == 1.0
    unet = teacher.unet
    x = batch.latents[:, -1].clone()
    noise = torch.randn_like(x)
    features = term.source(x, noise, batch.cond)
    # The same map as the UNet without any adapter (a fresh load of the teacher), at t = 250, mid block.
    plain = load_teacher(tiny_sd, text_encoders=False).unet
    t = torch.full((2,), FEATURE_TIMESTEP)
    from rapm.diffusion import alpha_sigma

    a, s = alpha_sigma(teacher.schedule, t, x)
    reference = backbone_features(plain, (a * x.double() + s * noise.double()).float(), t, batch.cond, "down_mid")[-1]
    torch.testing.assert_close(features, reference)
    assert features.shape == (2, 64, 4, 4)  # the tiny SD UNet's mid block: 64 channels at 4x4
    # Gradient: with the student in training (as the loop sets it), the term's backward reaches the prediction and
    # the projection head, and no adapter or weight of the UNet.
    set_trainable(unet, STUDENT)
    prediction = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    for _ in range(2):  # the second call contrasts the queue (MP2P)
        loss, logs = term(ctx(), prediction, x, batch.cond)
    loss.backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0 and logs["rdd_mp2p"] > 0
    assert all(p.grad is not None for p in term.trainable().values())
    assert [n for n, p in unet.named_parameters() if p.grad is not None] == []


def test_the_term_is_zero_when_student_and_teacher_features_agree(tiny_sd, sd_store):
    teacher, method, ctx, batch = _prepared(tiny_sd, sd_store, method="rapm", rdd_weight=0.5)
    term = method.rdd
    assert term.weight == 0.5 and term.kind == "teacher"
    x = batch.latents[:, -1]
    for _ in range(2):  # an empty queue, then a filled one
        loss, logs = term(ctx(), x, x, batch.cond)
        assert loss.item() == pytest.approx(0, abs=1e-5) and set(logs) == {"rdd", "rdd_cfd", "rdd_isp2p", "rdd_mp2p"}
    loss, logs = term(ctx(), x + 0.5 * torch.randn_like(x), x, batch.cond)
    assert logs["rdd_cfd"] > 0 and logs["rdd_isp2p"] > 0 and logs["rdd_mp2p"] > 0
    # At batch size 1 the inter-sample term is left out: CFD and the queue's MP2P only.
    one = Context(teacher.unet, teacher.schedule, [], 1.0, sample_generators(0, [0]))
    loss, logs = term(one, x[:1] + 0.5, x[:1], batch.cond[:1])
    assert "rdd_isp2p" not in logs and logs["rdd"] == pytest.approx(logs["rdd_cfd"] + 0.1 * logs["rdd_mp2p"], rel=1e-5)


@pytest.mark.parametrize("name", ["rapm", "sfd"])
def test_rapm_and_sfd_add_the_term_on_the_end_point_only_when_asked(tiny_sd, sd_store, name):
    teacher, method, ctx, batch = _prepared(tiny_sd, sd_store, method=name, adv_weight=0)
    assert method.rdd is None and method.extra_parameters() == {} and method.state_dict() == {}  # off by default
    set_trainable(teacher.unet, STUDENT)
    off = [logs for _, logs in method.generator_losses(ctx(), batch)]
    teacher, method, ctx, batch = _prepared(tiny_sd, sd_store, method=name, adv_weight=0, rdd_weight=2.0)
    set_trainable(teacher.unet, STUDENT)
    on = [(loss, logs) for loss, logs in method.generator_losses(ctx(), batch)]
    assert [("rdd" in logs) for _, logs in on] == [False, True]  # slot 1, then slot 0 (the end point z_0)
    last = on[-1][1]
    assert last["loss/0"] == pytest.approx(off[-1]["loss/0"] + 2.0 * last["rdd"], rel=1e-4, abs=1e-6)
    second = list(method.generator_losses(ctx(), batch))  # the queue holds the first call's teacher features
    second[-1][0].backward()
    assert second[-1][1]["rdd_mp2p"] > 0 and all(p.grad is not None for p in method.extra_parameters().values())
    assert set(method.state_dict()["rdd"]) == {"projection.weight", "projection.bias", "queue", "filled"}


def test_rdd_fields_say_what_is_wrong(tiny_sd, sd_store, tmp_path):
    base = dict(teacher=str(tiny_sd), store=str(sd_store), iterations=1, lora_rank=4, sample_every=0)
    with pytest.raises(ConfigError, match="'rdd_features'.*built-in teacher's own classifier.*has none.*rdd_features=teacher"):
        train(apply_overrides(TrainConfig(), {**base, "method": "progressive-rdd", "rdd_features": "classifier"}, "t"),
              tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="'rdd_weight'.*pcm.*rdd_weight=0"):
        train(apply_overrides(TrainConfig(), {**base, "method": "pcm", "rdd_weight": 1}, "t"), tmp_path / "b",
              progress=False)
    with pytest.raises(ConfigError, match="'rdd_features'.*teacher or classifier"):
        train(apply_overrides(TrainConfig(), {**base, "rdd_features": "clip"}, "t"), tmp_path / "c", progress=False)
    # Defaults: progressive-rdd's own weight is 1.0 (its preset), every other method's is off.
    for method, weight in [("progressive-rdd", 1.0), ("progressive", 0.0), ("rapm", 0.0), ("sfd", 0.0)]:
        assert resolve(apply_overrides(TrainConfig(), {"method": method}, "t")).rdd_weight == weight
    assert resolve(apply_overrides(TrainConfig(), {"method": "sfd", "rdd_weight": 0.3}, "t")).rdd_weight == 0.3
    assert from_dict({"method": "rapm", "rdd_weight": 1.0, "rdd_features": ""}, "new").rdd_weight == 1.0
