"""The Python API as a script meets it: weights given or replaced are the weights used, and
what it would misread (wrong types, shapes, lengths, ranges) is one ConfigError, not a deep
traceback or a silently wrong step."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import intes
from intes.data import load_corpus, sample_windows
from intes.engine import Engine, ModelConfig, TrainConfig, member_windows
from intes.errors import ConfigError, DataError
from intes.es import ESConfig
from intes.trainer import RunOptions, pretrain

CONFIG = TrainConfig(model=ModelConfig(vocab_size=32, dim=16), es=ESConfig(population=8),
                     seq_len=6, seed=1)
BACKENDS = ["reference", "cpu"]


def windows(seed: int = 0, config: TrainConfig = CONFIG) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sequences = rng.integers(0, config.model.vocab_size,
                             (config.es.population // config.es.group_size, config.seq_len + 1))
    return member_windows(sequences, config.es.group_size)


def other_params(seed: int) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in Engine(replace(CONFIG, seed=seed), "reference").params.items()}


@settings(max_examples=6, deadline=None)
@given(backend=st.sampled_from(BACKENDS), seed=st.integers(2, 2**32 - 1),
       steps=st.integers(0, 2))
def test_assigned_params_are_the_ones_the_next_forward_uses(backend, seed, steps):
    engine = Engine(CONFIG, backend)
    for step in range(steps):  # the update makes the next forward's packed weights
        engine.apply_fitness(engine.population_fitness(windows(step)))
    engine.population_fitness(windows(9))  # and a forward makes them for the current weights
    engine.params = other_params(seed)
    fresh = Engine(CONFIG, backend, params=other_params(seed), step=steps)
    assert np.array_equal(engine.population_fitness(windows(7)),
                          fresh.population_fitness(windows(7)))
    assert np.array_equal(engine.log_likelihood(windows(7)), fresh.log_likelihood(windows(7)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_cannot_be_edited_in_place(backend):
    engine = Engine(CONFIG, backend)
    engine.population_fitness(windows())
    name = next(iter(engine.params))
    with pytest.raises(ValueError, match="read-only"):
        engine.params[name][...] = 0
    with pytest.raises(TypeError):
        engine.params[name] = np.zeros_like(engine.params[name])
    assert engine.params[name].any()


def test_the_engine_keeps_its_own_copy_of_the_params_it_is_given():
    given_params = other_params(5)
    engine = Engine(CONFIG, "reference", params=given_params)
    before = engine.population_fitness(windows())
    for a in given_params.values():
        a[...] = 0
    assert np.array_equal(engine.population_fitness(windows()), before)
    assert all(a.any() for a in engine.params.values())


def _wrong(params: dict, how: str) -> object:
    name = next(iter(params))
    if how == "dtype":
        return {**params, name: params[name].astype(np.int32)}
    if how == "shape":
        return {**params, name: params[name].T.copy() if params[name].ndim == 2
                else params[name][:-1].copy()}
    if how == "missing":
        return {k: v for k, v in params.items() if k != name}
    if how == "unknown":
        return {**params, "extra": params[name]}
    if how == "list":
        return {**params, name: params[name].tolist()}
    return list(params.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how, match", [
    ("dtype", r"is int32\[.*expected int8"), ("shape", r"expected int8\["),
    ("missing", "is missing"), ("unknown", "'extra' is not a weight of this model"),
    ("list", "is list, expected int8"), ("not a mapping", "params must be a mapping"),
])
def test_params_that_do_not_fit_the_model_are_refused(backend, how, match):
    """Before, an int32 matrix on the cpu backend was read as int8 by the kernels: an abort, a
    segfault or silently wrong fitness."""
    good = other_params(3)
    with pytest.raises(ConfigError, match=match):
        Engine(CONFIG, backend, params=_wrong(good, how))
    engine = Engine(CONFIG, backend)
    before = dict(engine.params)
    with pytest.raises(ConfigError, match=match):
        engine.params = _wrong(good, how)
    assert all(np.array_equal(engine.params[k], v) for k, v in before.items())


@pytest.mark.parametrize("fitness, match", [
    (np.zeros(16, dtype=np.int32), r"one value per member, \[8\], got int32\[16\]"),
    (np.zeros(6, dtype=np.int32), r"got int32\[6\]"),
    (np.zeros((8, 1), dtype=np.int32), r"got int32\[8, 1\]"),
    (np.linspace(-5.3, -7.0, 8), "got float64"),
    (np.ones(8, dtype=bool), "got bool"),
    (list(range(8)), "got list"),
    (np.array([2**62, -2**62] * 4), "int32 range"),
    (np.array([2**31] + [0] * 7, dtype=np.uint64), "int32 range"),
])
def test_fitness_the_shaping_would_misread_is_refused(fitness, match):
    """A wrong length shaped pairs never evaluated, a float was truncated and int64 values
    overflowed the pair differences, each without an error."""
    engine = Engine(CONFIG, "reference")
    before = dict(engine.params)
    with pytest.raises(ConfigError, match=match):
        engine.apply_fitness(fitness)
    assert engine.step_index == 0
    assert all(np.array_equal(engine.params[k], v) for k, v in before.items())


def test_fitness_at_the_int32_limits_is_taken():
    engine = Engine(CONFIG, "reference")
    engine.apply_fitness(np.array([2**31 - 1, -2**31] * 4, dtype=np.int64))
    assert engine.step_index == 1


@pytest.mark.parametrize("make", [
    lambda v: ModelConfig(dim=v), lambda v: ModelConfig(layers=v),
    lambda v: ModelConfig(vocab_size=v), lambda v: ESConfig(population=v),
    lambda v: ESConfig(group_size=v), lambda v: ESConfig(rank=v),
    lambda v: ESConfig(sigma_shift=v), lambda v: ESConfig(noise_reuse=v),
    lambda v: ESConfig(alpha_steps=v), lambda v: ESConfig(alpha_final_log2=v),
    lambda v: TrainConfig(seq_len=v), lambda v: TrainConfig(seed=v),
])
@pytest.mark.parametrize("value", [16.0, "16", True, None, 2.5])
def test_config_fields_must_be_integers(make, value):
    made = make(value)
    config = (TrainConfig(model=made) if isinstance(made, ModelConfig)
              else TrainConfig(es=made) if isinstance(made, ESConfig) else made)
    with pytest.raises(ConfigError, match=r"must be an integer, got"):
        config.validate()


def test_numpy_integers_in_a_config_are_stored_as_ints():
    config = TrainConfig(model=ModelConfig(dim=np.int64(16), vocab_size=np.uint16(32)),
                         es=ESConfig(population=np.int32(8), rank=np.int8(2)),
                         seq_len=np.int64(6), seed=np.uint32(2**32 - 1))
    config.validate()
    values = [*asdict(config)["model"].values(), *asdict(config)["es"].values(),
              config.seq_len, config.seed]
    assert all(type(v) in (int, str) for v in values)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    Engine(config, "reference").population_fitness(windows(config=config))


@pytest.mark.parametrize("config, match", [
    (TrainConfig(model=ModelConfig(kind=["rwkv"])), "unknown model"),
    (TrainConfig(es=ESConfig(fitness=None)), "fitness must be one of"),
    (TrainConfig(model=asdict(ModelConfig())), "model must be a ModelConfig, got dict"),
    (TrainConfig(es=asdict(ESConfig())), "es must be a ESConfig, got dict"),
])
def test_config_parts_of_the_wrong_kind_are_refused(config, match):
    with pytest.raises(ConfigError, match=match):
        config.validate()


@pytest.mark.parametrize("change, match", [
    (lambda d: d.pop("seed"), "bad config: it lacks 'seed'"),
    (lambda d: d["model"].update(width=3), "unexpected keyword argument 'width'"),
    (lambda d: d.update(extra=1), "unknown key 'extra'"),
])
def test_config_dicts_with_missing_or_unknown_keys_are_refused(change, match):
    d = json.loads(json.dumps(CONFIG.to_dict()))
    change(d)
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(d)


@pytest.mark.parametrize("kwargs, match", [
    (dict(config=CONFIG.to_dict()), "config must be a TrainConfig, got dict"),
    (dict(backend=None), "backend must be a name"),
    (dict(backend=3), "backend must be a name"),
    (dict(step=1.5), "step must be an integer"),
    (dict(step=-1), "step must be in 0"),
])
def test_engine_arguments_of_the_wrong_kind_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Engine(**{"config": CONFIG, **kwargs})


@pytest.mark.parametrize("call, match", [
    (lambda e, w: e.evaluate_pairs(w, -1, 2), r"pairs -1\.\.2 are not a span of 0\.\.4"),
    (lambda e, w: e.evaluate_pairs(w, 0, 10), r"not a span of 0\.\.4"),
    (lambda e, w: e.evaluate_pairs(w, 3, 1), "not a span"),
    (lambda e, w: e.evaluate_pairs(w, 0.0, 2), "start must be an integer"),
    (lambda e, w: e.population_fitness(w, chunk_pairs=0), "chunk pairs must be >= 1"),
    (lambda e, w: e.population_fitness(w, chunk_pairs=-1), "chunk pairs must be >= 1"),
    (lambda e, w: e.population_fitness(w, chunk_pairs=1.5), "chunk pairs must be an integer"),
    (lambda e, w: e.population_fitness(w.tolist()), "windows must be a numpy integer array"),
    (lambda e, w: member_windows(w, 0), "group size must be >= 1"),
    (lambda e, w: member_windows(w, 2.0), "group size must be an integer"),
])
def test_evaluation_arguments_out_of_range_are_refused(call, match):
    engine = Engine(CONFIG, "reference")
    with pytest.raises(ConfigError, match=match):
        call(engine, windows())


def test_a_span_of_pairs_still_scores_like_the_population():
    engine = Engine(CONFIG, "reference")
    w = windows()
    full = engine.population_fitness(w)
    assert np.array_equal(engine.evaluate_pairs(w, 1, 3), full[2:6])
    assert engine.evaluate_pairs(w, 2, 2).size == 0


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    return load_corpus(path)


@pytest.mark.parametrize("options, match", [
    (dict(steps=2.5), "steps must be an integer"),
    (dict(steps=1, eval_every=1.5), "eval every must be an integer"),
    (dict(steps=1, chunk_pairs=1.5), "chunk pairs must be an integer"),
    (dict(steps=1, eval_streams=2.5), "eval streams must be an integer"),
    (dict(steps="2"), "steps must be an integer"),
    (dict(time_limit="1"), "time limit must be a number of minutes"),
    (dict(time_limit=True), "time limit must be a number of minutes"),
    (dict(steps=1, resume="no"), "resume must be True or False"),
    (dict(steps=1, progress=None), "progress must be True or False"),
    (dict(steps=1, out=None), "out must be a path"),
])
def test_run_options_of_the_wrong_kind_are_refused(tmp_path, tiny_corpus, options, match):
    config = replace(CONFIG, model=replace(CONFIG.model, vocab_size=tiny_corpus.vocab_size))
    run = RunOptions(**{"out": tmp_path / "run", "progress": False, **options})
    with pytest.raises(ConfigError, match=match):
        pretrain(config, tiny_corpus, run, backend="reference")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, match", [
    ((CONFIG, None), "corpus must be a Corpus \\(load_corpus makes one\\), got NoneType"),
    ((CONFIG, "text.txt"), "corpus must be a Corpus"),
    ((CONFIG.to_dict(), None), "config must be a TrainConfig"),
])
def test_pretrain_arguments_of_the_wrong_kind_are_refused(tmp_path, args, match):
    with pytest.raises(ConfigError, match=match):
        pretrain(*args, RunOptions(out=tmp_path / "run", steps=1, progress=False))
    assert not (tmp_path / "run").exists()


def test_pretrain_options_of_the_wrong_kind_are_refused(tmp_path, tiny_corpus):
    with pytest.raises(ConfigError, match="options must be a RunOptions, got dict"):
        pretrain(CONFIG, tiny_corpus, dict(out=tmp_path / "run", steps=1))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data", [["a.txt", "b.txt"], b"a.txt", 3])
def test_load_corpus_refuses_what_is_not_a_path(data):
    with pytest.raises(DataError, match="data must be a path, a glob or None"):
        load_corpus(data)


def test_load_corpus_refuses_a_run_directory(tmp_path, tiny_corpus):
    """It used to train on the run's metrics.jsonl, the one text file there."""
    config = replace(CONFIG, model=replace(CONFIG.model, vocab_size=tiny_corpus.vocab_size))
    run = tmp_path / "run"
    pretrain(config, tiny_corpus, RunOptions(out=run, steps=1, progress=False),
             backend="reference")
    with pytest.raises(DataError, match="is an intes run .*not a corpus"):
        load_corpus(run)


