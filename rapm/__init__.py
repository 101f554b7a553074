"""rapm: single-GPU distillation of Stable Diffusion teachers by Relative and Absolute Position Matching."""

__version__ = "0.2.0"
