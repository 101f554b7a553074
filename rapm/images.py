"""Images: a tensor in [-1, 1] as a PIL image, and a grid of them saved as one PNG (torchvision's layout)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def to_pil(image: torch.Tensor):
    """One image [C, H, W] in [-1, 1] as a PIL image (grey for 1 channel, RGB for 3)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image [C, H, W] with 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], mode="L")
    return Image.fromarray(array, mode="RGB" if array.shape[2] == 3 else "RGBA")


MIN_CELL = 64  # pixels on screen of one image of a grid (the report's, and the PNGs training writes): a 16x16 digit at 4x


def screen_scale(size: int) -> int:
    """The nearest-neighbour factor that shows a ``size``-pixel image at least MIN_CELL pixels (1 from 64 px on)."""
    return max(1, math.ceil(MIN_CELL / max(size, 1)))


def save_grid(images, path: str | Path, nrow: int = 8, padding: int = 2, scale: int = 1):
    """Save images (a tensor [B, C, H, W] in [-1, 1], or a list of such [C, H, W] tensors or PIL images) as one grid.

    ``nrow`` images a row, ``padding`` black pixels between and around them (torchvision's make_grid layout); each
    image enlarged ``scale`` times without smoothing (the padding stays ``padding``).
    """
    from PIL import Image

    pils = [im if isinstance(im, Image.Image) else to_pil(im) for im in images]
    if not pils:
        raise ValueError("save_grid needs at least one image")
    mode = "L" if all(p.mode == "L" for p in pils) else "RGB"
    pils = [p.convert(mode) for p in pils]
    if scale > 1:
        pils = [p.resize((p.width * scale, p.height * scale), Image.NEAREST) for p in pils]
    w, h = max(p.width for p in pils), max(p.height for p in pils)
    ncol = min(nrow, len(pils))
    nrows = math.ceil(len(pils) / ncol)
    grid = Image.new(mode, (ncol * (w + padding) + padding, nrows * (h + padding) + padding), 0)
    for i, p in enumerate(pils):
        row, col = divmod(i, ncol)
        grid.paste(p, (padding + col * (w + padding), padding + row * (h + padding)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
