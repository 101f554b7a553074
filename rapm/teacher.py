"""Teachers are diffusers pipeline folders: loading, prompt encoding, and the one denoiser call.

SD 1.x/2.x and SDXL differ only in how prompts become conditioning (one or two
text encoders; SDXL's pooled embeddings and time ids) and in what the UNet takes
besides the latents. That difference lives here, in ``Conditioning``,
``encode_prompts`` and ``unet_output``; everything downstream is shared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import torch

from rapm.errors import RapmError
from rapm.diffusion import Schedule, ScheduleError, schedule_from_config

SD_PIPELINES = ("StableDiffusionPipeline",)
SDXL_PIPELINES = ("StableDiffusionXLPipeline",)
BUILTIN_TEACHERS = {"digits": Path(__file__).parent / "demo" / "teacher"}


def is_builtin(teacher, name: str) -> bool:
    """Whether a loaded teacher is the built-in one of that name (the digits teacher has its own metrics)."""
    return Path(teacher.path).resolve() == BUILTIN_TEACHERS[name].resolve()


class TeacherError(RapmError):
    """A teacher folder that cannot be used, with what is wrong and how to fix it."""


@dataclass
class Conditioning:
    """What the UNet is conditioned on, batched. SDXL adds pooled embeddings and time ids."""

    prompt_embeds: torch.Tensor  # [B, L, D]
    pooled_embeds: torch.Tensor | None = None  # [B, D2] (SDXL)
    time_ids: torch.Tensor | None = None  # [B, 6] (SDXL)

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


@dataclass
class Teacher:
    """A loaded teacher: its UNet, schedule and (optionally) text encoders and VAE."""

    path: Path
    family: str  # "sd" or "sdxl"
    unet: torch.nn.Module
    scheduler_config: dict
    schedule: Schedule
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    vae: torch.nn.Module | None = None
    vae_scale_factor: int = 1
    force_zeros_for_empty_prompt: bool = False

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (int(c.in_channels), int(size), int(size))

    @property
    def image_size(self) -> int:
        return self.latent_shape[1] * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

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


def unet_dtype(unet: torch.nn.Module) -> torch.dtype:
    """The dtype of the UNet's own weights (its LoRA adapters may be float32 beside bfloat16 weights)."""
    conv_in = getattr(unet, "conv_in", None)
    return conv_in.weight.dtype if conv_in is not None else next(unet.parameters()).dtype


