"""Training configuration: one dataclass, presets per teacher family, overrides from a file and the command line.

Every default's source is listed in docs/defaults.md.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from rapm.errors import RapmError
from rapm.families import FAMILIES, family_named
from rapm.plugins import builtin_presets, teacher_file
from rapm.roles import PCM_TARGET_MODULES
from rapm.trajectories import read_prompts


class ConfigError(RapmError):
    pass


LR_SCHEDULES = ("constant", "step", "cosine")  # config field lr_schedule


@dataclass
class TrainConfig:
    teacher: str = ""
    store: str = ""
    method: str = "rapm"
    preset: str = ""
    iterations: int = 1000
    batch_size: int = 1
    seed: int = 0
    # The student LoRA and its optimizer
    lora_rank: int = 64
    lora_alpha: float = 8.0
    lora_targets: list[str] = field(default_factory=lambda: list(PCM_TARGET_MODULES))
    lr: float = 5e-6
    weight_decay: float = 1e-3
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    lr_schedule: str = "constant"  # constant | step (lr / 10 from half the iterations on: SFD's) | cosine (to 0)
    # EMA of the student (validated, sampled and exported in its place): negative = the method's own (rapm: 0.99 with
    # the warm-up, the default recipe; every other method and rapm-paper: off); 0 = off
    ema_decay: float = -1.0
    ema_warmup: bool = False  # with an explicit ema_decay: decay min(ema_decay, (1 + k) / (10 + k)) after k updates
    relative_target: str = "student"  # the frozen student of the relative position: student (Alg. 2) | ema (its EMA)
    # The losses
    huber_c: float = 0.001
    adv_weight: float = -1.0  # negative = the method's own: rapm 0 (no discriminator), rapm-paper and pcm 0.1 (PCM's)
    delta: int = 0  # Δ in teacher timesteps; 0 = one step of the stored fine grid, T / (N M)
    slot_weights: list[float] = field(default_factory=list)  # w_n; empty = all 1
    distance: str = ""  # position-matching distance: "" = the method's own (rapm: pseudo_huber, sfd: l1); or l2
    relative_weight: float = -1.0  # weight of the relative terms (eq. 15); negative = the method's own: rapm 0, rapm-paper 1
    # The peers (rapm/methods/): PCM's real data; progressive distillation's rounds and RDD's relational loss
    real_data: str = ""  # pcm: a built-in teacher's own ("digits": its train split; "scenes"), or a folder of captioned images
    progressive_start_steps: int = 16  # the first round's teacher steps: N 2^R for R rounds
    # RDD's relational loss as a term (rapm/methods/rdd.py): 0 = the method's own (progressive-rdd: 1.0, others: off)
    rdd_weight: float = 0.0  # > 0: the term at this weight on rapm, rapm-paper, rapm-relative, sfd or progressive
    rdd_features: str = ""  # "" = the teacher's own: classifier (digits), teacher (every other); teacher | classifier
    rdd_queue_size: int = 4096  # teacher pixel features in MP2P's memory queue
    # The discriminators
    gan_loss: str = ""  # "" = the method's own (rapm: relativistic; rapm-paper: hinge); hinge | relativistic
    disc_relative: bool = True  # D1, the relative position's discriminator (eq. 15)
    disc_absolute: bool = True  # D2, the absolute position's discriminator (eq. 17)
    updates: str = ""  # "" = the method's own (rapm: both; rapm-paper: alternate); alternate | both
    disc_every: int = 1  # with updates=both: a discriminator step on every k-th iteration, before the student's
    disc_lora: bool = True
    disc_lora_rank: int = 64
    disc_lora_alpha: float = 8.0
    disc_levels: str = "full"
    disc_heads_per_level: int = 4
    disc_kernel_size: int = 3
    disc_negative_slope: float = 0.2  # the heads' LeakyReLU slope (PCM's code: 0.01)
    disc_slot_reduction: str = "mean"  # the discriminator loss over the N slots: mean | sum (Alg. 2 line 18 as written)
    disc_renoise: str = "shared"  # a fake and its reals renoised to t_gan with: shared noise | independent (PCM's code)
    disc_backbones: str = "shared"  # D1 and D2 on one backbone LoRA | separate (a LoRA each, Alg. 2's φ1, φ2)
    disc_lr: float = 1e-5
    disc_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    disc_weight_decay: float = 1e-3
    # The run
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500
    num_samples: int = 8
    # the user's own preview prompts (kohya's --sample_prompts, ai-toolkit's sample.prompts): a list, or in --set / a
    # config file a text file's path, one prompt a line (read once: the run's config.json keeps the prompts)
    sample_prompts: list[str] = field(default_factory=list)
    log_every: int = 1
    val_fraction: float = 0.05  # trajectories of the store held out (never trained on) for validation
    train_trajectories: int = 0  # train on the first K of the training split only (0 = all); the held-out split stays
    val_seed: int = -1  # the held-out split's seed; negative = the run's seed. Fix it to validate other seeds alike
    eval_every: int = 250  # validation every K iterations (and at the start and the end); 0 = off
    val_reference_steps: int = 0  # also measure against the teacher's K-step DDIM from the same noise; 0 = off
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    base_quantization: str = ""  # "" (as loaded) | int8 (torchao) | nf4 (bitsandbytes): the frozen base's Linear weights
    use_8bit_adam: bool = False
    device: str = "auto"


# The fields whose default leaves the value to the method (its own, in its class and preset: rapm/methods/): "" or a
# negative number; rdd_weight 0; ema_warmup goes with ema_decay
LEFT_TO_METHOD = ("gan_loss", "updates", "adv_weight", "relative_weight", "distance", "ema_decay", "ema_warmup",
                  "rdd_weight")


def left_to_method(config: TrainConfig, name: str) -> bool:
    """Whether ``config`` leaves field ``name`` (one of LEFT_TO_METHOD) to the method."""
    if name == "ema_warmup":
        return config.ema_decay < 0
    value = getattr(config, name)
    if isinstance(value, str):
        return value == ""
    return value < 0 or (name == "rdd_weight" and value == 0)


PRESETS: dict[str, dict] = {
    # each family's (``Family.presets``), then the built-in teachers' from their folders (rapm.plugins): "digits", in
    # rapm/demo/teacher/rapm.json
    **{name: values for family in FAMILIES for name, values in family.presets.items()},
    **builtin_presets(),
}


def split_seed(config: TrainConfig) -> int:
    """The seed of the held-out split: ``val_seed``, else the run's ``seed``."""
    return config.val_seed if config.val_seed >= 0 else config.seed


