"""What every integer LM shares: parameter specs, deterministic init, the per-step op view.

A model is a list of ``ParamSpec`` plus a ``forward`` over one token for all rows. It never
sees noise or backends directly: it calls ``Ops``, which binds the backend, the weights and
(during ES) each member's perturbation for one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from intes import intmath
from intes import noise as nz
from intes.intmath import fan_in_shift
from intes.kernels.base import Backend, LowRank

Kind = Literal["matrix", "embedding", "vector"]
INIT_STEP = 0xFFFFFFFF  # the hash's step field for initialization, never an ES step


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor: int8, of this shape, perturbed and updated according to kind."""

    name: str
    shape: tuple[int, ...]
    kind: Kind
    init: int | tuple[int, int] | None = None  # None: N(0,1) x16; int: constant; (lo, hi): ramp

    @property
    def shift(self) -> int:
        """Rescale shift of a matrix's product (fan-in is the last axis)."""
        return fan_in_shift(self.shape[-1])


def init_params(specs: list[ParamSpec], seed: int) -> dict[str, np.ndarray]:
    """Deterministic int8 initial weights from the counter-based hash (no RNG state)."""
    params = {}
    for tid, spec in enumerate(specs):
        size = int(np.prod(spec.shape))
        if spec.init is None:
            key = nz.stream_key(seed, INIT_STEP, np.zeros(1, dtype=np.int64), tid)
            value = nz.gaussian_int8(nz.hash_u32(key, size))[0]
        elif isinstance(spec.init, int):
            value = np.full(size, spec.init, dtype=np.int8)
        else:
            lo, hi = spec.init
            value = (lo + (np.arange(size) * (hi - lo)) // max(size - 1, 1)).astype(np.int8)
        params[spec.name] = value.reshape(spec.shape).astype(np.int8)
    return params


class IntLM:
    """Shared skeleton of the integer LMs: embedding -> blocks -> norm -> head.

    Subclasses give ``block_specs(prefix)`` for one layer; the spec order (embedding, layers
    in order, ln_out, head) fixes each tensor's id in the noise hash.
    """

    kind = ""

    hidden_mult = 4  # the MLP's width over the model's

    def __init__(self, vocab_size: int, dim: int, layers: int):
        self.vocab_size, self.dim, self.layers = vocab_size, dim, layers
        self.hidden = self.hidden_mult * dim
        self.specs = [ParamSpec("emb", (vocab_size, dim), "embedding")]
        for i in range(layers):
            self.specs += self.block_specs(f"blocks.{i}.")
        self.specs += [ParamSpec("ln_out", (dim,), "vector", 16),
                       ParamSpec("head", (vocab_size, dim), "matrix")]

    def block_specs(self, p: str) -> list[ParamSpec]:
        raise NotImplementedError

    def forward_block(self, ops: Ops, tokens: np.ndarray, resets: np.ndarray | None,
                      state: dict) -> tuple[np.ndarray, dict]:
        """Logits (T, rows, vocab) for tokens (T, rows), as ``forward`` gives them token by
        token, a row's state cleared before token t where resets[t] is set. ``forward`` stays
        for backends that take one token at a time (cuda) and for sampling."""
        raise NotImplementedError


class Ops:
    """The ops a model calls for one ES step (or for plain inference when noise is None).

    ``noise`` maps matrix/embedding names to ``LowRank`` and vector names to int8 (P, n)
    noise; vectors are materialized per member once here, not per token. ``ew`` holds the
    elementwise ops (intes.intmath's names and bits), fused by backends that have their own.
    """

    def __init__(self, backend: Backend, specs: list[ParamSpec], params: dict[str, np.ndarray],
                 noise: dict | None = None, sigma_shift: int = 4, prepared: dict | None = None):
        self.backend = backend
        self.ew = getattr(backend, "ew", intmath)
        self.fused_epilogues = getattr(backend, "fused_epilogues", ())
        self.sigma_shift = sigma_shift
        self.params = params
        self.noise = noise or {}
        self.shifts = {s.name: s.shift for s in specs}
        self.prepared = prepared if prepared is not None else prepare(backend, specs, params)
        self.vectors = {}
        members = getattr(self.ew, "member_vectors", intmath.member_vectors)
        for s in specs:
            if s.kind != "vector":
                continue
            v = params[s.name]
            e = self.noise.get(s.name)
            if e is None:
                self.vectors[s.name] = v[None, :]
            else:
                self.vectors[s.name] = members(v, e, sigma_shift)

    def linear(self, name: str, x: np.ndarray, activation: str | None = None,
               residual: np.ndarray | None = None) -> np.ndarray:
        """The layer's output, then ``activation`` (an ``ew`` op's name, such as relu_sq) or
        the ``residual`` add sat_add(residual, output), if given: by the backend itself
        where it lists the name (or "residual") in ``fused_epilogues`` (the cpu backend, in
        the product's epilogue), else by ``ew`` after."""
        if activation is not None and residual is not None:
            raise ValueError("an activation or a residual, not both")
        args = (x, self.prepared[name], self.shifts[name], self.noise.get(name),
                self.sigma_shift)
        if activation is not None:
            if activation in self.fused_epilogues:
                return self.backend.linear(*args, activation=activation)
            return getattr(self.ew, activation)(self.backend.linear(*args))
        if residual is not None:
            if "residual" in self.fused_epilogues:
                return self.backend.linear(*args, residual=residual)
            return self.ew.sat_add(residual, self.backend.linear(*args))
        return self.backend.linear(*args)

    def layer(self, name: str) -> tuple:
        """(backend weight, shift, noise or None) of a matrix: what ``linear`` passes, for a
        backend op that runs several of a model's layers in one call."""
        return self.prepared[name], self.shifts[name], self.noise.get(name)

    def embed(self, name: str, tokens: np.ndarray) -> np.ndarray:
        return self.backend.embed(self.params[name], tokens, self.noise.get(name),
                                  self.sigma_shift)

    def vec(self, name: str) -> np.ndarray:
        return self.vectors[name]


def prepare(backend: Backend, specs: list[ParamSpec], params: dict) -> dict:
    """Backend forms of the matrices, made once per set of weights."""
    return {s.name: backend.prepare(params[s.name]) for s in specs if s.kind == "matrix"}


def make_noise(specs: list[ParamSpec], seed: int, step: int, pairs: np.ndarray, rank: int,
               noise_reuse: int = 1, backend: Backend | None = None,
               ids: list[int] | None = None) -> dict:
    """Every tensor's noise for these pairs at this step, rebuilt from the hash alone: in one
    call where the backend's generator makes many tensors at once (``tensor_noises``).
    ``ids`` are the tensors' indices in the model's specs when ``specs`` is a subset of them
    (default: specs is all of them, in order)."""
    ids = list(range(len(specs))) if ids is None else ids
    many = getattr(getattr(backend, "noise_source", None), "tensor_noises", None)
    if many is None:
        return {s.name: tensor_noise(s, tid, seed, step, pairs, rank, noise_reuse, backend)
                for tid, s in zip(ids, specs, strict=True)}
    made = many(seed, nz.effective_step(step, noise_reuse), pairs, rank,
                [(tid, s.shape) for tid, s in zip(ids, specs, strict=True)])
    return {s.name: LowRank(*m) if s.kind != "vector" else m
            for s, m in zip(specs, made, strict=True)}


def tensor_noise(spec: ParamSpec, tensor_id: int, seed: int, step: int, pairs: np.ndarray,
                 rank: int, noise_reuse: int = 1,
                 backend: Backend | None = None) -> LowRank | np.ndarray:
    """One tensor's noise (``tensor_id`` is its index in the model's specs): ``LowRank`` for
    matrices and embeddings, int8 (P, n) for vectors.

    A backend may bring a faster generator of the same bits (``noise_source``, with
    intes.noise's ``lowrank_factors`` and ``vector_noise``).
    """
    gen = getattr(backend, "noise_source", nz)
    hstep = nz.effective_step(step, noise_reuse)
    if spec.kind == "vector":
        return gen.vector_noise(seed, hstep, pairs, tensor_id, spec.shape[0])
    rows, cols = spec.shape
    return LowRank(*gen.lowrank_factors(seed, hstep, pairs, tensor_id, rows, cols, rank))
