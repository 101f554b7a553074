"""The digits classifier: a small CNN whose 64-d penultimate features give the Fréchet distance.

Trained on the train split only (the held-out split is for evaluation), with
one-pixel random shifts so that it judges generated digits by their shape, not
their exact placement. Shipped in ``rapm/demo/classifier/`` as
``model.safetensors`` and ``config.json``; rebuild it with

    python -m rapm.demo.classifier --out rapm/demo/classifier --seed 0
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in train_teacher: two threads on a shared CPU

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rapm.files import replace_dir
from rapm.demo.data import IMAGE_SIZE, load_split

CLASSIFIER_DIR = Path(__file__).parent / "classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class DigitsClassifier(nn.Module):
    """Two conv stages (16x16 -> 8x8 -> 4x4), a 64-d feature layer, and 10 logits."""

    def __init__(self, width: int = 32, feature_dim: int = 64, dropout: float = 0.3):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim, dropout=dropout)
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.feature = nn.Linear(2 * w * (IMAGE_SIZE // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, feature_dim] (before their ReLU) of images [B, 1, 16, 16] in [-1, 1]."""
        return self.feature(self.conv(images).flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.features(images))))


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels in x and y, background (-1) filled in."""
    b, _, h, w = images.shape
    p = max_shift
    padded = F.pad(images, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(b, h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(b, h, w)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, digits: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == digits).float().mean())


def train_classifier(seed: int = 0, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3) -> tuple[DigitsClassifier, dict]:
    """Train on the train split; return the model and its record (held-out accuracy, time)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train, held_out = load_split("train"), load_split("held_out")
    model = DigitsClassifier()
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.time()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch_size):
            idx = order[i : i + batch_size]
            x = random_shift(train.images[idx], gen)
            loss = F.cross_entropy(model(x), train.digits[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    record = dict(
        seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
        train_accuracy=round(accuracy(model, train.images, train.digits), 4),
        held_out_accuracy=round(accuracy(model, held_out.images, held_out.digits), 4),
        train_seconds=round(time.time() - start, 1),
    )
    return model, record


def save_classifier(model: DigitsClassifier, record: dict, out: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` to ``out`` atomically (a temp folder, then a rename)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_NAME))
    (tmp / CONFIG_NAME).write_text(json.dumps({"architecture": model.config, **record}, indent=2) + "\n")
    replace_dir(tmp, out)
    return out


def load_classifier(folder: str | Path = CLASSIFIER_DIR) -> DigitsClassifier:
    """The shipped (or a rebuilt) classifier, in eval mode."""
    return load_saved(DigitsClassifier, folder, "rapm.demo.classifier")


def load_saved(model_class, folder: str | Path, module: str):
    """A ``save_classifier`` folder's network of ``model_class``, frozen, in eval mode; ``module`` rebuilds it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} is missing; rebuild it with python -m {module} --out {folder}")
    config = json.loads((folder / CONFIG_NAME).read_text())
    model = model_class(**config["architecture"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    model.requires_grad_(False)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the digits classifier used by the digits metrics.")
    parser.add_argument("--out", default=str(CLASSIFIER_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, record = train_classifier(seed=args.seed, epochs=args.epochs)
    save_classifier(model, record, args.out)
    print(f"held-out accuracy {record['held_out_accuracy']:.4f} (train {record['train_accuracy']:.4f}), "
          f"{record['train_seconds']} s; saved to {args.out}")


if __name__ == "__main__":
    main()
