"""Pinned bits: what "the same bits on any machine and version" means, written down.

Every other test compares a backend with the numpy reference, so a change to the reference
itself (the hash, the noise's layout, a table, the window sampler, a model's arithmetic) would
pass them all and silently change every run's results, and stop old checkpoints from
resuming where they would have gone. These values were taken once; a change that moves them
must be deliberate and say so in its commit.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from intes import intmath as im
from intes import noise as nz
from intes.data import sample_windows
from intes.engine import Engine, ModelConfig, TrainConfig, member_windows
from intes.es import ESConfig


def digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 (first 128 bits) of the arrays' names and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()[:32]


def test_noise_factors_and_vectors():
    a, b = nz.lowrank_factors(1234, 5, np.array([0, 7]), 3, 4, 3, 2)
    assert a.tolist() == [[[-22, -4], [-28, 23], [-27, -15], [-9, -7]],
                          [[2, 28], [-20, 20], [-16, 19], [-7, -31]]]
    assert b.tolist() == [[[1, -2], [-8, -20], [17, 4]], [[1, -14], [-19, 24], [-21, 17]]]
    assert nz.vector_noise(1234, 5, np.array([0, 7]), 9, 6).tolist() == [
        [-8, -1, -6, 8, 14, 20], [20, 10, 23, -7, -19, 39]]


def test_lookup_tables():
    tables = ("EXP2_TABLE", "LOG2_MANTISSA", "SIGMOID_TABLE", "WKV_EXP_TABLE", "RELU_SQ_TABLE")
    assert digest({name: getattr(im, name) for name in tables}) == (
        "2d5637bc2e10f8566ce7625c14547795")


def test_window_sampling():
    tokens = np.arange(1000, dtype=np.uint16) % 251
    assert sample_windows(tokens, 9, 4, 3, 5).tolist() == [
        [183, 184, 185, 186, 187, 188], [190, 191, 192, 193, 194, 195],
        [99, 100, 101, 102, 103, 104]]


@pytest.mark.parametrize("kind, weights, fitness", [
    ("rwkv", "e4a9febd3e9352b312820ae2cc17bc37",
     [-11412, -12105, -12021, -11416, -10334, -11418, -10735, -11773]),
    ("egg", "ec30d4ac984ff5113e945a614b2df4e1",
     [-10269, -10377, -11211, -11284, -9910, -9460, -9716, -8960]),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_three_es_steps(kind, weights, fitness, backend):
    """Initial weights, three steps' noise, forward, fitness and updates, at rank 2."""
    config = TrainConfig(model=ModelConfig(kind=kind, vocab_size=32, dim=16, layers=2),
                         es=ESConfig(population=8, rank=2, fitness="normalized"), seq_len=8,
                         seed=77)
    engine = Engine(config, backend)
    rng = np.random.default_rng(5)
    for _ in range(3):
        last = engine.step(member_windows(rng.integers(0, 32, (4, 9)), 2))
    assert last.tolist() == fitness
    assert digest(engine.params) == weights
