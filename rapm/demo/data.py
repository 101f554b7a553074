"""The digits data: scikit-learn's bundled handwritten digits as 16x16 images in [-1, 1].

``sklearn.datasets.load_digits`` ships 1,797 8x8 grey images (values 0..16) with
the package, so nothing is downloaded. They are upscaled to 16x16 (bilinear),
kept as one channel and scaled to [-1, 1].

The built-in teacher works in **pixel space**: there is no VAE, the teacher's
"latents" are these 16x16 images themselves, and ``Teacher.decode`` only clamps
them to [-1, 1].

The split is fixed and stratified: from each digit's images (in a seeded
order) 30 are held out, 300 in all, for evaluation only; the other 1,497 train
the teacher and the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
SPLIT_SEED = 0
HELD_OUT_PER_DIGIT = 30


@dataclass(frozen=True)
class DigitsSplit:
    """Images [N, 1, 16, 16] float32 in [-1, 1] and their digits [N] int64."""

    images: torch.Tensor
    digits: torch.Tensor

    def __len__(self) -> int:
        return self.digits.shape[0]


def to_images(pixels_8x8: np.ndarray) -> torch.Tensor:
    """sklearn's 8x8 digits (values 0..16, [N, 8, 8]) as [N, 1, 16, 16] float32 in [-1, 1]."""
    x = torch.as_tensor(np.asarray(pixels_8x8, dtype=np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1).contiguous()


def split_indices(digits: np.ndarray, seed: int = SPLIT_SEED, held_out_per_digit: int = HELD_OUT_PER_DIGIT) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and held-out indices: ``held_out_per_digit`` of each digit held out, chosen by a seeded shuffle."""
    rng = np.random.RandomState(seed)
    held_out = []
    for d in range(10):
        idx = np.flatnonzero(digits == d)
        held_out.append(rng.permutation(idx)[:held_out_per_digit])
    held = np.sort(np.concatenate(held_out))
    train = np.setdiff1d(np.arange(len(digits)), held)
    return train, held


@lru_cache(maxsize=None)
def _splits() -> dict[str, DigitsSplit]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    digits = np.asarray(bunch.target, dtype=np.int64)
    images = to_images(bunch.images)
    train, held = split_indices(digits)
    return {
        "train": DigitsSplit(images[train], torch.as_tensor(digits[train])),
        "held_out": DigitsSplit(images[held], torch.as_tensor(digits[held])),
    }


def load_split(name: str) -> DigitsSplit:
    """``"train"`` (1,497 images: teacher and classifier training) or ``"held_out"`` (300: evaluation only)."""
    splits = _splits()
    if name not in splits:
        raise ValueError(f"digits split must be one of {', '.join(splits)}, got {name!r}")
    s = splits[name]
    return DigitsSplit(s.images.clone(), s.digits.clone())
