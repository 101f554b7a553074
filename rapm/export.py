"""Export the student adapter as a LoRA the ecosystem loads (DESIGN.md, decision 6).

Two layouts of the same weights:

* ``diffusers`` (default): ``pytorch_lora_weights.safetensors`` as diffusers'
  ``save_lora_weights`` writes it: peft keys under ``unet.``, and the adapter's
  LoraConfig in the safetensors metadata so that ``lora_alpha`` survives. A LoRA
  loaded without its alpha is scaled by 1 instead of alpha / rank: a different
  student.
* ``kohya``: ``lora_unet_<module path with '_'>.{lora_down,lora_up}.weight`` and
  ``.alpha``, the SD 1.x kohya-ss naming that ComfyUI and A1111 read and that
  diffusers' ``load_lora_weights`` converts.

Beside the weights: ``README.md`` (a model card with the exact sampling
settings and a diffusers snippet) and ``rapm_lora.json`` (the same facts,
machine-readable). The folder is written whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
import torch
import typer

import rapm
from rapm.diffusion import coarse_timesteps
from rapm.errors import RapmError
from rapm.roles import STUDENT

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
KOHYA_WEIGHT_NAME = "kohya_lora.safetensors"
FACTS_NAME = "rapm_lora.json"
CARD_NAME = "README.md"
FORMATS = ("diffusers", "kohya")
FACTS_VERSION = 1

# The LoraConfig fields that change what the adapter computes; the rest (dropout, bookkeeping) stay out of
# the metadata so that an older peft can still build the config and inference never sees training dropout.
_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                  "fan_in_fan_out", "lora_bias", "layers_to_transform", "layers_pattern", "exclude_modules")


class ExportError(RapmError):
    """An export that cannot be written as asked."""


def adapter_state_dict(unet: torch.nn.Module, adapter: str = STUDENT) -> dict[str, torch.Tensor]:
    """One adapter's LoRA weights in peft's key form (``<module>.lora_A.weight``), detached, contiguous, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    if adapter not in getattr(unet, "peft_config", {}):
        have = ", ".join(getattr(unet, "peft_config", {})) or "none"
        raise ExportError(f"the UNet carries no '{adapter}' adapter (adapters: {have}); add it with rapm.roles.add_roles")
    state = get_peft_model_state_dict(unet, adapter_name=adapter)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def adapter_metadata(unet: torch.nn.Module, adapter: str = STUDENT) -> dict:
    """The adapter's LoraConfig as diffusers stores it beside the weights (``lora_adapter_metadata``)."""
    from peft import LoraConfig

    config = unet.peft_config[adapter].to_dict()
    default = LoraConfig().to_dict()
    meta = {}
    for key in _CONFIG_FIELDS:
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, (set, tuple)):
            value = sorted(value)
        if key in ("r", "lora_alpha", "target_modules") or value != default.get(key):
            meta[key] = value
    return meta


def to_kohya(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft keys to kohya's: ``lora_unet_<module with '_'>.lora_down.weight`` (A), ``.lora_up.weight`` (B), ``.alpha``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ExportError(f"LoRA key {key!r} has no kohya equivalent (only plain lora_A / lora_B weights do)")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def base_unet_fingerprint(unet: torch.nn.Module) -> str:
    """A cheap fingerprint of the base UNet: names, shapes and the first and last 64 values of every base weight.

    Adapters are left out (peft's ``base_layer`` names are read as the plain ones), so an adapted UNet and the
    teacher it came from give the same value. Values are read in float32: a teacher loaded in another dtype
    (fp16 from fp32 weights) gives another fingerprint.
    """
    digest = hashlib.sha256()
    for name, param in sorted(unet.named_parameters(), key=lambda item: item[0]):
        if "lora_" in name:
            continue
        flat = param.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float32).contiguous()
        digest.update(name.replace(".base_layer", "").encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def sampling_scheduler_settings(scheduler_config: dict, steps: int) -> dict:
    """The DDIMScheduler settings that reproduce the student's N steps in diffusers.

    ``set_alpha_to_one`` follows the teacher's config (False for SD 1.x/2.x and SDXL) because rapm's final
    position uses it; a DDIMScheduler built from a config without the field would default to True.
    """
    return {
        "class": "DDIMScheduler",
        "timestep_spacing": "trailing",
        "clip_sample": False,
        "set_alpha_to_one": bool(scheduler_config.get("set_alpha_to_one", False)),
        "num_inference_steps": int(steps),
        "guidance_scale": 1.0,
    }


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family not in ("sd", "sdxl"):
        raise ExportError(f"teacher family must be 'sd' or 'sdxl', got {family!r}")
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _write_weights(folder: Path, unet: torch.nn.Module, family: str, fmt: str, adapter: str) -> tuple[str, dict, int]:
    state = adapter_state_dict(unet, adapter)
    meta = adapter_metadata(unet, adapter)
    if fmt == "diffusers":
        _pipeline_class(family).save_lora_weights(
            str(folder), unet_lora_layers=state, unet_lora_adapter_metadata=meta, weight_name=DIFFUSERS_WEIGHT_NAME,
        )
        return DIFFUSERS_WEIGHT_NAME, meta, len(state)
    from safetensors.torch import save_file

    special = [k for k in ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "fan_in_fan_out", "lora_bias") if meta.get(k)]
    if special:
        raise ExportError(f"the kohya layout holds plain LoRA with one rank and alpha; this adapter sets {', '.join(special)}: "
                          "export it with format 'diffusers'")
    kohya = to_kohya(state, float(meta["lora_alpha"]))
    header = {"ss_network_module": "networks.lora", "ss_network_dim": str(meta["r"]),
              "ss_network_alpha": str(meta["lora_alpha"]), "rapm_version": rapm.__version__}
    save_file(kohya, str(folder / KOHYA_WEIGHT_NAME), metadata=header)
    return KOHYA_WEIGHT_NAME, meta, len(state)


