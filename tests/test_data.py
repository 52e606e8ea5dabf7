"""Corpora, splits, token stores, batch windows and n-gram reference figures."""

import math
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intes.checkpoint import metadata_digest
from intes.data import (
    STORE_COVERED,
    Corpus,
    default_corpus_files,
    eval_streams,
    load_corpus,
    prepare_store,
    sample_windows,
)
from intes.errors import DataError
from intes.intmath import MAX_VOCAB
from intes.ngram import ngram_bits_per_byte
from intes.tokenizer import decode, encode

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + 'é✓'\n\n" for i in range(200))


@pytest.fixture(scope="module")
def stdlib() -> Corpus:
    return load_corpus()


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def _docs(tokens: np.ndarray) -> list[bytes]:
    """Documents of a byte-token split (each one follows a separator)."""
    assert tokens[0] == 0
    return tokens.tobytes().split(b"\0")[1:]


# --- default corpus ---------------------------------------------------------------------------


def test_default_files_are_stdlib_sources_in_order():
    files = default_corpus_files()
    assert len(files) > 500 and all(p.suffix == ".py" for p in files)
    assert not any({"site-packages", "dist-packages"} & set(p.parts) for p in files)
    assert files == default_corpus_files()


def test_default_corpus_split_by_file(stdlib):
    assert stdlib.vocab_size == 256 and stdlib.tokenizer == "bytes"
    assert stdlib.train.dtype == np.uint8 and stdlib.valid.dtype == np.uint8
    assert stdlib.source.startswith("python stdlib (") and "MB)" in stdlib.source
    for tokens, n_bytes in ((stdlib.train, stdlib.train_bytes), (stdlib.valid, stdlib.valid_bytes)):
        assert tokens[0] == 0 and n_bytes > 100_000
        docs = _docs(tokens)
        assert all(docs) and n_bytes == len(tokens) - len(docs)
    assert 0.01 < stdlib.valid_bytes / stdlib.train_bytes < 0.15


def test_default_corpus_is_deterministic(stdlib):
    again = load_corpus()
    np.testing.assert_array_equal(again.train, stdlib.train)
    np.testing.assert_array_equal(again.valid, stdlib.valid)


def test_ngram_figures_on_default_corpus(stdlib):
    unigram, bigram = ngram_bits_per_byte(stdlib)
    assert math.isfinite(unigram) and math.isfinite(bigram)
    assert 8 > unigram >= bigram > 1


# --- text files, directories, globs -------------------------------------------------------------


def test_single_file_split_by_position(tmp_path):
    text = "abcdefghij" * 100
    corpus = load_corpus(str(_write(tmp_path / "a.txt", text)))
    assert corpus.valid_bytes == 50 and corpus.train_bytes == 950
    assert _docs(corpus.train) == [text[:950].encode()]
    assert _docs(corpus.valid) == [text[950:].encode()]
    assert corpus.bytes_per_token("valid") == pytest.approx(50 / 51)


def test_positional_cut_keeps_characters_whole(tmp_path):
    corpus = load_corpus(_write(tmp_path / "u.txt", "é✓" * 101), valid_fraction=3)
    halves = [b"".join(_docs(t)).decode("utf-8") for t in (corpus.train, corpus.valid)]
    assert "".join(halves) == "é✓" * 101 and all(halves)


def _tree(root: Path, n: int = 40) -> dict[str, bytes]:
    files = {f"pkg/m{i}.txt" if i % 2 else f"m{i}.txt": f"doc {i}\n".encode() * 3 for i in range(n)}
    for rel, raw in files.items():
        _write(root / rel, raw)
    _write(root / "blob.bin", bytes(range(256)))
    _write(root / "bad.txt", b"\xff\xfe not utf-8")
    _write(root / "empty.txt", b"")
    _write(root / ".hidden" / "x.txt", "hidden")
    return files


def _expected_split(files: dict[str, bytes], valid_fraction: int = 20) -> tuple[list, list]:
    order = sorted(files)
    valid = [files[r] for r in order if zlib.crc32(r.encode()) % valid_fraction == 0]
    train = [files[r] for r in order if zlib.crc32(r.encode()) % valid_fraction != 0]
    return train, valid


