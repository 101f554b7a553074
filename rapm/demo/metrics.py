"""Metrics on generated digits: Fréchet distance, prompt accuracy, and the real-vs-real floor.

All of them read images as ``Teacher.decode`` returns them: float tensors
[B, 1, 16, 16] in [-1, 1]. Features are the shipped classifier's 64-d
penultimate layer (``rapm.demo.classifier``); the reference set is the 300
held-out real digits, which neither the teacher nor the classifier saw.

The Fréchet distance of a finite sample is biased upward, the more so the
smaller the sample, so compare a generator's FD with ``real_floor(n)`` at the
same n: the FD of n real train-split digits against the same held-out set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rapm.distribution import frechet_distance
from rapm.demo.classifier import CLASSIFIER_DIR, load_classifier
from rapm.demo.data import IMAGE_SIZE, load_split


class DigitsMetrics:
    """Loads the digits classifier once; measures generated images against the held-out real digits."""

    def __init__(self, classifier_dir: str | Path = CLASSIFIER_DIR, batch_size: int = 500):
        self.classifier = load_classifier(classifier_dir)
        self.batch_size = batch_size
        held_out = load_split("held_out")
        self.reference_features = self.features(held_out.images)

    @staticmethod
    def _check(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"digits images must be [B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}] in [-1, 1], got {tuple(images.shape)}")
        return images.detach().float().cpu().clamp(-1, 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """The classifier's 64-d penultimate features [B, 64] (float64)."""
        images = self._check(images)
        out = [self.classifier.features(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return torch.cat(out).double().numpy()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's digit for each image [B] (int64)."""
        images = self._check(images)
        out = [self.classifier(images[i : i + self.batch_size]).argmax(1) for i in range(0, len(images), self.batch_size)]
        return torch.cat(out)

    def fd(self, images: torch.Tensor) -> float:
        """Fréchet distance of the images' features to the held-out real digits'."""
        return frechet_distance(self.features(images), self.reference_features)

    def prompt_accuracy(self, images: torch.Tensor, digits: Sequence[int] | torch.Tensor) -> float:
        """Fraction of images the classifier reads as the digit their prompt asked for."""
        digits = torch.as_tensor(digits, dtype=torch.long).reshape(-1)
        if len(digits) != len(images):
            raise ValueError(f"{len(images)} images but {len(digits)} digits")
        return float((self.predict(images) == digits).float().mean())

    def real_floor(self, n: int, seed: int = 0, draws: int = 10) -> float:
        """FD of n train-split real digits against the held-out reals: the floor at sample size n.

        The mean over ``draws`` seeded draws of n images, since one draw's FD varies by tens of percent.
        """
        train = load_split("train")
        if not 2 <= n <= len(train):
            raise ValueError(f"real_floor needs 2 <= n <= {len(train)} (the train split), got {n}")
        feats = self.features(train.images)
        gen = torch.Generator().manual_seed(seed)
        fds = [frechet_distance(feats[torch.randperm(len(train), generator=gen)[:n].numpy()], self.reference_features)
               for _ in range(draws)]
        return float(np.mean(fds))
