"""Checkpoints: exact round trips, deterministic bytes, atomic swaps, one-line corruption errors."""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from intes.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    old_sibling,
    resolve_checkpoint,
    save_checkpoint,
)
from intes.errors import CheckpointError

NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[0-9a-z_]{1,4}){0,3}", fullmatch=True)
ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.int8, np.int32, np.uint8, np.int64, np.int16]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
)
META = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.one_of(st.integers(-(2**62), 2**62), st.text(max_size=8), st.booleans(), st.none()),
    max_size=4,
)


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "emb": rng.integers(-127, 128, (16, 8), dtype=np.int8),
        "blocks.0.att.wk": rng.integers(-127, 128, (8, 8), dtype=np.int8),
        "blocks.0.ln.bias": rng.integers(-(2**31), 2**31, (8,), dtype=np.int32),
        "zeros": np.zeros((4, 4), dtype=np.int8),
    }


def _data_files(store: Path) -> dict[str, str]:
    """sha256 of every non-JSON file, by relative path."""
    return {
        p.relative_to(store).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.suffix != ".json"
    }


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        np.testing.assert_array_equal(a[name], b[name])


@settings(max_examples=25, deadline=None)
@given(arrays=st.dictionaries(NAMES, ARRAYS, min_size=1, max_size=4), meta=META)
def test_round_trip(arrays, meta):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT_NAME
        save_checkpoint(path, arrays, meta)
        loaded, loaded_meta = load_checkpoint(path)
    _assert_same(arrays, loaded)
    assert loaded_meta == meta


def test_same_arrays_give_byte_identical_data_files(tmp_path):
    arrays = _model()
    save_checkpoint(tmp_path / "a.zarr", arrays, {"step": 1, "time": 123.5})
    reordered = dict(reversed(list(arrays.items())))
    save_checkpoint(tmp_path / "b.zarr", reordered, {"step": 1, "time": 999.0})
    first, second = _data_files(tmp_path / "a.zarr"), _data_files(tmp_path / "b.zarr")
    assert first == second and len(first) == len(arrays)


def test_chunk_holds_raw_array_bytes(tmp_path):
    arrays = _model()
    save_checkpoint(tmp_path / "c.zarr", arrays, {})
    chunk = tmp_path / "c.zarr" / "blocks.0.att.wk" / "c" / "0" / "0"
    assert chunk.read_bytes() == arrays["blocks.0.att.wk"].tobytes()


def test_big_endian_input_is_stored_little_endian(tmp_path):
    arrays = {"w": np.arange(-3, 3, dtype=">i4")}
    save_checkpoint(tmp_path / "c.zarr", arrays, {})
    loaded = load_checkpoint(tmp_path / "c.zarr")[0]["w"]
    assert loaded.dtype == np.dtype("<i4") and list(loaded) == list(range(-3, 3))


def test_meta_is_plain_json(tmp_path):
    meta = {"step": np.int64(7), "shape": (2, 3), "config": {"lr": 0.5, "name": "x"}}
    save_checkpoint(tmp_path / "c.zarr", _model(), meta)
    _, loaded = load_checkpoint(tmp_path / "c.zarr")
    assert loaded == {"step": 7, "shape": [2, 3], "config": {"lr": 0.5, "name": "x"}}


@pytest.mark.parametrize("meta", [{"x": float("nan")}, {"x": object()}])
def test_bad_meta_is_refused_before_writing(tmp_path, meta):
    with pytest.raises(CheckpointError, match="not plain JSON"):
        save_checkpoint(tmp_path / "c.zarr", _model(), meta)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "zarr.json", "a b", "é"])
def test_unsafe_names_are_refused(tmp_path, name):
    with pytest.raises(CheckpointError, match="cannot save array"):
        save_checkpoint(tmp_path / "c.zarr", {name: np.zeros(2, np.int8)}, {})


def test_names_differing_in_case_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="differ only in case"):
        save_checkpoint(tmp_path / "c.zarr", {"W": np.zeros(1), "w": np.zeros(1)}, {})


def test_non_numeric_arrays_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="dtype"):
        save_checkpoint(tmp_path / "c.zarr", {"s": np.array(["a"])}, {})


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "run" / CHECKPOINT_NAME
    save_checkpoint(path, _model(), {"step": 3})
    return path


