"""The small interface every backend implements; the numpy reference defines its semantics.

Rows of an activation matrix are population members ordered pair-major: rows 2p and 2p+1 are
the antithetic members of pair p (+noise and -noise). An activation may also be a block of
tokens, (T, N, d): every op treats it as T stacked copies of the member rows, each member's
noise the same in every copy (what a model's ``forward_block`` passes, on backends whose
``token_block`` is above 1). A ``LowRank`` holds one pair's factors per row pair, so one
perturbed linear layer is ONE shared base product over all rows plus a rank-r correction per
row: ((x_m @ B_p) >> 4) @ A_p^T >> sigma_shift, negated for odd rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class LowRank:
    """Per-pair factors of a rank-r perturbation A B^T: a (P, out, r), b (P, in, r), int8."""

    a: np.ndarray
    b: np.ndarray


class Backend(Protocol):
    """What a model and the ES core may ask of a backend. Every result is integer.

    Two optional attributes let a backend bring faster versions of shared code, same bits:
    ``ew``, the elementwise ops of ``intes.intmath`` (norm, token_mix, sigmoid_gate, relu_sq,
    wkv_step, sat_add, gru_blend, relu, member_vectors, token_shift, token_mixes, wkv_scan),
    and ``noise_source``, the factor generators of ``intes.noise`` (lowrank_factors,
    vector_noise). Without them the numpy versions are used. A third, ``gru_scan``, runs
    EGG's recurrence over a token block in one call (``intes.models.egg.gru_scan``; None
    where it cannot, and the model loops). A fourth, ``fused_epilogues``, names what
    ``linear`` applies to its own output: ``ew`` ops (``activation=name``) and "residual"
    (``residual=r``, sat_add(r, output)): the cpu backend's VNNI engine applies relu and
    residuals in the product's epilogue (relu_sq too where the CPU has VBMI), its other
    engines with ``ew`` right after the layer. For other backends ``Ops.linear`` applies
    them after the layer.

    ``token_block(rows, width)`` (default 1) is how many tokens a forward over that many
    member rows of a model that wide passes at once, as (T, rows, d) blocks: a backend that
    answers above 1 takes such blocks in every op. ``chunk_rows`` (default None, no cap) is
    the most member rows the engine gives one forward call; a larger population runs in more
    chunks.
    """

    name: str

    def prepare(self, w: np.ndarray) -> Any:
        """Backend-specific form of a weight matrix, made once per step (after an update)."""

    def linear(
        self, x: np.ndarray, w: Any, shift: int, noise: LowRank | None, sigma_shift: int
    ) -> np.ndarray:
        """int8 (N, out) = sat8(rshift_round(x @ W^T + member correction, shift))."""

    def embed(
        self, table: np.ndarray, tokens: np.ndarray, noise: LowRank | None, sigma_shift: int
    ) -> np.ndarray:
        """int8 (N, d) rows of the table plus each member's rank-r perturbation of them."""

    def log_likelihood(self, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """int32 (N,) log2 p(target) in 1/256 bit."""

    def update_matrix(
        self, w: np.ndarray, noise: LowRank, fitness: np.ndarray, threshold: int
    ) -> np.ndarray:
        """W +- 1 where |sum_p f_p A_p B_p^T| > threshold, saturated to [-127, 127]."""

    def update_vector(
        self, v: np.ndarray, noise: np.ndarray, fitness: np.ndarray, threshold: int
    ) -> np.ndarray:
        """v +- 1 where |sum_p f_p e_p| > threshold, saturated to [-127, 127]."""
