"""Reference implementations of the flow-matching teachers' math, written from the diffusers pipelines, that the tests
check rapm's one code path against (``rapm.families.flow``, ``rapm.diffusion.Schedule`` of kind "flow").

* The straight line x_t = (1 - σ) x_0 + σ ε and its conversions, the Euler step and DDIM in (α = 1 - σ, σ) (equal),
  the pipelines' coarse σ, an Euler sampler and the teacher's trajectory with its Δ-steps.
* The denoiser calls as the pipelines make them: SD3 (the joint text sequence and pooled projections, classifier-free
  guidance as one batched [uncond; cond] pass), FLUX.1 (2x2-packed latents, rotary ids, σ = t / 1000, the guidance
  embedding of FLUX.1-dev), with the prompts encoded by the pipelines' own ``encode_prompt``.
* Discriminator features: the image-token outputs of chosen blocks on the token grid (PCM's SD3 script puts its heads
  on every joint block's image tokens).
* A diffusers LoRA file written by the pipeline class's own ``save_lora_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rapm.export import adapter_metadata, adapter_state_dict
from rapm.families import family_named
from rapm.families.flow import latent_image_ids, pack_latents, unpack_latents
from rapm.flowmatch import FlowSchedule
from rapm.hooks import block_outputs
from rapm.roles import STUDENT, LoraSpec

SD3 = "sd3"
FLUX = "flux"


# ---------------------------------------------------------------------------------------------------------------
# The straight-line parameterization and its conversions.


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - σ) x_0 + σ ε (diffusers' ``scale_noise``); ``sigma`` broadcasts against ``x0``."""
    sigma = _as_batch(sigma, x0)
    return (1.0 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target v = ε - x_0."""
    return noise - x0


def velocity_to_x0(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x̂_0 = x_t - σ v."""
    return x_t - _as_batch(sigma, x_t) * v


def velocity_to_eps(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """ε̂ = x_t + (1 - σ) v."""
    return x_t + (1.0 - _as_batch(sigma, x_t)) * v


def x0_eps_to_velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = ε - x_0 from a pair of predictions."""
    return eps - x0


def x0_to_velocity(x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """v = (x_t - x_0) / σ (σ > 0)."""
    return (x_t - x0) / _as_batch(sigma, x_t)


def eps_to_velocity(x_t: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """v = (ε - x_t) / (1 - σ) (σ < 1)."""
    return (eps - x_t) / (1.0 - _as_batch(sigma, x_t))


def euler_step(
    x_t: torch.Tensor, v: torch.Tensor, sigma_from: torch.Tensor | float, sigma_to: torch.Tensor | float
) -> torch.Tensor:
    """The deterministic step x_s = x_t + (σ_s - σ_t) v, in float32 as diffusers' scheduler.step computes it."""
    dtype = x_t.dtype
    x = x_t.float()
    step = _as_batch(sigma_to, x) - _as_batch(sigma_from, x)
    return (x + step * v.float()).to(dtype)


def ddim_step(
    x_t: torch.Tensor, v: torch.Tensor, sigma_from: torch.Tensor | float, sigma_to: torch.Tensor | float
) -> torch.Tensor:
    """DDIM in (α = 1 - σ, σ): x_s = α_s x̂_0 + σ_s ε̂; equal to ``euler_step`` (tests/test_flowmatch.py)."""
    x0 = velocity_to_x0(x_t, v, sigma_from)
    eps = velocity_to_eps(x_t, v, sigma_from)
    sigma_to = _as_batch(sigma_to, x_t)
    return (1.0 - sigma_to) * x0 + sigma_to * eps


def _as_batch(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample [B] σ as a tensor broadcasting over ``like``'s trailing dims."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 1 and like.ndim > 1:
        t = t.reshape(-1, *([1] * (like.ndim - 1)))
    return t


def flux_coarse_sigmas(schedule: FlowSchedule, num_steps: int, image_seq_len: int) -> torch.Tensor:
    """The σ of diffusers' FluxPipeline for num_steps: ``sigmas=np.linspace(1, 1/N, N)`` and μ from the token count."""
    return schedule.trailing_sigmas(num_steps, mu=schedule.mu(image_seq_len))


def pipeline_coarse_sigmas(schedule: FlowSchedule, family: str, num_steps: int, image_seq_len: int) -> torch.Tensor:
    """The N-step σ of the family's diffusers pipeline: FluxPipeline's, or StableDiffusion3Pipeline's (μ if dynamic)."""
    if family == "flux":
        return flux_coarse_sigmas(schedule, num_steps, image_seq_len)
    if family != "sd3":
        raise ValueError(f"family must be 'sd3' or 'flux', got {family!r}")
    return schedule.coarse_sigmas(num_steps, mu=schedule.mu(image_seq_len) if schedule.use_dynamic_shifting else None)


def slot_mu(schedule: FlowSchedule, image_seq_len: int) -> float | None:
    """The μ a fine grid needs (``fine_sigmas``/``slot_grid``): the image's μ with dynamic shifting, else None."""
    return schedule.mu(image_seq_len) if schedule.use_dynamic_shifting else None


def sample_euler(velocity, latents: torch.Tensor, sigmas: torch.Tensor, schedule: FlowSchedule) -> torch.Tensor:
    """Integrate the flow ODE from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps: ``velocity(x, timestep)`` per step.

    ``timestep`` is the [B] scheduler timestep (σ · num_train_timesteps), as the pipelines pass it.
    """
    x = latents
    for i in range(len(sigmas) - 1):
        timestep = schedule.model_timestep(sigmas[i]).expand(x.shape[0]).to(x.dtype)
        v = velocity(x, timestep)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
    return x


def teacher_trajectory(
    velocity, noise: torch.Tensor, coarse: torch.Tensor, k: int, schedule: FlowSchedule, mu: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's trajectory through the N coarse σ with k Euler steps per slot (``fine_sigmas``).

    Returns the positions at the coarse σ, [B, N + 1, ...] (index 0 is the noise at ``coarse[0]``), and the
    Δ-step of each slot, [B, N, ...]: the position after the slot's first fine step (decision 8; at k = 1 it is
    the slot's end). ``velocity(x, timestep)`` as in ``sample_euler``.
    """
    positions, delta_steps = [noise], []
    x = noise
    for i in range(len(coarse) - 1):
        fine = schedule.fine_sigmas(float(coarse[i]), float(coarse[i + 1]), k, mu)
        for j in range(k):
            timestep = schedule.model_timestep(fine[j]).expand(x.shape[0]).to(x.dtype)
            x = euler_step(x, velocity(x, timestep), fine[j], fine[j + 1])
            if j == 0:
                delta_steps.append(x)
        positions.append(x)
    return torch.stack(positions, dim=1), torch.stack(delta_steps, dim=1)


@dataclass
class FlowConditioning:
    """The text conditioning of one batch: the token sequence, the pooled vector and, for FLUX, the text ids."""

    prompt_embeds: torch.Tensor  # [B, L, joint_attention_dim]
    pooled_prompt_embeds: torch.Tensor  # [B, pooled_projection_dim]
    text_ids: torch.Tensor | None = None  # FLUX: [L, 3] zeros (rotary ids of the text tokens)

    def to(self, device=None, dtype=None) -> "FlowConditioning":
        ids = None if self.text_ids is None else self.text_ids.to(device=device, dtype=dtype)
        return FlowConditioning(
            self.prompt_embeds.to(device=device, dtype=dtype), self.pooled_prompt_embeds.to(device=device, dtype=dtype), ids
        )

    @staticmethod
    def cat(parts: Sequence["FlowConditioning"]) -> "FlowConditioning":
        """Batch conditionings along B (text ids are per-token, not per-sample: the first one's)."""
        return FlowConditioning(
            torch.cat([p.prompt_embeds for p in parts]), torch.cat([p.pooled_prompt_embeds for p in parts]),
            parts[0].text_ids,
        )


def family_of(transformer: torch.nn.Module) -> str:
    """``sd3`` or ``flux`` from the transformer's class."""
    name = type(transformer).__name__
    if name.startswith("SD3Transformer"):
        return SD3
    if name.startswith("FluxTransformer"):
        return FLUX
    raise ValueError(f"{name} is not a flow-matching transformer rapm knows (SD3Transformer2DModel, FluxTransformer2DModel)")


# ---------------------------------------------------------------------------------------------------------------
# Prompt encoding, through the pipelines' own encode_prompt.


def encode_prompt_sd3(
    pipe, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, max_sequence_length: int = 256,
    guidance: bool = True,
) -> tuple[FlowConditioning, FlowConditioning | None]:
    """(cond, uncond) as StableDiffusion3Pipeline encodes them; uncond (the negative prompt, "" by default) when ``guidance``."""
    prompts = list(prompts)
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=guidance,
        negative_prompt=list(negative_prompts) if negative_prompts is not None else None,
        max_sequence_length=max_sequence_length, device=pipe.transformer.device,
    )
    cond = FlowConditioning(embeds, pooled)
    return cond, (FlowConditioning(negative_embeds, negative_pooled) if guidance else None)


def encode_prompt_flux(pipe, prompts: Sequence[str], max_sequence_length: int = 512) -> FlowConditioning:
    """The conditioning FluxPipeline encodes (CLIP pooled, T5 sequence, zero text ids)."""
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, max_sequence_length=max_sequence_length, device=pipe.transformer.device
    )
    return FlowConditioning(embeds, pooled, text_ids)


# ---------------------------------------------------------------------------------------------------------------
# The denoiser calls: latent [B, 16, H, W] and scheduler timestep [B] (σ · 1000) in, velocity [B, 16, H, W] out.


def sd3_velocity(transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: FlowConditioning) -> torch.Tensor:
    """SD3's velocity at ``timestep`` (scheduler units), with the joint text sequence and pooled projections."""
    return transformer(
        hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
        pooled_projections=cond.pooled_prompt_embeds, return_dict=False,
    )[0]


def sd3_guided_velocity(
    transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: FlowConditioning, uncond: FlowConditioning,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guided SD3 velocity, v_u + w (v_c - v_u), in one batched pass as StableDiffusion3Pipeline does."""
    both = sd3_velocity(
        transformer, torch.cat([latents, latents]), torch.cat([timestep, timestep]), FlowConditioning.cat([uncond, cond])
    )
    v_uncond, v_cond = both.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def flux_velocity(
    transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: FlowConditioning, guidance: float | None
) -> torch.Tensor:
    """FLUX's velocity: pack, position ids, σ = timestep / 1000, the guidance embedding (FLUX.1-dev), unpack.

    ``guidance`` must be given exactly when the transformer has ``guidance_embeds`` (FLUX.1-dev, not schnell).
    """
    b, _, h, w = latents.shape
    if bool(transformer.config.guidance_embeds) != (guidance is not None):
        raise ValueError(
            "FLUX guidance: pass the distilled guidance value (e.g. 3.5) for a transformer with guidance_embeds "
            "(FLUX.1-dev) and None for one without (FLUX.1-schnell)"
        )
    guidance_vec = None
    if guidance is not None:
        guidance_vec = torch.full([b], float(guidance), device=latents.device, dtype=torch.float32)
    out = transformer(
        hidden_states=pack_latents(latents), timestep=timestep / 1000, guidance=guidance_vec,
        pooled_projections=cond.pooled_prompt_embeds, encoder_hidden_states=cond.prompt_embeds,
        txt_ids=cond.text_ids, img_ids=latent_image_ids(h, w, latents.device, latents.dtype), return_dict=False,
    )[0]
    return unpack_latents(out, h, w)


def flow_velocity(
    transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: FlowConditioning,
    uncond: FlowConditioning | None = None, guidance_scale: float = 1.0, flux_guidance: float | None = None,
) -> torch.Tensor:
    """The teacher's (or an adapter's) velocity for either family; SD3 uses CFG when ``uncond`` is given."""
    family = family_of(transformer)
    if family == FLUX:
        return flux_velocity(transformer, latents, timestep, cond, flux_guidance)
    if uncond is not None and guidance_scale != 1.0:
        return sd3_guided_velocity(transformer, latents, timestep, cond, uncond, guidance_scale)
    return sd3_velocity(transformer, latents, timestep, cond)


# ---------------------------------------------------------------------------------------------------------------
# Discriminator features: image tokens of chosen blocks, on the token grid.


def transformer_blocks(transformer) -> list[torch.nn.Module]:
    """The blocks features can come from, in forward order: SD3's joint blocks; FLUX's joint then single blocks."""
    blocks = list(transformer.transformer_blocks)
    blocks += list(getattr(transformer, "single_transformer_blocks", []))
    return blocks


def default_feature_blocks(transformer, every: int = 1) -> list[int]:
    """Every ``every``-th joint (two-stream) block: PCM's SD3 discriminator uses all 24 of SD3-medium's (every=1).

    FLUX's 19 joint blocks are 3072 wide: a head there is ~4x an SD3 head, so ``every`` > 1 trades heads for memory.
    """
    return list(range(0, len(transformer.transformer_blocks), every))


def feature_channels(transformer, blocks: Sequence[int]) -> list[int]:
    """Channels of each chosen block's image tokens (the transformer's inner width)."""
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return [inner for _ in blocks]


def block_features(
    transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: FlowConditioning, blocks: Sequence[int],
    flux_guidance: float | None = None,
) -> list[torch.Tensor]:
    """The image-token outputs of ``blocks`` (indices into ``transformer_blocks``) as [B, C, H/2, W/2] maps.

    Forward hooks keep each chosen block's image stream (both SD3's and FLUX's blocks return
    (text, image)); the forward stops after the last chosen block, so later blocks cost nothing.
    Tokens are row-major over the patch grid for both families (SD3's PatchEmbed and FLUX's packing),
    so a reshape puts them back on the grid and the 2-D conv heads of rapm.discriminator apply.

    Under gradient checkpointing the stop waits for the checkpointed call to return (rapm.hooks.block_outputs,
    which the discriminator's backbone features use too; tests: gradients equal without checkpointing).
    """
    all_blocks = transformer_blocks(transformer)
    if not blocks:
        raise ValueError("choose at least one transformer block for discriminator features")
    for i in blocks:
        if not -len(all_blocks) <= i < len(all_blocks):
            raise ValueError(f"block {i} out of range: the transformer has {len(all_blocks)} blocks")
    wanted = sorted({i % len(all_blocks) for i in blocks})
    b, _, h, w = latents.shape
    grid = (h // 2, w // 2)
    index = {id(all_blocks[i]): i for i in wanted}
    kept: dict[int, torch.Tensor] = {}

    def keep(block, output):
        image = output[1] if isinstance(output, tuple) else output
        kept[index[id(block)]] = image.transpose(1, 2).reshape(b, image.shape[-1], *grid)

    if family_of(transformer) == FLUX:
        call = lambda: flux_velocity(transformer, latents, timestep, cond, flux_guidance)  # noqa: E731
    else:
        call = lambda: sd3_velocity(transformer, latents, timestep, cond)  # noqa: E731
    block_outputs(transformer, [all_blocks[i] for i in wanted], all_blocks[wanted[-1]], keep, call)
    return [kept[i % len(all_blocks)] for i in blocks]


# ---------------------------------------------------------------------------------------------------------------
# LoRA roles on a transformer and the diffusers LoRA file.


# Defaults from the public scripts (docs/flow-matching.md): PCM's SD3 run.sh uses rank 32; diffusers' SD3/FLUX
# LoRA scripts default to rank 4 with lora_alpha = rank. rapm keeps alpha = rank (scale 1) for these families.
FLOW_LORA_RANK = 32


def flow_lora_spec(family: str, rank: int = FLOW_LORA_RANK, alpha: float | None = None, target_modules=None) -> LoraSpec:
    """The student / discriminator LoraSpec for ``sd3`` or ``flux`` (alpha defaults to the rank; the targets to the
    family's own, ``Family.lora_targets``)."""
    if target_modules is None:
        target_modules = family_named(family).lora_targets
    return LoraSpec(rank=rank, alpha=float(rank if alpha is None else alpha), target_modules=list(target_modules))


def save_diffusers_lora(pipeline_class, transformer: torch.nn.Module, folder: str | Path, adapter: str = STUDENT) -> Path:
    """Write ``adapter`` as the LoRA file ``pipeline_class.load_lora_weights(folder)`` loads (alpha in the metadata)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # peft's keys on a diffusers transformer are already diffusers' (the prefix "transformer." is added on save).
    pipeline_class.save_lora_weights(
        str(folder), transformer_lora_layers=adapter_state_dict(transformer, adapter),
        transformer_lora_adapter_metadata=adapter_metadata(transformer, adapter),
    )
    return folder