def test_directory_split_by_crc32_of_relative_path(tmp_path):
    files = _tree(tmp_path / "d")
    train, valid = _expected_split(files)
    assert train and valid  # the chosen names exercise both sides
    corpus = load_corpus(str(tmp_path / "d"))
    assert _docs(corpus.train) == train and _docs(corpus.valid) == valid
    assert f"({len(files)} files," in corpus.source


def test_directory_corpus_skips_stores_and_runs(tmp_path):
    """``--data .`` must not train on earlier runs: their checkpoints, token stores and
    metrics are left out, at any depth (but a directory given as the corpus is read)."""
    files = _tree(tmp_path / "d")
    _write(tmp_path / "d" / "runs" / "a" / "checkpoint.zarr" / "zarr.json", '{"text": 1}')
    _write(tmp_path / "d" / "runs" / "a" / "metrics.jsonl", '{"step": 1}\n')
    _write(tmp_path / "d" / "pkg" / "tokens.zarr" / "train" / "c" / "0", "abcdef")
    corpus = load_corpus(tmp_path / "d")
    train, valid = _expected_split(files)
    assert _docs(corpus.train) == train and _docs(corpus.valid) == valid
    assert f"({len(files)} files," in corpus.source


def test_glob_matches_like_directory(tmp_path):
    files = _tree(tmp_path / "d")
    corpus = load_corpus(str(tmp_path / "d" / "**" / "*.txt"))
    direct = load_corpus(tmp_path / "d")
    np.testing.assert_array_equal(corpus.train, direct.train)
    np.testing.assert_array_equal(corpus.valid, direct.valid)
    assert f"({len(files)} files," in corpus.source


@pytest.mark.parametrize("pattern", ["**", "**/*", "*", "pkg*/**"])
def test_glob_reads_each_file_once_and_skips_what_a_walk_skips(tmp_path, pattern):
    """Matches that overlap (a directory and the files under it) give each file once, and
    earlier runs, stores and hidden entries stay out whether matched or walked into."""
    root = tmp_path / "d"
    files = _tree(root)
    outputs = [root / "runs" / "a" / "checkpoint.zarr" / "zarr.json",
               root / "runs" / "a" / "metrics.jsonl",
               root / "runs" / "b" / "checkpoint.zarr.old" / "zarr.json",  # killed mid-swap
               root / "pkg" / "tokens.zarr" / "zarr.json",
               root / "pkg" / ".cache" / "notes.txt"]
    for path in outputs:
        _write(path, '{"step": 1}')
    corpus = load_corpus(str(root / pattern))
    if pattern.startswith("pkg"):
        files = {rel: raw for rel, raw in files.items() if rel.startswith("pkg/")}
    train, valid = _expected_split(files)
    assert _docs(corpus.train) == train and _docs(corpus.valid) == valid
    assert f"({len(files)} files," in corpus.source


def test_directory_corpus_skips_a_store_without_the_zarr_suffix(tmp_path):
    """A token store saved as ``tokens`` (no suffix) is still a store: its ``zarr.json``
    files are not text to train on, whether walked into or matched by a glob."""
    files = _tree(tmp_path / "d")
    prepare_store(_write(tmp_path / "a.txt", TEXT), tmp_path / "d" / "pkg" / "tokens")
    train, valid = _expected_split(files)
    for data in (tmp_path / "d", str(tmp_path / "d" / "**")):
        corpus = load_corpus(data)
        assert _docs(corpus.train) == train and _docs(corpus.valid) == valid
        assert f"({len(files)} files," in corpus.source


