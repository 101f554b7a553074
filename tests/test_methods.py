"""The peers on RAPM's machinery: SFD, PCM, progressive distillation (+ RDD). Each is a loss object the one loop runs."""

import json

import pytest
import torch

from rapm.config import ConfigError, TrainConfig, apply_overrides
from rapm.discriminator import Discriminator, DiscriminatorSpec
from rapm.methods import build_method
from rapm.methods.base import Context, Setup
from rapm.methods.progressive import PREVIOUS, Progressive, rounds_for
from rapm.methods.rapm import RAPM
from rapm.methods.rdd import RelationalLoss, channel_distillation, inter_sample_pixel_relations
from rapm.roles import DISCRIMINATOR, STUDENT, LoraSpec, add_roles, lora_parameters, set_trainable
from rapm.run import load_checkpoint, checkpoints
from rapm.store import TrajectoryBatch
from rapm.stream import sample_generators
from rapm.teacher import load_teacher
from rapm.train import train

SMALL = dict(adv_weight=0.1, lora_rank=4, lora_alpha=4, disc_lora_rank=2, disc_lora_alpha=2, disc_heads_per_level=1, lr=1e-3,
             disc_lr=1e-3, sample_every=0, batch_size=2, keep_checkpoints=2, progressive_start_steps=8)
NEW = ["sfd", "rapm-relative", "pcm", "progressive", "progressive-rdd"]
# RDD's relational term (rapm/methods/rdd.py) on each method that takes it, from each feature source.
WITH_RDD = [("progressive-rdd", dict(rdd_features="teacher")), ("rapm", dict(rdd_weight=1.0)),
            ("sfd", dict(rdd_weight=1.0, rdd_features="teacher"))]


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    from rapm.trajectories import write_trajectories

    folder = tmp_path_factory.mktemp("digits")
    (folder / "prompts.txt").write_text("".join(f"a handwritten digit {i % 10}\n" for i in range(6)))
    write_trajectories("digits", folder / "prompts.txt", folder / "store", steps=2, substeps=2, seed=0, batch_size=6,
                       shard_size=6, progress=False)
    return folder / "store"


def _config(store, **kw) -> TrainConfig:
    return apply_overrides(TrainConfig(), {"teacher": "digits", "store": str(store), **SMALL, **kw}, "test")


def _setup(store, method_name, **kw):
    """The digits teacher's UNet in its roles, the method prepared, and one iteration's context and batch."""
    from rapm.store import open_store

    config = _config(store, method=method_name, **kw)
    s = open_store(store)
    teacher = load_teacher("digits", text_encoders=False)
    method = build_method(config, delta=250)
    add_roles(teacher.unet, LoraSpec(4, 4), LoraSpec(2, 2) if method.uses_discriminator else None)
    torch.manual_seed(0)
    with torch.no_grad():  # a student that differs from the teacher
        for p in lora_parameters(teacher.unet, STUDENT).values():
            p.add_(torch.randn_like(p) * 0.05)
    disc = Discriminator(teacher.unet, DiscriminatorSpec("full", 1, 3)) if method.uses_discriminator else None
    method.prepare(Setup(teacher.unet, teacher.schedule, s, torch.device("cpu"), torch.float32))
    method.begin_step(0, teacher.unet)
    set_trainable(teacher.unet, STUDENT)
    batch = s.get([0, 1])

    def ctx():
        return Context(teacher.unet, teacher.schedule, s.timesteps, s.guidance, sample_generators(0, [0, 1]), disc)

    return teacher, method, ctx, batch, disc


def _generator_loss(method, ctx, batch):
    total, logs = 0.0, {}
    for loss, log in method.generator_losses(ctx(), batch):
        loss.backward()
        total += loss.item()
        logs.update(log)
    return total, logs


