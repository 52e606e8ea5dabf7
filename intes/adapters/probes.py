"""How a Hugging Face model's ``generate()`` treats a batch, probed on the base model.

The adapter puts every member's rows in one batch and left-pads prompts of other lengths.
That is right only where a row's tokens depend on that row alone and a masked pad changes
nothing. Most causal LMs satisfy both. HF's RWKV breaks both: its forward ignores the attention
mask, so it reads its pads as tokens, and in transformers 5 its one-token steps with the cache
broadcast a batch's rows into each other. Each probe is a short greedy ``generate()`` of one
prompt beside another row or pad, compared with the same prompt beside another.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import GenerationConfig

CLOSE_SHARE = 1e-2  # "about the same" logits: within this share of their largest magnitude
PAD_SHARE = 1e-4  # pads read as tokens move logits by percents (HF's RWKV by over 100%); MoE
# layers that group a batch's tokens per expert move them by float rounding, under 1e-6


def _vocab(model: nn.Module) -> int:
    """Rows of the input embedding: the ids a probe may feed."""
    return model.get_input_embeddings().weight.shape[0]


@contextmanager
def decoding(model: nn.Module, config: GenerationConfig) -> Iterator[None]:
    """generate() fills the fields its config leaves unset from the model's generation_config
    (beams, penalties, extra sequences, stops): ``config`` stands in for it meanwhile."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def new_token_logits(model: nn.Module, config: GenerationConfig, ids: torch.Tensor,
                     mask: torch.Tensor | None = None, tokens: int = 1) -> torch.Tensor:
    """Float32 logits (tokens, rows, vocab) of the first new tokens greedy decoding makes."""
    probe = copy.deepcopy(config)
    probe.update(max_new_tokens=tokens, min_new_tokens=tokens, output_logits=True,
                 return_dict_in_generate=True)
    mask = torch.ones_like(ids) if mask is None else mask
    with decoding(model, probe):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=probe)
    return torch.stack(out.logits).float()


def about_equal(a: torch.Tensor, b: torch.Tensor, share: float = CLOSE_SHARE) -> bool:
    """Within ``share`` of the larger finite magnitude: float kernels may sum a batch in another
    order than one row, which moves the bits, not the meaning. Infinities and NaNs must match
    (a logit masked to -inf on both sides is the same logit)."""
    same = (a == b) | (a.isnan() & b.isnan())
    finite = a.isfinite() & b.isfinite()
    if not bool((same | finite).all()):
        return False
    if bool(same.all()):
        return True
    scale = max(float(a[finite].abs().max()), float(b[finite].abs().max()), 1e-6)
    return bool((a - b)[finite].abs().max() <= share * scale)


def rows_stay_apart(model: nn.Module, config: GenerationConfig, ids: torch.Tensor) -> bool:
    """Whether a prompt (ids: 1 x length) decodes the same, over the first two new tokens (the
    second is a step with the cache, where one is used), beside another prompt as beside
    itself, in either row: batches of one shape, so float kernels sum alike and only a leak
    between rows shows. The other prompt differs at every position (every id plus one)."""
    tokens = min(2, config.max_new_tokens)
    other = (ids + 1) % _vocab(model)

    def rows(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return new_token_logits(model, config, torch.cat([first, second]), tokens=tokens)

    alike = rows(ids, ids)
    return (about_equal(rows(ids, other)[:, :1], alike[:, :1])
            and about_equal(rows(other, ids)[:, 1:], alike[:, 1:]))


def pads_change_nothing(model: nn.Module, config: GenerationConfig, ids: torch.Tensor) -> bool:
    """Whether the prompt's first new token gets the same logits, up to float rounding,
    whatever its masked left pad holds, and about those with no pad (positions taken from the
    mask)."""
    mask = torch.ones(1, ids.shape[1] + 1, dtype=torch.long, device=ids.device)
    mask[:, 0] = 0
    padded = [new_token_logits(model, config, torch.cat([torch.full_like(ids[:, :1], fill), ids],
                                                        dim=1), mask)
              for fill in (config.pad_token_id, (config.pad_token_id + 1) % _vocab(model))]
    return (about_equal(*padded, share=PAD_SHARE)
            and about_equal(padded[0], new_token_logits(model, config, ids)))
