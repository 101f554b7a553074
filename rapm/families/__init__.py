"""Teacher families: everything rapm knows about one kind of diffusers pipeline, in one object.

A family (``Family``) says how to read a teacher folder of its kind and how to use what it holds: the pipeline
classes it reads (``model_index.json``'s ``_class_name``), the denoiser (its subfolder, its diffusers class, how it
is called), the text encoders and how prompts become ``Conditioning``, the prediction type and how the denoiser's
output becomes (x0, eps), the training preset and default guidance, the LoRA target modules, the blocks the
discriminator's heads read, and how a LoRA of it is exported (the diffusers pipeline class that saves it, sd-scripts'
and the SAI model spec's names, the kohya module names). ``read_teacher_info(path)`` reads a folder's facts without
loading weights; ``rapm.teacher.load_teacher`` loads one through its family. No other module tests a family's name.

Families here: ``sd`` (SD 1.x / 2.x, ``StableDiffusionPipeline``) and ``sdxl`` (``StableDiffusionXLPipeline``),
both ``UNet2DConditionModel`` denoisers (``rapm.families.sd``); ``sd3`` (``StableDiffusion3Pipeline``) and ``flux``
(``FluxPipeline``), flow-matching transformers (``rapm.families.flow``): their schedule is ``rapm.diffusion.Schedule``
of kind "flow" (t = σ · 1000, prediction type "flow"), so the DDIM arithmetic the methods call is their Euler step
and no method branches on the family. The built-in digits teacher is an ``sd`` folder.

How to add a family (SD3, FLUX, ...):

1. Write ``rapm/families/<name>.py`` with a subclass of ``rapm.families.base.Family`` (or of ``UNetFamily``,
   ``rapm.families.sd``, where the denoiser is a diffusers UNet): set ``name``, ``pipeline_class_names``,
   ``denoiser_subfolder`` / ``denoiser_class_name``, ``text_encoders``, ``preset``, ``default_guidance``, ``lora_targets``, ``disc_levels``; implement ``encode``
   (prompts -> Conditioning; add the fields it needs to ``rapm.conditioning.Conditioning``), ``negative``,
   ``denoise`` (the one denoiser call: a transformer takes ``hidden_states``, ``timestep``, ``pooled_projections``,
   FLUX its packed latents and ``guidance``), ``to_x0_eps`` (epsilon / v_prediction / flow velocity),
   ``feature_blocks`` (the modules whose outputs the discriminator reads), ``check_denoiser``, and the export facts
   (``export_kwargs``, ``base_model_version``, ``sai_architecture``, ``modelspec_implementation``,
   ``kohya_names``; a new naming scheme goes beside ``ldm`` in ``rapm.export``).
   The call sites that reach a family: ``rapm.teacher.unet_output`` dispatches on the denoiser's class
   (``denoiser_family``); ``rapm.discriminator`` asks ``feature_blocks`` / ``feature_channels`` / ``feature_map``;
   the DDIM arithmetic (``rapm.diffusion``) reads the schedule's kind and prediction type (epsilon, v_prediction,
   flow), and the positions (integer timesteps, or σ · 1000 floats) come from ``Schedule.coarse`` / ``Schedule.grid``.
   Packed latents (FLUX) are the family's business: ``latent_shape`` gives the stored shape, ``denoise`` packs and
   unpacks; a guidance that is a denoiser input (FLUX.1-dev) rides in ``Conditioning.guidance`` (``with_guidance``,
   ``cfg = False``); a family whose pipeline encodes prompts loads it in ``load_prompt_encoder``.
2. Append an instance to ``FAMILIES`` below (the order is the order ``read_model_index`` names them in errors).
3. Give it ``presets`` (they join ``rapm.config.PRESETS``) if its training wants other defaults.
4. Tests: a tiny random pipeline of the family in ``tests/tiny.py``, then the family's round trips (load,
   trajectories, train, export, load in diffusers) as tests/test_teacher.py and tests/test_export.py do for sd/sdxl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rapm.families.base import Family, TeacherError
from rapm.families.flow import FLUX, SD3
from rapm.families.sd import SD, SDXL


FAMILIES: list[Family] = [SD, SDXL, SD3, FLUX]


def family_named(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise TeacherError(f"teacher family must be one of {', '.join(repr(f.name) for f in FAMILIES)}, got {name!r}")


def supported_pipelines() -> tuple[str, ...]:
    return tuple(c for f in FAMILIES for c in f.pipeline_class_names)


def family_of_pipeline(class_name: str) -> Family | None:
    return next((f for f in FAMILIES if class_name in f.pipeline_class_names), None)


def denoiser_family(denoiser: torch.nn.Module) -> Family:
    """The family whose denoiser class ``denoiser`` is (the first of them: sd and sdxl share the UNet's class)."""
    names = {c.__name__ for c in type(denoiser).__mro__}
    for f in FAMILIES:
        if f.denoiser_class_name in names:
            return f
    raise TeacherError(f"{type(denoiser).__name__} is not the denoiser of a teacher family rapm knows")


# ---------------------------------------------------------------------------------------------- a folder's facts

# The teachers rapm ships, by the name --teacher takes: the digits (rapm/demo) and the scenes (rapm/scenes) teachers
BUILTIN_TEACHERS = {"digits": Path(__file__).parent.parent / "demo" / "teacher",
                    "scenes": Path(__file__).parent.parent / "scenes" / "teacher"}
BUILTIN_NAMES = " or ".join(repr(name) for name in BUILTIN_TEACHERS)  # for help texts and errors


def resolve_teacher_path(name_or_path: str | Path) -> Path:
    """A built-in teacher's name ('digits', 'scenes') names its shipped folder; anything else is a local diffusers
    folder."""
    if str(name_or_path) in BUILTIN_TEACHERS:
        return BUILTIN_TEACHERS[str(name_or_path)]
    return Path(name_or_path).expanduser()


def read_model_index(path: Path) -> dict:
    """Check that ``path`` is a diffusers folder of a family rapm knows and return its model_index.json."""
    if not path.exists():
        raise TeacherError(
            f"teacher path {path} does not exist; give a local diffusers folder (one with model_index.json) or "
            f"{BUILTIN_NAMES}"
        )
    if not path.is_dir():
        if path.suffix == ".safetensors":  # a single-file checkpoint (A1111, civitai): rapm convert makes the folder
            raise TeacherError(f"teacher path {path} is a single-file checkpoint; rapm reads diffusers folders: convert "
                               f"it once with `rapm convert {path} --out {path.with_name(path.stem + '-diffusers')}` "
                               "(offline: add --config with a diffusers folder of the same model), then give that "
                               "folder as --teacher")
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
    family = family_of_pipeline(cls)
    if family is None:
        raise TeacherError(
            f"{index_file}: _class_name {cls!r} is not supported; rapm distills "
            f"{', '.join(supported_pipelines())} teachers"
        )
    for name in (family.denoiser_subfolder, "scheduler"):
        if not (path / name).is_dir():
            raise TeacherError(f"{path / name} is missing: a {cls} folder needs its '{name}' subfolder")
    return index


def _component_present(index: dict, path: Path, name: str) -> bool:
    entry = index.get(name)
    return bool(entry) and entry[0] is not None and (path / name).is_dir()


@dataclass
class TeacherInfo:
    """A teacher folder's facts, read from its JSON files without loading a weight."""

    path: Path
    index: dict  # model_index.json
    family: Family
    scheduler_config: dict
    denoiser_config: dict
    has_vae: bool
    vae_scale_factor: int  # pixels per latent pixel (1 without a VAE)
    vae_sample_size: int | None = None  # the VAE config's sample_size (pixels), where it has one

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.family.latent_shape_of(self.denoiser_config, self.vae_sample_size, self.vae_scale_factor)

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.index.get("force_zeros_for_empty_prompt", self.family.force_zeros_for_empty_prompt))