def default_preset(teacher: str, family: str) -> str:
    """The teacher's own preset (its rapm.json), else its family's."""
    return teacher_file(teacher).get("preset") or family_named(family).preset


def _coerce(name: str, typ, value, source: str):
    origin = typing.get_origin(typ)
    if name == "sample_prompts":
        return _sample_prompts(value, source)
    try:
        if origin is list:
            (inner,) = typing.get_args(typ)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            return [inner(v) for v in value]
        if typ is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        result = typ(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{source}: field {name!r} must be {getattr(typ, '__name__', typ)}, got {value!r}") from None
    import math

    if typ is float and not math.isfinite(result):  # float("nan"), TOML's nan and inf, JSON's NaN and Infinity
        raise ConfigError(f"{source}: field {name!r} must be a finite number, got {value!r}")
    # Upper bounds no run reaches, so that a typo (10^12 iterations, rank 10^6) is refused before anything is loaded
    # or written, instead of running for ever or allocating what no machine has.
    width = "a LoRA's rank stays below its layers' width, at most 3072 in the families rapm knows"
    at_most = {"iterations": (10 ** 8, "a distillation runs 10^3 to 10^5"), "lora_rank": (4096, width),
               "disc_lora_rank": (4096, width)}
    if name in at_most and result > at_most[name][0]:
        raise ConfigError(f"{source}: field {name!r} must be at most {at_most[name][0]:,} ({at_most[name][1]}), "
                          f"got {result:,}")
    return result


def _sample_prompts(value, source: str) -> list[str]:
    """``sample_prompts``: a list of prompts as it is, or a text file's path read as ``rapm trajectories --prompts``."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        prompts = [v.strip() for v in value if v.strip()]
        if len(prompts) != len(value):
            raise ConfigError(f"{source}: field 'sample_prompts' holds an empty prompt; give each prompt some text")
        return prompts
    if not isinstance(value, str):
        raise ConfigError(f"{source}: field 'sample_prompts' must be a list of prompts or a text file's path, got {value!r}")
    if not value.strip():
        return []
    try:
        return read_prompts(value)
    except RapmError as e:
        raise ConfigError(f"{source}: field 'sample_prompts': {e}") from None


def apply_overrides(config: TrainConfig, values: dict, source: str) -> TrainConfig:
    """A copy of ``config`` with ``values`` applied; unknown or ill-typed fields are errors naming the source."""
    hints = typing.get_type_hints(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in values:
        if name not in known:
            close = [k for k in known if name.replace("-", "_") == k]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown field {name!r}{hint}; see docs/defaults.md for the fields")
    return dataclasses.replace(config, **{k: _coerce(k, hints[k], v, source) for k, v in values.items()})


CONFIG_SUFFIXES = (".json", ".toml", ".yaml", ".yml")


def read_config_file(path: Path) -> dict:
    """A config file's fields: TOML (.toml), YAML (.yaml, .yml) or JSON (any other name), one mapping of fields."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a .json, .toml or .yaml file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text)
            values = {} if values is None else values  # an empty file
        else:
            values = json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be parsed ({e}); write JSON (.json), TOML (.toml) or YAML (.yaml)") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: holds a {type(values).__name__}, not a mapping of config fields (such as lr: 1.0e-5); "
                          "see docs/defaults.md for the fields")
    return values


