"""SFD (Zhou et al. 2024, "Simple and Fast Distillation"; the RAPM paper's Alg. 3): the absolute position alone.

The student's N-step trajectory from the stored noise is matched slot by slot to the stored teacher positions,
with L1 (SFD's code), no relative term and no discriminator: RAPM's loss object with those terms off. SFD steps
its optimizer once per slot; here the slots' gradients are summed into one step per iteration, as RAPM's are.
"""

from __future__ import annotations

from rapm.methods.rapm import RAPM


def build_sfd(config, recipe: dict, delta: int) -> RAPM:
    """SFD's loss object for ``config`` (``distance`` "" = SFD's L1)."""
    return RAPM.from_config(config, recipe, delta, relative=False, discriminator=False, distance=config.distance or "l1")
