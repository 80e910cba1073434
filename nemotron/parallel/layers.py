"""Tensor-parallel building blocks (Megatron's column/row split), written on torch.distributed.

Shapes are given per rank: `tp` is the tensor-parallel size, `/tp` marks a dimension split across ranks.
With no process group (single rank) every collective is a no-op, so the same modules run on a laptop.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nemotron.parallel.peer_allreduce import peer_all_reduce_for


def all_reduce(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum over the group. May return a new tensor (small CUDA messages go through the peers' memory)."""
    if group is None:
        return x
    peer = peer_all_reduce_for(group)
    if peer is not None and peer.fits(x):
        return peer(x)
    dist.all_reduce(x, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor, group: Optional[dist.ProcessGroup],
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[..., n/tp] on each rank -> [..., n] on every rank; into `out` (any dtype: the copy casts) if given.

    One gather into a [tp * ..., n/tp] buffer, then one copy that puts the ranks' columns in order (and casts): a
    list gather would add a copy per rank, and the concatenation another."""
    if group is None:
        return x if out is None else out.copy_(x)
    tp, lead, part = dist.get_world_size(group), x.shape[:-1], x.shape[-1]
    x = x.contiguous()
    gathered = x.new_empty((tp * x.shape[0],) + x.shape[1:])  # ranks stacked along dim 0 (what gloo accepts)
    dist.all_gather_into_tensor(gathered, x, group=group)
    ordered = gathered.view((tp,) + x.shape).movedim(0, -2)  # [..., tp, n/tp]
    if out is None:
        return ordered.reshape(*lead, tp * part)
    out.view(*lead, tp, part).copy_(ordered)
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               zero_centered_gamma: bool) -> torch.Tensor:
    """LayerNorm1p when zero_centered_gamma: checkpoints store gamma - 1, so the runtime adds the 1."""
    gamma = weight + 1 if zero_centered_gamma else weight
    return F.layer_norm(x, (x.shape[-1],), gamma, bias, eps)


class ColumnParallelLinear(nn.Module):
    """y[..., out/tp] = x[..., in] @ W[out/tp, in]^T, optionally after a fused LayerNorm (TE's LayerNormLinear).

    Fused-norm parameters are named `layer_norm_weight` / `layer_norm_bias` as in MCore's TE spec, so
    checkpoints map 1:1.
    """

    def __init__(self, in_features: int, out_features: int, tp_size: int, *, layer_norm: bool = False,
                 eps: float = 1e-5, zero_centered_gamma: bool = True, dtype=None, device=None):
        super().__init__()
        if out_features % tp_size:
            raise ValueError(f"output size {out_features} is not divisible by tensor parallel size {tp_size}")
        self.weight = nn.Parameter(torch.empty(out_features // tp_size, in_features, dtype=dtype, device=device))
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma
        if layer_norm:
            self.layer_norm_weight = nn.Parameter(torch.zeros(in_features, dtype=dtype, device=device))
            self.layer_norm_bias = nn.Parameter(torch.zeros(in_features, dtype=dtype, device=device))
        else:
            self.layer_norm_weight = self.layer_norm_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_norm_weight is not None:
            x = layer_norm(x, self.layer_norm_weight, self.layer_norm_bias, self.eps, self.zero_centered_gamma)
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """y[..., out] = sum over ranks of x[..., in/tp] @ W[out, in/tp]^T: one all-reduce."""

    def __init__(self, in_features: int, out_features: int, tp_size: int,
                 group: Optional[dist.ProcessGroup] = None, dtype=None, device=None):
        super().__init__()
        if in_features % tp_size:
            raise ValueError(f"input size {in_features} is not divisible by tensor parallel size {tp_size}")
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp_size, dtype=dtype, device=device))
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            # Keep the partial sums in fp32 through the all-reduce and round once, as one rank's matmul does:
            # summing rounded bf16 partials made TP layouts drift from TP1 within ~40 greedy tokens.
            partial = torch.mm(x.reshape(-1, x.shape[-1]), self.weight.t(), out_dtype=torch.float32)
            return all_reduce(partial, self.group).to(x.dtype).view(*x.shape[:-1], -1)
        return all_reduce(F.linear(x, self.weight), self.group)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds vocab rows [tp_rank*V/tp, (tp_rank+1)*V/tp); ids outside give zeros, an all-reduce sums."""

    def __init__(self, vocab_size: int, hidden_size: int, tp_size: int, tp_rank: int,
                 group: Optional[dist.ProcessGroup] = None, dtype=None, device=None):
        super().__init__()
        if vocab_size % tp_size:
            raise ValueError(f"vocab size {vocab_size} is not divisible by tensor parallel size {tp_size}")
        rows = vocab_size // tp_size
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, dtype=dtype, device=device))
        self.start, self.end, self.group = tp_rank * rows, (tp_rank + 1) * rows, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return F.embedding(ids, self.weight)
        return all_reduce(shard_lookup(ids, self.weight, self.start), self.group)


def shard_lookup(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    """Rows of a vocabulary shard weight [rows, h] (ids start..start+rows-1) for ids [...] -> [..., h], zeros for
    ids outside the shard."""
    local = ids - start
    outside = (local < 0) | (local >= weight.shape[0])
    return F.embedding(torch.where(outside, 0, local), weight).masked_fill(outside.unsqueeze(-1), 0)
