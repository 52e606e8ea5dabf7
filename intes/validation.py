"""Validation bits per byte: the windows of the valid split a model is scored on, beside a
unigram and a bigram model's figures on the same targets.

Scoring is the unperturbed forward's integer log-likelihood; only the conversion to bits per
byte, for reporting, is in floats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from intes.data import Corpus, eval_streams
from intes.engine import Engine
from intes.intmath import LL_FRAC_BITS
from intes.ngram import ngram_bits_per_byte

# The periodic validation sample: 131k tokens in windows spread over the valid split. On 21
# 10-minute runs' final weights it read within -0.003..+0.012 bpb of the whole split; 32 windows,
# the default until then, read 0.025-0.064 below it (benchmarks/results/pretrain_rescored_*.json).
EVAL_STREAMS, EVAL_LEN = 512, 256
FINAL_EVAL_TOKENS = 1 << 21  # the end of a run scores the whole valid split, up to this many
EVAL_CHUNK_ROWS = 1024  # windows per forward: a large vocabulary's logits stay small


def eval_shape(n_tokens: int, streams: int, length: int) -> tuple[int, int]:
    """The asked-for (streams, length) shrunk until it fits a valid split of n_tokens."""
    length = min(length, n_tokens - 1)
    return max(1, min(streams, n_tokens // (length + 1))), length


@dataclass(frozen=True)
class Validation:
    """Windows of the valid split a model is scored on, and what a unigram and a bigram model
    score on the same targets: the references a model's figure compares with, token for token.
    """

    windows: np.ndarray  # (streams, length + 1) int32
    unigram: float
    bigram: float

    @classmethod
    def of(cls, corpus: Corpus, streams: int, length: int) -> Validation:
        """``streams`` evenly spread windows of ``length`` scored tokens (shrunk to fit)."""
        streams, length = eval_shape(len(corpus.valid), streams, length)
        windows = eval_streams(corpus.valid, streams, length)
        return cls(windows, *ngram_bits_per_byte(corpus, windows))

    @classmethod
    def whole_split(cls, corpus: Corpus, length: int = EVAL_LEN) -> Validation:
        """Windows tiling the valid split (evenly spread, up to FINAL_EVAL_TOKENS tokens)."""
        return cls.of(corpus, max(1, FINAL_EVAL_TOKENS // length), length)

    @property
    def shape(self) -> tuple[int, int]:
        return self.windows.shape[0], self.windows.shape[1] - 1

    def describe(self) -> str:
        streams, length = self.shape
        return f"{streams:,} x {length:,} tokens"


TotalFn = Callable[[Engine, np.ndarray], int]


def log_likelihood_total(engine: Engine, windows: np.ndarray) -> int:
    """The summed integer log-likelihood of the targets of ``windows``, EVAL_CHUNK_ROWS windows
    at a time; an exact integer, so any split of the windows adds up to the same total."""
    return sum(int(engine.log_likelihood(windows[i:i + EVAL_CHUNK_ROWS]).astype(np.int64).sum())
               for i in range(0, len(windows), EVAL_CHUNK_ROWS))


def validation_bpb(engine: Engine, corpus: Corpus, windows: np.ndarray,
                   total: TotalFn | None = None) -> float:
    """Unperturbed bits per byte of the targets of valid ``windows`` (floats for reporting only).

    ``total`` replaces ``log_likelihood_total``: distributed workers each score a shard of the
    windows and add up the integers, so the figure is one process's whatever their number.
    The bytes are those the targets hold (``Corpus.target_bytes``), as for the n-gram
    reference figures.
    """
    ll = (total or log_likelihood_total)(engine, windows)
    return -ll / (1 << LL_FRAC_BITS) / corpus.target_bytes(windows[:, 1:])
