"""Text data for text models: ``.txt`` (one text per line, blank lines skipped), ``.jsonl``
(``{"text": ..., "label": 3}`` per line, label optional) and ``builtin:texts``.

Texts are tokenized with the model's own tokenizer to a FIXED length (padded with the pad id,
truncated), so the rest of shrinkml sees one int64 array ``(n, max_length)`` like any other input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shrinkml.data.arrays import ArrayData
from shrinkml.errors import InputError

DEFAULT_MAX_LENGTH = 128
TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class TextEncoding:
    """How texts become token ids: the model's tokenizer and the fixed sequence length."""

    tokenizer: Any
    max_length: int = DEFAULT_MAX_LENGTH


def read_txt(path: Path) -> list[str]:
    lines = _read_lines(path)
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise InputError("the text file has no texts", where=str(path), expected="one text per line",
                         fix="add texts, one per line")
    return texts


def read_jsonl(path: Path) -> tuple[list[str], np.ndarray | None]:
    texts: list[str] = []
    labels: list[int | None] = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"line {number} is not valid JSON ({exc.msg})", where=where,
                             expected='one JSON object per line, e.g. {"text": "...", "label": 1}',
                             fix="fix or remove that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InputError(f"line {number} has no string field 'text'", where=where,
                             expected='{"text": "...", "label": 1} (label optional)',
                             found=line.strip()[:80], fix="add the text under the key 'text'")
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise InputError(f"line {number} has a label that is not an integer", where=where,
                             found=repr(label), fix="use integer class ids for 'label'")
        texts.append(row["text"])
        labels.append(label)
    if not texts:
        raise InputError("the JSONL file has no texts", where=str(path), fix="add one JSON object per line")
    has = [lab is not None for lab in labels]
    if any(has) and not all(has):
        missing = has.index(False) + 1
        raise InputError("some lines have a label and some do not", where=str(path),
                         found=f"text number {missing} has no label", fix="label every line, or none")
    return texts, (np.asarray(labels, dtype=np.int64) if all(has) else None)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError("data file not found", where=str(path), fix="check the path given to --data")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})", where=str(path),
                         fix="save it as UTF-8") from None


def _require(encoding: TextEncoding | None, where: str) -> TextEncoding:
    if encoding is None:
        raise InputError(
            "text data needs a text model to tokenize it",
            where=where,
            expected="--model pointing at a transformers or sentence-transformers directory",
            fix="pass a model directory, or give token ids as an .npz",
        )
    return encoding


def tokenize_texts(texts: list[str], encoding: TextEncoding) -> np.ndarray:
    from shrinkml.models.hf import tokenize

    return tokenize(encoding.tokenizer, texts, encoding.max_length)


def load_text_data(spec: str, encoding: TextEncoding | None, *, seed: int = 0) -> ArrayData:
    """Read ``spec`` (a ``.txt``/``.jsonl`` path or ``builtin:texts``) and tokenize it."""
    if spec == "builtin:texts":
        from shrinkml.data.texts import generate_texts

        texts, labels = generate_texts(2000, seed=0), None  # fixed text set; the run seed only shuffles splits
    else:
        path = Path(spec)
        texts, labels = (read_txt(path), None) if path.suffix.lower() == ".txt" else read_jsonl(path)
    enc = _require(encoding, spec)
    return ArrayData(tokenize_texts(texts, enc), labels)
