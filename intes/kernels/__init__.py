"""Backends behind one interface (``intes.kernels.base.Backend``); reference defines semantics."""

from __future__ import annotations

from intes.errors import ConfigError
from intes.kernels.base import Backend

BACKENDS = ("auto", "reference", "cpu", "cuda")


def available() -> dict[str, str | None]:
    """Each backend -> None if usable here, else one line saying why not."""
    status: dict[str, str | None] = {"reference": None}
    try:
        from intes.kernels import cpu  # noqa: F401
        status["cpu"] = None
    except ImportError as err:
        status["cpu"] = f"cpu backend unavailable: {err}"
    try:
        from intes.kernels import cuda
        status["cuda"] = cuda.unavailable_reason()
    except ImportError as err:
        status["cuda"] = f"cuda backend unavailable: {err}"
    return status


# 'auto' prefers cpu to cuda: through the Engine (then: numpy arrays across the bus at every
# op, elementwise ops on the host), the cuda backend on an H200 ran the ES step at a tenth of
# the cpu backend's speed on two cores (16.6 k against 176 k tokens/s, rwkv d256 x 2, N 1024:
# benchmarks/results/gpu_cli_bench_rwkv_n1024_h200.json, cpu_bench_rwkv_n1024_zen4.json).
# Members are now scored on the device (CudaBackend.score), not yet measured on a GPU; until
# then ``--backend cuda`` selects it.
AUTO_ORDER = ("cpu", "cuda", "reference")


def resolve(name: str = "auto") -> str:
    """The usable backend a name means here ('auto': the first usable of ``AUTO_ORDER``);
    ConfigError, in one line, for an unknown or unusable one."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    status = available()
    if name == "auto":
        name = next(n for n in AUTO_ORDER if status.get(n, "missing") is None)
    if status.get(name) is not None:
        raise ConfigError(status[name])
    return name


def get_backend(name: str = "auto") -> Backend:
    """The named backend (see ``resolve``)."""
    name = resolve(name)
    if name == "reference":
        from intes.kernels.reference import ReferenceBackend
        return ReferenceBackend()
    if name == "cpu":
        from intes.kernels.cpu import CpuBackend
        return CpuBackend()
    from intes.kernels.cuda import CudaBackend
    return CudaBackend()
