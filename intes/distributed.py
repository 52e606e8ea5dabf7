"""Distributed ES: every worker scores a shard of the population; only fitness travels.

Why this is enough: the update is a pure function of (weights, seed, step, the N member
fitness values), since ``es.tell`` regenerates every pair's noise from seeds. Workers that
start from the same weights and apply the same fitness vector stay bit-identical without
ever sending a weight or a gradient: one all-gather of N int32 values per step (4 N bytes),
whatever the model size.

A step on worker r of W: score the antithetic pairs of its contiguous shard (``shard_pairs``;
a pair is never split, shards differ by at most one pair), all-gather the member fitness,
then ``Engine.apply_fitness`` locally like everyone else, then one all-reduce of two flags
(``agree_step``): whether any worker is out of time, and whether rank 0 evaluates now (its
clock sets the automatic interval). An evaluation is sharded too: every worker scores a
contiguous share of the validation windows and the integer log-likelihood totals are summed
(``sharded_total``), so the figure is one process's exactly. Rank 0 alone prints and writes;
every rank validates its inputs before rank 0 writes anything.

Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):
``intes pretrain`` routes here when WORLD_SIZE > 1. torch is imported only on that path.

The collectives always go over gloo, whatever the compute backend: their payloads are a few
host bytes, and gloo reports a dead or silent peer as an error in the collective that met it
(NCCL's watchdog would abort the process instead). Failure model: a worker that dies closes
its sockets, so the others' next collective fails at once; one that hangs is given up on after
``INTES_DIST_TIMEOUT`` seconds. Either way every survivor exits with one ``DistributedError``
line, and rank 0's last checkpoint (written atomically) stays loadable. The timeout must
exceed the longest pause of rank 0 alone (a plot and a checkpoint; evaluations are shared),
and the slowest worker's lag behind the others.

Replicas are compared at the start (settings, data and weights) and then every
``INTES_DIST_VERIFY_EVERY`` steps and at the end (a 64-bit hash of the weights and step, 8
bytes per worker), so a divergence (a nondeterministic backend, a bad node) stops the run
within a few steps instead of silently training W different models.

The free functions (``shard_range``, ``all_gather_fitness``, ``assert_same``,
``agree_step``, ``sum_ranks``, ``sharded_total``) use torch's default process group and are
no-ops without one, so other ES loops (the HF adapter) can call them unconditionally.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from intes.checkpoint import CHECKPOINT_NAME, existing_version
from intes.data import Corpus
from intes.engine import Engine, TrainConfig
from intes.errors import ConfigError, IntesError
from intes.runs import first_difference
from intes.trainer import RunOptions
from intes.trainer import pretrain as train
from intes.trainer import start_engine as validated_engine  # the trainer's checks, unwritten
from intes.validation import log_likelihood_total

TIMEOUT_ENV = "INTES_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
VERIFY_ENV = "INTES_DIST_VERIFY_EVERY"
DEFAULT_VERIFY_EVERY = 10  # steps; a check costs one hash of the weights + 8 bytes per worker


class DistributedError(IntesError):
    """A worker is gone, stalled or disagrees with the others; the run cannot go on."""


class ReplicasDiverged(DistributedError):
    """The workers' weights differ: which replica is right is unknown, and so is rank 0's
    checkpoint, so this error does not suggest resuming from it."""


# ---------------------------------------------------------------------------------------------
# launch environment


def launched() -> bool:
    """True when started by torchrun (or alike) as one of several workers."""
    return _env_int("WORLD_SIZE", 1) > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from None


MAX_TIMEOUT_S = 30 * 24 * 3600  # torch's stores overflow on timeouts of 10^10 s and more


def timeout_seconds() -> float:
    """How long a collective waits for a silent peer (INTES_DIST_TIMEOUT, seconds)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_TIMEOUT_S:
        raise ConfigError(f"{TIMEOUT_ENV} must be a positive number of seconds, at most "
                          f"{MAX_TIMEOUT_S:,} (30 days), got {raw!r}")
    return value


def verify_every() -> int:
    """Steps between replica checks (INTES_DIST_VERIFY_EVERY)."""
    every = _env_int(VERIFY_ENV, DEFAULT_VERIFY_EVERY)
    if every < 1:
        raise ConfigError(f"{VERIFY_ENV} must be >= 1, got {every}")
    return every


