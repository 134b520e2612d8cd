"""Fake-quantized Conv2d / Linear layers for quantization-aware training (QAT).

Each quantized layer computes ``out_q(conv(act_q(x), weight_q(w)) + b)``:

- weights: signed 8-bit, symmetric (zero point 0, scale ``max|w| / 127``, so values lie in
  ``[-127, 127]``), per output channel or per tensor, recomputed from the current weights at every
  training step;
- the layer's input and output: 8-bit per tensor, asymmetric ``uint8`` by default (or symmetric
  ``int8``), with a range observed as an exponential moving average of each batch's min / max.

Quantizing the output as well as the input is what lets ONNX Runtime fuse the exported
``DequantizeLinear -> Conv -> QuantizeLinear`` groups into integer kernels (``QLinearConv``,
``QGemm``), as it does for statically quantized models.

All rounding goes through ``torch.fake_quantize_per_tensor_affine`` /
``torch.fake_quantize_per_channel_affine``: their gradient is the straight-through estimator (passed
through inside the range, zero where the value was clipped), and the TorchScript ONNX exporter turns
them into ``QuantizeLinear`` / ``DequantizeLinear`` pairs. Before export, :func:`freeze` stores the
weight scales in buffers, so scales and zero points reach the ONNX file as constants, not as a
``ReduceMax`` over the weight that ONNX Runtime would have to run.

>>> qmodel, quantized, folded_bn = prepare_qat(model, per_channel=True)  # doctest: +SKIP
>>> set_observing(qmodel, True)  # then run calibration batches through qmodel  # doctest: +SKIP
>>> set_quantizing(qmodel, True)  # then train; freeze(qmodel) before export  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# PyTorch's exporter accepts only these integer ranges for fake quantization (ONNX's int8/uint8).
_UINT8 = (0, 255)
_INT8 = (-128, 127)
# Symmetric values use [-127, 127] inside the int8 range (scale = max|x| / 127), like ONNX Runtime,
# so -x quantizes to -q.
_SYMMETRIC_LEVELS = 127.0


class ActivationQuantizer(nn.Module):
    """Per-tensor fake quantization with a range observed as an EMA of batch min / max.

    ``observing`` updates the range from each batch (set it during calibration and early training);
    ``quantizing`` turns the rounding on (off during the first calibration pass, so the ranges are
    those of the float model). The range always includes 0, so zero stays exact.
    """

    def __init__(self, *, symmetric: bool = False, momentum: float = 0.9) -> None:
        super().__init__()
        self.symmetric = symmetric
        self.momentum = momentum
        self.quant_min, self.quant_max = _INT8 if symmetric else _UINT8
        self.observing = False
        self.quantizing = False
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(False))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise FloatingPointError("non-finite activation seen while observing the quantization range")
        if bool(self.observed):
            m = self.momentum
            lo, hi = m * self.min_val + (1 - m) * lo, m * self.max_val + (1 - m) * hi
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.observed.fill_(True)
        self._update_qparams()

    def _update_qparams(self) -> None:
        lo = torch.clamp(self.min_val, max=0.0)
        hi = torch.clamp(self.max_val, min=0.0)
        if self.symmetric:
            scale = torch.maximum(-lo, hi) / _SYMMETRIC_LEVELS
            zero_point = torch.tensor(0)
        else:
            scale = (hi - lo) / float(self.quant_max - self.quant_min)
            zero_point = torch.tensor(0)
            if scale > 0:
                zero_point = torch.clamp(torch.round(self.quant_min - lo / scale), self.quant_min, self.quant_max)
        if not scale > torch.finfo(torch.float32).tiny:  # a constant-zero tensor: any scale is exact
            scale, zero_point = torch.tensor(1.0), torch.tensor(0)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point.to(torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
        if not self.quantizing:
            return x
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max
        )

    def extra_repr(self) -> str:
        kind = "int8 symmetric" if self.symmetric else "uint8 asymmetric"
        return f"{kind}, momentum={self.momentum}, range=[{float(self.min_val):.4g}, {float(self.max_val):.4g}]"


class _FakeQuantMixin:
    """Weight fake quantization and the two activation quantizers shared by Conv2d and Linear."""

    weight: nn.Parameter

    def _init_quant(self, *, per_channel: bool, symmetric_activations: bool, momentum: float) -> None:
        self.per_channel = per_channel
        self.frozen = False
        self.input_quantizer = ActivationQuantizer(symmetric=symmetric_activations, momentum=momentum)
        self.output_quantizer = ActivationQuantizer(symmetric=symmetric_activations, momentum=momentum)
        channels = self.weight.shape[0] if per_channel else 1
        self.register_buffer("weight_scale", torch.ones(channels))
        self.register_buffer("weight_zero_point", torch.zeros(channels, dtype=torch.int32))

    def _current_weight_scale(self) -> torch.Tensor:
        w = self.weight.detach()
        absmax = w.abs().flatten(1).amax(dim=1) if self.per_channel else w.abs().amax().reshape(1)
        # an all-zero channel (pruned) keeps scale 1: its weights quantize to exactly 0 either way
        return torch.where(absmax > 0, absmax / _SYMMETRIC_LEVELS, torch.ones_like(absmax))

    def quantized_weight(self) -> torch.Tensor:
        scale = self.weight_scale if self.frozen else self._current_weight_scale()
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                self.weight, scale, self.weight_zero_point, 0, _INT8[0], _INT8[1]
            )
        return torch.fake_quantize_per_tensor_affine(self.weight, scale[0], self.weight_zero_point[0], *_INT8)

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the weight scales (and stop observing activations) for evaluation and export."""
        self.weight_scale.copy_(self._current_weight_scale())
        self.frozen = True
        self.input_quantizer.observing = False
        self.output_quantizer.observing = False

    def unfreeze(self) -> None:
        self.frozen = False