@pytest.mark.parametrize("name,kw", [(n, {}) for n in NEW] + WITH_RDD)
def test_each_method_has_a_finite_loss_whose_gradients_reach_only_what_it_trains(digits_store, name, kw):
    teacher, method, ctx, batch, disc = _setup(digits_store, name, **kw)
    unet = teacher.unet
    set_trainable(unet, STUDENT)  # the student's phase, as the loop sets it
    if disc is not None:
        disc.requires_grad_(False)
    extra = method.extra_parameters()
    total, logs = _generator_loss(method, ctx, batch)
    if getattr(method, "rdd", None) is not None:  # MP2P contrasts the queue from the second iteration on
        unet.zero_grad(set_to_none=True)
        total, logs = _generator_loss(method, ctx, batch)
        assert logs["rdd_mp2p"] > 0 and method.rdd.kind == kw.get("rdd_features", "classifier")
    assert torch.isfinite(torch.tensor(total)) and logs
    student = lora_parameters(unet, STUDENT)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.values())
    trained = {id(p) for p in list(student.values()) + list(extra.values())}
    others = [(n, p) for n, p in unet.named_parameters() if id(p) not in trained]
    others += list(disc.named_parameters()) if disc is not None else []
    assert [n for n, p in others if p.grad is not None and p.grad.abs().sum() > 0] == []
    if getattr(method, "rdd", None) is not None:  # RDD's MP2P projection head trains with the student
        assert extra and all(p.grad is not None for p in extra.values())
    else:
        assert extra == {}
    if method.uses_discriminator:  # and the discriminator's loss reaches only the discriminator
        unet.zero_grad(set_to_none=True)
        set_trainable(unet, DISCRIMINATOR)
        disc.requires_grad_(True)
        for loss, _ in method.discriminator_losses(ctx(), batch):
            assert torch.isfinite(loss)
            loss.backward()
        assert all(p.grad is None for p in student.values())
        assert any(p.grad is not None for p in lora_parameters(unet, DISCRIMINATOR).values())


def test_sfd_matches_the_absolute_position_only(digits_store, monkeypatch):
    teacher, method, ctx, batch, disc = _setup(digits_store, "sfd")
    assert not method.uses_discriminator and disc is None
    monkeypatch.setattr(RAPM, "relative_positions", lambda *a: pytest.fail("SFD must not compute relative positions"))
    _, logs = _generator_loss(method, ctx, batch)
    assert sorted(k for k in logs if not k.startswith("loss/")) == ["l1_abs/0", "l1_abs/1"]
    # It needs no teacher at training time: only the stored points. A different stored z~_0 changes its loss.
    other = TrajectoryBatch(batch.latents.clone(), batch.cond, batch.uncond)
    other.latents[:, -1] += 0.5
    assert _generator_loss(method, ctx, other)[0] != pytest.approx(_generator_loss(method, ctx, batch)[0])


def test_pcm_learns_from_real_data_not_from_the_stored_trajectories(digits_store):
    teacher, method, ctx, batch, _ = _setup(digits_store, "pcm")
    assert len(method.data) == 1497  # the digits train split
    before = _generator_loss(method, ctx, batch)[0]
    garbage = TrajectoryBatch(torch.randn_like(batch.latents) * 5, batch.cond, batch.uncond)
    assert _generator_loss(method, ctx, garbage)[0] == pytest.approx(before, rel=1e-6)  # trajectories unused
    method.data.latents = method.data.latents.flip(-1)  # other real images
    assert _generator_loss(method, ctx, batch)[0] != pytest.approx(before, rel=1e-3)
    d = method.draw(ctx(), 2, torch.device("cpu"), torch.float32)
    assert ((d["t"] > d["end"]) & (d["mid"] >= d["end"]) & (d["mid"] < d["t"])).all()  # a point inside its phase


def test_progressive_halves_its_step_count_each_round(digits_store):
    teacher, method, ctx, batch, _ = _setup(digits_store, "progressive")  # N = 2, start 8: rounds of 4 then 2 steps
    assert isinstance(method, Progressive) and method.rounds == 2
    method.iterations = 10
    unet = teacher.unet
    seen = []
    for step in range(10):
        method.begin_step(step, unet)
        seen.append(method.student_steps(method.round))
        if step == 4:
            assert PREVIOUS not in unet.peft_config
        if step == 5:  # round 2: the round-1 student became the teacher, held as the 'previous' adapter
            for n, p in lora_parameters(unet, STUDENT).items():
                torch.testing.assert_close(lora_parameters(unet, PREVIOUS)[n.replace(".student.", ".previous.")], p)
    assert seen == [4] * 5 + [2] * 5
    _, logs = _generator_loss(method, ctx, batch)
    assert logs["student_steps"] == 2 and logs["round"] == 2
    assert rounds_for(16, 2) == 3 and rounds_for(16, 4) == 2
    with pytest.raises(ConfigError, match="progressive_start_steps.*power of two"):
        rounds_for(12, 4)


