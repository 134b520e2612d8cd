"""``perplexity``: a causal language model on held-out text, in fixed windows (``shrinkml.data.lm``).

Per window the task keeps the sum of the targets' negative log-likelihoods and how many targets it
scored; perplexity is ``exp(sum NLL / sum tokens)`` over the split, and its 95% CI bootstraps
whole windows (tokens inside a window are not independent). Against the original model, on the
same windows, it keeps what LLM users compare:

* ``kl_divergence``: mean over scored tokens of KL(original || compressed) of the next-token
  distributions, computed exactly over the whole vocabulary while both models' logits are in hand
  (nothing of the vocabulary-sized distributions is stored);
* ``top1_agreement``: the fraction of scored tokens where both models' most likely next token is
  the same.

The budget reads perplexity: ``--max-drop 0.03 --drop-type relative`` allows a 3% increase, met
when the upper end of the paired 95% CI of ``ppl_compressed / ppl_original - 1`` is within it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shrinkml.data import Splits
from shrinkml.errors import InputError
from shrinkml.tasks.base import Task

METRICS = ("perplexity", "kl_divergence", "top1_agreement")


_POSITIONS = 64  # positions whose vocabulary-wide temporaries exist at once (bounds the memory of scoring)


def window_statistics(logits, ids, first, reference_logits=None) -> dict[str, np.ndarray]:
    """Per-window sums for a batch: ``nll`` (sum of target NLLs), ``tokens`` (targets scored), and
    with ``reference_logits``: ``kl`` (sum of per-token KL(reference || logits)) and ``top1`` (count
    of tokens whose argmax agrees). ``logits``: torch ``(B, T, V)``; ``ids``: ``(B, T)`` token ids;
    ``first``: ``(B,)`` first scored target position of each window (position ``t`` predicts
    ``ids[t]`` from ``logits[t - 1]``). The vocabulary-wide log-softmaxes are taken a few dozen
    positions at a time, so scoring needs little beyond the logits themselves."""
    import torch

    logits = torch.as_tensor(logits)
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    b, t, _ = logits.shape
    first = torch.as_tensor(np.asarray(first), dtype=torch.long)
    reference = None if reference_logits is None else torch.as_tensor(reference_logits)
    sums = {key: torch.zeros(b, dtype=torch.float64) for key in ("nll", "tokens", *(("kl", "top1") if reference is not None else ()))}
    for start in range(0, t - 1, _POSITIONS):
        stop = min(start + _POSITIONS, t - 1)  # logits of positions start..stop-1 predict targets start+1..stop
        positions = torch.arange(start + 1, stop + 1).unsqueeze(0)
        mask = positions >= first.unsqueeze(1)  # (B, chunk)
        logp = torch.log_softmax(logits[:, start:stop].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, start + 1 : stop + 1].unsqueeze(-1)).squeeze(-1)
        sums["nll"] += (nll * mask).sum(1).double()
        sums["tokens"] += mask.sum(1).double()
        if reference is not None:
            ref = torch.log_softmax(reference[:, start:stop].float(), dim=-1)
            kl = (ref.exp() * (ref - logp)).sum(-1).clamp(min=0.0)  # exact, over the whole vocabulary
            agree = (ref.argmax(-1) == logp.argmax(-1)).float()
            sums["kl"] += (kl * mask).sum(1).double()
            sums["top1"] += (agree * mask).sum(1).double()
            del ref, kl
        del logp
    return {key: value.numpy() for key, value in sums.items()}


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> float:
    return float(np.sum(num) / max(float(np.sum(den)), 1.0))


class Perplexity(Task):
    name = "perplexity"
    needs_labels = False
    causal_lm = True
    description = "causal language models: perplexity on held-out text, KL and top-1 agreement with the original"

    def primary_metric(self, outputs_shape: tuple[int, ...]) -> str:
        return "perplexity"

    def scores(self, outputs: np.ndarray, data, reference: np.ndarray) -> dict[str, np.ndarray]:
        """Per window, from logits ``(windows, T, V)`` in hand: mean target NLL, mean KL against
        ``reference``'s logits and top-1 agreement (``data.x``: the windows, ``data.y``: each one's
        first scored position). Runs keep the vocabulary-sized logits of a batch only:
        ``shrinkml.measure.lm.score_windows`` calls :func:`window_statistics` batch by batch."""
        stats = window_statistics(outputs, data.x, data.y, reference)
        tokens = np.maximum(stats["tokens"], 1.0)
        return {"nll_per_token": stats["nll"] / tokens, "kl_divergence": stats["kl"] / tokens,
                "top1_agreement": stats["top1"] / tokens}

    def check_model(self, loaded: Any, splits: Splits) -> None:
        if getattr(loaded, "lm", None) is None:
            raise InputError(
                "--task perplexity measures a causal language model, and this is not one",
                where=loaded.source,
                expected="a Hugging Face causal-LM directory (config.json naming a *ForCausalLM) or a .gguf file",
                found=f"a {loaded.kind} model" + (" (a text encoder)" if getattr(loaded, "text", None) else ""),
                fix="use --task embedding, classification or fidelity for this model",
            )

    def check_outputs(self, splits: Splits, outputs: np.ndarray, where: str) -> None:
        from shrinkml.tasks.base import _check_finite

        _check_finite(splits, np.asarray(outputs), where)


TASK = Perplexity()
