"""The README's speed table: one ``intes bench`` per row, each in its own process (so each
row's peak RSS is its own), saved as JSON, and the Markdown table made from those files.

    python benchmarks/bench_table.py --out DIR [--rows rwkv_n1024,egg_n1024]
    python benchmarks/bench_table.py --markdown DIR

Rows share the issue's configuration (width 256, 2 layers, 64 tokens, N = 1024, rank 1, the
cpu backend's default GEMM, every core) and change one thing each; the last runs the numpy
reference backend instead, for scale.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from intes.kernels.gemm import Avx2Gemm, Float32Gemm, Int8Gemm, VnniGemm

BASE = ["--dim", "256", "--layers", "2", "--seq-len", "64"]


def flags(model: str, population: int = 1024, *more: str) -> list[str]:
    return ["--model", model, "--population", str(population), *more]


ROWS = {  # name: (label, flags on top of BASE)
    "rwkv_n1024": ("rwkv, 1024", flags("rwkv")),
    "egg_n1024": ("egg, 1024", flags("egg")),
    "rwkv_n256": ("rwkv, 256", flags("rwkv", 256)),
    "rwkv_n4096": ("rwkv, 4096", flags("rwkv", 4096, "--repeats", "5")),
    "rwkv_n1024_1thread": ("rwkv, 1024", flags("rwkv", 1024, "--threads", "1")),
    "rwkv_n1024_rank2": ("rwkv, 1024, rank 2", flags("rwkv", 1024, "--rank", "2")),
    "rwkv_n1024_int8": ("rwkv, 1024", flags("rwkv", 1024, "--gemm", "int8")),
    "egg_n1024_int8": ("egg, 1024", flags("egg", 1024, "--gemm", "int8")),
    "rwkv_n1024_float32": ("rwkv, 1024", flags("rwkv", 1024, "--gemm", "float32")),
    "egg_n1024_float32": ("egg, 1024", flags("egg", 1024, "--gemm", "float32")),
    # the numpy backend that defines the semantics, for scale (minutes per row)
    "rwkv_n1024_reference": ("rwkv, 1024", flags("rwkv", 1024, "--backend", "reference",
                                                 "--repeats", "2")),
}
HEADER = ("| model, N | GEMM | threads | ES tok/s | inference tok/s | ratio | ratio (CPU s) "
          "| naive tok/s | speedup vs naive | per core | vs low-rank naive | update share "
          "| base product / f32 / int8 / vnni GEMM | peak RSS |")


def command(name: str) -> list[str]:
    return ["intes", "bench", *BASE, *ROWS[name][1]]


def run(out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        result = subprocess.run(command(name), capture_output=True, text=True, check=True)
        record = json.loads(result.stdout) | {"command": " ".join(command(name))}
        (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"{name}: ratio {record['ratio']:.3f}, speedup {record.get('speedup', 0):.1f}")


# ``intes bench`` records the GEMM engine by its description
ENGINE_NAMES = {e.description: e.name for e in (VnniGemm, Int8Gemm, Avx2Gemm, Float32Gemm)}


def engine(row_flags: list[str], record: dict) -> str:
    """The row's backend, or for the cpu backend the GEMM engine that ran (the default one
    is the machine's: vnni, int8, avx2 or float32)."""
    if "--backend" in row_flags:
        return row_flags[row_flags.index("--backend") + 1]
    return ENGINE_NAMES.get(record.get("gemm"), "-")


def gops(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def row(name: str, r: dict) -> str:
    label, row_flags = ROWS[name]
    rates = " / ".join(gops(r.get(k)) for k in ("base_product_gflops", "gemm_gflops",
                                                 "int8_gemm_gops", "vnni_gemm_gops"))
    cells = [label, engine(row_flags, r), str(r["threads"] or 1),
             f"**{r['es_tokens_per_s']:,.0f}**",
             f"{r['inference_tokens_per_s']:,.0f}", f"{r['ratio']:.3f}",
             f"{r['cpu_seconds']['ratio']:.3f}", f"{r['naive_es_tokens_per_s']:,.0f}",
             f"**{r['speedup']:.1f}×**", f"{r['speedup_cpu_seconds']:.1f}×",
             f"{r['speedup_low_rank']:.1f}×" if "speedup_low_rank" in r else "-",
             f"{100 * r['update_fraction']:.1f}%", rates, f"{r['peak_rss_mb']:.0f} MB"]
    return "| " + " | ".join(cells) + " |"


def markdown(directory: Path) -> str:
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    lines += [row(name, json.loads((directory / f"{name}.json").read_text()))
              for name in ROWS if (directory / f"{name}.json").exists()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="run the rows and write NAME.json here")
    p.add_argument("--rows", default=",".join(ROWS), help="rows to run (default: all)")
    p.add_argument("--markdown", type=Path, help="print the table of a directory's rows")
    args = p.parse_args()
    if args.out is None and args.markdown is None:
        p.error("give --out DIR (run) or --markdown DIR (print)")
    unknown = [n for n in args.rows.split(",") if n not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if args.out is not None:
        run(args.out, args.rows.split(","))
    if args.markdown is not None:
        print(markdown(args.markdown))


if __name__ == "__main__":
    main()
