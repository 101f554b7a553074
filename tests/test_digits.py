"""The built-in digits teacher, its data, prompts, classifier and metrics."""

import json

import pytest
import torch

from rapm.demo import DIGITS_GUIDANCE
from rapm.demo.classifier import accuracy, load_classifier
from rapm.demo.data import load_split
from rapm.demo.metrics import DigitsMetrics
from rapm.demo.prompts import (PHRASINGS, digit_of, evaluation_prompts, phrase, training_prompts,
                               vocabulary)
from rapm.diffusion import coarse_timesteps, sample_positions
from rapm.distribution import frechet_distance
from rapm.families import BUILTIN_TEACHERS
from rapm.teacher import guided_output, load_teacher
from rapm.demo.clip import SD_SCHEDULER


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits")


@pytest.fixture(scope="module")
def metrics():
    return DigitsMetrics()


def test_split_is_fixed_disjoint_and_balanced():
    train, held_out = load_split("train"), load_split("held_out")
    assert (len(train), len(held_out)) == (1497, 300)
    assert train.images.shape[1:] == held_out.images.shape[1:] == (1, 16, 16)
    assert torch.bincount(held_out.digits, minlength=10).tolist() == [30] * 10
    for split in (train, held_out):
        assert split.images.min() >= -1 and split.images.max() <= 1
        assert split.images.min() == -1 and split.images.max() == 1  # background and full ink
    # No held-out image is in the train split.
    flat_train = train.images.flatten(1)
    for img in held_out.images[:50]:
        assert not (flat_train == img.flatten()).all(1).any()
    assert torch.equal(load_split("held_out").images, held_out.images)


def test_digit_of_parses_every_phrasing():
    for d in range(10):
        for p in PHRASINGS:
            assert digit_of(phrase(d, p)) == d
    assert [digit_of(p) for p in training_prompts()] == [d for d in range(10) for _ in PHRASINGS]
    assert all(digit_of(p) == d for p, d in evaluation_prompts(100))
    assert digit_of("THE NUMBER SEVEN") == 7
    for bad in ("a handwritten digit", "3 or 4", "seventeen", "someone"):
        with pytest.raises(ValueError):
            digit_of(bad)


def test_evaluation_prompts_are_balanced_and_fixed():
    pairs = evaluation_prompts(500)
    assert pairs == evaluation_prompts(500)
    assert torch.bincount(torch.tensor([d for _, d in pairs])).tolist() == [50] * 10
    assert {p for p, _ in pairs} <= set(training_prompts())


def test_load_teacher_digits_is_a_pixel_space_sd_pipeline(teacher):
    assert teacher.path == BUILTIN_TEACHERS["digits"]
    assert teacher.family == "sd"
    assert teacher.latent_shape == (1, 16, 16)
    assert teacher.vae is None and teacher.vae_scale_factor == 1
    index = json.loads((teacher.path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["vae"] == [None, None]
    for key, value in SD_SCHEDULER.items():
        assert teacher.scheduler_config[key] == value
    assert teacher.schedule.prediction_type == "epsilon"
    # Every prompt word is one token, and every prompt fits the tokenizer.
    tok = teacher.tokenizers[0]
    for word in vocabulary():
        assert len(tok(word).input_ids) == 3, word
    assert max(len(tok(p).input_ids) for p in training_prompts()) <= tok.model_max_length
    cond, uncond = teacher.encode_prompts(["digit 3", "the number seven"])
    assert cond.prompt_embeds.shape[:2] == (2, tok.model_max_length)
    assert cond.prompt_embeds.shape[2] == teacher.unet.config.cross_attention_dim
    z = torch.randn(2, *teacher.latent_shape)
    with torch.no_grad():
        out = teacher.unet_output(z, torch.tensor([999, 10]), cond)
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert torch.equal(teacher.decode(torch.full((1, 1, 16, 16), 3.0)), torch.ones(1, 1, 16, 16))


def test_diffusers_loads_the_teacher_folder():
    from diffusers import StableDiffusionPipeline

    # diffusers requires a pipeline's null non-optional components (here the VAE) to be passed as None.
    pipe = StableDiffusionPipeline.from_pretrained(BUILTIN_TEACHERS["digits"], vae=None)
    assert pipe.vae is None
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(["digit 3"], num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 1, 16, 16) and torch.isfinite(latents).all()


def test_classifier_held_out_accuracy():
    held_out = load_split("held_out")
    assert accuracy(load_classifier(), held_out.images, held_out.digits) >= 0.95


def test_prompt_accuracy_of_real_held_out_digits(metrics):
    held_out = load_split("held_out")
    assert metrics.prompt_accuracy(held_out.images, held_out.digits) >= 0.95
    wrong = (held_out.digits + 1) % 10
    assert metrics.prompt_accuracy(held_out.images, wrong) <= 0.05


def test_frechet_distance_is_zero_on_itself_and_grows_with_noise(metrics):
    held_out = load_split("held_out").images
    feats = metrics.features(held_out)
    assert feats.shape == (300, 64)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fd(held_out) == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(held_out.shape, generator=gen)
    fds = [metrics.fd((held_out + s * noise).clamp(-1, 1)) for s in (0.1, 0.3, 0.6)]
    assert 0 < fds[0] < fds[1] < fds[2]
    # Real digits sit far closer to real digits than noise does.
    floor = metrics.real_floor(300)
    assert 0 < floor < metrics.fd(torch.rand(300, 1, 16, 16, generator=gen) * 2 - 1) / 10


def test_frechet_distance_of_gaussians_matches_closed_form():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=gen).double()
    b = a * 2 + 1  # mean 1, covariance 4 I: FD = 3 * 1 + 3 * (1 + 4 - 2 * 2) = 6
    assert frechet_distance(a.numpy(), b.numpy()) == pytest.approx(6.0, rel=0.05)


def test_teacher_few_step_ddim_follows_prompts(teacher, metrics):
    digits = list(range(10)) * 2
    prompts = [phrase(d, PHRASINGS[i % len(PHRASINGS)]) for i, d in enumerate(digits)]
    cond, uncond = teacher.encode_prompts(prompts)
    z = torch.randn(len(digits), *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = sample_positions(lambda x, t: guided_output(teacher.unet, x, t, cond, uncond, DIGITS_GUIDANCE),
                                 teacher.schedule, z, coarse_timesteps(1000, 20))[-1]
    images = teacher.decode(final)
    assert images.shape == (20, 1, 16, 16)
    assert metrics.prompt_accuracy(images, digits) >= 0.7  # chance is 0.1