def test_relational_loss_on_known_cases():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 8, 2, 2, generator=g)
    b = torch.randn(3, 8, 2, 2, generator=g)
    assert channel_distillation(a, a).item() == pytest.approx(0, abs=1e-6)
    assert inter_sample_pixel_relations(a, a).item() == pytest.approx(0, abs=1e-6)
    assert inter_sample_pixel_relations(a, 3 * a).item() == pytest.approx(0, abs=1e-6)  # cosine: scale-free
    assert channel_distillation(a, b).item() > 0 and inter_sample_pixel_relations(a, b).item() > 0
    # ISP2P by hand for two pixels (one sample, 1x2 map): rows are softmax of cosine similarities / 0.1.
    t = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # pixel features (1, 0) and (0, 1): orthogonal
    s = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])  # (1, 0) and (1, 1): cosine 0.7071
    p = torch.softmax(torch.tensor([1.0, 0.0]) / 0.1, 0)
    q = torch.softmax(torch.tensor([1.0, 2 ** -0.5]) / 0.1, 0)
    kl = (p * (p / q).log()).sum()
    assert inter_sample_pixel_relations(t, s).item() == pytest.approx(kl.item(), rel=1e-5)  # both rows alike
    # MP2P: nothing to contrast until the queue holds teacher features; the queue wraps around.
    loss = RelationalLoss(channels=8, queue_size=10)
    assert loss.memory_relations(a, b).item() == 0
    loss.enqueue(a)  # 12 pixels into a 10-row queue
    assert int(loss.filled) == 12 and loss.memory_relations(a, a).item() == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("name,kw", [("pcm", {}), ("progressive-rdd", {}), ("progressive-rdd", dict(rdd_features="teacher")),
                                     ("rapm", dict(rdd_weight=1.0, rdd_features="teacher"))])
def test_resume_gives_the_same_losses_for_stateful_methods(digits_store, tmp_path, name, kw):
    """PCM's real-data draws, progressive's rounds and its 'previous' adapter, RDD's queue and head all resume."""
    config = _config(digits_store, method=name, iterations=6, checkpoint_every=2, **kw)
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "cut", progress=False, stop_after=4)  # round 2 has begun (progressive: 3 of 6)
    train(config, tmp_path / "cut", resume=True, progress=False)
    logs = [[json.loads(x) for x in (tmp_path / r / "logs.jsonl").read_text().splitlines()] for r in ("straight", "cut")]
    assert len(logs[0]) == len(logs[1]) == 6
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7) and torch.isfinite(torch.tensor(a["loss"]))
    state = load_checkpoint(checkpoints(tmp_path / "cut")[-1])["method"]
    if name == "progressive-rdd":
        assert state["round"] == 2 and state["previous"]
    if name != "pcm":  # the queue resumed: the cut run's last step contrasted it, as the straight run's did
        assert int(state["rdd"]["filled"]) > 0 and logs[1][-1]["rdd_mp2p"] == pytest.approx(logs[0][-1]["rdd_mp2p"], rel=1e-5)


def test_methods_that_need_what_a_teacher_lacks_say_so(tiny_sd, sd_store, tmp_path):
    base = dict(SMALL, teacher=str(tiny_sd), store=str(sd_store), iterations=1)
    with pytest.raises(ConfigError, match="'real_data'.*folder of images"):
        train(apply_overrides(TrainConfig(), {**base, "method": "pcm"}, "t"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="'method'.*not one of"):
        build_method(apply_overrides(TrainConfig(), {"method": "dmd"}, "t"), 10)


def test_pcm_reads_a_folder_of_captioned_images(tiny_sd, sd_store, tmp_path):
    import numpy as np
    from PIL import Image

    from rapm.realdata import load_real_data

    folder = tmp_path / "real"
    folder.mkdir()
    for i, text in enumerate(["a red car", "a blue dog", "a cat"]):
        Image.fromarray((np.random.RandomState(i).rand(40, 30, 3) * 255).astype("uint8")).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(text)
    data = load_real_data(str(folder), str(tiny_sd))
    teacher = load_teacher(tiny_sd, text_encoders=False)
    assert data.latents.shape == (3, *teacher.latent_shape) and torch.isfinite(data.latents).all()
    assert data.texts == ["a blue dog", "a cat", "a red car"] and len(data.captions) == 3
    config = apply_overrides(TrainConfig(), {**SMALL, "teacher": str(tiny_sd), "store": str(sd_store), "method": "pcm",
                                             "real_data": str(folder), "iterations": 2, "batch_size": 1}, "t")
    from diffusers import UNet2DConditionModel

    loads = []
    original = UNet2DConditionModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(kwargs.get("subfolder"))
        return original(cls, *args, **kwargs)

    UNet2DConditionModel.from_pretrained = classmethod(counting)
    try:
        assert train(config, tmp_path / "run", progress=False).step == 2
    finally:
        UNet2DConditionModel.from_pretrained = classmethod(original)
    assert loads == ["unet"]  # encoding the real data loaded text encoders and VAE around the one UNet, no second
    (folder / "1.txt").unlink()
    with pytest.raises(ConfigError, match=r"1\.txt is missing"):
        load_real_data(str(folder), str(tiny_sd))
