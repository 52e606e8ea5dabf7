"""Byte tokens: encode and decode round-trip, and decode never raises."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from intes.tokenizer import decode, encode


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_bytes_encode_decode_round_trip(text):
    tokens = encode(text, "bytes")
    assert tokens.dtype == np.uint8 and decode(tokens, "bytes") == text


def test_decode_never_raises():
    assert decode(np.array([0xC3, 0x28, 300, -1]), "bytes") == "\ufffd(\ufffd\ufffd"
