"""``prune.channels``: structured pruning that removes whole output channels / neurons.

Torch-Pruning's dependency graph finds the layers that must be cut together (a conv, its
BatchNorm, the next layer's input channels, both sides of a residual add), so the layers come out
physically smaller: fewer parameters and fewer MACs, with no sparse kernels needed.

``channel_ratio`` is the fraction of output channels removed from each prunable layer, not the
fraction of parameters: removing half the channels of consecutive layers removes about three
quarters of the weights between them. The summary reports both.

The model's output layer (the last Linear/Conv to run, whose outputs are the model's outputs) is
never pruned: that would change what the model predicts.

>>> config = PruneChannelsConfig(channel_ratio=0.5, round_to=8)
>>> result = apply(state, config, ctx)  # doctest: +SKIP
>>> result.summary["param_reduction"]  # doctest: +SKIP
0.74
"""

from __future__ import annotations

import copy
import traceback
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.techniques.base import StepConfig, register, searchable

if TYPE_CHECKING:
    import torch
    from torch import nn


def _layers() -> tuple[type[nn.Module], ...]:
    """The prunable layer types: Linear and every ConvNd (a function, so importing this module
    imports no torch)."""
    from torch import nn

    return (nn.Linear, nn.modules.conv._ConvNd)


class PruneChannelsConfig(StepConfig):
    """Hyperparameters of structured channel pruning."""

    technique: Literal["prune.channels"] = Field(
        "prune.channels", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    channel_ratio: float = Field(
        0.5, ge=0, lt=1, json_schema_extra=searchable(0.1, 0.8, step=0.1),
        description="fraction of output channels (conv) or neurons (linear) removed from each prunable"
        " layer, 0-1; not the parameter fraction, which is larger and reported as param_reduction",
    )
    importance: Literal["l1", "l2", "random"] = Field(
        "l2",
        description="how channels are ranked for removal: L1 or L2 norm of their weights across coupled"
        " layers; random only as a baseline",
    )
    global_pruning: bool = Field(
        False,
        description="rank channels across all layers at once (layers end with different widths) instead"
        " of removing channel_ratio from each layer",
    )
    ignore: tuple[str, ...] = Field(
        (),
        description="module-name globs (a module and everything inside it) whose output channels are kept",
    )
    round_to: int | None = Field(
        None, ge=1,
        description="keep each pruned layer's channel count a multiple of this many channels (e.g. 8 for"
        " SIMD-friendly shapes); none: any count",
    )


# What tracing and cutting raise for a model torch-pruning cannot handle (its own asserts and
# NotImplementedError for unsupported layers, torch's RuntimeError/TypeError for ops, torch.fx's
# TraceError, a ValueError). Anything else (KeyboardInterrupt, a harness timeout, MemoryError)
# is not a property of the model and propagates as it is.
_TRACE_ERRORS = (
    RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError, NotImplementedError,
    AssertionError, ZeroDivisionError,
)
# A forward the user wrote may raise anything; these still say nothing about the model.
_NOT_ABOUT_THE_MODEL = (TimeoutError, MemoryError)


def _example_tensor(ctx: StepContext) -> torch.Tensor:
    import torch

    try:
        return torch.as_tensor(ctx.example_input)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(
            "prune.channels needs one example batch as a single tensor to trace the model",
            where="prune.channels",
            expected="a numpy array batch of model inputs",
            found=f"{type(ctx.example_input).__name__} ({exc})",
            fix="give data whose inputs are one array, or skip prune.channels for this model",
        ) from exc


def _forward(model: nn.Module, example: torch.Tensor, *, where: str) -> Any:
    """Run the model once; when it fails, name the layer and the pruned layer feeding it."""
    import torch

    names = {module: name for name, module in model.named_modules()}
    entered: list[nn.Module] = []

    def pre_hook(module: nn.Module, _args: Any) -> None:
        entered.append(module)

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            return model(example)
    except _NOT_ABOUT_THE_MODEL:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is reported as input
        failing = names.get(entered[-1], "?") if entered else "(before the first layer)"
        layers = _layers()
        feeding = [names.get(m, "?") for m in entered[:-1] if isinstance(m, layers)]
        fix = "derive shapes in forward from the input tensor (x.flatten(1), not x.view(-1, 512))"
        if feeding:
            fix = f"add the layer feeding it to ignore (ignore: [{feeding[-1]!r}]), or {fix}"
        raise InputError(
            f"the model's forward fails {where}",
            where=f"prune.channels, at or after layer {failing!r}",
            expected="a forward that works for any channel count (no hard-coded widths in view/reshape)",
            found=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            fix=fix,
        ) from exc
    finally:
        for handle in handles:
            handle.remove()


def _output_layers(model: nn.Module, example: torch.Tensor) -> tuple[list[nn.Module], list[tuple[int, ...]]]:
    """The Linear/Conv layers whose outputs are the model's outputs (the classifier head), and
    the shapes of those outputs.

    The layers are the last Linear/Conv to run in the forward pass, plus any other whose output
    tensor is returned unchanged (models with several heads).
    """
    import torch

    # Keep the output tensors themselves: ids of freed intermediates get reused by later tensors.
    order: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(module: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            order.append((module, output))

    layers = _layers()
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, layers)]
    try:
        outputs = _forward(model, example, where="on the example input")
    finally:
        for handle in handles:
            handle.remove()
    output_ids = {id(t) for t in _tensors(outputs)}
    found = [m for m, out in order if id(out) in output_ids]
    if order:
        found.append(order[-1][0])
    return list(dict.fromkeys(found)), [tuple(t.shape) for t in _tensors(outputs)]


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a forward's output (a tensor, or a tuple/list/dict of them)."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else []
    return [t for t in items if isinstance(t, torch.Tensor)]