def _teacher_facts(teacher_path: str | Path) -> tuple[Path, dict, bool]:
    from rapm.teacher import read_model_index, resolve_teacher_path

    path = resolve_teacher_path(teacher_path)
    index = read_model_index(path)
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    has_vae = bool(index.get("vae")) and index["vae"][0] is not None
    return path, config, has_vae


def _model_card(facts: dict, out_dir: Path, has_vae: bool) -> str:
    sched = facts["scheduler"]
    cls = "StableDiffusionXLPipeline" if facts["teacher_family"] == "sdxl" else "StableDiffusionPipeline"
    n = facts["steps"]
    lora = facts["lora"]
    teacher = facts["teacher_path"]
    if has_vae:
        call = (f'image = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale=1.0,\n'
                f'             generator=torch.Generator("cpu").manual_seed(0)).images[0]\nimage.save("cat.png")')
    else:
        call = (f'# This teacher has no VAE (hence vae=None above): it works in pixel space, its latents are the images.\n'
                f'images = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale=1.0, output_type="latent",\n'
                f'              generator=torch.Generator("cpu").manual_seed(0)).images')
    weights_kw = "" if facts["format"] == "diffusers" else f', weight_name="{facts["weights"]}"'
    caveat = ""
    if facts["num_train_timesteps"] % n:
        caveat = (f"\nNote: {n} does not divide {facts['num_train_timesteps']}. diffusers' DDIMScheduler steps from t to "
                  f"t - {facts['num_train_timesteps']} // {n}, which is one timestep off rapm's trailing grid "
                  f"{facts['timesteps']} at some steps; `rapm sample` follows the grid the student was trained on.\n")
    training = ""
    if facts.get("training"):
        rows = "\n".join(f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in facts["training"].items())
        training = f"\n## Training\n\n| field | value |\n| --- | --- |\n{rows}\n"
    return f"""# {n}-step student LoRA for {facts['teacher']}

A LoRA distilled with rapm (Relative and Absolute Position Matching, arXiv 2503.20744) that makes the teacher a
{n}-step sampler at guidance 1.0: classifier-free guidance is distilled into the student, so sample without it.

| field | value |
| --- | --- |
| teacher | `{teacher}` ({facts['teacher_family']}, {cls}) |
| steps (N) | {n}, timesteps {facts['timesteps'][:-1]} then the final position |
| LoRA | rank {lora['rank']}, alpha {lora['alpha']}, {lora['modules']} modules, {lora['parameters']:,} parameters |
| format | {facts['format']} (`{facts['weights']}`) |
| base UNet | `{facts['base_unet_fingerprint']}` |

## Sampling settings

- scheduler: `DDIMScheduler` from the teacher's scheduler config with `timestep_spacing="trailing"`,
  `clip_sample=False`, `set_alpha_to_one={sched['set_alpha_to_one']}`
- `num_inference_steps={n}`, `guidance_scale=1.0`
{caveat}
## diffusers

```python
import torch
from diffusers import DDIMScheduler, {cls}

pipe = {cls}.from_pretrained("{teacher}"{'' if has_vae else ', vae=None'})
pipe.scheduler = DDIMScheduler.from_config(
    pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one={sched['set_alpha_to_one']}
)
pipe.load_lora_weights("{out_dir}"{weights_kw})
pipe.fuse_lora()  # optional: fold the LoRA into the UNet's weights
{call}
```

## rapm

```
rapm sample --teacher {facts['teacher']} --lora {out_dir} --prompt "a photo of a cat" --steps {n} --out samples/
```
{training}
`{FACTS_NAME}` holds these facts machine-readable.
"""


