"""The data stream: which trajectories iteration k trains on and the noise each sample draws, both functions of the
seed and the sample's position in the stream, so any step's batch is known (a resume, or another process layout,
sees the same samples; docs/design.md decision 4).
"""

from __future__ import annotations

import torch


def batch_positions(step: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
    """Positions in the data stream of this process's samples at iteration ``step`` (global batch = world x batch)."""
    first = (step * world + rank) * batch_size
    return list(range(first, first + batch_size))


def batch_indices(positions: list[int], count: int, seed: int) -> list[int]:
    """The trajectories at these stream positions: a fresh seeded permutation each epoch, so any step's batch is known."""
    out = []
    for pos in positions:
        epoch, i = divmod(pos, count)
        perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[i]))
    return out


def sample_generators(seed: int, positions: list[int]) -> list[torch.Generator]:
    """Each sample's noise (discriminator timesteps and renoising): a function of the seed and its stream position."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + pos) % (2**63)) for pos in positions]
