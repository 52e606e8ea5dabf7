"""Corpora -> token arrays: reading text, the train/valid split, token stores, batch windows.

A corpus is a list of UTF-8 documents. Each document becomes ``[SEPARATOR] + tokens(doc)``, so a
split is one flat token array that starts with a separator (``intes.tokenizer``).

Train/valid split: by file, ``crc32(relative posix path) % valid_fraction == 0`` goes to valid,
so the split is the same on every machine and no file leaks into both. A single file, or files
whose crc split gives a split under a quarter or over four times its share of the bytes
(``1/valid_fraction`` for valid: a big file and its README), is split by position instead: the
last ``1/valid_fraction`` of the bytes, cut at a character boundary, is valid. Bits per byte
needs the number of raw bytes each split encodes; separators encode none.

A token store records each split's length and sha256, and a checksum of its metadata (byte
counts included); a load checks them (stores of the legacy format lack some: what is present is
checked), that the vocab size is its tokenizer's and the size rules of a text corpus.

Window offsets come from the project's counter-based hash (``intes.noise``), so the batch of a
step is a pure function of (seed, step) and resuming needs no data-loader state.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sysconfig
import zlib
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from intes.checkpoint import (
    CHECKPOINT_NAME,
    array_digest,
    atomic_directory,
    existing_version,
    metadata_digest,
    metadata_problem,
    unreadable,
)
from intes.errors import ConfigError, DataError, check_integers
from intes.noise import hash_u32, stream_key
from intes.tokenizer import resolve_tokenizer, token_bytes, tokenize, vocab_size

STORE_FORMAT = "intes-tokens-2"  # split records and metadata checksum required
LEGACY_STORE_FORMATS = ("intes-tokens-1",)  # made before them: checked where present
STORE_COVERED = ("format", "tokenizer", "vocab_size", "train_bytes", "valid_bytes", "source",
                 "splits")  # what a store's metadata checksum covers
STORE_CHUNK = 1 << 20
WINDOW_TENSOR_ID = 0xDA7A  # keeps window offsets apart from every weight's noise stream
_MAGIC = re.compile(r"[*?\[]")
_SKIP_STDLIB_DIRS = frozenset({"site-packages", "dist-packages"})

Document = tuple[str, bytes]  # (relative posix path, raw UTF-8 bytes)


@dataclass(frozen=True)
class Corpus:
    """Tokenized train and valid splits plus what is needed to report bits per byte."""

    train: np.ndarray
    valid: np.ndarray
    vocab_size: int
    train_bytes: int
    valid_bytes: int
    tokenizer: str
    source: str
    origin: str | None = None  # the absolute path or glob read (None: the default corpus)

    def bytes_per_token(self, split: str) -> float:
        """Raw UTF-8 bytes per token of ``split`` ("train" or "valid"); for reporting only."""
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', not {split!r}")
        tokens, n_bytes = (
            (self.train, self.train_bytes) if split == "train" else (self.valid, self.valid_bytes)
        )
        return n_bytes / max(1, len(tokens))

    @cached_property
    def _token_bytes(self) -> np.ndarray | None:
        """Each token id's bytes (``intes.tokenizer.token_bytes``) where they add up to both
        splits' bytes, else None."""
        table = token_bytes(self.tokenizer)
        if table is None or len(table) < self.vocab_size:
            return None
        for tokens, n_bytes in ((self.train, self.train_bytes), (self.valid, self.valid_bytes)):
            if int(np.bincount(tokens, minlength=len(table)) @ table) != n_bytes:
                return None
        return table

    def target_bytes(self, targets: np.ndarray) -> float:
        """The bytes of valid text that ``targets``, tokens of the valid split, hold: bits per
        byte's divisor (for reporting only). Their own bytes where the tokenizer tells each
        token's; else, or when they hold none (separators alone), valid's mean bytes per token
        for each."""
        if self._token_bytes is not None:
            n_bytes = int(self._token_bytes[np.asarray(targets, dtype=np.int64)].sum())
            if n_bytes:
                return float(n_bytes)
        return np.size(targets) * self.bytes_per_token("valid")

    @cached_property
    def digest(self) -> str:
        """A fingerprint of the two splits' tokens (their dtype, length and bytes), which a
        checkpoint keeps so that a resume can tell whether its data changed; made once."""
        h = hashlib.blake2b(digest_size=16)
        for tokens in (self.train, self.valid):
            h.update(f"{tokens.dtype.str}:{len(tokens)};".encode())
            h.update(np.ascontiguousarray(tokens).tobytes())
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# reading documents


