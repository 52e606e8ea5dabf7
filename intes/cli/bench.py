"""``intes bench``: ES vs inference vs naive ES throughput, as one JSON object."""

from __future__ import annotations

import json

import click

from intes.kernels import BACKENDS
from intes.kernels.gemm import GEMMS
from intes.models import MODELS


@click.command()
@click.option("--model", type=click.Choice(sorted(MODELS)), default="rwkv", show_default=True)
@click.option("--dim", type=int, default=256, show_default=True)
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--population", type=int, default=1024, show_default=True)
@click.option("--seq-len", type=int, default=64, show_default=True)
@click.option("--rank", type=int, default=1, show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed runs per figure, interleaved; the fastest counts")
@click.option("--naive/--no-naive", default=True, show_default=True,
              help="Also time naive ES, full-rank and low-rank noise (a few pairs, extrapolated)")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Population slices the cpu backend runs at once  [default: "
                   "INTES_CPU_THREADS or one per usable core]")
@click.option("--gemm", type=click.Choice(GEMMS), default=None,
              help="The cpu backend's base-product GEMM  [default: INTES_CPU_GEMM or auto: "
                   "vnni where the CPU has AVX-512 VNNI, else int8 where torch runs it and the "
                   "CPU has VNNI or AMX, else avx2 where the CPU has AVX2, else float32]")
def bench(model: str, dim: int, layers: int, population: int, seq_len: int, rank: int,
          backend: str, repeats: int, naive: bool, threads: int | None,
          gemm: str | None) -> None:
    """Tokens/s of a full ES step, of plain inference and of naive ES; prints JSON."""
    from intes.bench import run_bench

    result = run_bench(model=model, dim=dim, layers=layers, population=population,
                       seq_len=seq_len, rank=rank, backend=backend, repeats=repeats,
                       naive=naive, threads=threads, gemm=gemm, progress=True)
    click.echo(json.dumps(result, indent=2))
