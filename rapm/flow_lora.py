"""LoRA roles on a flow-matching transformer and the diffusers LoRA file a pipeline loads.

The roles are rapm.roles' unchanged (decision 1): ``add_roles`` works on any diffusers model with
``PeftAdapterMixin`` (SD3Transformer2DModel and FluxTransformer2DModel have it), the teacher is the
transformer with adapters disabled, the student and discriminator backbone are adapters on it; no
second copy. Only the target modules differ from the UNet's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rapm.roles import STUDENT, LoraSpec

# diffusers examples/dreambooth/train_dreambooth_lora_sd3.py: the default (no --lora_layers) targets the joint
# attention's image and text projections. PCM's SD3 script (code/text_to_image_sd3/train_pcm_lora_sd3_adv.py) and
# diffusers' FLUX script also target the feed-forward layers of both streams; the issue asks for attention and FF.
SD3_TARGET_MODULES = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]
# diffusers examples/dreambooth/train_dreambooth_lora_flux.py, its default target_modules (no --lora_layers): the
# same names; in FLUX's single-stream blocks they match the attention's to_q/to_k/to_v (those blocks have no to_out
# and no ff: their MLP is proj_mlp / proj_out, left out as in the diffusers script).
FLUX_TARGET_MODULES = list(SD3_TARGET_MODULES)

# Defaults from the public scripts (docs/flow-matching.md): PCM's SD3 run.sh uses rank 32; diffusers' SD3/FLUX
# LoRA scripts default to rank 4 with lora_alpha = rank. rapm keeps alpha = rank (scale 1) for these families.
FLOW_LORA_RANK = 32


def flow_lora_spec(family: str, rank: int = FLOW_LORA_RANK, alpha: float | None = None, target_modules=None) -> LoraSpec:
    """The student / discriminator LoraSpec for ``sd3`` or ``flux`` (alpha defaults to the rank)."""
    if target_modules is None:
        if family not in ("sd3", "flux"):
            raise ValueError(f"family must be 'sd3' or 'flux', got {family!r}")
        target_modules = SD3_TARGET_MODULES if family == "sd3" else FLUX_TARGET_MODULES
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