@pytest.mark.parametrize("args, match", [
    (dict(tokens=[1, 2, 3] * 20), "tokens must be a 1-D numpy integer array"),
    (dict(tokens=np.zeros((2, 30), dtype=np.int32)), "1-D numpy integer array"),
    (dict(tokens=np.zeros(60)), "1-D numpy integer array"),
    (dict(seed=-1), "seed -1"),
    (dict(seed=2**32), "seed 4294967296"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(length=-1), "length -1"),
    (dict(step=2**32), "step 4294967296"),
    (dict(n_seq=-1), "n_seq -1"),
])
def test_sample_windows_refuses_arguments_out_of_range(args, match):
    call = dict(tokens=np.arange(60, dtype=np.int32), seed=0, step=0, n_seq=3, length=8)
    call.update(args)
    with pytest.raises(ConfigError, match=match):
        sample_windows(**call)


def test_the_public_names_are_the_modules_own():
    """``import intes`` loads its names on first use (``intes._EXPORTS``); each must be the
    object its module defines, and ``__all__`` must list exactly them."""
    assert intes.__all__ == sorted(intes._EXPORTS)
    for name, module in intes._EXPORTS.items():
        assert getattr(intes, name) is getattr(__import__(module, fromlist=[name]), name)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        intes.nope  # noqa: B018
