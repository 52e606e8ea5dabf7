"""The cuda backend: Triton tensor-core kernels and CuPy RawKernels behind the Backend interface.

Which kernel does what: ``intes.kernels.triton`` runs everything that is a GEMM (the perturbed
linear layer, the matrix update) and ``intes.kernels.cupy`` everything else (noise, embedding,
log-likelihood, the vector update). Tensors are torch tensors on the device and pass to CuPy
and back by DLPack, without copies; all kernels run on the default stream, in order.

Noise never crosses the bus. ``noise_source`` (the hook ``intes.models.base.make_noise``
calls) hands out ``KeyedFactor``s: the per-pair stream keys of ``intes.noise`` and nothing
else. The kernels make the factors from them:

- ``noise_mode="cached"`` (default): hashed once per (tensor, population chunk) into device
  memory on first use, then read by every token of the step;
- ``noise_mode="kernel"``: hashed inside the linear kernel at every call; nothing is stored,
  but every token pays the hash again.

Embeddings always hash in their kernel (a step reads only the factor rows of its tokens),
and the update hashes each matrix's factors once, just before its GEMM. Vector noise is made
on the device and copied to the host, where ``Ops`` perturbs the vectors.

The Backend interface takes and returns numpy arrays, so through it activations cross the bus
once per op (and the elementwise ops between layers run on the host, in the cpu backend's
numba kernels: ``ew``). The Engine does not score members that way: ``CudaBackend.score``
runs the model's ``forward`` on ``DeviceOps``, whose linear layers, embedding and
elementwise ops (the CUDA C kernels) take and return device arrays, so
activations and recurrent state stay in device memory; the windows go up once, and only the
summed log-likelihoods come back. Through the Engine on an H200, before
scoring moved onto the device, the ES step ran at a tenth of the cpu backend's speed on two
cores (``benchmarks/results/gpu_cli_bench_rwkv_n1024_h200.json``). That is why
``--backend auto`` prefers the cpu backend (``intes.kernels.AUTO_ORDER``) and takes this one
only where that one fails to import, until a GPU run measures the device scoring.
``benchmarks/bench_gpu.py`` times the device kernels on a model of its own.

Nothing here imports torch, triton or cupy at module import: ``unavailable_reason()`` says
in one line why the backend cannot run, and ``CudaBackend(device="cpu",
kernels=emulated_kernels())`` runs the same code on a CPU (Triton's interpreter, a g++ build of
the CUDA source) for tests.
"""

from __future__ import annotations

import functools
import importlib.util
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from intes import noise as nz
from intes.kernels.base import LowRank

NOISE_MODES = ("cached", "kernel")
_REQUIREMENTS = (("torch", "torch"), ("triton", "triton"), ("cupy", "cupy-cuda12x"))
# Dense int8 tensor-core TOPS from NVIDIA's data sheets (the sparse figures halved), matched
# against the device name in order: int8 ES uses no 2:4 sparsity.
PEAK_INT8_TOPS = (("H100 PCIe", 1513.0), ("H100 NVL", 1670.5), ("H200 NVL", 1670.5),
                  ("H100", 1979.0), ("H200", 1979.0), ("A100", 624.0), ("L40S", 733.0))


def peak_int8_tops(device_name: str) -> float | None:
    """The dense int8 tensor-core peak of a GPU by its name, None where the table lacks it."""
    return next((tops for name, tops in PEAK_INT8_TOPS if name in device_name), None)


@functools.cache
def unavailable_reason() -> str | None:
    """None if the cuda backend can run here, else one line saying why not. Never raises."""
    try:
        return _probe()
    except Exception as err:  # a broken install must read as "unavailable", not crash
        text = str(err).strip().splitlines()
        return f"cuda backend unavailable: {type(err).__name__}: {text[0] if text else ''}"


def _probe() -> str | None:
    for module, package in _REQUIREMENTS:  # cheap checks first: no import yet
        if importlib.util.find_spec(module) is None:
            return f"cuda backend unavailable: {module} not installed (pip install {package})"
    import torch

    if not torch.cuda.is_available():
        return "cuda backend unavailable: no CUDA GPU (torch.cuda.is_available() is False)"
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 1:
        return "cuda backend unavailable: cupy sees no CUDA device"
    return None


