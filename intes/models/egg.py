"""The EGGROLL paper's int8 minGRU language model ("EGG"), for like-for-like comparison.

Per layer and token: integer layer norm -> GRU-like cell whose gate and candidate are plain
saturating sums of int8 products (saturation is the nonlinearity, as in the paper) ->
clipped residual -> norm -> ReLU MLP (4x) -> clipped residual. State: one int8 vector per layer.

``forward_block`` is the same function over a block of T tokens: the input projections and
the MLP run once over T x N rows; only the recurrent products (uf, uh) go token by token,
in one backend call per layer where the backend fuses the recurrence (``gru_scan``).
"""

from __future__ import annotations

import numpy as np

from intes.models.base import IntLM, Ops, ParamSpec


class EGG(IntLM):
    kind = "egg"

    def block_specs(self, p: str) -> list[ParamSpec]:
        d, h = self.dim, self.hidden
        return [
            ParamSpec(p + "ln1", (d,), "vector", 16),
            ParamSpec(p + "gru.wf", (d, d), "matrix"),
            ParamSpec(p + "gru.uf", (d, d), "matrix"),
            ParamSpec(p + "gru.bf", (d,), "vector", 0),
            ParamSpec(p + "gru.wh", (d, d), "matrix"),
            ParamSpec(p + "gru.uh", (d, d), "matrix"),
            ParamSpec(p + "gru.bh", (d,), "vector", 0),
            ParamSpec(p + "ln2", (d,), "vector", 16),
            ParamSpec(p + "mlp.w1", (h, d), "matrix"),
            ParamSpec(p + "mlp.w2", (d, h), "matrix"),
        ]

    def init_state(self, rows: int) -> dict[str, np.ndarray]:
        return {f"{i}.h": np.zeros((rows, self.dim), dtype=np.int8) for i in range(self.layers)}

    def forward(self, ops: Ops, tokens: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        """Logits (rows, vocab) int8 in 1/16 bit for one token per row; updates state."""
        ew = ops.ew  # the backend's elementwise ops (intmath's, fused where it has them)
        x = ops.embed("emb", tokens)
        for i in range(self.layers):
            p, h = f"blocks.{i}.", state[f"{i}.h"]
            xn = ew.norm(x, ops.vec(p + "ln1"))
            f = ew.sat_add(ops.linear(p + "gru.wf", xn), ops.linear(p + "gru.uf", h),
                           ops.vec(p + "gru.bf"))
            gated = ew.gru_blend(np.zeros_like(h), f, h)  # (f + 127) / 256 * h
            cand = ew.sat_add(ops.linear(p + "gru.wh", xn), ops.linear(p + "gru.uh", gated),
                              ops.vec(p + "gru.bh"))
            h = ew.gru_blend(h, f, cand)
            state[f"{i}.h"] = h
            x = ew.sat_add(x, h)
            xn = ew.norm(x, ops.vec(p + "ln2"))
            x = ew.sat_add(x, ops.linear(p + "mlp.w2", ew.relu(ops.linear(p + "mlp.w1", xn))))
        return ops.linear("head", ew.norm(x, ops.vec("ln_out"))), state

    def forward_block(self, ops: Ops, tokens: np.ndarray, resets: np.ndarray | None,
                      state: dict) -> tuple[np.ndarray, dict]:
        ew = ops.ew
        x = ops.embed("emb", tokens)
        for i in range(self.layers):
            p, h = f"blocks.{i}.", state[f"{i}.h"]
            xn = ew.norm(x, ops.vec(p + "ln1"))
            fx, hx = ops.linear(p + "gru.wf", xn), ops.linear(p + "gru.wh", xn)
            hs, state[f"{i}.h"] = gru_scan(ops, p, fx, hx, h, resets)
            x = ew.sat_add(x, hs)
            xn = ew.norm(x, ops.vec(p + "ln2"))
            hidden = ops.linear(p + "mlp.w1", xn, activation="relu")
            x = ops.linear(p + "mlp.w2", hidden, residual=x)
        return ops.linear("head", ew.norm(x, ops.vec("ln_out"))), state


def gru_scan(ops: Ops, p: str, fx: np.ndarray, hx: np.ndarray, h: np.ndarray,
             resets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Layer p's recurrence over a token block: the states after each token (T, rows, d) and
    the last. One call where the backend fuses it (``gru_scan``: the cpu backend's VNNI
    engine), else token by token, ``forward``'s cell; the same bits either way."""
    fused = getattr(ops.backend, "gru_scan", None)
    if fused is not None:
        done = fused(fx, hx, h, resets, ops.layer(p + "gru.uf"), ops.layer(p + "gru.uh"),
                     ops.vec(p + "gru.bf"), ops.vec(p + "gru.bh"), ops.sigma_shift)
        if done is not None:
            return done
    ew, hs = ops.ew, np.empty_like(fx)
    for t in range(len(fx)):
        if resets is not None and resets[t].any():
            h = np.where(resets[t][:, None], np.int8(0), h)
        f = ew.sat_add(fx[t], ops.linear(p + "gru.uf", h), ops.vec(p + "gru.bf"))
        gated = ew.gru_blend(np.zeros_like(h), f, h)
        cand = ew.sat_add(hx[t], ops.linear(p + "gru.uh", gated), ops.vec(p + "gru.bh"))
        h = hs[t] = ew.gru_blend(h, f, cand)
    return hs, h
