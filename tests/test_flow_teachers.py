"""Flow-matching teachers: tiny SD3 and FLUX pipelines through a folder, the denoiser call, the roles, the LoRA file."""

import numpy as np
import pytest
import torch

from benchmarks.flow_configs import lora_parameter_count
from rapm.discriminator import Head
from rapm.families import family_named
from rapm.families.flow import FLUX_TARGET_MODULES, SD3_TARGET_MODULES, latent_image_ids, pack_latents, unpack_latents
from rapm.flowmatch import FlowSchedule
from rapm.roles import DISCRIMINATOR, STUDENT, add_roles, discriminator_role, lora_parameters, matches_target, student_role, teacher_role
from tests import flow_reference as ref
from tests.tiny_flow import IMAGE, LATENT, MAX_TOKENS, build_tiny_flux, build_tiny_sd3, load

PROMPTS = ["a photo of a cat", "a red car"]
SD3_CFG = 4.0
FLUX_GUIDANCE = 3.5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_teachers")
    return {"sd3": build_tiny_sd3(root / "sd3"), "flux": build_tiny_flux(root / "flux")}


def _latents(seed=0, batch=2):
    return torch.randn(batch, 16, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def _schedule_and_sigmas(pipe, family, n, trailing=False):
    schedule = FlowSchedule.from_config(pipe.scheduler.config)
    if family == "flux":
        return schedule, ref.flux_coarse_sigmas(schedule, n, family_named(family).image_seq_len((16, LATENT, LATENT)))
    return schedule, (schedule.trailing_sigmas(n) if trailing else schedule.coarse_sigmas(n))


def _our_sample(pipe, family, x, n, trailing=False):
    """An n-step sample with rapm's math and denoiser calls (no pipeline __call__)."""
    schedule, sigmas = _schedule_and_sigmas(pipe, family, n, trailing)
    if family == "sd3":
        cond, uncond = ref.encode_prompt_sd3(pipe, PROMPTS, max_sequence_length=MAX_TOKENS)

        def velocity(z, t):
            return ref.sd3_guided_velocity(pipe.transformer, z, t, cond, uncond, SD3_CFG)
    else:
        cond = ref.encode_prompt_flux(pipe, PROMPTS, max_sequence_length=MAX_TOKENS)

        def velocity(z, t):
            return ref.flux_velocity(pipe.transformer, z, t, cond, FLUX_GUIDANCE)

    with torch.no_grad():
        return ref.sample_euler(velocity, x, sigmas, schedule)


def _pipeline_sample(pipe, family, x, n, trailing=False):
    """The diffusers pipeline's own n-step sample from the same initial latents, as [B, 16, H, W]."""
    common = dict(
        prompt=PROMPTS, num_inference_steps=n, height=IMAGE, width=IMAGE, output_type="latent",
        max_sequence_length=MAX_TOKENS,
    )
    if family == "sd3" and trailing:  # how a user runs a student trained on trailing σ
        common["sigmas"] = list(np.linspace(1.0, 1 / n, n))
    if family == "sd3":
        return pipe(latents=x.clone(), guidance_scale=SD3_CFG, **common).images
    packed = pipe(latents=pack_latents(x), guidance_scale=FLUX_GUIDANCE, **common).images
    return unpack_latents(packed, LATENT, LATENT)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tiny_pipeline_loads_from_its_folder_and_generates_an_image(folders, family):
    pipe = load(folders[family])
    assert type(pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor is not None
    out = pipe(
        "a photo of a dog", num_inference_steps=2, height=IMAGE, width=IMAGE, output_type="np",
        max_sequence_length=MAX_TOKENS, generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, IMAGE, IMAGE, 3) and torch.isfinite(torch.from_numpy(out)).all()


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("family, trailing", [("sd3", False), ("sd3", True), ("flux", False)])
def test_our_sampler_equals_the_pipeline(folders, family, trailing, n):
    pipe = load(folders[family])
    x = _latents(n)
    expected = _pipeline_sample(pipe, family, x, n, trailing)
    ours = _our_sample(pipe, family, x, n, trailing)
    assert not torch.allclose(ours, x)  # the sample moved
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_flux_packing_and_ids_match_the_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 8)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 8))
    torch.testing.assert_close(unpack_latents(packed, 6, 8), x)
    # the pipeline's unpack works in pixel units (8x VAE)
    torch.testing.assert_close(unpack_latents(packed, 6, 8), FluxPipeline._unpack_latents(packed, 48, 64, 8))
    torch.testing.assert_close(latent_image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


def test_flux_guidance_is_required_exactly_for_guidance_embeds(folders):
    pipe = load(folders["flux"])
    cond = ref.encode_prompt_flux(pipe, PROMPTS, max_sequence_length=MAX_TOKENS)
    with pytest.raises(ValueError, match="guidance"):
        ref.flux_velocity(pipe.transformer, _latents(), torch.full([2], 500.0), cond, None)
    a = ref.flux_velocity(pipe.transformer, _latents(), torch.full([2], 500.0), cond, 1.0)
    b = ref.flux_velocity(pipe.transformer, _latents(), torch.full([2], 500.0), cond, 3.5)
    assert not torch.allclose(a, b)  # the guidance embedding is used


def _one_call(pipe, family):
    """One denoiser call at σ = 0.6 with the pipeline's conditioning (inputs fixed by seed)."""
    x, t = _latents(7), torch.full([2], 600.0)
    if family == "sd3":
        cond, _ = ref.encode_prompt_sd3(pipe, PROMPTS, max_sequence_length=MAX_TOKENS, guidance=False)
        return lambda: ref.sd3_velocity(pipe.transformer, x, t, cond)
    cond = ref.encode_prompt_flux(pipe, PROMPTS, max_sequence_length=MAX_TOKENS)
    return lambda: ref.flux_velocity(pipe.transformer, x, t, cond, FLUX_GUIDANCE)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_roles_on_one_transformer_student_starts_as_teacher(folders, family):
    pipe = load(folders[family])
    call = _one_call(pipe, family)
    with torch.no_grad():
        before = call()
        expected_count = lora_parameter_count(pipe.transformer, ref.flow_lora_spec(family).target_modules, 4)
        add_roles(pipe.transformer, ref.flow_lora_spec(family, rank=4), ref.flow_lora_spec(family, rank=2))
        # every target kind got a LoRA layer, in both adapters
        names = {n.split(".lora_A.")[0] for n in lora_parameters(pipe.transformer, STUDENT) if ".lora_A." in n}
        targets = SD3_TARGET_MODULES if family == "sd3" else FLUX_TARGET_MODULES
        for target in targets:
            assert any(matches_target(n, [target]) for n in names), target
        if family == "flux":  # the single blocks' MLP in and out, as FLUX trainers have them; not the final proj_out
            assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"} <= names
            assert "proj_out" not in names
        assert lora_parameters(pipe.transformer, DISCRIMINATOR)
        student_count = sum(p.numel() for p in lora_parameters(pipe.transformer, STUDENT).values())
        assert student_count == expected_count  # the on-paper LoRA count (flow_configs) follows peft's matching
        with teacher_role(pipe.transformer):
            teacher = call()
        with student_role(pipe.transformer):
            student = call()
        torch.testing.assert_close(teacher, before, rtol=0, atol=0)
        torch.testing.assert_close(student, before, rtol=0, atol=0)
        # a non-zero discriminator adapter changes its role only
        for name, p in lora_parameters(pipe.transformer, DISCRIMINATOR).items():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        with discriminator_role(pipe.transformer):
            assert not torch.allclose(call(), before)
        with teacher_role(pipe.transformer):
            torch.testing.assert_close(call(), before, rtol=0, atol=0)
    # only the student adapter trains
    trainable = {n for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    assert trainable == set()  # add_roles leaves nothing trainable until set_trainable picks an adapter


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pipeline_load_lora_weights_reproduces_the_in_memory_student(folders, family, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipeline_class = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipe = load(folders[family])
    # alpha != rank, so the file must carry lora_alpha for the scale to come out right
    add_roles(pipe.transformer, ref.flow_lora_spec(family, rank=4, alpha=8))
    with torch.no_grad():
        for name, p in lora_parameters(pipe.transformer, STUDENT).items():
            if "lora_B" in name:  # zero at init: make the student differ from the teacher, or the test cannot fail
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    n = 2
    x = _latents(3)
    with student_role(pipe.transformer):
        student = _our_sample(pipe, family, x, n)
    with teacher_role(pipe.transformer):
        teacher = _our_sample(pipe, family, x, n)
    assert (student - teacher).abs().max() > 1e-2

    lora_dir = ref.save_diffusers_lora(pipeline_class, pipe.transformer, tmp_path / "lora")
    fresh = load(folders[family])
    fresh.load_lora_weights(str(lora_dir))
    loaded = _pipeline_sample(fresh, family, x, n)
    torch.testing.assert_close(loaded, student, rtol=1e-4, atol=1e-4)
    fresh.fuse_lora()
    fresh.unload_lora_weights()
    torch.testing.assert_close(_pipeline_sample(fresh, family, x, n), student, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_block_features_on_the_latent_grid(folders, family):
    pipe = load(folders[family])
    x, t = _latents(5), torch.full([2], 400.0)
    if family == "sd3":
        cond, _ = ref.encode_prompt_sd3(pipe, PROMPTS, max_sequence_length=MAX_TOKENS, guidance=False)
        blocks, guidance = [0, 1], None
    else:
        cond = ref.encode_prompt_flux(pipe, PROMPTS, max_sequence_length=MAX_TOKENS)
        blocks, guidance = [0, 1], FLUX_GUIDANCE  # FLUX: block 0 is the joint block, 1 the single block
    assert len(ref.transformer_blocks(pipe.transformer)) == 2
    with torch.no_grad():
        feats = ref.block_features(pipe.transformer, x, t, cond, blocks, flux_guidance=guidance)
        first_only = ref.block_features(pipe.transformer, x, t, cond, [0], flux_guidance=guidance)
    channels = ref.feature_channels(pipe.transformer, blocks)
    assert [f.shape for f in feats] == [torch.Size([2, c, LATENT // 2, LATENT // 2]) for c in channels]
    torch.testing.assert_close(first_only[0], feats[0])  # stopping early changes nothing before the stop
    assert not torch.allclose(feats[0], feats[1])
    # the existing conv heads apply to them
    logits = Head(channels[0], kernel_size=3)(feats[0])
    assert logits.shape == (2, 1, LATENT // 2, LATENT // 2)
    # the grid is the image's: token (r, c) sits at row r, column c (check one token against the raw hook)
    captured = {}

    def keep(_module, _inputs, output):
        captured["o"] = output[1]

    handle = ref.transformer_blocks(pipe.transformer)[0].register_forward_hook(keep)
    with torch.no_grad():
        ref.flow_velocity(pipe.transformer, x, t, cond, flux_guidance=guidance)
    handle.remove()
    tokens = captured["o"]
    r, c = 1, 3
    torch.testing.assert_close(feats[0][:, :, r, c], tokens[:, r * (LATENT // 2) + c, :])


def _with_roles(folders, family, trainable, checkpointing):
    """The teacher folder's pipeline, its transformer with both adapters (B matrices random, so the adapters change
    the output; LoRA A from the global generator at seed 0), ``trainable``'s parameters the ones that train, and
    role-aware gradient checkpointing if asked."""
    from rapm.roles import enable_gradient_checkpointing, set_trainable

    pipe = load(folders[family])
    torch.manual_seed(0)
    add_roles(pipe.transformer, ref.flow_lora_spec(family, rank=4), ref.flow_lora_spec(family, rank=2))
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    set_trainable(pipe.transformer, trainable)
    if checkpointing:
        enable_gradient_checkpointing(pipe.transformer)
        pipe.transformer.train()
    return pipe


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_student_gradients_reach_only_its_adapter_also_with_role_aware_checkpointing(folders, family):
    grads = []
    for checkpointing in (False, True):
        pipe = _with_roles(folders, family, STUDENT, checkpointing)
        if checkpointing:
            assert pipe.transformer.gradient_checkpointing
        call = _one_call(pipe, family)
        with student_role(pipe.transformer):
            student = call()
        with discriminator_role(pipe.transformer), torch.no_grad():
            other = call()  # another role between forward and backward: the recompute must use the student's
        (student - other).square().mean().backward()
        named = dict(pipe.transformer.named_parameters())
        assert all(p.grad is None for n, p in named.items() if f".{STUDENT}." not in n)
        grads.append({n: p.grad for n, p in lora_parameters(pipe.transformer, STUDENT).items()})
        assert all(g is not None for g in grads[-1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_default_feature_blocks(folders):
    pipe = load(folders["sd3"])
    assert ref.default_feature_blocks(pipe.transformer) == [0, 1]
    assert ref.default_feature_blocks(pipe.transformer, every=2) == [0]


def test_sd3_teacher_trajectory_ends_where_the_pipeline_ends_on_the_same_fine_grid(folders):
    pipe = load(folders["sd3"])
    schedule = FlowSchedule.from_config(pipe.scheduler.config)
    coarse, k = schedule.trailing_sigmas(2), 3
    grid = schedule.slot_grid(coarse, k)
    cond, uncond = ref.encode_prompt_sd3(pipe, PROMPTS, max_sequence_length=MAX_TOKENS)
    x = _latents(11)
    with torch.no_grad():
        positions, _ = ref.teacher_trajectory(
            lambda z, t: ref.sd3_guided_velocity(pipe.transformer, z, t, cond, uncond, SD3_CFG), x, coarse, k, schedule
        )
    # the pipeline shifts the sigmas it is given: hand it the fine grid before the shift
    unshifted = schedule.remove_shift(grid[:-1].double().numpy()).tolist()
    expected = pipe(
        prompt=PROMPTS, sigmas=unshifted, height=IMAGE, width=IMAGE, output_type="latent", latents=x.clone(),
        guidance_scale=SD3_CFG, max_sequence_length=MAX_TOKENS,
    ).images
    torch.testing.assert_close(positions[:, -1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_block_features_train_the_discriminator_adapter_also_with_checkpointing(folders, family):
    grads = []
    for checkpointing in (False, True):
        pipe = _with_roles(folders, family, DISCRIMINATOR, checkpointing)
        torch.manual_seed(0)
        head = Head(32, kernel_size=1)
        x, t = _latents(9), torch.full([2], 300.0)
        if family == "sd3":
            cond, _ = ref.encode_prompt_sd3(pipe, PROMPTS, max_sequence_length=MAX_TOKENS, guidance=False)
        else:
            cond = ref.encode_prompt_flux(pipe, PROMPTS, max_sequence_length=MAX_TOKENS)
        guidance = FLUX_GUIDANCE if family == "flux" else None
        with discriminator_role(pipe.transformer):
            feats = ref.block_features(pipe.transformer, x, t, cond, [0], flux_guidance=guidance)
        with student_role(pipe.transformer), torch.no_grad():
            _one_call(pipe, family)()  # another role before backward
        head(feats[0]).mean().backward()
        grads.append({n: p.grad for n, p in lora_parameters(pipe.transformer, DISCRIMINATOR).items()})
        assert any(g is not None and g.abs().sum() > 0 for g in grads[-1].values())
        assert all(p.grad is None for n, p in lora_parameters(pipe.transformer, STUDENT).items())
    for name, g in grads[0].items():
        if g is None:  # adapters on blocks after the stop get no gradient, with or without checkpointing
            assert grads[1][name] is None
        else:
            torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6)
