"""What the speed, memory and GPU benchmarks share: the public UNet configs, random teachers built from them,
and the UNet passes of one RAPM iteration, each runnable alone (the floor) or as a per-slot loop.

The configs are SD 1.5's and SDXL base's ``unet/config.json`` as published (the fields that differ from
diffusers' defaults); weights are random, nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
import sys
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the test fixtures in tests/tiny.py

# runwayml/stable-diffusion-v1-5, unet/config.json
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    upcast_attention=False,
)


def machine(**extra) -> dict:
    """What every result records of the machine it ran on, plus the benchmark's own facts."""
    return {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "platform": platform.platform(), **extra}


def write_results(out: Path, name: str, result: dict, text: str) -> None:
    """``out/NAME.json`` and its markdown table ``out/NAME.md``; the table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(text)
    print(text)


def reduced(config: dict, width: int, sample_size: int, transformer_layers: int | None = None) -> dict:
    """The same architecture with block widths divided by ``width`` (heads kept), at ``sample_size`` latents."""
    import math

    channels = [c // width for c in config["block_out_channels"]]
    out = dict(config, block_out_channels=channels, sample_size=sample_size,
               norm_num_groups=math.gcd(config.get("norm_num_groups", 32), *channels))
    if isinstance(config.get("attention_head_dim"), list):  # SDXL gives head dims per block: keep 64-wide heads' count
        out["attention_head_dim"] = [max(1, h // width) for h in config["attention_head_dim"]]
    if transformer_layers is not None and "transformer_layers_per_block" in config:
        out["transformer_layers_per_block"] = [min(transformer_layers, n) for n in config["transformer_layers_per_block"]]
    if config.get("addition_embed_type") == "text_time":
        pooled = 1280 // width
        out["projection_class_embeddings_input_dim"] = pooled + 6 * config["addition_time_embed_dim"]
        out["cross_attention_dim"] = config["cross_attention_dim"] // width
    return out


def unet_parameters(config: dict) -> int:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel(**config).parameters())


def build_sd_teacher(folder: Path, unet_config: dict, seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder: the UNet of ``unet_config`` (random), a one-layer CLIP text encoder of the
    UNet's cross-attention width, a tiny VAE. Enough for ``rapm trajectories`` and ``rapm train``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rapm.demo.clip import SD_SCHEDULER, build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(["a", "photo", "of", "cat", "dog", "red", "blue", "car"], model_max_length=77)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    hidden = unet_config["cross_attention_dim"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden, num_attention_heads=8,
        num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=eos, pad_token_id=eos))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 8, 8],
                        layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=UNet2DConditionModel(**unet_config),
        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


# A FLUX.1-dev-shaped transformer at reduced width: FLUX's block structure (joint then single-stream blocks, packed
# latents, rotary ids, the guidance embedding), 4 heads x 32 instead of 24 x 128, 2 + 4 blocks instead of 19 + 38.
FLUX_REDUCED = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
                    num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                    axes_dims_rope=(4, 14, 14))


def build_flux_teacher(folder: Path, transformer_config: dict, image_size: int = 64, seed: int = 0) -> Path:
    """A FluxPipeline folder: the transformer of ``transformer_config`` (random), a one-layer CLIP of the pooled width,
    a one-layer T5 of the joint width, a two-level 16-channel VAE whose ``sample_size`` sets the latent size
    (``image_size`` / 2). Enough for ``rapm trajectories`` and ``rapm train``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from rapm.demo.clip import build_clip_tokenizer, clip_text_encoder
    from tests.tiny_flow import FLUX_SCHEDULER, FLUX_VAE_FACTORS, MAX_TOKENS, WORDS, t5_encoder

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = (build_clip_tokenizer(WORDS, model_max_length=MAX_TOKENS) for _ in range(2))
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 16], layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=image_size, use_quant_conv=False, use_post_quant_conv=False,
                        **FLUX_VAE_FACTORS)
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(**transformer_config), scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae, text_encoder=clip_text_encoder(len(tokenizer), transformer_config["pooled_projection_dim"], None, MAX_TOKENS, eos),
        tokenizer=tokenizer, text_encoder_2=t5_encoder(len(tokenizer_2), transformer_config["joint_attention_dim"]),
        tokenizer_2=tokenizer_2)
    pipe.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- timing

