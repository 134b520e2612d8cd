"""A BERT encoder that computes real tokens only: the ``unpad`` technique's forward.

A batch of texts is padded to one length, and a padded position changes nothing a text encoder
returns: attention masks it out as a key and pooling masks it out. Yet the usual forward runs every
Linear, LayerNorm and GELU on every padded position too. ``packed_forward`` instead

1. drops the columns that are padding in every row (a batch padded to 128 tokens whose longest text
   has 48 computes 48 columns), then
2. packs the real tokens of the batch into one ``(tokens, hidden)`` matrix and runs the embeddings,
   the Q/K/V and output projections, the feed-forward block and the LayerNorms on it,
3. scatters Q, K and V back to ``(batch, heads, length, head size)`` only for the attention scores
   (padded keys masked as in the original), and gathers the attention output back to the packed rows,
4. pools from the packed rows (mean or max over each text's tokens, or its first token).

It is the same function as Hugging Face's BERT forward (positions are still the column index,
whatever side the batch is padded on), in the model's own dtype; ``unsupported`` says which models it
covers. This is what FasterTransformer's and TurboTransformers' "remove padding" and PyTorch's nested
tensors do for BERT; the gain is the padding fraction of the batch (none for a batch of equal lengths).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch import nn

# a TextEncoder (shrinkml.models.text) is recognised by its attributes: that module imports this one
_ENCODER_ATTRS = ("transformer", "kind", "pooling", "normalize", "pad_token_id")

_LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")


def _bert(encoder: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The BERT body of ``encoder``'s transformer and, for a classifier, the module holding its head."""
    transformer = encoder.transformer
    if encoder.kind == "classifier":
        return getattr(transformer, "bert", None), transformer
    return transformer, None


def unsupported(encoder: nn.Module) -> str | None:
    """None when ``packed_forward`` computes what ``encoder`` (a ``TextEncoder``) computes, else why not."""
    if not all(hasattr(encoder, a) for a in _ENCODER_ATTRS):
        return f"a {type(encoder).__name__}, not a Hugging Face text encoder (TextEncoder)"
    bert, head = _bert(encoder)
    if bert is None or not all(hasattr(bert, a) for a in ("embeddings", "encoder", "config")):
        return f"its transformer is a {type(encoder.transformer).__name__}, not a BERT model (BertModel and its kin)"
    config = bert.config
    model_type = getattr(config, "model_type", None)
    if model_type != "bert":
        return f"its transformer's model_type is {model_type!r}: only BERT-architecture encoders ('bert') are covered"
    if getattr(config, "position_embedding_type", "absolute") != "absolute" or getattr(config, "is_decoder", False):
        return "its BERT is a decoder or uses relative position embeddings"
    embeddings = bert.embeddings
    if not all(hasattr(embeddings, a) for a in ("word_embeddings", "position_embeddings", "token_type_embeddings",
                                                 "LayerNorm")):
        return "its embeddings lack word / position / token-type tables or their LayerNorm"
    for i, layer in enumerate(bert.encoder.layer):
        missing = [p for p in _LAYER_PARTS if not _has(layer, p)]
        if missing:
            return f"encoder layer {i} lacks {', '.join(missing)}"
        if int(getattr(layer.attention.self, "num_attention_heads", 0)) < 1:
            return f"encoder layer {i} has no attention heads left"
    if head is not None and not (hasattr(head, "classifier") and getattr(bert, "pooler", None) is not None):
        return "its classifier is not BERT's pooler + classifier head"
    return None


def _has(module: nn.Module, dotted: str) -> bool:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return True


