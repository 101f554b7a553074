"""The teacher's Δ-step in the store (format 2): it is exact DDIM, training with it never runs the teacher and gives
the losses of the computed step; older stores and other Δs still train, computing it and saying so once."""

import json
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

import rapm.methods.base
import rapm.roles
from rapm.config import TrainConfig, apply_overrides
from rapm.diffusion import ddim_step
from rapm.files import sha256_file
from rapm.methods.base import Context
from rapm.methods.rapm import RAPM
from rapm.methods.rapm import DeltaStepWarning
from rapm.roles import STUDENT, LoraSpec, add_roles, lora_parameters
from rapm.store import StoreError, atomic_write, json_bytes, manifest_bytes, open_store
from rapm.teacher import guided_output, load_teacher
from rapm.train import train, training_batch
from rapm.trajectories import write_trajectories

PROMPTS = ["a photo of a cat", "a red car", "a blue dog"]
# relative weight 0.25: the relative terms, which read the Δ-step, are on (the default recipe leaves them out)
SMALL = dict(adv_weight=0.1, relative_weight=0.25, lora_rank=4, lora_alpha=4, disc_lora_rank=2, disc_lora_alpha=2,
             disc_heads_per_level=1, lr=1e-3, disc_lr=1e-3, sample_every=0, batch_size=1, keep_checkpoints=1,
             checkpoint_every=100)


def _write(tiny_sd, folder, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in PROMPTS))
    settings = dict(steps=4, substeps=2, guidance=3.0, shard_size=2, progress=False)
    return write_trajectories(tiny_sd, prompts, folder / "store", **{**settings, **kw})


@pytest.fixture(scope="module")
def delta_store(tiny_sd, tmp_path_factory):
    """N = 4, M = 2, float16 (the default storage): Δ = 1000 / (N M) = 125."""
    return _write(tiny_sd, tmp_path_factory.mktemp("delta16"))


