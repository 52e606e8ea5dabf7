"""Tokenizers: encode and decode round-trip for bytes and a trained BPE; decode never raises."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intes.errors import DataError
from intes.tokenizer import SEPARATOR, _token_dtype, decode, encode, resolve_tokenizer

CODE = [f"def f{i}(x):\n    return x * {i} + 'é✓'\n".encode() for i in range(100)]
BPE = resolve_tokenizer("bpe:300", CODE)  # trained once, in a few milliseconds


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_bytes_encode_decode_round_trip(text):
    tokens = encode(text, "bytes")
    assert tokens.dtype == np.uint8 and decode(tokens, "bytes") == text


def test_decode_never_raises():
    assert decode(np.array([0xC3, 0x28, 300, -1]), "bytes") == "\ufffd(\ufffd\ufffd"


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_bpe_encode_decode_round_trip(text):
    """Any text, "<sep>" included, comes back from a trained BPE, and never as a separator."""
    tokens = encode(text + "<sep>", BPE)
    assert SEPARATOR not in tokens and decode(tokens, BPE) == text + "<sep>"


@pytest.mark.parametrize(
    ("vocab", "dtype"),
    [(2, np.uint8), (256, np.uint8), (257, np.uint16), (1 << 16, np.uint16),
     ((1 << 16) + 1, np.int32)],
)
def test_token_dtype_holds_every_id(vocab, dtype):
    """The smallest dtype whose range holds ids 0..vocab-1 (the models take fewer than 2^15,
    so int32 is never met in practice)."""
    assert _token_dtype(vocab) == np.dtype(dtype)
    assert np.iinfo(dtype).max >= vocab - 1


def _renumbered(edit) -> str:
    spec = json.loads(BPE)
    edit(spec["model"]["vocab"])
    return json.dumps(spec)


def _last(vocab: dict) -> str:
    return max(vocab, key=vocab.get)


@pytest.mark.parametrize(
    "edit",
    [
        lambda v: v.update({_last(v): 5000}),
        lambda v: v.update({_last(v): 70000}),  # past uint16: was an OverflowError traceback
        lambda v: v.update({_last(v): 1}),  # two tokens share an id
    ],
    ids=["gap", "gap-past-uint16", "duplicate"],
)
def test_tokenizer_ids_must_be_dense(edit):
    """A model has one output per id 0..vocab-1: ids with gaps would index past it."""
    with pytest.raises(DataError, match="tokenizer ids must be exactly 0..") as info:
        resolve_tokenizer(_renumbered(edit), [])
    assert "\n" not in str(info.value)
