"""The training engine: one ES step = ask -> score every member -> shape -> tell.

``Engine`` owns the weights, the step counter and nothing else: everything a later step
needs is (weights, step, config), which is exactly what a checkpoint holds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import TypeVar

import numpy as np

from intes import es
from intes.errors import ConfigError, check_integers, plain_integers
from intes.intmath import MAX_VOCAB
from intes.kernels import get_backend
from intes.kernels.base import Backend
from intes.kernels.reference import linear_bound
from intes.models import MODELS, build_model
from intes.models.base import INIT_STEP, Ops, ParamSpec, init_params, make_noise, prepare

MAX_STEPS = INIT_STEP  # the noise hash's step field is 32 bits; its last value is the init's
MAX_SEQ_LEN = 1 << 16  # per-token |log-likelihood| < 2^15 (1/256 bit), so T * 2^15 < 2^31
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "rwkv"
    vocab_size: int = 256
    dim: int = 96
    # One layer: in a 10-minute run on 2 cores it ends 0.11 bits per byte below two layers
    # (rwkv and egg, whole valid split; three layers end above both), as ES estimates fewer
    # weights from the same population and fits 1.8x the steps; in 20 minutes still 0.095.
    layers: int = 1

    def __post_init__(self) -> None:
        plain_integers(self)

    def validate(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in MODELS:
            raise ConfigError(f"unknown model {self.kind!r}; choose one of {sorted(MODELS)}")
        check_integers(vocab_size=self.vocab_size, dim=self.dim, layers=self.layers)
        if not 8 <= self.dim <= 4096 or self.dim % 8:
            raise ConfigError(f"dim must be a multiple of 8 in 8..4096, got {self.dim}")
        if not 1 <= self.layers <= 64:
            raise ConfigError(f"layers must be in 1..64, got {self.layers}")
        if not 2 <= self.vocab_size < MAX_VOCAB:
            raise ConfigError(f"vocab size must be in 2..{MAX_VOCAB - 1}, got {self.vocab_size}")


@dataclass(frozen=True)
class TrainConfig:
    """The whole definition of a run: same config + seed + data -> same weights, anywhere."""

    model: ModelConfig = field(default_factory=ModelConfig)
    es: es.ESConfig = field(default_factory=es.ESConfig)
    seq_len: int = 64  # tokens scored per member per step
    seed: int = 0

    def __post_init__(self) -> None:
        plain_integers(self)

    def validate(self) -> None:
        for name, kind in (("model", ModelConfig), ("es", es.ESConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} must be a {kind.__name__}, got "
                                  f"{type(getattr(self, name)).__name__}")
        self.model.validate()
        self.es.validate()
        check_integers(seq_len=self.seq_len, seed=self.seed)
        if not 1 <= self.seq_len <= MAX_SEQ_LEN:
            raise ConfigError(f"seq len must be in 1..{MAX_SEQ_LEN}, got {self.seq_len}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in 0..2^32-1, got {self.seed}")
        m = self.model
        fan_in = max(s.shape[-1] for s in build_model(m.kind, m.vocab_size, m.dim, 1).specs
                     if s.kind == "matrix")
        if linear_bound(fan_in, self.es.rank, self.es.sigma_shift) >= 2**31:
            raise ConfigError(f"rank {self.es.rank} is too large for dim {m.dim}: a layer with "
                              f"fan-in {fan_in} could overflow int32; lower --rank or --dim")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config ``to_dict`` gave; one ConfigError line for a key missing or unknown."""
        try:
            unknown = sorted(set(d) - {f.name for f in fields(cls)})
            if unknown:
                raise TypeError(f"unknown key {unknown[0]!r}")
            return cls(model=ModelConfig(**d["model"]), es=es.ESConfig(**d["es"]),
                       seq_len=d["seq_len"], seed=d["seed"])
        except KeyError as err:
            raise ConfigError(f"bad config: it lacks {err}") from None
        except TypeError as err:
            raise ConfigError(f"bad config: {err}") from None


