"""The run loop: bit-exact resume at any split point, interrupts, limits, metrics and plot.

Tiny configs on a small generated text keep every run well under a second of training.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import replace
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import intes.trainer as trainer
import intes.validation as validation
from intes.checkpoint import CHECKPOINT_COVERED, CHECKPOINT_NAME, load_checkpoint, metadata_digest
from intes.data import load_corpus
from intes.engine import MAX_SEQ_LEN, Engine, ModelConfig, TrainConfig
from intes.errors import CheckpointError, ConfigError, DataError, Interrupted
from intes.es import ESConfig
from intes.ngram import ngram_bits_per_byte
from intes.runs import intes_version, load_run
from intes.sampling import draw, generate, token_weights
from intes.trainer import METRICS_NAME, PLOT_NAME, RunOptions, pretrain
from intes.validation import Validation, eval_shape, validation_bpb

K = 5  # steps of the reference run
WORDS = "the quick brown fox jumps over a lazy dog while seven odd wizards quietly hex it".split()


def small_text() -> str:
    """~20 KB of varied, deterministic text: enough for train and valid windows."""
    lines = (" ".join(WORDS[(i * 7 + j * j * 3 + i // 5) % len(WORDS)] for j in range(11))
             for i in range(360))
    return "\n".join(lines) + "\n"


@cache
def scratch() -> tempfile.TemporaryDirectory:
    """Where the cached corpus and reference runs live; removed when this module's tests end
    (or, failing that, when the interpreter exits)."""
    return tempfile.TemporaryDirectory(prefix="intes-trainer-")


@pytest.fixture(scope="module", autouse=True)
def remove_scratch():
    yield
    if scratch.cache_info().currsize:
        scratch().cleanup()
    for cached in (scratch, corpus, _straight_run):
        cached.cache_clear()


@cache
def corpus():
    path = Path(scratch().name) / "small.txt"
    path.write_text(small_text(), encoding="utf-8")
    return load_corpus(str(path))


def tiny_config(seed: int = 3, kind: str = "rwkv", group_size: int = 2,
                noise_reuse: int = 1) -> TrainConfig:
    return TrainConfig(model=ModelConfig(kind=kind, vocab_size=256, dim=16, layers=1),
                       es=ESConfig(population=8, group_size=group_size, noise_reuse=noise_reuse),
                       seq_len=8, seed=seed)


def options(out: Path, steps: int, **kw) -> RunOptions:
    return RunOptions(out=out, steps=steps, eval_streams=4, eval_len=32, progress=False, **kw)


def run(out: Path, steps: int, config: TrainConfig | None = None, **kw) -> dict:
    return pretrain(config or tiny_config(), corpus(), options(out, steps, **kw),
                    backend="reference")


def fails_at(step: int, error: BaseException):
    """A fitness function that raises ``error`` when the engine reaches ``step``, as a crash,
    Ctrl-C or a print to a closed pipe would in the middle of a run."""
    def fitness(engine: Engine, windows: np.ndarray) -> np.ndarray:
        if engine.step_index == step:
            raise error
        return engine.population_fitness(windows)

    return fitness


def weights(out: Path) -> dict[str, np.ndarray]:
    return load_checkpoint(out / CHECKPOINT_NAME)[0]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def straight_run(config: TrainConfig | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """The uninterrupted K-step run of ``config`` (default ``tiny_config()``), made once."""
    return _straight_run(config or tiny_config())


@cache
def _straight_run(config: TrainConfig) -> tuple[Path, dict[str, np.ndarray]]:
    out = Path(tempfile.mkdtemp(prefix="straight-", dir=scratch().name)) / "run"
    with pytest.MonkeyPatch.context() as patch:
        if config != tiny_config():  # only the default run's plot is looked at
            patch.setattr(trainer._Run, "plot", no_plot)
        run(out, K, config=config)
    return out, weights(out)


def no_plot(run: trainer._Run) -> None:
    """Stands in for the plot (most of a tiny run's time) where a test does not look at it."""


@settings(max_examples=4, deadline=None)
@example(kind="egg", seed=11, noise_reuse=3, group_size=4, splits=[1, 2], chunk=None)
@given(kind=st.sampled_from(["rwkv", "egg"]), seed=st.integers(0, 2**31 - 1),
       noise_reuse=st.integers(1, 3), group_size=st.sampled_from([2, 4]),
       splits=st.lists(st.integers(1, K - 1), min_size=1, max_size=3, unique=True),
       chunk=st.sampled_from([None, 1, 3]))
def test_resume_at_any_step_is_bit_exact(kind, seed, noise_reuse, group_size, splits, chunk):
    """Stopped at any steps (one or several, mid-way through a noise reuse or not) and
    resumed each time, a run ends with the weights of the same run done in one go. The
    explicit example resumes twice inside one noise draw."""
    config = tiny_config(seed, kind, group_size, noise_reuse)
    _, expected = straight_run(config)
    first, *later = sorted(splits)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer._Run, "plot", no_plot)
        out = Path(tmp) / "run"
        run(out, first, config=config)
        for stop in [*later, K]:
            summary = run(out, stop, config=config, resume=True, chunk_pairs=chunk)
        assert summary["step"] == K and summary["steps_run"] == K - max(splits)
        assert same_weights(weights(out), expected)