@pytest.mark.parametrize("pattern", ["**/*.txt", "*", "**"])
def test_glob_skips_symlinked_directories_like_a_walk(tmp_path, pattern):
    """``os.walk`` does not enter a symlinked directory, so a glob below its fixed part does
    not either; a link named in the fixed part is followed, like a directory given as data."""
    files = _tree(tmp_path / "d")
    for i in range(6):
        _write(tmp_path / "ext" / f"g{i}.txt", f"linked {i}\n")
    (tmp_path / "d" / "linked").symlink_to(tmp_path / "ext", target_is_directory=True)
    walked = load_corpus(tmp_path / "d")
    globbed = load_corpus(str(tmp_path / "d" / pattern))
    np.testing.assert_array_equal(globbed.train, walked.train)
    np.testing.assert_array_equal(globbed.valid, walked.valid)
    assert f"({len(files)} files," in globbed.source
    assert "(6 files," in load_corpus(str(tmp_path / "d" / "linked" / "*.txt")).source


def test_files_all_on_one_side_fall_back_to_positional(tmp_path):
    files = {"m1.txt": b"x" * 300, "pkg/m3.txt": b"y" * 100}  # both crc32 % 20 != 0
    assert not _expected_split(files)[1]
    for rel, raw in files.items():
        _write(tmp_path / rel, raw)
    corpus = load_corpus(tmp_path)
    assert _docs(corpus.train) == [b"x" * 300, b"y" * 80] and _docs(corpus.valid) == [b"y" * 20]


def _named(valid: bool, start: int = 0) -> str:
    """A file name the crc split puts in valid (or in train)."""
    return next(f"f{i}.txt" for i in range(start, 10**6)
                if (zlib.crc32(f"f{i}.txt".encode()) % 20 == 0) == valid)


@pytest.mark.parametrize("valid_bytes, train_bytes", [
    (30_000, 7),  # a big file that lands in valid and its README: train had 8 tokens
    (1, 30_000),  # a 1-byte file as the whole validation
    (12_000, 30_000),  # valid with 29% of the text
])
def test_a_lopsided_file_split_falls_back_to_positional(tmp_path, valid_bytes, train_bytes):
    _write(tmp_path / _named(True), b"v" * valid_bytes)
    _write(tmp_path / _named(False), b"t" * train_bytes)
    corpus = load_corpus(tmp_path)
    total = valid_bytes + train_bytes
    assert corpus.valid_bytes == total // 20 and corpus.train_bytes == total - total // 20


def test_a_file_split_that_leaves_train_empty_falls_back_to_positional(tmp_path):
    """With valid_fraction 2 valid's share may reach 4 x 1/2: every file in valid passed."""
    names = [n for n in (f"f{i}.txt" for i in range(10)) if zlib.crc32(n.encode()) % 2 == 0][:2]
    for name in names:
        _write(tmp_path / name, b"some text here\n" * 50)
    corpus = load_corpus(tmp_path, valid_fraction=2)
    assert corpus.valid_bytes == corpus.train_bytes == 750


@pytest.mark.parametrize("valid_bytes", [400, 1_900, 5_000])  # 1.3%, 6%, 14% of the text
def test_a_file_split_within_four_times_its_share_stands(tmp_path, valid_bytes):
    _write(tmp_path / _named(True), b"v" * valid_bytes)
    _write(tmp_path / _named(False), b"t" * 30_000)
    corpus = load_corpus(tmp_path)
    assert _docs(corpus.valid) == [b"v" * valid_bytes] and _docs(corpus.train) == [b"t" * 30_000]