def read_scheduler_config(path: Path) -> dict:
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.exists():
        raise TeacherError(f"{sched_file} is missing: the teacher's scheduler config is needed for its noise schedule")
    return json.loads(sched_file.read_text())


def read_teacher_info(name_or_path: str | Path) -> TeacherInfo:
    """The facts of the teacher folder ``name_or_path`` (or a built-in teacher's name): family, configs, VAE or none."""
    path = resolve_teacher_path(name_or_path)
    index = read_model_index(path)
    family = family_of_pipeline(index["_class_name"])
    scheduler_config = read_scheduler_config(path)
    denoiser_file = path / family.denoiser_subfolder / "config.json"
    denoiser_config = json.loads(denoiser_file.read_text()) if denoiser_file.exists() else {}
    has_vae, scale, vae_size = _component_present(index, path, "vae"), 1, None
    if has_vae:
        vae_cfg = json.loads((path / "vae" / "config.json").read_text())
        scale = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
        size = vae_cfg.get("sample_size")
        vae_size = size if isinstance(size, int) else (size[0] if size else None)
    return TeacherInfo(path, index, family, scheduler_config, denoiser_config, has_vae, scale, vae_size)


__all__ = ["Family", "FAMILIES", "TeacherError", "TeacherInfo", "BUILTIN_TEACHERS", "BUILTIN_NAMES", "family_named", "family_of_pipeline",
           "denoiser_family", "read_model_index", "read_teacher_info", "read_scheduler_config", "resolve_teacher_path",
           "supported_pipelines"]
