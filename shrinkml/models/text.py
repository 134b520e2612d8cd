"""Transformer text models: token ids in, embedding (or logits) out.

``TextEncoder`` wraps a Hugging Face transformer with sentence-transformers' pooling and
normalization. shrinkml's data for it is padded ``(batch, seq)`` int64 token ids, so in PyTorch it is
called with the ids alone (the attention mask is ``ids != pad_token_id``). Its ONNX export is the
standard Hugging Face layout instead: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where
the transformer takes them) in, ``sentence_embedding`` (pooled, normalized) and ``last_hidden_state``
out, or ``logits`` for a classifier, batch and sequence dynamic: the file optimum and
sentence-transformers' ONNX and OpenVINO backends load, and the metadata that tells shrinkml's own
runners how to feed it from ids (``shrinkml.runtimes.feeds``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Pooling = Literal["mean", "cls", "max"]


class TextEncoder(nn.Module):
    """``forward(input_ids) -> (batch, hidden)`` pooled embeddings, or ``(batch, classes)`` logits.

    ``transformer`` is a Hugging Face model (e.g. ``BertModel`` or ``BertForSequenceClassification``);
    ``kind="classifier"`` returns its logits, ``kind="embedding"`` pools its last hidden state.
    """

    def __init__(
        self,
        transformer: nn.Module,
        *,
        kind: Literal["embedding", "classifier"] = "embedding",
        pooling: Pooling = "mean",
        normalize: bool = True,
        pad_token_id: int = 0,
        unpad: bool = False,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.kind = kind
        self.pooling = pooling
        self.normalize = normalize
        self.pad_token_id = pad_token_id
        # compute real tokens only (the `unpad` technique; shrinkml.nn.unpad): same function, in eval
        self.unpad = unpad

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if getattr(self, "unpad", False) and attention_mask is None and not self.training \
                and not torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing():
            from shrinkml.nn.unpad import packed_forward

            out = packed_forward(self, input_ids, token_type_ids)
            if out is not None:
                return out
        return self.encode(input_ids, attention_mask, token_type_ids)[0]

    def input_names(self) -> list[str]:
        """The named inputs of the exported graph: ids and mask, and token types where the
        transformer takes them (BERT-like models)."""
        import inspect

        accepted = inspect.signature(self.transformer.forward).parameters
        return ["input_ids", "attention_mask", *(["token_type_ids"] if "token_type_ids" in accepted else [])]

    def output_names(self) -> list[str]:
        return ["logits"] if self.kind == "classifier" else ["sentence_embedding", "last_hidden_state"]

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """``(pooled embedding, token states)`` for an embedding model, ``(logits,)`` for a classifier."""
        mask = (input_ids != self.pad_token_id).to(torch.int64) if attention_mask is None else attention_mask
        kwargs = {"input_ids": input_ids, "attention_mask": mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.transformer(**kwargs)
        if self.kind == "classifier":
            return (out.logits if hasattr(out, "logits") else out[0],)
        tokens = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "max":
            pooled = tokens.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(tokens.dtype).min).amax(1)
        else:
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return (F.normalize(pooled, p=2, dim=1) if self.normalize else pooled), tokens


class TextExport(nn.Module):
    """``encoder`` with positional named inputs and every output, for ``torch.onnx.export``."""

    def __init__(self, encoder: TextEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.names = encoder.input_names()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.encoder.encode(**dict(zip(self.names, inputs)))
