"""CPU backend: an exact integer GEMM for the shared base product, numba for everything else.

Bit-identical to ``ReferenceBackend`` (the numpy reference defines every answer). The base
product X @ W^T of every linear layer is ONE GEMM over all member rows, from
``intes.kernels.gemm``: this package's own VNNI kernel where the CPU has AVX-512 VNNI, with
each layer's projection, correction and rescale (and the update's step) fused into it (the
``_fused_*`` kernels); else int8 x int8 -> int32 (torch's oneDNN int8 GEMM) when torch is
installed and the CPU has an int8 dot-product instruction; else this package's int16-pair
AVX2 kernel; else float32 BLAS over exact K-chunks. Every other op is a serial numba kernel.

Floats appear only where a GEMM engine has no integer path, holding exact integers below
the bounds stated in intes.kernels.gemm: the float32 engine's base product, and the update
Z = A^T diag(f) B (``lowrank_sum``) of the float32 and AVX2 engines, or of the int8 and VNNI
engines for fitness values wider than their integer forms take. Divisions are integer:
the WKV recurrence's, whose divisor changes with every element, by restoring division of
the 7 quotient bits that survive sat8 (``cpu_scalar._div_sat8``); the norm's, one divisor per
row, by an integer reciprocal (``cpu_scalar._row_reciprocal``).

This module holds the backend, which picks a kernel for each call; the kernels live in
modules of one idea each: ``cpu_linear`` (the linear layers' epilogues, the fused VNNI
layers, EGG's recurrence over them, the embedding and the update's step),
``cpu_elementwise`` (the model's other ops and the log-likelihood), ``cpu_noise`` (the noise
generators) and ``cpu_scalar`` (the int32 helpers every kernel inlines).

Integer overflow: where the reference computes in int32 these kernels do too and wrap the
same way, but results are argued to agree only inside the bounds of
``intes.kernels.reference``: an ES correction is negated as ((-y) + 2^sigma_shift - 1) >>
sigma_shift, which needs that much headroom (``linear_bound``), and the update's float path
(``float_lowrank_sum``) stays exact in float64 where the reference's int32 would wrap (at
|Z| >= 2^31, which ``ESConfig.validate`` rules out). Inputs follow ``intes.intmath``'s
conventions: int8 values in [-127, 127], never -128. Shapes and dtypes are checked before a
kernel indexes by them (ValueError): the kernels check no bounds, so a mismatch would read or
write outside the arrays. Token and target ids are not checked here (a pass over them per
call): ``Engine`` checks the windows they come from once per step.

The per-step forms (``prepare``) are shared and read-only but for their ES-plan cache (dict
writes, atomic under the GIL); per-call scratch buffers are per thread, so one backend serves
several threads at once.

Threads: every kernel is serial and releases the GIL, and the GEMM runs on one thread.
The cores are used one level up: ``Engine`` evaluates ``threads`` slices of the population
concurrently, each a whole forward over the sequence with its own GEMMs. Op-level threading
(numba prange, multi-threaded BLAS) waits at a barrier after every 0.1-5 ms op and its spinning
workers fight each other for the cores: an earlier version of this backend that threaded each
op ran 3x slower on 2 cores than on one thread. Slices meet only once per step.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from intes import intmath
from intes.errors import ConfigError
from intes.intmath import FRAC_BITS, INT8_MAX
from intes.kernels.base import LowRank
from intes.kernels.cpu_elementwise import _NO_RESETS, CpuElementwise, _log_likelihood, _rows2d
from intes.kernels.cpu_linear import (
    _correct_rank1,
    _embed_lowrank,
    _embed_plain,
    _embed_rank1,
    _fused_buffered,
    _fused_lowrank,
    _fused_plain,
    _fused_rank1,
    _fused_update,
    _gru_scan_es,
    _gru_scan_plain,
    _linear_lowrank,
    _linear_plain,
    _project_rank1,
    step_by_sign,
)
from intes.kernels.cpu_noise import CpuNoise, _factors
from intes.kernels.cpu_scalar import I32, _rounding
from intes.kernels.gemm import GemmEngine, VnniGemm, make_gemm
from intes.kernels.vbmi import HAVE_VBMI
from intes.kernels.vnni import factor_sums
from intes.kernels.vnni_gemm import VnniWeight, merged_rescale_fits

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
# Tokens per forward call (see CpuBackend.token_block). With every engine but VNNI a
# slice of at most BLOCK_ROWS rows runs TOKEN_BLOCK tokens at once, a larger one token by token:
# measured on 2 cores at width 256 (ES step, blocks 1, 2, 4, 8), 256 and 512 rows ran fastest
# at 4 (+12-25% over 1), 1024 and 2048 rows at 1 (blocks of 2 or 4 were 8-14% slower there,
# their int32 products streaming through memory). The fused VNNI engine keeps no product in
# memory and runs TOKEN_BLOCK at every size: at 2048 rows ES tokens/s rose by 15-31% over
# single tokens at width 96 and tied at width 256. Blocks also amortize ES's own reads (each
# layer's noise factors and the per-member vectors, read once per block), so the fused
# engine takes FUSED_BLOCK tokens where one (T, rows, width) activation stays within
# FUSED_BLOCK_BYTES, i.e. 512 rows at width 256. Measured there (2 cores,
# INTES_CPU_TOKEN_BLOCK=4, 8 and 16 in turn under benchmarks/paired_rounds.py, medians):
# blocks of 8 against 4 made the ES step about 2% faster and left inference as it was,
# ES / inference 0.921 -> 0.937 (rwkv) and 0.921 -> 0.935 (egg); blocks of 16 slowed ES
# and inference down. (Single runs of intes bench had not told 4 and 8 apart.)
# A tiny batch (rows x width within SMALL_BATCH_BYTES: one member of naive ES, a few
# evaluation streams) is all Python per op, so it runs SMALL_BATCH_BLOCK tokens per call,
# a 64-token window in one: a batch-1 rwkv member's forward at width 256 took 1.05 ms
# against 2.81 ms in blocks of 8 (benchmarks/naive_split.py, INTES_CPU_TOKEN_BLOCK=8).
TOKEN_BLOCK, BLOCK_ROWS = 4, 512
FUSED_BLOCK, FUSED_BLOCK_BYTES = 8, 1 << 20
SMALL_BATCH_BLOCK, SMALL_BATCH_BYTES = 64, 1 << 14
# Member rows per forward call (CpuBackend.chunk_rows): a larger population goes to the
# threads in more chunks, a multiple of the threads, so a slice's activations stop growing
# with N. On the Zen 4 host (ES forward by rows per call, interleaved rounds,
# benchmarks/chunk_rows.py, benchmarks/results/cpu_chunk_rows_zen4.json) 8,192-row calls
# were 12% slower than 2,048-row ones at width 256 (N = 16384) and 5% at width 96; 4,096
# against 2,048 tied for rwkv at width 96 (N = 8192) and lost 7% for egg; 1,024 rows tied
# with 2,048 or ran up to 4% faster, within the host's noise, so the cap stays at the fewer
# calls. At N = 16384, width 256, intes bench's peak RSS fell from 1,758 to 1,388 MB.
CHUNK_ROWS = 2048


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of unmapping them.

    A forward allocates its activations afresh every op, 0.1-2 MB each, and an ES step also
    makes its noise factors: with glibc's default, sliding thresholds, many of those blocks
    are mmapped and unmapped again, so every op pays page faults on fresh pages (measured: a
    third of the ES step's cost over inference). Fixed thresholds keep blocks up to 32 MB in
    the heap, where they are reused. Process-wide, like BLAS's thread count; False (and no
    change) without glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 4 * _MMAP_THRESHOLD_MAX))


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _digits(text: str) -> bool:
    """Plain decimal digits: str.isdigit alone passes "²", which int() refuses."""
    return text.isascii() and text.isdigit()


def default_token_block() -> int | None:
    """INTES_CPU_TOKEN_BLOCK, else None (the measured rule, see ``BLOCK_ROWS``)."""
    value = os.environ.get("INTES_CPU_TOKEN_BLOCK")
    if value is None:
        return None
    if not _digits(value) or int(value) < 1:
        raise ConfigError(f"INTES_CPU_TOKEN_BLOCK must be a positive integer, got {value!r}")
    return int(value)


def default_threads() -> int:
    """INTES_CPU_THREADS, else the usable cores shared among torchrun's local workers."""
    value = os.environ.get("INTES_CPU_THREADS")
    if value is None:
        workers = os.environ.get("LOCAL_WORLD_SIZE", "")
        share = int(workers) if _digits(workers) and int(workers) > 0 else 1
        return max(1, usable_cores() // share)
    if not _digits(value) or int(value) < 1:
        raise ConfigError(f"INTES_CPU_THREADS must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class CpuWeight:
    """A matrix in the form the base product wants, made once per step by ``prepare``.

    ``wt`` is W^T in the GEMM engine's own form (see ``intes.kernels.gemm``); ``es_plans``
    the ES layer plans made against it (``CpuBackend.fused_linear``), which go with it when
    the next step prepares new weights.
    """

    w: np.ndarray
    wt: Any
    es_plans: dict = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------------
# The activations the VNNI tiles apply in registers (``vnni_gemm.store_tile``), as their
# ``act`` argument: relu clamps at 0 instead of -127 (an empty table), at no cost; relu^2
# also reads its table's entries for 0..127 by VBMI's vpermi2b. Without VBMI relu^2 runs
# as an op of its own after the layer. A residual is the other ``act`` the tiles take.
ACTIVATIONS = ("relu", "relu_sq")
EPILOGUES = {"relu": np.zeros(0, dtype=np.uint8)}
if HAVE_VBMI:
    EPILOGUES["relu_sq"] = intmath.RELU_SQ_TABLE[INT8_MAX:].astype(np.uint8)

ES_PLANS = 64  # plans kept per weight: one per population slice (or chunk) of a step
_INT8 = np.dtype(np.int8)  # what the checks compare dtypes with: faster than with np.int8


def _check_rows(x: np.ndarray, fan_in: int, noise: LowRank | None) -> None:
    """ValueError unless x is int8 rows (rows, fan_in), with noise whole copies of its 2P
    members: the kernels index by these shapes unchecked."""
    if x.ndim != 2 or x.dtype != _INT8 or x.shape[1] != fan_in:
        raise ValueError(f"x is {x.dtype}{x.shape}, the layer takes int8 (rows, {fan_in})")
    if noise is not None and len(x) % (2 * len(noise.a)):
        raise ValueError(f"{len(x)} rows are not whole copies of the {2 * len(noise.a)} "
                         "members of the noise's pairs")


def _check_noise(noise: LowRank, shape: tuple[int, ...]) -> None:
    """ValueError unless noise's factors are int8 a (P, out, r), b (P, in, r) for a matrix
    (out, in)."""
    a, b = noise.a, noise.b
    if (len(shape) != 2 or a.ndim != 3 or a.dtype != _INT8 or b.dtype != _INT8
            or a.shape[1] != shape[0] or b.shape != (len(a), shape[1], a.shape[2])):
        raise ValueError(f"noise factors {a.dtype}{a.shape}, {b.dtype}{b.shape} do not fit "
                         f"a matrix {shape}: want int8 (P, out, r), (P, in, r)")


def _check_fitness(fitness: np.ndarray, pairs: int) -> None:
    if fitness.shape != (pairs,):
        raise ValueError(f"fitness {fitness.shape} for noise of {pairs} pairs")


def _check_scan(fx, hx, h, resets, biases, weights, noise) -> None:
    """ValueError unless ``gru_scan``'s arrays fit its square recurrent weights (d, d): int8
    fx, hx (T, rows, d) and h (rows, d), resets (T, rows), biases (..., d)."""
    d = h.shape[-1]
    _check_rows(h, d, noise)
    if (fx.shape != hx.shape or fx.shape[1:] != h.shape or fx.dtype != _INT8
            or hx.dtype != _INT8 or any(w.shape != (d, d) for w in weights)
            or any(b.shape[-1] != d for b in biases)
            or (resets is not None and resets.shape != fx.shape[:2])):
        raise ValueError(f"gru_scan of fx {fx.dtype}{fx.shape}, hx {hx.dtype}{hx.shape}, h "
                         f"{h.shape}, resets {None if resets is None else resets.shape}, "
                         f"biases {[b.shape for b in biases]}, weights "
                         f"{[w.shape for w in weights]}")


def _es_plan(w: CpuWeight, noise: LowRank, fan_in: int, sigma_shift: int,
             shift: np.int32) -> tuple:
    """(noise, kernel, args) of an ES layer, called as kernel(x, *args, half, shift, out,
    act), kept with its weight for the step: the same for all of the layer's token blocks,
    so each call after the first skips the factor views, the shape and bound checks and the
    kernel choice (a few microseconds a call, most of an ES layer's Python)."""
    _check_noise(noise, w.w.shape)
    p = w.wt
    at, bt = _factors(noise)
    rank, bsum = at.shape[1], factor_sums(bt)
    if p.tail.shape[1] or not merged_rescale_fits(fan_in, sigma_shift, int(shift), rank):
        kernel = _fused_buffered
        args = (p.packed, p.comp, p.tail, at, bt, bsum, I32(sigma_shift))
    else:
        kernel = _fused_rank1 if rank == 1 else _fused_lowrank
        args = (p.packed, p.comp, at, bt, bsum, I32(sigma_shift))
    if len(w.es_plans) >= ES_PLANS:  # forward after forward on the same weights
        w.es_plans.clear()
    plan = w.es_plans[id(noise), sigma_shift, int(shift)] = (noise, kernel, args)
    return plan


def _kept_plan(w: CpuWeight, noise: LowRank, fan_in: int, sigma_shift: int,
               shift: np.int32) -> tuple:
    """The ES plan of this layer and noise, made on the first call of the step."""
    plan = w.es_plans.get((id(noise), sigma_shift, int(shift)))
    if plan is None or plan[0] is not noise:
        plan = _es_plan(w, noise, fan_in, sigma_shift, shift)
    return plan


class CpuBackend:
    """numba/BLAS backend; ``ew`` and ``noise_source`` are its elementwise ops and generator.

    ``token_block`` (fixed, INTES_CPU_TOKEN_BLOCK, or by default the measured rule, see
    ``TOKEN_BLOCK``): tokens per forward call (see ``intes.kernels.base``). A block makes each
    op one call over T times the rows, which pays where a slice's rows are few and per-call
    costs (Python, GEMM dispatch) a large share.
    """

    name = "cpu"
    ew = CpuElementwise
    fused_epilogues = (*ACTIVATIONS, "residual")  # what linear(...) takes after the layer
    noise_source = CpuNoise
    chunk_rows = CHUNK_ROWS  # member rows per forward call, at most (see CHUNK_ROWS)

    def __init__(self, threads: int | None = None, gemm: str | None = None,
                 token_block: int | None = None) -> None:
        # population slices run concurrently; None: the default (0 is refused, not "auto")
        self.threads = default_threads() if threads is None else threads
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        self.fixed_block = default_token_block() if token_block is None else token_block
        if self.fixed_block is not None and self.fixed_block < 1:
            raise ConfigError(f"token block must be >= 1, got {self.fixed_block}")
        self.gemm: GemmEngine = make_gemm(gemm)
        keep_freed_memory()

    def token_block(self, rows: int, width: int) -> int:
        """Tokens per forward call for a slice of ``rows`` member rows of a model ``width``
        wide."""
        if self.fixed_block is not None:
            return self.fixed_block
        if rows * width <= SMALL_BATCH_BYTES:
            return SMALL_BATCH_BLOCK
        if isinstance(self.gemm, VnniGemm):
            fits = FUSED_BLOCK * rows * width <= FUSED_BLOCK_BYTES
            return FUSED_BLOCK if fits else TOKEN_BLOCK
        return TOKEN_BLOCK if rows <= BLOCK_ROWS else 1

    def prepare(self, w: np.ndarray) -> CpuWeight:
        """W with its GEMM engine's form of W^T, once per step (``CpuWeight``)."""
        return CpuWeight(w, self.gemm.prepare(w))

    def base_product(self, x: np.ndarray, w: CpuWeight) -> np.ndarray:
        """(rows, out) exact X @ W^T: int32, or float32 holding exact integers.

        The float32, AVX2 and int8 engines write it into a per-thread scratch buffer, valid
        until this thread's next product of that shape: use it (or copy it) before then.
        The VNNI engine returns a new array."""
        _check_rows(x, w.w.shape[1], None)
        return self.gemm.product(x, w.wt)

    def fused_linear(self, x: np.ndarray, w: CpuWeight, half: np.int32, shift: np.int32,
                     noise: LowRank | None, sigma_shift: int, act: np.ndarray | None = None
                     ) -> np.ndarray:
        """int8 (rows, out) of a layer whose product and epilogue run fused, panel by panel
        (the VNNI engine): plain for inference, or ES at any rank; ``act`` what follows
        the rescale: an activation's table (``EPILOGUES``), a residual (rows, out), or
        None."""
        p, out = w.wt, np.empty((x.shape[0], w.w.shape[0]), dtype=np.int8)
        if noise is None:
            _fused_plain(x, p.packed, p.comp, p.tail, half, shift, out, act)
            return out
        _, kernel, args = _kept_plan(w, noise, x.shape[1], sigma_shift, shift)
        kernel(x, *args, half, shift, out, act)
        return out

    def gru_scan(self, fx: np.ndarray, hx: np.ndarray, h: np.ndarray, resets: np.ndarray | None,
                 uf: tuple, uh: tuple, bf: np.ndarray, bh: np.ndarray, sigma_shift: int
                 ) -> tuple[np.ndarray, np.ndarray] | None:
        """EGG's recurrence over a token block in one kernel call (see
        ``intes.models.egg.gru_scan``; uf, uh are (weight, shift, noise)), or None where its
        layers have no fused kernel to call from there: an engine other than VNNI, or an ES
        layer whose plan is the buffered kernel (a fan-in tail, or past the merged bound)."""
        (wf, shift_f, noise_f), (wh, shift_h, noise_h) = uf, uh
        if not (isinstance(wf.wt, VnniWeight) and isinstance(wh.wt, VnniWeight)):
            return None
        _check_scan(fx, hx, h, resets, (bf, bh), (wf.w, wh.w), noise_f or noise_h)
        (half_f, shift_f), (half_h, shift_h) = _rounding(shift_f), _rounding(shift_h)
        hs = np.empty(fx.shape, dtype=np.int8)
        args = (fx, hx, np.ascontiguousarray(h), _NO_RESETS if resets is None else resets,
                resets is not None)
        if noise_f is None and noise_h is None:
            args_f, args_h = ((w.wt.packed, w.wt.comp, w.wt.tail) for w in (wf, wh))
            _gru_scan_plain(*args, args_f, half_f, shift_f, args_h, half_h, shift_h,
                            _rows2d(bf), _rows2d(bh), hs)
            return hs, hs[-1] if len(hs) else h
        if noise_f is None or noise_h is None:
            return None
        (_, kernel_f, args_f), (_, kernel_h, args_h) = (
            _kept_plan(wf, noise_f, h.shape[1], sigma_shift, shift_f),
            _kept_plan(wh, noise_h, h.shape[1], sigma_shift, shift_h))
        if kernel_f is not kernel_h or kernel_f not in (_fused_rank1, _fused_lowrank):
            return None  # a fan-in tail or past the merged bound: the buffered kernel
        _gru_scan_es(*args, args_f, half_f, shift_f, args_h, half_h, shift_h, _rows2d(bf),
                     _rows2d(bh), hs, kernel_f is _fused_lowrank)
        return hs, hs[-1] if len(hs) else h

    def linear(self, x, w, shift, noise, sigma_shift, activation=None, residual=None):
        """``Backend.linear``, then ``activation`` (relu or relu_sq, intmath's op of that
        name) or the ``residual`` add sat_add(residual, output): in the VNNI tiles'
        registers where they can (``EPILOGUES``, any residual), else by ``ew`` on the
        output."""
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        if activation is not None and residual is not None:
            raise ValueError("an activation or a residual, not both")
        rows = np.ascontiguousarray(_rows2d(x))
        _check_rows(rows, w.w.shape[1], noise)
        half, shift = _rounding(shift)
        shape = (*x.shape[:-1], w.w.shape[0])
        if residual is not None:
            if residual.shape != shape or residual.dtype != np.int8:
                raise ValueError(f"residual {residual.dtype}{residual.shape}, layer int8{shape}")
            residual = np.ascontiguousarray(_rows2d(residual))
        if isinstance(w.wt, VnniWeight) and (activation in EPILOGUES or residual is not None):
            after = residual if activation is None else EPILOGUES[activation]
            out = self.fused_linear(rows, w, half, shift, noise, sigma_shift, after)
            activation = residual = None
        elif isinstance(w.wt, VnniWeight):
            out = self.fused_linear(rows, w, half, shift, noise, sigma_shift)
        else:
            out = self._unfused_linear(rows, w, half, shift, noise, sigma_shift)
        if activation is not None:
            out = getattr(self.ew, activation)(out)
        if residual is not None:
            out = self.ew.sat_add(residual, out)
        return out.reshape(shape)

    def _unfused_linear(self, rows: np.ndarray, w: CpuWeight, half: np.int32,
                        shift: np.int32, noise: LowRank | None, sigma_shift: int
                        ) -> np.ndarray:
        """A layer on the other GEMM engines: their int32 (or exact float32) product, then
        the epilogue in a pass of its own."""
        if noise is not None:  # no ES plan here to check it once per step
            _check_noise(noise, w.w.shape)
        rank1 = noise is not None and noise.a.shape[2] == 1
        factors = None if noise is None else _factors(noise)
        if rank1:  # projected before the GEMM, while x is in cache
            xb = np.empty(len(rows), dtype=np.int32)
            _project_rank1(rows, factors[1], xb)
        acc = self.gemm.product(rows, w.wt)  # rows were checked by linear
        out = np.empty(acc.shape, dtype=np.int8)
        if factors is None:
            _linear_plain(acc, half, shift, out)
        elif rank1:
            _correct_rank1(acc, xb, factors[0], I32(sigma_shift), half, shift, out)
        else:
            _linear_lowrank(acc, rows, *factors, I32(sigma_shift), half, shift, out)
        return out

    def embed(self, table, tokens, noise, sigma_shift):
        """``Backend.embed``: each token's table row, perturbed per member (tokens whole
        copies of the 2P members). Token values are not checked: they index the table."""
        if table.ndim != 2:
            raise ValueError(f"table is {table.shape}, want (vocab, dim)")
        if noise is not None:
            _check_noise(noise, table.shape)
            if tokens.size % (2 * len(noise.a)):
                raise ValueError(f"{tokens.size} tokens are not whole copies of the "
                                 f"{2 * len(noise.a)} members of the noise's pairs")
        out = np.empty((*tokens.shape, table.shape[1]), dtype=np.int8)
        flat, rows = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1), _rows2d(out)
        if noise is None:
            _embed_plain(table, flat, rows)
        else:
            at, bt = _factors(noise)
            kernel = _embed_rank1 if at.shape[1] == 1 else _embed_lowrank
            kernel(table, flat, at, bt, I32(FRAC_BITS + sigma_shift), rows)
        return out

    def log_likelihood(self, logits, targets):
        """``Backend.log_likelihood``: one per target, a row of logits for each."""
        rows = _rows2d(logits)
        if len(rows) != targets.size:
            raise ValueError(f"logits {logits.shape} for targets {targets.shape}")
        out = np.empty(targets.shape, dtype=np.int32)
        _log_likelihood(rows, np.ascontiguousarray(targets, dtype=np.int64).reshape(-1),
                        out.reshape(-1))
        return out

    def update_matrix(self, w, noise, fitness, threshold):
        """``Backend.update_matrix``: Z by the GEMM engine, fused with the step on VNNI."""
        _check_noise(noise, w.shape)
        _check_fitness(fitness, len(noise.a))
        factors = _factors(noise)
        if isinstance(self.gemm, VnniGemm):
            operands = self.gemm.update_operands(*factors, fitness)
            if operands is not None:
                x, b, levels = operands
                out = np.empty(w.shape, dtype=np.int8)
                _fused_update(x, b.packed, b.comp, levels, np.ascontiguousarray(w), threshold,
                              out)
                return out
        return step_by_sign(w, self.gemm.lowrank_sum(*factors, fitness), threshold)

    def update_vector(self, v, noise, fitness, threshold):
        """``Backend.update_vector``: sum_p f_p e_p by the GEMM engine, then the step."""
        if v.ndim != 1 or noise.shape[1:] != v.shape:
            raise ValueError(f"noise {noise.shape} for a vector {v.shape}: want (P, {v.size})")
        _check_fitness(fitness, len(noise))
        return step_by_sign(v, self.gemm.vector_sum(fitness, noise), threshold)
