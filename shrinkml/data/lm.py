"""Text for causal language models: fixed-length token windows over held-out text.

The texts (``.txt`` lines, ``.jsonl`` ``"text"`` fields, ``builtin:prose``) are divided into the
calibration / fine-tune / validation / test splits FIRST, by text, with the run's seed; only then is
each split joined into one stream, tokenized once, and cut into windows of ``context`` tokens that
advance by ``stride``. Overlapping windows therefore never carry test text into calibration. No
causal-LM step fine-tunes in this version, so the fine-tune share of the texts calibrates: the
calibration windows read the calibration and fine-tune texts, and the fine-tune split is empty.

Each window is one example: ``x`` holds its ``context`` token ids, ``y`` the position of its first
scored target (the sliding-window perplexity of Hugging Face's guide: the first window scores every
token after the first, each later window only the tokens the previous window did not reach, with
the rest as context). The last window ends at the stream's end, so every window is full length and
no token is scored twice.

>>> windows(list(range(10)), context=4, stride=2)  # doctest: +NORMALIZE_WHITESPACE
(array([[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]), array([1, 2, 2, 2]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shrinkml.data.arrays import ArrayData, SplitFractions, Splits, make_splits
from shrinkml.errors import InputError

DEFAULT_CONTEXT = 512
MIN_CONTEXT = 8
TEXT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class LMEncoding:
    """How text becomes windows: the model's tokenizer, the window length and its advance."""

    tokenizer: Any
    context: int = DEFAULT_CONTEXT
    stride: int | None = None  # None: half the context

    def step(self) -> int:
        return self.stride or max(1, self.context // 2)


def windows(ids: list[int] | np.ndarray, *, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, first)``: windows ``(n, context)`` over ``ids`` and each one's first scored position."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    if n < context:
        return np.zeros((0, context), np.int64), np.zeros(0, np.int64)
    starts = list(range(0, max(n - context, 0) + 1, stride))
    if starts[-1] + context < n:
        starts.append(n - context)  # the tail: a last window ending at the stream's end
    x = np.stack([ids[s : s + context] for s in starts])
    first = np.empty(len(starts), np.int64)
    first[0] = 1
    reached = starts[0] + context  # tokens before this index are scored already
    for i, s in enumerate(starts[1:], start=1):
        first[i] = reached - s
        reached = s + context
    return x, first


def scored_tokens(first: np.ndarray, context: int) -> int:
    """How many target tokens the windows score in all."""
    return int((context - np.asarray(first)).sum())


def _tokenize_stream(tokenizer, texts: list[str]) -> list[int]:
    ids = tokenizer(TEXT_SEPARATOR.join(texts), add_special_tokens=True, return_attention_mask=False)["input_ids"]
    return list(ids)


def lm_splits(texts: list[str], encoding: LMEncoding, *, seed: int, fractions: SplitFractions | None,
              source: str) -> Splits:
    """Split ``texts`` by text, then window each split (see the module docstring)."""
    context, stride = int(encoding.context), encoding.step()
    if context < MIN_CONTEXT or not 1 <= stride <= context - 1:
        raise InputError(
            "the window settings cannot score text", where="--max-length (the context of a causal LM)",
            expected=f"a context of at least {MIN_CONTEXT} tokens and a stride from 1 to context - 1",
            found=f"context {context}, stride {stride}", fix="pass --max-length 512 (the default) or another context",
        )
    order = np.arange(len(texts))
    cut = make_splits(ArrayData(order[:, None]), seed=seed, fractions=fractions, source=source)
    parts = {}
    named = dict(cut.named())
    tune = named.pop("fine-tune", None)
    if tune is not None and len(tune):  # no causal-LM step fine-tunes: its texts calibrate
        named["calibration"] = ArrayData(np.concatenate([named["calibration"].x, tune.x]))
    named["fine-tune"] = ArrayData(np.zeros((0, 1), dtype=np.int64))
    for name, part in named.items():
        chosen = sorted(int(i) for i in part.x[:, 0])  # the texts in their own order: a stream reads on
        ids = _tokenize_stream(encoding.tokenizer, [texts[i] for i in chosen]) if chosen else []
        x, first = windows(ids, context=context, stride=stride)
        parts[name] = ArrayData(x, first)
    if len(parts["test"]) < 2:
        raise InputError(
            "the test split's text is too short for two windows", where=source,
            expected=f"at least {2 * context:,} tokens of test text ({context}-token windows)",
            found=f"{len(parts['test'])} window(s)",
            fix="give more text, or a shorter context with --max-length",
        )
    return Splits(parts["calibration"], parts["fine-tune"], parts["test"], source=source, seed=seed,
                  validation=parts.get("validation"))


def read_texts(spec: str) -> list[str]:
    """The texts of ``spec``: a ``.txt`` (a text per line), ``.jsonl`` (``text`` fields) or
    ``builtin:prose``."""
    from pathlib import Path

    from shrinkml.data.text import read_jsonl, read_txt

    if spec == "builtin:prose":
        from shrinkml.data.prose import prose_sentences

        try:
            return prose_sentences()
        except LookupError as exc:
            raise InputError("builtin:prose found too few sentences in this environment", where="--data builtin:prose",
                             found=str(exc), fix="give your own .txt / .jsonl texts") from None
    path = Path(spec)
    if path.suffix.lower() == ".txt":
        return read_txt(path)
    if path.suffix.lower() == ".jsonl":
        return read_jsonl(path)[0]
    raise InputError("a causal language model reads text", where=f"--data {spec}",
                     expected="a .txt file (a text per line), a .jsonl file with 'text' fields, or builtin:prose",
                     fix="pass the held-out text as one of those")
