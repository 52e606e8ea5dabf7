"""Checkpoints: integer arrays + JSON metadata in one zarr v3 directory, written atomically.

A checkpoint is everything a later step needs (weights, step, seed, config), so resuming from it
must be bit-exact. Each array is one uncompressed chunk, so its chunk file holds exactly the
array's little-endian bytes: two saves of the same arrays give byte-identical non-JSON files.
Everything else (config, step, checksums) lives in the group's ``zarr.json``.

Writes go to a temporary sibling directory that is swapped in by renames, so a killed writer
leaves either the previous checkpoint or the new one, never a half-written store. The swap is:
``path -> path.old``, ``tmp -> path``, delete ``path.old``; a reader that finds only
``path.old`` (killed mid-swap) loads that. Writers of one path take turns under a lock file
(POSIX ``flock``), so two never delete each other's only complete copy; a reader whose store
was swapped under it reads the new one. A symlink at ``path`` is replaced by the new directory
and its target left as it was (nothing is deleted through a link): to keep checkpoints on
another disk, link the run directory, not the store.
"""

from __future__ import annotations

import contextlib
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

try:
    import fcntl
except ImportError:  # not POSIX: writers are not serialized
    fcntl = None

FORMAT = "intes-ckpt-2"  # its metadata checksum is required; a missing one is damage
LEGACY_FORMATS = ("intes-ckpt-1",)  # saved before the metadata checksum: checked where present
CHECKPOINT_COVERED = ("format", "meta", "arrays")  # what the metadata checksum covers
CHECKPOINT_NAME = "checkpoint.zarr"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
_RESERVED = {"zarr.json"}  # would collide with the group's own metadata file
_READ_TRIES = 5  # reads retried when a writer swapped the store in between


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


def _remove(path: Path) -> None:
    """Delete ``path`` if present: a symlink or file is unlinked (never what a link points
    to), a real directory is removed with its contents."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by the complete directory ``tmp``; the old copy dies only afterwards."""
    old = old_sibling(path)
    if os.path.lexists(path):  # a symlink is moved aside itself, its target left alone
        _remove(old)  # stale: path is complete, so old is a leftover from an earlier crash
        path.rename(old)
    # if path was missing, old (when present) is the last good version: keep it until now
    tmp.rename(path)
    _fsync_dir(path.parent)
    with contextlib.suppress(OSError):  # the new copy is in place; a leftover old is harmless
        _remove(old)


@contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    """Hold ``path``'s exclusive writer lock (``.NAME.lock`` beside it; a no-op without
    fcntl). The lock file is deleted on release so none is left behind: a waiter that then
    gets the lock on the deleted file sees it is no longer at its path and tries again."""
    if fcntl is None:
        yield
        return
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass  # deleted by the writer this one waited for: lock the next file
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling to write ``path`` into; swap it in only if the block succeeds.

    Under the writer lock no other writer is active, so temporary siblings found on entry are
    leftovers of killed writers: they are deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(path):
        leftover = re.compile(rf"\.{re.escape(path.name)}\.tmp-\d+")
        for stale in path.parent.iterdir():
            if leftover.fullmatch(stale.name):
                with contextlib.suppress(OSError):
                    _remove(stale)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            yield tmp
            _fsync_tree(tmp)
            _swap_in(tmp, path)
        finally:  # gone after a swap; after a failure or an interrupt, partial
            with contextlib.suppress(OSError):
                _remove(tmp)


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


def metadata_digest(attrs: dict, keys: tuple[str, ...]) -> str:
    """sha256 of the metadata a load trusts (``keys`` of ``attrs``) as canonical JSON: an edited
    step or byte count, or a dropped record, fails it."""
    covered = {key: attrs.get(key) for key in keys}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def metadata_problem(attrs: dict, keys: tuple[str, ...], current_format: str) -> str | None:
    """What is wrong with the metadata checksum of ``attrs``, if anything: missing in the
    current format (older formats were saved without one), or not the digest of ``keys``."""
    if attrs.get("format") == current_format and "sha256" not in attrs:
        return "its metadata checksum is missing"
    if "sha256" in attrs and attrs["sha256"] != metadata_digest(attrs, keys):
        return "its metadata fails its checksum"
    return None


def unreadable(what: str, err: OSError) -> str:
    """A read refused by permissions: the file may be intact, so nothing to restore."""
    return f"{what} cannot be read: {err.strerror}: {err.filename}"


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
    attrs["sha256"] = metadata_digest(attrs, CHECKPOINT_COVERED)
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
    if attrs.get("format") not in (FORMAT, *LEGACY_FORMATS):
        raise CheckpointError(
            f"{src} is not an intes checkpoint (format {attrs.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    problem = metadata_problem(attrs, CHECKPOINT_COVERED, FORMAT)
    if problem:
        raise CheckpointError(f"checkpoint {src} is corrupted: {problem}")
    arrays = {name: _read_array(group, src, name, rec) for name, rec in attrs["arrays"].items()}
    return arrays, attrs["meta"]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _load_once(src: Path) -> tuple[dict[str, np.ndarray], dict]:
    try:
        return _read_store(src)
    except CheckpointError:
        raise
    except PermissionError as err:
        raise CheckpointError(unreadable(f"checkpoint {src}", err)) from None
    except Exception as err:  # zarr/json/numpy failures on damaged files: report, not trace
        raise CheckpointError(
            f"checkpoint {src} is corrupted or unreadable ({_one_line(err)}); "
            "restore it or start a new run"
        ) from None


def _identity(src: Path | None) -> tuple | None:
    """Which directory ``src`` is now (name and inode): a swap by a writer changes it."""
    if src is None:
        return None
    try:
        st = os.stat(src)
    except OSError:
        return None
    return src, st.st_dev, st.st_ino


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and metadata of the checkpoint at ``path``, verified against their checksums.

    A writer may swap in a new version while this reads (``intes eval`` during training):
    if the read fails and ``path`` now names another directory, it is read again.
    """
    tries = 1
    while True:
        src = existing_version(Path(path))
        if src is None:
            raise CheckpointError(f"no checkpoint at {path}")
        before = _identity(src)
        try:
            return _load_once(src)
        except CheckpointError:
            if tries == _READ_TRIES or _identity(existing_version(Path(path))) == before:
                raise
        tries += 1


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint store of a run directory, or ``path`` itself if it is a checkpoint."""
    path = Path(path).expanduser()
    for store in (path / CHECKPOINT_NAME, path):
        found = existing_version(store)
        try:
            if found is not None and (found / "zarr.json").is_file():
                return store
        except PermissionError as err:
            raise CheckpointError(unreadable(f"checkpoint {store}", err)) from None
    if existing_version(path / CHECKPOINT_NAME) is not None:  # there, but not a zarr group
        raise CheckpointError(f"checkpoint {path / CHECKPOINT_NAME} is corrupted or unreadable "
                              "(it holds no zarr.json); restore it or start a new run")
    raise CheckpointError(
        f"no checkpoint at {path}: give a run directory containing {CHECKPOINT_NAME} "
        "or a .zarr checkpoint"
    )
