"""Teachers are diffusers pipeline folders: loading, prompt encoding, guidance, and the one denoiser call.

What differs between teacher families (how prompts become conditioning, what the denoiser takes besides the
latents, which classes to load) is the family's (``rapm.families``); this module loads a folder through its family
and gives everything downstream one ``Teacher`` and one ``unet_output``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from rapm.conditioning import Conditioning
from rapm.diffusion import Schedule, ScheduleError, schedule_from_config
from rapm.families import denoiser_family, family_named, read_teacher_info
from rapm.families.base import PICKLE_SUFFIXES, Family, TeacherError


@dataclass
class Teacher:
    """A loaded teacher: its UNet, schedule and (optionally) text encoders and VAE."""

    path: Path
    family: str  # the family's name ("sd", "sdxl"): what stores, exports and presets record
    unet: torch.nn.Module
    scheduler_config: dict
    schedule: Schedule
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    vae: torch.nn.Module | None = None
    vae_scale_factor: int = 1
    force_zeros_for_empty_prompt: bool = False
    vae_sample_size: int | None = None
    pipeline: object = None  # flow families: the diffusers pipeline (no VAE) whose encode_prompt encodes prompts

    @property
    def family_def(self) -> Family:
        """The family object (rapm.families) that knows how to use this teacher."""
        return family_named(self.family)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.family_def.latent_shape_of(dict(self.unet.config), self.vae_sample_size, self.vae_scale_factor)

    @property
    def image_size(self) -> int:
        return self.latent_shape[1] * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.unet.parameters() if p.is_floating_point())

    def unet_output(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's raw output (eps or v) at (z, t) under ``cond``; the one denoiser call."""
        return unet_output(self.unet, z, t, cond)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str | None = None) -> tuple[Conditioning, Conditioning]:
        """Conditioning for ``prompts`` and for the negative (unconditional) prompt, as diffusers' pipelines do it."""
        return encode_prompts(self, prompts, negative_prompt)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [-1, 1]. A teacher without a VAE works in pixel space."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        vae = self.vae
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            scaled = scaled + vae.config.shift_factor
        return vae.decode(scaled).sample.clamp(-1, 1)


