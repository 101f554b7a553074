"""SFD (Zhou et al. 2024, "Simple and Fast Distillation"; the RAPM paper's Alg. 3): the absolute position alone.

The student's N-step trajectory from the stored noise is matched slot by slot to the stored teacher positions,
with L1 (SFD's code), no relative term and no discriminator: RAPM's loss object with those terms off. SFD steps
its optimizer once per slot; here the slots' gradients are summed into one step per iteration, as RAPM's are.
"""

from __future__ import annotations

from dataclasses import dataclass

from rapm.methods.rapm import RAPM


@dataclass
class SFD(RAPM):
    updates: str = "both"
    adv_weight: float = 0.0
    relative: bool = False
    discriminator: bool = False
    distance: str = "l1"
    gan_loss: str = "relativistic"
    relative_weight: float = 0.0