def _out_channels(module: nn.Module) -> int:
    from torch import nn

    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once


def _importance(name: str):
    import torch_pruning as tp

    if name == "random":
        return tp.importance.RandomImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)


def _applies(loaded) -> str | None:
    """A search's check: text encoders are pruned by prune.heads / prune.ffn / prune.layers."""
    if loaded.text is not None:
        return "a text encoder: its structure is pruned by prune.heads, prune.ffn and prune.layers"
    return None


@register("prune.channels", PruneChannelsConfig, stage="structure", applies=_applies)
def apply(state: ModelState, config: PruneChannelsConfig, ctx: StepContext) -> StepResult:
    """Remove ``channel_ratio`` of the output channels of each prunable layer; input state untouched."""
    import torch
    import torch_pruning as tp

    model = copy.deepcopy(state.torch_model)
    example = _example_tensor(ctx).to(next(model.parameters(), torch.empty(0)).device)
    # Trace in eval mode: a forward in train mode would update BatchNorm running statistics.
    training = {name: m.training for name, m in model.named_modules()}
    model.eval()

    output_layers, expected_shapes = _output_layers(model, example)
    ignored = set(output_layers)
    from shrinkml.layers import matches, select

    select([n for n, _ in model.named_modules() if n], config.ignore, where="prune.channels.ignore")  # each must match
    for name, module in model.named_modules():
        if name and matches(name, config.ignore):
            ignored.update(module.modules())
    layers = _layers()
    prunable = [m for m in model.modules() if isinstance(m, layers) and m not in ignored]
    channels_before = sum(_out_channels(m) for m in prunable)
    params_before = _count_params(model)

    if config.channel_ratio > 0 and prunable:
        # Random importance draws from torch's generator: seed a private copy of it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            try:
                pruner = tp.pruner.MetaPruner(
                    model,
                    example_inputs=example,
                    importance=_importance(config.importance),
                    global_pruning=config.global_pruning,
                    pruning_ratio=config.channel_ratio,
                    ignored_layers=list(ignored),
                    round_to=config.round_to,
                )
                pruner.step()
            except _TRACE_ERRORS as exc:
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                raise InputError(
                    "torch-pruning could not trace or cut this model",
                    where="prune.channels",
                    expected="layers and ops torch-pruning supports",
                    found=f"{type(exc).__name__}: {exc} (in {frame.name}, {frame.filename.rsplit('/', 1)[-1]})",
                    fix="add the layers around that op to ignore: (module-name globs), or skip prune.channels",
                ) from exc

    emptied = [n for n, m in model.named_modules() if isinstance(m, layers) and _out_channels(m) == 0]
    if emptied:
        raise InputError(
            "pruning removed every channel of some layers",
            where=f"prune.channels, layers {emptied}",
            expected="at least one channel left in each layer",
            found=f"channel_ratio={config.channel_ratio}, global_pruning={config.global_pruning}",
            fix="lower channel_ratio, set global_pruning: false, or ignore those layers",
        )
    output = _forward(model, example, where="after pruning")
    shapes = [tuple(t.shape) for t in _tensors(output)]
    if shapes != expected_shapes:
        raise InputError(
            "pruning changed the shape of the model's output",
            where="prune.channels",
            expected=f"output shapes {expected_shapes}",
            found=f"{shapes}",
            fix="add the output layer(s) to ignore",
        )
    for name, module in model.named_modules():
        module.training = training.get(name, module.training)

    channels_after = sum(_out_channels(m) for m in prunable)
    params_after = _count_params(model)
    summary = {
        "channel_ratio": config.channel_ratio,
        "channels_before": channels_before,
        "channels_after": channels_after,
        "params_before": params_before,
        "params_after": params_after,
        "param_reduction": 1 - params_after / params_before if params_before else 0.0,
    }
    return StepResult(replace(state, torch_model=model), summary)