def unet_output(unet: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The denoiser's raw output (eps, v, ...) at (z, t) under ``cond``, float32: its family's one call."""
    return denoiser_family(unet).denoise(unet, z, t, cond)


def guided_output(
    unet: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning | None, guidance: float
) -> torch.Tensor:
    """Classifier-free guidance, diffusers' form uncond + g (cond - uncond), with cond and uncond in one forward (float32).

    Where ``cond`` carries its own guidance, one value per sample (a store built with a guidance range, ``rapm
    trajectories --guidance 5:6``), each sample is guided by its own and ``guidance`` is not used."""
    if uncond is None or not denoiser_family(unet).cfg:  # FLUX: guidance rides in cond.guidance, an input
        return unet_output(unet, z, t, cond)
    g: float | torch.Tensor = guidance
    if cond.guidance is not None:  # per sample: [B] -> [B, 1, ...]
        g = cond.guidance.to(z.device, torch.float32).reshape(-1, *([1] * (z.ndim - 1)))
        cond = replace(cond, guidance=None)  # the unconditional half carries none; the UNet takes none
        if bool((g == 1.0).all()):
            return unet_output(unet, z, t, cond)
    elif guidance == 1.0:
        return unet_output(unet, z, t, cond)
    t = torch.as_tensor(t, device=z.device)
    if t.ndim == 0:
        t = t.expand(z.shape[0])
    out = unet_output(unet, torch.cat([z, z]), torch.cat([t, t]), Conditioning.cat([cond, uncond]))
    out_cond, out_uncond = out.chunk(2)
    return out_uncond + g * (out_cond - out_uncond)




def _load_component(cls, path: Path, sub: str, **kwargs):
    """``cls.from_pretrained`` of the subfolder ``sub``, from safetensors weights only: a pickle is never unpickled."""
    folder = path / sub
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        what = f"its weights are {', '.join(pickles)}, a pickle, which can run code when loaded" if pickles else "no weights"
        raise TeacherError(f"{folder}: {what}; rapm loads .safetensors weights only: convert the pipeline once where you "
                           "trust it, with DiffusionPipeline.from_pretrained(folder).save_pretrained(new_folder)")
    return cls.from_pretrained(path, subfolder=sub, use_safetensors=True, **kwargs)


def load_teacher(
    name_or_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoders: bool = True,
    vae: bool = False,
    unet: torch.nn.Module | None = None,
) -> Teacher:
    """Load a teacher from a local diffusers folder (or a built-in teacher: 'digits', 'scenes').

    Training never needs the text encoders (embeddings come from the store) and
    only sampling needs the VAE, so both are optional to keep memory to one UNet.
    ``unet``: the teacher's UNet already in memory (training's one UNet), used instead of loading a second.
    """
    from diffusers import AutoencoderKL

    info = read_teacher_info(name_or_path)
    path, index, family = info.path, info.index, info.family
    sched_file = path / "scheduler" / "scheduler_config.json"
    try:
        schedule = schedule_from_config(info.scheduler_config, source=str(sched_file))
    except ScheduleError as e:
        raise TeacherError(str(e)) from None

    if schedule.is_flow and schedule.flow.use_dynamic_shifting:  # FLUX: μ of the teacher's resolution
        from dataclasses import replace

        schedule = replace(schedule, mu=schedule.flow.mu(family.image_seq_len(info.latent_shape)))

    if unet is None:
        unet = _load_component(family.denoiser_class(), path, family.denoiser_subfolder, torch_dtype=dtype).to(device)
        unet.requires_grad_(False)
    family.check_denoiser(unet, path)

    tokenizers, encoders, pipeline = [], [], None
    if text_encoders:
        pipeline = family.load_prompt_encoder(path, device, dtype, unet)
    if pipeline is not None:
        for tok_name, enc_name, _ in family.text_encoders:
            tokenizers.append(getattr(pipeline, tok_name))
            encoders.append(getattr(pipeline, enc_name))
    elif text_encoders:
        import transformers

        for tok_name, enc_name, enc_cls in family.text_encoders:
            for sub in (tok_name, enc_name):
                if not (path / sub).is_dir():
                    raise TeacherError(f"{path / sub} is missing: encoding prompts for a {index['_class_name']} needs it")
            tokenizers.append(transformers.CLIPTokenizer.from_pretrained(path, subfolder=tok_name))
            enc = _load_component(getattr(transformers, enc_cls), path, enc_name, torch_dtype=dtype).to(device)
            enc.requires_grad_(False).eval()
            encoders.append(enc)

    vae_model = None
    if info.has_vae and vae:
        vae_cls = AutoencoderKL
        vae_name = (index.get("vae") or [None, None])[1]
        if vae_name and vae_name != "AutoencoderKL":
            import diffusers

            vae_cls = getattr(diffusers, vae_name)
        vae_model = _load_component(vae_cls, path, "vae", torch_dtype=dtype).to(device)
        vae_model.requires_grad_(False).eval()

    return Teacher(
        path=path,
        family=family.name,
        unet=unet,
        scheduler_config=info.scheduler_config,
        schedule=schedule,
        tokenizers=tokenizers,
        text_encoders=encoders,
        vae=vae_model,
        vae_scale_factor=info.vae_scale_factor,
        force_zeros_for_empty_prompt=info.force_zeros_for_empty_prompt,
        vae_sample_size=info.vae_sample_size,
        pipeline=pipeline,
    )


def prompt_token_count(teacher: Teacher, prompt: str) -> int:
    """Tokens the prompt takes (with start/end tokens); beyond the tokenizer's limit it is truncated."""
    return len(teacher.tokenizers[0](prompt).input_ids)


def encode_prompts(
    teacher: Teacher, prompts: Sequence[str], negative_prompt: str | None = None
) -> tuple[Conditioning, Conditioning]:
    if not teacher.text_encoders:
        raise TeacherError(f"{teacher.path}: the teacher was loaded without its text encoders; load it with text_encoders=True")
    family = teacher.family_def
    cond = family.encode(teacher, prompts)
    return cond, family.negative(teacher, cond, negative_prompt)
