"""The second built-in teacher's world (issue 32, started): 32x32 RGB procedural scenes from a prompt, many images
per prompt, and every attribute a prompt names read back from the image itself."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rapm.scenes.data import COLOURS, SHAPES, all_scenes, check, draw
from rapm.scenes.metrics import scene_of

SCENES = all_scenes()
SAMPLE = [SCENES[i] for i in np.random.default_rng(0).choice(len(SCENES), 300, replace=False)]


def test_the_world_has_every_combination_once_each_with_its_own_prompt():
    assert len(SCENES) == 2 * 4 * 2 * 5 * 3 * 3 == 720
    assert len({s.prompt() for s in SCENES}) == len(SCENES)
    assert SCENES[0].prompt() == "one red square on the left over green stripes"


def test_a_seed_draws_one_image_and_a_prompt_has_many():
    scene = SCENES[123]
    a, b = draw(scene, 7), draw(scene, 7)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and np.array_equal(a, b)
    assert -1 <= a.min() and a.max() <= 1
    others = [draw(scene, s) for s in range(8)]
    assert min(np.abs(x - y).mean() for i, x in enumerate(others) for y in others[i + 1:]) > 0.05  # many modes


def test_the_worlds_own_images_pass_their_checks():
    """The checks' floor: what a perfect sampler (the world itself) scores; the teacher and students are measured
    against it."""
    results = [check(draw(s, k), s) for k, s in enumerate(SAMPLE)]
    rate = {a: np.mean([r[a] for r in results]) for a in results[0]}
    assert rate["colour"] == 1 and rate["count"] == 1 and rate["region"] == 1 and rate["background"] == 1, rate
    assert rate["shape"] >= 0.95, rate  # a triangle clipped by its neighbour can read as a square


@pytest.mark.parametrize("attribute", ["shape", "count", "region", "colour", "background"])
def test_a_scene_the_image_does_not_show_fails_its_check(attribute):
    wrong = 0
    tried = 0
    for k, s in enumerate(SAMPLE[:120]):
        if attribute == "shape":
            alt = replace(s, shape=SHAPES[(SHAPES.index(s.shape) + 1) % len(SHAPES)])
        elif attribute == "count":
            alt = replace(s, count=s.count % 2 + 1)
        elif attribute == "region":
            if s.region not in ("left", "right"):
                continue
            alt = replace(s, region="right" if s.region == "left" else "left")
        elif attribute == "colour":
            alt = replace(s, colour=next(c for c in COLOURS if c not in (s.colour, s.background)))
        else:
            alt = replace(s, background=next(c for c in COLOURS if c not in (s.colour, s.background)))
        tried += 1
        wrong += check(draw(s, k), alt)[attribute]
    assert tried >= 30 and wrong / tried <= 0.03, (wrong, tried)


def test_the_teacher_trainer_runs_and_its_folder_loads_as_a_teacher(tmp_path):
    """Two steps of rapm.scenes.train_teacher (the digits trainer's loop on this world's batches): the folder
    loads through the path a user takes, and its prompts encode within the tokenizer's length."""
    import torch

    from rapm.demo.train_teacher import save_teacher, train_teacher
    from rapm.scenes.train_teacher import build_modules, pyramid_noise, scene_batches
    from rapm.teacher import load_teacher

    modules = build_modules(0)
    images, ids = scene_batches(modules[0])(torch.Generator().manual_seed(0), 4)
    assert images.shape == (4, 3, 32, 32) and ids.shape == (4, 16)
    *trained, record = train_teacher(seed=0, steps=2, batch_size=4, log_every=1, modules=modules,
                                     batches=scene_batches(modules[0]), noise=pyramid_noise)
    folder = save_teacher(*trained, record, tmp_path / "teacher")
    teacher = load_teacher(folder)
    assert teacher.family == "sd" and teacher.latent_shape == (3, 32, 32)
    cond, _ = teacher.encode_prompts([SCENES[0].prompt()])
    assert cond.prompt_embeds.shape == (1, 16, 64)


def test_the_training_noise_has_unit_variance_and_strong_coarse_components():
    """The scenes teacher's training noise: what a sample starts from has unit variance like white noise, but its mean
    colour and its left-right difference vary 2-5x more, so the noisy input cannot give them away."""
    import torch

    from rapm.scenes.train_teacher import pyramid_noise

    noise, white = pyramid_noise((512, 3, 32, 32), torch.Generator().manual_seed(0)), torch.randn(512, 3, 32, 32)
    assert abs(float(noise.std()) - 1) < 0.01

    def coarse(x):
        return float(x.mean(dim=(2, 3)).std()), float((x[..., :16].mean((2, 3)) - x[..., 16:].mean((2, 3))).std())

    (mean, half), (white_mean, white_half) = coarse(noise), coarse(white)
    assert mean > 3 * white_mean and half > 2 * white_half


