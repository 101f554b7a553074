"""The built-in digits teacher, its data and its metrics: the whole flow on a CPU in minutes.

- ``data``: scikit-learn's bundled digits as 16x16 one-channel images in [-1, 1],
  split into train (1,497) and held-out (300) sets. Pixel space: no VAE.
- ``prompts``: several phrasings of each digit, and the digit a prompt asks for.
- ``train_teacher``: trains the teacher, a diffusers StableDiffusionPipeline folder
  shipped in ``teacher/`` (``rapm.teacher.load_teacher("digits")``).
- ``classifier``: the small CNN shipped in ``classifier/`` whose features give the FD.
- ``metrics``: Fréchet distance, prompt accuracy and the real-vs-real floor.
- ``plugin``: the teacher's plug-in (``rapm.plugins``), named by ``teacher/rapm.json`` beside its guidance and
  preset: how the core finds the metrics, prompts, real data and classifier features without importing this package.
- ``clip``: the teacher's text side built from its vocabulary (also the test fixtures').

This package imports nothing heavy, so that its entry points can set up threads first.
"""

import json as _json
from pathlib import Path as _Path

# Classifier-free guidance of the digits trajectories: the teacher's own, in teacher/rapm.json (why it is 1.5: there).
DIGITS_GUIDANCE = float(_json.loads((_Path(__file__).parent / "teacher" / "rapm.json").read_text())["guidance"])

DIGITS_TEACHER = "digits"