def _flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_chunk_byte_fails_checksum(saved):
    _flip_byte(saved / "emb" / "c" / "0" / "0", 5)
    with pytest.raises(CheckpointError, match="'emb' fails its checksum"):
        load_checkpoint(saved)


def test_all_zero_array_is_checked_too(saved):
    _flip_byte(saved / "zeros" / "c" / "0" / "0")
    with pytest.raises(CheckpointError, match="'zeros' fails its checksum"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: (s / "emb" / "c" / "0" / "0").write_bytes(b"garbage"),
        lambda s: (s / "emb" / "zarr.json").write_bytes(b"\x00{not json"),
        lambda s: (s / "zarr.json").write_bytes(b"garbage"),
        lambda s: (s / "zarr.json").write_text('{"zarr_format": 3}'),
    ],
    ids=["truncated-chunk", "array-metadata", "group-metadata", "group-without-attrs"],
)
def test_garbage_files_give_one_line_error(saved, damage):
    damage(saved)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(saved)
    assert "\n" not in str(info.value) and str(saved) in str(info.value)


def test_missing_array_is_reported(saved):
    shutil.rmtree(saved / "blocks.0.att.wk")
    with pytest.raises(CheckpointError, match="'blocks.0.att.wk' is missing"):
        load_checkpoint(saved)


def test_foreign_store_is_refused(tmp_path):
    import zarr

    zarr.open_group(tmp_path / "x.zarr", mode="w", attributes={"format": "other"})
    with pytest.raises(CheckpointError, match="not an intes checkpoint"):
        load_checkpoint(tmp_path / "x.zarr")


def test_missing_checkpoint_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "none.zarr")


def test_leftover_tmp_dir_does_not_hide_last_good(saved):
    partial = saved.parent / f".{saved.name}.tmp-99999"
    partial.mkdir()
    (partial / "zarr.json").write_text("{")
    arrays, meta = load_checkpoint(saved)
    _assert_same(arrays, _model())
    assert meta == {"step": 3}


def test_killed_mid_swap_loads_old_then_recovers(saved):
    saved.rename(old_sibling(saved))  # writer died between the two renames
    assert load_checkpoint(saved)[1] == {"step": 3}
    assert resolve_checkpoint(saved.parent) == saved
    save_checkpoint(saved, _model(1), {"step": 4})
    assert load_checkpoint(saved)[1] == {"step": 4}
    assert not old_sibling(saved).exists()


def test_overwrite_leaves_no_siblings(saved):
    save_checkpoint(saved, _model(1), {"step": 4})
    _assert_same(load_checkpoint(saved)[0], _model(1))
    assert sorted(p.name for p in saved.parent.iterdir()) == [CHECKPOINT_NAME]


def test_failed_write_keeps_previous_checkpoint(saved, monkeypatch):
    import intes.checkpoint as ckpt

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_array", explode)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(saved, _model(1), {"step": 4})
    _assert_same(load_checkpoint(saved)[0], _model())
    assert sorted(p.name for p in saved.parent.iterdir()) == [CHECKPOINT_NAME]


def test_a_checkpoint_that_cannot_be_read_is_not_called_damaged(saved, monkeypatch):
    """Permissions (tests run as root here, which ignores them: the read fails by hand)."""
    import intes.checkpoint as ckpt

    def denied(path, **kwargs):
        raise PermissionError(13, "Permission denied", f"{path}/zarr.json")

    monkeypatch.setattr(ckpt.zarr, "open_group", denied)
    with pytest.raises(CheckpointError, match="cannot be read: Permission denied: .*zarr.json$"):
        load_checkpoint(saved)


def test_a_run_whose_checkpoint_cannot_be_listed_is_one_error(saved, monkeypatch):
    """Path.is_file raises on a directory without permissions (Python 3.11)."""
    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_file", denied)
    with pytest.raises(CheckpointError, match="cannot be read: Permission denied: .*zarr.json$"):
        resolve_checkpoint(saved.parent)


def test_resolve_checkpoint(saved, tmp_path):
    assert resolve_checkpoint(saved.parent) == saved
    assert resolve_checkpoint(str(saved)) == saved
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="run directory"):
        resolve_checkpoint(tmp_path / "empty_run")