# --- metrics and plug-in -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scene_metrics():
    from rapm.scenes.metrics import ScenesMetrics

    return ScenesMetrics()


def _images(scenes, seed0=0):
    import torch

    return torch.from_numpy(np.stack([draw(s, seed0 + k) for k, s in enumerate(scenes)]))


def test_the_world_against_itself_sits_at_the_floor_and_a_blurred_or_collapsed_sampler_does_not(scene_metrics):
    """The distribution metrics in the shipped classifier's features tell a sampler that blurs (sharpness, FD) or
    drops modes (recall) from the world itself."""
    import torch

    from rapm.distribution import distribution_metrics
    from rapm.scenes.metrics import evaluation_scenes

    scenes = evaluation_scenes(300)
    world = _images(scenes, 1000)
    blurred = torch.nn.functional.avg_pool2d(world, 3, 1, 1, count_include_pad=False)
    collapsed = _images([scenes[0]] * 300, 5000)  # one prompt's images for every prompt

    def measure(images):
        return distribution_metrics(scene_metrics.reference_features, scene_metrics.features(images),
                                    scene_metrics.reference_images, images)

    same, blur, one = measure(world), measure(blurred), measure(collapsed)
    assert same["precision"] > 0.85 and same["recall"] > 0.85 and 0.9 < same["sharpness"] < 1.1, same
    assert blur["sharpness"] < 0.5 * same["sharpness"] and blur["fd"] > 5 * same["fd"], (blur, same)
    assert one["recall"] < 0.2 and one["fd"] > 3 * same["fd"], (one, same)
    assert scene_metrics.prompt_accuracy(world, scenes) > 0.9
    assert scene_metrics.prompt_accuracy(collapsed, scenes) < 0.1


def test_the_plugin_reads_prompts_back_as_scenes_and_gives_real_items():
    from rapm.scenes.metrics import scene_of
    from rapm.scenes.plugin import PLUGIN

    prompts = PLUGIN.evaluation_prompts(20)
    assert len(set(prompts)) == 20 and all(PLUGIN.label_of(p) == scene_of(p) is not None for p in prompts)
    assert PLUGIN.label_of("a photo of a cat") is None
    net, channels = PLUGIN.feature_net("cpu")
    import torch

    assert net(torch.zeros(2, *PLUGIN.feature_shape())).shape == (2, channels, 4, 4)


def test_evaluation_prompts_are_held_out_from_the_training_prompts():
    from rapm.scenes.metrics import HELD_OUT_SCENES, evaluation_scenes, training_scenes

    held, train = evaluation_scenes(HELD_OUT_SCENES), training_scenes()
    assert len(set(held)) == HELD_OUT_SCENES and not set(held) & set(train)
    assert len(held) + len(train) == len(SCENES)
    assert evaluation_scenes(HELD_OUT_SCENES + 5)[-5:] == held[:5]  # repeated in order beyond the held-out set


# --- the shipped teacher -------------------------------------------------------------------------------------------------

SHIPPED = pytest.mark.skipif(not (Path(__file__).parent.parent / "rapm/scenes/teacher/model_index.json").exists(),
                             reason="the scenes teacher is not shipped in this checkout")


@SHIPPED
def test_scenes_names_the_shipped_teacher_with_its_plugin_guidance_and_preset():
    from rapm import config as cfg
    from rapm.families import BUILTIN_TEACHERS
    from rapm.plugins import plugin_for, teacher_file
    from rapm.teacher import load_teacher

    teacher = load_teacher("scenes")
    assert teacher.path == BUILTIN_TEACHERS["scenes"] and teacher.family == "sd"
    assert teacher.latent_shape == (3, 32, 32) and teacher.vae is None
    assert plugin_for("scenes").name == "scenes" and plugin_for(teacher).name == "scenes"
    assert teacher_file("scenes")["guidance"] == 3.0
    assert cfg.default_preset("scenes", "sd") == "scenes" and cfg.PRESETS["scenes"]["lora_rank"] == 16
    # every training and held-out prompt fits the tokenizer
    tok = teacher.tokenizers[0]
    assert max(len(tok(s.prompt()).input_ids) for s in SCENES) <= tok.model_max_length


