"""Procedural scenes: a prompt's attributes -> images [3, 32, 32] in [-1, 1], and the attributes read back.

``Scene`` holds what a prompt says (shape, colour, count, region, texture, background colour); ``draw`` renders
one image of it from a seed (the free choices: sizes, positions, texture phase and spacing, colour jitter);
``check`` reads the attributes back from an image by colour segmentation (the shapes' colour is never the
background's), connected components (the count), the overlap of each component with each shape drawn into its
bounding box (its kind) and their centroids (the region), so prompt accuracy needs no trained model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 32
SHAPES = ("square", "triangle")  # the two whose fill of their box differs most (1 against 1/2)
# colour name -> RGB in [0, 1]; far apart, so segmentation by nearest colour is unambiguous
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.9, 0.1)}
TEXTURES = ("stripes", "checks", "dots")
REGIONS = ("left", "right", "top", "bottom", "anywhere")
COUNTS = (1, 2)
COUNT_WORDS = {1: "one", 2: "two"}
RADII = {1: (5.0, 7.0), 2: (4.0, 5.5)}  # a shape's half-size, by how many share the region


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    region: str
    texture: str
    background: str

    def prompt(self) -> str:
        """The scene as its prompt: "two red squares on the left over blue stripes"."""
        noun = self.shape if self.count == 1 else self.shape + "s"
        where = "" if self.region == "anywhere" else f" at the {self.region}" if self.region in ("top", "bottom") \
            else f" on the {self.region}"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}{where} over {self.background} {self.texture}"


def all_scenes() -> list[Scene]:
    """Every scene the world has: 2 shapes x 4 colours x 2 counts x 5 regions x 3 textures x 3 background colours
    (any colour but the shapes'): 720."""
    return [Scene(s, c, n, r, t, b) for s, c, n, r, t, b in itertools.product(SHAPES, COLOURS, COUNTS, REGIONS,
                                                                               TEXTURES, COLOURS) if b != c]


def _region_box(region: str) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) that the shapes' centres are drawn in."""
    lo, mid, hi = 8, SIZE // 2, SIZE - 8  # a shape of the largest half-size stays inside the image
    return {"left": (lo, hi, lo, mid - 2), "right": (lo, hi, mid + 2, hi), "top": (lo, mid - 2, lo, hi),
            "bottom": (mid + 2, hi, lo, hi), "anywhere": (lo, hi, lo, hi)}[region]