def unet_output(unet: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """Call a diffusers UNet with SD or SDXL conditioning; the output is float32.

    Only the UNet's inputs take its dtype: positions, targets and the DDIM arithmetic around it stay float32 under
    mixed precision (in bfloat16, |z| ~ 1-2 would round to steps of ~0.008, eight times the pseudo-Huber c).
    """
    dtype = unet_dtype(unet)
    z, cond = z.to(dtype), cond.to(dtype)
    added = None
    if cond.pooled_embeds is not None:
        added = {"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids}
    t = torch.as_tensor(t, device=z.device)
    if t.ndim == 0:
        t = t.expand(z.shape[0])
    return unet(z, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added, return_dict=False)[0].float()


def guided_output(
    unet: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning | None, guidance: float
) -> torch.Tensor:
    """Classifier-free guidance, diffusers' form uncond + g (cond - uncond), with cond and uncond in one forward (float32)."""
    if uncond is None or guidance == 1.0:
        return unet_output(unet, z, t, cond)
    t = torch.as_tensor(t, device=z.device)
    if t.ndim == 0:
        t = t.expand(z.shape[0])
    out = unet_output(unet, torch.cat([z, z]), torch.cat([t, t]), Conditioning.cat([cond, uncond]))
    out_cond, out_uncond = out.chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


def resolve_teacher_path(name_or_path: str | Path) -> Path:
    """'digits' names the shipped teacher; anything else is a local diffusers folder."""
    if str(name_or_path) in BUILTIN_TEACHERS:
        return BUILTIN_TEACHERS[str(name_or_path)]
    return Path(name_or_path).expanduser()


def read_model_index(path: Path) -> dict:
    """Check that ``path`` is a diffusers SD/SDXL folder and return its model_index.json."""
    if not path.exists():
        raise TeacherError(
            f"teacher path {path} does not exist; give a local diffusers folder (one with model_index.json) or 'digits'"
        )
    if not path.is_dir():
        raise TeacherError(f"teacher path {path} is a file; give the diffusers folder that holds model_index.json")
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise TeacherError(
            f"{index_file} is missing: {path} is not a diffusers pipeline folder; "
            "save one with pipeline.save_pretrained(folder)"
        )
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise TeacherError(f"{index_file}: not valid JSON ({e})") from None
    cls = index.get("_class_name")
    if cls not in SD_PIPELINES + SDXL_PIPELINES:
        raise TeacherError(
            f"{index_file}: _class_name {cls!r} is not supported; rapm distills "
            f"{', '.join(SD_PIPELINES + SDXL_PIPELINES)} teachers"
        )
    needed = ["unet", "scheduler"]
    for name in needed:
        if not (path / name).is_dir():
            raise TeacherError(f"{path / name} is missing: a {cls} folder needs its '{name}' subfolder")
    return index


def _component_present(index: dict, path: Path, name: str) -> bool:
    entry = index.get(name)
    return bool(entry) and entry[0] is not None and (path / name).is_dir()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


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
    """Load a teacher from a local diffusers folder (or the built-in 'digits').

    Training never needs the text encoders (embeddings come from the store) and
    only sampling needs the VAE, so both are optional to keep memory to one UNet.
    ``unet``: the teacher's UNet already in memory (training's one UNet), used instead of loading a second.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = resolve_teacher_path(name_or_path)
    index = read_model_index(path)
    family = "sdxl" if index["_class_name"] in SDXL_PIPELINES else "sd"

    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.exists():
        raise TeacherError(f"{sched_file} is missing: the teacher's scheduler config is needed for its noise schedule")
    scheduler_config = json.loads(sched_file.read_text())
    try:
        schedule = schedule_from_config(scheduler_config, source=str(sched_file))
    except ScheduleError as e:
        raise TeacherError(str(e)) from None

    if unet is None:
        unet = _load_component(UNet2DConditionModel, path, "unet", torch_dtype=dtype).to(device)
        unet.requires_grad_(False)
    if family == "sdxl" and unet.config.addition_embed_type != "text_time":
        raise TeacherError(f"{path / 'unet' / 'config.json'}: addition_embed_type must be 'text_time' for an SDXL teacher")

    tokenizers, encoders = [], []
    if text_encoders:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        names = [("tokenizer", "text_encoder", CLIPTextModel)]
        if family == "sdxl":
            names.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
        for tok_name, enc_name, enc_cls in names:
            for sub in (tok_name, enc_name):
                if not (path / sub).is_dir():
                    raise TeacherError(f"{path / sub} is missing: encoding prompts for a {index['_class_name']} needs it")
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder=tok_name))
            enc = _load_component(enc_cls, path, enc_name, torch_dtype=dtype).to(device)
            enc.requires_grad_(False).eval()
            encoders.append(enc)

    vae_model, scale = None, 1
    if _component_present(index, path, "vae"):
        vae_cfg = json.loads((path / "vae" / "config.json").read_text())
        scale = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
        if vae:
            vae_model = _load_component(AutoencoderKL, path, "vae", torch_dtype=dtype).to(device)
            vae_model.requires_grad_(False).eval()

    return Teacher(
        path=path,
        family=family,
        unet=unet,
        scheduler_config=scheduler_config,
        schedule=schedule,
        tokenizers=tokenizers,
        text_encoders=encoders,
        vae=vae_model,
        vae_scale_factor=scale,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", family == "sdxl")),
    )


def _token_ids(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def prompt_token_count(teacher: Teacher, prompt: str) -> int:
    """Tokens the prompt takes (with start/end tokens); beyond the tokenizer's limit it is truncated."""
    return len(teacher.tokenizers[0](prompt).input_ids)


def _encode(teacher: Teacher, prompts: Sequence[str]) -> Conditioning:
    device = teacher.device
    if teacher.family == "sd":
        enc = teacher.text_encoders[0]
        ids = _token_ids(teacher.tokenizers[0], prompts, device)
        return Conditioning(enc(ids)[0])
    hidden, pooled = [], None
    for tok, enc in zip(teacher.tokenizers, teacher.text_encoders):
        out = enc(_token_ids(tok, prompts, device), output_hidden_states=True)
        pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
        hidden.append(out.hidden_states[-2])
    return Conditioning(torch.cat(hidden, dim=-1), pooled, sdxl_time_ids(teacher, len(prompts)))


def sdxl_time_ids(teacher: Teacher, batch: int) -> torch.Tensor:
    """original size, crop top-left, target size: the pipeline's defaults at the teacher's resolution."""
    size = teacher.image_size
    ids = torch.tensor([size, size, 0, 0, size, size], dtype=teacher.dtype, device=teacher.device)
    return ids.expand(batch, 6).clone()


def encode_prompts(
    teacher: Teacher, prompts: Sequence[str], negative_prompt: str | None = None
) -> tuple[Conditioning, Conditioning]:
    if not teacher.text_encoders:
        raise TeacherError(f"{teacher.path}: the teacher was loaded without its text encoders; load it with text_encoders=True")
    cond = _encode(teacher, prompts)
    if negative_prompt is None and teacher.family == "sdxl" and teacher.force_zeros_for_empty_prompt:
        uncond = cond.map(torch.zeros_like)
        uncond.time_ids = cond.time_ids.clone()
    else:
        uncond = _encode(teacher, [negative_prompt or ""] * len(prompts))
    return cond, uncond
