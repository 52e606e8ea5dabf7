"""Tokenizers: encode and decode round-trip for bytes and a trained BPE; decode never raises."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from intes.tokenizer import SEPARATOR, decode, encode, resolve_tokenizer

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