def _is_text(raw: bytes) -> bool:
    """Accepted text: valid UTF-8 without NUL (NUL is the byte separator)."""
    if b"\0" in raw:
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_run_output(path: Path) -> bool:
    """A zarr store (a checkpoint or a token store, or one's copy left by a writer killed
    mid-swap; named ``*.zarr`` or holding a ``zarr.json``) or an intes run directory: not
    text to train on, and ``--data .`` would otherwise read earlier runs' weights and metrics."""
    return (path.name.endswith((".zarr", ".zarr.old")) or (path / "zarr.json").is_file()
            or existing_version(path / CHECKPOINT_NAME) is not None)


def _walk(root: Path, skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Regular files under ``root``, sorted by relative path, each once (a file linked twice
    would land in both splits); hidden entries, ``skip_dirs`` and run outputs
    (``_is_run_output``) below ``root`` pruned."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs and not d.startswith(".")
                   and not _is_run_output(Path(dirpath, d))]
        found += [Path(dirpath, f) for f in files if not f.startswith(".")]
    seen: set[Path] = set()
    unique = []  # a file linked under several names is read once, under its first
    for path in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        if path.is_file() and path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The running Python's stdlib ``*.py`` files, sorted by relative posix path."""
    return [p for p in _walk(_stdlib_root(), _SKIP_STDLIB_DIRS) if p.suffix == ".py"]


def _read_documents(files: list[Path], base: Path) -> list[Document]:
    """Non-empty text files as documents keyed by path relative to ``base``; others skipped."""
    docs = []
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        if raw and _is_text(raw):
            docs.append((Path(os.path.relpath(path, base)).as_posix(), raw))
    return docs


def _size(n_bytes: int) -> str:
    """A size for people: MB from 0.1 MB up, kB from 0.1 kB up, else bytes."""
    if n_bytes >= 100_000:
        return f"{n_bytes / 1e6:.1f} MB"
    return f"{n_bytes / 1e3:.1f} kB" if n_bytes >= 100 else f"{n_bytes} bytes"


def _describe(name: str, docs: list[Document]) -> str:
    files = f"{len(docs):,} file{'' if len(docs) == 1 else 's'}"
    return f"{name} ({files}, {_size(sum(len(raw) for _, raw in docs))})"


def _single_file(path: Path) -> list[Document]:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    if not _is_text(raw):
        raise DataError(f"{path} looks binary (not UTF-8 text); give a text file")
    return [(path.name, raw)]


def _glob_base(pattern: str) -> Path:
    """The pattern's leading directories without wildcards: relative paths start there."""
    parts = Path(pattern).parts[:-1]
    static = []
    for part in parts:
        if _MAGIC.search(part):
            break
        static.append(part)
    return Path(*static) if static else Path(".")


def _skipped_below(path: Path, base: Path) -> bool:
    """Whether a directory walk from ``base`` would prune ``path`` or a directory above it
    (``os.walk`` does not enter symlinked directories; glob's ``**`` would)."""
    prefix = base
    for part in path.relative_to(base).parts:
        prefix = prefix / part
        if part.startswith(".") or (prefix.is_dir() and (prefix.is_symlink()
                                                         or _is_run_output(prefix))):
            return True
    return False


def _glob_files(pattern: str) -> list[Path]:
    """Files matching ``pattern``, each once; a matched directory contributes the files under
    it. What a directory walk skips (hidden entries, run outputs, symlinked directories) is
    skipped here too, below the pattern's fixed part."""
    base = _glob_base(pattern)
    files: dict[Path, Path] = {}
    for match in map(Path, sorted(glob.glob(pattern, recursive=True))):
        if _skipped_below(match, base):
            continue
        for path in _walk(match) if match.is_dir() else [match]:
            if path.is_file():
                files.setdefault(path.resolve(), path)
    return list(files.values())


