"""A quantized frozen base: the teacher's Linear weights in 8 or 4 bits under the float32 LoRA adapters.

Training keeps one copy of the teacher's denoiser (the teacher, the student's base and the discriminator's backbone
are that one model with adapters on and off), so its weights are most of a run's memory: FLUX.1-dev's are 22 GiB in
bf16. ``base_quantization`` stores the Linear layers' weights (every layer of a transformer; attention and
feed-forward of a UNet, whose convolutions stay as loaded) in

* ``int8``: torchao's int8 weight-only quantization (a per-channel scale). peft wraps these layers in its own
  ``TorchaoLoraLinear``; it runs on the CPU and on CUDA, and diffusers loads the same layers with ``TorchAoConfig``.
* ``nf4``: 4-bit NormalFloat with double-quantized scales (QLoRA's format, the one Hugging Face's FLUX QLoRA recipe
  uses through bitsandbytes), here torchao's ``NF4Tensor`` (torchtune's QLoRA): the layer stays an ``nn.Linear``
  whose weight dequantizes in its forward, so peft's plain LoRA layer wraps it. Not bitsandbytes: importing it
  (diffusers and peft do whenever it is installed) tries to fetch a compiled kernel from the Hugging Face Hub, and
  rapm runs no downloaded code.

torchao is one package for both, on the CPU and on CUDA (``pip install torchao``, the ``quant`` extra).

The LoRA adapters, the discriminator heads and the optimizer stay float32 as without it. Only training uses it: the
stored trajectories come from the unquantized teacher (``rapm trajectories`` does not read this field), and export
and sampling load the unquantized base, where the LoRA applies unchanged (its matrices do not depend on the base's
storage).
"""

from __future__ import annotations

import torch

from rapm.errors import RapmError

KINDS = ("int8", "nf4")
NF4_BLOCK = 64  # values per NF4 scale (QLoRA's)
NF4_SCALER_BLOCKS = (256, 128, 64, 32, 16, 8, 4, 2, 1)  # scales per second-level scale: the largest that divides


class QuantizationError(RapmError):
    pass


def linear_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, attribute, layer) of every plain ``nn.Linear`` in ``model``."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is torch.nn.Linear:
                found.append((parent, name, child))
    return found


def _int8(model: torch.nn.Module) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, _: type(m) is torch.nn.Linear)


def _nf4(model: torch.nn.Module) -> int:
    """NF4 weights on every Linear whose size the blocks divide; returns how many (a tiny layer may stay as it is)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    done = 0
    for _, _, layer in linear_layers(model):
        w = layer.weight.data
        if w.numel() % NF4_BLOCK:
            continue
        scalers = w.numel() // NF4_BLOCK
        block = next(b for b in NF4_SCALER_BLOCKS if scalers % b == 0)
        layer.weight = torch.nn.Parameter(to_nf4(w, NF4_BLOCK, block), requires_grad=False)
        done += 1
    return done


def quantize_base(model: torch.nn.Module, kind: str) -> int:
    """Quantize ``model``'s Linear layers in place (before any adapter is added); returns how many."""
    if kind not in KINDS:
        raise QuantizationError(f"config field 'base_quantization': must be {' or '.join(KINDS)} (or empty for none), "
                                f"got {kind!r}")
    count = len(linear_layers(model))
    try:
        import torchao  # noqa: F401 (heavy and optional: imported only when asked for)
    except ImportError:
        raise QuantizationError("config field 'base_quantization': needs torchao, which is not installed; pip install "
                                "torchao (or rapm[quant])") from None
    if kind == "int8":
        _int8(model)
    else:
        count = _nf4(model)
    model.requires_grad_(False)
    return count


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights and buffers take as stored (a quantized tensor's data, scales and zero points)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        for inner in _storages(t):
            key = (inner.untyped_storage().data_ptr(), inner.dtype, tuple(inner.shape))
            if key not in seen:
                seen.add(key)
                total += inner.numel() * inner.element_size()
    return total


def _storages(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly subclassed) tensor is made of: torchao's quantized data and its scales."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.nn.Parameter and type(t) is not torch.Tensor:
        names, _ = flatten()
        return [x for n in names for x in _storages(getattr(t, n))]
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(data) is not torch.Tensor and getattr(data, "__tensor_flatten__", None) is not None:
        return _storages(data)
    return [data]
