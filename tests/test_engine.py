"""Determinism contract of the training engine (README, Determinism) on tiny configs."""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intes import distributed, intmath
from intes.bench import gemm_engines
from intes.engine import (
    MAX_STEPS,
    Engine,
    ModelConfig,
    TrainConfig,
    member_windows,
    score,
    split,
)
from intes.errors import ConfigError
from intes.es import FITNESS_KINDS, ESConfig
from intes.kernels.cpu import CpuBackend
from intes.kernels.reference import ReferenceBackend
from intes.models.base import Ops

VOCAB = 24
ENGINE = settings(max_examples=max(4, settings.default.max_examples // 2))


GEMMS = sorted(gemm_engines())  # the cpu backend's GEMM engines this machine runs


@dataclass(frozen=True)
class Case:
    config: TrainConfig
    data_seed: int
    cpu: tuple[int, str, int | None] | None = None  # (threads, GEMM, token block), or reference

    @property
    def pairs(self) -> int:
        return self.config.es.pairs

    def windows(self, step: int) -> np.ndarray:
        """Member windows for one step: one sequence per group, token 0 (a reset) is common."""
        cfg = self.config
        rng = np.random.default_rng([self.data_seed, step])
        seqs = rng.integers(0, VOCAB, (cfg.es.population // cfg.es.group_size, cfg.seq_len + 1))
        return member_windows(seqs, cfg.es.group_size)

    def engine(self, **kw) -> Engine:
        """On the numpy reference, or the cpu backend with the drawn threads, GEMM engine and
        token block: the determinism claims hold on every backend."""
        backend = ReferenceBackend() if self.cpu is None else CpuBackend(*self.cpu)
        return Engine(self.config, backend, **kw)


@st.composite
def cases(draw):
    pop = 2 * draw(st.integers(2, 8))
    groups = [g for g in range(2, pop + 1, 2) if pop % g == 0]
    es_cfg = ESConfig(population=pop, group_size=draw(st.sampled_from(groups)),
                      rank=draw(st.integers(1, 4)), sigma_shift=draw(st.integers(2, 6)),
                      noise_reuse=draw(st.integers(1, 3)),
                      fitness=draw(st.sampled_from(FITNESS_KINDS)),
                      alpha_final_log2=draw(st.integers(0, 4)),
                      alpha_steps=draw(st.integers(1, 6)))
    model = ModelConfig(kind=draw(st.sampled_from(["rwkv", "egg"])), vocab_size=VOCAB,
                        dim=draw(st.sampled_from([8, 16, 24, 32])), layers=draw(st.integers(1, 2)))
    cfg = TrainConfig(model=model, es=es_cfg, seq_len=draw(st.integers(4, 12)),
                      seed=draw(st.integers(0, 2**32 - 1)))
    cfg.validate()
    cpu = draw(st.none() | st.tuples(st.integers(1, 3), st.sampled_from(GEMMS),
                                     st.none() | st.integers(1, 5)))
    return Case(cfg, draw(st.integers(0, 2**32 - 1)), cpu)


def run(engine: Engine, case: Case, steps: int, chunks=None) -> list[np.ndarray]:
    """Advance an engine `steps` steps on the case's data; returns each step's member fitness."""
    out = []
    for i in range(steps):
        chunk = None if chunks is None else chunks[i % len(chunks)]
        out.append(engine.step(case.windows(engine.step_index), chunk))
    return out


def assert_same_params(p, q):
    assert set(p) == set(q)
    for name in p:
        assert p[name].dtype == q[name].dtype == np.int8, name
        assert np.array_equal(p[name], q[name]), name


@ENGINE
@given(cases(), st.integers(1, 4))
def test_same_seed_config_data_gives_identical_weights(case, k):
    """(a) Two independent runs of K steps give bit-identical weights and fitness, and so does
    the numpy reference: any backend, engine, thread count and token block, any model shape."""
    e1, e2 = case.engine(), case.engine()
    f1, f2 = run(e1, case, k), run(e2, case, k)
    assert e1.step_index == e2.step_index == k
    assert all(np.array_equal(a, b) for a, b in zip(f1, f2, strict=True))
    assert_same_params(e1.params, e2.params)
    reference = Case(case.config, case.data_seed).engine()
    assert all(np.array_equal(a, b) for a, b in zip(f1, run(reference, case, k), strict=True))
    assert_same_params(e1.params, reference.params)
    # not vacuous: at step 0 (alpha = 1, threshold 0) any non-zero shaped fitness moves weights
    e3 = case.engine()
    init = {n: v.copy() for n, v in e3.params.items()}
    if np.any(e3.apply_fitness(f1[0])):
        assert any(not np.array_equal(init[n], e3.params[n]) for n in init)


@ENGINE
@given(cases())
def test_different_seed_gives_different_noise_and_update(case):
    """The run depends on the seed through its noise, not only its initial weights (so (a) is
    not passing vacuously): from the same weights, another seed perturbs the members
    differently and moves the weights differently for the same fitness."""
    other = replace(case.config, seed=case.config.seed ^ 1)
    e1 = case.engine()
    e2 = Engine(other, e1.backend, params={n: p.copy() for n, p in e1.params.items()})
    n1, n2 = (e.member_ops(0, case.pairs).noise for e in (e1, e2))

    def factors(noise) -> list[np.ndarray]:
        return [noise] if isinstance(noise, np.ndarray) else [noise.a, noise.b]

    assert any(not np.array_equal(a, b) for name in n1
               for a, b in zip(factors(n1[name]), factors(n2[name]), strict=True))
    fitness = np.random.default_rng(case.data_seed).permutation(case.config.es.population)
    for e in (e1, e2):
        e.apply_fitness(fitness.astype(np.int32))
    assert any(not np.array_equal(e1.params[n], e2.params[n]) for n in e1.params)


def test_steps_stop_before_the_noise_hash_repeats_the_init():
    """The hash's step field is 32 bits and its last value seeds the initial weights: a step
    there would perturb with the init's noise, so it is refused."""
    cfg = TrainConfig(model=ModelConfig(kind="rwkv", vocab_size=VOCAB, dim=8, layers=1),
                      es=ESConfig(population=4, group_size=2), seq_len=4)
    fitness = np.arange(4, dtype=np.int32)
    Engine(cfg, ReferenceBackend(), step=MAX_STEPS - 1).apply_fitness(fitness)  # the last one
    with pytest.raises(ConfigError, match="past the noise hash's last step"):
        Engine(cfg, ReferenceBackend(), step=MAX_STEPS).apply_fitness(fitness)
    with pytest.raises(ConfigError, match="step must be in"):
        Engine(cfg, ReferenceBackend(), step=MAX_STEPS + 1)


def test_bad_windows_are_refused_before_any_forward():
    """Windows that would be misread (too few or too many rows, ids outside the vocabulary,
    floats, a row longer than an int32 sum holds) raise instead of scoring."""
    cfg = TrainConfig(model=ModelConfig(kind="rwkv", vocab_size=VOCAB, dim=8, layers=1),
                      es=ESConfig(population=4, group_size=2), seq_len=4)
    engine = Engine(cfg, ReferenceBackend())
    good = np.zeros((4, 5), dtype=np.int32)
    bad = {"3 windows for a population of 4": good[:3],
           "6 windows for a population of 4": np.zeros((6, 5), dtype=np.int32),
           "token ids must be in 0..23": good + VOCAB,
           "integer": good.astype(np.float32),
           "tokens >= 1": good[:, :1]}
    for message, windows in bad.items():
        with pytest.raises(ConfigError, match=message):
            engine.population_fitness(windows)
    with pytest.raises(ConfigError, match="at most 65536"):
        engine.log_likelihood(np.zeros((1, 65538), dtype=np.int32))
    with pytest.raises(ConfigError, match="token ids"):
        engine.log_likelihood(good - 1)
    engine.population_fitness(good)  # the right shape goes through


@ENGINE
@given(cases(), st.data())
def test_chunking_does_not_change_fitness(case, data):
    """(b) population_fitness and whole runs are bit-identical for any chunk_pairs."""
    e = case.engine()
    run(e, case, 1)  # move off the initial weights first
    w = case.windows(e.step_index)
    full = e.population_fitness(w)
    assert full.dtype == np.int32 and full.shape == (case.config.es.population,)
    for chunk in {1, data.draw(st.integers(1, case.pairs)), case.pairs, case.pairs + 3}:
        assert np.array_equal(e.population_fitness(w, chunk), full), chunk
    chunks = data.draw(st.lists(st.integers(1, case.pairs), min_size=1, max_size=3))
    e1, e2 = case.engine(), case.engine()
    f1, f2 = run(e1, case, 3), run(e2, case, 3, chunks)
    assert all(np.array_equal(a, b) for a, b in zip(f1, f2, strict=True))
    assert_same_params(e1.params, e2.params)


def _roundtrip(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Params through np.save / np.load bytes, as a checkpoint would store them."""
    out = {}
    for name, arr in params.items():
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        out[name] = np.load(io.BytesIO(buf.getvalue()), allow_pickle=False)
    return out


@ENGINE
@given(cases(), st.integers(2, 5), st.data())
def test_resume_equals_uninterrupted_run(case, k, data):
    """(c) K steps == j steps, then a fresh Engine from (saved params, step=j) for K-j steps."""
    j = data.draw(st.integers(0, k))
    full = case.engine()
    f_full = run(full, case, k)
    first = case.engine()
    f_first = run(first, case, j)
    saved = _roundtrip(first.params)
    del first
    resumed = case.engine(params=saved, step=j)
    f_rest = run(resumed, case, k - j)
    assert resumed.step_index == full.step_index == k
    assert all(np.array_equal(a, b) for a, b in zip(f_full, f_first + f_rest, strict=True))
    assert_same_params(full.params, resumed.params)


@ENGINE
@given(cases(), st.integers(0, 2))
def test_warm_up_changes_nothing(case, j):
    """``warm_up`` (a step's kernels on one pair, results discarded) at any step leaves the
    weights and the step as they were, and the run goes on as one without it."""
    plain, warmed = case.engine(), case.engine()
    run(plain, case, j)
    run(warmed, case, j)
    before = {n: v.copy() for n, v in warmed.params.items()}
    warmed.warm_up(case.windows(warmed.step_index))
    assert warmed.step_index == j
    assert_same_params(warmed.params, before)
    assert all(np.array_equal(a, b)
               for a, b in zip(run(plain, case, 2), run(warmed, case, 2), strict=True))
    assert_same_params(plain.params, warmed.params)


@ENGINE
@given(cases())
def test_resume_does_not_alias_callers_params(case):
    """An Engine built from a params dict never mutates the caller's arrays."""
    e = case.engine()
    run(e, case, 1)
    mine = {k: v.copy() for k, v in e.params.items()}
    given_params = {k: v.copy() for k, v in mine.items()}
    resumed = case.engine(params=given_params, step=1)
    run(resumed, case, 2)
    assert_same_params(given_params, mine)


@ENGINE
@given(cases(), st.integers(1, 5), st.integers(1, 3), st.data())
def test_workers_give_the_weights_of_one_process(case, world, k, data):
    """W workers (``intes.distributed``: each a replica scoring its ``shard_pairs`` in chunks
    of its own, then the fitness all-gathered in rank order, here concatenated) end every
    step with the weights and fitness of one process; more workers than pairs leaves some
    with no pairs."""
    single = case.engine()
    replicas = [case.engine() for _ in range(world)]
    chunks = [data.draw(st.none() | st.integers(1, case.pairs)) for _ in range(world)]
    for _ in range(k):
        w = case.windows(single.step_index)
        expected = single.step(w)
        shards = [distributed.shard_pairs(case.pairs, rank, world) for rank in range(world)]
        gathered = np.concatenate([e.evaluate_pairs(w, *shard, chunk)
                                   for e, shard, chunk in zip(replicas, shards, chunks,
                                                              strict=True)])
        assert np.array_equal(gathered, expected)
        for e in replicas:
            e.apply_fitness(gathered)
    for e in replicas:
        assert e.step_index == single.step_index == k
        assert_same_params(e.params, single.params)


# ---- (d) integers everywhere -------------------------------------------------------------------

def _check_int(arr, where):
    arr = np.asarray(arr)
    assert arr.dtype.kind in "iu", f"{where}: dtype {arr.dtype}"
    if arr.dtype == np.int8:
        assert not np.any(arr == -128), f"{where}: -128"
    return arr


class RecordingBackend(ReferenceBackend):
    """The reference backend, asserting every op result is an integer array of the right kind."""

    def __init__(self):
        self.calls = 0

    def _out(self, y, kind, dtype):
        self.calls += 1
        _check_int(y, kind)
        assert y.dtype == dtype, f"{kind}: {y.dtype}"
        return y

    def linear(self, x, w, shift, noise, sigma_shift):
        _check_int(x, "linear input")
        return self._out(super().linear(x, w, shift, noise, sigma_shift), "linear", np.int8)

    def embed(self, table, tokens, noise, sigma_shift):
        return self._out(super().embed(table, tokens, noise, sigma_shift), "embed", np.int8)

    def log_likelihood(self, logits, targets):
        _check_int(logits, "logits")
        assert logits.dtype == np.int8
        return self._out(super().log_likelihood(logits, targets), "log_likelihood", np.int32)

    def update_matrix(self, w, noise, fitness, threshold):
        _check_int(fitness, "fitness")
        return self._out(super().update_matrix(w, noise, fitness, threshold), "update", np.int8)

    def update_vector(self, v, noise, fitness, threshold):
        return self._out(super().update_vector(v, noise, fitness, threshold), "update", np.int8)


_INTMATH_OPS = ("norm", "sat_add", "token_mix", "gate", "wkv_step", "gru_blend", "relu", "lut",
                "sat8", "rshift_round", "div_trunc", "log_likelihood", "log2_fixed")


def _recording(fn, name, seen):
    def wrapped(*args, **kwargs):
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                _check_int(a, f"{name} arg {i}")
        out = fn(*args, **kwargs)
        for i, o in enumerate(out if isinstance(out, tuple) else (out,)):
            _check_int(o, f"{name} output {i}")
        seen.add(name)
        return out
    return wrapped


@ENGINE
@given(cases())
def test_everything_is_integer(case):
    """(d) Every op input/output, every state array, the logits, the fitness and the weights
    after steps have integer dtypes (and no int8 is ever -128)."""
    seen: set[str] = set()
    backend = RecordingBackend()
    with pytest.MonkeyPatch.context() as mp:
        for name in _INTMATH_OPS:
            mp.setattr(intmath, name, _recording(getattr(intmath, name), name, seen))
        e = Engine(case.config, backend)
        run(e, case, 2)
        ops = e.member_ops(0, case.pairs)
        for name, v in ops.vectors.items():
            _check_int(v, name)
        state = e.model.init_state(case.config.es.population)
        w = case.windows(e.step_index)
        logits, state = e.model.forward(ops, w[:, 0], state)
        assert logits.dtype == np.int8 and logits.shape == (w.shape[0], VOCAB)
        for name, arr in state.items():
            assert _check_int(arr, name).dtype in (np.int8, np.int32), name
            if name.endswith("num"):
                assert np.all(np.abs(arr.astype(np.int64)) <= 2**23)
            if name.endswith("den"):
                assert np.all((arr >= 0) & (arr <= 2**16))
        totals = score(e.model, ops, w)
        assert totals.dtype == np.int32 and np.all(totals <= 0)
        _check_int(e.log_likelihood(w), "inference log-likelihood")
    assert backend.calls > 0
    expected = {"norm", "sat_add"} | ({"token_mix", "gate", "wkv_step", "lut"}
                                     if case.config.model.kind == "rwkv" else
                                     {"gru_blend", "relu"})
    assert expected <= seen
    for name, arr in e.params.items():
        assert arr.dtype == np.int8, name
        assert not np.issubdtype(arr.dtype, np.floating)


# ---- (e) rows are independent ------------------------------------------------------------------

@ENGINE
@given(cases(), st.data())
def test_subset_of_pairs_matches_full_population(case, data):
    """(e) Evaluating pairs [a, b) alone gives those members' fitness from the full population,
    and does not depend on other members' windows."""
    e = case.engine()
    run(e, case, 1)
    w = case.windows(e.step_index)
    full = e.population_fitness(w)
    a = data.draw(st.integers(0, case.pairs - 1))
    b = data.draw(st.integers(a + 1, case.pairs))
    sub = e.evaluate_members(w, a, b)
    assert np.array_equal(sub, full[2 * a:2 * b])
    scrambled = w.copy()
    rng = np.random.default_rng(case.data_seed)
    others = np.r_[0:2 * a, 2 * b:w.shape[0]]
    scrambled[others] = rng.integers(0, VOCAB, scrambled[others].shape)
    assert np.array_equal(e.evaluate_members(scrambled, a, b), sub)
    assert np.array_equal(e.population_fitness(scrambled)[2 * a:2 * b], sub)


@ENGINE
@given(cases())
def test_member_ops_match_explicit_noise(case):
    """A member's fitness equals scoring it alone with Ops built from its own pair's noise."""
    from intes.models.base import make_noise

    e = case.engine()
    run(e, case, 1)
    w = case.windows(e.step_index)
    full = e.population_fitness(w)
    cfg = case.config
    p = case.pairs - 1
    noise = make_noise(e.specs, cfg.seed, e.step_index, np.array([p]), cfg.es.rank,
                       cfg.es.noise_reuse)
    ops = Ops(e.backend, e.specs, e.params, noise, cfg.es.sigma_shift)
    assert np.array_equal(score(e.model, ops, w[2 * p:2 * p + 2]), full[2 * p:2 * p + 2])


# ---- (f) bounded weight moves ------------------------------------------------------------------

@ENGINE
@given(cases(), st.integers(1, 5))
def test_weights_move_at_most_one_per_step(case, k):
    """(f) Each step moves every weight by at most 1 and keeps it an int8 in [-127, 127]."""
    e = case.engine()
    for _ in range(k):
        before = {n: v.copy() for n, v in e.params.items()}
        raw = e.step(case.windows(e.step_index))
        assert raw.dtype == np.int32 and np.all(raw <= 0)
        for name, v in e.params.items():
            assert v.dtype == np.int8 and v.shape == before[name].shape
            v64 = v.astype(np.int64)
            assert np.all(np.abs(v64 - before[name]) <= 1), name
            assert np.all((v64 >= -127) & (v64 <= 127)), name


@ENGINE
@given(cases(), st.integers(1, 3))
def test_update_prepares_the_new_weights(case, k):
    """The forms the update makes for the next forward (``apply_fitness``) are those of the
    new weights: every matrix, none stale."""
    e = case.engine()
    for _ in range(k):
        e.step(case.windows(e.step_index))
        matrices = {s.name for s in e.specs if s.kind == "matrix"}
        assert set(e.prepared) == matrices
        for name in matrices:  # the reference's form is the matrix, the cpu backend's holds it
            form = e.prepared[name]
            assert np.array_equal(getattr(form, "w", form), e.params[name]), name


def test_saturated_weights_stay_in_range():
    """Weights pinned at +-127 stay within [-127, 127] through several steps."""
    cfg = TrainConfig(model=ModelConfig(kind="egg", vocab_size=VOCAB, dim=8, layers=1),
                      es=ESConfig(population=8, group_size=2, rank=2, alpha_steps=1),
                      seq_len=6, seed=3)
    case = Case(cfg, 5)
    e = case.engine()
    e.params = {n: np.where(v >= 0, 127, -127).astype(np.int8) for n, v in e.params.items()}
    start = {n: v.copy() for n, v in e.params.items()}
    run(e, case, 3)
    moved = False
    for name, v in e.params.items():
        v64 = v.astype(np.int64)
        assert v.dtype == np.int8 and np.all(np.abs(v64) <= 127)
        assert np.all(np.abs(v64 - start[name]) <= 3)
        moved |= bool(np.any(v != start[name]))
    assert moved


@ENGINE
@given(cases())
def test_vector_perturbations_are_antithetic(case):
    """Ops gives members 2p and 2p+1 the vector parameters sat8(v +- round(e_p / 2^sigma))."""
    from intes.models.base import make_noise
    from intes.noise import vector_noise

    e = case.engine()
    ops = e.member_ops(0, case.pairs)
    cfg = case.config
    noise = make_noise(e.specs, cfg.seed, 0, np.arange(case.pairs), cfg.es.rank,
                       cfg.es.noise_reuse)
    for tid, spec in enumerate(e.specs):
        if spec.kind != "vector":
            continue
        eps = vector_noise(cfg.seed, 0, np.arange(case.pairs), tid, spec.shape[0])
        assert np.array_equal(eps, noise[spec.name])
        delta = (eps.astype(np.int64) + (1 << (cfg.es.sigma_shift - 1))) >> cfg.es.sigma_shift
        v = e.params[spec.name].astype(np.int64)
        got = ops.vec(spec.name).astype(np.int64)
        assert got.shape == (cfg.es.population, spec.shape[0])
        assert np.array_equal(got[0::2], np.clip(v + delta, -127, 127))
        assert np.array_equal(got[1::2], np.clip(v - delta, -127, 127))


@ENGINE
@given(cases(), st.data())
def test_state_resets_at_separator(case, data):
    """Token 0 resets each row's recurrent state: a window splits at a column of zeros into two
    independently scored halves, and what precedes the separator does not matter."""
    e = case.engine()
    run(e, case, 1)
    w = case.windows(e.step_index).copy()
    t0 = data.draw(st.integers(1, w.shape[1] - 2))
    w[:, t0] = 0
    for ops in (e.member_ops(0, case.pairs), e.inference_ops()):
        whole = score(e.model, ops, w)
        assert np.array_equal(whole, score(e.model, ops, w[:, :t0 + 1]) +
                              score(e.model, ops, w[:, t0:]))
        other = w.copy()
        other[:, :t0] = np.random.default_rng(t0).integers(1, VOCAB, (w.shape[0], t0))
        assert np.array_equal(score(e.model, ops, other[:, t0:]), score(e.model, ops, w[:, t0:]))


@given(count=st.integers(0, 500), parts=st.integers(1, 16))
def test_split_covers_the_range_in_near_equal_spans(count, parts):
    spans = split(count, parts)
    assert len(spans) == min(count, parts)
    if spans:
        assert [lo for lo, _ in spans] == [0] + [hi for _, hi in spans[:-1]]
        assert spans[-1][1] == count
        sizes = [hi - lo for lo, hi in spans]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


class CappedReference(ReferenceBackend):
    """The reference backend on ``threads`` threads with at most ``chunk_rows`` member rows
    per forward call, as the cpu backend caps them."""

    def __init__(self, threads: int, chunk_rows: int | None):
        self.threads, self.chunk_rows = threads, chunk_rows


@given(count=st.integers(0, 3000), rows_each=st.sampled_from([1, 2]),
       threads=st.integers(1, 4), cap=st.one_of(st.none(), st.integers(1, 600)))
def test_chunks_cap_the_rows_per_call_in_a_multiple_of_the_threads(count, rows_each, threads,
                                                                 cap):
    """Chunks are near-equal spans of the items: one per thread without a cap; with one, the
    fewest multiple of the threads whose chunks hold at most ``cap`` rows (one item where an
    item alone is more)."""
    config = TrainConfig(ModelConfig("rwkv", VOCAB, 8, 1), ESConfig(population=4), 4)
    spans = Engine(config, CappedReference(threads, cap)).chunks(count, rows_each)
    if cap is None:
        assert spans == split(count, threads)
        return
    per = max(1, cap // rows_each)  # items a chunk may hold
    parts = next(k * threads for k in range(1, count + 2)
                 if max((hi - lo for lo, hi in split(count, k * threads)), default=0) <= per)
    assert spans == split(count, parts)


@ENGINE
@given(cases(), st.integers(2, 3), st.integers(2, 40))
def test_capped_chunks_do_not_change_fitness_or_likelihood(case, threads, cap):
    """A backend that caps the rows per call (more chunks than threads) gives the fitness and
    the log-likelihood of one chunk per thread, bit for bit."""
    e = case.engine()
    run(e, case, 1)
    w = case.windows(e.step_index)
    capped = Engine(case.config, CappedReference(threads, cap), params=e.params,
                    step=e.step_index)
    assert max(hi - lo for lo, hi in capped.chunks(case.pairs, 2)) * 2 <= max(cap, 2)
    assert np.array_equal(capped.population_fitness(w), e.population_fitness(w))
    assert np.array_equal(capped.log_likelihood(w), e.log_likelihood(w))


@ENGINE
@given(cases(), st.integers(2, 3))
def test_the_update_makes_the_same_weights_on_one_thread_or_all(case, threads):
    """apply_fitness gives the same weights whether the update runs on one thread (what
    ``update_threads`` picks for a small model) or on all of the backend's."""
    e = case.engine()
    raw = e.population_fitness(case.windows(0))
    made = []
    for picked in (1, threads):
        threaded = Engine(case.config, CappedReference(threads, None), params=e.params)
        threaded.update_threads = picked
        threaded.apply_fitness(raw)
        made.append(threaded.params)
    assert_same_params(*made)


@pytest.mark.parametrize("vocab, dim, layers, population, threaded", [
    (VOCAB, 8, 1, 4, False),  # tiny: one thread
    (VOCAB, 64, 2, 1024, False),  # below both figures
    (VOCAB, 64, 2, 4096, True),  # the pairs' work passes THREADED_UPDATE_WORK
    (256, 128, 2, 664, False),  # docs/speed.md: below 666 at width 128 (2 layers)
    (256, 128, 2, 666, True),  # the pairs' work reaches THREADED_UPDATE_WORK
    (256, 64, 2, 1800, False),  # and below 1,802 at width 64
    (256, 64, 2, 1802, True),
    (256, 256, 2, 2, True),  # 1.8 M matrix weights pass THREADED_UPDATE_WEIGHTS
])
def test_update_threads_follow_the_update_size(vocab, dim, layers, population, threaded):
    config = TrainConfig(ModelConfig("rwkv", vocab, dim, layers), ESConfig(population=population),
                         4)
    assert Engine(config, CappedReference(3, None)).update_threads == (3 if threaded else 1)
    assert Engine(config, CappedReference(1, None)).update_threads == 1


class BlockReference(ReferenceBackend):
    """The reference backend, run a block of tokens at a time (its ops take (T, N, d))."""

    def __init__(self, block: int):
        self.block = block

    def token_block(self, rows: int, width: int) -> int:
        return self.block


@ENGINE
@given(cases(), st.integers(2, 7), st.data())
def test_token_blocks_score_as_token_by_token(case, block, data):
    """forward_block over blocks of any size gives every member's and every stream's score
    (resets at token 0 included) and the same state as the model's token-by-token forward."""
    e = case.engine()
    blocked = Engine(case.config, BlockReference(block), params=e.params)
    w = case.windows(0)
    if data.draw(st.booleans()):
        w[:, data.draw(st.integers(0, w.shape[1] - 1))] = 0
    for ops, blocked_ops in ((e.member_ops(0, case.pairs), blocked.member_ops(0, case.pairs)),
                             (e.inference_ops(), blocked.inference_ops())):
        state, blocked_state = e.model.init_state(len(w)), e.model.init_state(len(w))
        assert np.array_equal(score(e.model, blocked_ops, w, blocked_state),
                              score(e.model, ops, w, state))
        for name in state:
            assert np.array_equal(blocked_state[name], state[name]), name
