"""A quantized frozen base: the teacher's Linear weights in 8 or 4 bits under the float32 LoRA adapters.

Training keeps one copy of the teacher's denoiser (the teacher, the student's base and the discriminator's backbone
are that one model with adapters on and off), so its weights are most of a run's memory: FLUX.1-dev's are 22 GiB in
bf16. ``base_quantization`` stores the Linear layers' weights (every layer of a transformer; attention and
feed-forward of a UNet, whose convolutions stay as loaded) in

* ``int8``: torchao's int8 weight-only quantization (a per-channel scale). peft wraps these layers in its own
  ``TorchaoLoraLinear``; it runs on the CPU and on CUDA, and diffusers loads the same layers with ``TorchAoConfig``.
* ``nf4``: bitsandbytes' 4-bit NormalFloat (QLoRA's, the base Hugging Face's FLUX QLoRA recipe uses), with the
  activations computed in the base's dtype. bitsandbytes 0.50 has a CPU path, so it is tested here.

The LoRA adapters, the discriminator heads and the optimizer stay float32 as without it. Only training uses it: the
stored trajectories come from the unquantized teacher (``rapm trajectories`` does not read this field), and export
and sampling load the unquantized base, where the LoRA applies unchanged (its matrices do not depend on the base's
storage).
"""

from __future__ import annotations

import torch

from rapm.errors import RapmError

KINDS = ("int8", "nf4")
INSTALL = {"int8": "pip install torchao", "nf4": "pip install bitsandbytes"}


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


def _nf4(model: torch.nn.Module, device: torch.device) -> None:
    import bitsandbytes as bnb

    compute = next(model.parameters()).dtype
    for parent, name, layer in linear_layers(model):
        quantized = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                      compute_dtype=compute, quant_type="nf4", device="meta")
        # Params4bit quantizes when it is moved to a device: from the CPU copy, so the device never holds both
        quantized.weight = bnb.nn.Params4bit(layer.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
        if layer.bias is not None:
            quantized.bias = torch.nn.Parameter(layer.bias.data, requires_grad=False)
        setattr(parent, name, quantized.to(device))


def quantize_base(model: torch.nn.Module, kind: str, device: torch.device | str = "cpu") -> int:
    """Quantize ``model``'s Linear layers in place (before any adapter is added); returns how many."""
    if kind not in KINDS:
        raise QuantizationError(f"config field 'base_quantization': must be {' or '.join(KINDS)} (or empty for none), "
                                f"got {kind!r}")
    count = len(linear_layers(model))
    try:
        _int8(model) if kind == "int8" else _nf4(model, torch.device(device))
    except ImportError as e:
        raise QuantizationError(f"config field 'base_quantization': {kind} needs a package that is not installed "
                                f"({e.name}); {INSTALL[kind]}") from None
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
    """The plain tensors a (possibly subclassed) tensor is made of: torchao's qdata and scale, bitsandbytes' packed
    bytes (its absmax sits in a quant_state that is counted with the layer's packed weight, about 3% more)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.nn.Parameter and type(t) is not torch.Tensor:
        names, _ = flatten()
        return [x for n in names for x in _storages(getattr(t, n))]
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(data) is not torch.Tensor and getattr(data, "__tensor_flatten__", None) is not None:
        return _storages(data)
    return [data]
