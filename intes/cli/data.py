"""``intes data prepare``: tokenize a corpus once into a zarr token store for pretraining."""

from __future__ import annotations

from pathlib import Path

import click

from intes.checkpoint import existing_version
from intes.data import prepare_store
from intes.engine import TrainConfig
from intes.errors import DataError

DEFAULT_SEQ_LEN = TrainConfig().seq_len


@click.group()
def data() -> None:
    """Prepare corpora for pretraining."""


@data.command()
@click.argument("path", required=False)
@click.option("--out", required=True, metavar="STORE.zarr", help="Token store to create")
@click.option("--tokenizer", default="bytes", show_default=True,
              help="bytes, bpe:VOCAB (trained on the train split; at most the merges the text "
                   "allows) or a tokenizers .json file whose token '<sep>' has id 0")
def prepare(path: str | None, out: str, tokenizer: str) -> None:
    """Tokenize PATH (file, directory or glob; default: Python stdlib) into STORE.zarr.

    Pass the store to `intes pretrain --data STORE.zarr`: it carries its tokenizer and split.
    """
    if not out.strip():  # Path("") is the current directory, never a store to create
        raise DataError("empty --out; give the token store to create, e.g. --out tokens.zarr")
    store = Path(out).expanduser()
    if existing_version(store) is not None:
        raise DataError(f"{store} already exists; remove it or choose another --out")
    corpus = prepare_store(path, store, tokenizer)
    kind = "bytes" if corpus.tokenizer == "bytes" else "BPE"
    asked = tokenizer.strip().removeprefix("bpe:")
    if asked.isascii() and asked.isdigit() and int(asked) > corpus.vocab_size:
        kind += f"; {asked} asked, the text allowed no more merges"
    click.echo(f"wrote {store}: {len(corpus.train):,} train + {len(corpus.valid):,} valid "
               f"tokens ({corpus.train_bytes:,} + {corpus.valid_bytes:,} bytes of text), "
               f"vocab {corpus.vocab_size} ({kind}), from {corpus.source}")
    if len(corpus.train) <= DEFAULT_SEQ_LEN:
        click.echo(f"note: the train split has only {len(corpus.train):,} tokens; pretrain "
                   f"needs more than --seq-len ({DEFAULT_SEQ_LEN} by default), so give more "
                   "text or a shorter --seq-len")
