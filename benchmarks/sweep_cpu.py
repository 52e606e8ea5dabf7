"""Sweep ``intes bench`` over population x width on the CPU; write the JSON results.

Each configuration runs in a fresh process, so its peak RSS is its own and one crash does not
end the sweep. Results are rewritten after every run, so an interrupted sweep keeps what it
measured. The full default grid took 7 minutes on 2 Zen 4 cores, 3 of them for N=4096 at
width 1024 (~14 Top per ES step and as much per inference pass); shrink it with the flags, e.g.

    python benchmarks/sweep_cpu.py --populations 64,256,1024 --widths 128,256 --seq-len 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cpu_sweep.json"


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--populations", type=int_list, default=[64, 256, 1024, 4096])
    p.add_argument("--widths", type=int_list, default=[128, 256, 512, 1024])
    p.add_argument("--model", default="rwkv", choices=["rwkv", "egg"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-naive", dest="naive", action="store_false")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def bench_command(args: argparse.Namespace, population: int, width: int) -> list[str]:
    cmd = [sys.executable, "-c", "from intes.cli.bench import bench; bench()",
           "--model", args.model, "--dim", str(width), "--layers", str(args.layers),
           "--population", str(population), "--seq-len", str(args.seq_len),
           "--rank", str(args.rank), "--repeats", str(args.repeats),
           "--backend", args.backend, "--naive" if args.naive else "--no-naive"]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    return cmd


def run_one(args: argparse.Namespace, population: int, width: int) -> dict:
    """One configuration's bench JSON, or the error it ended with."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    done = subprocess.run(bench_command(args, population, width), capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"config": {"population": population, "dim": width}, "error": tail[0]}
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sweep = {"sweep": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "results": []}
    for width in args.widths:
        for population in args.populations:
            start = time.perf_counter()
            result = run_one(args, population, width)
            sweep["results"].append(result)
            args.out.write_text(json.dumps(sweep, indent=2) + "\n")
            figures = {k: round(result[k]) for k in ("es_tokens_per_s", "inference_tokens_per_s",
                                                      "naive_es_tokens_per_s") if k in result}
            print(f"width {width:5d} population {population:5d}: {figures or result.get('error')}"
                  f" ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
