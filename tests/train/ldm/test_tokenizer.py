"""The CLIP tokenizer built from a caption corpus: single-token words, unknown words, round trips."""
from __future__ import annotations

import json

import pytest

from brainldm.train.simulation import scenes
from brainldm.train.ldm.tokenizer import BOS, EOS, MAX_LENGTH, WORD_END, build_tokenizer, corpus_words, learn_merges


@pytest.fixture(scope="module")
def corpus():
    _, captions, _, _ = scenes.generate(60, 7, 16, 5)
    return [c for caps in captions for c in caps]


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer(corpus, folder)
    return folder


def test_every_corpus_word_is_one_token(corpus, saved):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(saved))
    words = corpus_words(corpus)
    assert "circle" in words and "background" in words
    for word in words:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, word
        assert tok.convert_ids_to_tokens(ids) == [word + WORD_END]


def test_special_tokens_and_padding(saved):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(saved))
    assert tok.bos_token == BOS and tok.eos_token == EOS and tok.pad_token == EOS
    assert tok.model_max_length == MAX_LENGTH
    ids = tok("", padding="max_length", max_length=MAX_LENGTH)["input_ids"]
    assert len(ids) == MAX_LENGTH
    assert ids[0] == tok.bos_token_id and set(ids[1:]) == {tok.eos_token_id}


def test_unknown_words_fall_back_to_pieces_and_round_trip(saved):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(saved))
    text = "a red zebra-xyz circle! über 42"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids[1:-1]  # every byte is in the alphabet: nothing is unknown
    pieces = tok.convert_ids_to_tokens(ids[1:-1])
    assert "zebra</w>" not in pieces and "z" in pieces  # unknown word split into characters
    assert tok.decode(ids, skip_special_tokens=True) == "a red zebra - xyz circle ! über 4 2"
    assert tok.decode(tok("a large blue ring at the top left")["input_ids"], skip_special_tokens=True) == (
        "a large blue ring at the top left"
    )


def test_clip_files_load_with_the_slow_layout(saved):
    from transformers import CLIPTokenizer

    vocab = json.loads((saved / "vocab.json").read_text(encoding="utf-8"))
    merges = (saved / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1
    assert len(vocab) == 512 + len(set(m.replace(" ", "") for m in merges[1:])) + 2
    again = CLIPTokenizer(vocab=str(saved / "vocab.json"), merges=str(saved / "merges.txt"))
    fast = CLIPTokenizer.from_pretrained(str(saved))
    text = "two shapes on teal: a small purple cross and qqq"
    assert again(text)["input_ids"] == fast(text)["input_ids"]


def test_later_merges_never_break_earlier_words():
    merges = learn_merges(["are", "bare", "bar", "ba"])
    ranks = {m: i for i, m in enumerate(merges)}
    from brainldm.train.ldm.tokenizer import _apply_bpe, _symbols, bytes_to_unicode

    for word in ("are", "bare", "bar", "ba"):
        assert _apply_bpe(_symbols(word, bytes_to_unicode()), ranks) == (word + WORD_END,)


def test_empty_corpus_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        build_tokenizer(["   ", ""])
