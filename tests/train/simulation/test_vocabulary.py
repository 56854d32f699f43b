"""sim-things' captions are written in the small LDM's vocabulary: every word is one token of
the versioned tokenizer, so its text encoder embeds words it was trained on (issue #20)."""
from __future__ import annotations

import itertools

import pytest
from transformers import CLIPTokenizer

from brainldm.train.data import things
from brainldm.train.ldm.tokenizer import corpus_words
from brainldm.train.simulation import formats, scenes
from tests.dvc_store import materialize


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    model = materialize("train_ldm", "models/ldm", tmp_path_factory.mktemp("ldm"))
    return CLIPTokenizer.from_pretrained(model / "tokenizer")


def test_every_simulated_things_caption_word_is_one_token(tokenizer, tmp_path):
    concepts = [f"{c}_{k}" for c, k in itertools.product(scenes.COLOURS, scenes.SHAPE_KINDS)]
    formats.things_concepts(concepts).to_csv(tmp_path / things.CONCEPTS, sep="\t", index=False)
    captions = [caps[0] for caps in things.load_captions(tmp_path, concepts)]
    words = corpus_words(captions)
    assert {"simple", "drawn", "red", "diamond", ":"} <= set(words)
    pieces = {w: tokenizer.tokenize(w) for w in words}
    assert {w: p for w, p in pieces.items() if len(p) != 1} == {}


def test_a_word_outside_the_vocabulary_splits(tokenizer):
    # The check above can fail: the WordNet-style definitions used before split like this.
    for word in ("coloured", "rhombus", "everywhere"):
        assert len(tokenizer.tokenize(word)) > 1