# ---------------------------------------------------------------------------------------------
# sharding and hashing (no torch needed)


def shard_pairs(pairs: int, rank: int, world: int) -> tuple[int, int]:
    """Pairs [start, stop) of ``rank``: contiguous, the first ``pairs % world`` get one more.

    Whole pairs only, because a pair's two members are compared with each other in shaping.
    """
    base, extra = divmod(pairs, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def digest(named: Iterable[tuple[str, Any]]) -> int:
    """Signed 64-bit blake2b of (name, dtype, shape, bytes) of numpy arrays or torch tensors.

    Equal on two workers iff their arrays are (up to a 2^-64 collision), and small enough to
    compare in one collective of 8 bytes per worker.
    """
    h = hashlib.blake2b(digest_size=8)
    for name, value in named:
        kind, shape, raw = _raw_bytes(value)
        h.update(f"{name}|{kind}|{shape}|".encode())
        h.update(raw)
    return int.from_bytes(h.digest(), "little", signed=True)


def _raw_bytes(value: Any) -> tuple[str, tuple[int, ...], np.ndarray]:
    """(dtype name, shape, flat uint8 view) of an array or a tensor (bf16 included)."""
    if hasattr(value, "detach"):  # a torch tensor: numpy has no bfloat16, so view its bytes
        import torch

        flat = value.detach().reshape(-1).contiguous().cpu()
        return str(value.dtype), tuple(value.shape), flat.view(torch.uint8).numpy()
    a = np.ascontiguousarray(value)
    return a.dtype.str, a.shape, a.reshape(-1).view(np.uint8)


def _weights_digest(engine: Engine) -> int:
    return digest([("step", np.int64(engine.step_index)), *sorted(engine.params.items())])


def _start_settings(config: TrainConfig, options: RunOptions) -> dict:
    """The settings every worker must share, by name (compared as they are, so a difference
    is named).

    The time limit may differ (the stop is voted on); a different step count would not be, nor
    a different replica check interval (workers would call different collectives), nor another
    validation sample (each worker scores a shard of its own).
    """
    return {"config": config.to_dict(), "steps": options.steps, "resume": options.resume,
            VERIFY_ENV: verify_every(), "eval_sample": [options.eval_streams, options.eval_len]}


def _start_digests(corpus: Corpus, engine: Engine) -> dict[str, int]:
    """What else must be the same on every worker before the first step, one hash each."""
    return {
        "data": digest([("train", corpus.train), ("valid", corpus.valid)]),
        "weights": _weights_digest(engine),
    }


# ---------------------------------------------------------------------------------------------
# collectives over torch's default process group


def _dist() -> Any:
    """torch.distributed when a process group is up, else None (single process).

    Looked up, not imported: without torch loaded there is no group, and a single process
    should not pay torch's import to learn that.
    """
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _gist(err: BaseException) -> str:
    """A torch/gloo error's first sentence, without its '[file.cc:123] ' source prefix."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    line = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])
    return re.split(r"\.(?:\s|$)", line, maxsplit=1)[0][:200]


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a collective that failed (peer gone) or timed out (peer stalled) into one line."""
    try:
        yield
    except RuntimeError as err:  # DistBackendError / DistStoreError and gloo failures
        raise DistributedError(
            f"worker {_env_int('RANK', 0)} lost the other workers during {what} ({_gist(err)}): "
            f"another worker died, or stalled for longer than {TIMEOUT_ENV}="
            f"{timeout_seconds():g} s") from None


def shard_range(n_members: int) -> tuple[int, int]:
    """Members [start, stop) this worker evaluates: whole antithetic pairs, all when alone."""
    if n_members % 2:
        raise ConfigError(f"the population must be even (antithetic pairs), got {n_members}")
    dist = _dist()
    if dist is None:
        return 0, n_members
    start, stop = shard_pairs(n_members // 2, dist.get_rank(), dist.get_world_size())
    return 2 * start, 2 * stop


def all_gather_fitness(local: np.ndarray, n_members: int) -> np.ndarray:
    """Every worker's rows of ``local`` (this worker's ``shard_range`` rows), in member order.

    Rows may carry trailing dims and any dtype torch knows (int32 fitness, float64 rewards).
    Shards differ in length by one pair at most, so each is padded to the longest and trimmed
    after: one tensor all-gather of world x longest rows, no pickling.
    """
    local = np.ascontiguousarray(local)
    dist = _dist()
    if dist is None:
        return local
    import torch

    world = dist.get_world_size()
    sizes = [2 * (b - a) for a, b in (shard_pairs(n_members // 2, r, world) for r in range(world))]
    if len(local) != sizes[dist.get_rank()]:
        raise ValueError(f"worker {dist.get_rank()} has {len(local)} fitness rows, its shard of "
                         f"{n_members} members is {sizes[dist.get_rank()]}")
    send = torch.zeros((max(sizes), *local.shape[1:]), dtype=torch.from_numpy(local).dtype)
    send[:len(local)] = torch.from_numpy(local)
    received = [torch.empty_like(send) for _ in range(world)]
    with _collective("the fitness all-gather"):
        dist.all_gather(received, send)
    return np.concatenate([t[:n].numpy() for t, n in zip(received, sizes, strict=True)])


def assert_same(value: int, what: str, diverged: bool = True) -> None:
    """Stop every worker (one line each) unless all hold the same 64-bit ``value``: replicas
    that ``diverged`` (ReplicasDiverged), or else workers given different inputs."""
    dist = _dist()
    if dist is None:
        return
    import torch

    mine = torch.tensor([value], dtype=torch.int64)
    values = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    with _collective(f"the check of {what}"):
        dist.all_gather(values, mine)
    differ = [r for r, v in enumerate(values) if int(v.item()) != int(values[0].item())]
    ranks = ", ".join(map(str, differ))
    if differ and diverged:
        raise ReplicasDiverged(f"workers diverged: {what} on rank(s) {ranks} differ from rank "
                               "0's; stopping (a nondeterministic backend or a faulty machine)")
    if differ:
        raise DistributedError(f"{what} on rank(s) {ranks} differ from rank 0's: every worker "
                               "needs the same")


def agree_step(stop: bool, evaluate: bool) -> tuple[bool, bool]:
    """(any worker's ``stop``, rank 0's ``evaluate``) on every worker, in one all-reduce: the
    trainer's ``sync_step``, called by every worker after every step whatever its time limit."""
    dist = _dist()
    mine = evaluate if dist is None or dist.get_rank() == 0 else False
    any_stop, main_evaluates = _all_reduce([int(stop), int(mine)], "the step's vote", "MAX")
    return any_stop > 0, main_evaluates > 0


def sum_ranks(value: int) -> int:
    """The sum of every worker's integer ``value`` (int64, exact)."""
    return _all_reduce([value], "the evaluation", "SUM")[0]


def _all_reduce(values: list[int], what: str, op: str) -> list[int]:
    """``values`` combined element-wise over the workers by torch's ReduceOp ``op``."""
    dist = _dist()
    if dist is None:
        return values
    import torch

    t = torch.tensor(values, dtype=torch.int64)
    with _collective(what):
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return [int(v) for v in t.tolist()]


def shard_total(engine: Engine, windows: np.ndarray, rank: int, world: int) -> int:
    """Worker ``rank``'s part of ``log_likelihood_total``: a contiguous share of the windows
    (split as ``shard_pairs`` splits pairs; empty when there are fewer windows than workers)."""
    start, stop = shard_pairs(len(windows), rank, world)
    return log_likelihood_total(engine, windows[start:stop])


def sharded_total(engine: Engine, windows: np.ndarray) -> int:
    """``log_likelihood_total`` shared by the workers (the trainer's ``total``): each scores
    its shard and the integers are summed, equal to one process's total for any world size."""
    dist = _dist()
    if dist is None:
        return log_likelihood_total(engine, windows)
    return sum_ranks(shard_total(engine, windows, dist.get_rank(), dist.get_world_size()))


def _gather_objects(obj: Any, what: str) -> list[Any]:
    """Every worker's small picklable ``obj``; for the start check only (pickle, not tensors)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    with _collective(what):
        dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# process group


def _uses_cuda(backend: str) -> bool:
    """Whether the compute backend ``backend`` runs on CUDA: a named one ("cuda" is also what
    the HF adapter passes for a torch CUDA device) or the one 'auto' resolves to."""
    if backend != "auto":
        return backend == "cuda"
    from intes.kernels import resolve

    return resolve(backend) == "cuda"


def _bind_gpu(local_rank: int) -> None:
    """One GPU per worker on a machine: torch's current device and CuPy's, before any use."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        raise ConfigError("--backend cuda: torch sees no GPU on this machine; compute on the "
                          "CPU (--backend cpu)")
    if local_rank >= gpus:
        raise ConfigError(f"worker {_env_int('RANK', 0)} (local rank {local_rank}) has no GPU of "
                          f"its own for the cuda backend: torch sees {gpus} on this machine; "
                          "start at most that many workers per machine, or compute on the CPU")
    torch.cuda.set_device(local_rank)
    try:
        import cupy
    except ImportError:
        return
    cupy.cuda.Device(local_rank).use()


def init_from_env(backend: str = "auto") -> None:
    """Join the workers torchrun started, over gloo whatever the compute backend (the cuda one
    gets a GPU per worker for its work only): see the module's failure model.

    The timeout also bounds the wait for workers that never show up.
    """
    try:
        import torch.distributed as dist
    except ImportError:
        raise ConfigError("running under torchrun needs torch: pip install torch") from None
    if _uses_cuda(backend):
        _bind_gpu(_env_int("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=timeout_seconds())
    try:
        with _collective("start-up, waiting for every worker to join"):
            dist.init_process_group("gloo", timeout=timeout, rank=_env_int("RANK", 0),
                                    world_size=_env_int("WORLD_SIZE", 1))
    except ValueError as err:  # WORLD_SIZE set by hand without torchrun's other variables
        raise ConfigError(f"cannot join the other workers ({_gist(err)}); start intes with "
                          "torchrun") from None


def shutdown(finished: bool = False) -> None:
    """Leave the process group (if any), so the interpreter exits without a warning.

    After a normal finish every worker first meets the others at a barrier: a worker that tears
    its group down while a peer (rank 0, still writing) is connected can abort in gloo. On an
    error path there is no barrier, since a peer may never come.
    """
    dist = _dist()
    if dist is not None:
        try:
            if finished:
                with _collective("the end of the run"):
                    dist.barrier()
        finally:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# distributed pretraining


def _agree_on_start(config: TrainConfig, corpus: Corpus, options: RunOptions,
                    backend: str) -> None:
    """Every worker runs the trainer's checks; nobody starts unless all pass and agree.

    Runs before rank 0 creates anything, so a refusal on any worker leaves no run directory
    behind, and a node with other data, config or checkpoint is caught before the first step.
    """
    rank = _env_int("RANK", 0)
    error: IntesError | None = None
    digests: dict[str, int] = {}
    settings: dict = {}
    try:
        engine = validated_engine(config, corpus, options, backend, is_main=rank == 0)
        digests = _start_digests(corpus, engine)
        settings = _start_settings(config, options)
    except IntesError as err:
        error = err
    reports = _gather_objects((str(error) if error else None, digests, settings),
                              "the start check")
    if error is not None:
        raise error
    for other, (message, theirs, their_settings) in enumerate(reports):
        if message is not None:
            raise DistributedError(f"worker {other} cannot start: {message}")
        differ = [key for key in digests if theirs[key] != reports[0][1][key]]
        found = first_difference(their_settings, reports[0][2])
        if found:  # name the setting: "config.seed is 7 on worker 1, 0 on worker 0"
            name, theirs_value, first_value = found
            raise DistributedError(f"{name} is {theirs_value!r} on worker {other} but "
                                   f"{first_value!r} on worker 0: every worker needs the same "
                                   "flags and environment")
        if differ:
            raise DistributedError(f"worker {other}'s {' and '.join(differ)} differ from worker "
                                   "0's: every worker needs the same data and checkpoint")


class ShardFitness:
    """The ``fitness_fn`` of one worker: score its pairs, all-gather, check replicas.

    Works alone too (no process group: the whole population, no checks), so a benchmark
    times exactly what a worker does.
    """

    def __init__(self, population: int, chunk_pairs: int | None = None):
        start, stop = shard_range(population)
        self.start, self.stop = start // 2, stop // 2  # pairs
        self.chunk = chunk_pairs
        self.every = verify_every()
        self.first_step: int | None = None
        self.engine: Engine | None = None

    def __call__(self, engine: Engine, windows: np.ndarray) -> np.ndarray:
        self.engine = engine
        if self.first_step is None:
            self.first_step = engine.step_index
        if (engine.step_index - self.first_step) % self.every == 0:
            self.verify()
        local = engine.evaluate_pairs(windows, self.start, self.stop, self.chunk)
        return all_gather_fitness(local, engine.config.es.population)

    def verify(self) -> None:
        """All workers hold the same weights at the same step (checked before scoring)."""
        if self.engine is not None:
            assert_same(_weights_digest(self.engine),
                        f"the weights at step {self.engine.step_index}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's preemption, `timeout`, `docker stop`, or torchrun stopping the
    other workers when one fails) ends a pretraining run as Ctrl-C does: the last finished
    step is saved (by rank 0, whose weights every worker shares) and the command that
    continues it printed."""
    if threading.current_thread() is not threading.main_thread():  # handlers: main thread only
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sigterm_as_error() -> Iterator[None]:
    """SIGTERM becomes a DistributedError, so a stopped worker still says why in one line.

    torchrun terminates the surviving workers as soon as one fails, usually before their own
    collective notices; schedulers preempt the same way.
    """
    if threading.current_thread() is not threading.main_thread():  # handlers: main thread only
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise DistributedError(f"worker {_env_int('RANK', 0)} was stopped (SIGTERM): torchrun "
                               "stops every worker when one fails; see that worker's error")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def pretrain_from(inputs: Callable[[], tuple[TrainConfig, Corpus, RunOptions]],
                  backend: str = "auto") -> dict:
    """``trainer.pretrain`` as one of the workers torchrun started; same result as one process.

    Every worker reads its ``inputs()`` (flags, data and, on --resume, the checkpoint,
    read-only) after the workers have joined: where that fails on one machine only (a file
    missing there), every worker stops at once naming it, where the others waited out the
    timeout to join. Rank 0 alone writes. Returns the trainer's summary (the same validation
    figures on every worker).
    """
    init_from_env(backend)
    try:
        with sigterm_as_interrupt():
            config, corpus, options = read_together(inputs)
            _agree_on_start(config, corpus, options, backend)
            summary = _train(config, corpus, options, backend)
            shutdown(finished=True)
            return summary
    finally:
        shutdown()


T = TypeVar("T")


def read_together(inputs: Callable[[], T]) -> T:
    """``inputs()`` (what each machine reads for itself: flags, files, a checkpoint) on every
    worker of the group; if it failed on any, all stop at once, each naming the first."""
    error: IntesError | None = None
    read = None
    try:
        read = inputs()
    except IntesError as err:
        error = err
    reports = _gather_objects(str(error) if error else None, "reading the run's inputs")
    if error is not None:
        raise error
    for other, message in enumerate(reports):
        if message is not None:
            raise DistributedError(f"worker {other} cannot start: {message}")
    return read


def _train(config: TrainConfig, corpus: Corpus, options: RunOptions, backend: str) -> dict:
    """Train with the shard's fitness hook and check the final weights; a failure names the
    checkpoint to resume from, if rank 0 has written one and the replicas did not diverge."""
    shard = ShardFitness(config.es.population, options.chunk_pairs)
    try:
        summary = train(config, corpus, options, backend, fitness_fn=shard,
                        is_main=_dist().get_rank() == 0, sync_step=agree_step,
                        total=sharded_total)
        shard.verify()  # the final weights, which rank 0 has just saved
    except DistributedError as err:
        if isinstance(err, ReplicasDiverged) or existing_version(
                options.out / CHECKPOINT_NAME) is None:
            raise
        raise DistributedError(f"{err}; the last checkpoint in {options.out} is intact: "
                               "continue with --resume") from None
    return summary