@pytest.fixture(scope="module")
def old_store(delta_store, tmp_path_factory):
    """The same store in format 1, as the rapm before it wrote it: no delta_latents, no 'delta' and 'solver'."""
    import shutil

    folder = tmp_path_factory.mktemp("old") / "store"
    shutil.copytree(delta_store.path, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        f = folder / entry["file"]
        with safe_open(str(f), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = {k: v for k, v in load_file(f).items() if k != "delta_latents"}
        f.write_bytes(save(tensors, metadata=metadata))
        entry.update(sha256=sha256_file(f), bytes=f.stat().st_size)
    for key in ("delta", "solver", "manifest_sha256"):  # nor the manifest's checksum
        manifest.pop(key)
    atomic_write(folder / "manifest.json", json_bytes({**manifest, "format_version": 1}))
    return open_store(folder, verify=True)


def _teacher_ctx(tiny_sd, store, dtype=torch.float32):
    teacher = load_teacher(tiny_sd, text_encoders=False, dtype=dtype)
    add_roles(teacher.unet, LoraSpec(4, 4))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(teacher.unet, STUDENT).values():
            p.data = p.data.float()  # as rapm train keeps them
            p.add_(torch.randn_like(p) * 0.05)
    ctx = Context(teacher.unet, teacher.schedule, store.timesteps, store.guidance,
                  [torch.Generator().manual_seed(i) for i in range(3)])
    return teacher, ctx


class _Count:
    """Counts entries into the teacher role (adapters off), wherever rapm enters it."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = rapm.roles.teacher_role

        def counting(unet):
            self.calls += 1
            return original(unet)

        monkeypatch.setattr(rapm.roles, "teacher_role", counting)
        monkeypatch.setattr(rapm.methods.base, "teacher_role", counting)


def _config(tiny_sd, store, **kw) -> TrainConfig:
    return apply_overrides(TrainConfig(), {"teacher": str(tiny_sd), "store": str(store.path), **SMALL, **kw}, "test")


# --- the stored step ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["ddim", "dpmsolver++"])
def test_the_stored_delta_step_is_the_teachers_guided_ddim_step_from_the_stored_position(tiny_sd, tmp_path, solver):
    store = _write(tiny_sd, tmp_path, dtype="float32", solver=solver, delta=7)
    assert (store.manifest["format_version"], store.manifest["solver"], store.delta) == (2, solver, 7)
    teacher = load_teacher(tiny_sd)
    batch = store.get([0, 1, 2])
    assert batch.delta == 7 and batch.delta_latents.shape == (3, 4, 4, 8, 8)
    for j, t in enumerate(store.timesteps[:-1]):
        z = batch.latents[:, j]
        with torch.no_grad():
            out = guided_output(teacher.unet, z, torch.full((3,), t), batch.cond, batch.uncond, 3.0)
        torch.testing.assert_close(batch.delta_latents[:, j], ddim_step(teacher.schedule, z, out, t, t - 7),
                                   rtol=1e-5, atol=1e-5)


def test_default_delta_is_one_step_of_the_fine_grid_for_ddim_and_the_papers_for_dpmsolver(tiny_sd, delta_store, tmp_path):
    assert delta_store.delta == 125 and delta_store.manifest["solver"] == "ddim"  # 1000 / (4 * 2)
    assert _write(tiny_sd, tmp_path, solver="dpmsolver++").delta == 10  # 1000 / (4 * 25), whatever M
    # With the default Δ and DDIM, the stored Δ-step is the first of the slot's substeps (M = 2 halves the slot).
    half = _write(tiny_sd, tmp_path / "half", steps=2, substeps=2, dtype="float32")
    assert half.delta == 250
    full = _write(tiny_sd, tmp_path / "full", steps=4, substeps=1, dtype="float32", delta=125)  # one DDIM step a slot
    torch.testing.assert_close(half.get([0]).delta_latents[:, 0], full.get([0]).latents[:, 1], rtol=1e-5, atol=1e-5)


def test_losses_with_the_stored_and_the_computed_delta_step_agree(tiny_sd, delta_store, monkeypatch):
    teacher, ctx = _teacher_ctx(tiny_sd, delta_store)
    stored = delta_store.get([0, 1, 2])
    computed = training_batch(stored, "cpu")
    computed.delta_latents = None
    method = RAPM(delta=125, discriminator=False)
    count = _Count(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stored step says nothing
        a = {k: v for _, logs in method.generator_losses(ctx, training_batch(stored, "cpu")) for k, v in logs.items()}
    assert count.calls == 0
    with pytest.warns(DeltaStepWarning, match="format_version 1"):
        b = {k: v for _, logs in method.generator_losses(ctx, computed) for k, v in logs.items()}
    assert count.calls == 1  # all slots in one teacher forward
    assert a.keys() == b.keys() and any(k.startswith("huber_rel") for k in a)
    for k in a:  # float16 storage: the computed step starts from the rounded z~_{n+1}, the stored one from the exact
        assert a[k] == pytest.approx(b[k], rel=2e-2, abs=2e-4), k
    rel_a = method.relative_positions(ctx, training_batch(stored, "cpu"))
    rel_b = method.relative_positions(ctx, computed)
    torch.testing.assert_close(rel_a, rel_b, rtol=5e-3, atol=5e-3)


# --- training ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rapm", "rapm-relative"])
def test_training_on_a_store_with_delta_steps_never_calls_the_teacher(tiny_sd, delta_store, tmp_path, monkeypatch, method):
    count = _Count(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeltaStepWarning)
        result = train(_config(tiny_sd, delta_store, method=method, iterations=2), tmp_path / "run", progress=False)
    assert result.step == 2 and count.calls == 0  # a discriminator and a student iteration


def test_an_old_format_store_still_trains_computing_the_step_and_saying_so_once(tiny_sd, old_store, tmp_path, monkeypatch):
    assert old_store.delta is None and old_store.get([0]).delta_latents is None
    count = _Count(monkeypatch)
    with pytest.warns(DeltaStepWarning) as said:
        result = train(_config(tiny_sd, old_store, iterations=2), tmp_path / "run", progress=False)
    assert result.step == 2 and count.calls == 2  # once an iteration, batched over the slots
    delta_warnings = [w for w in said if w.category is DeltaStepWarning]  # (beside the small store's validation one)
    assert len(delta_warnings) == 1
    assert "format_version 1" in str(delta_warnings[0].message) and "rapm trajectories" in str(delta_warnings[0].message)


def test_another_delta_computes_the_step_and_says_which_field(tiny_sd, delta_store, tmp_path, monkeypatch):
    count = _Count(monkeypatch)
    with pytest.warns(DeltaStepWarning, match=r"Δ = 20 is not the store's Δ = 125 \(manifest.json field 'delta'\)"):
        train(_config(tiny_sd, delta_store, iterations=2, delta=20), tmp_path / "run", progress=False)
    assert count.calls == 2


def test_a_format_2_shard_without_delta_latents_is_named(delta_store, old_store, tmp_path):
    import shutil

    folder = tmp_path / "store"
    shutil.copytree(delta_store.path, folder)
    for name in ("shard-00000.safetensors",):
        shutil.copy(old_store.path / name, folder / name)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0].update(sha256=sha256_file(folder / "shard-00000.safetensors"),
                                 bytes=(folder / "shard-00000.safetensors").stat().st_size)
    atomic_write(folder / "manifest.json", manifest_bytes(manifest))  # its checksum updated too
    with pytest.raises(StoreError, match=r"shard-00000.safetensors: delta_latents None, but format_version 2.*rerun"):
        open_store(folder).get([0])


# --- float32 positions under mixed precision -------------------------------------------------------------------------

def test_positions_and_targets_stay_float32_with_bfloat16_weights(tiny_sd, delta_store):
    teacher, ctx = _teacher_ctx(tiny_sd, delta_store, dtype=torch.bfloat16)
    assert teacher.unet.conv_in.weight.dtype == torch.bfloat16
    raw = delta_store.get([0, 1, 2])
    batch = training_batch(raw, "cpu")
    assert batch.latents.dtype == batch.delta_latents.dtype == torch.float32
    assert torch.equal(batch.latents, raw.latents)  # not rounded to bfloat16
    for delta_latents in (batch.delta_latents, None):  # the stored and the computed Δ-step
        batch.delta_latents = delta_latents
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeltaStepWarning)
            rel = RAPM(delta=125).relative_positions(ctx, batch)
        assert rel.dtype == torch.float32
        assert not torch.equal(rel, rel.bfloat16().float())  # float32 values, not bfloat16 ones in float32
    z = batch.latents[:, 0]
    t = torch.full((3,), ctx.timesteps[0])
    z_n = rapm.methods.base.student_step(ctx, z, t, torch.full((3,), ctx.timesteps[1]), batch.cond)
    assert z_n.dtype == torch.float32 and not torch.equal(z_n, z_n.bfloat16().float())


def test_the_cli_passes_solver_and_delta_and_refuses_bad_ones_naming_the_flag(tiny_sd, tmp_path):
    from typer.testing import CliRunner

    from rapm.cli import app
    from rapm.errors import RapmError

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    common = ["trajectories", "--teacher", str(tiny_sd), "--prompts", str(prompts), "--steps", "4", "--substeps", "2",
              "--no-progress"]
    ok = CliRunner().invoke(app, common + ["--out", str(tmp_path / "s"), "--solver", "dpmsolver++", "--delta", "20"])
    assert ok.exit_code == 0, ok.output
    assert "dpmsolver++ Δ=20" in ok.output
    store = open_store(tmp_path / "s")
    assert (store.manifest["solver"], store.delta) == ("dpmsolver++", 20)
    for flags, message in ((["--solver", "heun"], r"--solver 'heun' is not one of ddim, dpmsolver\+\+"),
                           (["--delta", "300"], r"--delta 300: .* at most the shortest slot \(250 timesteps")):
        bad = CliRunner().invoke(app, common + ["--out", str(tmp_path / "bad")] + flags)
        assert isinstance(bad.exception, RapmError) and re.search(message, str(bad.exception)), bad.exception
    assert not (tmp_path / "bad").exists()
