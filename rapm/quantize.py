"""A quantized frozen base: the teacher's Linear weights in 8 or 4 bits under the float32 LoRA adapters.

Training keeps one copy of the teacher's denoiser (the teacher, the student's base and the discriminator's backbone
are that one model with adapters on and off), so its weights are most of a run's memory: FLUX.1-dev's are 22 GiB in
bf16. ``base_quantization`` stores the Linear layers' weights (every layer of a transformer; attention and
feed-forward of a UNet, whose convolutions stay as loaded) in

* ``int8``: torchao's int8 weight-only quantization (a per-channel scale). It runs on the CPU and on CUDA, and diffusers
  loads the same quantization with ``TorchAoConfig``.
* ``nf4``: 4-bit NormalFloat with double-quantized scales (QLoRA's format, the one Hugging Face's FLUX QLoRA recipe
  uses through bitsandbytes), here torchao's ``NF4Tensor`` (torchtune's QLoRA).

Either way the layer becomes a ``QuantizedLinear``, an ``nn.Linear`` (so peft's plain LoRA layer wraps it) whose
matmul dequantizes the weight in the forward and again in the backward instead of keeping a float copy. Not
bitsandbytes: importing it (diffusers and peft do whenever it is installed) tries to fetch a compiled kernel from the
Hugging Face Hub, and rapm runs no downloaded code.

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


def _dequantize(weight: torch.Tensor) -> torch.Tensor:
    nf4 = getattr(weight, "get_original_weight", None)  # torchao's NF4Tensor; its dequantize() is a static helper
    return nf4() if nf4 is not None else weight.dequantize()


class _DequantizedMatmul(torch.autograd.Function):
    """x W^T for a quantized W that keeps no float copy of W for the backward pass: the weight is dequantized in the
    forward and again in the backward (as QLoRA's kernels do). Through the plain F.linear of a quantized tensor,
    autograd saves the dequantized weight of every layer until the backward, which on a 16-layer stack of 4096 x 4096
    Linears took the peak above the float32 model's (1.73 GiB int8, 1.51 nf4, 1.48 float32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight  # the quantized tensor itself (it never requires a gradient)
        return x @ _dequantize(weight).to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ _dequantize(ctx.weight).to(grad.dtype), None


class QuantizedLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose weight is a torchao quantized tensor (peft wraps it like any Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantizedMatmul.apply(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _int8(model: torch.nn.Module) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layers = linear_layers(model)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, _: type(m) is torch.nn.Linear)
    for _, _, layer in layers:
        layer.__class__ = QuantizedLinear


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
        layer.__class__ = QuantizedLinear
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