def device_kernels() -> Any:
    """The CuPy kernels, allocating from torch's caching allocator.

    One memory pool for both libraries, so neither hoards memory the other needs; this is
    process-wide (CuPy has one allocator), and set by every CudaBackend on a GPU.
    """
    import cupy
    import torch

    from intes.kernels.cupy import cupy_kernels

    def allocate(size: int) -> cupy.cuda.MemoryPointer:
        block = torch.empty(size, dtype=torch.uint8, device="cuda")
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(block.data_ptr(), size, block), 0)

    cupy.cuda.set_allocator(allocate)
    return cupy_kernels()


def host_elementwise() -> Any:
    """The model's elementwise ops on the host: the cpu backend's numba kernels, else intmath."""
    try:
        from intes.kernels.cpu_elementwise import CpuElementwise
    except ImportError:
        from intes import intmath
        return intmath
    return CpuElementwise


@dataclass(frozen=True, eq=False)
class KeyedFactor:
    """One low-rank factor (P, n, r) known only by its pairs' stream keys.

    A LowRank holds two over the same keys, as ``intes.noise.lowrank_factors`` splits a
    pair's stream: A (out, r) is values 0 .. out * r - 1, B (in, r) the in * r values after.
    """

    keys: Any  # torch int32 (P,) on the device: the bits of the uint32 keys
    n: int
    rank: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.keys), self.n, self.rank


class CudaNoise:
    """``intes.noise``'s generators for one CudaBackend: same bits, made on the device."""

    def __init__(self, backend: CudaBackend):
        self._backend = backend

    def lowrank_factors(self, seed: int, step: int, pairs: np.ndarray, tensor_id: int,
                        rows: int, cols: int, rank: int) -> tuple[KeyedFactor, KeyedFactor]:
        keys = self._backend.device_keys(seed, step, pairs, tensor_id)
        return KeyedFactor(keys, rows, rank), KeyedFactor(keys, cols, rank)

    def vector_noise(self, seed: int, step: int, pairs: np.ndarray, tensor_id: int,
                     size: int) -> np.ndarray:
        be = self._backend
        keys = be.device_keys(seed, step, pairs, tensor_id)
        return be.host(be.kernels.noise_values(be.xp(keys), size))


