"""Unigram and bigram reference figures: hand counts, dense against sparse, windows."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import intes.ngram as ngram
from intes.data import Corpus, eval_streams, load_corpus
from intes.intmath import LL_FRAC_BITS
from intes.ngram import ngram_bits_per_byte
from intes.validation import validation_bpb

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + 'é✓'\n\n" for i in range(200))


def test_sparse_bigram_matches_dense(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text(TEXT, encoding="utf-8")
    corpus = load_corpus(path)
    dense = ngram_bits_per_byte(corpus)
    monkeypatch.setattr(ngram, "DENSE_BIGRAM_MAX_VOCAB", 0)
    assert ngram_bits_per_byte(corpus) == pytest.approx(dense, rel=1e-12)


@pytest.mark.parametrize(("valid_bytes", "target_bytes"), [(2, 2), (5, 2 * 5 / 3)])
def test_ngram_matches_hand_count(valid_bytes, target_bytes):
    """Bits over the targets' own bytes (one per byte token); where the splits' bytes do not
    add up from the tokens', over valid's mean bytes per token for each target."""
    corpus = Corpus(
        train=np.array([0, 1, 1, 2], np.uint8),
        valid=np.array([0, 1, 2], np.uint8),
        vocab_size=3,
        train_bytes=3,
        valid_bytes=valid_bytes,
        tokenizer="bytes",
        source="hand",
    )
    # targets 1, 2; unigram counts (1, 2, 1) + 1 over 4 + 3; bigram 0->1: (1+1)/(1+3), 1->2: 2/5
    unigram = -(math.log2(3 / 7) + math.log2(2 / 7)) / target_bytes
    bigram = -(math.log2(2 / 4) + math.log2(2 / 5)) / target_bytes
    assert ngram_bits_per_byte(corpus) == pytest.approx((unigram, bigram))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_ngram_figures_of_windows_are_those_of_their_targets(data):
    """Windows score exactly their own (previous, target) pairs, counted here one by one: a
    model scored on the same windows compares token for token. One window spanning the valid
    split is the split's own figure."""
    vocab = data.draw(st.integers(2, 6))
    tokens = st.lists(st.integers(0, vocab - 1), min_size=12, max_size=60)
    train, valid = (np.array(data.draw(tokens), np.uint8) for _ in range(2))
    corpus = Corpus(train=train, valid=valid, vocab_size=vocab, train_bytes=2 * len(train),
                    valid_bytes=3 * len(valid), tokenizer="bytes", source="drawn")
    whole = eval_streams(valid, 1, len(valid) - 1)
    assert ngram_bits_per_byte(corpus, whole) == pytest.approx(ngram_bits_per_byte(corpus))

    length = data.draw(st.integers(1, len(valid) // 4))
    windows = eval_streams(valid, data.draw(st.integers(1, len(valid) // (length + 1))), length)
    windows = windows[data.draw(st.permutations(range(len(windows))))]
    t = [int(v) for v in train]
    unigram = bigram = 0.0
    for w in windows:
        for prev, target in zip(w[:-1], w[1:], strict=True):
            unigram -= math.log2((t.count(target) + 1) / (len(t) + vocab))
            pairs = sum(1 for a, b in zip(t[:-1], t[1:], strict=True) if (a, b) == (prev, target))
            bigram -= math.log2((pairs + 1) / (t[:-1].count(prev) + vocab))
    per_byte = windows[:, 1:].size * 3
    assert ngram_bits_per_byte(corpus, windows) == pytest.approx((unigram / per_byte,
                                                                  bigram / per_byte))


def test_a_sample_is_scored_over_its_own_bytes():
    """A window of one long document holds more bytes per token than the valid split, whose
    short documents make every other token a separator: the model's and the n-gram figures
    divide by the window's 4 bytes, not by 4 tokens at the split's mean of 7/11."""
    corpus = Corpus(train=np.array([0, 1, 1, 0, 1], np.uint8),
                    valid=np.array([0, 1, 1, 1, 1, 0, 1, 0, 1, 0, 1], np.uint8), vocab_size=2,
                    train_bytes=3, valid_bytes=7, tokenizer="bytes", source="hand")
    windows = np.array([[0, 1, 1, 1, 1]])
    total = lambda engine, w: -(8 << LL_FRAC_BITS)  # noqa: E731 (8 bits in all)
    assert validation_bpb(None, corpus, windows, total=total) == 8 / 4
    unigram = -4 * math.log2((3 + 1) / (5 + 2)) / 4
    assert ngram_bits_per_byte(corpus, windows)[0] == pytest.approx(unigram)
