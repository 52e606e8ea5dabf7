"""GPU throughput of the cuda backend's kernels: ES vs inference vs naive full-rank ES.

Prints and writes JSON (a list of flat records, one per population x width) to
benchmarks/results/gpu-<gpu>-<date>.json, rewritten after every configuration so an
interrupted sweep keeps what it measured. Run on a CUDA machine:

    python benchmarks/bench_gpu.py                      # the full sweep
    python benchmarks/bench_gpu.py --populations 4096 --widths 512 --tokens 4   # one point
    python benchmarks/bench_gpu.py --dry-run   # no GPU: the script itself, tiny, on the CPU

What is timed is a device-resident int8 model built from the backend's kernels only (no host
round trips: the Backend interface itself moves numpy arrays, so it would time the bus): an
embedding, ``layers`` blocks of norm -> W1 (4d x d) -> relu^2 LUT -> W2 (d x 4d) ->
saturating residual, then norm -> head (vocab x d) -> integer log-likelihood; every token
runs all members as rows of one batch, token after token, as a recurrent model must.

- es_tokens_per_s: one ES step = T tokens of all N members, each pair with its own rank-r
  noise on every matrix and the embedding (factors hashed once per step, the backend's
  default "cached" mode), sign fitness, then the seed-reconstructed update of every matrix.
  es_kernel_noise_tokens_per_s: the same with the factors hashed inside the linear kernel.
- inference_tokens_per_s: the same T tokens for N rows, no noise, no update; ratio = es /
  inference (1.0 = ES costs nothing beyond inference).
- naive_es_tokens_per_s: full-rank ES as "perturb, evaluate, restore" per member: a member's
  own full-rank noise on every matrix, then its T tokens alone (a few members are timed);
  speedup = es / naive.
- es_int8_tops: 2 x N x T x (sum of out x in over the linears) per ES step time, i.e. the
  base products only (the low-rank terms, LUTs and the update are not counted), and
  share_of_peak: that over the GPU's dense int8 tensor-core peak (H100 SXM: 1979 TOPS;
  3958 is the figure with 2:4 sparsity, which int8 ES does not use).
- parity: CudaBackend == ReferenceBackend, in both noise modes, on linear, update_matrix and
  log_likelihood and on one ES step of a tiny Engine (scored on the device), checked once per
  run before timing; tests/test_cuda_backend.py checks every op.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from intes.kernels.cuda import peak_int8_tops

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Point:
    """One benchmark configuration."""

    population: int
    width: int
    layers: int
    vocab: int
    tokens: int
    rank: int
    sigma_shift: int


class Bench:
    """The bench model's weights on the device and the kernels that run it."""

    def __init__(self, point: Point, kernels: Any, device: str, seed: int = 0):
        import torch

        from intes import noise as nz
        from intes.intmath import fan_in_shift
        from intes.kernels import triton as tk

        self.torch, self.tk, self.nz, self.k = torch, tk, nz, kernels
        self.p, self.device = point, device
        d, h, v = point.width, 4 * point.width, point.vocab
        shapes = {"emb": (v, d), "head": (v, d)}
        for i in range(point.layers):
            shapes[f"{i}.w1"], shapes[f"{i}.w2"] = (h, d), (d, h)
        self.shapes = shapes
        self.shifts = {n: fan_in_shift(s[1]) for n, s in shapes.items()}
        self.weights = {n: self._random(s, seed + i) for i, (n, s) in enumerate(shapes.items())}
        self.norm_weight = torch.full((d,), 16, dtype=torch.int8, device=device)
        self.linears = [n for n in shapes if n != "emb"]

    def _random(self, shape: tuple[int, ...], seed: int) -> Any:
        """int8 values ~ N(0, 1) x 16 from the noise hash, made on the device."""
        keys = self.device_keys(seed, 0, np.zeros(1), 0)
        vals = self.k.noise_values(self.xp(keys), math.prod(shape))
        return self.tensor(vals).reshape(shape)

    def xp(self, t: Any) -> Any:
        return self.k.xp.from_dlpack(t)

    def tensor(self, a: Any) -> Any:
        return self.torch.from_dlpack(a)

    def device_keys(self, seed: int, step: int, pairs: np.ndarray, tensor_id: int) -> Any:
        keys = self.nz.stream_key(seed, step, pairs, tensor_id).view(np.int32)
        return self.torch.from_numpy(keys).to(self.device)

    def ops_per_token_row(self) -> int:
        return 2 * sum(math.prod(self.shapes[n]) for n in self.linears)

    # ---------------------------------------------------------- the forward of one token

    def forward(self, weights: dict, tokens: Any, targets: Any, noise: dict | None) -> Any:
        """int32 (rows,) log-likelihood of targets after one token (noise: name -> DeviceNoise)."""
        k, noise = self.k, noise or {}
        emb = noise.get("emb")
        kw = {} if emb is None else (
            {"keys": self.xp(emb.keys), "rank": emb.rank} if emb.keys is not None
            else {"factors": (self.xp(emb.a), self.xp(emb.b))})
        x = k.embed(self.xp(weights["emb"]), self.xp(tokens), self.p.sigma_shift, **kw)
        for i in range(self.p.layers):
            xn = self.tensor(k.norm(x, self.xp(self.norm_weight)))
            hid = self._linear(weights, f"{i}.w1", xn, noise)
            act = k.relu_sq(self.xp(hid))  # in [0, 126]
            x = k.sat_add(x, self.xp(self._linear(weights, f"{i}.w2", self.tensor(act), noise)))
        xn = self.tensor(k.norm(x, self.xp(self.norm_weight)))
        logits = self._linear(weights, "head", xn, noise)
        return self.tensor(k.log_likelihood(self.xp(logits), self.xp(targets)))

    def _linear(self, weights: dict, name: str, x: Any, noise: dict) -> Any:
        return self.tk.linear(x, weights[name], self.shifts[name], noise.get(name),
                              self.p.sigma_shift)

    # ---------------------------------------------------------- what is timed

    def step_noise(self, step: int, cached: bool) -> dict:
        """Every tensor's noise for one ES step: keys, hashed into factors when cached."""
        pairs, rank = np.arange(self.p.population // 2), self.p.rank
        out = {}
        for tid, (name, (rows, cols)) in enumerate(self.shapes.items()):
            keys = self.device_keys(7, step, pairs, tid)
            if cached and name != "emb":  # the backend hashes embeddings in their kernel
                a, b = self.k.lowrank_factors(self.xp(keys), rows, cols, rank)
                out[name] = self.tk.DeviceNoise(rank, a=self.tensor(a), b=self.tensor(b))
            else:
                out[name] = self.tk.DeviceNoise(rank, keys=keys)
        return out

    def es_step(self, windows: Any, step: int, cached: bool) -> None:
        """Score every member over the windows' tokens, then update every tensor from seeds."""
        from intes import es

        torch, p = self.torch, self.p
        noise = self.step_noise(step, cached)
        total = torch.zeros(p.population, dtype=torch.int32, device=self.device)
        for t in range(p.tokens):
            total += self.forward(self.weights, windows[:, t], windows[:, t + 1], noise)
        fitness = torch.sign(total[0::2] - total[1::2]).to(torch.int32)
        cfg = es.ESConfig(population=p.population, rank=p.rank)
        threshold, _ = es.thresholds(step, fitness.cpu().numpy(), cfg)
        for tid, (name, (rows, cols)) in enumerate(self.shapes.items()):
            keys = self.device_keys(7, step, np.arange(p.population // 2), tid)
            a, b = self.k.lowrank_factors(self.xp(keys), rows, cols, p.rank)
            self.weights[name] = self.tk.update_matrix(self.weights[name], self.tensor(a),
                                                       self.tensor(b), fitness, threshold)

    def inference(self, windows: Any) -> None:
        for t in range(self.p.tokens):
            self.forward(self.weights, windows[:, t], windows[:, t + 1], None)

    def naive_member(self, member: int, windows: Any) -> None:
        """One member of full-rank ES: perturb every tensor fully, then its tokens alone."""
        torch, sigma = self.torch, self.p.sigma_shift
        own = {}
        for tid, (name, shape) in enumerate(self.shapes.items()):
            keys = self.device_keys(7, 0, np.array([member]), tid)
            e = self.tensor(self.k.noise_values(self.xp(keys), math.prod(shape))).reshape(shape)
            delta = (e.to(torch.int32) + ((1 << sigma) >> 1)) >> sigma
            own[name] = (self.weights[name].to(torch.int32) + delta).clamp(-127, 127).to(
                torch.int8)
        row = windows[member:member + 1]
        for t in range(self.p.tokens):
            self.forward(own, row[:, t], row[:, t + 1], None)


def timed(fn, repeats: int) -> float:
    """Seconds per call of fn, after one untimed call (compiles and autotuning)."""
    import torch

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def measure(point: Point, kernels: Any, device: str, repeats: int, naive_members: int) -> dict:
    """One record: the throughputs of ES (both noise modes), inference and naive ES."""
    import torch

    bench = Bench(point, kernels, device)
    n, t = point.population, point.tokens
    windows = torch.randint(0, point.vocab, (n, t + 1), dtype=torch.int32, device=device)
    steps = iter(range(1, 1 << 30))
    es_s = timed(lambda: bench.es_step(windows, next(steps), cached=True), repeats)
    es_kernel_s = timed(lambda: bench.es_step(windows, next(steps), cached=False), repeats)
    inf_s = timed(lambda: bench.inference(windows), repeats)
    members = iter(range(1 << 30))
    naive_s = timed(lambda: [bench.naive_member(next(members) % n, windows)
                             for _ in range(naive_members)], 1)
    es_tps, inf_tps = n * t / es_s, n * t / inf_s
    naive_es_tps = naive_members * t / naive_s
    tops = bench.ops_per_token_row() * n * t / es_s / 1e12
    return {**dataclasses.asdict(point), "es_tokens_per_s": es_tps,
            "es_kernel_noise_tokens_per_s": n * t / es_kernel_s,
            "inference_tokens_per_s": inf_tps, "ratio": es_tps / inf_tps,
            "naive_es_tokens_per_s": naive_es_tps, "speedup": es_tps / naive_es_tps,
            "es_int8_tops": tops,
            "inference_int8_tops": bench.ops_per_token_row() * n * t / inf_s / 1e12}


def parity(kernels: Any, device: str) -> bool:
    """CudaBackend == ReferenceBackend in both noise modes: linear, update_matrix and
    log_likelihood on random inputs, and one tiny ES step (scored on the device)."""
    from intes import es
    from intes import noise as nz
    from intes.engine import Engine, ModelConfig, TrainConfig
    from intes.kernels.base import LowRank
    from intes.kernels.cuda import CudaBackend
    from intes.kernels.reference import ReferenceBackend

    ref, rng, ok = ReferenceBackend(), np.random.default_rng(0), True
    for mode in ("cached", "kernel"):
        gpu = CudaBackend(mode, device=device, kernels=kernels)
        x = rng.integers(-127, 128, (64, 200)).astype(np.int8)
        w = rng.integers(-127, 128, (300, 200)).astype(np.int8)
        f = rng.integers(-15, 16, 32).astype(np.int32)
        host = LowRank(*nz.lowrank_factors(1, 2, np.arange(32), 3, 300, 200, 2))
        keyed = LowRank(*gpu.noise_source.lowrank_factors(1, 2, np.arange(32), 3, 300, 200, 2))
        ok &= np.array_equal(gpu.linear(x, gpu.prepare(w), 9, keyed, 4),
                             ref.linear(x, w, 9, host, 4))
        ok &= np.array_equal(gpu.update_matrix(w, keyed, f, 100),
                             ref.update_matrix(w, host, f, 100))
        logits, targets = x[:, :100], rng.integers(0, 100, 64)
        ok &= np.array_equal(gpu.log_likelihood(logits, targets),
                             ref.log_likelihood(logits, targets))
        cfg = TrainConfig(model=ModelConfig(vocab_size=64, dim=32, layers=1),
                          es=es.ESConfig(population=8, rank=2), seq_len=4)
        windows = rng.integers(0, 64, (8, 5))
        a, b = Engine(cfg, backend=ref), Engine(cfg, backend=gpu)
        ok &= np.array_equal(a.step(windows), b.step(windows))
        ok &= all(np.array_equal(a.params[n], b.params[n]) for n in a.params)
    return bool(ok)


def environment(dry_run: bool) -> tuple[Any, str, str, dict, tuple]:
    """(kernels, device, device name, library versions, out-of-memory errors) of this run."""
    if dry_run:  # before the first import of the Triton kernels
        os.environ["TRITON_INTERPRET"] = "1"
        from intes.kernels.cupy import emulated_kernels

        return emulated_kernels(), "cpu", "cpu (dry run)", {}, ()
    from intes.kernels.cuda import device_kernels, unavailable_reason

    reason = unavailable_reason()  # before importing cupy, which may not be there
    if reason is not None:
        raise SystemExit(reason)
    import cupy
    import torch

    versions = {lib: importlib.metadata.version(lib) for lib in ("torch", "triton")}
    return (device_kernels(), "cuda", torch.cuda.get_device_name(),
            {**versions, "cupy": cupy.__version__},
            (torch.cuda.OutOfMemoryError, cupy.cuda.memory.OutOfMemoryError))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--populations", type=int, nargs="+",
                    default=[1024, 4096, 16384, 65536, 262144])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64,
                    help="tokens per ES step (T; intes' default seq_len)")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--sigma-shift", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--naive-members", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="start no new configuration after this many seconds")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: run the script on the CPU at a tiny size (figures meaningless)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.populations, args.widths, args.layers, args.vocab = [4], [16], 1, 16
        args.tokens, args.repeats, args.naive_members = 2, 1, 1
        args.out = args.out or Path(tempfile.gettempdir()) / "intes-bench-gpu-dry-run.json"

    kernels, device, gpu, versions, oom = environment(args.dry_run)
    now = dt.datetime.now(dt.UTC)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = args.out or RESULTS / f"gpu-{slug}-{now:%Y%m%d-%H%M%S}.json"
    peak = peak_int8_tops(gpu)
    common = {"gpu": gpu, "date": now.isoformat(timespec="seconds"), "peak_int8_tops": peak,
              "parity": parity(kernels, device), **versions}
    records, start = [], time.perf_counter()
    for width in args.widths:
        for population in args.populations:
            if time.perf_counter() - start > args.budget_s:
                break
            point = Point(population, width, args.layers, args.vocab, args.tokens, args.rank,
                          args.sigma_shift)
            try:
                rec = {**common, **measure(point, kernels, device, args.repeats,
                                           args.naive_members)}
                rec["share_of_peak"] = rec["es_int8_tops"] / peak if peak else None
            except oom:
                rec = {**common, **dataclasses.asdict(point), "error": "out of GPU memory"}
            records.append(rec)
            print(json.dumps(rec), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