def _gather(data: str | os.PathLike | None) -> tuple[list[Document], str]:
    """Documents and a human description of where they came from."""
    if data is None:
        docs = _read_documents(default_corpus_files(), _stdlib_root())
        return docs, _describe("python stdlib", docs)
    text = os.fspath(data)
    if not text.strip():
        raise DataError("empty data path; give a text file, a directory, a glob or a .zarr store")
    path = Path(text).expanduser()
    if path.is_file():
        docs = _single_file(path)
        return docs, f"{path} ({_size(len(docs[0][1]))})"
    if path.is_dir():
        if existing_version(path / CHECKPOINT_NAME) is not None:
            raise DataError(f"{path} is an intes run (it holds {CHECKPOINT_NAME}), not a corpus; "
                            "give the text it was trained on")
        docs = _read_documents(_walk(path), path)
        if not docs:
            raise DataError(f"{path} holds no non-empty UTF-8 text files")
        return docs, _describe(str(path), docs)
    if _MAGIC.search(text):
        pattern = os.path.expanduser(text)
        files = _glob_files(pattern)
        if not files:
            raise DataError(f"no files match {text!r}")
        docs = _read_documents(files, _glob_base(pattern))
        if not docs:
            raise DataError(f"no non-empty UTF-8 text file matches {text!r}")
        return docs, _describe(repr(text), docs)
    if os.path.lexists(path):  # a device, a FIFO, a socket, a dangling or looping link
        raise DataError(f"{path} is not a regular file or a directory; give a text file, a "
                        "directory, a glob or a .zarr store")
    raise DataError(
        f"{path} does not exist; give a text file, a directory, a glob or a .zarr store"
    )


# ---------------------------------------------------------------------------------------------
# splitting


def _split_by_file(docs: list[Document], valid_fraction: int) -> tuple[list[bytes], list[bytes]]:
    train, valid = [], []
    for rel, raw in docs:
        in_valid = zlib.crc32(rel.encode("utf-8", "surrogateescape")) % valid_fraction == 0
        (valid if in_valid else train).append(raw)
    return train, valid


def _char_boundary(raw: bytes, cut: int) -> int:
    """Move ``cut`` forward past UTF-8 continuation bytes so both halves stay valid text."""
    while cut < len(raw) and raw[cut] & 0xC0 == 0x80:
        cut += 1
    return cut


