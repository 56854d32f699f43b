"""A CLIP BPE tokenizer built from a caption corpus.

The vocabulary follows CLIP's format exactly (byte-level alphabet, ``</w>`` word
ends, ``<|startoftext|>`` / ``<|endoftext|>``), so ``transformers.CLIPTokenizer``
loads it like SD v1.x's. Merges are learned so that every corpus word is one token;
any other word still tokenizes into sub-word or single-byte pieces, because the
whole 256-symbol byte alphabet (bare and with ``</w>``) is in the vocabulary.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import regex

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
WORD_END = "</w>"
MAX_LENGTH = 77  # SD v1.x's CLIP context length
# CLIP's own pre-tokenizer pattern (openai/CLIP simple_tokenizer.py).
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def corpus_words(texts: Iterable[str]) -> list[str]:
    """Sorted unique pre-tokenized words (lower case, CLIP's split) of ``texts``."""
    words = set()
    for text in texts:
        words.update(w for w in CLIP_PATTERN.findall(" ".join(text.lower().split())) if w not in (BOS, EOS))
    return sorted(words)


def _symbols(word: str, byte_map: dict[int, str]) -> tuple[str, ...]:
    chars = [byte_map[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + WORD_END,)


def _apply_bpe(symbols: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's BPE: repeatedly merge every occurrence of the lowest-ranked pair."""
    word = list(symbols)
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word, word[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return tuple(word)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges that turn each word into a single token.

    Each new merge joins the first two pieces left by the current merges and gets the
    lowest priority, so it only fires once nothing else applies: words already made
    single tokens are never changed by later merges.
    """
    byte_map = bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _apply_bpe(_symbols(word, byte_map), ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = _apply_bpe(pieces, ranks)
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP vocabulary order: bytes, bytes + ``</w>``, merge results, then the specials."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + WORD_END for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def build_tokenizer(texts: Iterable[str], folder: str | Path | None = None):
    """Build a ``transformers.CLIPTokenizer`` whose vocabulary covers ``texts``.

    Args:
        texts: caption strings (the corpus).
        folder: where to ``save_pretrained`` it (optional).
    Returns:
        the tokenizer (model_max_length 77, pad = ``<|endoftext|>`` as in SD v1.x).
    Raises:
        ValueError: empty corpus, or a corpus word that does not encode to one token.
    """
    from transformers import CLIPTokenizer

    words = corpus_words(texts)
    if not words:
        raise ValueError("build_tokenizer: the caption corpus is empty (expected at least one word)")
    merges = learn_merges(words)
    tokenizer = CLIPTokenizer(vocab=build_vocab(merges), merges=merges, model_max_length=MAX_LENGTH)
    _check_single_tokens(tokenizer, words)
    if folder is not None:
        save_tokenizer(tokenizer, folder)
    return tokenizer


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """``save_pretrained`` plus CLIP's own ``vocab.json`` / ``merges.txt`` (transformers 5
    writes only ``tokenizer.json``; the CLIP files keep older readers working)."""
    tokenizer.save_pretrained(str(folder))
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    write_vocab_files(folder, merges)


def write_vocab_files(folder: str | Path, merges: list[tuple[str, str]]) -> None:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` (``#version: 0.2`` header) into ``folder``."""
    folder = Path(folder)
    vocab = build_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def _check_single_tokens(tokenizer, words: list[str]) -> None:
    multi = [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) != 1]
    if multi:
        raise ValueError(f"build_tokenizer: corpus words not encoded as one token: {multi[:10]}")
