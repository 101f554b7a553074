"""``rapm convert``: a single-file checkpoint (``model.safetensors``, what A1111 and civitai hand out) into the
diffusers folder every other verb takes as ``--teacher``.

The family is told from the file's tensor names, read from its header only: SDXL's second text encoder sits under
``conditioner.embedders.1.``; SD 2.x's OpenCLIP encoder under ``cond_stage_model.model.``; SD 1.x's CLIP under
``cond_stage_model.transformer.``. The weights are converted by diffusers' own ``from_single_file`` of the family's
pipeline. A single file holds no tokenizer and no configs: ``--config`` names a local diffusers folder of the same
model (its model_index.json, component configs and tokenizers are read, never its weights), so nothing is
downloaded; without it diffusers fetches those small files from the Hugging Face Hub. The folder is written to a
staging folder beside ``--out`` and renamed into place when complete. Pickled checkpoints (``.ckpt``, ``.pt``) are
refused: loading one can run code.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import typer

from rapm.families import FAMILIES, family_named
from rapm.families.base import PICKLE_SUFFIXES, TeacherError
from rapm.text import quiet_library_bars

def single_file_kind(path: Path) -> tuple[str, str]:
    """(family, label) of a single-file checkpoint, from its tensor names; TeacherError naming the file otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - any failure to read the header: not a usable safetensors file
        raise TeacherError(f"{path}: not a readable .safetensors checkpoint ({type(e).__name__}: {e})") from None
    # the families rapm converts first (their signatures are text encoders'), then those it names a folder for
    for family in sorted(FAMILIES, key=lambda f: f.single_file_kwargs is None):
        for prefix, label in family.single_file_signatures:
            if not any(k.startswith(prefix) for k in keys):
                continue
            if family.single_file_kwargs is None:
                raise TeacherError(f"{path}: a single file of {label}; rapm converts SD 1.x / 2.x / SDXL checkpoints. "
                                   f"Give the {label} diffusers folder as --teacher (the model's repository in "
                                   "diffusers layout)")
            if not any(k.startswith("model.diffusion_model.") for k in keys):
                raise TeacherError(f"{path}: holds a text encoder ({label}) but no UNet (model.diffusion_model.*): "
                                   "not a whole checkpoint; give the model's full .safetensors file")
            return family.name, label
    raise TeacherError(f"{path}: no SD 1.x / 2.x / SDXL checkpoint's tensors (cond_stage_model.* or conditioner.*, "
                       "model.diffusion_model.*); rapm converts A1111 / civitai single files of those models")


def convert_single_file(path: str | Path, out: str | Path, config: str | Path | None = None) -> tuple[Path, str, str]:
    """Convert the checkpoint ``path`` into the diffusers folder ``out``; return (out, family, label)."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise TeacherError(f"{path} is not a file; give the checkpoint's .safetensors file")
    if path.suffix in PICKLE_SUFFIXES:
        raise TeacherError(f"{path}: a pickle ({path.suffix}), which can run code when loaded; rapm converts "
                           ".safetensors checkpoints only: get the model's .safetensors file")
    family, label = single_file_kind(path)
    if config is not None:
        config = Path(config)
        if not (config / "model_index.json").is_file():
            raise TeacherError(f"--config {config}: no model_index.json; give a diffusers folder of the same model "
                               "(its configs and tokenizers are read, not its weights)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TeacherError(f"--out {out} exists and is not an empty folder; rapm writes only into a new one: give another --out")
    cls = family_named(family).pipeline_class()
    kwargs: dict = dict(family_named(family).single_file_kwargs)
    if config is not None:
        kwargs.update(config=str(config), local_files_only=True)
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        if config is None:
            raise TeacherError(f"{path}: diffusers could not fetch the {label} configs and tokenizers from the Hugging "
                               f"Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}); offline, add --config "
                               "with a diffusers folder of the same model") from None
        raise TeacherError(f"{path}: diffusers could not convert it with --config {config} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); give the diffusers folder of this very model") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.converting-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise TeacherError(f"--out {out}: cannot be written ({e.strerror or e}); free space or give another --out") from None
    return out, family, label


def cli(
    checkpoint: Path = typer.Argument(..., help="The single-file checkpoint: an SD 1.x / 2.x / SDXL .safetensors file "
                                      "(A1111, civitai)."),
    out: Path = typer.Option(..., "--out", help="The diffusers folder to write (new or empty)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A local diffusers folder of the same model: its "
                                          "configs and tokenizers are read (not its weights), so nothing is "
                                          "downloaded. Default: diffusers fetches them from the Hugging Face Hub."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="--no-progress: no progress bars, diffusers' "
                                  "neither."),
) -> None:
    """Convert a single-file checkpoint into a diffusers folder for --teacher."""
    if not progress:
        quiet_library_bars()
    folder, family, label = convert_single_file(checkpoint, out, config)
    typer.echo(f"wrote {folder} ({label}, {family_named(family).pipeline_class_names[0]}); give it as --teacher {folder}")
