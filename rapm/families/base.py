"""What a teacher family is (``Family``), the error a teacher folder raises, and the weight files rapm never reads:
the definition that ``rapm.families.sd`` and ``rapm.families.flow`` build on; ``rapm.families`` lists the families."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rapm.conditioning import Conditioning
from rapm.diffusion import predict_x0_eps
from rapm.errors import RapmError


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # weights rapm never unpickles


class TeacherError(RapmError):
    """A teacher folder that cannot be used, with what is wrong and how to fix it."""


class Family:
    """One kind of teacher pipeline; see the module docstring for what each field and method is for."""

    name: str = ""
    pipeline_class_names: tuple[str, ...] = ()
    denoiser_subfolder: str = "unet"
    denoiser_class_name: str = ""
    text_encoders: tuple[tuple[str, str, str], ...] = ()  # (tokenizer subfolder, encoder subfolder, transformers class)
    preset: str = ""  # rapm.config.PRESETS name used when none is given
    presets: dict = {}  # the training presets the family adds to rapm.config.PRESETS: name -> TrainConfig overrides
    hub_tag: str = ""  # the Hugging Face Hub tag of the family's models, for an exported model card
    # (a tensor-name prefix, what the file is) that marks a single-file checkpoint of this family; ``rapm convert``
    # converts it where ``single_file_kwargs`` is not None, and otherwise names the family's diffusers folder instead
    single_file_signatures: tuple[tuple[str, str], ...] = ()
    default_guidance: float = 1.0  # the diffusers pipeline's guidance_scale
    # PCM's public code's teacher settings for this family (``rapm trajectories --guidance pcm`` / ``--delta pcm``):
    # its guidance range in diffusers' form, drawn per trajectory, and its Δ; None where PCM trains no such teacher
    pcm_guidance: tuple[float, float] | None = None
    pcm_delta: int | None = None
    lora_targets: tuple[str, ...] = ()  # the student's LoRA target modules by default (rapm.roles)
    disc_levels: str = "full"  # the discriminator's feature blocks by default (``feature_blocks``)
    force_zeros_for_empty_prompt: bool = False  # the pipeline's default when model_index.json does not say
    cfg: bool = True  # guidance is classifier-free guidance (False: FLUX.1-dev's guidance is an input, ``with_guidance``)
    # what the pipeline's from_single_file needs beyond the file (rapm convert): no component a teacher does not use
    single_file_kwargs: dict | None = None

    # reading and loading
    def denoiser_class(self):
        import diffusers

        return getattr(diffusers, self.denoiser_class_name)

    def pipeline_class(self):
        """The diffusers pipeline of this family (it also saves and loads its LoRA)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_names[0])

    def check_denoiser(self, denoiser: torch.nn.Module, path: Path) -> None:
        """Refuse a denoiser that is not of this family (TeacherError naming the file)."""

    def latent_shape(self, denoiser_config: dict) -> tuple[int, ...]:
        raise NotImplementedError

    def latent_shape_of(self, denoiser_config: dict, vae_sample_size: int | None, vae_scale: int) -> tuple[int, ...]:
        """The stored latent shape given the VAE's facts too (FLUX's transformer config has no size; the VAE's says it)."""
        return self.latent_shape(denoiser_config)

    def load_prompt_encoder(self, path: Path, device, dtype, denoiser):
        """A pipeline object that encodes prompts (flow families: their diffusers pipeline without a VAE), or None:
        the teacher then loads ``text_encoders`` one by one (the UNet families)."""
        return None

    # prompts
    def encode(self, teacher, prompts: Sequence[str]) -> Conditioning:
        raise NotImplementedError

    def negative(self, teacher, cond: Conditioning, negative_prompt: str | None) -> Conditioning:
        """The unconditional conditioning beside ``cond``, as the family's pipeline makes it."""
        return self.encode(teacher, [negative_prompt or ""] * len(cond))

    def with_guidance(self, cond: Conditioning, guidance: float | torch.Tensor) -> Conditioning:
        """``cond`` carrying the guidance value (a number, or one per sample [B]) where the denoiser takes it as an
        input (FLUX.1-dev); else ``cond``."""
        return cond

    # the denoiser
    def denoise(self, denoiser: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's raw output at (z, t) under ``cond``, float32: the one denoiser call."""
        raise NotImplementedError

    def to_x0_eps(self, schedule, z: torch.Tensor, output: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean sample and the noise the denoiser's output implies (by the schedule's prediction type)."""
        return predict_x0_eps(schedule, z, output, t)

    def feature_blocks(self, denoiser: torch.nn.Module, levels: str) -> tuple[list[torch.nn.Module], torch.nn.Module | None]:
        """The modules whose outputs the discriminator heads read, in order, and the one after which the forward
        may stop (None: run it whole)."""
        raise NotImplementedError

    def feature_channels(self, denoiser: torch.nn.Module, levels: str) -> list[int]:
        raise NotImplementedError

    def feature_map(self, output, z: torch.Tensor) -> torch.Tensor:
        """The feature map a feature block's ``output`` gives the heads (z: the denoiser's input)."""
        return output[0] if isinstance(output, tuple) else output

    # export
    def lora_state_dict(self, loader, weights: Path, denoiser: torch.nn.Module):
        """(state, network alphas, metadata) of a LoRA file, as the family's pipeline reads it (``lora_state_dict``)."""
        return loader.lora_state_dict(str(weights.parent), weight_name=weights.name, unet_config=denoiser.config,
                                      return_lora_metadata=True)

    def load_lora(self, loader, state: dict, alphas, denoiser: torch.nn.Module, adapter: str, metadata) -> None:
        """Load a LoRA state dict (diffusers' ``lora_state_dict``) into the denoiser as ``adapter``."""
        raise NotImplementedError

    def export_kwargs(self, state: dict, meta: dict) -> dict:
        """The keyword arguments of ``pipeline_class().save_lora_weights`` for the denoiser's LoRA ``state``."""
        raise NotImplementedError

    def base_model_version(self, denoiser_config) -> tuple[str, bool]:
        """sd-scripts' ``ss_base_model_version`` and ``ss_v2``."""
        raise NotImplementedError

    def sai_architecture(self, v2: bool, prediction_type: str, version: str = "") -> str:
        raise NotImplementedError

    modelspec_implementation: str = "diffusers"  # the SAI model spec's modelspec.implementation
    kohya_names: str = "diffusers"  # how a kohya file names the denoiser's modules: "diffusers" paths, or "ldm" (SDXL)

    def __repr__(self) -> str:
        return f"Family({self.name!r})"