def _texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A [SIZE, SIZE] mask in {0, 1} of the background's pattern, with a random spacing and phase."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    period = int(rng.integers(3, 6))
    py, px = rng.integers(0, period, size=2)
    if kind == "stripes":
        angle = rng.integers(0, 2)  # horizontal or vertical
        return (((y if angle else x) + py) // max(1, period // 2) % 2).astype(np.float32)
    if kind == "checks":
        return ((((y + py) // period) + ((x + px) // period)) % 2).astype(np.float32)
    return ((((y + py) % period) < 2) & (((x + px) % period) < 2)).astype(np.float32)  # dots


def _shape_mask(shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    if shape == "square":
        return (np.abs(y - cy) <= r) & (np.abs(x - cx) <= r)
    # an upright right-angle-free triangle: apex at the top, base at the bottom of its box
    t = (y - (cy - r)) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * r)


def _layout(scene: Scene, y0, y1, x0, x1, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(centre y, centre x, half-size) of each shape inside the region, 2 pixels apart (the count is read back from
    connected components): the whole layout is drawn again until it fits, with smaller shapes every 100 tries."""
    radii = [float(rng.uniform(*RADII[scene.count])) for _ in range(scene.count)]
    for attempt in range(1000):
        if attempt and attempt % 100 == 0:
            radii = [max(2.5, r - 0.25) for r in radii]
        placed = [(float(rng.uniform(y0, y1)), float(rng.uniform(x0, x1)), r) for r in radii]
        if all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) > a[2] + b[2] + 2
               for i, a in enumerate(placed) for b in placed[i + 1:]):
            return placed
    raise RuntimeError(f"no layout of {scene.prompt()!r} fits")  # not reached for the world's scenes (tested)


def draw(scene: Scene, seed: int) -> np.ndarray:
    """One image of ``scene`` [3, SIZE, SIZE] float32 in [-1, 1]; the seed draws every free choice."""
    rng = np.random.default_rng(seed)
    bg = np.array(COLOURS[scene.background], np.float32)
    pattern = _texture(scene.texture, rng)
    dark = bg * 0.35
    img = dark[:, None, None] + (bg - dark)[:, None, None] * pattern[None]
    y0, y1, x0, x1 = _region_box(scene.region)
    for (cy, cx, r) in _layout(scene, y0, y1, x0, x1, rng):
        colour = np.clip(np.array(COLOURS[scene.colour], np.float32) + rng.normal(0, 0.03, 3), 0, 1)
        img[:, _shape_mask(scene.shape, cy, cx, r)] = colour[:, None]
    return (img * 2 - 1).astype(np.float32)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a boolean mask, each as an array of (y, x)."""
    seen = np.zeros_like(mask, bool)
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < SIZE and 0 <= nx < SIZE and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def shape_of(pixels: np.ndarray) -> str:
    """The shape whose outline fitted to the component's bounding box (the box, a triangle with its apex
    at the top) overlaps the component most (IoU)."""
    (y0, x0), (y1, x1) = pixels.min(0), pixels.max(0) + 1
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    u, v = (y - (y0 + y1) / 2) / ((y1 - y0) / 2), (x - (x0 + x1) / 2) / ((x1 - x0) / 2)
    templates = {"square": np.ones_like(u, bool), "triangle": np.abs(v) <= (u + 1) / 2}
    mine = np.zeros(u.shape, bool)
    mine[pixels[:, 0] - y0, pixels[:, 1] - x0] = True
    return max(SHAPES, key=lambda s: (templates[s] & mine).sum() / max(1, (templates[s] | mine).sum()))


def check(image: np.ndarray, scene: Scene, min_pixels: int = 6) -> dict[str, bool]:
    """Which of ``scene``'s attributes ``image`` [3, SIZE, SIZE] in [-1, 1] shows: its shapes' colour (some pixels
    nearest that colour, not the background's), their count (connected components of at least ``min_pixels``),
    their kind (each component's fill ratio nearest the scene's shape's), their region (every centroid inside the
    region's half), and the background colour (the most common colour outside the shapes, dark texture included)."""
    rgb = (np.asarray(image, np.float32).transpose(1, 2, 0) + 1) / 2
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], np.float32)
    bright = palette[None, None] - rgb[:, :, None]
    nearest = np.argmin((bright ** 2).sum(-1), -1)
    distance = np.sqrt(np.min((bright ** 2).sum(-1), -1))
    target = names.index(scene.colour)
    mask = (nearest == target) & (distance < 0.35)
    parts = [c for c in _components(mask) if len(c) >= min_pixels]
    kind_ok = bool(parts) and all(shape_of(c) == scene.shape for c in parts)
    centres = [c.mean(0) + 0.5 for c in parts]
    half = SIZE / 2
    inside = {"left": lambda y, x: x < half, "right": lambda y, x: x > half, "top": lambda y, x: y < half,
              "bottom": lambda y, x: y > half, "anywhere": lambda y, x: True}[scene.region]
    rest = ~mask
    lifted = rgb[rest] / np.maximum(rgb[rest].max(-1, keepdims=True), 1e-3)  # the dark texture at full brightness
    chroma = palette / palette.max(-1, keepdims=True)
    votes = np.argmin(((chroma[None] - lifted[:, None]) ** 2).sum(-1), -1) if len(lifted) else np.array([], int)
    background = names[int(np.bincount(votes, minlength=len(names)).argmax())] if len(votes) else None
    return {"colour": bool(parts), "count": len(parts) == scene.count, "shape": kind_ok,
            "region": bool(parts) and all(inside(y, x) for y, x in centres), "background": background == scene.background}
