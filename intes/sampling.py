"""Text generation from an integer model: greedy or integer-only sampling, reproducible by seed.

Sampling stays integer like everything else: a token's weight is EXP2_TABLE[max - logit]
(2^16 * 2^(-d/16), the same table the log-likelihood uses), and a hashed uint32 u picks the
first token whose cumulative weight exceeds (u * total) >> 32. The draw at each position is a
pure function of (seed, position), so the same seed gives the same text on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from intes.engine import Engine
from intes.intmath import EXP2_TABLE
from intes.noise import hash_u32, stream_key
from intes.tokenizer import SEPARATOR

SAMPLE_TENSOR_ID = 0x5A3B  # keeps sampling draws apart from every weight's and window's stream


def token_weights(logits: np.ndarray, temperature_shift: int = 0) -> np.ndarray:
    """int64 weights of one row of int8 logits at temperature 2^temperature_shift.

    d = max - logit is in [0, 254]; a positive shift divides d (flatter), a negative one
    multiplies it (sharper), and a d beyond the table's range has weight 0.
    """
    d = int(logits.max()) - logits.astype(np.int64)
    d = d >> temperature_shift if temperature_shift >= 0 else d << -temperature_shift
    inside = d < len(EXP2_TABLE)
    return np.where(inside, EXP2_TABLE[np.minimum(d, len(EXP2_TABLE) - 1)], 0).astype(np.int64)


def draw(weights: np.ndarray, seed: int, position: int) -> int:
    """Index drawn with probability weight / total from the hash of (seed, position)."""
    key = stream_key(seed, position, np.zeros(1, dtype=np.int64), SAMPLE_TENSOR_ID)
    u = int(hash_u32(key, 1)[0, 0])
    cumulative = np.cumsum(weights)
    target = (u * int(cumulative[-1])) >> 32  # Python ints: u * total may pass 2^63
    return int(np.searchsorted(cumulative, target, side="right"))


def generate(engine: Engine, prompt_tokens: np.ndarray | list[int], n_tokens: int,
             greedy: bool = False, seed: int = 0, temperature_shift: int = 0) -> np.ndarray:
    """The ``n_tokens`` that follow ``prompt_tokens`` (int32), unperturbed weights."""
    return np.fromiter(stream(engine, prompt_tokens, n_tokens, greedy, seed, temperature_shift),
                       dtype=np.int32, count=n_tokens)


def stream(engine: Engine, prompt_tokens: np.ndarray | list[int], n_tokens: int,
           greedy: bool = False, seed: int = 0, temperature_shift: int = 0) -> Iterator[int]:
    """``generate``'s tokens one at a time, as they are made (``intes sample`` prints them so).

    The model first reads a separator (every training document starts with one), then the
    prompt; a generated separator resets the state, as it does in training.
    """
    model, ops = engine.model, engine.inference_ops()
    state = model.init_state(1)
    seq = [SEPARATOR, *(int(t) for t in prompt_tokens)]
    start = len(seq)

    def feed(token: int) -> np.ndarray:
        nonlocal state
        if token == SEPARATOR:
            state = model.init_state(1)
        logits, state = model.forward(ops, np.array([token], dtype=np.int32), state)
        return logits[0]

    for token in seq:
        row = feed(token)
    for position in range(start, start + n_tokens):
        token = (int(np.argmax(row)) if greedy
                 else draw(token_weights(row, temperature_shift), seed, position))
        yield token
        if position + 1 < start + n_tokens:
            row = feed(token)
