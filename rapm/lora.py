"""LoRA files, the facts rapm knows about them: which file of a folder is the LoRA, the export facts beside it
(``rapm_lora.json``), the base UNet's fingerprint they record, whether a LoRA fits a teacher, and loading it.

Writing a LoRA is ``rapm.export``'s; both read these.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from rapm.errors import RapmError
from rapm.roles import STUDENT
from rapm.teacher import Teacher
from rapm.text import plural

FACTS_NAME = "rapm_lora.json"


class LoraError(RapmError):
    """A LoRA file that cannot be used with this teacher."""


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


def resolve_lora_file(lora: str | Path) -> Path:
    """A LoRA file, or the folder holding one: diffusers' ``pytorch_lora_weights.safetensors`` first, then the weights
    its export facts name (a kohya-only export's ``NAME.safetensors``), then its only ``.safetensors`` file."""
    path = Path(lora).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise LoraError(f"LoRA {path} does not exist; give a .safetensors file or the folder rapm export wrote")
    preferred = path / "pytorch_lora_weights.safetensors"
    if preferred.is_file():
        return preferred
    facts = read_export_facts(path)
    named = facts.get("weights") if isinstance(facts, dict) else None
    if isinstance(named, str) and Path(named).name == named and (path / named).is_file():
        return path / named
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        what = "no .safetensors file" if not found else f"{len(found)} .safetensors files ({', '.join(f.name for f in found)})"
        raise LoraError(f"LoRA folder {path} holds {what}; give the LoRA file itself")
    return found[0]


def _base_module(unet: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        module = unet.get_submodule(name)
    except AttributeError:
        return None
    return getattr(module, "base_layer", module)


def _misfit(module: torch.nn.Module, kind: str, weight: torch.Tensor) -> str | None:
    """Why a LoRA factor cannot sit on ``module`` (None when it fits)."""
    if isinstance(module, torch.nn.Linear):
        if kind == "A" and weight.shape[1:] != (module.in_features,):
            return f"LoRA takes {tuple(weight.shape[1:])} inputs, the layer has {module.in_features}"
        if kind == "B" and weight.shape[:1] != (module.out_features,):
            return f"LoRA gives {weight.shape[0]} outputs, the layer has {module.out_features}"
    elif isinstance(module, torch.nn.Conv2d):
        if kind == "A" and tuple(weight.shape[1:]) != (module.in_channels // module.groups, *module.kernel_size):
            return f"LoRA down is {tuple(weight.shape[1:])} per rank, the conv is ({module.in_channels}, {module.kernel_size})"
        if kind == "B" and weight.shape[0] != module.out_channels:
            return f"LoRA gives {weight.shape[0]} channels, the conv has {module.out_channels}"
    return None


def _as_peft_keys(unet_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' older key forms (``to_q_lora.down``, ``lora.up``) in peft's (``to_q.lora_A``), as its loader converts them."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    if unet_state and not any("lora_A" in k for k in unet_state):
        return convert_unet_state_dict_to_peft(dict(unet_state))
    return unet_state


def check_lora_fits(unet: torch.nn.Module, unet_state: dict[str, torch.Tensor]) -> list[str]:
    """Every module of a UNet LoRA (diffusers' converted keys, ``unet.`` stripped) that the UNet lacks or that has other shapes."""
    problems = []
    for key, weight in _as_peft_keys(unet_state).items():
        module_name, _, rest = key.partition(".lora_")
        if rest not in ("A.weight", "B.weight"):
            continue
        module = _base_module(unet, module_name)
        if module is None:
            problems.append(f"{module_name}: not in the teacher's UNet")
            continue
        why = _misfit(module, rest[0], weight)
        if why:
            problems.append(f"{module_name}: {why}")
    return sorted(set(problems))


def load_lora(teacher: Teacher, lora: str | Path, adapter: str = STUDENT) -> Path:
    """Load a LoRA file (diffusers or kohya layout) into the teacher as ``adapter``, as ``load_lora_weights`` does.

    The LoRA is checked against the teacher first: a LoRA for another base model gives one ``LoraError`` that
    names the file and the teacher, instead of a partial load (diffusers only warns about keys it cannot place).
    """
    weights = resolve_lora_file(lora)
    family = teacher.family_def
    loader = family.pipeline_class()
    where = f"LoRA {weights} does not fit the teacher {teacher.path} ({teacher.family})"
    try:
        state, alphas, metadata = family.lora_state_dict(loader, weights, teacher.unet)
    except Exception as e:  # diffusers raises ValueError, KeyError, SafetensorError... for files it cannot read
        raise LoraError(f"LoRA {weights}: not a LoRA diffusers can read ({type(e).__name__}: {e})") from None
    if not state or not all("lora" in k for k in state):
        odd = next((k for k in state if "lora" not in k), None)
        raise LoraError(f"LoRA {weights}: not a LoRA state dict (key {odd!r}); give a diffusers or kohya LoRA file")
    prefix = family.denoiser_subfolder + "."  # diffusers' keys: unet.* (transformer.* for a transformer family)
    unet_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not unet_state:
        raise LoraError(f"{where}: it holds no UNet weights (keys start with {sorted({k.split('.')[0] for k in state})})")
    if adapter in getattr(teacher.unet, "peft_config", {}):
        raise LoraError(f"the teacher {teacher.path} already carries a '{adapter}' adapter; load LoRA {weights} into a fresh teacher")
    problems = check_lora_fits(teacher.unet, unet_state)
    if problems:
        total = len({k.partition(".lora_")[0] for k in _as_peft_keys(unet_state)})
        hint = ""
        facts = read_export_facts(weights)
        if facts and facts.get("teacher_path"):
            hint = f"; it was exported for {facts['teacher_path']} ({facts.get('teacher_family')})"
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise LoraError(f"{where}: {len(problems)} of its {plural(total, 'module')} {'does' if len(problems) == 1 else 'do'} "
                        f"not fit ({shown}){hint}; use the teacher it was trained for")
    encoders = {p: i for i, p in enumerate(("text_encoder", "text_encoder_2")) if any(k.startswith(p + ".") for k in state)}
    missing = [p for p, i in encoders.items() if i >= len(teacher.text_encoders)]
    if missing:
        raise LoraError(f"{where}: it has weights for {', '.join(missing)}, which this teacher (as loaded) does not have")
    try:
        family.load_lora(loader, state, alphas, teacher.unet, adapter, metadata)
        for prefix, i in encoders.items():  # as load_lora_weights does, for LoRAs trained with their text encoders
            loader.load_lora_into_text_encoder(
                state, alphas, teacher.text_encoders[i], prefix=prefix, adapter_name=adapter, metadata=metadata,
            )
    except RapmError:
        raise
    except Exception as e:
        raise LoraError(f"{where}: diffusers could not load it ({type(e).__name__}: {e})") from None
    return weights
