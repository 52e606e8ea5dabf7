"""The ``intes`` command line as a user meets it: runs, resume, eval/sample/info, bad input.

Every bad input must give one ``error:`` line and a non-zero exit, never a traceback, and must
leave what is on disk as it was.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import intes.cli
from intes.checkpoint import (
    CHECKPOINT_COVERED,
    CHECKPOINT_NAME,
    load_checkpoint,
    metadata_digest,
    save_checkpoint,
)
from intes.cli import cli, main
from intes.cli.evaluate import printable
from intes.data import load_corpus
from intes.errors import DataError, Interrupted
from intes.runs import intes_version, load_engine, load_run
from intes.sampling import generate
from intes.tokenizer import decode, encode
from intes.validation import Validation, validation_bpb

TINY = ["--model", "rwkv", "--dim", "16", "--layers", "1", "--population", "8", "--seq-len", "8",
        "--seed", "5", "--eval-streams", "4", "--eval-len", "32", "--backend", "reference",
        "--no-progress"]
FAST_EVAL = ["--streams", "4", "--length", "32", "--backend", "reference"]
PRETRAIN_MODULE = importlib.import_module("intes.cli.pretrain")  # the attribute is the command
EVALUATE_MODULE = importlib.import_module("intes.cli.evaluate")


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, exit_code: int = 1) -> None:
    """One ``error:`` line on stderr, the expected status, no traceback anywhere."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def digest(run: Path) -> str:
    """sha256 of a checkpoint's array files (zarr metadata left out), as the acceptance check."""
    store = run / CHECKPOINT_NAME
    h = hashlib.sha256()
    for p in sorted(q for q in store.rglob("*") if q.is_file() and not q.name.endswith(".json")):
        h.update(p.relative_to(store).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    words = "def return self value import class for while if else print none true".split()
    lines = (" ".join(words[(i * 5 + j * j + i // 3) % len(words)] for j in range(10))
             for i in range(360))
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_file) -> Path:
    out = tmp_path_factory.mktemp("runs") / "a"
    result = invoke("pretrain", *TINY, "--data", text_file, "--steps", 4, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("pretrain", "eval", "sample", "info", "data"):
        assert name in result.output


def test_version_is_the_package_s():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output == f"intes {intes_version()}\n"


def test_two_steps_then_resume_equals_four_steps(run_dir, text_file, tmp_path):
    out = tmp_path / "b"
    assert invoke("pretrain", *TINY, "--data", text_file, "--steps", 2, "--out", out).exit_code == 0
    result = invoke("pretrain", "--steps", 4, "--out", out, "--resume", "--backend", "reference",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    assert "resuming at step 2" in result.output
    assert "validation sample: 4 x 32 tokens" in result.output  # the run's, not the defaults
    assert digest(out) == digest(run_dir)


def test_eval_prints_bits_per_byte(run_dir, text_file):
    for target in (run_dir, run_dir / CHECKPOINT_NAME):
        result = invoke("eval", target, *FAST_EVAL)
        assert result.exit_code == 0, result.output
        assert result.output.startswith("validation bits per byte: ")
        assert "step 4" in result.output
    explicit = invoke("eval", run_dir, "--data", text_file, *FAST_EVAL)
    assert explicit.output.split("(")[0] == result.output.split("(")[0]
    engine, corpus = load_run(run_dir, "reference")
    bpb = validation_bpb(engine, corpus, Validation.of(corpus, 4, 32).windows)
    assert result.output.startswith(f"validation bits per byte: {bpb:.4f} (step 4, ")
    assert result.output.rstrip().endswith("only 128 tokens scored, a rough figure)")


def test_eval_scores_the_whole_valid_split_by_default(run_dir, text_file):
    valid = load_corpus(str(text_file)).valid
    result = invoke("eval", run_dir, "--length", 16, "--backend", "reference")
    assert result.exit_code == 0, result.output
    assert f"{len(valid) // 17:,} x 16 tokens" in result.output
    assert "on the same tokens unigram" in result.output


def test_sample_continues_the_prompt_reproducibly(run_dir):
    args = ("sample", run_dir, "--prompt", "def ", "--tokens", 8, "--seed", 3, "--backend",
            "reference")
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == 0, first.output
    assert first.output.startswith("def ") and first.output == second.output
    engine, _ = load_engine(run_dir, "reference")
    prompt = encode("def ", "bytes")
    for flags, tokens in (((), generate(engine, prompt, 8, seed=3)),
                          (("--greedy",), generate(engine, prompt, 8, greedy=True))):
        result = invoke(*args, *flags)
        assert result.output == "def " + decode(tokens, "bytes").replace("\0", "\n") + "\n"
    assert invoke(*args[:-3], 4, "--backend", "reference").output != first.output  # seed 4


def test_sample_shows_control_characters_escaped_on_a_terminal(run_dir, monkeypatch):
    """An ESC a model makes would start an escape sequence the terminal obeys; piped, the
    text stays as made."""
    monkeypatch.setattr(EVALUATE_MODULE, "stream", lambda *a, **k: iter(b"a\x1b[2Jb\tc\x00d\x7f"))
    piped = invoke("sample", run_dir, "--prompt", "p\x07")
    assert piped.exit_code == 0 and piped.output == "p\x07a\x1b[2Jb\tc\nd\x7f\n"
    monkeypatch.setattr(EVALUATE_MODULE, "on_terminal", lambda: True)
    shown = invoke("sample", run_dir, "--prompt", "p\x07")
    assert shown.exit_code == 0 and shown.output == "p\\x07a\\x1b[2Jb\tc\nd\\x7f\n"


def test_sample_temperature_shift_sharpens_to_the_argmax(run_dir):
    """At shift -8 only the top logits keep weight, so the draws are --greedy's picks; the
    flag's range is -8..8."""
    args = ("sample", run_dir, "--prompt", "def ", "--tokens", 8, "--seed", 3, "--backend",
            "reference")
    greedy, sharp = invoke(*args, "--greedy"), invoke(*args, "--temperature-shift", -8)
    assert sharp.exit_code == 0, sharp.output
    assert sharp.output == greedy.output
    assert invoke(*args, "--temperature-shift", 8).output != greedy.output  # the shift is used
    for shift in (9, -9):
        result = invoke(*args, "--temperature-shift", shift)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def test_sample_refuses_a_prompt_that_is_not_utf8(run_dir):
    assert_user_error(invoke("sample", run_dir, "--prompt", "caf\udce9", "--tokens", 2))


@given(st.lists(st.integers(0, 255), max_size=60))
def test_sample_prints_byte_tokens_as_decode_would(tokens):
    """Printed piece by piece as they come, a byte model's tokens read as one decode."""
    assert "".join(printable(iter(tokens), "bytes")) == decode(tokens, "bytes")


def test_sample_prints_bpe_tokens_as_decode_would(text_file):
    text = "naïve café — 変換 def return\n" * 3
    tokenizer = load_corpus(text_file, tokenizer="bpe:300").tokenizer
    tokens = encode(text, tokenizer).tolist()
    pieces = list(printable(iter(tokens), tokenizer))
    assert "".join(pieces) == decode(tokens, tokenizer) == text
    assert len(pieces) > len(text) // 8  # printed as it goes, not at the end


@pytest.fixture(scope="module")
def word_start_tokenizer() -> str:
    """A tokenizer whose decoder marks word starts (Metaspace, "▁"), as SentencePiece models
    do: decoding tokens one piece at a time loses the spaces between words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Metaspace()])
    special = ["<sep>"] + [f"<0x{i:02X}>" for i in range(256)]
    text = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(100)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, special_tokens=special,
                                                      show_progress=False))
    return tok.to_str()


@settings(max_examples=25, deadline=None)
@given(prompt=st.text(max_size=20), text=st.text(max_size=40))
def test_sample_prints_word_start_tokens_as_decode_would(word_start_tokenizer, prompt, text):
    tokenizer = word_start_tokenizer
    context = encode(prompt, tokenizer).tolist()
    tokens = encode(text, tokenizer).tolist()
    pieces = list(printable(iter(tokens), tokenizer, context=context))
    assert decode(context, tokenizer) + "".join(pieces) == decode(context + tokens, tokenizer)


def test_info_describes_the_checkpoint(run_dir):
    result = invoke("info", run_dir)
    assert result.exit_code == 0, result.output
    for needle in ("step: 4", "dim 16, 1 layer,", "parameters: ", "tokenizer: bytes", "small.txt",
                   "bits per byte", "backends: reference", "cpu GEMM: "):
        assert needle in result.output


def test_alpha_flags_reach_the_checkpoint(text_file, tmp_path):
    result = invoke("pretrain", *TINY, "--data", text_file, "--steps", 1, "--alpha-steps", 77,
                    "--alpha-final-log2", 3, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "alpha 1 -> 2^-3 over 77 steps, seed 5" in result.output, result.output  # the header
    info = invoke("info", tmp_path / "run")
    assert "alpha 1 -> 2^-3 over 77 steps" in info.output, info.output
    assert_user_error(invoke("pretrain", *TINY, "--data", text_file, "--steps", 1,
                             "--alpha-steps", 0, "--out", tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_every_config_flag_reaches_the_run(monkeypatch, text_file, tmp_path):
    """Each flag of CONFIG_FLAGS, given a value other than its default, lands in the
    TrainConfig the run gets, and each run flag in its RunOptions; with neither --steps nor
    --time-limit it runs 10 minutes."""
    runs = []
    monkeypatch.setattr(PRETRAIN_MODULE, "run_pretraining",
                        lambda config, corpus, options, backend: runs.append((config, options)))
    flags = {"model": "egg", "layers": 2, "dim": 24, "population": 12, "group_size": 4,
             "rank": 3, "sigma_shift": 5, "noise_reuse": 2, "fitness": "sign",
             "alpha_steps": 77, "alpha_final_log2": 2, "seq_len": 9, "seed": 123}
    assert set(flags) == set(PRETRAIN_MODULE.CONFIG_FLAGS)
    run_flags = {"chunk_pairs": 3, "eval_every": 7, "eval_streams": 5, "eval_len": 17,
                 "checkpoint_every": 11}
    args = [a for name, value in {**flags, **run_flags}.items()
            for a in (f"--{name.replace('_', '-')}", value)]
    result = invoke("pretrain", *args, "--data", text_file, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    (config, options), = runs
    tree = config.to_dict()
    for name, path in PRETRAIN_MODULE.CONFIG_FLAGS.items():
        value = tree
        for key in path:
            value = value[key]
        assert value == flags[name], name
    for name, value in run_flags.items():
        assert getattr(options, name) == value, name
    assert options.steps is None and options.time_limit == PRETRAIN_MODULE.DEFAULT_TIME_LIMIT


def test_data_prepare_makes_a_store_pretrain_can_use(text_file, tmp_path):
    store = tmp_path / "tokens.zarr"
    result = invoke("data", "prepare", text_file, "--out", store)
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "vocab 256" in result.output
    assert "note:" not in result.output
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n", encoding="utf-8")
    tiny = invoke("data", "prepare", short, "--out", tmp_path / "short.zarr")
    assert tiny.exit_code == 0 and "note: the train split has only" in tiny.output
    run = invoke("pretrain", *TINY, "--data", store, "--steps", 1, "--out", tmp_path / "r")
    assert run.exit_code == 0, run.output
    before = snapshot(store)
    assert_user_error(invoke("data", "prepare", text_file, "--out", store))
    assert snapshot(store) == before


def test_eval_refuses_a_store_of_another_tokenizer_with_the_same_vocab(text_file, tmp_path):
    """Only the vocab sizes were compared: a run was scored on tokens that mean other text."""
    other = tmp_path / "other.txt"
    other.write_text("".join(f"while n{i} > {i}: n{i} -= {i * 7 % 13}\n" for i in range(400)),
                     encoding="utf-8")
    stores = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    for text, store in zip((text_file, other), stores, strict=True):
        made = invoke("data", "prepare", text, "--out", store, "--tokenizer", "bpe:300")
        assert made.exit_code == 0 and "vocab 300" in made.output, made.output
    run = invoke("pretrain", *TINY, "--data", stores[0], "--steps", 1, "--out", tmp_path / "r")
    assert run.exit_code == 0, run.output
    assert invoke("eval", tmp_path / "r", *FAST_EVAL, "--data", stores[0]).exit_code == 0
    result = invoke("eval", tmp_path / "r", *FAST_EVAL, "--data", stores[1])
    assert_user_error(result)
    assert "is tokenized with another tokenizer than the one to use (--tokenizer, or the run's)" \
        in result.stderr  # a run on a store of the same vocab but other merges
    bytes_run = invoke("pretrain", *TINY, "--data", text_file, "--steps", 1, "--out",
                       tmp_path / "rb")
    assert bytes_run.exit_code == 0, bytes_run.output
    result = invoke("eval", tmp_path / "rb", *FAST_EVAL, "--data", stores[1])  # vocab 300
    assert_user_error(result)
    assert "tokenized with another tokenizer than the run's" in result.stderr


@pytest.mark.parametrize("bad", [["--population", "15"], ["--dim", "-4"], ["--group-size", "3"],
                                 ["--steps", "0"], ["--data", "MISSING"], ["--data", "EMPTY"],
                                 ["--data", "BINARY"], ["--data", ""], ["--seq-len", "60000"]])
def test_bad_pretrain_input_is_one_line_and_writes_nothing(bad, text_file, tmp_path):
    files = {"MISSING": tmp_path / "nope.txt", "EMPTY": tmp_path / "empty.txt",
             "BINARY": tmp_path / "blob.bin"}
    files["EMPTY"].write_bytes(b"")
    files["BINARY"].write_bytes(bytes(range(256)) * 8)
    args = [str(files.get(a, a)) for a in bad]
    data = [] if "--data" in bad else ["--data", text_file]
    out = tmp_path / "run"
    result = invoke("pretrain", *TINY, *data, "--steps", 1, *args, "--out", out)
    assert_user_error(result)
    assert not out.exists()


@pytest.mark.parametrize("args", [["pretrain", "--model", "transformer"],
                                  ["pretrain", "--eval-len", "65537"],  # past an int32 row sum
                                  ["eval", "RUN", "--length", "65537"]])
def test_usage_errors_exit_2(tmp_path, args):
    result = invoke(*args, "--out" if args[0] == "pretrain" else "--data", tmp_path / "run")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "run").exists()


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def test_existing_run_without_resume_is_refused_untouched(run_copy, text_file):
    before = snapshot(run_copy)
    result = invoke("pretrain", *TINY, "--data", text_file, "--steps", 2, "--out", run_copy)
    assert_user_error(result)
    assert "--resume" in result.stderr
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("flag", [["--dim", "32"], ["--seed", "6"], ["--fitness", "sign"],
                                  ["--eval-len", "16"]])
def test_resume_with_another_config_is_refused_untouched(run_copy, flag):
    before = snapshot(run_copy)
    result = invoke("pretrain", "--steps", 6, "--out", run_copy, "--resume", *flag)
    assert_user_error(result)
    assert "checkpoint" in result.stderr
    assert snapshot(run_copy) == before


def _edit_meta(run: Path, **values) -> None:
    """A consistent edit of a checkpoint's metadata: its checksum made again to match."""
    path = run / CHECKPOINT_NAME / "zarr.json"
    doc = json.loads(path.read_text())
    attrs = doc["attributes"]
    attrs["meta"].update(values)
    attrs["sha256"] = metadata_digest(attrs, CHECKPOINT_COVERED)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(("values", "said"), [
    ({"step": "abc"}, "its step is 'abc', not a step count"),
    ({"step": True}, "its step is True, not a step count"),
    ({"tokenizer": 7}, "its tokenizer is 7, not a tokenizer spec"),
    ({"eval_sample": [8]}, "its eval_sample is [8], not streams and length"),
    ({"data_tokens": "x"}, "its data_tokens is 'x', not two token counts"),
])
@pytest.mark.parametrize("command", ["eval", "sample", "resume"])
def test_checkpoint_metadata_of_another_form_is_one_line(run_copy, values, said, command):
    _edit_meta(run_copy, **values)
    before = snapshot(run_copy)
    args = {"eval": ["eval", run_copy, "--streams", 2], "sample": ["sample", run_copy],
            "resume": ["pretrain", "--steps", 6, "--out", run_copy, "--resume"]}[command]
    result = invoke(*args)
    assert_user_error(result)
    assert f"is corrupted: {said}" in result.stderr
    assert snapshot(run_copy) == before


def test_a_plot_whose_copy_cannot_be_written_is_named_by_the_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from intes.plot import plot_validation

    def full(self, path, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(OSError, match=f"No space left on device: '{tmp_path / 'loss.png'}'"):
        plot_validation([{"step": 0, "val_bpb": 8.0, "elapsed_s": 1.0}], (4.7, 3.6),
                        tmp_path / "loss.png")
    assert list(tmp_path.iterdir()) == []


def test_a_plot_that_cannot_be_written_is_named_in_one_line(run_copy):
    (run_copy / "loss.png").unlink()
    (run_copy / "loss.png").mkdir()
    result = invoke("pretrain", "--steps", 6, "--out", run_copy, "--resume")
    assert_user_error(result)
    assert f"{run_copy / 'loss.png'}: Is a directory" in result.stderr


def test_resume_on_changed_data_is_refused_untouched(text_file, tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    shutil.copy(text_file, data / "a.txt")
    out = tmp_path / "run"
    assert invoke("pretrain", *TINY, "--data", data, "--steps", 2, "--out", out).exit_code == 0
    (data / "b.txt").write_text("more text, added after the checkpoint\n" * 20, encoding="utf-8")
    before = snapshot(out)
    result = invoke("pretrain", "--steps", 4, "--out", out, "--resume", "--no-progress")
    assert_user_error(result)
    assert "data changed" in result.stderr
    assert snapshot(out) == before


def test_a_run_whose_data_is_gone_says_so(text_file, tmp_path):
    data = tmp_path / "gone.txt"
    shutil.copy(text_file, data)
    out = tmp_path / "run"
    assert invoke("pretrain", *TINY, "--data", data, "--steps", 2, "--out", out).exit_code == 0
    data.unlink()
    for args in (["eval", out, *FAST_EVAL], ["pretrain", "--out", out, "--resume", "--steps", 4]):
        result = invoke(*args)
        assert_user_error(result)
        assert "the run's data" in result.stderr and "--data" in result.stderr
    assert invoke("eval", out, *FAST_EVAL, "--data", text_file).exit_code == 0


def test_an_out_below_a_file_is_one_line_naming_it(text_file, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    for args in (["pretrain", *TINY, "--data", text_file, "--steps", 1, "--out", blocker / "run"],
                 ["data", "prepare", text_file, "--out", blocker / "s.zarr"]):
        result = invoke(*args)
        assert_user_error(result)
        assert str(blocker) in result.stderr and "Errno" not in result.stderr
        assert "file" in result.stderr
    assert blocker.read_text() == "not a directory"


def test_resume_past_its_steps_does_nothing_and_says_so(run_copy):
    before = snapshot(run_copy)
    result = invoke("pretrain", "--out", run_copy, "--resume", "--steps", 3, "--no-progress",
                    "--backend", "reference")
    assert result.exit_code == 0, result.output
    assert "already at step 4 (asked for 3); raise --steps to train further" in result.output
    assert snapshot(run_copy) == before


def test_resume_needs_a_checkpoint(tmp_path, run_copy, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a run without --out would go (runs/...)
    assert_user_error(invoke("pretrain", "--steps", 2, "--resume"))
    assert_user_error(invoke("pretrain", "--steps", 2, "--resume", "--out", tmp_path / "none"))
    before = snapshot(run_copy)
    result = invoke("pretrain", "--steps", 6, "--resume", "--out", run_copy / CHECKPOINT_NAME)
    assert_user_error(result)
    assert f"give its run directory, {run_copy}" in result.stderr
    assert snapshot(run_copy) == before
    assert not Path("runs").exists()


def test_runs_started_in_the_same_second_get_directories_of_their_own(tmp_path, text_file,
                                                                      monkeypatch):
    """The default --out is named by the second; a seed sweep started in parallel wrote all
    its runs into one directory, each reporting success."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(PRETRAIN_MODULE.time, "strftime", lambda fmt: "20261205-120000")
    for seed in (1, 2, 3):
        result = invoke("pretrain", *TINY, "--data", text_file, "--steps", 1, "--seed", seed)
        assert result.exit_code == 0, result.output
    base = "rwkv-d16-l1-20261205-120000"
    assert sorted(p.name for p in Path("runs").iterdir()) == [base, f"{base}-2", f"{base}-3"]
    seeds = [load_checkpoint(Path("runs", name, CHECKPOINT_NAME))[1]["config"]["seed"]
             for name in (base, f"{base}-2", f"{base}-3")]
    assert seeds == [1, 2, 3]


def test_a_default_run_that_fails_leaves_no_directory(tmp_path, text_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(invoke("pretrain", *TINY, "--data", text_file, "--steps", 1,
                             "--seq-len", 50_000))  # longer than the text: refused in the run
    assert not Path("runs").exists()
    Path("runs").mkdir()
    assert_user_error(invoke("pretrain", *TINY, "--data", text_file, "--steps", 1,
                             "--seq-len", 50_000))
    assert list(Path("runs").iterdir()) == []


def damage(store: Path, how: str) -> None:
    """Rewrite a checkpoint, checksums and all, as one that loads but is not a run's."""
    arrays, meta = load_checkpoint(store)
    if how == "shape":
        arrays["head"] = arrays["head"].reshape(arrays["head"].shape[::-1])
    elif how == "dtype":
        arrays["head"] = arrays["head"].astype(np.int16)
    elif how == "missing":
        del arrays["head"]
    elif how == "meta":
        meta = {"step": 1}
    else:  # a config the model classes do not take
        meta["config"]["model"]["width"] = 16
    save_checkpoint(store, arrays, meta)


@pytest.mark.parametrize("how, says", [("shape", "'head' is int8[16, 256], expected "
                                                 "int8[256, 16]"),
                                       ("dtype", "'head' is int16[256, 16]"),
                                       ("missing", "'head' is missing"),
                                       ("meta", "its metadata lacks config, tokenizer, "
                                                "vocab_size"),
                                       ("config", "bad config")])
def test_a_checkpoint_that_is_not_its_config_s_is_one_line(run_copy, how, says):
    """Weights that do not fit the config, or metadata that is not a pretraining run's, are
    refused in one line by every command that loads them, and nothing is written."""
    damage(run_copy / CHECKPOINT_NAME, how)
    before = snapshot(run_copy)
    commands = [["eval", run_copy, *FAST_EVAL],
                ["sample", run_copy, "--tokens", 2, "--backend", "reference"],
                ["pretrain", "--out", run_copy, "--resume", "--steps", 6, "--backend",
                 "reference", "--no-progress"],
                ["info", run_copy]]
    for args in commands:
        result = invoke(*args)
        assert_user_error(result)
        assert says in result.stderr, (args[0], result.stderr)
    assert snapshot(run_copy) == before


def test_resume_on_data_tokenized_differently_is_refused_untouched(text_file, tmp_path):
    """Two BPE stores of the same vocab size, trained on different text: the model fits
    either, but the token ids mean other things."""
    upper = tmp_path / "upper.txt"
    upper.write_text(text_file.read_text(encoding="utf-8").upper(), encoding="utf-8")
    for name, source in (("a", text_file), ("b", upper)):
        prepared = invoke("data", "prepare", source, "--out", tmp_path / f"{name}.zarr",
                          "--tokenizer", "bpe:260")
        assert prepared.exit_code == 0 and "vocab 260" in prepared.output, prepared.output
    out = tmp_path / "run"
    assert invoke("pretrain", *TINY, "--data", tmp_path / "a.zarr", "--steps", 1,
                  "--out", out).exit_code == 0
    before = snapshot(out)
    result = invoke("pretrain", "--steps", 2, "--out", out, "--resume", "--data",
                    tmp_path / "b.zarr", "--backend", "reference", "--no-progress")
    assert_user_error(result)
    assert "tokenized differently (another tokenizer of the same vocab, 260)" in result.stderr
    assert snapshot(out) == before


def test_corrupted_checkpoint_is_one_line(run_copy):
    chunk = sorted(p for p in (run_copy / CHECKPOINT_NAME).rglob("*")
                   if p.is_file() and not p.name.endswith(".json"))[0]
    chunk.write_bytes(b"garbage\n")
    for args in (["eval", run_copy], ["sample", run_copy, "--tokens", 2], ["info", run_copy],
                 ["pretrain", "--out", run_copy, "--resume", "--steps", 6]):
        result = invoke(*args)
        assert_user_error(result)
        assert "corrupted" in result.stderr


def test_missing_checkpoint_is_one_line(tmp_path):
    for command in ("eval", "sample", "info"):
        assert_user_error(invoke(command, tmp_path / "nothing"))


def test_main_maps_outcomes_to_exit_codes(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # where a run without --out would go (runs/...)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as ok:
        main(["--help"])
    assert ok.value.code == 0
    with pytest.raises(SystemExit) as bad:
        main(["pretrain", "--population", "15"])
    assert bad.value.code == 1
    assert capsys.readouterr().err.strip() == "error: population must be a positive even " \
                                              "number, got 15"
    with pytest.raises(SystemExit) as usage:
        main(["pretrain", "--no-such-flag"])
    assert usage.value.code == 2
    capsys.readouterr()
    monkeypatch.setattr(PRETRAIN_MODULE, "load_corpus", interrupted)
    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "--steps", "1"])
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"

    def reported(*args, **kwargs):  # a run already said where its checkpoint is
        raise Interrupted

    monkeypatch.setattr(PRETRAIN_MODULE, "load_corpus", reported)
    with pytest.raises(SystemExit) as quiet:
        main(["pretrain", "--steps", "1"])
    assert quiet.value.code == 130 and capsys.readouterr().err == ""
    assert not Path("runs").exists()


def test_ctrl_c_while_the_cli_is_imported_exits_130_without_a_traceback(monkeypatch, capsys):
    """The command's imports take a few tenths of a second; Ctrl-C there was a traceback."""
    import intes.__main__

    class CtrlC:  # a finder standing for Ctrl-C pressed while intes.cli is being imported
        def find_spec(self, name, path=None, target=None):
            if name == "intes.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "intes.cli")
    monkeypatch.setattr(sys, "meta_path", [CtrlC(), *sys.meta_path])
    with pytest.raises(SystemExit) as stop:
        intes.__main__.main()
    assert stop.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_the_console_script_catches_ctrl_c_before_the_heavy_imports():
    """What the ``intes`` command imports before its Ctrl-C handler: none of the libraries."""
    code = ("import sys, intes.__main__; print(sorted({'numpy', 'numba', 'zarr', 'click', "
            "'tokenizers', 'intes.cli'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


def test_a_command_whose_dependency_is_missing_reports_it(monkeypatch, tmp_path):
    (tmp_path / "intes_broken_cmd.py").write_text("import intes_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(intes.cli.LAZY_COMMANDS, "broken", "intes_broken_cmd")
    assert "broken" in invoke("--help").output
    result = invoke("broken", "--anything")
    assert_user_error(result)
    assert "intes_no_such_dependency" in result.stderr
    assert invoke("info", "--help").exit_code == 0


@pytest.mark.parametrize("absent", [("torch",), ("transformers",), ("torch", "transformers")])
def test_finetune_without_its_optional_dependencies_says_what_to_install(monkeypatch, tmp_path,
                                                                         absent):
    for name in absent:  # as if not installed: find_spec gives None, import fails
        monkeypatch.setitem(sys.modules, name, None)
    (tmp_path / "prompts.txt").write_text("2 3 5\n")
    result = invoke("finetune", "--model", tmp_path, "--task", "countdown", "--prompts",
                    tmp_path / "prompts.txt", "--out", tmp_path / "out")
    assert_user_error(result)
    assert f"needs {' and '.join(absent)}, not installed" in result.stderr
    assert "pip install torch transformers" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["eval", "RUN"], ["sample", "RUN"], ["info", "RUN"],
                                     ["data", "prepare", "--out", "s.zarr"], ["bench"]])
def test_single_process_commands_refuse_torchrun(monkeypatch, tmp_path, command):
    """Under torchrun each worker ran the whole command: N evaluations printed N times, or N
    writers of one store. Only pretrain and finetune share their work among workers."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke(*command)
    assert_user_error(result)
    assert result.stderr.strip() == (f"error: intes {command[0]} runs in one process: start it "
                                     "without torchrun (under torchrun: pretrain, finetune)")
    assert list(tmp_path.iterdir()) == []


def test_errors_raised_in_commands_are_caught_by_the_group(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise DataError("the corpus is gone")

    monkeypatch.chdir(tmp_path)  # where a run without --out would go (runs/...)
    monkeypatch.setattr(PRETRAIN_MODULE, "load_corpus", fail)
    result = invoke("pretrain", "--steps", 1)
    assert_user_error(result)
    assert result.stderr.strip() == "error: the corpus is gone"
    assert not Path("runs").exists()


def console_script() -> str | None:
    beside = Path(sys.executable).with_name("intes")
    return str(beside) if beside.exists() else shutil.which("intes")


@pytest.mark.skipif(console_script() is None, reason="the intes console script is not installed")
def test_output_the_terminal_cannot_encode_is_replaced_not_fatal(run_dir):
    """On a stdout that is not UTF-8 (a legacy locale, a redirected Windows console) a sample's
    U+FFFD or a non-ASCII path used to end the command in a UnicodeEncodeError."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONIOENCODING": "latin-1"}
    done = subprocess.run([console_script(), "sample", str(run_dir), "--prompt", "d\u0436f",
                           "--tokens", "40", "--seed", "1"], capture_output=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith(b"d?f")


@pytest.mark.skipif(console_script() is None, reason="the intes console script is not installed")
def test_sigterm_saves_the_run_as_ctrl_c_does(tmp_path, text_file):
    """A scheduler's SIGTERM ended a run with nothing saved past its last checkpoint and no
    word; now it saves the last finished step and prints how to continue, as Ctrl-C does."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [console_script(), "pretrain", *TINY, "--data", str(text_file), "--steps", "100000",
            "--checkpoint-every", "100000", "--eval-every", "100000", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        for line in proc.stdout:  # the first evaluation is past: steps are running
            if line.startswith("step 0: validation"):
                break
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted: checkpoint at step" in stdout and "--resume" in stdout, stdout
    assert load_checkpoint(out / CHECKPOINT_NAME)[1]["step"] >= 0


@pytest.mark.skipif(console_script() is None, reason="the intes console script is not installed")
def test_console_script_smoke(tmp_path):
    exe = console_script()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0 and "pretrain" in ok.stdout
    bad = subprocess.run([exe, "pretrain", "--dim", "-4", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error: dim must be")
    assert not (tmp_path / "r").exists()