def parse_set(items: list[str]) -> dict:
    """``--set key=value`` pairs."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as key=value")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v
    return out


def validate(config: TrainConfig) -> None:
    def bad(field_name: str, why: str):
        raise ConfigError(f"config field {field_name!r}: {why}")

    if config.iterations < 1:
        bad("iterations", f"must be at least 1, got {config.iterations}")
    if config.batch_size < 1:
        bad("batch_size", f"must be at least 1, got {config.batch_size}")
    if config.lr <= 0 or config.disc_lr <= 0:
        bad("lr" if config.lr <= 0 else "disc_lr", "must be positive")
    if config.lr_schedule not in LR_SCHEDULES:  # rapm.models.lr_factor gives each its shape
        bad("lr_schedule", f"must be {', '.join(LR_SCHEDULES[:-1])} or {LR_SCHEDULES[-1]}, got {config.lr_schedule!r}")
    if config.relative_target not in ("student", "ema"):
        bad("relative_target", f"must be student or ema, got {config.relative_target!r}")
    if config.relative_target == "ema" and config.ema_decay == 0:
        bad("relative_target", "'ema' needs an EMA: set ema_decay (such as 0.99)")
    if config.train_trajectories < 0:
        bad("train_trajectories", f"must be 0 (all) or a count, got {config.train_trajectories}")
    if config.lora_rank < 1:
        bad("lora_rank", f"must be at least 1, got {config.lora_rank}")
    if not config.ema_decay < 1:
        bad("ema_decay", f"must be below 1 (0 = off, negative = the method's own), got {config.ema_decay}")
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        bad("mixed_precision", f"must be no, bf16 or fp16, got {config.mixed_precision!r}")
    if config.base_quantization not in ("", "int8", "nf4"):
        bad("base_quantization", f"must be int8 or nf4 (or empty for none), got {config.base_quantization!r}")
    if config.disc_levels not in ("full", "down_mid"):
        bad("disc_levels", f"must be full or down_mid, got {config.disc_levels!r}")
    if config.checkpoint_every < 1:
        bad("checkpoint_every", f"must be at least 1, got {config.checkpoint_every}")
    if config.keep_checkpoints < 1:
        bad("keep_checkpoints", f"must be at least 1, got {config.keep_checkpoints}")
    if config.huber_c <= 0:
        bad("huber_c", f"must be positive, got {config.huber_c}")
    if config.distance not in ("", "pseudo_huber", "l1", "l2"):
        bad("distance", f"must be pseudo_huber, l1 or l2 (or empty for the method's own), got {config.distance!r}")
    if config.gan_loss not in ("", "hinge", "relativistic"):
        bad("gan_loss", f"must be hinge or relativistic (or empty for the method's own), got {config.gan_loss!r}")
    if config.updates not in ("", "alternate", "both"):
        bad("updates", f"must be alternate or both (or empty for the method's own), got {config.updates!r}")
    if config.disc_slot_reduction not in ("mean", "sum"):
        bad("disc_slot_reduction", f"must be mean or sum, got {config.disc_slot_reduction!r}")
    if config.disc_renoise not in ("shared", "independent"):
        bad("disc_renoise", f"must be shared or independent, got {config.disc_renoise!r}")
    if config.disc_backbones not in ("shared", "separate"):
        bad("disc_backbones", f"must be shared or separate, got {config.disc_backbones!r}")
    if config.disc_backbones == "separate" and not config.disc_lora:
        bad("disc_backbones", "separate backbones are two discriminator LoRAs, and disc_lora=false trains none (both "
            "discriminators then share the frozen teacher); set disc_lora=true, or disc_backbones=shared")
    if not 0 <= config.disc_negative_slope < 1:
        bad("disc_negative_slope", f"must be in [0, 1), got {config.disc_negative_slope}")
    if config.disc_every < 1:
        bad("disc_every", f"must be at least 1, got {config.disc_every}")
    if not 0 <= config.val_fraction < 0.5:
        bad("val_fraction", f"must be in [0, 0.5), got {config.val_fraction}")
    if config.eval_every < 0 or config.val_reference_steps < 0:
        bad("eval_every" if config.eval_every < 0 else "val_reference_steps", "must be at least 0")
    if config.rdd_weight < 0:
        bad("rdd_weight", f"must be at least 0, got {config.rdd_weight}")
    if config.rdd_features not in ("", "teacher", "classifier"):
        bad("rdd_features", f"must be teacher or classifier (or empty for the teacher's own), got {config.rdd_features!r}")
    if config.rdd_queue_size < 1:
        bad("rdd_queue_size", f"must be at least 1, got {config.rdd_queue_size}")


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def from_dict(values: dict, source: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), values, source)
