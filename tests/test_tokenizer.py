"""Tokenizers: encode and decode round-trip for bytes and a trained BPE; decode never raises."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import intes.tokenizer as tokenizer_module
from intes.errors import DataError
from intes.tokenizer import (
    SEPARATOR,
    _token_dtype,
    _train_bpe,
    decode,
    encode,
    resolve_tokenizer,
    token_bytes,
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


# Text that meets every branch of the byte-level split: letters, digits, contractions,
# punctuation and spaces of several kinds, some of them outside ASCII.
SPLIT_CHARS = "defrtunx 'sS0179=*+:(é✓\n\n\n\t\r\x0b\x85\xa0\u2028"
SPLIT_TEXT = st.text(alphabet=st.sampled_from(list(SPLIT_CHARS)), max_size=120)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("xs1'( \n\t\xa0\u2028é中。\u3000\x1c\u200b")),
               max_size=60),
       st.integers(1, 12))
def test_pieces_split_into_the_whole_texts_words(text, piece_chars):
    """What encoding and training in pieces rests on: GPT-2's byte-level split of the pieces,
    one after another, is that of the whole text."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str
    pieces = list(tokenizer_module._pieces(text, piece_chars))
    assert "".join(pieces) == text
    assert [w for piece in pieces for w, _ in split(piece)] == [w for w, _ in split(text)]


def _whole(text: str, spec: str) -> list[int]:
    from tokenizers import Tokenizer

    return [SEPARATOR] + Tokenizer.from_str(spec).encode(text, add_special_tokens=False).ids


@settings(max_examples=100, deadline=None)
@given(st.lists(SPLIT_TEXT, min_size=1, max_size=4), st.integers(1, 30), st.integers(1, 80))
def test_long_documents_are_encoded_in_pieces_as_whole(texts, piece_chars, batch_chars):
    """Encoding a document in pieces, in several batches, gives the whole document's ids."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer_module, "PIECE_CHARS", piece_chars)
        patch.setattr(tokenizer_module, "ENCODE_BATCH_CHARS", batch_chars)
        tokens = tokenize([t.encode() for t in texts], BPE)
    assert tokens.tolist() == [i for t in texts for i in _whole(t, BPE)]


@settings(max_examples=30, deadline=None)
@given(st.lists(SPLIT_TEXT, min_size=1, max_size=4), st.integers(1, 30))
def test_a_bpe_trained_on_pieces_is_the_whole_documents_bpe(texts, piece_chars):
    """The trainer counts words, and pieces hold the whole documents' words."""
    docs = [t.encode() for t in texts]
    whole = _train_bpe(docs, 300)  # PIECE_CHARS is larger than any of these documents
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer_module, "PIECE_CHARS", piece_chars)
        assert _train_bpe(docs, 300) == whole


def test_a_tokenizer_that_splits_otherwise_encodes_documents_whole():
    """An added token can span a piece's cut (here one holding a newline): such a tokenizer's
    documents are encoded whole."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(BPE)
    tok.add_tokens(["1\ny"])
    spec, text = tok.to_str(), "x = 1\ny = 2\n"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer_module, "PIECE_CHARS", 1)
        tokens = tokenize([text.encode()], spec)
    assert tokens.tolist() == _whole(text, spec) and tok.token_to_id("1\ny") in tokens


def _with_added_tokens() -> str:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(BPE)
    tok.add_tokens(["1\ny", "é✓é"])
    return tok.to_str()


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("defrtunx 1y'\n✓é😀")), max_size=60),
       st.booleans())
def test_token_bytes_are_the_bytes_a_prefix_decodes_to(text, added):
    """At every cut where a document's tokens decode to the text on either side, the tokens
    before it hold that prefix's bytes: bits per byte can divide by any window's own bytes.
    Byte-level tokens holding part of a character (the emoji's four bytes) count their part."""
    spec, text = (_with_added_tokens(), text + "1\ny é✓é") if added else (BPE, text)
    ids = encode(text, spec)
    table = token_bytes(spec)
    assert table[ids].sum() == len(text.encode())
    for cut in range(len(ids) + 1):
        head = decode(ids[:cut], spec)
        if head + decode(ids[cut:], spec) == text:
            assert table[ids[:cut]].sum() == len(head.encode())


def test_token_bytes_of_the_separator_and_byte_tokens():
    assert token_bytes("bytes").tolist() == [0] + [1] * 255
    assert token_bytes(BPE)[SEPARATOR] == 0


def test_text_that_encodes_to_the_separator_is_refused():
    """A split that keeps "<sep>" in one word lets the merges rebuild the special token: the
    document would be cut in two there. (GPT-2's split, as bpe:VOCAB trains, never does.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["<sep>"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<sep>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = tok.to_str()
    for refused in (lambda: tokenize([b"hello <sep>", b"world"], spec),
                    lambda: encode("hello <sep>", spec)):
        with pytest.raises(DataError, match="encodes text as the separator '<sep>' "
                                            r"\(in 'hello <sep>'\), which would cut"):
            refused()
    assert tokenize([b"hello", b"world"], spec).tolist().count(SEPARATOR) == 2