def test_a_file_linked_under_two_names_is_read_once(tmp_path):
    """Linked under a name the split sends to valid, the same text was in both splits."""
    train_name, valid_name = _named(False), _named(True)
    _write(tmp_path / "d" / train_name, TEXT)
    (tmp_path / "d" / valid_name).symlink_to(train_name)
    for data in (tmp_path / "d", str(tmp_path / "d" / "*.txt")):
        corpus = load_corpus(data)
        assert corpus.train_bytes + corpus.valid_bytes == len(TEXT.encode())
        assert "(1 file," in corpus.source


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: "", "empty data path"),
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: p / "nothing*.txt", "no files match"),
        (lambda p: _write(p / "e.txt", ""), "is empty"),
        (lambda p: _write(p / "w.txt", " \n\t\n"), "is empty"),
        (lambda p: _write(p / "b.bin", b"ab\0cd"), "looks binary"),
        (lambda p: _write(p / "l.txt", "é".encode("latin-1")), "looks binary"),
        (lambda p: _write(p / "t.txt", "a"), "too small"),
        (lambda p: _write(p / "d" / "b.bin", b"\0\1").parent, "no non-empty UTF-8 text"),
        (lambda p: _write(p / "g" / "b.bin", b"\0\1").parent / "*.bin", "no non-empty UTF-8"),
        (lambda p: Path(os.devnull), "is not a regular file or a directory"),
        (lambda p: _fifo(p / "pipe"), "is not a regular file or a directory"),
        (lambda p: _link(p / "loop", p / "loop"), "is not a regular file or a directory"),
        (lambda p: _link(p / "dangling", p / "gone.txt"), "is not a regular file or a direc"),
    ],
    ids=[
        "blank",
        "missing",
        "glob",
        "empty",
        "whitespace",
        "nul",
        "latin1",
        "tiny",
        "dir",
        "glob-bin",
        "device",
        "fifo",
        "symlink-loop",
        "dangling-link",
    ],
)
def test_bad_data_gives_one_line_error(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as info:
        load_corpus(str(make(tmp_path)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["bpe:abc", "bpe:256", "bpe:32768", "bpe:", "words",
                                  '{"not": "a tokenizer"}', "BINARY.json", "MISSING.json"])
def test_bad_tokenizer_spec(tmp_path, spec):
    _write(tmp_path / "BINARY.json", bytes(range(128, 256)))
    spec = str(tmp_path / spec) if spec.endswith(".json") else spec
    with pytest.raises(DataError, match="tokenizer") as info:
        load_corpus(_write(tmp_path / "a.txt", TEXT), tokenizer=spec)
    assert "\n" not in str(info.value)


def test_a_tokenizer_larger_than_the_models_take_is_refused(tmp_path):
    """Refused when the data is read, not later when a run's model is built."""
    from tokenizers import Tokenizer, models

    vocab = {"<sep>": 0} | {f"w{i}": i for i in range(1, MAX_VOCAB)}
    spec = Tokenizer(models.WordLevel(vocab, unk_token="<sep>")).to_str()
    with pytest.raises(DataError, match=f"{MAX_VOCAB:,} tokens; the models take fewer"):
        load_corpus(_write(tmp_path / "a.txt", TEXT), tokenizer=spec)


@pytest.mark.parametrize("fraction", [0, 1, 2.5, True])
def test_bad_valid_fraction(fraction):
    with pytest.raises(DataError, match="valid_fraction"):
        load_corpus(valid_fraction=fraction)


@given(st.lists(st.integers(0, 255), min_size=4, max_size=200), st.data())
def test_corpus_digest_sees_every_token(tokens, data_):
    """Equal tokens, equal digest; one token changed in place (same lengths) or moved across
    the split, another."""
    train, valid = np.array(tokens[:-2], np.uint8), np.array(tokens[-2:], np.uint8)

    def corpus(a: np.ndarray, b: np.ndarray) -> Corpus:
        return Corpus(a, b, 256, len(a), len(b), "bytes", "test")

    assert corpus(train, valid).digest == corpus(train.copy(), valid.copy()).digest
    edited = train.copy()
    i = data_.draw(st.integers(0, len(edited) - 1))
    edited[i] = (int(edited[i]) + data_.draw(st.integers(1, 255))) % 256
    assert corpus(edited, valid).digest != corpus(train, valid).digest
    whole = np.concatenate([train, valid])
    assert corpus(whole[:-1], whole[-1:]).digest != corpus(train, valid).digest


# --- token stores -------------------------------------------------------------------------------


def test_store_round_trip(tmp_path):
    made = prepare_store(_write(tmp_path / "a.txt", TEXT), tmp_path / "tokens.zarr")
    loaded = load_corpus(str(tmp_path / "tokens.zarr"))
    assert loaded.source == made.source and loaded.vocab_size == made.vocab_size
    assert (loaded.train_bytes, loaded.valid_bytes) == (made.train_bytes, made.valid_bytes)
    for a, b in ((loaded.train, made.train), (loaded.valid, made.valid)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir() if p.name != "a.txt"] == ["tokens.zarr"]


def test_store_is_found_without_suffix_and_replaced_atomically(tmp_path):
    out = tmp_path / "store"
    prepare_store(_write(tmp_path / "a.txt", TEXT), out)
    second = prepare_store(_write(tmp_path / "b.txt", TEXT * 2), out)
    assert load_corpus(out).train_bytes == second.train_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "store"]


def test_store_keeps_its_tokenizer(tmp_path):
    prepare_store(_write(tmp_path / "a.txt", TEXT), tmp_path / "t.zarr")
    with pytest.raises(DataError, match="tokenized with another tokenizer than the one to use"):
        load_corpus(tmp_path / "t.zarr", tokenizer="bpe:300")


@pytest.fixture
def store(tmp_path) -> Path:
    prepare_store(_write(tmp_path / "a.txt", TEXT), tmp_path / "t.zarr")
    return tmp_path / "t.zarr"


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: (s / "zarr.json").write_text("{broken"),
        lambda s: next((s / "train" / "c").iterdir()).write_bytes(b"garbage"),
        lambda s: (s / "valid" / "zarr.json").unlink(),
    ],
    ids=["group-metadata", "chunk", "missing-array"],
)
def test_broken_store(store, damage):
    damage(store)
    with pytest.raises(DataError, match="not a readable intes token store") as info:
        load_corpus(store)
    assert "\n" not in str(info.value)