def test_eval_reads_the_runs_own_data_and_refuses_it_changed(tmp_path):
    """A run started from the Python API recorded no data path, so eval silently scored the
    default corpus; a file changed since the run is refused, not scored as the run's."""
    text = tmp_path / "text.txt"
    text.write_text(small_text(), encoding="utf-8")
    out = tmp_path / "run"
    pretrain(tiny_config(), load_corpus(text), options(out, 1), backend="reference")
    assert load_run(out, "reference")[1].digest == load_corpus(text).digest
    text.write_text(small_text() + "more\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"the run's data, {re.escape(str(text))}, has changed "
                                        "since the checkpoint"):
        load_run(out, "reference")
    load_run(out, "reference", data=str(text))  # given: scored as asked


def test_checkpoint_holds_weights_and_run_metadata():
    out, params = straight_run()
    arrays, meta = load_checkpoint(out / CHECKPOINT_NAME)
    assert all(a.dtype == np.int8 for a in arrays.values())
    assert meta["step"] == K and meta["config"] == tiny_config().to_dict()
    assert meta["tokenizer"] == "bytes" and meta["vocab_size"] == 256
    assert meta["val_bpb"] > 0 and meta["seed"] == 3
    data = corpus()  # what a resume checks its data against
    assert meta["data_digest"] == data.digest
    assert meta["data"] == data.origin == os.path.abspath(Path(scratch().name, "small.txt"))
    assert meta["data_tokens"] == [len(data.train), len(data.valid)]
    assert meta["intes_version"] == intes_version()
    assert meta["eval_sample"] == [4, 32]  # what a resume keeps


def test_metrics_and_plot_are_written():
    out, _ = straight_run()
    records = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in steps] == list(range(1, K + 1))
    assert evals[0]["step"] == 0 and evals[-1]["step"] == K
    assert all(r["fitness"] < 0 and r["tokens_per_s"] > 0 for r in steps)
    assert all(np.isfinite(r["val_bpb"]) and r["val_bpb"] > 0 for r in evals)
    assert (out / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_ends_scored_on_the_whole_valid_split():
    """The last record scores every window of the valid split with the final weights, beside
    the n-gram figures of the same tokens; the summary carries the same figures."""
    out, params = straight_run()
    final = json.loads((out / METRICS_NAME).read_text().splitlines()[-1])
    assert final["event"] == "final" and final["step"] == K and final["length"] == 32
    valid = corpus().valid
    assert final["streams"] == len(valid) // 33 > 4  # all of it, not the 4-window sample
    whole = Validation.whole_split(corpus(), 32)
    engine = Engine(tiny_config(), backend="reference", params=params, step=K)
    assert final["val_bpb"] == validation_bpb(engine, corpus(), whole.windows)
    assert (final["unigram_bpb"], final["bigram_bpb"]) == ngram_bits_per_byte(corpus(),
                                                                              whole.windows)


def test_validation_is_the_same_in_chunks(monkeypatch):
    _, params = straight_run()
    engine = Engine(tiny_config(), backend="reference", params=params, step=K)
    windows = Validation.of(corpus(), 7, 16).windows
    whole = validation_bpb(engine, corpus(), windows)
    monkeypatch.setattr(validation, "EVAL_CHUNK_ROWS", 3)
    assert validation_bpb(engine, corpus(), windows) == whole


def test_summary_reports_the_final_figures(tmp_path):
    summary = run(tmp_path, 2)
    final = json.loads((tmp_path / METRICS_NAME).read_text().splitlines()[-1])
    assert summary["final_val_bpb"] == final["val_bpb"]
    assert summary["final_bigram_bpb"] == final["bigram_bpb"]
    assert summary["final_tokens"] == final["streams"] * final["length"]


def test_a_resume_from_python_refuses_checkpoint_metadata_of_another_form(tmp_path):
    """The metadata a consistent edit (its checksum made again) left unusable: one line."""
    run(tmp_path, 2)
    path = tmp_path / CHECKPOINT_NAME / "zarr.json"
    doc = json.loads(path.read_text())
    attrs = doc["attributes"]
    attrs["meta"]["step"] = "2"
    attrs["sha256"] = metadata_digest(attrs, CHECKPOINT_COVERED)
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="its step is '2', not a step count"):
        run(tmp_path, 4, resume=True)