def params_mismatch(specs: list[ParamSpec], arrays: Mapping[str, np.ndarray]) -> str | None:
    """What keeps ``arrays`` from being the weights of a model with ``specs`` (each an int8
    array of its spec's shape, no other names), or None."""
    for spec in specs:
        a = arrays.get(spec.name)
        if not isinstance(a, np.ndarray) or a.shape != spec.shape or a.dtype != np.int8:
            found = ("missing" if a is None else f"{a.dtype}{list(a.shape)}"
                     if isinstance(a, np.ndarray) else type(a).__name__)
            return f"{spec.name!r} is {found}, expected int8{list(spec.shape)}"
    unknown = sorted(set(arrays) - {s.name for s in specs}, key=str)
    return f"{unknown[0]!r} is not a weight of this model" if unknown else None


def check_windows(windows: np.ndarray, vocab_size: int, rows: int | None = None) -> None:
    """Refuse windows a forward would misread rather than score: not (rows, tokens + 1)
    integers, token ids outside the vocabulary, a row count other than the population's (one
    window per member), or more tokens than an int32 sum per row holds."""
    if not isinstance(windows, np.ndarray):
        raise ConfigError(f"windows must be a numpy integer array, got {type(windows).__name__}")
    if windows.ndim != 2 or windows.shape[1] < 2 or not np.issubdtype(windows.dtype, np.integer):
        raise ConfigError(f"windows must be integer (rows, tokens + 1) with tokens >= 1, got "
                          f"{windows.dtype}{list(windows.shape)}")
    if rows is not None and len(windows) != rows:
        raise ConfigError(f"{len(windows)} windows for a population of {rows}: give one per "
                          "member (member_windows repeats a sequence for its group)")
    if windows.shape[1] - 1 > MAX_SEQ_LEN:
        raise ConfigError(f"windows of {windows.shape[1] - 1} tokens; at most {MAX_SEQ_LEN} "
                          "are scored at once")
    if windows.size and not 0 <= windows.min() <= windows.max() < vocab_size:
        raise ConfigError(f"token ids must be in 0..{vocab_size - 1}, got "
                          f"{windows.min()}..{windows.max()}")


def check_fitness(raw: np.ndarray, population: int) -> None:
    """Refuse member fitness the shaping would misread: one int32-range integer per member
    (a float would be truncated, a wrong length shape pairs never evaluated)."""
    if (not isinstance(raw, np.ndarray) or raw.shape != (population,)
            or not np.issubdtype(raw.dtype, np.integer)):
        found = (f"{raw.dtype}{list(raw.shape)}" if isinstance(raw, np.ndarray)
                 else type(raw).__name__)
        raise ConfigError(f"fitness must be an integer array of one value per member, "
                          f"[{population}], got {found}")
    if raw.size and not INT32_MIN <= int(raw.min()) <= int(raw.max()) <= INT32_MAX:
        raise ConfigError(f"fitness must be in the int32 range, got {raw.min()}..{raw.max()}")


def score(model, ops: Ops, windows: np.ndarray, state: dict | None = None) -> np.ndarray:
    """Summed int32 log2-likelihood (1/256 bit) of windows[:, 1:] given windows[:, :-1].

    The recurrent state of a row is reset where its input token is 0 (document separator).
    Where the backend's ``token_block(rows, width)`` is above 1 the model runs that many
    tokens at once (``forward_block``); the bits are the same.
    """
    rows, length = windows.shape
    state = model.init_state(rows) if state is None else state
    total = np.zeros(rows, dtype=np.int32)
    token_block = getattr(ops.backend, "token_block", None)
    block = token_block(rows, model.dim) if token_block else 1
    if block > 1:
        for t0 in range(0, length - 1, block):
            t1 = min(t0 + block, length - 1)
            tokens, targets = (np.ascontiguousarray(windows[:, t0 + s:t1 + s].T) for s in (0, 1))
            resets = tokens == 0
            logits, state = model.forward_block(ops, tokens, resets if resets.any() else None,
                                                state)
            ll = ops.backend.log_likelihood(logits, targets)
            total += ll.sum(axis=0, dtype=np.int32)  # int32 wraps like the sum token by token
        return total
    for t in range(length - 1):
        tokens = windows[:, t]
        boundary = tokens == 0
        if boundary.any():
            for arr in state.values():
                arr[boundary] = 0
        logits, state = model.forward(ops, tokens, state)
        total += ops.backend.log_likelihood(logits, windows[:, t + 1])
    return total


