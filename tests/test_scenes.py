"""The second built-in teacher's world (issue 32, started): 32x32 RGB procedural scenes from a prompt, many images
per prompt, and every attribute a prompt names read back from the image itself."""

from dataclasses import replace

import numpy as np
import pytest

from rapm.scenes.data import COLOURS, SHAPES, all_scenes, check, draw

SCENES = all_scenes()
SAMPLE = [SCENES[i] for i in np.random.default_rng(0).choice(len(SCENES), 300, replace=False)]


def test_the_world_has_every_combination_once_each_with_its_own_prompt():
    assert len(SCENES) == 3 * 4 * 3 * 5 * 3 * 3 == 1620
    assert len({s.prompt() for s in SCENES}) == len(SCENES)
    assert SCENES[0].prompt() == "one red circle on the left over green stripes"


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
    assert rate["shape"] >= 0.95, rate  # a 3-pixel triangle can read as a circle


@pytest.mark.parametrize("attribute", ["shape", "count", "region", "colour", "background"])
def test_a_scene_the_image_does_not_show_fails_its_check(attribute):
    wrong = 0
    tried = 0
    for k, s in enumerate(SAMPLE[:120]):
        if attribute == "shape":
            alt = replace(s, shape=SHAPES[(SHAPES.index(s.shape) + 1) % 3])
        elif attribute == "count":
            alt = replace(s, count=s.count % 3 + 1)
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
    from rapm.scenes.train_teacher import build_modules, scene_batches
    from rapm.teacher import load_teacher

    modules = build_modules(0)
    images, ids = scene_batches(modules[0])(torch.Generator().manual_seed(0), 4)
    assert images.shape == (4, 3, 32, 32) and ids.shape == (4, 16)
    *trained, record = train_teacher(seed=0, steps=2, batch_size=4, log_every=1, modules=modules,
                                     batches=scene_batches(modules[0]))
    folder = save_teacher(*trained, record, tmp_path / "teacher")
    teacher = load_teacher(folder)
    assert teacher.family == "sd" and teacher.latent_shape == (3, 32, 32)
    cond, _ = teacher.encode_prompts([SCENES[0].prompt()])
    assert cond.prompt_embeds.shape == (1, 16, 64)
