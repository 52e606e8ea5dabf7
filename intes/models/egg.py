"""The EGGROLL paper's int8 minGRU language model ("EGG"), for like-for-like comparison.

Per layer and token: integer layer norm -> GRU-like cell whose gate and candidate are plain
saturating sums of int8 products (saturation is the nonlinearity, as in the paper) ->
clipped residual -> norm -> ReLU MLP (4x) -> clipped residual. State: one int8 vector per layer.

``forward_block`` is the same function over a block of T tokens: the input projections and
the MLP run once over T x N rows; only the recurrent products (uf, uh) go token by token.
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
            hs = np.empty_like(x)
            for t in range(len(tokens)):
                if resets is not None and resets[t].any():
                    h = np.where(resets[t][:, None], np.int8(0), h)
                f = ew.sat_add(fx[t], ops.linear(p + "gru.uf", h), ops.vec(p + "gru.bf"))
                gated = ew.gru_blend(np.zeros_like(h), f, h)
                cand = ew.sat_add(hx[t], ops.linear(p + "gru.uh", gated), ops.vec(p + "gru.bh"))
                h = hs[t] = ew.gru_blend(h, f, cand)
            state[f"{i}.h"] = h
            x = ew.sat_add(x, hs)
            xn = ew.norm(x, ops.vec(p + "ln2"))
            x = ew.sat_add(x, ops.linear(p + "mlp.w2", ew.relu(ops.linear(p + "mlp.w1", xn))))
        return ops.linear("head", ew.norm(x, ops.vec("ln_out"))), state
