"""Causal LMs whose weights stay in their file until a step needs them, one decoder layer at a time.

A *lazy* model is a transformers ``*ForCausalLM`` built on PyTorch's ``meta`` device (shapes, no
storage) with a *weight source* attached: Hugging Face tensor name -> float32 tensor, read on
demand. Its final norm and rotary tables are real (every forward needs them); its token embedding
stays in the source too, and a lookup reads only the rows of the tokens it is given
(:func:`row_embedding`); each decoder layer is materialized from the source when a step walks it
and released after (``shrinkml.quant.sequential``), so a step's peak memory holds one layer and
the rows it looked up, not the model.

Sources: :class:`GGUFWeights` (a llama-architecture GGUF, memory-mapped: a tensor is dequantized
when asked for) and :class:`CodesWeights` (the block codes a quantizer chose, dequantized on
demand: what a lazy step's output model holds). Both give a whole tensor (``get``) or some of its
rows (``rows``). :func:`materialize_all` turns a lazy model into
an ordinary one, for steps that need every weight at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_SOURCE_ATTR = "_shrinkml_weight_source"


class GGUFWeights:
    """Float32 tensors by Hugging Face name from a llama GGUF file, in Hugging Face layout (q/k
    rows unpermuted as transformers' loader does); the file is memory-mapped, never copied whole."""

    def __init__(self, path: str | Path) -> None:
        from shrinkml.formats.gguf_file import gguf_to_hf_name, read_gguf

        self.path = str(path)
        self.reader = read_gguf(path)
        if self.reader.architecture != "llama":
            raise ValueError(f"lazy GGUF loading maps llama's tensor names; this file is {self.reader.architecture}")
        self.gguf_names = {hf: g for g in self.reader.names if (hf := gguf_to_hf_name(g, "llama")) is not None}

    def __contains__(self, name: object) -> bool:
        return name in self.gguf_names

    def get(self, name: str):
        import torch

        from shrinkml.formats.gguf_file import hf_tensor_float32

        if name not in self.gguf_names:
            raise KeyError(f"{self.path} has no tensor for {name}")
        return torch.from_numpy(hf_tensor_float32(self.reader, self.gguf_names[name])[1])

    def rows(self, name: str, index) -> Any:
        """Rows ``index`` of tensor ``name`` as float32 (numpy), only those rows' blocks read and
        dequantized. Not for Llama's q/k weights, whose rows the file stores permuted."""
        import numpy as np

        from shrinkml.formats.gguf_file import _qk_heads_for, dequantize_rows

        if name not in self.gguf_names:
            raise KeyError(f"{self.path} has no tensor for {name}")
        gguf_name = self.gguf_names[name]
        if _qk_heads_for(self.reader, gguf_name) is not None:
            raise ValueError(f"{name}: the file stores its rows permuted; read it whole")
        return dequantize_rows(self.reader, gguf_name, np.asarray(index, dtype=np.int64))

    def drop_pages(self) -> None:
        """Release the file's pages read so far from this process's resident memory."""
        self.reader.drop_pages()

    def __deepcopy__(self, memo):  # read-only: copies of a model share it
        return self


class CodesWeights:
    """A quantizer's block codes dequantized on demand; names it has not come from ``fallback``
    (the tensors the quantizer left as they were: norms)."""

    def __init__(self, codes: dict[str, Any], fallback: Any) -> None:
        self.codes, self.fallback = codes, fallback

    def __contains__(self, name: object) -> bool:
        return name in self.codes or name in self.fallback

    def get(self, name: str):
        import numpy as np
        import torch

        from shrinkml.formats.gguf_blocks import BlockCodes, dequantize

        if name not in self.codes:
            return self.fallback.get(name)
        value = self.codes[name]
        return torch.from_numpy(dequantize(value) if isinstance(value, BlockCodes) else np.asarray(value, np.float32))

    def rows(self, name: str, index) -> Any:
        """Rows ``index`` of tensor ``name`` as float32 (numpy): only those rows' codes dequantized."""
        import numpy as np

        from shrinkml.formats.gguf_blocks import BlockCodes, dequantize

        if name not in self.codes:
            return self.fallback.rows(name, index)
        value, index = self.codes[name], np.asarray(index, dtype=np.int64)
        return dequantize(value.take_rows(index)) if isinstance(value, BlockCodes) else np.asarray(value[index], np.float32)

    def __deepcopy__(self, memo):
        return self


def source_of(model) -> Any:
    return getattr(model, _SOURCE_ATTR, None)


def attach(model, source) -> None:
    """Make ``source`` the weight source of ``model`` and of its row-reading embeddings."""
    object.__setattr__(model, _SOURCE_ATTR, source)
    for module in model.modules():
        if hasattr(module, _ROWS_OF):
            object.__setattr__(module, _SOURCE_ATTR, source)


_ROWS_OF = "_shrinkml_rows_of"  # on a row-reading embedding: the tensor name its rows come from
_EMBEDDING_CLASSES: dict[type, type] = {}


def row_embedding(embedding, name: str, source):
    """``embedding`` (an ``nn.Embedding`` on the meta device) as one that looks up the rows of the
    tokens it is given from ``source`` (tensor ``name``), never holding the whole table: a
    vocabulary of 49,152 x 576 float32 is 113 MB, a calibration batch's distinct tokens a few MB.
    Once its weight is real (:func:`materialize_all`) it is an ordinary embedding again."""
    import torch

    base = type(embedding)
    cls = _EMBEDDING_CLASSES.get(base)
    if cls is None:
        def forward(self, input_ids):
            if not self.weight.is_meta:
                return base.forward(self, input_ids)
            unique, inverse = torch.unique(input_ids, return_inverse=True)
            table = getattr(self, _SOURCE_ATTR).rows(getattr(self, _ROWS_OF), unique.cpu().numpy())
            return torch.from_numpy(table).to(self.weight.dtype)[inverse]

        cls = type(f"RowReading{base.__name__}", (base,), {
            "forward": forward,
            "__doc__": f"{base.__name__} whose table stays in its weight source (shrinkml.models.lazy.row_embedding)."})
        _EMBEDDING_CLASSES[base] = cls
    if not isinstance(embedding, torch.nn.Embedding) or not embedding.weight.is_meta:
        raise ValueError(f"{name}: only an nn.Embedding whose weight is on the meta device reads its rows lazily")
    embedding.__class__ = cls
    object.__setattr__(embedding, _ROWS_OF, name)
    object.__setattr__(embedding, _SOURCE_ATTR, source)
    return embedding


def is_lazy(module) -> bool:
    """Whether any of ``module``'s parameters has no storage yet (the meta device)."""
    return any(p.is_meta for p in module.parameters())


def materialize(module, prefix: str, source) -> None:
    """Give ``module`` (named ``prefix`` in its model) and its children real float32 parameters
    holding the source's tensors (each tensor allocated once: the source's array is taken as is).
    Buffers must already be real: a meta buffer has no source to come from."""
    meta_buffers = [n for n, b in module.named_buffers() if b.is_meta]
    if meta_buffers:
        raise ValueError(f"{prefix or 'the model'} has buffers without values ({meta_buffers[:3]}): it cannot be"
                         " loaded one layer at a time")
    for name, sub in module.named_modules():
        materialize_direct(sub, f"{prefix}.{name}" if prefix and name else (prefix or name), source)


def release(module) -> None:
    """Drop ``module``'s storage (back to the meta device)."""
    module.to("meta")


def retie(model) -> None:
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def materialize_all(model) -> None:
    """Every parameter of a lazy model read from its source (the whole model in memory)."""
    source = source_of(model)
    if source is None:
        raise ValueError("the model has parameters without values and no weight source")
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = model.get_output_embeddings() if tied else None
    for name, module in model.named_modules():
        if module is not head:  # a tied head is the embedding's table: tied again below, not read
            materialize_direct(module, name, source)
    retie(model)


def materialize_direct(module, prefix: str, source) -> None:
    """Real storage for ``module``'s own parameters (not its children's)."""
    import torch

    with torch.no_grad():
        for name, param in list(module.named_parameters(recurse=False)):
            full = f"{prefix}.{name}" if prefix else name
            if not param.is_meta:
                continue
            value = source.get(full)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{full}: the source holds {tuple(value.shape)}, the model expects {tuple(param.shape)}")
            setattr(module, name, torch.nn.Parameter(value.to(param.dtype), requires_grad=param.requires_grad))


def meta_copy(model):
    """A copy of ``model`` whose parameters have no storage (its buffers are copied)."""
    import copy

    import torch

    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def decoder_layers(model) -> tuple[Any, str, Any, Any] | None:
    """``(base model, its layers' name prefix, the layers, the final norm)`` of a decoder whose
    layers are one ``ModuleList`` (Llama, Qwen2, Mistral, Phi-3, Gemma: ``model.layers`` and
    ``model.norm``; GPT-2: ``transformer.h`` and ``transformer.ln_f``), else None."""
    import torch

    for base_name, layers_name, norm_name in (("model", "layers", "norm"), ("transformer", "h", "ln_f")):
        base = getattr(model, base_name, None)
        layers = getattr(base, layers_name, None)
        norm = getattr(base, norm_name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and norm is not None:
            return base, f"{base_name}.{layers_name}", layers, norm
    return None


def lazy_causal_lm(config, source):
    """A ``*ForCausalLM`` of ``config`` on the meta device with ``source`` attached; everything but
    its decoder layers made real (rotary tables built fresh, as the model's constructor builds them)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parts = decoder_layers(model)
    if parts is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers shrinkml can walk")
    base, prefix, layers, _ = parts
    base_prefix = prefix.rsplit(".", 1)[0]
    embedding = model.get_input_embeddings()
    for child_name, child in base.named_children():
        if child is layers:
            continue
        if child is embedding and type(child) is torch.nn.Embedding and hasattr(source, "rows"):
            row_embedding(child, f"{base_prefix}.{child_name}.weight", source)  # its rows are read when looked up
            continue
        if any(b.is_meta for b in child.buffers()):  # rotary tables: computed, not stored
            fresh = type(child)(config=model.config)
            setattr(base, child_name, fresh)
            child = fresh
        if is_lazy(child):
            materialize(child, f"{base_prefix}.{child_name}", source)
    for name, module in model.named_modules():  # an untied head, anything outside the base
        tied_head = name == "lm_head" and getattr(model.config, "tie_word_embeddings", False)
        if not name.startswith(base_prefix) and not tied_head and any(p.is_meta for p in module.parameters(recurse=False)):
            materialize_direct(module, name, source)
    retie(model)
    attach(model, source)
    return model.eval()
