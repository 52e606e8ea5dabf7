"""Checkpoints: integer arrays + JSON metadata in one zarr v3 directory, written atomically.

A checkpoint is everything a later step needs (weights, step, seed, config), so resuming from it
must be bit-exact. Each array is one uncompressed chunk, so its chunk file holds exactly the
array's little-endian bytes: two saves of the same arrays give byte-identical non-JSON files.
Everything else (config, step, checksums) lives in the group's ``zarr.json``.

Writes go to a temporary sibling directory that is swapped in by renames, so a killed writer
leaves either the previous checkpoint or the new one, never a half-written store. The swap is:
``path -> path.old``, ``tmp -> path``, delete ``path.old``; a reader that finds only
``path.old`` (killed mid-swap) loads that.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from intes.errors import CheckpointError

FORMAT = "intes-ckpt-1"
CHECKPOINT_NAME = "checkpoint.zarr"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
_RESERVED = {"zarr.json"}  # would collide with the group's own metadata file


def old_sibling(path: Path) -> Path:
    """Where the previous version of ``path`` waits while a new one is swapped in."""
    return path.with_name(path.name + ".old")


def existing_version(path: Path) -> Path | None:
    """``path`` if complete, else its ``.old`` sibling left by a writer killed mid-swap."""
    path = Path(path)
    if path.exists():
        return path
    old = old_sibling(path)
    return old if old.exists() else None


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` so the renames below publish real data."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by the complete directory ``tmp``; the old copy dies only afterwards."""
    old = old_sibling(path)
    if path.exists():
        if old.exists():  # stale: path is complete, so old is a leftover from an earlier crash
            shutil.rmtree(old)
        path.rename(old)
    # if path was missing, old (when present) is the last good version: keep it until now
    tmp.rename(path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling to write ``path`` into; swap it in only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, path)


def array_digest(a: np.ndarray) -> str:
    """sha256 over dtype, shape and raw bytes: catches any change to what an array means."""
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}|{','.join(map(str, a.shape))}|".encode())
    h.update(a.tobytes(order="C"))
    return h.hexdigest()


def _little_endian(name: str, a: Any) -> np.ndarray:
    """The array as contiguous little-endian numbers, so chunk bytes equal its raw bytes."""
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise CheckpointError(f"cannot save array '{name}' of dtype {a.dtype}: use numeric arrays")
    return np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")


def _check_names(names: list[str]) -> None:
    """Names become directory names: keep them portable and collision-free."""
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.lower() in _RESERVED:
            raise CheckpointError(
                f"cannot save array named {name!r}: use up to 200 letters, digits, '_', '.', '-'"
            )
        clash = seen.setdefault(name.lower(), name)
        if clash != name:
            raise CheckpointError(f"array names {clash!r} and {name!r} differ only in case")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _plain_json(meta: dict) -> dict:
    """``meta`` as plain JSON types (numpy scalars -> Python, tuples -> lists)."""
    try:
        return json.loads(json.dumps(meta, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint metadata is not plain JSON: {err}") from None


def _write_array(group: zarr.Group, name: str, a: np.ndarray) -> None:
    """One chunk, no codecs beyond raw little-endian bytes: deterministic on-disk bytes."""
    chunks = tuple(max(1, d) for d in a.shape)
    arr = group.create_array(
        name,
        shape=a.shape,
        dtype=a.dtype,
        chunks=chunks,
        compressors=None,
        filters=None,
        fill_value=0,
        config={"write_empty_chunks": True},
    )
    arr[...] = a


def save_checkpoint(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write ``arrays`` and ``meta`` to the zarr directory ``path``, replacing it atomically."""
    names = sorted(arrays)
    _check_names(names)
    clean = {name: _little_endian(name, arrays[name]) for name in names}
    records = {
        name: {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": array_digest(a)}
        for name, a in clean.items()
    }
    attrs = {"format": FORMAT, "meta": _plain_json(meta), "arrays": records}
    with atomic_directory(Path(path)) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3, attributes=attrs)
        for name, a in clean.items():
            _write_array(group, name, a)


def _read_array(group: zarr.Group, src: Path, name: str, record: dict) -> np.ndarray:
    """Read one listed array and check it against its recorded dtype, shape and checksum."""
    try:
        node = group[name]
    except KeyError:
        raise CheckpointError(f"checkpoint {src} is corrupted: array {name!r} is missing") from None
    a = np.asarray(node[...])
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    if a.dtype.str != record["dtype"] or list(a.shape) != list(record["shape"]):
        raise CheckpointError(
            f"checkpoint {src} is corrupted: array {name!r} is {a.dtype.str}{list(a.shape)}, "
            f"expected {record['dtype']}{list(record['shape'])}"
        )
    if array_digest(a) != record["sha256"]:
        raise CheckpointError(f"checkpoint {src} is corrupted: array {name!r} fails its checksum")
    return a


def _read_store(src: Path) -> tuple[dict[str, np.ndarray], dict]:
    group = zarr.open_group(src, mode="r")
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise CheckpointError(
            f"{src} is not an intes checkpoint (format {attrs.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    arrays = {name: _read_array(group, src, name, rec) for name, rec in attrs["arrays"].items()}
    return arrays, attrs["meta"]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and metadata of the checkpoint at ``path``, verified against their checksums."""
    src = existing_version(Path(path))
    if src is None:
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return _read_store(src)
    except CheckpointError:
        raise
    except Exception as err:  # zarr/json/numpy failures on damaged files: report, not trace
        raise CheckpointError(
            f"checkpoint {src} is corrupted or unreadable ({_one_line(err)}); "
            "restore it or start a new run"
        ) from None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint store of a run directory, or ``path`` itself if it is a checkpoint."""
    path = Path(path).expanduser()
    for store in (path / CHECKPOINT_NAME, path):
        found = existing_version(store)
        if found is not None and (found / "zarr.json").is_file():
            return store
    raise CheckpointError(
        f"no checkpoint at {path}: give a run directory containing {CHECKPOINT_NAME} "
        "or a .zarr checkpoint"
    )