@SHIPPED
def test_the_shipped_teacher_follows_its_prompts_in_a_plain_diffusers_pipeline():
    """Sampled by diffusers itself (no rapm code), the teacher draws what its held-out prompts ask far more often than
    what another prompt asks: it is text-conditioned, so a student has prompts to follow."""
    import torch
    from diffusers import StableDiffusionPipeline

    from rapm.families import BUILTIN_TEACHERS
    from rapm.scenes.metrics import attribute_accuracy, evaluation_scenes

    pipe = StableDiffusionPipeline.from_pretrained(BUILTIN_TEACHERS["scenes"], vae=None)
    pipe.set_progress_bar_config(disable=True)
    scenes = evaluation_scenes(16)
    images = pipe([s.prompt() for s in scenes], num_inference_steps=10, guidance_scale=3.0, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (16, 3, 32, 32)
    own = attribute_accuracy(images, scenes)
    other = attribute_accuracy(images, scenes[1:] + scenes[:1])  # each image against its neighbour's prompt
    mean = lambda acc: np.mean([v for k, v in acc.items() if k != "all"])  # noqa: E731
    assert own["colour"] >= 0.8 and own["shape"] >= 0.6, own
    assert mean(own) >= mean(other) + 0.2, (own, other)


def test_every_word_of_the_world_is_one_token_and_every_prompt_fits():
    """BPE ranks its merges: one word's chain can break another's (with "right" first, "triangle" came out as t, ri,
    a, n, ...), and a prompt then ran past the tokenizer's 16 tokens. The builder mends such words."""
    from rapm.demo.clip import build_clip_tokenizer
    from rapm.scenes.train_teacher import TOKENIZER_MAX_LENGTH, vocabulary

    tok = build_clip_tokenizer(vocabulary(), model_max_length=TOKENIZER_MAX_LENGTH)
    assert {"triangle", "triangles", "squares", "stripes"} <= set(vocabulary())
    assert [w for w in vocabulary() if len(tok.tokenize(w)) != 1] == []
    assert max(len(tok(s.prompt()).input_ids) for s in SCENES) <= TOKENIZER_MAX_LENGTH


@SHIPPED
def test_pcm_on_the_scenes_teacher_trains_on_the_scenes_world_not_the_digits():
    """A built-in teacher's real data is its own plug-in's: PCM's default real_data on scenes is "scenes"."""
    from rapm import config as cfg
    from rapm.methods import build_method
    from rapm.realdata import load_real_data

    method = build_method(cfg.apply_overrides(cfg.TrainConfig(), {"method": "pcm", "teacher": "scenes"}, "test"), 25)
    assert method.real_data == "scenes"
    data = load_real_data("scenes", "scenes")
    assert tuple(data.latents.shape[1:]) == (3, 32, 32) and len(data) >= 1000 and len(data.texts) > 100  # distinct
    assert all(scene_of(t) is not None for t in data.texts[:50])


@SHIPPED
def test_every_verb_runs_on_the_scenes_teacher_by_name(tmp_path):
    """trajectories, rapm-paper training (both discriminators on 3 x 32 x 32), export and a plain diffusers load of
    the student, on --teacher scenes, each through the library function its verb wraps."""
    import json

    import torch
    from diffusers import StableDiffusionPipeline

    from rapm.export import export_lora
    from rapm.families import BUILTIN_TEACHERS
    from rapm.run import load_student
    from rapm.train import resolve_config, train
    from rapm.trajectories import write_trajectories

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(s.prompt() + "\n" for s in SCENES[:4]))
    store = write_trajectories("scenes", prompts, tmp_path / "store", steps=2, substeps=2, seed=0, batch_size=4,
                               progress=False)
    assert store.manifest["guidance"] == 3.0 and tuple(store.latent_shape) == (3, 32, 32)
    config = resolve_config("scenes", str(tmp_path / "store"), None, None,
                            {"method": "rapm-paper", "iterations": 2, "batch_size": 1, "eval_every": 0,
                             "sample_every": 0, "checkpoint_every": 2})
    assert config.preset == "scenes" and config.lora_rank == 16
    train(config, tmp_path / "run", progress=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    assert {e["phase"] for e in logs} >= {"discriminator", "student"}
    teacher, unet, _ = load_student(tmp_path / "run")
    lora = export_lora(unet, "scenes", teacher.family, tmp_path / "lora", steps=2)
    pipe = StableDiffusionPipeline.from_pretrained(BUILTIN_TEACHERS["scenes"], vae=None)
    pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    out = pipe([SCENES[0].prompt()], num_inference_steps=2, guidance_scale=1.0, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
