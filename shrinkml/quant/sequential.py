"""Calibration one decoder layer at a time (the shape of llm-compressor's sequential pipeline).

The calibration windows' hidden states enter the first decoder layer; for each layer in turn its
weights are materialized (a lazy model's, from their file: ``shrinkml.models.lazy``), hooks record
the input Gram matrix of every Linear in it while the layer maps the hidden states to the next
layer's inputs (in place, batch by batch), the caller quantizes the layer from those statistics,
and the layer is released. At the end the final norm's output gives the output head's statistics.
Peak memory: one layer's weights, its statistics, and the calibration windows' hidden states
(``windows x context x hidden`` float32), never the whole model or its vocabulary-sized logits.

The statistics are those of the *float* model's inputs (each layer's outputs are computed before
it is quantized), which is what the one-pass hooks over the whole model record: the two give the
same Hessians (tested), so choosing codes layer by layer changes memory, not results.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


class _Caught(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("first decoder layer reached")
        self.call = (args, kwargs)


class _Catcher:
    """Stands in for the first decoder layer: records what it is called with and stops the forward."""

    def __init__(self, layer) -> None:
        import torch

        class Stop(torch.nn.Module):
            def __init__(self, inner) -> None:
                super().__init__()
                self.inner = inner  # keeps attributes the base model reads from its layers (attention_type)

            def __getattr__(self, name: str):
                try:
                    return super().__getattr__(name)
                except AttributeError:
                    return getattr(self.inner, name)

            def forward(self, *args, **kwargs):
                raise _Caught(args, kwargs)

        self.module = Stop(layer)


@dataclass
class LayerStatistics:
    """One decoder layer's calibration statistics: ``accumulators`` by owning module name (full
    names), ``owner[name]`` names the accumulator each hooked Linear shares (q/k/v theirs, gate/up
    theirs). ``index`` is None for the output head (its input: the final norm's output)."""

    index: int | None
    prefix: str
    layer: Any
    accumulators: dict[str, Any] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)
    tokens: int = 0


def layer_by_layer(model, windows, linear_names: set[str], *, head_name: str | None = None, batch: int = 4,
                   progress=None) -> Iterator[LayerStatistics]:
    """Walk ``model``'s decoder layers on the calibration ``windows`` (token ids, one row each),
    yielding each layer's :class:`LayerStatistics` for the Linears in ``linear_names`` (full module
    names) while the layer's weights are live; after the last layer, the statistics of
    ``head_name`` (the output head, whose input is the final norm's output) if given. A layer a
    lazy model materialized is released once the caller has taken its statistics."""
    import torch

    from shrinkml.measure.memory import return_freed_memory
    from shrinkml.models.lazy import (
        decoder_layers,
        is_lazy,
        materialize,
        release,
        source_of,
    )
    from shrinkml.quant.gptq import HessianAccumulator

    parts = decoder_layers(model)
    if parts is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers to walk")
    base, prefix, layers, norm = parts
    source = source_of(model)
    ids = torch.as_tensor(windows, dtype=torch.long)
    hidden, calls = [], []
    first = layers[0]
    catcher = _Catcher(first).module
    layers[0] = catcher
    try:
        with torch.inference_mode():
            for start in range(0, len(ids), batch):
                try:
                    base(input_ids=ids[start : start + batch], use_cache=False)
                except _Caught as caught:
                    args, kwargs = caught.call
                    hidden.append(args[0] if args else kwargs.pop("hidden_states"))
                    calls.append((args[1:], kwargs))
                else:  # pragma: no cover - a base model that never calls its first layer
                    raise ValueError(f"{type(base).__name__} never called its first decoder layer")
    finally:
        layers[0] = first
    return_freed_memory()
    tokens = int(ids.numel())
    for index, layer in enumerate(layers):
        name = f"{prefix}.{index}"
        lazy = is_lazy(layer)
        if lazy:
            if source is None:
                raise ValueError(f"{name} has no weights and the model no weight source")
            materialize(layer, name, source)
        stats = LayerStatistics(index, name, layer, tokens=tokens)
        linears = {full: m for sub, m in layer.named_modules() if (full := f"{name}.{sub}" if sub else name) in linear_names}
        with recording_inputs(linears, stats.owner, stats.accumulators) as batch_done, torch.inference_mode():
            for b, (args, kwargs) in enumerate(calls):
                out = layer(hidden[b], *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
                batch_done()
        if progress is not None and (index + 1) % 10 == 0:
            progress.log(f"calibrated {index + 1} of {len(layers)} decoder layers")
        yield stats
        stats.accumulators.clear()
        if lazy:
            release(layer)
            if hasattr(source, "drop_pages"):
                source.drop_pages()  # the file's pages of this layer, read: not kept resident either
        return_freed_memory()  # the layer's weights and statistics: freed, and not kept resident
    if head_name is not None:
        stats = LayerStatistics(None, head_name, None, tokens=tokens)
        with torch.inference_mode():
            for h in hidden:
                x = norm(h)
                acc = stats.accumulators.setdefault(head_name, HessianAccumulator(x.shape[-1]))
                acc.add(x)
        stats.owner[head_name] = head_name
        yield stats


@contextmanager
def recording_inputs(modules: dict[str, Any], owner: dict[str, str], accumulators: dict[str, Any]):
    """While open, forward pre-hooks add each module's input (by full name in ``modules``) to an
    input Gram accumulator; modules fed the same tensor share one, the first one's, and
    ``owner[name]`` says whose. Yields ``batch_done``, to call after each calibration batch (the
    first batch's inputs stay referenced until then, so no two of them share an id)."""
    from shrinkml.quant.gptq import HessianAccumulator

    seen: dict[int, str] = {}
    alive: list[Any] = []

    def hook(name: str):
        def record(_module, args):
            x = args[0]
            if name not in owner:
                owner[name] = seen.setdefault(id(x), name)
                alive.append(x)
                if owner[name] == name:
                    accumulators[name] = HessianAccumulator(x.shape[-1])
            if owner[name] == name:
                accumulators[name].add(x)
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        yield alive.clear
    finally:
        for h in handles:
            h.remove()
