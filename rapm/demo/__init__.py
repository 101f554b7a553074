"""The built-in digits teacher, its data and its metrics: the whole flow on a CPU in minutes.

- ``data``: scikit-learn's bundled digits as 16x16 one-channel images in [-1, 1],
  split into train (1,497) and held-out (300) sets. Pixel space: no VAE.
- ``prompts``: several phrasings of each digit, and the digit a prompt asks for.
- ``train_teacher``: trains the teacher, a diffusers StableDiffusionPipeline folder
  shipped in ``teacher/`` (``rapm.teacher.load_teacher("digits")``).
- ``classifier``: the small CNN shipped in ``classifier/`` whose features give the FD.
- ``metrics``: Fréchet distance, prompt accuracy and the real-vs-real floor.

This package imports nothing heavy, so that its entry points can set up threads first.
"""

# Classifier-free guidance of the digits trajectories (diffusers' form: uncond + g (cond - uncond)).
# Chosen on 100-step DDIM samples of the shipped teacher: the smallest scale at which prompt accuracy
# saturates (guidance beyond it only raises the FD); see benchmarks/results/teacher_baseline.md.
DIGITS_GUIDANCE = 1.5

DIGITS_TEACHER = "digits"