@pytest.mark.parametrize("damage", [
    lambda store: (store / "zarr.json").unlink(),
    lambda store: [shutil.rmtree(store), store.write_bytes(b"")],
])
def test_a_run_whose_checkpoint_is_no_zarr_group_is_told_it_is_damaged(saved, damage):
    """Not that it has no checkpoint, which is what a resume of it says differently."""
    damage(saved)
    with pytest.raises(CheckpointError, match="checkpoint .* is corrupted or unreadable "
                                              r"\(it holds no zarr.json\)"):
        resolve_checkpoint(saved.parent)


def test_symlinked_checkpoint_is_replaced_and_its_target_kept(tmp_path):
    """A symlink at the checkpoint path is moved aside and unlinked, never followed: saves
    after the first still work and the link's target keeps what it held."""
    target = tmp_path / "elsewhere.zarr"
    save_checkpoint(target, _model(), {"step": 1})
    path = tmp_path / "run" / CHECKPOINT_NAME
    path.parent.mkdir()
    path.symlink_to(target, target_is_directory=True)
    for step in (2, 3):
        save_checkpoint(path, _model(step), {"step": step})
    arrays, meta = load_checkpoint(path)
    _assert_same(arrays, _model(3))
    assert meta == {"step": 3} and not path.is_symlink()
    assert sorted(p.name for p in path.parent.iterdir()) == [CHECKPOINT_NAME]
    assert load_checkpoint(target)[1] == {"step": 1}


def test_stale_old_beside_a_complete_checkpoint_is_replaced(saved):
    """Both ``path`` and ``path.old`` exist: old is a leftover, so it goes, not ``path``."""
    save_checkpoint(old_sibling(saved), _model(2), {"step": 1})
    save_checkpoint(saved, _model(1), {"step": 4})
    _assert_same(load_checkpoint(saved)[0], _model(1))
    assert sorted(p.name for p in saved.parent.iterdir()) == [CHECKPOINT_NAME]


def _edit_attrs(store: Path, edit) -> None:
    import json

    doc = json.loads((store / "zarr.json").read_text())
    edit(doc["attributes"])
    (store / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "edit",
    [
        lambda a: a["meta"].update(step=999),
        lambda a: a["arrays"].pop("zeros"),
    ],
    ids=["step", "array-record-removed"],
)
def test_edited_metadata_fails_its_checksum(saved, edit):
    _edit_attrs(saved, edit)
    with pytest.raises(CheckpointError, match="metadata fails its checksum") as info:
        load_checkpoint(saved)
    assert "\n" not in str(info.value)


def test_a_legacy_checkpoint_without_metadata_checksum_still_loads(saved):
    """Checkpoints saved before the metadata checksum (format 1) have none: what is present
    is checked."""
    _edit_attrs(saved, lambda a: a.pop("sha256") and a.update(format="intes-ckpt-1"))
    arrays, meta = load_checkpoint(saved)
    _assert_same(arrays, _model())
    assert meta == {"step": 3}


def test_a_legacy_checkpoint_with_a_metadata_checksum_is_checked_as_it_was_made(saved):
    """Format 1 checksums cover format, meta and arrays as canonical JSON (spelled out here:
    checkpoints saved then must keep loading), and an edit still fails them."""
    def legacy(attrs: dict) -> None:
        attrs.update(format="intes-ckpt-1")
        covered = {key: attrs[key] for key in ("format", "meta", "arrays")}
        text = json.dumps(covered, sort_keys=True, separators=(",", ":"))
        attrs["sha256"] = hashlib.sha256(text.encode()).hexdigest()

    _edit_attrs(saved, legacy)
    assert load_checkpoint(saved)[1] == {"step": 3}
    _edit_attrs(saved, lambda a: a["meta"].update(step=1))
    with pytest.raises(CheckpointError, match="metadata fails its checksum"):
        load_checkpoint(saved)


