"""What a denoiser is conditioned on, batched: prompt embeddings, and a family's extras (SDXL's pooled embeddings and
time ids). Its fields are the union over the families (rapm.families); a field a family does not use stays None.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

FLOAT32_FIELDS = ("time_ids", "guidance")  # stored in float32 whatever the store's dtype (small, and exact values)


@dataclass
class Conditioning:
    """What the UNet is conditioned on, batched. SDXL adds pooled embeddings and time ids."""

    prompt_embeds: torch.Tensor  # [B, L, D]
    pooled_embeds: torch.Tensor | None = None  # [B, D2] (SDXL)
    time_ids: torch.Tensor | None = None  # [B, 6] (SDXL)
    guidance: torch.Tensor | None = None  # [B] (FLUX.1-dev: the distilled guidance value, an input of the transformer)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map(self, fn) -> "Conditioning":
        return replace(self, **{k: fn(v) for k, v in self.tensors().items()})

    def to(self, *args, **kwargs) -> "Conditioning":
        return self.map(lambda v: v.to(*args, **kwargs))

    def __getitem__(self, index) -> "Conditioning":
        return self.map(lambda v: v[index])

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def repeat(self, n: int) -> "Conditioning":
        """Each sample repeated n times in a row (sample-major), as for a batch over n slots."""
        return self.map(lambda v: v.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        first = items[0]
        return replace(first, **{k: torch.cat([c.tensors()[k] for c in items]) for k in first.tensors()})