def timed(fn, repeat: int, setup=None) -> list[float]:
    out = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------- the passes

@dataclass
class Passes:
    """The UNet passes of one RAPM iteration (Alg. 2 with the batching of docs/design.md decision 2), each callable alone.

    B trajectories, N slots. Student iteration: teacher Δ-step (2BN rows: cond and uncond), frozen student (BN),
    then per slot a student step with backward (B) and a discriminator pass with backward to its input (B).
    Discriminator iteration: N student steps without grad (B), teacher Δ-step (2BN), frozen student (BN), one
    discriminator pass with backward over fakes and both reals (3BN).
    """

    unet: torch.nn.Module
    disc: torch.nn.Module  # rapm.discriminator.Discriminator
    latents: torch.Tensor  # [B, N+1, C, H, W]
    cond: object  # Conditioning [B]
    uncond: object | None

    def __post_init__(self):
        from rapm.families import denoiser_family

        self.b, self.n = self.latents.shape[0], self.latents.shape[1] - 1
        # FLUX.1-dev's guidance is an input (no uncond pass): its teacher Δ-step is B N rows
        self.guided = self.uncond is not None and denoiser_family(self.unet).cfg

    def _t(self, rows: int) -> torch.Tensor:
        return torch.full((rows,), 500, device=self.latents.device)

    def _x(self, rows: int) -> torch.Tensor:
        return self.latents.flatten(0, 1)[:1].expand(rows, *self.latents.shape[2:]).contiguous()

    def _cond(self, rows: int):
        return self.cond.repeat(rows // self.b)

    # Each pass is (setup, run): the setup (role, which parameters train) is not timed, the run is the pass alone.
    def forward(self, role: str, rows: int, guided: bool = False):
        """A no-grad UNet forward of ``role`` (teacher, student) at ``rows`` rows (twice that with cond+uncond)."""
        from rapm.conditioning import Conditioning
        from rapm.roles import STUDENT, activate, student_role, teacher_role
        from rapm.teacher import unet_output

        cond = self._cond(rows)
        if guided and self.guided:
            cond = Conditioning.cat([cond, self.uncond.repeat(rows // self.b)])
        total = len(cond)
        x, t = self._x(total), self._t(total)
        role_of = teacher_role if role == "teacher" else student_role  # a switch costs microseconds (rapm.roles)

        def setup():
            activate(self.unet, STUDENT)

        def run():
            with torch.no_grad(), role_of(self.unet):
                unet_output(self.unet, x, t, cond)

        return setup, run

    def student_backward(self, rows: int):
        """A student forward at ``rows`` rows and its backward into the student LoRA."""
        from rapm.roles import STUDENT, activate, set_trainable
        from rapm.teacher import unet_output

        x, t, cond = self._x(rows), self._t(rows), self._cond(rows)

        def setup():
            set_trainable(self.unet, STUDENT)
            self.disc.requires_grad_(False)
            activate(self.unet, STUDENT)
            self.unet.zero_grad(set_to_none=True)

        def run():
            unet_output(self.unet, x, t, cond).float().square().mean().backward()

        return setup, run

    def discriminator_backward(self, rows: int, train_discriminator: bool):
        """A discriminator pass (backbone with its adapter, both head sets) and its backward: into the adapter and the
        heads (discriminator iteration) or into the input only (student iteration)."""
        from rapm.discriminator import backbone_features
        from rapm.roles import DISCRIMINATOR, activate, set_trainable

        x, t, cond = self._x(rows), self._t(rows), self._cond(rows)

        def setup():
            set_trainable(self.unet, DISCRIMINATOR if train_discriminator else None)
            self.disc.requires_grad_(train_discriminator)
            activate(self.unet, DISCRIMINATOR)
            self.unet.zero_grad(set_to_none=True)
            self.disc.zero_grad(set_to_none=True)

        def run():
            xi = x.detach().requires_grad_(not train_discriminator)
            feats = backbone_features(self.unet, xi, t, cond, self.disc.spec.levels)
            logits = self.disc.relative(feats) + self.disc.absolute(feats)
            sum(h.float().mean() for h in logits).backward()

        return setup, run

    def plan(self, teacher: bool = True) -> dict[str, dict[str, tuple[int, object]]]:
        """For each phase: pass name -> (how many an iteration makes, (setup, run)). ``teacher=False``: the Δ-steps
        come from the store (format 2), so the iteration makes no teacher pass."""
        b, n = self.b, self.n
        shared = {f"teacher Δ-step ({2 * b * n if self.guided else b * n} rows, no grad)": (1, self.forward("teacher", b * n, guided=True)),
                  f"frozen student ({b * n} rows, no grad)": (1, self.forward("student", b * n))}
        if not teacher:
            shared.pop(next(iter(shared)))
        return {
            "student": {**shared,
                        f"student step + backward ({b} rows)": (n, self.student_backward(b)),
                        f"discriminator pass + backward to input ({b} rows)": (n, self.discriminator_backward(b, False))},
            "discriminator": {f"student step ({b} rows, no grad)": (n, self.forward("student", b)), **shared,
                              f"discriminator pass + backward ({3 * b * n} rows)": (1, self.discriminator_backward(3 * b * n, True))},
        }


def without_delta_steps(store: Path, out: Path) -> Path:
    """A copy of a format 2 store as format 1 wrote it (no delta_latents, no 'delta' and 'solver'): training on it
    computes the teacher's Δ-step every iteration, as before the store kept it."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from rapm.files import sha256_file
    from rapm.store import MANIFEST_SHA256, atomic_write, manifest_bytes

    shutil.copytree(store, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        f = out / entry["file"]
        with safe_open(str(f), framework="pt") as handle:
            metadata = handle.metadata()
        f.write_bytes(save({k: v for k, v in load_file(f).items() if k != "delta_latents"}, metadata=metadata))
        entry.update(sha256=sha256_file(f), bytes=f.stat().st_size)
    for key in ("delta", "solver", MANIFEST_SHA256):
        manifest.pop(key, None)
    atomic_write(out / "manifest.json", manifest_bytes({**manifest, "format_version": 1}))  # its own checksum again
    return out


# ---------------------------------------------------------------------------------------------- the loops

class Loop:
    """``rapm.train``'s own update (``build_phases``, ``run_phase``) outside ``train()``: the same optimizers,
    schedules, clipping and EMA (with its warm-up), with the loss either from the method (what the trainer runs) or
    from a straightforward per-slot loop (``per_slot_losses``), for machines where no store or pipeline folder is
    wanted (benchmarks/gpu.py) and for the speed benchmark's per-slot comparison.
    """

    def __init__(self, unet, disc, schedule, config, timesteps: list[int], guidance: float, delta: int):
        from rapm.methods import build_method
        from rapm.processes import Processes
        from rapm.roles import STUDENT, lora_parameters
        from rapm.train import build_phases

        self.unet, self.disc, self.schedule, self.config = unet, disc, schedule, config
        self.timesteps, self.guidance, self.delta = timesteps, guidance, delta
        self.method = build_method(config, delta)
        self.phases = build_phases(config, unet, disc, self.method)
        self.procs = Processes()
        self.ema_decay, self.ema_warmup = self.method.ema_decay, self.method.ema_warmup
        self.student_params = lora_parameters(unet, STUDENT)
        self.ema = ({k: p.detach().float().clone() for k, p in self.student_params.items()}
                    if self.ema_decay > 0 else None)
        self.step = self.student_updates = 0

    def context(self, batch, positions: list[int]):
        from rapm.methods.base import Context
        from rapm.stream import sample_generators

        return Context(self.unet, self.schedule, self.timesteps, self.guidance,
                       sample_generators(self.config.seed, positions), self.disc)

    def iteration(self, batch, phase: str, per_slot: bool = False, autocast=None) -> float:
        """One update of ``phase`` by rapm.train's ``run_phase``; returns the loss."""
        import dataclasses
        from contextlib import nullcontext

        from rapm.models import ema_decay_at, update_ema
        from rapm.train import run_phase

        positions = list(range(self.step * batch.latents.shape[0], (self.step + 1) * batch.latents.shape[0]))
        update = self.phases[phase]
        if per_slot:
            update = dataclasses.replace(update, losses=lambda _ctx, b: per_slot_losses(self, b, phase, positions))
        total, _, _ = run_phase(update, self.context(batch, positions), batch, self.unet, self.disc, self.procs,
                                autocast or nullcontext(), self.config.grad_clip, self.step, None)
        if self.ema is not None and phase == "student":
            update_ema(self.ema, self.student_params, ema_decay_at(self.ema_decay, self.ema_warmup, self.student_updates))
        self.student_updates += phase == "student"
        self.step += 1
        return total


def per_slot_losses(loop: Loop, batch, phase: str, positions: list[int]):
    """The same losses as ``RAPM`` without batching across slots: one trajectory, one slot, one UNet pass at a time
    (cond and uncond of the teacher's guided step, and a slot's fake and reals for the discriminator, still share a
    pass). The straightforward loop to compare the batched iteration with. It reads the method's own switches and
    weights (``relative``, ``absolute``, ``relative_weight``, w_n, the discriminators in use); PCM's unpaired hinge
    loss only, the one the speed benchmark times (rapm-paper). tests/test_benchmarks.py checks its student loss
    against the method's."""
    from rapm.conditioning import Conditioning
    from rapm.discriminator import hinge_discriminator_loss, hinge_generator_loss
    from rapm.methods.base import discriminator_timesteps, renoise, student_step, teacher_step
    from rapm.store import TrajectoryBatch

    m = loop.method
    if m.uses_discriminator and m.gan_loss != "hinge":
        raise ValueError(f"the per-slot loop has the hinge loss only; this method's gan_loss is {m.gan_loss!r}")
    b, n = batch.latents.shape[0], len(loop.timesteps) - 1
    for i in range(b):
        one = TrajectoryBatch(batch.latents[i:i + 1], batch.cond[i:i + 1],
                              batch.uncond[i:i + 1] if batch.uncond is not None else None)
        ctx = loop.context(one, positions[i:i + 1])
        z = one.latents[:, 0]
        for j in range(n):
            slot = n - 1 - j
            t = torch.full((1,), loop.timesteps[j])
            s = torch.full((1,), loop.timesteps[j + 1])
            rel = None
            if m.relative:
                with torch.no_grad():
                    mid = teacher_step(ctx, one.latents[:, j], t, t - m.delta, one.cond, one.uncond)
                    rel = student_step(ctx, mid, t - m.delta, s, one.cond)
            reals = {"relative": rel, "absolute": one.latents[:, j + 1]}
            kinds = m.gan_kinds if m.uses_discriminator else []
            t_gan = discriminator_timesteps(ctx, s)
            if phase == "student":
                z_n = student_step(ctx, z, t, s, one.cond)
                loss = z_n.new_zeros(())
                if m.relative:
                    loss = loss + m.relative_weight * m.distance_fn(z_n, rel)
                if m.absolute:
                    loss = loss + m.weight(slot) * m.distance_fn(z_n, reals["absolute"])
                if kinds:
                    x = renoise(ctx, z_n, s, t_gan, ctx.randn(z_n))
                    logits = ctx.discriminator.logits(ctx.unet, x, t_gan, one.cond)
                    for kind in kinds:
                        loss = loss + m.adv_weight * m.kind_weight(kind, slot) * hinge_generator_loss(logits[kind])
                yield loss / b, {}
                z = z_n.detach()
            else:
                with torch.no_grad():
                    z = student_step(ctx, z, t, s, one.cond)
                noise = ctx.randn(z)
                x = renoise(ctx, torch.cat([z] + [reals[k] for k in kinds]), s.repeat(1 + len(kinds)),
                            t_gan.repeat(1 + len(kinds)), noise.repeat(1 + len(kinds), 1, 1, 1))
                logits = ctx.discriminator.logits(ctx.unet, x, t_gan.repeat(1 + len(kinds)),
                                                  Conditioning.cat([one.cond] * (1 + len(kinds))))
                d = z.new_zeros((), dtype=torch.float32)
                for k, kind in enumerate(kinds):
                    d = d + m.kind_weight(kind, slot) * hinge_discriminator_loss([h[:1] for h in logits[kind]],
                                                                                 [h[k + 1:k + 2] for h in logits[kind]])
                yield d / (n * b), {}


def run_child_script(script: str, kind: str, args: dict, env: dict, what: str) -> dict:
    """Run ``script --child KIND ARGS`` in a fresh process (the repo root first on its PYTHONPATH) and return the
    JSON object its last stdout line holds; a failure raises with the child's stderr."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = subprocess.run([sys.executable, script, "--child", kind, json.dumps(args)], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
