"""A BERT-shaped text encoder in plain PyTorch, for tests and benchmarks (no transformers needed).

Same layout and op mix as BERT / MiniLM: word + position embeddings with LayerNorm, post-LayerNorm
encoder layers (self-attention with query/key/value/output Linears, then a GELU feed-forward
block), and mean pooling to one vector per sequence. Weights are random and seeded: the model is
for measuring size, speed and numerical fidelity, not for producing meaningful embeddings.

>>> model = bert_encoder(hidden=64, layers=2, heads=4, vocab=100, intermediate=128)
>>> model(torch.zeros(2, 16, dtype=torch.long)).shape
torch.Size([2, 64])
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_positions: int) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_positions, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(max_positions).unsqueeze(0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : ids.shape[1]]
        return self.norm(self.word(ids) + self.position(positions))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (b, s, h*d) -> (b, h, s, d)
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        context = torch.matmul(scores.softmax(dim=-1), v)
        b, _, s, _ = context.shape
        return self.output(context.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()
        self.output = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.act(self.intermediate(x)))


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.attn = SelfAttention(hidden, heads)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn = FeedForward(hidden, intermediate)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x))
        return self.ffn_norm(x + self.ffn(x))


class Encoder(nn.Module):
    def __init__(self, hidden: int, layers: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(hidden, heads, intermediate) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class BertEncoder(nn.Module):
    """Token ids ``(batch, seq)`` (int64) -> mean-pooled embeddings ``(batch, hidden)``."""

    def __init__(self, hidden: int, layers: int, heads: int, vocab: int, intermediate: int,
                 max_positions: int = 512) -> None:
        super().__init__()
        self.embeddings = Embeddings(vocab, hidden, max_positions)
        self.encoder = Encoder(hidden, layers, heads, intermediate)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(ids)).mean(dim=1)


def _init_like_bert(model: nn.Module) -> None:
    # BERT's initializer, N(0, 0.02) weights; biases and LayerNorm parameters are perturbed
    # instead of zero/one (as after training) so that every parameter shows up in export checks.
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.bias, 0.0, 0.02)
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, 1.0, 0.05)
            nn.init.normal_(module.bias, 0.0, 0.02)


def bert_encoder(hidden: int = 384, layers: int = 6, heads: int = 12, vocab: int = 30522,
                 intermediate: int = 1536, seed: int = 0) -> BertEncoder:
    """A seeded BERT-shaped encoder in eval mode; defaults are MiniLM-L6's shape (all-MiniLM-L6-v2).

    >>> bert_encoder().embeddings.word.weight.shape
    torch.Size([30522, 384])
    """
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = BertEncoder(hidden, layers, heads, vocab, intermediate)
        _init_like_bert(model)
    finally:
        torch.random.set_rng_state(generator_state)  # leave the caller's global RNG as it was
    return model.eval()
