"""Tokenizers: text <-> token ids, as raw bytes or a byte-level BPE from HF ``tokenizers``.

A tokenizer travels as a string, "bytes" or the BPE's JSON, so corpora, token stores and
checkpoints carry their own. Byte tokens are the raw UTF-8 bytes (vocab 256; byte 0 never
occurs in accepted text, so token 0 is free to be the separator that starts every document).
A BPE's special token ``<sep>`` has id 0 for the same role.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from intes.errors import DataError
from intes.intmath import MAX_VOCAB

SEPARATOR = 0
SEPARATOR_TOKEN = "<sep>"
BYTE_VOCAB = 256
MIN_BPE_VOCAB = BYTE_VOCAB + 1  # the byte alphabet plus <sep>
_BPE_SPEC = re.compile(r"bpe:(\d+)")
_TOKENIZER_HELP = (f"use 'bytes', 'bpe:VOCAB' ({MIN_BPE_VOCAB} <= VOCAB < {MAX_VOCAB}) or a "
                   "tokenizer .json file")


def _token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= BYTE_VOCAB:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


@lru_cache(maxsize=4)
def _bpe(tokenizer_json: str) -> Tokenizer:
    """A parsed tokenizer; literal "<sep>" in text stays text instead of becoming a separator."""
    try:
        tok = Tokenizer.from_str(tokenizer_json)
    except Exception as err:
        raise DataError(f"tokenizer JSON cannot be parsed ({err}); {_TOKENIZER_HELP}") from None
    if tok.token_to_id(SEPARATOR_TOKEN) != SEPARATOR:
        raise DataError(f"tokenizer has no '{SEPARATOR_TOKEN}' token with id 0; {_TOKENIZER_HELP}")
    n = tok.get_vocab_size()
    if n >= MAX_VOCAB:  # the models' int32 log-likelihood sums need less
        raise DataError(f"tokenizer has {n:,} tokens; the models take fewer than {MAX_VOCAB:,}")
    ids = set(tok.get_vocab(with_added_tokens=True).values())
    if len(ids) != n or max(ids) != n - 1:  # a model has n outputs: ids must index them
        raise DataError(f"tokenizer ids must be exactly 0..{n - 1}, its largest is {max(ids)}; "
                        f"{_TOKENIZER_HELP}")
    separator = tok.get_added_tokens_decoder().get(SEPARATOR)
    if separator is None or not separator.special:  # else "<sep>" in text would split documents
        raise DataError(f"the tokenizer's '{SEPARATOR_TOKEN}' must be a special token; "
                        f"{_TOKENIZER_HELP}")
    tok.encode_special_tokens = True
    tok.no_truncation()  # a document or prompt is encoded whole: every token holds its bytes
    tok.no_padding()
    return tok


def vocab_size(tokenizer: str) -> int:
    """How many token ids ``tokenizer`` ("bytes" or a BPE's JSON) has, the separator's included."""
    return BYTE_VOCAB if tokenizer == "bytes" else _bpe(tokenizer).get_vocab_size()


def _check_tokenizer(tokenizer: str) -> None:
    if tokenizer != "bytes" and not tokenizer.lstrip().startswith("{"):
        raise DataError(f"cannot encode with tokenizer {tokenizer[:40]!r}; {_TOKENIZER_HELP}")


def encode(text: str, tokenizer: str) -> np.ndarray:
    """Token ids of ``text`` under ``tokenizer`` ("bytes" or a tokenizers JSON string)."""
    _check_tokenizer(tokenizer)
    if tokenizer == "bytes":
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
    tok = _bpe(tokenizer)
    ids = tok.encode(text, add_special_tokens=False).ids  # no post-processor's [CLS] / [SEP]
    return np.asarray(ids, dtype=_token_dtype(tok.get_vocab_size()))


def decode(tokens: np.ndarray | list[int], tokenizer: str) -> str:
    """Text of ``tokens``; never raises, so sampling can print whatever a model emits.

    Invalid UTF-8 becomes U+FFFD; ids outside the vocab become U+FFFD (bytes) or are dropped
    (BPE). The separator decodes as "\\x00" (bytes) or "<sep>" (BPE).
    """
    _check_tokenizer(tokenizer)
    ids = np.asarray(tokens, dtype=np.int64).ravel()
    if tokenizer == "bytes":
        ids = np.where((ids < 0) | (ids >= BYTE_VOCAB), 0xFF, ids)  # 0xFF is never valid UTF-8
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
    tok = _bpe(tokenizer)
    ids = ids[(ids >= 0) & (ids < tok.get_vocab_size())]
    return tok.decode(ids.tolist(), skip_special_tokens=False)


def _train_bpe(docs: list[bytes], vocab_size: int) -> str:
    """Train a byte-level BPE on ``docs``; returns its JSON. May stop below ``vocab_size``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SEPARATOR_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.decode("utf-8") for d in docs), trainer, length=len(docs))
    return tok.to_str()