def test_resume_keeps_one_uninterrupted_log(tmp_path):
    run(tmp_path, 2, eval_every=1)
    run(tmp_path, 4, resume=True, eval_every=1)
    records = [json.loads(line) for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    evals = [r["step"] for r in records if r["event"] == "eval"]
    assert evals == [0, 1, 2, 3, 4]
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)


def test_a_crash_past_the_checkpoint_leaves_a_log_that_resumes_as_one_run(tmp_path):
    """A run that dies (not Ctrl-C: nothing saved at the end) has logged steps past its last
    checkpoint and may have cut its last line; the resume drops both and logs each step once,
    and ends where an uninterrupted run does."""
    with pytest.raises(RuntimeError):
        pretrain(tiny_config(), corpus(), options(tmp_path, K, checkpoint_every=2,
                                                  eval_every=100),
                 backend="reference",
                 fitness_fn=fails_at(3, RuntimeError("the machine went away")))
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)[1]["step"] == 2
    log = tmp_path / METRICS_NAME
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in logged if r["event"] == "step"] == [1, 2, 3]  # 3: past it
    with log.open("a") as f:
        f.write('{"event": "st')  # cut by the crash
    run(tmp_path, K, resume=True, checkpoint_every=2, eval_every=100)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, K + 1))
    assert [r["step"] for r in records if r["event"] == "eval"] == [0, 2, K]
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)
    assert same_weights(weights(tmp_path), straight_run()[1])


@pytest.mark.parametrize("junk", [b"[1]\n", b'{"event": "eval", "step": 1}\n',
                                  b'{"event": "eval", "step": 1, "elapsed_s": 1.0}\n',
                                  b'{"event": "step", "step": "1", "elapsed_s": 1.0}\n',
                                  b'{"event": "step", "step": 1, "elapsed_s": NaN}\n',
                                  b"\xff\xfe not utf-8\n", b"null\n"])
def test_a_resume_drops_log_lines_it_did_not_write(tmp_path, junk):
    """Lines that are not the log's records (edited in, or from another tool) are dropped like
    a line cut by a crash; they used to stop the resume with a traceback."""
    run(tmp_path, 2, eval_every=1)
    log = tmp_path / METRICS_NAME
    with log.open("ab") as f:
        f.write(junk)
    run(tmp_path, 3, resume=True, eval_every=1)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [0, 1, 2, 3]
    assert all(type(r["step"]) is int and "elapsed_s" in r for r in records)


def test_interrupt_saves_the_last_finished_step_and_resumes_exactly(tmp_path, capsys):
    with pytest.raises(Interrupted):  # reported: the CLI adds nothing
        pretrain(tiny_config(), corpus(), options(tmp_path, K), backend="reference",
                 fitness_fn=fails_at(3, KeyboardInterrupt()))
    assert f"--resume --steps {K}" in capsys.readouterr().out  # the same target
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)[1]["step"] == 3
    run(tmp_path, K, resume=True)
    assert same_weights(weights(tmp_path), straight_run()[1])


