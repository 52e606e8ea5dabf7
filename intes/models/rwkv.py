"""Integer RWKV-style LM: token shift, decaying WKV time mixing, squared-ReLU channel mixing.

Per layer and token: x (int8) -> norm -> learned per-channel token shift -> k, v, r (int8)
-> WKV recurrence (int32 numerator/denominator, per-channel learned decay) gated by
sigmoid(r) -> output projection -> saturating residual; then channel mixing: token shift ->
relu(k)^2 -> value projection gated by sigmoid(r) -> saturating residual.
State per layer: the previous token's normed input for each mixer (int8) and num/den (int32).

``forward_block`` is the same function over a block of T tokens at once, layer by layer: only
the WKV recurrence runs token by token, so every linear layer is one product over T x N rows
(its weights and each member's noise factors read once per block, not once per token).
"""

from __future__ import annotations

import numpy as np

from intes.models.base import IntLM, Ops, ParamSpec


class RWKV(IntLM):
    kind = "rwkv"

    def block_specs(self, p: str) -> list[ParamSpec]:
        d, h = self.dim, self.hidden
        return [
            ParamSpec(p + "ln1", (d,), "vector", 16),
            ParamSpec(p + "att.mix_k", (d,), "vector", (16, 112)),
            ParamSpec(p + "att.mix_v", (d,), "vector", (8, 96)),
            ParamSpec(p + "att.mix_r", (d,), "vector", (32, 64)),
            ParamSpec(p + "att.decay", (d,), "vector", (-64, 126)),
            ParamSpec(p + "att.wk", (d, d), "matrix"),
            ParamSpec(p + "att.wv", (d, d), "matrix"),
            ParamSpec(p + "att.wr", (d, d), "matrix"),
            ParamSpec(p + "att.wo", (d, d), "matrix"),
            ParamSpec(p + "ln2", (d,), "vector", 16),
            ParamSpec(p + "ffn.mix_k", (d,), "vector", (16, 112)),
            ParamSpec(p + "ffn.mix_r", (d,), "vector", (16, 112)),
            ParamSpec(p + "ffn.wk", (h, d), "matrix"),
            ParamSpec(p + "ffn.wv", (d, h), "matrix"),
            ParamSpec(p + "ffn.wr", (d, d), "matrix"),
        ]

    def init_state(self, rows: int) -> dict[str, np.ndarray]:
        state = {}
        for i in range(self.layers):
            for name, dtype in (("att_prev", np.int8), ("ffn_prev", np.int8),
                                ("num", np.int32), ("den", np.int32)):
                state[f"{i}.{name}"] = np.zeros((rows, self.dim), dtype=dtype)
        return state

    def forward(self, ops: Ops, tokens: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        """Logits (rows, vocab) int8 in 1/16 bit for one token per row; updates state."""
        ew = ops.ew  # the backend's elementwise ops (intmath's, fused where it has them)
        x = ops.embed("emb", tokens)
        for i in range(self.layers):
            p, s = f"blocks.{i}.", f"{i}."
            xn = ew.norm(x, ops.vec(p + "ln1"))
            prev = state[s + "att_prev"]
            k = ops.linear(p + "att.wk", ew.token_mix(xn, prev, ops.vec(p + "att.mix_k")))
            v = ops.linear(p + "att.wv", ew.token_mix(xn, prev, ops.vec(p + "att.mix_v")))
            r = ops.linear(p + "att.wr", ew.token_mix(xn, prev, ops.vec(p + "att.mix_r")))
            wkv, state[s + "num"], state[s + "den"] = ew.wkv_step(
                state[s + "num"], state[s + "den"], k, v, ops.vec(p + "att.decay"))
            state[s + "att_prev"] = xn
            att = ops.linear(p + "att.wo", ew.sigmoid_gate(r, wkv))
            x = ew.sat_add(x, att)

            xn = ew.norm(x, ops.vec(p + "ln2"))
            prev = state[s + "ffn_prev"]
            k = ops.linear(p + "ffn.wk", ew.token_mix(xn, prev, ops.vec(p + "ffn.mix_k")))
            kk = ew.relu_sq(k)
            r = ops.linear(p + "ffn.wr", ew.token_mix(xn, prev, ops.vec(p + "ffn.mix_r")))
            state[s + "ffn_prev"] = xn
            ffn = ew.sigmoid_gate(r, ops.linear(p + "ffn.wv", kk))
            x = ew.sat_add(x, ffn)
        return ops.linear("head", ew.norm(x, ops.vec("ln_out"))), state

    def forward_block(self, ops: Ops, tokens: np.ndarray, resets: np.ndarray | None,
                      state: dict) -> tuple[np.ndarray, dict]:
        ew = ops.ew
        x = ops.embed("emb", tokens)
        for i in range(self.layers):
            p, s = f"blocks.{i}.", f"{i}."
            xn = ew.norm(x, ops.vec(p + "ln1"))
            xk, xv, xr = ew.token_mixes(xn, state[s + "att_prev"], resets,
                                        tuple(ops.vec(p + f"att.mix_{c}") for c in "kvr"))
            k = ops.linear(p + "att.wk", xk)
            v = ops.linear(p + "att.wv", xv)
            r = ops.linear(p + "att.wr", xr)
            wkv, state[s + "num"], state[s + "den"] = ew.wkv_scan(
                state[s + "num"], state[s + "den"], k, v, ops.vec(p + "att.decay"), resets)
            state[s + "att_prev"] = xn[-1].copy()
            x = ops.linear(p + "att.wo", ew.sigmoid_gate(r, wkv), residual=x)

            xn = ew.norm(x, ops.vec(p + "ln2"))
            xk, xr = ew.token_mixes(xn, state[s + "ffn_prev"], resets,
                                    (ops.vec(p + "ffn.mix_k"), ops.vec(p + "ffn.mix_r")))
            kk = ops.linear(p + "ffn.wk", xk, activation="relu_sq")
            r = ops.linear(p + "ffn.wr", xr)
            state[s + "ffn_prev"] = xn[-1].copy()
            ffn = ew.sigmoid_gate(r, ops.linear(p + "ffn.wv", kk))
            x = ew.sat_add(x, ffn)
        return ops.linear("head", ew.norm(x, ops.vec("ln_out"))), state
