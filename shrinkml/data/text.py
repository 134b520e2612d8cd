"""Text data for text models: ``.txt`` (one text per line, blank lines skipped), ``.jsonl``
(``{"text": ..., "label": 3}`` per line, label optional) and ``builtin:texts``.

Texts are tokenized with the model's own tokenizer to a FIXED length (padded with the pad id,
truncated), so the rest of shrinkml sees one int64 array ``(n, max_length)`` like any other input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shrinkml.data.arrays import ArrayData
from shrinkml.errors import InputError, brief
from shrinkml.untrusted import decode_utf8, parse_json, read_bounded

DEFAULT_MAX_LENGTH = 128
TEXT_SUFFIXES = (".txt", ".jsonl")
MAX_TEXT_FILE_BYTES = 256 * 2**20  # far more text than calibration and evaluation use
MAX_LINE_CHARS = 1_000_000  # tokenizing keeps only the first --max-length tokens of a text anyway
_INT64 = range(-(2**63), 2**63)
# Universal newlines (\r\n, \r, \n), as editors count lines. Not str.splitlines(): it also splits
# at U+2028, U+0085 and others, which JSON allows unescaped inside strings.
_NEWLINE = re.compile(r"\r\n|\r|\n")


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
            row = parse_json(line)
        except ValueError as exc:  # malformed, too deeply nested, or a number too long to convert
            raise InputError(f"line {number} is not valid JSON ({getattr(exc, 'msg', exc)})", where=where,
                             expected='one JSON object per line, e.g. {"text": "...", "label": 1}',
                             fix="fix or remove that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InputError(f"line {number} has no string field 'text'", where=where,
                             expected='{"text": "...", "label": 1} (label optional)',
                             found=brief(line.strip()), fix="add the text under the key 'text'")
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise InputError(f"line {number} has a label that is not an integer", where=where,
                             found=brief(label), fix="use integer class ids for 'label'")
        if label is not None and label not in _INT64:
            raise InputError(f"line {number} has a label out of range", where=where,
                             expected="an integer class id in int64's range", found=brief(label),
                             fix="use integer class ids from 0 to the number of classes - 1")
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
    data = read_bounded(path, MAX_TEXT_FILE_BYTES, what="text file",
                        fix="use a sample of the texts: calibration and evaluation need thousands, not millions")
    lines = _NEWLINE.split(decode_utf8(data, where=str(path)))
    for number, line in enumerate(lines, start=1):
        if len(line) > MAX_LINE_CHARS:
            raise InputError(f"line {number} is too long", where=f"{path}:{number}",
                             expected=f"at most {MAX_LINE_CHARS:,} characters per text",
                             found=f"{len(line):,} characters",
                             fix="shorten or split the text: only its first --max-length tokens are used")
    return lines


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
    """Read ``spec`` (a ``.txt``/``.jsonl`` path, ``builtin:texts`` or ``builtin:prose``) and tokenize it."""
    if spec == "builtin:texts":
        from shrinkml.data.texts import generate_texts

        texts, labels = generate_texts(2000, seed=0), None  # fixed text set; the run seed only shuffles splits
    elif spec == "builtin:prose":
        from shrinkml.data.prose import prose_sentences

        try:
            texts, labels = prose_sentences(), None
        except LookupError as exc:
            raise InputError(
                "builtin:prose found too few sentences in this environment", where="--data builtin:prose",
                expected="at least 100 prose sentences in installed packages' descriptions", found=str(exc),
                fix="use builtin:texts, or give your own .txt / .jsonl texts",
            ) from None
    else:
        path = Path(spec)
        texts, labels = (read_txt(path), None) if path.suffix.lower() == ".txt" else read_jsonl(path)
    enc = _require(encoding, spec)
    return ArrayData(tokenize_texts(texts, enc), labels)