def test_foreign_zarr_store(tmp_path):
    import zarr

    zarr.open_group(tmp_path / "x.zarr", mode="w", attributes={"format": "something-else"})
    with pytest.raises(DataError, match="not an intes token store"):
        load_corpus(tmp_path / "x.zarr")


def _edit_attrs(store: Path, edit, redigest: bool = True) -> None:
    """Edit a store's metadata; with ``redigest`` its checksum is made again, as a consistent
    edit would, so the checks behind the checksum are what a test meets."""
    import json

    doc = json.loads((store / "zarr.json").read_text())
    attrs = doc["attributes"]
    edit(attrs)
    if redigest and "sha256" in attrs:
        attrs["sha256"] = metadata_digest(attrs, STORE_COVERED)
    (store / "zarr.json").write_text(json.dumps(doc))


def _change_token(store: Path) -> None:
    """One train token changed in place, the chunk re-encoded validly: only a checksum sees it."""
    import zarr

    train = zarr.open_array(store / "train", mode="r+")
    train[7] = (int(train[7]) + 1) % 256


def _flip_bit(chunk: Path) -> None:
    """One bit of the compressed chunk flipped (zstd here keeps no checksum of its own)."""
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    chunk.write_bytes(bytes(raw))


CHECKSUM = "is corrupted: .*'train' fails its checksum"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_change_token, CHECKSUM),
        (lambda s: _flip_bit(s / "train" / "c" / "0"), CHECKSUM),
        (lambda s: next((s / "train" / "c").iterdir()).unlink(), CHECKSUM),
        (lambda s: _edit_attrs(s, lambda a: a.update(vocab_size=1000)),
         "is corrupted: .*vocab size 1000 but its tokenizer has 256 tokens"),
        (lambda s: _edit_attrs(s, lambda a: a.update(tokenizer="garbage")),
         "cannot be used: tokenizer JSON cannot be parsed"),
        (lambda s: _edit_attrs(s, lambda a: a.update(valid_bytes=0)),
         "is corrupted: .*'valid' holds 0 bytes"),
        (lambda s: _edit_attrs(s, lambda a: a.update(train_bytes=a["train_bytes"] + 1)),
         "is corrupted: .*'train' holds"),
        (lambda s: _edit_attrs(s, lambda a: a["splits"]["valid"].update(tokens=5)),
         "is corrupted: .*'valid' has 420 tokens, expected 5"),
        (lambda s: _edit_attrs(s, lambda a: a.update(vocab_size=256.5)),
         "is corrupted: .*vocab size 256.5"),
        (lambda s: _edit_attrs(s, lambda a: a.update(valid_bytes=a["valid_bytes"] + 0.5)),
         r"is corrupted: valid_bytes is \d+\.5"),
        (lambda s: _edit_attrs(s, lambda a: a.update(train_bytes=True)),
         "is corrupted: train_bytes is True"),
        (lambda s: _edit_attrs(s, lambda a: a.update(valid_bytes=2 * a["valid_bytes"]),
                               redigest=False),
         "is corrupted: its metadata fails its checksum"),
        (lambda s: _edit_attrs(s, lambda a: a.pop("sha256"), redigest=False),
         "is corrupted: its metadata checksum is missing"),
        (lambda s: _edit_attrs(s, lambda a: a.pop("splits"), redigest=False),
         "is corrupted: its splits record is missing"),
    ],
    ids=["token-changed", "bit-flip", "chunk-missing", "vocab", "tokenizer", "valid-bytes",
         "train-bytes", "length", "vocab-float", "valid-bytes-float", "train-bytes-bool",
         "metadata-edited", "checksum-missing", "splits-missing"],
)
def test_damaged_store_is_refused(store, damage, message):
    damage(store)
    pattern = f"token store {re.escape(str(store))} {message}"
    with pytest.raises(DataError, match=pattern) as info:
        load_corpus(store)
    assert "\n" not in str(info.value)


