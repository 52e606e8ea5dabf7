"""Evolution strategies over integer weights: fitness shaping, z-test thresholds, tell (update).

The update never stores noise, gradients or optimizer state: it regenerates every pair's
factors from (seed, step, pair, tensor) and reduces them with the shaped integer fitness,
Z = sum_p f_p A_p B_p^T, then moves each weight by +-1 where |Z| passes a z-test threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, localcontext
from fractions import Fraction

import numpy as np

from intes.errors import ConfigError, check_integers, plain_integers
from intes.intmath import QUANTILE_PREC, exact_context, normal_quantile
from intes.kernels.base import Backend
from intes.models.base import ParamSpec, make_noise
from intes.noise import NOISE_MAX, NOISE_VARIANCE_X2_32

FITNESS_KINDS = ("sign", "normalized")
NORMALIZED_MAX = 15  # |f| bound of the normalized shaping, used in the update's int32 bound


@dataclass(frozen=True)
class ESConfig:
    """Everything that defines the ES search; saved in checkpoints and checked on resume."""

    population: int = 8192  # N, even: pairs (2p, 2p+1) share noise with opposite sign
    group_size: int = 2  # members that read the same sequence (even; 2: a pair per window)
    rank: int = 1  # r of each perturbation A B^T
    sigma_shift: int = 3  # noise scale 2^-sigma_shift beyond the x16 fixed point
    noise_reuse: int = 1  # redraw noise every k steps
    fitness: str = "normalized"  # pair shaping: sign of the difference, or normalized integer
    alpha_final_log2: int = 4  # update fraction decays from 1 to 2^-this ...
    alpha_steps: int = 4000  # ... over this many steps

    def __post_init__(self) -> None:
        plain_integers(self)

    def validate(self) -> None:
        check_integers(population=self.population, group_size=self.group_size, rank=self.rank,
                       sigma_shift=self.sigma_shift, noise_reuse=self.noise_reuse,
                       alpha_final_log2=self.alpha_final_log2, alpha_steps=self.alpha_steps)
        n, g = self.population, self.group_size
        if n < 2 or n % 2:
            raise ConfigError(f"population must be a positive even number, got {n}")
        if g < 2 or g % 2 or n % g:
            raise ConfigError(f"group size must be even and divide the population ({n}), got {g}")
        if not 1 <= self.rank <= 16:
            raise ConfigError(f"rank must be in 1..16, got {self.rank}")
        if not 0 <= self.sigma_shift <= 12:
            raise ConfigError(f"sigma shift must be in 0..12, got {self.sigma_shift}")
        if self.noise_reuse < 1:
            raise ConfigError(f"noise reuse must be >= 1, got {self.noise_reuse}")
        if self.alpha_steps < 1:
            raise ConfigError(f"alpha steps must be >= 1, got {self.alpha_steps}")
        if not 0 <= self.alpha_final_log2 <= 16:
            raise ConfigError(f"alpha final log2 must be in 0..16, got {self.alpha_final_log2}")
        if not isinstance(self.fitness, str) or self.fitness not in FITNESS_KINDS:
            raise ConfigError(f"fitness must be one of {FITNESS_KINDS}, got {self.fitness!r}")
        fmax = 1 if self.fitness == "sign" else NORMALIZED_MAX
        # |Z| <= (N/2) * fmax * r * NOISE_MAX^2 must fit int32.
        if (n // 2) * fmax * self.rank * NOISE_MAX**2 >= 2**31:
            raise ConfigError(f"population x rank too large for int32 updates ({n} x {self.rank})")

    def describe(self) -> str:
        """Every setting on one line, named like its ``pretrain`` flag (run header, ``info``)."""
        return (f"population {self.population}, group size {self.group_size}, rank {self.rank}, "
                f"sigma shift {self.sigma_shift}, noise reuse {self.noise_reuse}, fitness "
                f"{self.fitness}, alpha 1 -> 2^-{self.alpha_final_log2} over "
                f"{self.alpha_steps} steps")

    @property
    def pairs(self) -> int:
        return self.population // 2


def shape_fitness(raw: np.ndarray, kind: str = "sign") -> np.ndarray:
    """Per-pair integer fitness f_p from member fitness (rows 2p, 2p+1): int32 (P,)."""
    diff = raw[0::2].astype(np.int64) - raw[1::2].astype(np.int64)
    if kind == "sign":
        return np.sign(diff).astype(np.int32)
    scale = max(int(np.abs(diff).sum()) // len(diff), 1)  # mean |difference|
    mag = np.minimum((np.abs(diff) * 4 + scale // 2) // scale, NORMALIZED_MAX)  # 4 = one mean
    return (np.sign(diff) * mag).astype(np.int32)


def alpha(step: int, cfg: ESConfig) -> Fraction:
    """Share of weights allowed to move (the z-test's alpha), exactly: 1 / ((2^k - 1) * progress
    + 1) with progress = min(step / alpha_steps, 1), from 1 down to 2^-alpha_final_log2."""
    done = min(step, cfg.alpha_steps)
    return Fraction(cfg.alpha_steps,
                    ((1 << cfg.alpha_final_log2) - 1) * done + cfg.alpha_steps)


def thresholds(step: int, fitness: np.ndarray, cfg: ESConfig) -> tuple[int, int]:
    """Integer |Z| thresholds (matrices, vectors) of a two-sided z-test at this step's alpha.

    Under the null (fitness independent of noise) Z_ij has variance sum(f^2) * r * E[v^2]^2
    for low-rank tensors and sum(f^2) * E[v^2] for vectors; E[v^2] is the noise's exact
    second moment. Computed in decimal software arithmetic from exact alpha, like the lookup
    tables, so that every machine gets the same integers (no libm float in the update).
    """
    a = alpha(step, cfg)
    if a == 1:
        return 0, 0
    z = normal_quantile(1 - a / 2)
    sumsq = int(np.sum(fitness.astype(np.int64) ** 2))
    with localcontext(exact_context(QUANTILE_PREC)):
        var = Decimal(NOISE_VARIANCE_X2_32) / (1 << 32)
        matrix = z * Decimal(sumsq * cfg.rank).sqrt() * var
        vector = z * (sumsq * var).sqrt()
        return (int(matrix.to_integral_value(ROUND_FLOOR)),
                int(vector.to_integral_value(ROUND_FLOOR)))


def tell(backend: Backend, specs: list[ParamSpec], params: dict[str, np.ndarray], seed: int,
         step: int, fitness: np.ndarray, cfg: ESConfig,
         map_fn: Callable[[Callable, Iterable], list] | None = None,
         parts: int = 1,
         on_update: Callable[[ParamSpec, np.ndarray], None] | None = None
         ) -> dict[str, np.ndarray]:
    """New weights from (seed, step, shaped fitness) alone: noise is regenerated, not stored.

    Tensors are independent, so ``map_fn`` (like ``map``, returning a list) may update them
    concurrently, in ``parts`` groups of near-equal work (one task per thread: a task per
    tensor would pay a thread handoff per tensor, most of them small), balanced on
    ``update_cost``; each regenerates its own noise. The vectors go as one item with their
    noise made in one call: 17 small tensors in a 2-layer model, whose Python per call the
    threads took in turn under the GIL. ``on_update(spec, new)`` runs in the same task right
    after each tensor's update, while the new weights are in cache (the engine packs them
    there for the next forward, not in a pass of its own).
    """
    thr_matrix, thr_vector = thresholds(step, fitness, cfg)
    pairs = np.arange(len(fitness))

    def update(ids: list[int]) -> list[tuple[int, np.ndarray]]:
        """A work item: one matrix, or every vector at once (their noise in one call)."""
        noises = make_noise([specs[i] for i in ids], seed, step, pairs, cfg.rank,
                            cfg.noise_reuse, backend, ids)
        done = []
        for i in ids:
            s = specs[i]
            if s.kind == "vector":
                new = backend.update_vector(params[s.name], noises[s.name], fitness, thr_vector)
            else:
                new = backend.update_matrix(params[s.name], noises[s.name], fitness, thr_matrix)
            if on_update is not None:
                on_update(s, new)
            done.append((i, new))
        return done

    vectors = [i for i, s in enumerate(specs) if s.kind == "vector"]
    items = [[i] for i, s in enumerate(specs) if s.kind != "vector"] + [vectors] * bool(vectors)
    groups = balanced_groups([sum(update_cost(specs[i], cfg.rank) for i in item)
                              for item in items], parts)
    done = (map_fn or _serial_map)(
        lambda group: [pair for k in group for pair in update(items[k])], groups)
    new = dict(pair for group in done for pair in group)
    return {s.name: new[i] for i, s in enumerate(specs)}


# One noise value costs about as much as this many of the update's multiply-adds: an estimate
# for balancing only (the bits do not depend on it), from the cpu backend's update timed
# inside tell on the Zen 4 host, rank 1, width 256: 2.2 M vector noise values in 0.6 ms, a
# 256 x 256 update over 512 pairs, 33.5 M multiply-adds, in 0.25 ms.
NOISE_COST = 32


def update_cost(spec: ParamSpec, rank: int) -> int:
    """A tensor's update work per pair, in multiply-adds: its sum over the pairs plus its
    regenerated noise. Vectors draw a noise value per element, so theirs dominates."""
    if spec.kind == "vector":
        return spec.shape[0] * (1 + NOISE_COST)
    rows, cols = spec.shape
    return rank * (rows * cols + NOISE_COST * (rows + cols))


def balanced_groups(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices of ``sizes`` in at most ``parts`` non-empty groups of near-equal total size
    (largest first, each to the lightest group)."""
    groups: list[list[int]] = [[] for _ in range(max(1, min(parts, len(sizes))))]
    loads = [0] * len(groups)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        lightest = loads.index(min(loads))
        groups[lightest].append(i)
        loads[lightest] += sizes[i]
    return [g for g in groups if g]


def _serial_map(fn: Callable, items: Iterable) -> list:
    return [fn(item) for item in items]