def _split_by_position(docs: list[bytes], valid_fraction: int) -> tuple[list[bytes], list[bytes]]:
    """The last 1/valid_fraction of the concatenated bytes (at least one byte) is valid."""
    total = sum(map(len, docs))
    cut = total - max(1, total // valid_fraction)
    train, valid, pos = [], [], 0
    for raw in docs:
        if pos + len(raw) <= cut:
            train.append(raw)
        elif pos >= cut:
            valid.append(raw)
        else:
            inner = _char_boundary(raw, cut - pos)
            train.append(raw[:inner])
            valid.append(raw[inner:])
        pos += len(raw)
    return [d for d in train if d], [d for d in valid if d]


SPLIT_SHARE_SLACK = 4  # a by-file split stands while each split holds 1/4 .. 4x its share


def _split(docs: list[Document], valid_fraction: int) -> tuple[list[bytes], list[bytes]]:
    if len(docs) > 1:
        train, valid = _split_by_file(docs, valid_fraction)
        share = Fraction(sum(map(len, valid)), sum(len(raw) for _, raw in docs))
        expected = Fraction(1, valid_fraction)
        if all(Fraction(1, SPLIT_SHARE_SLACK) <= got / want <= SPLIT_SHARE_SLACK
               for got, want in ((share, expected), (1 - share, 1 - expected))):
            return train, valid  # (train's bound matters only for valid_fraction < 5)
    return _split_by_position([raw for _, raw in docs], valid_fraction)


# ---------------------------------------------------------------------------------------------
# corpora and token stores


def _is_store(path: Path) -> bool:
    """A ``.zarr`` path, or any directory with zarr metadata (a store made under another name)."""
    found = existing_version(path)
    return found is not None and (path.suffix == ".zarr" or (found / "zarr.json").is_file())


def _checked_split(name: str, tokens: np.ndarray, vocab_size: int, path: Path) -> np.ndarray:
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise DataError(f"token store {path} is corrupted: '{name}' is not a 1-D integer array")
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise DataError(f"token store {path} is corrupted: '{name}' has ids outside the vocab")
    return tokens


def _split_record(tokens: np.ndarray) -> dict:
    """What a store records of a split to detect damage: its length and a sha256 of its
    little-endian tokens (so the same on any machine)."""
    tokens = tokens.astype(tokens.dtype.newbyteorder("<"), copy=False)
    return {"tokens": len(tokens), "sha256": array_digest(tokens)}


def _check_record(name: str, tokens: np.ndarray, record: dict, path: Path) -> None:
    found = _split_record(tokens)
    if found["tokens"] != record["tokens"]:
        raise DataError(f"token store {path} is corrupted: '{name}' has {found['tokens']} "
                        f"tokens, expected {record['tokens']}")
    if found["sha256"] != record["sha256"]:
        raise DataError(f"token store {path} is corrupted: '{name}' fails its checksum")


def _store_vocab(attrs: dict, path: Path) -> int:
    """The store's vocab size, which must be its tokenizer's."""
    try:
        expected = vocab_size(str(attrs["tokenizer"]))
    except DataError as err:  # damaged, or made before such tokenizers were refused
        raise DataError(f"token store {path} cannot be used: {err}; prepare it again with a "
                        "tokenizer the models take") from None
    if type(attrs["vocab_size"]) is not int or attrs["vocab_size"] != expected:
        raise DataError(f"token store {path} is corrupted: vocab size {attrs['vocab_size']} but "
                        f"its tokenizer has {expected} tokens")
    return expected


def _check_bytes(corpus: Corpus, path: Path) -> None:
    """Byte counts (the bits-per-byte denominators) must be positive, and exact for bytes."""
    for name in ("train", "valid"):
        tokens, n_bytes = getattr(corpus, name), getattr(corpus, f"{name}_bytes")
        exact = len(tokens) - np.count_nonzero(tokens == 0)
        if n_bytes < 1 or (corpus.tokenizer == "bytes" and n_bytes != exact):
            raise DataError(f"token store {path} is corrupted: it says '{name}' holds "
                            f"{n_bytes} bytes of text")


def _read_store(path: Path, src: Path) -> Corpus:
    group = zarr.open_group(src, mode="r")
    attrs = dict(group.attrs)
    if attrs.get("format") not in (STORE_FORMAT, *LEGACY_STORE_FORMATS):
        raise DataError(f"{path} is not an intes token store; make one with `intes data prepare`")
    problem = ("its splits record is missing"
               if attrs["format"] == STORE_FORMAT and "splits" not in attrs
               else metadata_problem(attrs, STORE_COVERED, STORE_FORMAT))
    if problem:
        raise DataError(f"token store {path} is corrupted: {problem}")
    vocab_size = _store_vocab(attrs, path)
    for key in ("train_bytes", "valid_bytes"):
        if type(attrs[key]) is not int:  # not 2.5, not true: a count as prepare wrote it
            raise DataError(f"token store {path} is corrupted: {key} is {attrs[key]!r}")
    splits = {name: np.asarray(group[name][...]) for name in ("train", "valid")}
    for name, record in attrs.get("splits", {}).items():  # legacy stores may have none
        _check_record(name, splits[name], record, path)
    corpus = Corpus(
        train=_checked_split("train", splits["train"], vocab_size, path),
        valid=_checked_split("valid", splits["valid"], vocab_size, path),
        vocab_size=vocab_size,
        train_bytes=int(attrs["train_bytes"]),
        valid_bytes=int(attrs["valid_bytes"]),
        tokenizer=str(attrs["tokenizer"]),
        source=str(attrs["source"]),
    )
    _check_sizes(corpus.train, corpus.valid, f"token store {path}")
    _check_bytes(corpus, path)
    return corpus


def _load_store(path: Path) -> Corpus:
    """A corpus saved by ``prepare_store``; any damage becomes one DataError line."""
    src = existing_version(path)
    try:
        return _read_store(path, src)
    except DataError:
        raise
    except PermissionError as err:
        raise DataError(unreadable(f"token store {path}", err)) from None
    except Exception as err:  # zarr/json/numpy failures on damaged or foreign stores
        first = (str(err).strip().splitlines() or [""])[0]
        raise DataError(
            f"{path} is not a readable intes token store ({type(err).__name__}: {first}); "
            "re-create it with `intes data prepare`"
        ) from None


def _store_corpus(path: Path, tokenizer: str) -> Corpus:
    corpus = _load_store(path)
    if tokenizer not in ("bytes", corpus.tokenizer):  # "bytes" is the default: none asked for
        raise DataError(f"{path} is tokenized with another tokenizer than the one to use "
                        "(--tokenizer, or the run's): a store keeps its own; give text, or a "
                        "store of that tokenizer")
    return corpus


def _check_sizes(train: np.ndarray, valid: np.ndarray, source: str) -> None:
    if min(len(train), len(valid)) < 2:
        raise DataError(
            f"{source} is too small: train has {len(train)} tokens and valid {len(valid)}, "
            "need at least 2 in each; give more text"
        )


def load_corpus(
    data: str | os.PathLike | None = None, tokenizer: str = "bytes", valid_fraction: int = 20
) -> Corpus:
    """Load and tokenize a corpus: None (python stdlib), a file, directory, glob or .zarr store.

    ``tokenizer`` is "bytes", "bpe:VOCAB" (trained here on the train split), a tokenizers JSON
    string or a path to one. A store keeps its own tokenizer and split.
    """
    if data is not None and not isinstance(data, (str, os.PathLike)):
        raise DataError(f"data must be a path, a glob or None (the default corpus), got "
                        f"{type(data).__name__}")
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, int):
        raise DataError(f"valid_fraction must be an integer >= 2, not {valid_fraction!r}")
    if valid_fraction < 2:
        raise DataError(f"valid_fraction must be an integer >= 2, not {valid_fraction}")
    origin = None if data is None else os.path.abspath(os.path.expanduser(os.fspath(data)))
    if data is not None and _is_store(Path(data).expanduser()):
        return replace(_store_corpus(Path(data).expanduser(), tokenizer), origin=origin)
    docs, source = _gather(data)
    if not any(raw.strip() for _, raw in docs):
        raise DataError(f"{source} is empty (no text besides whitespace); give a text corpus")
    train_docs, valid_docs = _split(docs, valid_fraction)
    tokenizer = resolve_tokenizer(tokenizer, train_docs)
    train, valid = tokenize(train_docs, tokenizer), tokenize(valid_docs, tokenizer)
    _check_sizes(train, valid, source)
    return Corpus(
        train=train,
        valid=valid,
        vocab_size=vocab_size(tokenizer),
        train_bytes=sum(map(len, train_docs)),
        valid_bytes=sum(map(len, valid_docs)),
        tokenizer=tokenizer,
        source=source,
        origin=origin,
    )


