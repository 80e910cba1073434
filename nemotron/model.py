"""The Nemotron-4 decoder in plain PyTorch: one pipeline stage of it, sharded for one tensor-parallel rank.

Parameter names are megatron-core's TE-spec names (`decoder.layers.{i}.self_attention.linear_qkv.weight`, ...),
so a checkpoint maps onto this module 1:1. Layers are indexed locally within the stage (as in MCore);
`layer_offset` gives the global index of local layer 0.

Shapes in comments: B batch rows, T new tokens, S attended keys, h hidden, nh/ng query heads/groups on this
rank, hn head dim, r rotary dims.

The recipe: pre-norm residual blocks; LayerNorm1p (stored gamma-1, with bias) fused into the following linear;
grouped-query attention; RoPE on the first r = hn*rotary_percentage channels, non-interleaved (rotate-half);
squared-ReLU MLP without gate; no linear biases; untied output layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.config import ModelConfig
from nemotron.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                      layer_norm)
from nemotron.parallel.state import ParallelState, check_divisibility, layer_range


# --- KV cache ------------------------------------------------------------------------------------------------

class KVCache:
    """Preallocated keys/values for every local layer and slot: [layers, slots, ng, max_seq, hn] each.

    A slot is one sequence; its position p holds the key/value of its token p. Nothing is ever reallocated
    while serving, so decode steps have static shapes (what CUDA graphs need).
    """

    def __init__(self, num_layers: int, num_slots: int, num_groups: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_slots, num_groups, max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq(self) -> int:
        return self.k.shape[3]


Slots = Union[torch.Tensor, slice]


@dataclass
class Batch:
    """Where the new tokens sit: positions [B, T]; with a cache, which slot each row is and how many keys to read.

    `slots` is a slice (a contiguous run of slots: attention reads the cache without a copy) or a [B] tensor.
    `kv_len` bounds the keys read: every position in the batch must be < kv_len.
    `from_start` means every row starts at position 0 (a fresh prefill): plain causal attention over the new
    keys, no mask over the cache. `aligned` means every row's positions are kv_len-T .. kv_len-1 (a later chunk of
    a prefill): causal attention aligned to the end of the keys, without a materialised mask.
    """
    positions: torch.Tensor
    slots: Optional[Slots] = None
    kv_len: int = 0
    from_start: bool = True
    aligned: bool = False


# --- RoPE ----------------------------------------------------------------------------------------------------

class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, base: float, device=None):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [B, T] -> cos, sin [B, T, 1, r] (fp32 angles, cast like MCore and HF do)."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [B, T, r/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, hn]: rotate-half on the first r channels, the rest pass through."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    rotated = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, rest), dim=-1)


# --- Blocks --------------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, dtype, device):
        super().__init__()
        tp = ps.tp_size
        self.groups = cfg.num_query_groups // tp  # ng on this rank
        self.heads_per_group = cfg.heads_per_group
        self.head_dim = cfg.kv_channels
        # Rows are [q_0 .. q_{hpg-1}, k, v] per query group, so a contiguous TP split gives whole groups.
        self.linear_qkv = ColumnParallelLinear(cfg.hidden_size, cfg.qkv_rows, tp, layer_norm=True,
                                               eps=cfg.layernorm_epsilon,
                                               zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
                                               dtype=dtype, device=device)
        self.linear_proj = RowParallelLinear(cfg.num_attention_heads * cfg.kv_channels, cfg.hidden_size, tp,
                                             group=ps.tp_group, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, rope, batch: Batch, cache_k: Optional[torch.Tensor],
                cache_v: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, _ = x.shape
        ng, hpg, hn = self.groups, self.heads_per_group, self.head_dim
        qkv = self.linear_qkv(x).view(B, T, ng, hpg + 2, hn)
        q = qkv[:, :, :, :hpg].reshape(B, T, ng * hpg, hn)
        k, v = qkv[:, :, :, hpg], qkv[:, :, :, hpg + 1]  # [B, T, ng, hn]
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hn]

        if cache_k is not None:
            self._write_cache(cache_k, cache_v, k, v, batch)
        if cache_k is None or batch.from_start:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        elif batch.aligned and T > 1:
            # Query t sees keys 0..kv_len-T+t: lower-right causal, which SDPA runs with flash attention on CUDA.
            # That path takes no GQA flag, so the groups' keys are repeated for their query heads here. (Imported
            # here: the module pulls in torch._dynamo, ~2 s, which nothing else of ours needs.)
            from torch.nn.attention.bias import causal_lower_right
            keys = cache_k[batch.slots, :, : batch.kv_len].repeat_interleave(hpg, dim=1)
            values = cache_v[batch.slots, :, : batch.kv_len].repeat_interleave(hpg, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(T, batch.kv_len))
        else:
            keys, values = cache_k[batch.slots, :, : batch.kv_len], cache_v[batch.slots, :, : batch.kv_len]
            key_pos = torch.arange(batch.kv_len, device=x.device)
            mask = key_pos.view(1, 1, 1, -1) <= batch.positions.view(B, 1, T, 1)  # [B, 1, T, S]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, ng * hpg * hn)
        return self.linear_proj(out)

    @staticmethod
    def _write_cache(cache_k, cache_v, k, v, batch: Batch) -> None:
        """k, v [B, ng, T, hn] into cache[slot_b, :, positions[b, t]]."""
        if isinstance(batch.slots, slice):
            idx = torch.arange(batch.slots.start, batch.slots.stop, device=k.device)
        else:
            idx = batch.slots
        rows = idx.view(-1, 1).expand_as(batch.positions)  # [B, T]
        cache_k[rows, :, batch.positions] = k.transpose(1, 2)
        cache_v[rows, :, batch.positions] = v.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, dtype, device):
        super().__init__()
        self.linear_fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, ps.tp_size, layer_norm=True,
                                               eps=cfg.layernorm_epsilon,
                                               zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
                                               dtype=dtype, device=device)
        self.linear_fc2 = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, ps.tp_size, group=ps.tp_group,
                                            dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(torch.square(F.relu(self.linear_fc1(x))))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, dtype, device):
        super().__init__()
        self.self_attention = SelfAttention(cfg, ps, dtype, device)
        self.mlp = MLP(cfg, ps, dtype, device)

    def forward(self, x, rope, batch, cache_k=None, cache_v=None):
        x = x + self.self_attention(x, rope, batch, cache_k, cache_v)
        return x + self.mlp(x)


class FinalLayerNorm(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size, dtype=dtype, device=device))
        self.eps, self.zero_centered = cfg.layernorm_epsilon, cfg.layernorm_zero_centered_gamma

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps, self.zero_centered)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, layers: range, dtype, device):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, ps, dtype, device) for _ in layers)
        self.final_layernorm = FinalLayerNorm(cfg, dtype, device) if ps.is_last_stage else None


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, dtype, device):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.hidden_size, ps.tp_size,
                                                      ps.tp_rank, ps.tp_group, dtype=dtype, device=device)


class NemotronModel(nn.Module):
    """One pipeline stage on one TP rank: embedding on the first stage, output layer on the last."""

    def __init__(self, cfg: ModelConfig, ps: Optional[ParallelState] = None, dtype=torch.float32, device=None):
        super().__init__()
        ps = ps or ParallelState(device=torch.device(device or "cpu"))
        device = device if device is not None else ps.device
        check_divisibility(cfg, ps.tp_size)
        self.cfg, self.ps = cfg, ps
        layers = layer_range(cfg.num_layers, ps.pp_size, ps.pp_rank)
        self.layer_offset = layers.start
        self.embedding = Embedding(cfg, ps, dtype, device) if ps.is_first_stage else None
        self.decoder = Decoder(cfg, ps, layers, dtype, device)
        self.output_layer = (ColumnParallelLinear(cfg.hidden_size, cfg.padded_vocab_size, ps.tp_size,
                                                  dtype=dtype, device=device) if ps.is_last_stage else None)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rotary_base, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.layers[0].mlp.linear_fc2.weight.dtype

    def new_cache(self, num_slots: int, max_seq: int) -> KVCache:
        groups = self.cfg.num_query_groups // self.ps.tp_size
        return KVCache(len(self.decoder.layers), num_slots, groups, max_seq, self.cfg.kv_channels,
                       self.dtype, self.decoder.layers[0].mlp.linear_fc2.weight.device)

    def forward(self, x: torch.Tensor, batch: Optional[Batch] = None, cache: Optional[KVCache] = None) -> torch.Tensor:
        """x: token ids [B, T] on the first stage, else the previous stage's hidden states [B, T, h].

        Returns hidden states [B, T, h]; on the last stage they are already final-layer-normed, ready for
        `logits`. Without a batch, positions are 0..T-1 and no cache is used.
        """
        if batch is None:
            T = x.shape[1]
            batch = Batch(positions=torch.arange(T, device=x.device).expand(x.shape[0], T))
        if self.embedding is not None:
            x = self.embedding.word_embeddings(x)
        rope = self.rotary(batch.positions, x.dtype)
        for i, layer in enumerate(self.decoder.layers):
            if cache is None:
                x = layer(x, rope, batch)
            else:
                x = layer(x, rope, batch, cache.k[i], cache.v[i])
        if self.decoder.final_layernorm is not None:
            x = self.decoder.final_layernorm(x)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[.., h] -> this rank's vocab shard of the logits [.., V/tp] (gathered by the caller if needed)."""
        return self.output_layer(hidden)
