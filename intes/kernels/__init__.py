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


def get_backend(name: str = "auto") -> Backend:
    """The named backend; 'auto' picks cuda if usable, else cpu, else reference."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    status = available()
    if name == "auto":
        name = next(n for n in ("cuda", "cpu", "reference") if status.get(n, "missing") is None)
    if status.get(name) is not None:
        raise ConfigError(status[name])
    if name == "reference":
        from intes.kernels.reference import ReferenceBackend
        return ReferenceBackend()
    if name == "cpu":
        from intes.kernels.cpu import CpuBackend
        return CpuBackend()
    from intes.kernels.cuda import CudaBackend
    return CudaBackend()