def test_store_with_an_empty_split_is_refused(tmp_path):
    """Checked like a text corpus: a split needs at least two tokens."""
    import zarr

    attrs = {"format": "intes-tokens-1", "tokenizer": "bytes", "vocab_size": 256,
             "train_bytes": 48, "valid_bytes": 1, "source": "x"}
    group = zarr.open_group(tmp_path / "e.zarr", mode="w", zarr_format=3, attributes=attrs)
    group.create_array("train", data=np.arange(49, dtype=np.uint8))
    group.create_array("valid", data=np.zeros(0, np.uint8), chunks=(1,))
    with pytest.raises(DataError, match="too small: train has 49 tokens and valid 0"):
        load_corpus(tmp_path / "e.zarr")


def test_a_store_that_cannot_be_read_is_not_called_damaged(store, monkeypatch):
    """Permissions (tests run as root here, which ignores them: the read fails by hand)."""
    import intes.data

    def denied(path, **kwargs):
        raise PermissionError(13, "Permission denied", f"{path}/zarr.json")

    monkeypatch.setattr(intes.data.zarr, "open_group", denied)
    with pytest.raises(DataError, match=f"^token store {re.escape(str(store))} cannot be read: "
                                        "Permission denied: .*zarr.json$"):
        load_corpus(store)


@pytest.mark.parametrize(("key", "value"), [
    ("tokenizer", "bpe:300"), ("vocab_size", 300), ("train_bytes", 1), ("valid_bytes", 1),
    ("source", "another corpus"), ("splits", {}), ("format", "intes-tokens-1")])
def test_every_record_a_store_load_trusts_is_under_its_metadata_checksum(store, key, value):
    _edit_attrs(store, lambda a: a.update({key: value}), redigest=False)
    with pytest.raises(DataError, match="its metadata fails its checksum"):
        load_corpus(store)


def test_a_legacy_store_without_split_records_still_loads(store):
    """Stores from before the split and metadata checksums (format 1) have neither: what
    they hold is checked, and their tokens are read as they were."""
    made = load_corpus(store)
    _edit_attrs(store, lambda a: [a.pop("splits"), a.pop("sha256"),
                                  a.update(format="intes-tokens-1")])
    old = load_corpus(store)
    assert old.digest == made.digest and old.train.dtype == made.train.dtype


def test_prepare_refuses_an_empty_out(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from intes.cli import cli

    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "a.txt", TEXT)
    result = CliRunner().invoke(cli, ["data", "prepare", "a.txt", "--out", ""])
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        "error: empty --out; give the token store to create, e.g. --out tokens.zarr"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# --- tokenizers ---------------------------------------------------------------------------------


