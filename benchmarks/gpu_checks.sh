#!/usr/bin/env bash
# Every GPU check in one go (the cuda backend's, and the HF adapter's on a GPU), for a short
# lease on a CUDA machine:
#   1. the machine and library versions                               -> OUT/env.txt
#   2. the bench_gpu.py sweep (its parity check first), no new configuration after SWEEP_S
#      seconds and the stage killed at SWEEP_S + 120                 -> OUT/sweep.json
#   3. the GPU tests (tests/test_cuda_backend.py, then the HF adapter's) -> OUT/log.txt
#   4. profile_gpu.py: one point's step split by op                   -> OUT/profile.json
#   5. `intes bench` through the Engine (rwkv), cuda and cpu backends side by side at its
#      default size, then cuda alone at N 16384, d 1024
#      -> OUT/cli_bench_cuda.json, OUT/cli_bench_cpu.json, OUT/cli_bench_cuda_large.json
# Each stage has its own time limit and a failing stage does not stop the next; everything
# printed goes to OUT/log.txt. Run from the project root:
#   benchmarks/gpu_checks.sh OUT [SWEEP_S] [POPULATIONS] [WIDTHS]
# The widths run largest first: they decide the ratio and the int8 share. On an H200 the first
# configuration spent about a minute compiling and autotuning. TESTS_S, PROFILE_S and CLI_S in
# the environment change those stages' limits; SWEEP_ARGS adds arguments to the sweep's
# bench_gpu.py (e.g. "--repeats 1"). The tests run each Triton kernel with its first autotune
# config alone (INTES_TRITON_AUTOTUNE=0): with all of them, compiling every kernel variant took
# longer than a 110 s limit (TESTS_S=110) on an H200.
set -u
out=${1:?usage: benchmarks/gpu_checks.sh OUT [SWEEP_S] [POPULATIONS] [WIDTHS]}
sweep_s=${2:-120}
populations=${3:-4096 65536 262144}
widths=${4:-2048 1024 512 256}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-device}

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log it, report its status
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" >>"$log"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start))s" | tee -a "$log"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 - <<'PY'
import importlib.metadata as md, platform
print("python", platform.python_version())
for lib in ("torch", "triton", "cupy-cuda12x", "cupy-cuda13x", "numpy", "numba"):
    try:
        print(lib, md.version(lib))
    except md.PackageNotFoundError:
        pass
from intes.kernels.cuda import unavailable_reason
print("cuda backend:", unavailable_reason() or "available")
PY
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

# The budget is checked before each configuration, and the largest take half a minute or more.
# shellcheck disable=SC2086  # the lists split into arguments
stage sweep $((sweep_s + 120)) python3 benchmarks/bench_gpu.py --populations $populations \
    --widths $widths --budget-s "$sweep_s" --out "$out/sweep.json" ${SWEEP_ARGS:-}
per_test=()  # a hung test must not take the other tests' time
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 100)
stage tests "${TESTS_S:-200}" env INTES_TRITON_AUTOTUNE=0 python3 -m pytest -o addopts= -q -rfs \
    --tb=short "${per_test[@]}" -k "not emulated" tests/test_cuda_backend.py
stage hf-tests "${TESTS_S:-200}" python3 -m pytest -o addopts= -q -rfs --tb=short \
    "${per_test[@]}" -k on_a_gpu tests/test_hf_adapter.py
stage profile "${PROFILE_S:-120}" sh -c "python3 benchmarks/profile_gpu.py --population 65536 \
    --width 2048 >'$out/profile.json'"
for backend in cuda cpu; do
    stage "cli-bench-$backend" "${CLI_S:-90}" sh -c "python3 -m intes bench --backend $backend \
        --no-naive --repeats 2 >'$out/cli_bench_$backend.json'"
done
stage cli-bench-cuda-large "${CLI_S:-90}" sh -c "python3 -m intes bench --backend cuda \
    --population 16384 --dim 1024 --no-naive --repeats 2 >'$out/cli_bench_cuda_large.json'"
