"""Unigram and bigram bits per byte: the figures a model's validation is read against, from
add-one smoothed counts of the train split, scored on the model's own next-token targets."""

from __future__ import annotations

import numpy as np

from intes.data import Corpus

DENSE_BIGRAM_MAX_VOCAB = 4096  # V^2 int64 counts = 128 MiB at this size; sparse above


def _pair_counts(train: np.ndarray, prev: np.ndarray, nxt: np.ndarray, vocab: int) -> np.ndarray:
    """How often each (prev, nxt) pair occurs in ``train``: dense bincount or sorted codes."""
    queries = prev * vocab + nxt
    if vocab <= DENSE_BIGRAM_MAX_VOCAB:  # codes < 2^24: int32 halves the memory traffic
        t = train.astype(np.int32)
        return np.bincount(t[:-1] * vocab + t[1:], minlength=vocab * vocab)[queries]
    t = train.astype(np.int64)
    uniq, counts = np.unique(t[:-1] * vocab + t[1:], return_counts=True)
    idx = np.minimum(np.searchsorted(uniq, queries), len(uniq) - 1)
    return np.where(uniq[idx] == queries, counts[idx], 0)


def ngram_bits_per_byte(corpus: Corpus, windows: np.ndarray | None = None) -> tuple[float, float]:
    """Unigram and bigram bits per byte under add-one smoothed train counts, of the valid
    split's next-token targets, or of the targets ``windows[:, 1:]`` (each after its window's
    previous token) when given: the same tokens a model evaluated on those windows scores, so
    the two compare token for token.

    Reporting only (floats). Bits are divided by the targets' bytes (``Corpus.target_bytes``),
    as the model's are. Large vocabularies use a sort-based sparse bigram count.
    """
    vocab, train = corpus.vocab_size, corpus.train
    if windows is None:
        valid = corpus.valid.astype(np.int64)
        prev, nxt = valid[:-1], valid[1:]
    else:
        w = np.asarray(windows, dtype=np.int64)
        prev, nxt = w[:, :-1].ravel(), w[:, 1:].ravel()
    uni = np.bincount(train, minlength=vocab)
    uni_bits = -(np.log2(uni[nxt] + 1.0) - np.log2(len(train) + vocab)).sum()
    ctx = uni.copy()
    ctx[train[-1]] -= 1  # contexts are train[:-1]
    pairs = _pair_counts(train, prev, nxt, vocab)
    bi_bits = -(np.log2(pairs + 1.0) - np.log2(ctx[prev] + float(vocab))).sum()
    n_bytes = corpus.target_bytes(nxt)
    return float(uni_bits / n_bytes), float(bi_bits / n_bytes)
