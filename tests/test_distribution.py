"""Distribution metrics (rapm.distribution): precision / recall / coverage move the way their papers say when a sampler
drops modes or makes things up, and the high-frequency energy falls when images are blurred."""

import numpy as np
import pytest
import torch

from rapm.distribution import distribution_metrics, high_frequency_energy, precision_recall


def _modes(n: int, centres: np.ndarray, rng) -> np.ndarray:
    return centres[rng.integers(0, len(centres), n)] + rng.normal(0, 0.3, (n, centres.shape[1]))


CENTRES = np.random.default_rng(0).normal(0, 10, (8, 6))


def test_a_sample_of_the_same_distribution_has_precision_and_recall_near_one():
    rng = np.random.default_rng(1)
    m = precision_recall(_modes(400, CENTRES, rng), _modes(400, CENTRES, rng))
    assert m["precision"] > 0.85 and m["recall"] > 0.85 and m["coverage"] > 0.8, m


def test_dropping_modes_lowers_recall_and_coverage_but_not_precision():
    rng = np.random.default_rng(2)
    real = _modes(400, CENTRES, rng)
    dropped = _modes(400, CENTRES[:2], rng)  # two of eight modes
    m = precision_recall(real, dropped)
    assert m["precision"] > 0.9, m
    assert m["recall"] < 0.4 and m["coverage"] < 0.4, m


def test_samples_off_the_data_lower_precision():
    rng = np.random.default_rng(3)
    real = _modes(400, CENTRES, rng)
    made_up = np.concatenate([_modes(200, CENTRES, rng), rng.normal(0, 10, (200, 6)) + 40])
    m = precision_recall(real, made_up)
    assert 0.4 < m["precision"] < 0.6, m


def test_too_few_points_for_k_is_an_error():
    with pytest.raises(ValueError, match="nearest neighbours"):
        precision_recall(np.zeros((3, 4)), np.zeros((10, 4)), k=3)


def test_blurring_lowers_the_high_frequency_energy_and_a_flat_image_has_none():
    gen = torch.Generator().manual_seed(0)
    sharp = (torch.rand(8, 3, 32, 32, generator=gen) > 0.5).float() * 2 - 1
    kernel = torch.ones(3, 1, 3, 3) / 9
    blurred = torch.nn.functional.conv2d(sharp, kernel, padding=1, groups=3)
    assert high_frequency_energy(blurred) < 0.5 * high_frequency_energy(sharp)
    assert high_frequency_energy(torch.full((2, 3, 32, 32), 0.3)) == 0.0


def test_distribution_metrics_of_a_set_against_itself_are_at_their_floor():
    rng = np.random.default_rng(4)
    feats = _modes(300, CENTRES, rng)
    images = torch.from_numpy(rng.normal(0, 1, (10, 3, 8, 8)))
    m = distribution_metrics(feats, feats, images, images)
    assert m["fd"] < 1e-6 and m["precision"] == m["recall"] == m["coverage"] == 1.0
    assert m["sharpness"] == pytest.approx(1.0)


def test_validation_measures_the_distribution_against_the_teacher_from_other_noise(tmp_path):
    """With val_reference_steps > 0 and a plug-in's metrics, validation logs FD, precision / recall / coverage and
    sharpness against the teacher's images of the same prompts from other noise: the teacher's own other-noise images
    score at the floor, its same-noise images (another sample of the same distribution) near it."""
    from rapm.demo.prompts import training_prompts
    from rapm.store import open_store
    from rapm.teacher import load_teacher
    from rapm.trajectories import write_trajectories
    from rapm.validation import Validation

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in training_prompts()[:16]))
    write_trajectories("digits", prompts, tmp_path / "store", steps=2, substeps=2, seed=0, batch_size=16,
                       shard_size=16, progress=False)
    teacher = load_teacher("digits")
    validation = Validation(teacher, open_store(tmp_path / "store"), list(range(16)), "cpu", torch.float32,
                            reference_steps=4)
    floor = validation.measure(validation.other_images)
    assert floor["val_fd_teacher_other"] < 1e-6 and floor["val_precision"] == floor["val_recall"] == 1.0
    assert floor["val_sharpness"] == pytest.approx(1.0)
    same_noise = validation.measure(validation.reference_images)
    assert same_noise["val_fd_teacher_other"] > 0 and 0 < same_noise["val_recall"] <= 1
    assert not torch.allclose(validation.other_images, validation.reference_images)