def test_an_interrupt_before_a_steps_line_is_written_loses_no_line(tmp_path, monkeypatch,
                                                                    capsys):
    """The step counted as done before its line was written: an interrupt between the two
    saved that step, and the resume never wrote its line."""
    write = trainer.MetricsLog.write

    def interrupted_at_step_2(log: trainer.MetricsLog, record: dict) -> None:
        if record == {**record, "event": "step", "step": 2}:
            raise KeyboardInterrupt
        write(log, record)

    monkeypatch.setattr(trainer.MetricsLog, "write", interrupted_at_step_2)
    with pytest.raises(Interrupted):
        run(tmp_path, K)
    monkeypatch.setattr(trainer.MetricsLog, "write", write)
    run(tmp_path, K, resume=True)
    steps = [json.loads(line) for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in steps if r["event"] == "step"] == list(range(1, K + 1))
    assert same_weights(weights(tmp_path), straight_run()[1])


def test_a_resume_at_its_target_scores_a_final_figure_it_lacks(tmp_path, capsys):
    """Stopped while scoring the whole split, a finished run had no final figure, and a resume
    only said it was already at its step."""
    first = run(tmp_path, 2)
    log = tmp_path / METRICS_NAME
    records = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps(r) + "\n" for r in records if r["event"] != "final"))
    capsys.readouterr()
    again = run(tmp_path, 2, resume=True)
    assert "already at step" not in capsys.readouterr().out
    assert again["final_val_bpb"] == first["final_val_bpb"] and again["steps_run"] == 0
    now = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in now] == [(r["event"], r["step"]) for r in records]
    run(tmp_path, 2, resume=True)
    assert "already at step 2 (asked for 2)" in capsys.readouterr().out


def test_an_interrupt_while_compiling_leaves_nothing_on_disk(tmp_path, monkeypatch):
    """Ctrl-C during the warm-up (a first run's compilation, tens of seconds) comes before the
    run directory exists, so the same command simply starts again."""
    def compiling(engine: Engine, windows: np.ndarray) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "warm_up", compiling)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(), corpus(), options(out, K), backend="reference")
    assert not out.exists()


def test_an_interrupted_time_limited_run_hints_the_minutes_left(tmp_path, capsys, monkeypatch):
    """The hint gives back the limit less the minutes of steps (setup and compilation are on
    top of the limit, so they are not spent from it) and the flags the checkpoint lacks."""
    clock = [0.0]
    monkeypatch.setattr(trainer, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    warm_up = Engine.warm_up

    def compiling(engine: Engine, windows: np.ndarray) -> None:
        clock[0] += 120.0
        warm_up(engine, windows)

    def interrupted(engine: Engine, windows: np.ndarray) -> np.ndarray:
        if engine.step_index == 2:
            raise KeyboardInterrupt
        clock[0] += 15.0
        return engine.population_fitness(windows)

    monkeypatch.setattr(Engine, "warm_up", compiling)
    opts = replace(options(tmp_path, None), time_limit=5.0, eval_every=3, chunk_pairs=1)
    with pytest.raises(Interrupted):
        pretrain(tiny_config(), corpus(), opts, backend="reference", fitness_fn=interrupted)
    hint = capsys.readouterr().out
    assert hint.rstrip().endswith(f"continue with: intes pretrain --out {tmp_path} --resume "
                                  "--time-limit 4.5 --eval-every 3 --chunk-pairs 1"), hint


def test_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, capsys):
    """Killed then (SIGTERM, a full disk), a run left only its log and plot: a resume has no
    checkpoint and a new run found the directory not empty, each pointing to the other."""
    out = tmp_path / "run"
    run(out, 2, checkpoint_every=100, eval_every=100)
    shutil.rmtree(out / CHECKPOINT_NAME)  # as if killed before the checkpoint at the end
    assert {p.name for p in out.iterdir()} <= {METRICS_NAME, PLOT_NAME, trainer.RUN_LOCK}
    # killed mid-write: the checkpoint's copy and writer lock, the log's and plot's copies
    (out / f".{CHECKPOINT_NAME}.tmp-99999").mkdir()
    for leftover in (f".{CHECKPOINT_NAME}.lock", f"{METRICS_NAME}.tmp", f".{PLOT_NAME}.tmp-7"):
        (out / leftover).write_text("")
    with pytest.raises(CheckpointError, match="its run stopped before its first checkpoint; "
                                              "drop --resume to start it over there"):
        run(out, 3, resume=True)
    capsys.readouterr()
    run(out, 2)
    assert "starting over (the run here stopped before its first checkpoint)" in \
        capsys.readouterr().out
    run(tmp_path / "fresh", 2)
    assert same_weights(weights(out), weights(tmp_path / "fresh"))
    records = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2]  # the old log is gone
    (out / "notes.txt").write_text("mine")
    shutil.rmtree(out / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="already exists and is not an empty directory"):
        run(out, 2)  # a file the run did not write: not its leftovers


