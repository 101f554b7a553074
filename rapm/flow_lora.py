"""LoRA roles on a flow-matching transformer and the diffusers LoRA file a pipeline loads.

The roles are rapm.roles' unchanged (decision 1): ``add_roles`` works on any diffusers model with
``PeftAdapterMixin`` (SD3Transformer2DModel and FluxTransformer2DModel have it), the teacher is the
transformer with adapters disabled, the student and discriminator backbone are adapters on it; no
second copy. Only the target modules differ from the UNet's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rapm.roles import FLUX_TARGET_MODULES, SD3_TARGET_MODULES, STUDENT, LoraSpec  # noqa: F401 (exported here too)


# Defaults from the public scripts (docs/flow-matching.md): PCM's SD3 run.sh uses rank 32; diffusers' SD3/FLUX
# LoRA scripts default to rank 4 with lora_alpha = rank. rapm keeps alpha = rank (scale 1) for these families.
FLOW_LORA_RANK = 32


def flow_lora_spec(family: str, rank: int = FLOW_LORA_RANK, alpha: float | None = None, target_modules=None) -> LoraSpec:
    """The student / discriminator LoraSpec for ``sd3`` or ``flux`` (alpha defaults to the rank; the targets to the
    family's own, ``Family.lora_targets``)."""
    if target_modules is None:
        from rapm.families import family_named

        target_modules = family_named(family).lora_targets
    return LoraSpec(rank=rank, alpha=float(rank if alpha is None else alpha), target_modules=list(target_modules))


def save_diffusers_lora(pipeline_class, transformer: torch.nn.Module, folder: str | Path, adapter: str = STUDENT) -> Path:
    """Write ``adapter`` as the LoRA file ``pipeline_class.load_lora_weights(folder)`` loads (alpha in the metadata)."""
    from rapm.export import adapter_metadata, adapter_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # peft's keys on a diffusers transformer are already diffusers' (the prefix "transformer." is added on save).
    pipeline_class.save_lora_weights(
        str(folder), transformer_lora_layers=adapter_state_dict(transformer, adapter),
        transformer_lora_adapter_metadata=adapter_metadata(transformer, adapter),
    )
    return folder
