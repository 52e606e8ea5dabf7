"""Where a fused ES layer's extra time over the plain one goes, on the VNNI engine: four
variants of one layer call, timed in rotation on one thread, as medians of their ratios to
the plain layer.

- ``plain``: the inference kernel (``_fused_plain``), the reference 1.0;
- ``es_order``: plain tiles over the ES panels (pair-major order, the factors' prefetches):
  what the ES layout costs with no ES arithmetic;
- ``es_no_projection``: the ES tiles (correction and merged shift) with every projection
  left at zero, no projection pass;
- ``es``: the ES kernel (``_fused_rank1``).

So ``es_order`` - 1 is the layout's share, ``es_no_projection`` - ``es_order`` the tiles'
epilogue (its funnel shift, ``vpdpwssd`` and factor words) and ``es`` -
``es_no_projection`` the projection pass. The variants run only on a CPU with AVX-512 VNNI.

    python benchmarks/layer_split.py [--width 256] [--members 512] [--tokens 8] [--reps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
from numba import njit

from intes.bench import machine_info
from intes.intmath import fan_in_shift
from intes.kernels.base import LowRank
from intes.kernels.cpu import CpuBackend
from intes.kernels.cpu_linear import _es_panels, _fused_plain, _fused_rank1
from intes.kernels.cpu_noise import CpuNoise, _factors
from intes.kernels.cpu_scalar import _rounding
from intes.kernels.vnni import factor_sums
from intes.kernels.vnni_gemm import (
    PANEL_ROWS,
    odd_low,
    prefetch_factor_rows,
    prefetch_rows,
    tiles_es,
    tiles_rescale,
    vnni_unavailable,
)

SIGMA_SHIFT = 3


def shapes(width: int) -> tuple[tuple[int, int], ...]:
    """(out, in) of the models' layers at a width: square, and RWKV's 4x MLP in and out."""
    return (width, width), (4 * width, width), (width, 4 * width)


@njit(inline="always")
def _prefetch_next(x, r0, m0, rows, at, bt, out):
    """The ES panel's prefetches, as ``cpu_linear._es_panel`` makes them."""
    members = 2 * at.shape[0]
    nxt = r0 + members if r0 + members < x.shape[0] else m0 + rows
    prefetch_rows(x, nxt, PANEL_ROWS, out)
    if nxt < members:
        prefetch_factor_rows(at, nxt // 2, PANEL_ROWS // 2)
        prefetch_factor_rows(bt, nxt // 2, PANEL_ROWS // 2)


@njit(nogil=True)
def es_order(x, packed, comp, at, bt, half, shift, out):
    for r0, m0, rows in _es_panels(x, at):
        _prefetch_next(x, r0, m0, rows, at, bt, out)
        for block in range(packed.shape[0]):
            tiles_rescale(x, r0, rows, packed, comp, block, half, shift, out, None)


@njit(nogil=True)
def es_no_projection(x, packed, comp, at, bt, sigma_shift, half, shift, out):
    total, low = np.add(sigma_shift, shift), odd_low(sigma_shift)
    xv = np.zeros((1, x.shape[0]), dtype=np.int32)
    for r0, m0, rows in _es_panels(x, at):
        _prefetch_next(x, r0, m0, rows, at, bt, out)
        for block in range(packed.shape[0]):
            tiles_es(x, r0, rows, packed, comp, block, at, m0 // 2, xv[0], half, sigma_shift,
                     low, total, out, None)


def variants(x: np.ndarray, w, noise: LowRank, fan_in: int) -> dict:
    """Each variant as a no-argument call writing its own output."""
    p = w.wt
    at, bt = _factors(noise)
    bsum = factor_sums(bt)
    half, shift = _rounding(fan_in_shift(fan_in))
    sigma = np.int32(SIGMA_SHIFT)
    out = {name: np.empty((x.shape[0], w.w.shape[0]), dtype=np.int8)
           for name in ("plain", "es_order", "es_no_projection", "es")}
    return {
        "plain": lambda: _fused_plain(x, p.packed, p.comp, p.tail, half, shift, out["plain"],
                                      None),
        "es_order": lambda: es_order(x, p.packed, p.comp, at, bt, half, shift,
                                     out["es_order"]),
        "es_no_projection": lambda: es_no_projection(x, p.packed, p.comp, at, bt, sigma, half,
                                                     shift, out["es_no_projection"]),
        "es": lambda: _fused_rank1(x, p.packed, p.comp, at, bt, bsum, sigma, half, shift,
                                   out["es"], None),
    }


def split(shape: tuple[int, int], members: int, tokens: int, reps: int) -> dict:
    """Median ratio of each variant's seconds to the plain layer's, in rotation."""
    out_dim, in_dim = shape
    rng = np.random.default_rng(0)
    backend = CpuBackend(threads=1)  # its constructor keeps freed memory mapped
    x = rng.integers(-127, 128, (members * tokens, in_dim)).astype(np.int8)
    w = backend.prepare(rng.integers(-127, 128, (out_dim, in_dim)).astype(np.int8))
    a, b = CpuNoise.lowrank_factors(1, 2, np.arange(members // 2), 3, out_dim, in_dim, 1)
    calls = variants(x, w, LowRank(a, b), in_dim)
    for call in calls.values():  # compile
        call()
    seconds = {name: [] for name in calls}
    names = list(calls)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    ratios = {name: statistics.median(s / p for s, p in zip(seconds[name], seconds["plain"],
                                                             strict=True))
              for name in names}
    return {"shape": list(shape), "plain_ms": 1e3 * statistics.median(seconds["plain"]),
            "ratio_to_plain": ratios,
            "shares": {"layout": ratios["es_order"] - 1,
                       "epilogue": ratios["es_no_projection"] - ratios["es_order"],
                       "projection": ratios["es"] - ratios["es_no_projection"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256, help="the model width whose layers to time")
    p.add_argument("--members", type=int, default=512, help="one slice of N = 1024 on 2 cores")
    p.add_argument("--tokens", type=int, default=8, help="rows are tokens x members")
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args()
    if (why := vnni_unavailable()) is not None:
        raise SystemExit(f"error: {why}")
    load = os.getloadavg()[0]
    layers = [split(s, args.members, args.tokens, args.reps) for s in shapes(args.width)]
    print(json.dumps({"config": vars(args) | {"sigma_shift": SIGMA_SHIFT}, "layers": layers,
                      "machine": machine_info(load)}, indent=2))


if __name__ == "__main__":
    main()