def test_a_run_directory_that_cannot_be_written_is_refused_before_the_run(tmp_path,
                                                                           monkeypatch):
    """Found only when the directory was made, after compilation and, under torchrun, after
    the other workers had started: they reported a lost worker and advised a resume."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot make the run directory .*file/run: "
                                              r".*file is a file"):
        run(tmp_path / "file" / "run", 1)
    monkeypatch.setattr(trainer.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(CheckpointError, match=f"cannot write the run to {tmp_path}/new/run: "
                                              f"{tmp_path} is read-only here"):
        run(tmp_path / "new" / "run", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_two_runs_never_write_one_directory(tmp_path):
    """A run holds its directory's lock while it runs: another run (fresh or resumed) is
    refused before it writes anything, and the lock goes with the process that held it."""
    out = tmp_path / "run"
    run(out, 2)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    held = trainer.lock_run(out)  # a live run, as far as the lock tells
    try:
        with pytest.raises(CheckpointError, match=f"another intes run is writing to {out}"):
            run(out, 3, resume=True)
        with pytest.raises(CheckpointError, match="another intes run is writing to"):
            run(tmp_path / "run", 2)
        with pytest.raises(CheckpointError, match="another intes run started writing to"):
            trainer.lock_run(out)
    finally:
        os.close(held)
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    run(out, 3, resume=True)
    assert load_checkpoint(out / CHECKPOINT_NAME)[1]["step"] == 3


def test_a_closed_output_pipe_ends_the_run_with_its_steps_saved(tmp_path):
    """`intes pretrain | head` ended the run at the first line past the reader's, with the
    steps since the last checkpoint lost."""
    with pytest.raises(BrokenPipeError):
        pretrain(tiny_config(), corpus(), options(tmp_path, K, checkpoint_every=100,
                                                  eval_every=100),
                 backend="reference", fitness_fn=fails_at(3, BrokenPipeError()))
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)[1]["step"] == 3


def test_the_hint_quotes_a_run_directory_with_spaces(tmp_path, capsys):
    out = tmp_path / "my run"
    with pytest.raises(Interrupted):
        pretrain(tiny_config(), corpus(), options(out, 3), backend="reference",
                 fitness_fn=fails_at(1, KeyboardInterrupt()))
    hint = capsys.readouterr().out.rstrip()
    assert hint.endswith(f"continue with: intes pretrain --out '{out}' --resume --steps 3"), hint


@pytest.mark.parametrize("budget", ["steps", "time limit"])
def test_an_interrupt_in_the_final_evaluation_hints_how_to_get_the_figure(tmp_path, capsys,
                                                                         monkeypatch, budget):
    """The steps are done and saved: the same resume scores and records the final figure; a
    time-limited run's resume would train on, so its hint is intes eval."""
    whole_split = trainer._Run.evaluate_whole_split

    def interrupted(self) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer._Run, "evaluate_whole_split", interrupted)
    out = tmp_path / "run"
    opts = options(out, 2) if budget == "steps" else replace(options(out, None), time_limit=1e-9)
    with pytest.raises(Interrupted):
        pretrain(tiny_config(), corpus(), opts, backend="reference")
    hint = capsys.readouterr().out.rstrip()
    step = load_checkpoint(out / CHECKPOINT_NAME)[1]["step"]
    if budget == "time limit":
        assert hint.endswith(f"checkpoint at step {step} in {out}; continue with: intes eval "
                             f"{out}"), hint
        return
    assert hint.endswith(f"checkpoint at step 2 in {out}; continue with: intes pretrain --out "
                         f"{out} --resume --steps 2"), hint
    monkeypatch.setattr(trainer._Run, "evaluate_whole_split", whole_split)
    assert run(out, 2, resume=True)["final_val_bpb"] is not None
    records = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "final"] == [2]