def export_lora(
    unet: torch.nn.Module,
    teacher_path: str | Path,
    family: str,
    out_dir: str | Path,
    steps: int,
    fmt: str = "diffusers",
    adapter: str = STUDENT,
    extra_card: dict | None = None,
) -> Path:
    """Write the ``adapter`` LoRA of ``unet`` (never the discriminator's) to ``out_dir``; return the weights file.

    ``out_dir`` gets the weights, ``README.md`` and ``rapm_lora.json``, written in a temporary folder beside it and
    renamed into place, so it is never half-written. An ``out_dir`` that holds an earlier export is replaced; any
    other non-empty folder is left alone and refused.
    """
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    _pipeline_class(family)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / FACTS_NAME).exists())):
        raise ExportError(f"{out_dir} exists and is not an earlier rapm export; give a new or empty folder")
    teacher_dir, scheduler_config, has_vae = _teacher_facts(teacher_path)
    num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
    timesteps = coarse_timesteps(num_train_timesteps, steps)

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(out_dir)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out_dir), dir=out_dir.parent))
    except OSError as e:  # a read-only parent
        raise ExportError(f"--out {out_dir}: cannot be written ({e.strerror or e}); give a writable folder") from None
    try:
        weights, meta, n_tensors = _write_weights(staging, unet, family, fmt, adapter)
        n_params = sum(p.numel() for n, p in unet.named_parameters() if f".{adapter}." in n and "lora_" in n)
        facts = {
            "format_version": FACTS_VERSION,
            "rapm_version": rapm.__version__,
            "format": fmt,
            "weights": weights,
            "teacher": str(teacher_path),
            "teacher_path": str(teacher_dir.resolve()),
            "teacher_family": family,
            "prediction_type": scheduler_config.get("prediction_type", "epsilon"),
            "num_train_timesteps": num_train_timesteps,
            "steps": int(steps),
            "timesteps": timesteps,
            "scheduler": sampling_scheduler_settings(scheduler_config, steps),
            "lora": {
                "rank": meta["r"],
                "alpha": meta["lora_alpha"],
                "target_modules": meta["target_modules"],
                "modules": n_tensors // 2,
                "parameters": n_params,
            },
            "base_unet_fingerprint": base_unet_fingerprint(unet),
        }
        if extra_card:
            facts["training"] = dict(extra_card)
        (staging / FACTS_NAME).write_text(json.dumps(facts, indent=2, default=str) + "\n")
        (staging / CARD_NAME).write_text(_model_card(facts, out_dir, has_vae))
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        _replace_dir(staging, out_dir)
    except OSError as e:  # a full disk, a read-only folder
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"--out {out_dir}: cannot be written ({e.strerror or e}); the earlier export there (if any) is "
                          "unchanged; free space or give a writable folder") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / weights


EXPORT_FILES = (DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, CARD_NAME, FACTS_NAME)  # all an export writes


def _staging_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.partial-"


def _remove_stale_staging(out_dir: Path) -> None:
    """Remove what a killed export left beside ``out_dir``: its staging folders, holding only files an export writes."""
    for p in out_dir.parent.glob(_staging_prefix(out_dir) + "*"):
        if p.is_dir() and not p.is_symlink() and all(f.is_file() and f.name in EXPORT_FILES for f in p.iterdir()):
            shutil.rmtree(p, ignore_errors=True)


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Put the finished export in place: a new folder by one rename; into an earlier export, file by file.

    An earlier export keeps whatever the user put beside it: only the files an export writes are replaced (the
    weights of the other format removed), and ``rapm_lora.json`` is replaced last, the commit point of the set.
    """
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    written = {p.name for p in staging.iterdir()}
    for name in sorted(written - {FACTS_NAME}):
        os.replace(staging / name, out_dir / name)
    for name in set(EXPORT_FILES) - written:
        (out_dir / name).unlink(missing_ok=True)
    os.replace(staging / FACTS_NAME, out_dir / FACTS_NAME)
    staging.rmdir()


def read_export_facts(lora: str | Path) -> dict | None:
    """``rapm_lora.json`` beside a LoRA file or in a LoRA folder, or None when it was not exported by rapm."""
    path = Path(lora)
    facts = (path if path.is_dir() else path.parent) / FACTS_NAME
    if not facts.exists():
        return None
    try:
        return json.loads(facts.read_text())
    except json.JSONDecodeError:
        return None


def cli(
    run: Path = typer.Option(..., "--run", help="The training run directory (rapm train --out)."),
    out: Path = typer.Option(..., "--out", help="Folder to write the LoRA, README.md and rapm_lora.json to."),
    format: str = typer.Option("diffusers", "--format", help="diffusers (pytorch_lora_weights.safetensors) or kohya (ComfyUI / A1111)."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Read an old pickle state.pt that "
                                          "weights_only loading refuses; it can run code: only for a run you made."),
) -> None:
    """Export the trained student of RUN as a LoRA."""
    from rapm.run import load_student

    if format not in FORMATS:
        raise ExportError(f"--format {format!r} is not supported; use one of {', '.join(FORMATS)}")
    teacher, unet, config = load_student(run, trust_checkpoint=trust_checkpoint)
    steps = config["steps"]  # N, from the store the run trained on
    extra = {"run": str(run)}
    extra.update({k: v for k, v in config.items() if k not in ("teacher", "steps") and isinstance(v, (str, int, float, bool))})
    weights = export_lora(unet, config["teacher"], teacher.family, out, int(steps), fmt=format, extra_card=extra)
    typer.echo(f"wrote {weights} ({format}); sample with: rapm sample --teacher {config['teacher']} --lora {out} --prompt '...'")
