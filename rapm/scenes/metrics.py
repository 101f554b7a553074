"""Metrics on generated scenes: prompt accuracy read analytically (``rapm.scenes.data.check``), features of the scenes
classifier for the Fréchet distance and precision / recall (``rapm.distribution``), and the world-vs-world floor.

Images are read as ``Teacher.decode`` returns them: float tensors [B, 3, 32, 32] in [-1, 1]. The reference set is
``REFERENCE_SIZE`` draws of the world from a fixed seed that neither the teacher's trainer nor the classifier's uses.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rapm.distribution import frechet_distance
from rapm.scenes.classifier import CLASSIFIER_DIR, labelled_draws, load_classifier
from rapm.scenes.data import SIZE, Scene, all_scenes, check

REFERENCE_SIZE = 1000
REFERENCE_SEED = 20_000  # the classifier trains on seed 0's stream and tests on 10_000's; the teacher on torch's


@lru_cache(maxsize=1)
def _by_prompt() -> dict[str, Scene]:
    return {s.prompt(): s for s in all_scenes()}


def scene_of(prompt: str) -> Scene | None:
    """The scene a prompt of the world names (None for another text)."""
    return _by_prompt().get(prompt.strip())


HELD_OUT_SCENES = 300  # the first of the world's seeded order: evaluation's prompts, never a training prompt


def _order(seed: int = 0) -> list[Scene]:
    scenes = all_scenes()
    return [scenes[i] for i in np.random.default_rng(seed).permutation(len(scenes))]


def evaluation_scenes(n: int) -> list[Scene]:
    """``n`` held-out scenes (none of ``training_scenes``; each attribute value about equally often), repeated in
    order beyond HELD_OUT_SCENES."""
    pool = _order()[:HELD_OUT_SCENES]
    return [pool[i % len(pool)] for i in range(n)]


def training_scenes() -> list[Scene]:
    """The world's scenes but the held-out ones: the prompts to store trajectories of (420)."""
    return _order(0)[HELD_OUT_SCENES:]


def attribute_accuracy(images: torch.Tensor, scenes: Sequence[Scene]) -> dict[str, float]:
    """Per attribute, the fraction of images showing what their prompt asks; "all": every attribute at once."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    found = [check(im, s) for im, s in zip(images.detach().float().cpu().clamp(-1, 1).numpy(), scenes)]
    out = {name: float(np.mean([f[name] for f in found])) for name in found[0]} if found else {}
    out["all"] = float(np.mean([all(f.values()) for f in found])) if found else float("nan")
    return out


class ScenesMetrics:
    """Loads the scenes classifier once; measures generated images against draws of the world."""

    def __init__(self, classifier_dir: str | Path = CLASSIFIER_DIR, batch_size: int = 500):
        self.classifier = load_classifier(classifier_dir)
        self.batch_size = batch_size
        images, _ = labelled_draws(REFERENCE_SIZE, np.random.default_rng(REFERENCE_SEED))
        self.reference_images = images
        self.reference_features = self.features(images)

    @staticmethod
    def _check(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, SIZE, SIZE):
            raise ValueError(f"scenes images must be [B, 3, {SIZE}, {SIZE}] in [-1, 1], got {tuple(images.shape)}")
        return images.detach().float().cpu().clamp(-1, 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """The classifier's 128-d features [B, 128] (float64)."""
        images = self._check(images)
        out = [self.classifier.features(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return torch.cat(out).double().numpy()

    def prompt_accuracy(self, images: torch.Tensor, scenes: Sequence[Scene]) -> float:
        """Fraction of images showing every attribute their prompt names."""
        return attribute_accuracy(self._check(images), scenes)["all"]

    def real_floor(self, n: int, seed: int = 0, draws: int = 5) -> float:
        """FD of n other draws of the world against the reference draws: the floor at sample size n (mean of
        ``draws`` seeded sets)."""
        if n < 2:
            raise ValueError(f"real_floor needs n >= 2, got {n}")
        return float(np.mean([frechet_distance(self.features(labelled_draws(n, np.random.default_rng(seed + 1 + d))[0]),
                                               self.reference_features) for d in range(draws)]))