# The update goes on the backend's threads only where they pay. A small model's update is
# mostly Python per tensor, which threads take in turn under the GIL: on the Zen 4 host, in
# the cells of widths 64-256 and populations 64-4096 below both figures one thread ran the
# update 1.07-1.6x faster than two, and in those above either, two ran it up to 1.7x faster
# than one (one cell 0.94x; benchmarks/update_threads.py,
# benchmarks/results/cpu_update_threads_zen4.json). The bits are the same either way.
THREADED_UPDATE_WORK = 250_000_000  # pairs x es.update_cost summed over the tensors
THREADED_UPDATE_WEIGHTS = 1 << 20  # matrix weights, each read, stepped and packed anew


def update_threads(specs: list[ParamSpec], cfg: es.ESConfig, threads: int) -> int:
    """Threads for the update: ``threads``, or one where the update is too small for them to
    pay (``THREADED_UPDATE_WORK``, ``THREADED_UPDATE_WEIGHTS``)."""
    work = cfg.pairs * sum(es.update_cost(s, cfg.rank) for s in specs)
    weights = sum(int(np.prod(s.shape)) for s in specs if s.kind == "matrix")
    large = work >= THREADED_UPDATE_WORK or weights >= THREADED_UPDATE_WEIGHTS
    return threads if large else 1


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """One process-wide pool per thread count: its threads keep their backend scratch buffers."""
    return ThreadPoolExecutor(threads, thread_name_prefix=f"intes-{threads}")


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """[0, count) as at most ``parts`` contiguous spans of near-equal size, none empty."""
    parts = min(parts, count)
    if parts < 1:
        return []
    edges = [(count * i) // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


class Engine:
    """Weights + step + config; ``step(windows)`` runs one full ES step on member windows.

    Members are independent, so a backend with ``threads`` > 1 (the cpu backend: one per
    usable core, shared among torchrun's local workers, or ``INTES_CPU_THREADS``) gets the
    population in that many slices, evaluated concurrently, or in more where it caps the
    member rows of a forward call (``chunk_rows``); each slice is a whole forward with its
    own base products, and the bits do not depend on the slicing.
    """

    def __init__(self, config: TrainConfig, backend: str | Backend = "auto",
                 params: Mapping[str, np.ndarray] | None = None, step: int = 0):
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
        config.validate()
        check_integers(step=step)
        if not 0 <= step <= MAX_STEPS:
            raise ConfigError(f"step must be in 0..{MAX_STEPS}, got {step}")
        if not isinstance(backend, str) and not hasattr(backend, "linear"):
            raise ConfigError("backend must be a name (auto, reference, cpu, cuda) or a backend "
                              f"object, got {backend!r}")
        self.config = config
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        m = config.model
        self.model = build_model(m.kind, m.vocab_size, m.dim, m.layers)
        self.specs = self.model.specs
        self.params = params if params is not None else init_params(self.specs, config.seed)
        self.step_index = step
        self.threads = max(1, int(getattr(self.backend, "threads", 1)))
        self.update_threads = update_threads(self.specs, config.es, self.threads)
        # a backend that keeps activations in its own memory scores with its own loop
        self.score: Callable[..., np.ndarray] = getattr(self.backend, "score", score)

    @property
    def params(self) -> Mapping[str, np.ndarray]:
        """The weights, read-only: the backend computes with forms of them made once per set
        of weights (``prepared``), so an edit in place would go unseen. Assign new weights
        instead (``engine.params = {...}``), which checks them and makes those forms anew."""
        return MappingProxyType({name: _read_only(a) for name, a in self._params.items()})

    @params.setter
    def params(self, arrays: Mapping[str, np.ndarray]) -> None:
        if not isinstance(arrays, Mapping):
            raise ConfigError(f"params must be a mapping of names to arrays, got "
                              f"{type(arrays).__name__}")
        wrong = params_mismatch(self.specs, arrays)
        if wrong:
            raise ConfigError(f"params do not fit the model: {wrong}")
        # copies: the caller's arrays stay theirs to change
        self._set_params({s.name: np.array(arrays[s.name], order="C") for s in self.specs})

    def _set_params(self, arrays: dict[str, np.ndarray], prepared: dict | None = None) -> None:
        self._params, self._prepared = arrays, prepared

    @property
    def prepared(self) -> dict:
        """The backend's forms of the matrices (``prepare``), made once per set of weights: by
        ``apply_fitness`` inside the update's tasks, else here in groups of near-equal size
        on the backend's threads (packing is real work for some)."""
        if self._prepared is None:
            matrices = [s for s in self.specs if s.kind == "matrix"]
            groups = es.balanced_groups([int(np.prod(s.shape)) for s in matrices], self.threads)
            parts = self.map(lambda ids: prepare(self.backend, [matrices[i] for i in ids],
                                                 self._params), groups)
            self._prepared = {name: form for part in parts for name, form in part.items()}
        return self._prepared

    def member_ops(self, pair_start: int, pair_stop: int) -> Ops:
        """Ops for members 2*pair_start .. 2*pair_stop-1 at the current step."""
        cfg = self.config
        noise = make_noise(self.specs, cfg.seed, self.step_index,
                           np.arange(pair_start, pair_stop), cfg.es.rank, cfg.es.noise_reuse,
                           self.backend)
        return Ops(self.backend, self.specs, self._params, noise, cfg.es.sigma_shift,
                   self.prepared)

    def evaluate_members(self, windows: np.ndarray, pair_start: int, pair_stop: int) -> np.ndarray:
        """Fitness (int32) of members 2*pair_start .. 2*pair_stop-1 on their windows rows."""
        ops = self.member_ops(pair_start, pair_stop)
        return self.score(self.model, ops, windows[2 * pair_start:2 * pair_stop])

    def chunks(self, count: int, rows_each: int) -> list[tuple[int, int]]:
        """[0, count) in near-equal contiguous chunks for the backend's threads, each item
        ``rows_each`` member rows: one chunk per thread, or more, a multiple of the threads,
        where a backend caps the rows of one forward call (``chunk_rows``)."""
        parts, cap = self.threads, getattr(self.backend, "chunk_rows", None)
        if cap:
            need = -(-count // max(1, cap // rows_each))  # chunks of at most cap rows
            parts = max(1, -(-need // self.threads)) * self.threads
        return split(count, parts)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """[fn(item) for item in items], on the backend's threads when it has several."""
        items = list(items)
        if self.threads == 1 or len(items) == 1:
            return [fn(item) for item in items]
        return list(_pool(self.threads).map(fn, items))

    def evaluate_pairs(self, windows: np.ndarray, start: int, stop: int,
                       chunk_pairs: int | None = None) -> np.ndarray:
        """Fitness of members 2*start .. 2*stop-1: pairs in chunks of ``chunk_pairs`` (default:
        ``chunks``, near-equal, one or more per thread), chunks run on the backend's threads;
        same bits for any chunking."""
        check_windows(windows, self.config.model.vocab_size, self.config.es.population)
        pairs = self.config.es.pairs
        check_integers(start=start, stop=stop)
        if not 0 <= start <= stop <= pairs:
            raise ConfigError(f"pairs {start}..{stop} are not a span of 0..{pairs}")
        if chunk_pairs is not None:
            check_integers(chunk_pairs=chunk_pairs)
            if chunk_pairs < 1:
                raise ConfigError(f"chunk pairs must be >= 1, got {chunk_pairs}")
        if stop == start:
            return np.zeros(0, dtype=np.int32)
        if chunk_pairs:
            spans = [(p, min(p + chunk_pairs, stop)) for p in range(start, stop, chunk_pairs)]
        else:
            spans = [(start + lo, start + hi) for lo, hi in self.chunks(stop - start, 2)]
        _ = self.prepared  # made once here, not raced for by the threads
        return np.concatenate(self.map(lambda span: self.evaluate_members(windows, *span), spans))

    def population_fitness(self, windows: np.ndarray, chunk_pairs: int | None = None) -> np.ndarray:
        """Fitness of every member (see ``evaluate_pairs``)."""
        return self.evaluate_pairs(windows, 0, self.config.es.pairs, chunk_pairs)

    def apply_fitness(self, raw: np.ndarray) -> np.ndarray:
        """Shape member fitness, update the weights from seeds, advance the step."""
        if self.step_index >= MAX_STEPS:  # its noise would be the init's
            raise ConfigError(f"step {self.step_index} is past the noise hash's last step")
        cfg = self.config
        check_fitness(raw, cfg.es.population)
        shaped = es.shape_fitness(raw, cfg.es.fitness)
        prepared = {}

        def prepare_matrix(spec: ParamSpec, new: np.ndarray) -> None:
            if spec.kind == "matrix":  # the next forward's form, made where the update ran
                prepared[spec.name] = self.backend.prepare(new)

        self._set_params(es.tell(self.backend, self.specs, self._params, cfg.seed,
                                 self.step_index, shaped, cfg.es, self.map, self.update_threads,
                                 prepare_matrix), prepared)
        self.step_index += 1
        return shaped

    def warm_up(self, windows: np.ndarray) -> None:
        """Run a step's kernels once on one pair and two tokens of ``windows`` and discard the
        results, so that JIT compilation happens here rather than inside a timed run. Weights and
        step stay as they are (the packed forms made are the ones the step would make): the
        next step's bits do not change."""
        self.evaluate_members(windows[:2, :3], 0, 1)
        es.tell(self.backend, self.specs, self._params, self.config.seed, self.step_index,
                np.ones(1, dtype=np.int32), self.config.es)

    def step(self, windows: np.ndarray, chunk_pairs: int | None = None) -> np.ndarray:
        """One ES step on (population, seq_len + 1) windows; returns member fitness."""
        raw = self.population_fitness(windows, chunk_pairs)
        self.apply_fitness(raw)
        return raw

    def inference_ops(self) -> Ops:
        return Ops(self.backend, self.specs, self._params, None, self.config.es.sigma_shift,
                   self.prepared)

    def log_likelihood(self, windows: np.ndarray) -> np.ndarray:
        """Unperturbed summed log2-likelihood per row (int32, 1/256 bit), rows sliced over the
        backend's threads like the population."""
        check_windows(windows, self.config.model.vocab_size)
        ops = self.inference_ops()
        spans = self.chunks(len(windows), 1)
        if not spans:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate(self.map(lambda s: self.score(self.model, ops,
                                                            windows[s[0]:s[1]]), spans))


def member_windows(sequences: np.ndarray, group_size: int) -> np.ndarray:
    """Repeat each sequence for the group of members that reads it."""
    check_integers(group_size=group_size)
    if group_size < 1:
        raise ConfigError(f"group size must be >= 1, got {group_size}")
    return np.repeat(sequences, group_size, axis=0)
