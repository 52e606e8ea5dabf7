"""The pretraining run loop: data -> ES steps -> metrics, evaluation, plot and checkpoints.

A run directory holds ``checkpoint.zarr`` (weights, step, config and the run's metadata),
``metrics.jsonl`` (one line per step and per evaluation) and ``loss.png``. The batch of a step
is a pure function of (seed, step), so the step index is the whole data position and resuming
from a checkpoint continues bit-exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # not POSIX: runs go unlocked
    fcntl = None

from intes.checkpoint import CHECKPOINT_NAME, existing_version, load_checkpoint, save_checkpoint
from intes.data import Corpus, sample_windows
from intes.engine import MAX_SEQ_LEN, Engine, TrainConfig, member_windows
from intes.errors import CheckpointError, ConfigError, Interrupted, check_integers
from intes.intmath import LL_FRAC_BITS
from intes.runs import check_meta, check_params, check_resumable, run_meta
from intes.validation import EVAL_LEN, EVAL_STREAMS, TotalFn, Validation, validation_bpb

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
RUN_LOCK = ".intes-run.lock"  # held by the process writing a run directory while it runs
# What a run writes before its first checkpoint is complete: its log, plot and lock, and, when
# killed mid-write, the half-written log, plot or checkpoint and the checkpoint's writer lock
_FIRST_FILES = re.compile("|".join(
    [re.escape(name) for name in (METRICS_NAME, PLOT_NAME, RUN_LOCK, METRICS_NAME + ".tmp",
                                  f".{CHECKPOINT_NAME}.lock")]
    + [re.escape(f".{name}.tmp-") + r"\d+" for name in (PLOT_NAME, CHECKPOINT_NAME)]))
EVAL_TIME_SHARE = 0.05  # automatic evaluation keeps eval (+ plot + checkpoint) under ~5% of time

FitnessFn = Callable[[Engine, np.ndarray], np.ndarray]
# (this worker is out of time, this worker would evaluate now) -> what every worker does
StepSync = Callable[[bool, bool], tuple[bool, bool]]


@dataclass(frozen=True)
class RunOptions:
    """How long and how observably to train; none of it changes the weights a step produces."""

    out: Path
    steps: int | None = None  # total step count to reach (a resumed run counts from 0 too)
    time_limit: float | None = None  # minutes of training in this invocation
    eval_every: int | None = None  # steps; None: as often as keeps eval under EVAL_TIME_SHARE
    eval_streams: int = EVAL_STREAMS  # validation subset: streams x eval_len tokens (shrunk to
    eval_len: int = EVAL_LEN  # fit the valid split)
    checkpoint_every: int | None = None  # steps; None: at every evaluation
    resume: bool = False
    chunk_pairs: int | None = None  # evaluate the population this many pairs at a time
    progress: bool = True

    def validate(self) -> None:
        if not isinstance(self.out, (str, os.PathLike)):
            raise ConfigError(f"out must be a path, got {self.out!r}")
        for name in ("resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_integers(eval_streams=self.eval_streams, eval_len=self.eval_len,
                       **{name: getattr(self, name) for name in
                          ("steps", "eval_every", "checkpoint_every", "chunk_pairs")
                          if getattr(self, name) is not None})
        if self.time_limit is not None and (isinstance(self.time_limit, bool)
                                            or not isinstance(self.time_limit, Real)):
            raise ConfigError(f"time limit must be a number of minutes, got {self.time_limit!r}")
        if self.steps is None and self.time_limit is None:
            raise ConfigError("give a step count or a time limit (or both)")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.time_limit is not None and not (self.time_limit > 0 and math.isfinite(
                self.time_limit)):
            raise ConfigError(f"time limit must be a positive number of minutes, got "
                              f"{self.time_limit}")
        for name in ("eval_every", "checkpoint_every", "chunk_pairs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {value}")
        if self.eval_streams < 1 or not 1 <= self.eval_len <= MAX_SEQ_LEN:
            raise ConfigError(f"eval streams must be >= 1 and eval length in 1..{MAX_SEQ_LEN}, "
                              f"got {self.eval_streams} x {self.eval_len}")


def start_engine(config: TrainConfig, corpus: Corpus, options: RunOptions, backend: str,
                 is_main: bool) -> Engine:
    """A fresh or resumed engine after every check that can fail; creates nothing on disk.

    Only the main worker checks that a fresh run's directory is free: the others could see
    the files the main worker has started writing.
    """
    config.validate()
    if config.model.vocab_size != corpus.vocab_size:
        raise ConfigError(f"the model's vocab size {config.model.vocab_size} does not match "
                          f"the data's {corpus.vocab_size}: is the data tokenized differently?")
    sample_windows(corpus.train, config.seed, 0, 1, config.seq_len)  # raises if T does not fit
    out = Path(options.out)
    store = out / CHECKPOINT_NAME
    if is_main and run_in_progress(out):
        raise CheckpointError(f"another intes run is writing to {out}; wait for it to end or "
                              "use another --out")
    if not options.resume:
        if is_main and out.exists() and not (out.is_dir() and stopped_before_a_checkpoint(out)):
            raise CheckpointError(f"{out} already exists and is not an empty directory; use "
                                  "--resume to continue its run, or another --out")
        if is_main:
            check_writable(out)
        return Engine(config, backend)
    if existing_version(store) is None:
        raise no_checkpoint_to_resume(out)
    if is_main:
        check_writable(out)
    arrays, meta = load_checkpoint(store)
    check_meta(meta, store)
    check_resumable(config, corpus, meta, store, (options.eval_streams, options.eval_len))
    check_params(config, arrays, store)
    return Engine(config, backend, params=arrays, step=meta["step"])


def check_writable(out: Path) -> None:
    """Refuse a run directory this process could not create or write, before the run starts
    (under torchrun, before the workers' first collective) and creating nothing."""
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise CheckpointError(f"cannot make the run directory {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write the run to {out}: {existing} is read-only here")


def stopped_before_a_checkpoint(out: Path) -> bool:
    """Whether the directory ``out`` holds nothing, or only what a run writes before its first
    checkpoint is complete (``_FIRST_FILES``): a run killed then can only start over."""
    return existing_version(out / CHECKPOINT_NAME) is None and all(
        _FIRST_FILES.fullmatch(p.name) for p in out.iterdir())


def no_checkpoint_to_resume(out: Path) -> CheckpointError:
    """The error of a resume that finds no checkpoint, with what to do instead."""
    if out.is_dir() and any(out.iterdir()) and stopped_before_a_checkpoint(out):
        return CheckpointError(f"no checkpoint in {out} to resume: its run stopped before its "
                               "first checkpoint; drop --resume to start it over there")
    return CheckpointError(f"no checkpoint at {out / CHECKPOINT_NAME} to resume; drop --resume "
                           "to start")


def run_in_progress(out: Path) -> bool:
    """Whether a live process holds ``out``'s run lock (see ``lock_run``); creates nothing."""
    if fcntl is None:
        return False
    try:
        fd = os.open(out / RUN_LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def lock_run(out: Path) -> int | None:
    """Take ``out``'s run lock (POSIX flock on RUN_LOCK, released when the returned descriptor
    is closed or the process dies), so that two runs never write one directory; None without
    fcntl."""
    if fcntl is None:
        return None
    fd = os.open(out / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(f"another intes run started writing to {out}; use another --out "
                              "for this one") from None
    return fd


# ---------------------------------------------------------------------------------------------
# metrics


def _is_record(record: object) -> bool:
    """A line as ``MetricsLog`` writes it: an event, its step and the run's elapsed seconds,
    and an evaluation's figure (the plot reads it)."""
    def number(key: str) -> bool:
        return type(record.get(key)) in (int, float) and math.isfinite(record[key])

    return (isinstance(record, dict) and isinstance(record.get("event"), str)
            and type(record.get("step")) is int and number("elapsed_s")
            and (record["event"] != "eval" or number("val_bpb")))


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (none if it is missing)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: drop it
            continue
        if _is_record(record):  # and whatever else a hand or a tool put there
            records.append(record)
    return records


class MetricsLog:
    """metrics.jsonl, plus the evaluations so far for the plot.

    On resume, records past the checkpoint's step (from an interrupted tail) are dropped so the
    log reads as one uninterrupted run, and elapsed time continues from the last kept record.
    """

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        kept = self._kept(resume_step) if resume_step is not None else []
        self._rewrite(kept)
        self.evals = [r for r in kept if r["event"] == "eval"]
        self.elapsed_offset = max((r["elapsed_s"] for r in kept), default=0.0)
        self.file = path.open("a", encoding="utf-8")

    def _kept(self, step: int) -> list[dict]:
        return [r for r in read_records(self.path) if r["step"] < step
                or (r["event"] == "step" and r["step"] == step)]

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if record["event"] == "eval":
            self.evals.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------
# the run


class _Run:
    """One invocation of pretraining; owns the clock, the log and the last consistent state."""

    def __init__(self, engine: Engine, corpus: Corpus, options: RunOptions, fitness_fn: FitnessFn,
                 is_main: bool, sync_step: StepSync | None, total: TotalFn | None):
        self.engine, self.corpus, self.options = engine, corpus, options
        self.fitness_fn, self.is_main = fitness_fn, is_main
        self.sync_step, self.total = sync_step, total
        self.out = Path(options.out)
        self.start_step = engine.step_index
        self.snapshot = (engine.params, engine.step_index)  # consistent (weights, step) pair
        self.val_bpb: float | None = None
        self.evaluated_step: int | None = None
        self.start_bpb: float | None = None
        self.saved_step = engine.step_index if options.resume else -1  # already on disk
        self.eval_cost = 0.0
        self.last_eval_end = 0.0
        self.step_rate: list[float] = []
        self.log: MetricsLog | None = None
        self.lock: int | None = None  # the run directory's lock, held while this runs
        self.bar: tqdm | None = None
        self.sample: Validation | None = None  # the periodic evaluations'
        self.whole: Validation | None = None  # the whole split, scored at the end ...
        self.final_bpb: float | None = None  # ... to this figure
        self.t0 = time.monotonic()
        self.loop_began: float | None = None  # when the time limit's clock started
        self.finishing = False  # past the last step: the final evaluations

    # -- output --------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message, file=sys.stdout)

    def elapsed(self) -> float:
        offset = self.log.elapsed_offset if self.log else 0.0
        return offset + time.monotonic() - self.t0

    # -- phases --------------------------------------------------------------------------------

    def announce(self) -> None:
        """The validation sample (every worker scores a shard of it) and the run's header;
        nothing written yet."""
        self.sample = Validation.of(self.corpus, self.options.eval_streams, self.options.eval_len)
        cfg, c = self.engine.config, self.corpus
        n_params = sum(int(p.size) for p in self.engine.params.values())
        self.say(f"data: {c.source}: {len(c.train):,} train / {len(c.valid):,} valid tokens, "
                 f"vocab {c.vocab_size}")
        self.say(f"model: {cfg.model.kind} dim {cfg.model.dim} x "
                 f"{counted(cfg.model.layers, 'layer')}, {n_params:,} int8 params, seq len "
                 f"{cfg.seq_len}, backend {self.engine.backend.name} "
                 f"({counted(self.engine.threads, 'thread')}{gemm_note(self.engine.backend)})")
        self.say(f"es: {cfg.es.describe()}, seed {cfg.seed}")
        self.say(f"validation sample: {self.sample.describe()} of the valid split; on them "
                 f"unigram {self.sample.unigram:.4f} bpb, bigram {self.sample.bigram:.4f} bpb")
        verb = "resuming" if self.options.resume else "starting"
        if not self.options.resume and (self.out / METRICS_NAME).exists():
            verb = "starting over (the run here stopped before its first checkpoint)"
        self.say(f"{verb} at step {self.start_step} -> {self.out}")

    def open(self) -> None:
        """The run directory and its metrics log."""
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = lock_run(self.out)
        self.log = MetricsLog(self.out / METRICS_NAME,
                              self.start_step if self.options.resume else None)

    def evaluate(self) -> None:
        """Validation bpb (on every worker) + metrics line + plot (+ checkpoint when none is
        scheduled) by the main one."""
        began = time.monotonic()
        self.val_bpb = validation_bpb(self.engine, self.corpus, self.sample.windows, self.total)
        step = self.evaluated_step = self.engine.step_index
        if self.start_bpb is None:
            self.start_bpb = self.val_bpb
            self.say(f"step {step}: validation {self.val_bpb:.4f} bpb")
        if not self.is_main:
            return
        self.log.write({"event": "eval", "step": step, "val_bpb": self.val_bpb,
                        "elapsed_s": round(self.elapsed(), 3)})
        self.plot()
        if self.options.checkpoint_every is None:
            self.checkpoint()
        self.eval_cost = time.monotonic() - began
        self.last_eval_end = time.monotonic()

    def evaluate_whole_split(self) -> None:
        """The run's final figure: the valid split's every window (up to FINAL_EVAL_TOKENS
        tokens), not a sample of it; every worker scores a shard of it."""
        whole = self.whole = Validation.whole_split(self.corpus, self.sample.shape[1])
        self.final_bpb = validation_bpb(self.engine, self.corpus, whole.windows, self.total)
        if not self.is_main:
            return
        streams, length = whole.shape
        self.log.write({"event": "final", "step": self.engine.step_index,
                        "val_bpb": self.final_bpb, "streams": streams, "length": length,
                        "unigram_bpb": whole.unigram, "bigram_bpb": whole.bigram,
                        "elapsed_s": round(self.elapsed(), 3)})

    def warm_up(self) -> None:
        """Pay one-time costs (JIT compilation of a step's and an evaluation's kernels, the
        matplotlib import) before anything is written, before the time limit's clock starts
        and before the first timed evaluation, whose cost sets the automatic evaluation
        interval. Every worker compiles its own; no weight changes."""
        windows = self.step_windows()
        self.engine.warm_up(windows)
        validation_bpb(self.engine, self.corpus, windows[:1, :2])  # any windows compile it
        if self.is_main:
            from intes import plot  # noqa: F401

    def step_windows(self) -> np.ndarray:
        """The members' windows of the engine's current step: a pure function of (seed, step)."""
        cfg = self.engine.config
        n_seq = cfg.es.population // cfg.es.group_size
        return member_windows(sample_windows(self.corpus.train, cfg.seed, self.engine.step_index,
                                             n_seq, cfg.seq_len), cfg.es.group_size)

    def plot(self) -> None:
        from intes.plot import plot_validation

        plot_validation(self.log.evals, (self.sample.unigram, self.sample.bigram),
                        self.out / PLOT_NAME)

    def checkpoint(self) -> None:
        """Save the last consistent (weights, step); never twice for the same step."""
        params, step = self.snapshot
        if not self.is_main or step == self.saved_step:
            return
        meta = run_meta(self.engine.config, step, self.corpus, self.val_bpb,
                        (self.options.eval_streams, self.options.eval_len))
        save_checkpoint(self.out / CHECKPOINT_NAME, dict(params), meta)
        self.saved_step = step

    def train_step(self) -> None:
        cfg, engine = self.engine.config, self.engine
        began = time.monotonic()
        raw = self.fitness_fn(engine, self.step_windows())
        engine.apply_fitness(raw)
        took = max(time.monotonic() - began, 1e-9)
        tokens_per_s = cfg.es.population * cfg.seq_len / took  # ES tokens: every member's
        fitness = float(raw.mean()) / (1 << LL_FRAC_BITS) / cfg.seq_len
        self.step_rate.append(tokens_per_s)
        if self.log:
            self.log.write({"event": "step", "step": engine.step_index,
                            "tokens_per_s": round(tokens_per_s, 1), "fitness": round(fitness, 5),
                            "elapsed_s": round(self.elapsed(), 3)})
        # the step is logged before it counts as done: an interrupt between the two saves the
        # step before, and the resume drops the line (MetricsLog) and logs the step again
        self.snapshot = (engine.params, engine.step_index)
        if self.bar is not None:
            val = "-" if self.val_bpb is None else f"{self.val_bpb:.4f}"
            self.bar.set_postfix_str(f"{tokens_per_s:,.0f} tok/s, fitness {fitness:.3f} "
                                     f"bit/tok, val {val} bpb", refresh=False)
            self.bar.update(1)

    def eval_due(self, step: int) -> bool:
        if self.options.eval_every is not None:
            return step % self.options.eval_every == 0
        return time.monotonic() - self.last_eval_end >= self.eval_cost / EVAL_TIME_SHARE

    def continue_command(self) -> str:
        """The command that resumes this run as it was going: what is left of its budget (the
        same step target, or the minutes of the time limit not yet spent) and the flags that
        shaped it without being saved with it. Once the steps are done, what is left is the
        final figure: the same resume gives and records it in one process
        (``lacks_its_final_figure``); else ``intes eval`` gives it."""
        o = self.options
        if self.finishing and (o.steps is None or self.sync_step is not None):
            return f"intes eval {shlex.quote(str(self.out))}"
        flags = [f"--out {shlex.quote(str(self.out))}", "--resume"]
        launcher = "torchrun [its options] " if self.sync_step is not None else ""
        if o.steps is not None:
            flags.append(f"--steps {o.steps}")
        elif o.time_limit is not None:
            began = self.loop_began if self.loop_began is not None else time.monotonic()
            spent = (time.monotonic() - began) / 60
            flags.append(f"--time-limit {max(o.time_limit - spent, 0.1):.1f}")
        for name in ("eval_every", "checkpoint_every", "chunk_pairs"):
            if getattr(o, name) is not None:
                flags.append(f"--{name.replace('_', '-')} {getattr(o, name)}")
        return f"{launcher}intes pretrain " + " ".join(flags)

    def out_of_time(self, began: float) -> bool:
        limit = self.options.time_limit
        return limit is not None and time.monotonic() - began >= limit * 60

    def agree(self, stop: bool, evaluate: bool) -> tuple[bool, bool]:
        """Whether to stop and whether to evaluate after this step. Under a distributed runner
        every worker stops if any is out of time (their limits may differ) and evaluates when
        the main one would: the automatic interval follows its clock, and all must score."""
        return self.sync_step(stop, evaluate) if self.sync_step is not None else (stop, evaluate)

    def loop(self) -> str:
        """Train until the step count or the time limit; returns which one stopped it."""
        began = self.loop_began = time.monotonic()
        steps = self.options.steps
        every_ckpt = self.options.checkpoint_every
        while steps is None or self.engine.step_index < steps:
            self.train_step()
            step = self.engine.step_index
            stop, evaluate = self.agree(self.out_of_time(began), self.eval_due(step))
            if (steps is None or step < steps) and evaluate:
                self.evaluate()
            if every_ckpt is not None and step % every_ckpt == 0:
                self.checkpoint()
            if stop:
                return "time limit"
        return "steps"

    def lacks_its_final_figure(self) -> bool:
        """Whether a resume at its target step finds no final figure of that step: the run was
        stopped while scoring the whole split. One process only (the workers of a group would
        each have to read the main one's log to agree)."""
        step = self.start_step
        return (self.options.resume and step == self.options.steps and self.sync_step is None
                and not any(r["event"] == "final" and r["step"] == step
                            for r in read_records(self.out / METRICS_NAME)))

    def run(self) -> dict:
        steps = self.options.steps
        if steps is not None and self.start_step >= steps and not self.lacks_its_final_figure():
            self.say(f"already at step {self.start_step} (asked for {steps}); raise --steps to "
                     "train further")
            return self.summary("steps")
        self.announce()
        self.warm_up()
        try:
            self.open()
            self.evaluate()
            self.bar = self._progress_bar()
            stopped = self.loop()
            self.finishing = True
            self.close_bar()
            if self.evaluated_step != self.engine.step_index:
                self.evaluate()
            self.checkpoint()
            self.evaluate_whole_split()
        except KeyboardInterrupt:
            self.close_bar()
            self.checkpoint()
            self.say(f"interrupted: checkpoint at step {self.snapshot[1]} in {self.out}; "
                     f"continue with: {self.continue_command()}")
            raise Interrupted from None
        except BrokenPipeError:  # the output's reader left (`| head`): keep the steps, end
            self.checkpoint()
            raise
        finally:
            self.close_bar()
            if self.log:
                self.log.close()
            if self.lock is not None:
                os.close(self.lock)
        return self.report(stopped)

    def report(self, stopped: str) -> dict:
        summary = self.summary(stopped)
        if summary["final_val_bpb"] is not None:
            whole = self.whole
            self.say(f"done ({stopped}): step {summary['step']}, validation "
                     f"{summary['final_val_bpb']:.4f} bpb on the whole valid split "
                     f"({whole.describe()}; unigram {whole.unigram:.4f}, bigram "
                     f"{whole.bigram:.4f} on the same tokens; the sample read "
                     f"{summary['val_bpb']:.4f}, at start {summary['start_val_bpb']:.4f}), "
                     f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['elapsed_s']:.1f} s "
                     f"-> {self.out}")
        return summary

    def _progress_bar(self) -> tqdm | None:
        if not (self.is_main and self.options.progress):
            return None
        return tqdm(total=self.options.steps, initial=self.start_step, unit="step",
                    dynamic_ncols=True, file=sys.stderr)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, stopped: str) -> dict:
        rates = self.step_rate
        return {
            "out": str(self.out),
            "step": self.engine.step_index,
            "steps_run": self.engine.step_index - self.start_step,
            "stopped_by": stopped,
            "elapsed_s": time.monotonic() - self.t0,
            "tokens_per_s": float(np.median(rates)) if rates else 0.0,
            "val_bpb": self.val_bpb,
            "start_val_bpb": self.start_bpb,
            "unigram_bpb": self.sample.unigram if self.sample else None,
            "bigram_bpb": self.sample.bigram if self.sample else None,
            "final_val_bpb": self.final_bpb,
            "final_tokens": math.prod(self.whole.shape) if self.whole else None,
            "final_unigram_bpb": self.whole.unigram if self.whole else None,
            "final_bigram_bpb": self.whole.bigram if self.whole else None,
        }


def counted(count: int, noun: str) -> str:
    """'1 layer', '2 layers': a count with its noun."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def gemm_note(backend) -> str:
    """', vnni GEMM' (the cpu backend's base-product engine); '' for other backends."""
    gemm = getattr(backend, "gemm", None)
    return f", {gemm.name} GEMM" if gemm is not None else ""


def pretrain(config: TrainConfig, corpus: Corpus, options: RunOptions, backend: str = "auto",
             fitness_fn: FitnessFn | None = None, is_main: bool = True,
             sync_step: StepSync | None = None, total: TotalFn | None = None) -> dict:
    """Train ``config`` on ``corpus`` into ``options.out``; returns a summary dict.

    Every check that can fail runs before anything is written. ``fitness_fn(engine, windows)``
    returns every member's int32 fitness (default: the engine's own chunked evaluation). A
    distributed runner scores its shard there and all-gathers, passes ``is_main`` only on
    rank 0 (the only one that prints and writes), ``sync_step`` to settle after every step
    whether all stop and evaluate (see ``_Run.agree``), and ``total`` to score a shard of the
    validation windows and sum over the workers.
    """
    for name, value, kind in (("config", config, TrainConfig), ("corpus", corpus, Corpus),
                              ("options", options, RunOptions)):
        if not isinstance(value, kind):
            hint = " (load_corpus makes one)" if kind is Corpus else ""
            raise ConfigError(f"{name} must be a {kind.__name__}{hint}, got "
                              f"{type(value).__name__}")
    options.validate()
    engine = start_engine(config, corpus, options, backend, is_main)
    if fitness_fn is None:
        def fitness_fn(eng: Engine, windows: np.ndarray) -> np.ndarray:
            return eng.population_fitness(windows, options.chunk_pairs)
    return _Run(engine, corpus, options, fitness_fn, is_main, sync_step, total).run()