def test_bpe_store_round_trip(tmp_path):
    made = prepare_store(_write(tmp_path / "a.txt", TEXT), tmp_path / "b.zarr", "bpe:300")
    corpus = load_corpus(tmp_path / "b.zarr")
    assert corpus.tokenizer == made.tokenizer and 257 <= corpus.vocab_size <= 300
    assert corpus.train.dtype == np.uint16 and corpus.train[0] == 0 and corpus.valid[0] == 0
    assert len(corpus.train) < corpus.train_bytes  # merges happened
    for text in (TEXT, "héllo <sep> wörld\t\n\U0001f600", "x"):
        tokens = encode(text, corpus.tokenizer)
        assert 0 not in tokens and decode(tokens, corpus.tokenizer) == text
    assert TEXT.endswith(decode(corpus.valid[1:], corpus.tokenizer))
    # each token's bytes add up to each split's: samples are scored over their own bytes
    head = corpus.valid[1:len(corpus.valid) // 2]
    assert corpus.target_bytes(head) == len(decode(head, corpus.tokenizer).encode())


def test_bpe_training_is_deterministic(tmp_path):
    path = _write(tmp_path / "a.txt", TEXT)
    assert load_corpus(path, "bpe:280").tokenizer == load_corpus(path, "bpe:280").tokenizer


def test_bpe_tokenizer_file_is_accepted(tmp_path):
    path = _write(tmp_path / "a.txt", TEXT)
    trained = load_corpus(path, "bpe:280")
    spec = _write(tmp_path / "tok.json", trained.tokenizer)
    np.testing.assert_array_equal(load_corpus(path, str(spec)).train, trained.train)


# --- windows ------------------------------------------------------------------------------------


def test_sample_windows_are_deterministic_slices():
    tokens = np.arange(1000, dtype=np.int32) % 251
    w = sample_windows(tokens, seed=7, step=3, n_seq=16, length=32)
    assert w.shape == (16, 33) and w.dtype == np.int32
    np.testing.assert_array_equal(w, sample_windows(tokens, 7, 3, 16, 32))
    assert not np.array_equal(w, sample_windows(tokens, 7, 4, 16, 32))
    assert not np.array_equal(w, sample_windows(tokens, 8, 3, 16, 32))
    np.testing.assert_array_equal(w[:4], sample_windows(tokens, 7, 3, 4, 32))


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    step=st.integers(0, 2**31),
    n_seq=st.integers(0, 20),
    length=st.integers(0, 40),
    extra=st.integers(0, 300),
)
def test_sample_windows_stay_in_range(seed, step, n_seq, length, extra):
    tokens = np.arange(length + 1 + extra, dtype=np.int64)
    w = sample_windows(tokens, seed, step, n_seq, length)
    assert w.shape == (n_seq, length + 1)
    assert np.all(np.diff(w, axis=1) == 1)  # contiguous windows of the split
    assert np.all(w[:, 0] >= 0) and np.all(w[:, -1] < len(tokens))


def test_sample_windows_cover_the_split():
    starts = sample_windows(np.arange(100), seed=1, step=0, n_seq=5000, length=9)[:, 0]
    assert set(starts) == set(range(91))


def test_sample_windows_too_short():
    with pytest.raises(DataError, match="needs 11"):
        sample_windows(np.arange(10), 0, 0, 1, 10)


def test_eval_streams_are_evenly_spaced():
    tokens = np.arange(1000)
    w = eval_streams(tokens, n_streams=4, length=99)
    assert w.dtype == np.int32
    assert list(w[:, 0]) == [0, 300, 600, 900] and w[-1, -1] == 999
    np.testing.assert_array_equal(eval_streams(tokens, 1, 9), tokens[None, :10])


def test_eval_streams_too_short():
    with pytest.raises(DataError, match="need 400"):
        eval_streams(np.arange(399), n_streams=4, length=99)