class FakeQuantLinear(_FakeQuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized input, weight and output (same parameter names)."""

    @classmethod
    def from_float(cls, layer: nn.Linear, **quant) -> FakeQuantLinear:
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None,
                  device=layer.weight.device, dtype=layer.weight.dtype)
        new.load_state_dict(layer.state_dict())
        new._init_quant(**quant)
        return new.train(layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)
        return self.output_quantizer(y)


class FakeQuantConv2d(_FakeQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input, weight and output (same parameter names)."""

    @classmethod
    def from_float(cls, layer: nn.Conv2d, **quant) -> FakeQuantConv2d:
        new = cls(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
            bias=layer.bias is not None, padding_mode=layer.padding_mode,
            device=layer.weight.device, dtype=layer.weight.dtype,
        )
        new.load_state_dict(layer.state_dict())
        new._init_quant(**quant)
        return new.train(layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)
        return self.output_quantizer(y)


FAKE_QUANT_LAYERS = (FakeQuantLinear, FakeQuantConv2d)
# Exact types: subclasses such as MultiheadAttention's out_proj are used through their weights by
# their parent, not through forward, so wrapping them would quantize nothing.
_WRAPPABLE = {nn.Linear: FakeQuantLinear, nn.Conv2d: FakeQuantConv2d}


def matches_module(name: str, patterns: Iterable[str]) -> bool:
    """True when the module ``name`` or one of its ancestors matches a glob pattern (``shrinkml.layers``)."""
    from shrinkml.layers import matches

    return matches(name, patterns)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the layers :func:`prepare_qat` can quantize (exact ``nn.Linear`` / ``nn.Conv2d``)."""
    return [name for name, m in model.named_modules() if type(m) in _WRAPPABLE and name]


@torch.no_grad()
def fold_batchnorms(model: nn.Module, layers: Iterable[str]) -> list[str]:
    """Fold each ``BatchNorm2d`` that directly follows one of ``layers`` (a Conv2d) in the same
    ``nn.Sequential`` into the conv's weight and bias, using the running statistics, and replace it
    with ``nn.Identity``. Returns the folded BatchNorms' names.

    The exporter folds such pairs in the float model; in a fake-quantized model it cannot (the
    weight is no longer an initializer), so folding here keeps the quantized weight the one that
    runs.
    """
    wanted = set(layers)
    folded = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            full = f"{parent_name}.{conv_name}" if parent_name else conv_name
            if not (type(conv) is nn.Conv2d and full in wanted and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.running_mean is None or bn.running_var is None:
                continue  # batch statistics at inference: nothing fixed to fold
            std = torch.sqrt(bn.running_var + bn.eps)
            gamma = bn.weight if bn.affine else torch.ones_like(std)
            beta = bn.bias if bn.affine else torch.zeros_like(std)
            factor = gamma / std
            conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
            new_bias = beta + (bias - bn.running_mean) * factor
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias)
            else:
                conv.bias.copy_(new_bias)
            setattr(parent, bn_name, nn.Identity())
            folded.append(f"{parent_name}.{bn_name}" if parent_name else bn_name)
    return folded


def prepare_qat(
    model: nn.Module,
    *,
    per_channel: bool = True,
    symmetric_activations: bool = False,
    momentum: float = 0.9,
    keep_float: Iterable[str] = (),
) -> tuple[nn.Module, list[str], list[str]]:
    """A fake-quantized copy of ``model`` (the original is not modified).

    Returns ``(qat_model, quantized_layer_names, folded_batchnorm_names)``. Layers whose name (or
    an ancestor's) matches a ``keep_float`` glob stay float. The quantizers start neither observing
    nor quantizing: calibrate with :func:`set_observing`, then :func:`set_quantizing`.
    """
    model = copy.deepcopy(model)
    keep_float = tuple(keep_float)
    names = [n for n in quantizable_layers(model) if not matches_module(n, keep_float)]
    folded = fold_batchnorms(model, names)
    modules = dict(model.named_modules())
    for name in names:
        parent_name, _, child = name.rpartition(".")
        layer = modules[name]
        wrapped = _WRAPPABLE[type(layer)].from_float(
            layer, per_channel=per_channel, symmetric_activations=symmetric_activations, momentum=momentum
        )
        setattr(modules[parent_name] if parent_name else model, child, wrapped)
    return model, names, folded


def _quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer)]


def set_observing(model: nn.Module, on: bool) -> None:
    """Start or stop updating every activation range."""
    for q in _quantizers(model):
        q.observing = on


def set_quantizing(model: nn.Module, on: bool) -> None:
    """Turn activation rounding on or off (weights are always fake-quantized)."""
    for q in _quantizers(model):
        q.quantizing = on


def freeze(model: nn.Module) -> None:
    """Fix every weight scale and activation range: the model then computes exactly what its ONNX
    export (QuantizeLinear / DequantizeLinear with constant scales) computes."""
    for m in model.modules():
        if isinstance(m, FAKE_QUANT_LAYERS):
            m.freeze()
    set_observing(model, False)