def test_checkpoints_come_every_n_steps_or_at_each_evaluation(tmp_path, monkeypatch):
    """--checkpoint-every N saves at multiples of N and at the end; without it, each
    evaluation saves (the first one at step 0 too), and a resume does not save again the
    step it loaded."""
    saved = []
    save = trainer.save_checkpoint

    def recording(path, arrays, meta):
        saved.append(meta["step"])
        save(path, arrays, meta)

    monkeypatch.setattr(trainer, "save_checkpoint", recording)
    monkeypatch.setattr(trainer._Run, "plot", no_plot)
    run(tmp_path / "every", K, checkpoint_every=2, eval_every=100)
    assert saved == [2, 4, 5]
    saved.clear()
    run(tmp_path / "evals", K, eval_every=2)
    assert saved == [0, 2, 4, 5]
    saved.clear()
    run(tmp_path / "evals", K + 2, resume=True, eval_every=2)
    assert saved == [6, 7]


def test_time_limit_stops_and_checkpoints(tmp_path):
    summary = pretrain(tiny_config(), corpus(),
                       replace(options(tmp_path, 1000), time_limit=1e-9), backend="reference")
    assert summary["stopped_by"] == "time limit" and summary["step"] == 1
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)[1]["step"] == 1


def test_workers_other_than_main_write_nothing_but_vote_and_score_every_evaluation(tmp_path):
    """A distributed worker other than the main one writes nothing, votes after every step
    even without a time limit of its own, stops when any worker's vote says so, and scores
    (its shard of) every evaluation the main worker's clock calls for, the final one too:
    each is a collective every worker must join."""
    votes, scored = [], []

    def sync_step(stop: bool, evaluate: bool) -> tuple[bool, bool]:
        votes.append((stop, evaluate))
        return len(votes) == 3, len(votes) == 1  # main evaluates after step 1; out of time at 3

    def total(engine: Engine, windows: np.ndarray) -> int:
        scored.append((engine.step_index, len(windows)))
        return validation.log_likelihood_total(engine, windows)

    out = tmp_path / "run"
    summary = pretrain(tiny_config(), corpus(), options(out, K, eval_every=100),
                       backend="reference", is_main=False, sync_step=sync_step, total=total)
    assert summary["step"] == 3 and not out.exists()
    assert votes == [(False, False)] * 3  # no time limit here, no evaluation due by its count
    whole = len(Validation.whole_split(corpus(), 32).windows)
    assert scored == [(0, 4), (1, 4), (3, 4), (3, whole)]  # start, main's call, end, whole split


def test_fresh_run_refuses_an_existing_run_and_touches_nothing(tmp_path):
    run(tmp_path, 1)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="--resume"):
        run(tmp_path, 2)
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


def test_resume_refuses_another_config_naming_the_field(tmp_path):
    run(tmp_path, 1)
    with pytest.raises(CheckpointError, match="es.rank"):
        run(tmp_path, 2, config=replace(tiny_config(), es=replace(tiny_config().es, rank=2)),
            resume=True)


def test_resume_refuses_another_validation_sample(tmp_path):
    """The log's evaluations before and after a resume score the same windows."""
    run(tmp_path, 1)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="4 x 32 tokens, here 4 x 16"):
        pretrain(tiny_config(), corpus(), replace(options(tmp_path, 2), eval_len=16,
                                                  resume=True), backend="reference")
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kw", [dict(steps=0), dict(eval_every=0), dict(eval_streams=0),
                                dict(steps=None), dict(time_limit=-1.0), dict(chunk_pairs=0),
                                dict(checkpoint_every=0), dict(eval_len=0),
                                dict(eval_len=MAX_SEQ_LEN + 1), dict(time_limit=math.inf),
                                dict(time_limit=math.nan)])
def test_bad_options_are_refused_before_writing(tmp_path, kw):
    opts = replace(options(tmp_path / "run", 2), **kw)
    with pytest.raises(ConfigError):
        pretrain(tiny_config(), corpus(), opts, backend="reference")
    assert not (tmp_path / "run").exists()


