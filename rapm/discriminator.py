"""The discriminators D1 (relative) and D2 (absolute): heads on the one UNet's intermediate features.

As in PCM's public code, which RAPM takes its discriminator from (docs/references.md), but for the heads'
LeakyReLU slope (0.2 here, ``negative_slope``; PCM's 0.01, ``--set disc_negative_slope=0.01``):
the backbone is the teacher UNet run to return its block outputs (SD 1.5: the
down blocks, the mid block and the up blocks, 4 heads each; SDXL: down blocks
and mid block only, 1 head each); each head is conv, GroupNorm, LeakyReLU, a
residual conv block, then a 1x1 conv to a patch-logit map; conditioning on the
timestep and prompt comes only through the backbone. RAPM (paper §3.2, last
paragraph) adds a LoRA to the backbone: here the ``discriminator`` adapter of
the one UNet (decision 1), so D1 and D2 share one backbone pass. With
``separate`` (``disc_backbones=separate``), D2 has a LoRA of its own,
``discriminator_absolute`` (Alg. 2's φ1 and φ2 as two parameter sets), at the
cost of a second backbone pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rapm.conditioning import Conditioning
from rapm.families import denoiser_family
from rapm.hooks import block_outputs
from rapm.roles import DISCRIMINATOR, adapter_role
from rapm.teacher import unet_output


@dataclass
class DiscriminatorSpec:
    levels: str = "full"  # "full": down, mid, up blocks (SD 1.5); "down_mid": down blocks and mid (SDXL)
    heads_per_level: int = 4
    kernel_size: int = 3  # 3x3 convs (SD 1.5), 1x1 (SDXL)
    negative_slope: float = 0.2  # the heads' LeakyReLU (PCM's code: 0.01)
    separate: bool = False  # D2 on a backbone LoRA of its own (ABSOLUTE_BACKBONE) instead of D1's


ABSOLUTE_BACKBONE = "discriminator_absolute"  # the adapter of D2's backbone when the backbones are separate


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class Head(nn.Module):
    """conv-GN-LeakyReLU, a residual conv-GN-LeakyReLU, then a 1x1 conv to patch logits."""

    def __init__(self, channels: int, kernel_size: int, negative_slope: float = 0.2):
        super().__init__()
        pad = kernel_size // 2
        self.inp = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=pad), nn.GroupNorm(_groups(channels), channels),
            nn.LeakyReLU(negative_slope)
        )
        self.res = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=pad), nn.GroupNorm(_groups(channels), channels),
            nn.LeakyReLU(negative_slope)
        )
        self.out = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.res(h))


class HeadSet(nn.Module):
    """``heads_per_level`` heads on each backbone feature map."""

    def __init__(self, channels: list[int], spec: DiscriminatorSpec):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.ModuleList(Head(c, spec.kernel_size, spec.negative_slope) for _ in range(spec.heads_per_level))
            for c in channels
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [head(f.float()) for f, heads in zip(features, self.heads) for head in heads]


def feature_channels(unet: nn.Module, levels: str) -> list[int]:
    """Channels of the block outputs the backbone returns, in order (the denoiser's family's feature blocks)."""
    return denoiser_family(unet).feature_channels(unet, levels)


def backbone_features(unet: nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Conditioning, levels: str) -> list[torch.Tensor]:
    """The outputs of the family's feature blocks at (z, t, cond); the forward stops after its stop block, if any."""
    features: list[torch.Tensor] = []
    family = denoiser_family(unet)
    blocks, stop = family.feature_blocks(unet, levels)
    block_outputs(unet, blocks, stop, lambda _block, output: features.append(family.feature_map(output, z)),
                  lambda: unet_output(unet, z, t, cond))
    return features


class Discriminator(nn.Module):
    """Two head sets, ``relative`` (D1) and ``absolute`` (D2), on one backbone pass of the UNet's discriminator role."""

    def __init__(self, unet: nn.Module, spec: DiscriminatorSpec):
        super().__init__()
        self.spec = spec
        channels = feature_channels(unet, spec.levels)
        self.relative = HeadSet(channels, spec)
        self.absolute = HeadSet(channels, spec)

    def logits(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> dict[str, list[torch.Tensor]]:
        with adapter_role(unet, DISCRIMINATOR):
            feats = backbone_features(unet, x, t, cond, self.spec.levels)
        if self.spec.separate:  # D2's own backbone LoRA: a second pass
            with adapter_role(unet, ABSOLUTE_BACKBONE):
                return {"relative": self.relative(feats),
                        "absolute": self.absolute(backbone_features(unet, x, t, cond, self.spec.levels))}
        return {"relative": self.relative(feats), "absolute": self.absolute(feats)}


def hinge_discriminator_loss(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """relu(1 + D(fake)) + relu(1 - D(real)), averaged over heads (PCM's hinge loss)."""
    return sum(F.relu(1 + f).mean() + F.relu(1 - r).mean() for f, r in zip(fake, real)) / len(fake)


def hinge_generator_loss(fake: list[torch.Tensor]) -> torch.Tensor:
    """relu(1 - D(fake)), averaged over heads."""
    return sum(F.relu(1 - f).mean() for f in fake) / len(fake)


def relativistic_discriminator_loss(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """softplus(D(fake) - D(real)) over paired patches, averaged over heads (RpGAN's loss for D).

    ``fake[h][i]`` and ``real[h][i]`` are the logit maps of a fake and its own real, renoised with the same noise; the
    chance value (D cannot tell them apart) is log 2.
    """
    return sum(F.softplus(f - r).mean() for f, r in zip(fake, real)) / len(fake)


def relativistic_generator_loss(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """softplus(D(real) - D(fake)) over paired patches, averaged over heads; the reals carry no gradient."""
    return sum(F.softplus(r.detach() - f).mean() for f, r in zip(fake, real)) / len(fake)


@torch.no_grad()
def pair_accuracy(fake: list[torch.Tensor], real: list[torch.Tensor]) -> float:
    """The share of pairs whose real scores above its fake (score: the mean logit over heads and patches); 0.5 is
    chance. Ties count half."""
    f = torch.stack([h.flatten(1).float().mean(1) for h in fake]).mean(0)
    r = torch.stack([h.flatten(1).float().mean(1) for h in real]).mean(0)
    return float(((r > f).float() + 0.5 * (r == f).float()).mean())