def resolve_tokenizer(spec: str, train_docs: list[bytes]) -> str:
    """Turn a user spec into a tokenizer string ("bytes" or JSON), training BPE if asked."""
    spec = spec.strip()
    if spec == "bytes":
        return spec
    if spec.startswith("bpe:"):
        match = _BPE_SPEC.fullmatch(spec)
        if match is None or not MIN_BPE_VOCAB <= int(match.group(1)) < MAX_VOCAB:
            raise DataError(f"bad tokenizer {spec!r}; {_TOKENIZER_HELP}")
        return _train_bpe(train_docs, int(match.group(1)))
    if spec.startswith("{"):
        _bpe(spec)
        return spec
    if spec.endswith(".json"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"tokenizer file {spec!r} does not exist; {_TOKENIZER_HELP}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read tokenizer file {spec!r} as UTF-8 JSON ({err}); "
                            f"{_TOKENIZER_HELP}") from None
        _bpe(text)
        return text
    raise DataError(f"bad tokenizer {spec!r}; {_TOKENIZER_HELP}")


def _check_lossless(tok: Tokenizer, texts: list[str], ids: list[list[int]]) -> None:
    """Refuse a tokenizer whose tokens do not give back the text (a normalizer, an unknown
    token, dropped characters): bits per byte divides by the text's bytes, so the tokens must
    hold every one of them."""
    for text, back in zip(texts, tok.decode_batch(ids, skip_special_tokens=False), strict=True):
        if back != text:
            at = next((i for i, (a, b) in enumerate(zip(text, back, strict=False)) if a != b),
                      min(len(text), len(back)))
            raise DataError(f"the tokenizer does not encode the text losslessly: "
                            f"{text[at:at + 20]!r} decodes as {back[at:at + 20]!r}, so bits per "
                            "byte would count bytes its tokens do not hold; use a lossless "
                            "(byte-level) tokenizer, such as the one bpe:VOCAB trains")


def tokenize(docs: list[bytes], tokenizer: str) -> np.ndarray:
    """One flat array: a separator before every document."""
    if not docs:
        return np.zeros(0, dtype=_token_dtype(vocab_size(tokenizer)))
    if tokenizer == "bytes":
        joined = b"\0" + b"\0".join(docs)
        return np.frombuffer(joined, dtype=np.uint8).copy()
    tok = _bpe(tokenizer)
    texts = [d.decode("utf-8") for d in docs]
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    _check_lossless(tok, texts, [e.ids for e in encoded])
    out = np.empty(sum(len(e.ids) + 1 for e in encoded), dtype=_token_dtype(tok.get_vocab_size()))
    pos = 0
    for e in encoded:
        out[pos] = SEPARATOR
        out[pos + 1 : pos + 1 + len(e.ids)] = e.ids
        pos += len(e.ids) + 1
    return out