def _write_store(corpus: Corpus, out: Path) -> None:
    attrs = {
        "format": STORE_FORMAT,
        "tokenizer": corpus.tokenizer,
        "vocab_size": corpus.vocab_size,
        "train_bytes": corpus.train_bytes,
        "valid_bytes": corpus.valid_bytes,
        "source": corpus.source,
        "splits": {name: _split_record(getattr(corpus, name)) for name in ("train", "valid")},
    }
    attrs["sha256"] = metadata_digest(attrs, STORE_COVERED)
    with atomic_directory(out) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3, attributes=attrs)
        for name in ("train", "valid"):
            tokens = getattr(corpus, name)
            group.create_array(name, data=tokens, chunks=(min(STORE_CHUNK, len(tokens)),))


def prepare_store(data: str | os.PathLike | None, out: Path, tokenizer: str = "bytes") -> Corpus:
    """Tokenize ``data`` once and save it as a zarr token store at ``out`` (atomically)."""
    corpus = load_corpus(data, tokenizer)
    _write_store(corpus, Path(out).expanduser())
    return corpus


# ---------------------------------------------------------------------------------------------
# batches


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return tokens[starts[:, None] + np.arange(length + 1)].astype(np.int32)


def sample_windows(tokens: np.ndarray, seed: int, step: int, n_seq: int, length: int) -> np.ndarray:
    """(n_seq, length + 1) int32 windows at offsets hashed from (seed, step, i): no loader state."""
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or not np.issubdtype(
            tokens.dtype, np.integer):
        raise ConfigError("tokens must be a 1-D numpy integer array (a corpus split)")
    check_integers(seed=seed, step=step, n_seq=n_seq, length=length)
    if not (0 <= seed < 1 << 32 and 0 <= step < 1 << 32 and n_seq >= 0 and length >= 0):
        raise ConfigError(f"want 0 <= seed, step < 2^32, n_seq >= 0 and length >= 0, got seed "
                          f"{seed}, step {step}, n_seq {n_seq}, length {length}")
    n_positions = len(tokens) - length
    if n_positions < 1:
        raise DataError(
            f"split has {len(tokens)} tokens, a window needs {length + 1}; "
            "use a shorter sequence length or more data"
        )
    if n_positions >= 1 << 32:
        raise DataError(f"split has {len(tokens)} tokens; at most 2^32 are supported")
    keys = stream_key(seed, step, np.arange(n_seq), tensor_id=WINDOW_TENSOR_ID)
    h = hash_u32(keys, 1)[:, 0].astype(np.uint64)
    starts = (h * np.uint64(n_positions)) >> np.uint64(32)  # < n_positions, no overflow
    return _windows(tokens, starts.astype(np.int64), length)


def eval_streams(tokens: np.ndarray, n_streams: int, length: int) -> np.ndarray:
    """(n_streams, length + 1) int32 non-overlapping windows spread evenly over ``tokens``."""
    need = n_streams * (length + 1)
    if len(tokens) < need:
        raise DataError(
            f"valid split has {len(tokens)} tokens, {n_streams} eval streams of {length} + 1 "
            f"tokens need {need}; use fewer streams, a shorter length or more data"
        )
    slack = len(tokens) - (length + 1)
    starts = np.arange(n_streams, dtype=np.int64) * slack // max(1, n_streams - 1)
    return _windows(tokens, starts, length)