def test_vocab_must_match_the_data(tmp_path):
    config = replace(tiny_config(), model=replace(tiny_config().model, vocab_size=300))
    with pytest.raises(ConfigError, match="vocab"):
        run(tmp_path / "run", 1, config=config)


@pytest.mark.parametrize("n, asked, expected", [(10_000, (32, 256), (32, 256)),
                                                (1000, (32, 256), (3, 256)),
                                                (100, (32, 256), (1, 99))])
def test_eval_shape_fits_the_valid_split(n, asked, expected):
    streams, length = eval_shape(n, *asked)
    assert (streams, length) == expected and streams * (length + 1) <= n


# ---------------------------------------------------------------------------------------------
# sampling


def test_sampling_is_a_pure_function_of_seed():
    engine = Engine(tiny_config(), "reference")
    prompt = np.frombuffer(b"the quick", dtype=np.uint8)
    a, b = generate(engine, prompt, 12, seed=5), generate(engine, prompt, 12, seed=5)
    assert a.dtype == np.int32 and len(a) == 12 and np.array_equal(a, b)
    assert np.all((a >= 0) & (a < 256))
    assert not np.array_equal(generate(engine, prompt, 12, seed=6), a)  # the seed is used
    state, ops = engine.model.init_state(1), engine.inference_ops()
    for position, token in enumerate([0, *prompt.tolist(), *a[:-1].tolist()]):
        logits, state = engine.model.forward(ops, np.array([token]), state)
        if position >= len(prompt):  # each draw from the logits after what came before
            assert a[position - len(prompt)] == draw(token_weights(logits[0]), 5, position + 1)


def test_greedy_follows_the_argmax():
    engine = Engine(tiny_config(), "reference")
    first = generate(engine, [116, 104], 1, greedy=True)[0]
    logits = None
    state = engine.model.init_state(1)
    for token in (0, 116, 104):
        logits, state = engine.model.forward(engine.inference_ops(), np.array([token]), state)
    assert first == int(np.argmax(logits[0]))


def expected_weight(logit: int, top: int, shift: int) -> int:
    """2^16 * 2^(-d/16) rounded, d = (top - logit) / 2^shift rounded down (times 2^-shift
    when the shift is negative); 0 where d is past the table's 254."""
    d = (top - logit) // 2**shift if shift >= 0 else (top - logit) * 2**-shift
    return math.floor(2**16 * 2 ** (-d / 16) + 0.5) if d < 255 else 0


@settings(max_examples=20, deadline=None)
@given(logits=st.lists(st.integers(-127, 127), min_size=2, max_size=40),
       shift=st.integers(-8, 8), seed=st.integers(0, 2**32 - 1), position=st.integers(0, 999))
def test_draws_only_tokens_with_weight(logits, shift, seed, position):
    w = token_weights(np.array(logits, dtype=np.int8), shift)
    assert w.dtype == np.int64
    assert w.tolist() == [expected_weight(x, max(logits), shift) for x in logits]
    assert w.max() == 1 << 16 and w.min() >= 0
    assert w[draw(w, seed, position)] > 0


@settings(max_examples=20, deadline=None)
@given(logits=st.lists(st.integers(-127, 127), min_size=2, max_size=40),
       shifts=st.lists(st.integers(-8, 8), min_size=2, max_size=2, unique=True))
def test_a_larger_temperature_shift_is_flatter(logits, shifts):
    """Every token's weight grows (or stays) with the shift while the top token's stays 2^16,
    so each token's share relative to the top grows; shift 8 is uniform, -8 keeps only the
    top logits."""
    x = np.array(logits, dtype=np.int8)
    low, high = (token_weights(x, s) for s in sorted(shifts))
    assert np.all(high >= low) and low.max() == high.max() == 1 << 16
    assert np.all(token_weights(x, 8) == 1 << 16)
    assert np.array_equal(token_weights(x, -8) > 0, x == x.max())


def test_draws_follow_the_weights():
    w = np.array([3 << 16, 1 << 16, 0], dtype=np.int64)
    picks = np.bincount([draw(w, 1, p) for p in range(2000)], minlength=3)
    assert picks[2] == 0 and 0.70 < picks[0] / 2000 < 0.80
