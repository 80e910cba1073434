"""Turning last-position logits into tokens, with NeMo's order of operations (text_generation_utils.py).

All functions work on a batch: logits [B, V] float32 over the padded vocabulary, one row per slot.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

NEG_INF = float("-inf")


def mask_logits(logits: torch.Tensor, vocab_size: int, eos_id: int,
                suppress_eos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Padded vocab entries never win; EOS is suppressed for rows still under min_tokens_to_generate
    (suppress_eos [B] bool; None: no row is)."""
    logits[:, vocab_size:] = NEG_INF
    if suppress_eos is not None:
        logits[:, eos_id] = torch.where(suppress_eos, NEG_INF, logits[:, eos_id])
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """The standard (CTRL / HF) form: a seen token's positive logit is divided, a negative one multiplied.

    seen [B, V] bool (every token of the row so far, prompt included); penalty [B] (1.0 = off).
    NeMo divided negative logits too (making them *more* likely, issue #8194) and only applied the penalty when
    compute_logprob was set; its server dropped the value altogether.
    """
    p = penalty.view(-1, 1)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k first, then nucleus keeping the token that crosses top_p (the most likely is always kept).

    top_k [B] int (0 = off); top_p [B] float (0 or 1 = off), per row.
    """
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device).view(1, -1)
    k = top_k.view(-1, 1)
    remove = (k > 0) & (rank >= k)
    sorted_logits = sorted_logits.masked_fill(remove, NEG_INF)
    p = top_p.view(-1, 1)
    nucleus_on = (p > 0) & (p < 1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    over = cumulative > p
    over = torch.cat([torch.zeros_like(over[:, :1]), over[:, :-1]], dim=-1)  # keep the crossing token
    sorted_logits = sorted_logits.masked_fill(nucleus_on & over, NEG_INF)
    return torch.full_like(logits, NEG_INF).scatter(-1, sorted_idx, sorted_logits)


def sample(logits: torch.Tensor, greedy: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, own_generators: Sequence[Tuple[int, int, torch.Generator]] = ()) -> torch.Tensor:
    """logits [B, V] (already masked and penalised) -> tokens [B].

    Greedy rows take the argmax; the others sample from softmax(filter(logits / temperature)). Rows start..end of
    each (start, end, generator) in own_generators draw from that generator (a seeded request), the rest from
    torch's default one.
    """
    greedy_tokens = logits.argmax(dim=-1)  # no shortcut when every row is greedy: testing that would sync the host
    scaled = logits / temperature.view(-1, 1)
    filtered = top_k_top_p_filter(scaled, top_k, top_p)
    probs = torch.softmax(filtered, dim=-1)
    # Greedy rows still need a valid distribution for multinomial; their draw is discarded.
    probs = torch.where(greedy.view(-1, 1), torch.full_like(probs, 1.0 / probs.shape[-1]), probs)
    own_rows = sum(end - start for start, end, _ in own_generators)
    if own_rows < probs.shape[0]:
        drawn = torch.multinomial(probs, 1).view(-1)
    else:
        drawn = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for start, end, generator in own_generators:
        drawn[start:end] = torch.multinomial(probs[start:end], 1, generator=generator).view(-1)
    return torch.where(greedy, greedy_tokens, drawn)
