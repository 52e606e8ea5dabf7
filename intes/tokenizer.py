"""Tokenizers: text <-> token ids, as raw bytes or a byte-level BPE from HF ``tokenizers``.

A tokenizer travels as a string, "bytes" or the BPE's JSON, so corpora, token stores and
checkpoints carry their own. Byte tokens are the raw UTF-8 bytes (vocab 256; byte 0 never
occurs in accepted text, so token 0 is free to be the separator that starts every document).
A BPE's special token ``<sep>`` has id 0 for the same role.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from intes.errors import DataError
from intes.intmath import MAX_VOCAB

SEPARATOR = 0
SEPARATOR_TOKEN = "<sep>"
BYTE_VOCAB = 256
MIN_BPE_VOCAB = BYTE_VOCAB + 1  # the byte alphabet plus <sep>
_BPE_SPEC = re.compile(r"bpe:(\d+)")
# Long documents are encoded and trained on in pieces of about this many characters, cut where
# a byte-level pre-tokenizer splits anyway (``_pieces``): the ids and the trained merges are the
# whole document's, and memory stays proportional to a piece (one 23 MB file took 4.8 GB whole).
PIECE_CHARS = 1 << 16
ENCODE_BATCH_CHARS = 1 << 22  # characters per encode_batch call; their encodings are dropped
PROGRESS_MIN_CHARS = 1 << 24  # training or encoding this much text shows progress (seconds)
_PIECE_CUT = re.compile(r"(?<=\S)[\n ]")  # a newline or space after a non-space character
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
    _check_no_separator([text], [ids])
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


@lru_cache(maxsize=4)
def token_bytes(tokenizer: str) -> np.ndarray | None:
    """How many bytes of text each token id holds, where a token's bytes are its own: one per
    byte token and none for the separator; for a byte-level decoder, one per character of a
    token's byte-level string (its UTF-8 where it has other characters, as the decoder reads
    it) and none for special tokens (which text encodes to only through a tokenizer's merges;
    then the bytes do not add up and ``Corpus.target_bytes`` takes the mean). None for other
    decoders, whose tokens' bytes can depend on their neighbours."""
    if tokenizer == "bytes":
        table = np.ones(BYTE_VOCAB, dtype=np.int64)
        table[SEPARATOR] = 0
        return table
    spec = json.loads(tokenizer)
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    tok, alphabet = _bpe(tokenizer), set(pre_tokenizers.ByteLevel.alphabet())
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    words = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    return np.array([0 if i in special else len(w) if set(w) <= alphabet else len(w.encode())
                     for i, w in enumerate(words)], dtype=np.int64)


def _pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in consecutive pieces of ``size`` characters or more, each cut before a newline
    or space that follows a non-space character (a text without one stays whole).

    GPT-2's byte-level split (contractions, `` ?\\p{L}+``, `` ?\\p{N}+``,
    `` ?[^\\s\\p{L}\\p{N}]+``, ``\\s+(?!\\S)``, ``\\s+``) never puts a non-space character
    and the space after it in one word (a space only leads a word), and a word's match reads
    nothing before its start: the pieces split into the whole text's words. (Python's ``\\S``
    holds no character that split's ``\\s`` has: it was checked over every code point.)
    """
    start = 0
    while len(text) - start > size:
        cut = _PIECE_CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def _train_bpe(docs: list[bytes], vocab_size: int) -> str:
    """Train a byte-level BPE on ``docs``; returns its JSON. May stop below ``vocab_size``.

    The trainer counts pre-tokenized words, so feeding long documents in ``_pieces`` gives the
    same counts, hence the same merges.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [piece for d in docs for piece in _pieces(d.decode("utf-8"), PIECE_CHARS)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SEPARATOR_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sum(map(len, texts)) >= PROGRESS_MIN_CHARS,  # on a terminal only
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
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


@lru_cache(maxsize=4)
def _splits_like_gpt2(tokenizer_json: str) -> bool:
    """Whether ``tokenizer_json`` encodes a text as the concatenation of its ``_pieces``: no
    normalizer, GPT-2's byte-level split without a prefix space, a byte-level decoder, and only
    special added tokens (encoded as text here; a plain added token could span a cut)."""
    spec = json.loads(tokenizer_json)
    pre, dec = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    return (spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", True) and dec.get("type") == "ByteLevel"
            and all(t.get("special") for t in spec.get("added_tokens") or []))


def _encoded(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> Iterator[np.ndarray]:
    """Each text's ids, ENCODE_BATCH_CHARS characters per ``encode_batch`` call (whose
    encodings weigh some 200 bytes per character), each batch checked to be lossless."""
    start = 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and (end == start or chars < ENCODE_BATCH_CHARS):
            chars += len(texts[end])
            end += 1
        ids = [e.ids for e in tok.encode_batch(texts[start:end], add_special_tokens=False)]
        _check_lossless(tok, texts[start:end], ids)
        _check_no_separator(texts[start:end], ids)
        yield from (np.asarray(i, dtype=dtype) for i in ids)
        start = end


def _check_no_separator(texts: list[str], ids: list[list[int]]) -> None:
    """Refuse text that encodes to the separator: a tokenizer whose split keeps "<sep>" in one
    word can rebuild the special token by its merges, and that would end a document there (the
    models' state resets) and count no bytes for the text."""
    for text, text_ids in zip(texts, ids, strict=True):
        if SEPARATOR in text_ids:
            at = text.find(SEPARATOR_TOKEN)
            raise DataError(f"the tokenizer encodes text as the separator {SEPARATOR_TOKEN!r} "
                            f"(in {text[max(0, at - 10):at + 15]!r}), which would cut a document "
                            "in two; use a tokenizer whose pre-tokenizer splits '<' from "
                            "letters, such as the one bpe:VOCAB trains")


def tokenize(docs: list[bytes], tokenizer: str) -> np.ndarray:
    """One flat array: a separator before every document."""
    dtype = _token_dtype(vocab_size(tokenizer))
    if not docs:
        return np.zeros(0, dtype=dtype)
    if tokenizer == "bytes":
        joined = b"\0" + b"\0".join(docs)
        return np.frombuffer(joined, dtype=np.uint8).copy()
    in_pieces = _splits_like_gpt2(tokenizer)
    texts: list[str] = []
    starts_document: list[bool] = []
    for raw in docs:
        text = raw.decode("utf-8")
        pieces = list(_pieces(text, PIECE_CHARS)) if in_pieces else [text]
        texts += pieces
        starts_document += [True] + [False] * (len(pieces) - 1)
    separator = np.array([SEPARATOR], dtype=dtype)
    parts = []
    chars = sum(map(len, texts))
    with tqdm(total=chars, desc="tokenizing", unit="char", unit_scale=True, leave=False,
              disable=None if chars >= PROGRESS_MIN_CHARS else True) as bar:  # None: on a tty
        encoded = _encoded(_bpe(tokenizer), texts, dtype)
        for first, text, ids in zip(starts_document, texts, encoded, strict=True):
            parts += [separator, ids] if first else [ids]
            bar.update(len(text))
    return np.concatenate(parts)