class CudaBackend:
    """Backend on one CUDA device (or, for tests, on the CPU with interpreted kernels)."""

    name = "cuda"

    def __init__(self, noise_mode: str = "cached", device: str = "cuda", kernels: Any = None):
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        import torch

        from intes.kernels import triton as tk

        self._torch, self._tk = torch, tk
        self.noise_mode = noise_mode
        self.device = torch.device(device)
        self.kernels = kernels if kernels is not None else device_kernels()
        self.noise_source = CudaNoise(self)
        self.ew = host_elementwise()
        self._cached: dict[int, Any] = {}  # id(KeyedFactor A) -> its DeviceNoise, see _noise

    def accelerator(self) -> dict[str, Any]:
        """The device's name and dense int8 peak (TOPS), for benchmark records."""
        if self.device.type != "cuda":
            return {"name": f"{self.device.type} (emulated kernels)", "peak_int8_tops": None}
        name = self._torch.cuda.get_device_name(self.device)
        return {"name": name, "peak_int8_tops": peak_int8_tops(name)}

    # -------------------------------------------------------------- moving arrays

    def to_device(self, a: np.ndarray, dtype: type = np.int8) -> Any:
        """A torch tensor on the device holding a (C-contiguous, this dtype)."""
        host = np.require(a, dtype=dtype, requirements=("C", "W"))
        return self._torch.from_numpy(host).to(self.device)

    def host(self, t: Any) -> np.ndarray:
        """A numpy copy of a torch tensor or a kernels array (DLPack, then one copy)."""
        if not isinstance(t, self._torch.Tensor):
            t = self._torch.from_dlpack(t)
        return t.cpu().numpy()

    def xp(self, t: Any) -> Any:
        """The kernels' array (cupy; numpy when emulated) viewing the same memory as t."""
        return self.kernels.xp.from_dlpack(t)

    def tensor(self, arr: Any) -> Any:
        """The torch tensor viewing the same memory as a kernels array."""
        return self._torch.from_dlpack(arr)

    def device_keys(self, seed: int, step: int, pairs: np.ndarray, tensor_id: int) -> Any:
        """intes.noise.stream_key as int32 bits on the device."""
        return self.to_device(nz.stream_key(seed, step, pairs, tensor_id).view(np.int32),
                              np.int32)

    # -------------------------------------------------------------- noise forms

    def _factor(self, f: Any) -> Any:
        return f if isinstance(f, self._torch.Tensor) else self.to_device(f)

    def _hashed(self, noise: LowRank) -> tuple[Any, Any]:
        """Device factors (a, b) of keyed noise, hashed now (views of one buffer)."""
        a, b = noise.a, noise.b
        vals = self.kernels.lowrank_factors(self.xp(a.keys), a.n, b.n, a.rank)
        return self.tensor(vals[0]), self.tensor(vals[1])

    def _noise(self, noise: LowRank | None, n_out: int) -> Any:
        """The DeviceNoise the linear kernels read: keys, cached device factors, or uploads.

        Host factors (an explicit ``LowRank(a, b)`` of numpy arrays, as tests make) are
        uploaded at every call; the Engine's noise comes from ``noise_source`` and never is.
        """
        tk = self._tk
        if noise is None:
            return None
        a = noise.a
        if not isinstance(a, KeyedFactor):
            return tk.DeviceNoise(a.shape[2], a=self._factor(a), b=self._factor(noise.b))
        if a.n != n_out:
            raise ValueError(f"noise made for {a.n} outputs used for {n_out}")
        if self.noise_mode == "kernel":
            return tk.DeviceNoise(a.rank, keys=a.keys)
        if id(a) not in self._cached:  # one hash per chunk and tensor, dropped with the noise
            fa, fb = self._hashed(noise)
            self._cached[id(a)] = tk.DeviceNoise(a.rank, a=fa, b=fb)
            weakref.finalize(a, self._cached.pop, id(a), None)
        return self._cached[id(a)]

    def _loaded(self, noise: LowRank) -> tuple[Any, Any]:
        """Device factors for the update: keyed noise is hashed once, just for this GEMM."""
        if isinstance(noise.a, KeyedFactor):
            return self._hashed(noise)
        return self._factor(noise.a), self._factor(noise.b)

    # -------------------------------------------------------------- the Backend interface

    def prepare(self, w: np.ndarray) -> Any:
        return self.to_device(w)

    def linear(self, x, w, shift, noise, sigma_shift):
        return self.host(self.device_linear(self.xp(self.to_device(x)), w, shift, noise,
                                            sigma_shift))

    def embed(self, table, tokens, noise, sigma_shift):
        return self.host(self.device_embed(self.xp(self.to_device(table)), self._tokens(tokens),
                                           noise, sigma_shift))

    def log_likelihood(self, logits, targets):
        return self.host(self.device_log_likelihood(self.xp(self.to_device(logits)),
                                                    self._tokens(targets)))

    def update_matrix(self, w, noise, fitness, threshold):
        a, b = self._loaded(noise)
        out = self._tk.update_matrix(self.to_device(w), a, b, self.to_device(fitness, np.int32),
                                     int(threshold))
        return self.host(out)

    def update_vector(self, v, noise, fitness, threshold):
        k = self.kernels
        out = k.update_vector(self.xp(self.to_device(v)), self.xp(self.to_device(noise)),
                              self.xp(self.to_device(fitness, np.int32)), int(threshold))
        return self.host(out)

    # -------------------------------------------------------------- on device arrays

    def device_linear(self, x: Any, w: Any, shift: int, noise: LowRank | None,
                      sigma_shift: int) -> Any:
        """``linear`` of a kernels array x, as a kernels array: nothing crosses the bus."""
        out = self._tk.linear(self.tensor(x), w, shift, self._noise(noise, w.shape[0]),
                              sigma_shift)
        return self.xp(out)

    def device_embed(self, table: Any, tokens: Any, noise: LowRank | None,
                     sigma_shift: int) -> Any:
        """``embed`` of a table and tokens in device memory (kernels arrays), as one."""
        kw: dict[str, Any] = {}
        if noise is not None:
            pairs, rows, rank = noise.a.shape
            if 2 * pairs != len(tokens) or rows != len(table):
                raise ValueError(f"noise of {pairs} pairs x {rows} rows used for "
                                 f"{len(tokens)} tokens of a {len(table)}-row table")
            if isinstance(noise.a, KeyedFactor):
                kw = {"keys": self.xp(noise.a.keys), "rank": rank}
            else:
                kw = {"factors": (self.xp(self._factor(noise.a)), self.xp(self._factor(noise.b)))}
        return self.kernels.embed(table, tokens, sigma_shift, **kw)

    def device_log_likelihood(self, logits: Any, targets: Any) -> Any:
        """``log_likelihood`` of logits and targets in device memory, as a kernels array."""
        return self.kernels.log_likelihood(logits, targets)

    def _tokens(self, tokens: np.ndarray) -> Any:
        return self.xp(self.to_device(tokens, np.int32))

    def score(self, model: Any, ops: Any, windows: np.ndarray) -> np.ndarray:
        """``intes.engine.score`` with activations and state in device memory.

        One token at a time; the windows go up once, and only the summed log-likelihoods come
        back. The bits are the reference's: every op matches intmath's.
        """
        dev = DeviceOps(self, ops)
        xp = self.kernels.xp
        rows, length = windows.shape
        on_device = self.xp(self.to_device(windows, np.int32))  # one upload per call
        state = {name: xp.asarray(a) for name, a in model.init_state(rows).items()}
        total = xp.zeros(rows, dtype=xp.int32)
        for t in range(length - 1):
            cleared = np.flatnonzero(windows[:, t] == 0)  # a document starts: state reset
            if len(cleared):
                cleared = xp.asarray(cleared)
                for arr in state.values():
                    arr[cleared] = 0
            logits, state = model.forward(dev, on_device[:, t], state)
            total += dev.log_likelihood(logits, on_device[:, t + 1])  # int32 wraps as numpy's
        return self.host(total)


