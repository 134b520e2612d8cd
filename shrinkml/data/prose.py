"""``builtin:prose``: real English sentences, read from the long descriptions (README text) that
installed Python packages carry in their metadata (``importlib.metadata``). No download.

``builtin:texts`` is generated from templates: fine as a smoke test, too easy as an evaluation set
(a quantizer that is poor on real text looks fine on it). These sentences are written by people
about software, with the vocabulary, punctuation and lengths of real prose.

Sentences are kept when they read as prose: 8 to 60 words, mostly letters, starting with a capital
and ending with a full stop, question or exclamation mark, with no markup, code, URL or table
syntax. They are de-duplicated and put in a fixed order (a hash of the sentence), so the set is
deterministic for a given set of installed packages; ``describe_prose`` says which packages and how
many sentences a run read (the report records it), because another environment reads others.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_MARKUP = re.compile(r"[`*_#<>|\[\]{}=\\~^@$]|https?:|www\.|\.\w{1,4}/|::|->|\(\)|\s{3,}|\.\.\.|\b[a-z]+_[a-z]+\b")
_MAX_CHARS_PER_PACKAGE = 400_000  # bound what one package's metadata contributes (and costs to scan)


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 8 <= len(words) <= 60 or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if _MARKUP.search(sentence):
        return False
    letters = sum(ch.isalpha() for ch in sentence)
    if letters < 0.75 * len(sentence.replace(" ", "")):
        return False
    # mostly lower-case words: rules out headings, lists of names and shouted text
    return sum(w[:1].islower() for w in words) >= 0.6 * len(words)


def _sentences(description: str) -> list[str]:
    text = description[:_MAX_CHARS_PER_PACKAGE]
    out = []
    for block in re.split(r"\n\s*\n", text):  # paragraphs; lines inside one are joined
        lines = [line.strip() for line in block.splitlines()]
        if any(line.startswith(("    ", "\t", ">>>", "$ ", "- ", "* ", "|", "```", "..")) for line in block.splitlines()):
            continue  # code, lists, tables, directives: not prose
        para = " ".join(line for line in lines if line)
        out.extend(s.strip() for s in _SPLIT.split(para))
    return [s for s in out if _is_prose(s)]


@lru_cache(maxsize=1)
def _collect() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from importlib.metadata import distributions

    seen: dict[str, None] = {}
    packages: dict[str, None] = {}
    for dist in distributions():
        meta = dist.metadata
        name = (meta.get("Name") or "").strip()
        if not name or name.lower() in {p.lower() for p in packages}:
            continue
        description = meta.get_payload() or meta.get("Description") or ""
        if not isinstance(description, str):
            continue
        found = _sentences(description)
        if found:
            packages[name] = None
        for sentence in found:
            seen.setdefault(sentence, None)
    ordered = sorted(seen, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return tuple(ordered), tuple(sorted(packages, key=str.lower))


def prose_sentences(n: int | None = None) -> list[str]:
    """Up to ``n`` (all when None) prose sentences from installed packages' descriptions, in a fixed
    order. Raises ``LookupError`` when the environment has too few (fewer than 100)."""
    sentences, _ = _collect()
    if len(sentences) < 100:
        raise LookupError(f"only {len(sentences)} prose sentences in the installed packages' descriptions")
    return list(sentences if n is None else sentences[:n])


def describe_prose() -> dict:
    """How many sentences from how many packages, and a digest of the set (for reports)."""
    sentences, packages = _collect()
    digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:16]
    return {"sentences": len(sentences), "packages": len(packages), "sha256_16": digest}
