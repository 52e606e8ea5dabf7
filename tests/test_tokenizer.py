"""Tokenizers: encode and decode round-trip for bytes and a trained BPE; decode never raises."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intes.errors import DataError
from intes.tokenizer import (
    SEPARATOR,
    _token_dtype,
    decode,
    encode,
    resolve_tokenizer,
    tokenize,
    vocab_size,
)

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


def _custom(**changes) -> str:
    """The trained BPE with a normalizer, post-processor, truncation or padding added."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(BPE)
    if "normalizer" in changes:
        tok.normalizer = changes["normalizer"]
    if changes.get("post"):
        tok.add_special_tokens(["[CLS]"])
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A", special_tokens=[("[CLS]", tok.token_to_id("[CLS]"))])
    if changes.get("truncate"):
        tok.enable_truncation(max_length=4)
    if changes.get("pad"):
        tok.enable_padding(length=64, pad_id=SEPARATOR, pad_token="<sep>")
    return tok.to_str()


@pytest.mark.parametrize("changes", [dict(post=True), dict(truncate=True), dict(pad=True)])
def test_tokens_hold_the_text_alone(changes):
    """A post-processor's special tokens, truncation and padding are a tokenizer's settings
    for model inputs; here tokens must encode the text and nothing else (bits per byte
    divides by its bytes), so they are not applied."""
    spec = _custom(**changes)
    text = "def f7(x):\n    return x * 7 + 'é✓'\n"
    assert encode(text, spec).tolist() == encode(text, BPE).tolist()
    assert tokenize([text.encode()], spec).tolist() == tokenize([text.encode()], BPE).tolist()


def test_a_tokenizer_that_loses_text_is_refused():
    """Lowercasing (like any normalizer that changes the text, or unknown tokens) made the
    tokens hold less than the bytes bits per byte divides by."""
    from tokenizers import normalizers

    spec = _custom(normalizer=normalizers.Lowercase())
    with pytest.raises(DataError, match=r"does not encode the text losslessly: 'Def f\(\): "
                                        r"pass\\n' decodes as 'def f"):
        tokenize([b"x = 1\nDef f(): pass\n"], spec)
    tokenize([b"x = 1\ndef f(): pass\n"], spec)  # text it keeps is fine


def test_a_separator_that_is_not_special_is_refused():
    """An ordinary "<sep>" token would turn "<sep>" written in a document into a separator,
    cutting the document and resetting the model's state there."""
    d = json.loads(BPE)
    for added in d["added_tokens"]:
        if added["content"] == "<sep>":
            added["special"] = False
    with pytest.raises(DataError, match="'<sep>' must be a special token"):
        vocab_size(json.dumps(d))