def _bins(lengths: torch.Tensor, mask: torch.Tensor, width: int,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Where each packed token sits for attention: texts laid end to end in rows of ``cap`` slots
    (first fit, longest first), each row with a block-diagonal mask so that a token attends to its
    own text's tokens only. Fewer, longer rows than one row per text: PyTorch's CPU attention kernel
    costs about the same per (row, head) pair at these lengths (32 texts of 48 tokens take twice as
    long as 16 rows of 64). Returns (slot of each packed token, additive mask (rows, 1, cap, cap),
    rows, cap)."""
    cap = max(width, 64)
    n = lengths.tolist()
    order = sorted(range(len(n)), key=lambda i: -n[i])
    free: list[int] = []  # slots left in each row
    start = [0] * len(n)
    row_of = [0] * len(n)
    for i in order:
        for r, left in enumerate(free):
            if left >= n[i]:
                break
        else:
            r = len(free)
            free.append(cap)
        row_of[i], start[i] = r, cap - free[r]
        free[r] -= n[i]
    rows = max(len(free), 1)
    # packed tokens come row-major from the (batch, width) grid: text i's j-th real token -> its slot
    text = mask.nonzero()[:, 0]
    rank = torch.cumsum(mask.to(torch.long), 1)[mask] - 1  # j: the token's rank among its text's tokens
    base = torch.tensor([row_of[i] * cap + start[i] for i in range(len(n))], dtype=torch.long)
    slots = base[text] + rank
    segment = torch.full((rows * cap,), -1, dtype=torch.long)
    segment[slots] = text
    segment = segment.view(rows, cap)
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
    bias = torch.zeros(rows, 1, cap, cap, dtype=dtype).masked_fill(~same[:, None], torch.finfo(dtype).min)
    return slots, bias, rows, cap


def _qkv(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``cat([query(h), key(h), value(h)], 1)``; for ``Int8Linear`` projections one product on the
    three weights stacked and prepacked once (``shrinkml.nn.int8``)."""
    from shrinkml.nn.int8 import Int8Linear, stacked_linear

    parts = (attn.query, attn.key, attn.value)
    if h.dtype == torch.bfloat16 and all(isinstance(p, Int8Linear) for p in parts):
        out = stacked_linear(attn, parts, h)
        if out is not None:
            return out
    return torch.cat([p(h) for p in parts], 1)


def packed_forward(encoder: nn.Module, input_ids: torch.Tensor,
                   token_type_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """``encoder(input_ids)`` computed on the real tokens only, or None where that is not the same
    function for this batch (max pooling of a row without tokens; first-token pooling of a row whose
    first position is padding): the caller then runs the usual forward."""
    mask = input_ids != encoder.pad_token_id
    batch, _ = input_ids.shape
    lengths = mask.sum(1)
    if encoder.kind == "classifier" or encoder.pooling == "cls":
        if not bool(mask[:, 0].all()):
            return None
    elif encoder.pooling == "max" and not bool((lengths > 0).all()):
        return None
    columns = mask.any(0).nonzero()
    width = int(columns.max()) + 1 if columns.numel() else 1
    mask = mask[:, :width]
    flat = mask.reshape(-1).nonzero().squeeze(1)  # packed row -> position in the (batch x width) grid
    positions = flat % width
    bert, head = _bert(encoder)
    emb = bert.embeddings
    words = emb.word_embeddings(input_ids[:, :width].reshape(-1)[flat])
    if token_type_ids is None:
        types = emb.token_type_embeddings.weight[0]
    else:
        types = emb.token_type_embeddings(token_type_ids[:, :width].reshape(-1)[flat])
    h = emb.LayerNorm(words + types + emb.position_embeddings(positions))
    slots, bias, rows_, cap = _bins(lengths, mask, width, h.dtype)
    grid = None
    for layer in bert.encoder.layer:
        attn = layer.attention.self
        heads, size = int(attn.num_attention_heads), int(attn.attention_head_size)
        qkv = _qkv(attn, h)
        if grid is None or grid.shape[1] != qkv.shape[1]:
            grid = qkv.new_zeros(rows_ * cap, qkv.shape[1])
        grid[slots] = qkv  # empty slots stay zero (masked as keys, unused as queries)
        q, k, v = grid.view(rows_, cap, 3, heads, size).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=size**-0.5)
        context = context.transpose(1, 2).reshape(rows_ * cap, heads * size)[slots]
        out = layer.attention.output
        a = out.LayerNorm(out.dense(context) + h)
        h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)
    rows = flat // width
    if head is not None or encoder.pooling == "cls":
        first = torch.zeros(batch, dtype=torch.long).scatter_reduce_(
            0, rows, torch.arange(flat.numel()), "amin", include_self=False)
        tokens = h[first]
        if head is not None:  # BERT's pooler (first token, dense, tanh), then the classifier
            return head.classifier(bert.pooler.activation(bert.pooler.dense(tokens)))
        pooled = tokens
    elif encoder.pooling == "max":
        pooled = torch.full((batch, h.shape[1]), torch.finfo(h.dtype).min, dtype=h.dtype)
        pooled.scatter_reduce_(0, rows[:, None].expand_as(h), h, "amax", include_self=True)
    else:
        pooled = torch.zeros(batch, h.shape[1], dtype=torch.float32).index_add_(0, rows, h.float())  # float sums
        pooled = (pooled / lengths.clamp(min=1)[:, None]).to(h.dtype)
    return F.normalize(pooled, p=2, dim=1) if encoder.normalize else pooled
