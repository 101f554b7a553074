"""The scenes classifier: a small CNN reading a scene's six attributes, whose 128-d features give the distribution
metrics (Fréchet distance, precision / recall) of the scenes teacher.

Prompt accuracy needs no trained model (``rapm.scenes.data.check`` reads the attributes analytically); this network
exists for a feature space in which texture, shape, colour, count and place all matter, so that a blurry or
mode-dropping sampler moves its features. Trained on fresh draws of the world (no image seen twice), one head per
attribute. Shipped in ``rapm/scenes/classifier/`` as ``model.safetensors`` and ``config.json``; rebuild it with

    python -m rapm.scenes.classifier --out rapm/scenes/classifier --seed 0
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in the digits trainers: two threads on a shared CPU

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rapm.demo.classifier import load_saved, save_classifier
from rapm.scenes.data import COLOURS, COUNTS, REGIONS, SHAPES, SIZE, TEXTURES, Scene, all_scenes, draw

CLASSIFIER_DIR = Path(__file__).parent / "classifier"
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "count": COUNTS, "region": REGIONS, "texture": TEXTURES,
              "background": tuple(COLOURS)}


class ScenesClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px), a feature layer, and one linear head per attribute."""

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim)
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.feature = nn.Linear(2 * w * (SIZE // 8) ** 2, feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features [B, feature_dim] (before their ReLU) of images [B, 3, 32, 32] in [-1, 1]."""
        return self.feature(self.conv(images).flatten(1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.features(images))
        return {name: head(h) for name, head in self.heads.items()}


def random_draws(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[Scene]]:
    """``n`` scenes drawn uniformly from the world and one fresh image of each [n, 3, 32, 32]."""
    scenes = all_scenes()
    picks = [scenes[i] for i in rng.integers(0, len(scenes), n)]
    return torch.from_numpy(np.stack([draw(s, int(rng.integers(0, 2**31 - 1))) for s in picks])), picks


def labelled_draws(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` fresh images of scenes drawn uniformly, and each attribute's index [n]."""
    images, picks = random_draws(n, rng)
    labels = {name: torch.tensor([values.index(getattr(s, name)) for s in picks]) for name, values in ATTRIBUTES.items()}
    return images, labels


@torch.no_grad()
def accuracies(model: ScenesClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    out = model(images)
    return {name: round(float((out[name].argmax(1) == labels[name]).float().mean()), 4) for name in ATTRIBUTES}


def train_classifier(seed: int = 0, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3,
                     held_out: int = 1000) -> tuple[ScenesClassifier, dict]:
    """Train on fresh draws; return the model and its record (per-attribute accuracy on ``held_out`` other draws)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    test_images, test_labels = labelled_draws(held_out, np.random.default_rng(seed + 10_000))
    model = ScenesClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.time()
    for _ in range(steps):
        model.train()
        images, labels = labelled_draws(batch_size, rng)
        out = model(images)
        loss = sum(F.cross_entropy(out[name], labels[name]) for name in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    record = dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr,
                  held_out_accuracy=accuracies(model, test_images, test_labels),
                  train_seconds=round(time.time() - start, 1))
    return model.eval(), record


def load_classifier(folder: str | Path = CLASSIFIER_DIR) -> ScenesClassifier:
    """The shipped (or a rebuilt) classifier, in eval mode."""
    return load_saved(ScenesClassifier, folder, "rapm.scenes.classifier")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the scenes classifier used by the scenes metrics.")
    parser.add_argument("--out", default=str(CLASSIFIER_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, record = train_classifier(seed=args.seed, steps=args.steps)
    save_classifier(model, record, args.out)
    print(f"held-out accuracy {record['held_out_accuracy']}, {record['train_seconds']} s; saved to {args.out}")


if __name__ == "__main__":
    main()