@pytest.mark.parametrize("renamed", [None, "sia256"])  # dropped, or a bit flipped in its name
def test_a_checkpoint_whose_metadata_checksum_is_gone_is_refused(saved, renamed):
    """Else dropping one key would let an edited step or config through unchecked."""
    def edit(attrs: dict) -> None:
        digest = attrs.pop("sha256")
        attrs.update({renamed: digest} if renamed else {}, meta={"step": 1})

    _edit_attrs(saved, edit)
    with pytest.raises(CheckpointError, match="its metadata checksum is missing"):
        load_checkpoint(saved)


def test_reader_rereads_a_store_swapped_under_it(saved, monkeypatch):
    """``intes eval`` while training saves: a save between the group's metadata and its arrays
    would mix two versions; the reader notices the swap and returns one consistent version."""
    import intes.checkpoint as ckpt

    read_array, saves = ckpt._read_array, []

    def save_meanwhile(*args):
        if not saves:
            saves.append(1)
            save_checkpoint(saved, _model(1), {"step": 4})
        return read_array(*args)

    monkeypatch.setattr(ckpt, "_read_array", save_meanwhile)
    arrays, meta = load_checkpoint(saved)
    assert saves and meta == {"step": 4}
    _assert_same(arrays, _model(1))


def test_real_damage_is_read_once(saved, monkeypatch):
    """Only a swapped store is read again: a damaged one fails at once."""
    import intes.checkpoint as ckpt

    reads = []
    load_once = ckpt._load_once
    monkeypatch.setattr(ckpt, "_load_once", lambda src: reads.append(src) or load_once(src))
    _flip_byte(saved / "emb" / "c" / "0" / "0", 5)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_checkpoint(saved)
    assert reads == [saved]


def test_writers_take_turns(saved, monkeypatch):
    """A second save waits for the first to swap in (two writers at once could delete each
    other's only complete copy); the last one wins and nothing is left beside it."""
    import threading

    import intes.checkpoint as ckpt

    inside, release = threading.Event(), threading.Event()
    write_array = ckpt._write_array

    def slow_first(*args):
        if threading.current_thread().name == "first":
            inside.set()
            release.wait(10)
        write_array(*args)

    monkeypatch.setattr(ckpt, "_write_array", slow_first)
    first = threading.Thread(target=save_checkpoint, args=(saved, _model(1), {"step": 4}),
                             name="first")
    second = threading.Thread(target=save_checkpoint, args=(saved, _model(2), {"step": 5}))
    first.start()
    assert inside.wait(10)
    second.start()
    second.join(0.5)
    blocked = second.is_alive()
    release.set()
    first.join(10)
    second.join(10)
    assert blocked and not first.is_alive() and not second.is_alive()
    arrays, meta = load_checkpoint(saved)
    _assert_same(arrays, _model(2))
    assert meta == {"step": 5}
    assert sorted(p.name for p in saved.parent.iterdir()) == [CHECKPOINT_NAME]


def test_interrupted_swap_leaves_no_temporary_directory(saved, monkeypatch):
    """Ctrl-C between the swap's renames: the last good copy waits as .old, the partial
    temporary directory is gone, and the next save completes."""
    rename = Path.rename

    def interrupt_second(self, target):
        if self.name.startswith("."):  # tmp -> path
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(saved, _model(1), {"step": 4})
    monkeypatch.setattr(Path, "rename", rename)
    assert [p.name for p in saved.parent.iterdir()] == [old_sibling(saved).name]
    assert load_checkpoint(saved)[1] == {"step": 3}
    save_checkpoint(saved, _model(1), {"step": 4})
    assert sorted(p.name for p in saved.parent.iterdir()) == [CHECKPOINT_NAME]


def test_killed_writers_temporary_directories_are_removed(saved):
    """A writer killed outright (another pid) leaves its temporary directory; the next save
    of that path removes it, and nothing that is not one."""
    parent = saved.parent
    for name in (f".{saved.name}.tmp-99999", f".{saved.name}.tmp-1"):
        (parent / name / "emb").mkdir(parents=True)
    (parent / f".{saved.name}.tmp-notes").write_text("keep")
    (parent / ".other.zarr.tmp-5").mkdir()
    save_checkpoint(saved, _model(1), {"step": 4})
    assert sorted(p.name for p in parent.iterdir()) == sorted(
        [CHECKPOINT_NAME, f".{saved.name}.tmp-notes", ".other.zarr.tmp-5"])