class DeviceOps:
    """What a model's ``forward`` calls (``intes.models.base.Ops``) with activations in device
    memory: the host Ops' weights, noise and member vectors, the vectors uploaded once. Its
    elementwise ops (``ew``) are the CUDA C kernels themselves, which take intmath's names."""

    def __init__(self, backend: CudaBackend, ops: Any):
        self.backend, self.ops = backend, ops
        self.ew = backend.kernels
        self.vectors = {name: backend.kernels.xp.asarray(v) for name, v in ops.vectors.items()}
        self._tables: dict[str, Any] = {}

    def linear(self, name: str, x: Any, activation: str | None = None,
               residual: Any = None) -> Any:
        """``Ops.linear`` on device arrays: the layer, then the kernels' ``activation`` or
        sat_add(residual, output), if given."""
        if activation is not None and residual is not None:
            raise ValueError("an activation or a residual, not both")
        o = self.ops
        out = self.backend.device_linear(x, o.prepared[name], o.shifts[name],
                                         o.noise.get(name), o.sigma_shift)
        if activation is not None:
            return getattr(self.ew, activation)(out)
        return out if residual is None else self.ew.sat_add(residual, out)

    def embed(self, name: str, tokens: Any) -> Any:
        if name not in self._tables:  # once per score call: the weights are fixed during it
            self._tables[name] = self.backend.xp(self.backend.to_device(self.ops.params[name]))
        return self.backend.device_embed(self._tables[name], tokens, self.ops.noise.get(name),
                                         self.ops.sigma_shift)

    def vec(self, name: str) -> Any:
        return self.vectors[name]

    def log_likelihood(self, logits: Any, targets: Any) -> Any:
        return self.backend.device_log_likelihood(logits, targets)
