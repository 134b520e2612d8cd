"""Transformer text models as one-input modules: token ids in, embedding (or logits) out.

``TextEncoder`` wraps a Hugging Face transformer so the rest of shrinkml sees a model with a single
``(batch, seq)`` int64 input, like any other: the attention mask is derived from the padding id
inside the module, and sentence-transformers' pooling and normalization are part of the forward.
Export, quantization and measurement then need nothing text-specific, and the exported ONNX model is
what a user deploys after tokenizing.
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
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.kind = kind
        self.pooling = pooling
        self.normalize = normalize
        self.pad_token_id = pad_token_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_token_id).to(torch.int64)
        out = self.transformer(input_ids=input_ids, attention_mask=mask)
        if self.kind == "classifier":
            return out.logits if hasattr(out, "logits") else out[0]
        tokens = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "max":
            pooled = tokens.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(tokens.dtype).min).amax(1)
        else:
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled
