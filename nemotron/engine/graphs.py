"""CUDA-graph decode: one captured, fused decode step per (batch bucket, KV-length bucket).

A decode step feeds each of n rows its newest token ([n] ids at [n] positions, rows = cache slots 0..n-1) and
returns float32 logits [n, V]. Eagerly that is ~25 kernels per layer, most of them tiny (RoPE alone is a dozen),
so on an H100 the launch gaps cost as much as reading the weights. Here the step is

* fused: per layer `add+LayerNorm1p` (Triton) -> QKV matmul -> `RoPE + cache write + q layout` (Triton) ->
  SDPA over the cache prefix with the query heads of a group folded into the query length (GQA without
  materialising repeated K/V) -> proj matmul (+TP all-reduce) -> `add+LayerNorm1p` -> fc1 -> `relu^2` (Triton)
  -> fc2 (+TP all-reduce); LayerNorm1p's `gamma = weight + 1` is computed once per weight version, not per step;
* captured in a CUDA graph per batch bucket (1, 2, 4, ... 128) and KV bucket (the keys read are rounded up to a
  multiple of 64..512, never the whole cache), lazily on first use, all graphs sharing one memory pool; a replay
  only copies the step's token ids and positions into the graph's static inputs.

Rows beyond the real batch (up to the bucket) are padding: token 0 at position 0 of slots the request does not
use, so the engine allocates its cache with `slots_for(B)` slots.

Tensor parallelism works (the NCCL all-reduce / all-gather are captured in the graph). Pipeline parallelism does
not: the stage send/recv is not captured, so under PP>1 `supported` says no and the engine decodes eagerly.
Off CUDA (or without Triton) the fused ops fall back to plain torch, which is how the CPU tests check the math.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from nemotron.engine.kernels import add_layer_norm, relu_squared, rope_to_cache
from nemotron.model import KVCache, NemotronModel
from nemotron.parallel.layers import all_gather_last_dim

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def batch_bucket(n: int, buckets: Sequence[int] = BATCH_BUCKETS) -> Optional[int]:
    """The smallest bucket holding n rows, or None if n is larger than every bucket."""
    for b in buckets:
        if b >= n:
            return b
    return None


def kv_bucket(kv_len: int, max_seq: int) -> int:
    """Keys a step reads: kv_len rounded up to a granularity of 64 that doubles with the length (beyond 512 the
    waste is under a quarter of kv_len), capped at the cache length."""
    g = 64
    while g * 8 < kv_len:
        g *= 2
    return min(max_seq, -(-kv_len // g) * g)


def _version(t: torch.Tensor) -> int:
    """In-place modification counter (inference tensors, made under inference_mode, keep none)."""
    return 0 if t.is_inference() else t._version


# --- The fused decode step -----------------------------------------------------------------------------------

class FusedDecoder:
    """Decode step over slots 0..n-1 of a KV cache: [n] tokens at [n] positions -> float32 logits [n, V].

    Same parameters and same math as `NemotronModel.forward` + `forward_logits` (single pipeline stage), with
    fused kernels. `num_layers` runs only the first layers (the benchmark's per-layer cost).
    """

    def __init__(self, model: NemotronModel, num_layers: Optional[int] = None):
        if model.ps.pp_size > 1:
            raise ValueError("the fused decode step covers a whole model (pipeline_model_parallel_size == 1)")
        self.model = model
        self.layers = list(model.decoder.layers)[:num_layers]
        self._gammas: Dict[int, Tuple[int, torch.Tensor, torch.Tensor]] = {}
        norms = []
        for layer in self.layers:
            norms += [layer.self_attention.linear_qkv.layer_norm_weight, layer.mlp.linear_fc1.layer_norm_weight]
        norms.append(model.decoder.final_layernorm.weight)
        self._norm_weights = norms

    def weights_version(self) -> int:
        """Changes whenever a LayerNorm weight is modified in place (e.g. reloaded), so cached gammas and graphs
        built on them can be dropped."""
        return sum(_version(w) for w in self._norm_weights)

    def gamma(self, weight: torch.Tensor, zero_centered: bool) -> torch.Tensor:
        """LayerNorm1p's effective gamma (weight + 1, in the weight's dtype: eager's rounding), once per version.
        The parameter itself keeps its loaded value (gamma - 1)."""
        if not zero_centered:
            return weight
        hit = self._gammas.get(id(weight))
        if hit is not None and hit[1] is weight and hit[0] == _version(weight):
            return hit[2]
        g = (weight.detach() + 1)
        self._gammas[id(weight)] = (_version(weight), weight, g)
        return g

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, kv_len: int,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = self.model
        n = tokens.shape[0]
        x = m.embedding.word_embeddings(tokens.view(n, 1)).view(n, -1)
        cos, sin = m.rotary(positions.view(n, 1), x.dtype)  # [n, 1, 1, r]
        r = cos.shape[-1]
        cos, sin = cos.reshape(n, r), sin.reshape(n, r)
        key_pos = torch.arange(kv_len, device=x.device)
        mask = torch.zeros(n, 1, 1, kv_len, dtype=x.dtype, device=x.device)
        mask.masked_fill_(key_pos.view(1, 1, 1, -1) > positions.view(n, 1, 1, 1), float("-inf"))
        resid, delta = x, None
        for i, layer in enumerate(self.layers):
            att, mlp = layer.self_attention, layer.mlp
            qkv_lin, fc1 = att.linear_qkv, mlp.linear_fc1
            resid, h = add_layer_norm(resid, delta, self.gamma(qkv_lin.layer_norm_weight, qkv_lin.zero_centered_gamma),
                                      qkv_lin.layer_norm_bias, qkv_lin.eps)
            qkv = F.linear(h, qkv_lin.weight)
            ck, cv = cache.k[i], cache.v[i]
            q = rope_to_cache(qkv, cos, sin, positions, ck, cv, att.groups, att.heads_per_group, att.head_dim)
            # GQA without repeats: a group's query heads are the "query length" of one attention over its keys.
            o = F.scaled_dot_product_attention(q, ck[:n, :, :kv_len], cv[:n, :, :kv_len], attn_mask=mask)
            delta = att.linear_proj(o.reshape(n, -1))
            resid, h = add_layer_norm(resid, delta, self.gamma(fc1.layer_norm_weight, fc1.zero_centered_gamma),
                                      fc1.layer_norm_bias, fc1.eps)
            delta = mlp.linear_fc2(relu_squared(F.linear(h, fc1.weight)))
        fin = m.decoder.final_layernorm
        _, h = add_layer_norm(resid, delta, self.gamma(fin.weight, fin.zero_centered), fin.bias, fin.eps)
        logits = all_gather_last_dim(F.linear(h, m.output_layer.weight), m.ps.tp_group)
        if out is None:
            return logits.float()
        out.copy_(logits)
        return out


# --- Graphs --------------------------------------------------------------------------------------------------

@dataclass
class _Static:
    tokens: torch.Tensor     # [n] int64
    positions: torch.Tensor  # [n] int64
    out: torch.Tensor        # [n, V] float32, shared by the bucket's KV-length graphs


class DecodeGraphs:
    """Lazily captured CUDA graphs of `FusedDecoder` per (batch bucket, KV bucket), replayed by `run`."""

    def __init__(self, model: NemotronModel, buckets: Sequence[int] = BATCH_BUCKETS,
                 num_layers: Optional[int] = None):
        ok, why = self.supported(model)
        if not ok:
            raise ValueError(f"CUDA-graph decode unavailable: {why}")
        self.model = model
        self.device = next(model.parameters()).device
        self.decoder = FusedDecoder(model, num_layers)
        self.buckets = tuple(sorted(buckets))
        self.captures, self.capture_s = 0, 0.0
        self._graphs: Dict[Tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._static: Dict[int, _Static] = {}
        self._pool = None
        self._cache: Optional[KVCache] = None
        self._version: Optional[int] = None

    @staticmethod
    def supported(model: NemotronModel) -> Tuple[bool, str]:
        device = next(model.parameters()).device
        if device.type != "cuda":
            return False, f"the model is on {device.type}, not CUDA"
        if model.ps.pp_size > 1:
            return False, ("pipeline parallelism: the stage-to-stage send/recv is not captured, so decode runs "
                           "eagerly under PP>1")
        return True, ""

    def bucket(self, n: int) -> Optional[int]:
        return batch_bucket(n, self.buckets)

    def handles(self, n: int) -> bool:
        return self.bucket(n) is not None

    def slots_for(self, n: int) -> int:
        """Cache slots a batch of n rows needs on the graph path (its bucket: padding rows use spare slots)."""
        return self.bucket(n) or n

    def reset(self) -> None:
        """Drop every graph (after the cache was reallocated or weights changed)."""
        self._graphs.clear()
        self._static.clear()
        self._pool = None
        self._cache = None
        self.decoder._gammas.clear()

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, positions: Union[torch.Tensor, List[int]], kv_len: int,
            cache: KVCache) -> torch.Tensor:
        """tokens [B] (or [B, 1]) on the device, positions [B] (tensor on the device, or a list); every position
        < kv_len. Returns float32 logits [B, V]: a view of the graph's output, valid until the next run."""
        tokens = tokens.view(-1)
        B = tokens.shape[0]
        n = self.bucket(B)
        if n is None:
            raise ValueError(f"batch {B} is larger than the largest graph bucket {self.buckets[-1]}")
        if cache.num_slots < n:
            raise ValueError(f"the cache has {cache.num_slots} slots; batch {B} runs in bucket {n}")
        version = self.decoder.weights_version()
        if cache is not self._cache or version != self._version:
            self.reset()
            self._cache, self._version = cache, version
        S = kv_bucket(kv_len, cache.max_seq)
        st = self._static.get(n)
        if st is None:
            V = self.model.cfg.padded_vocab_size
            st = _Static(torch.zeros(n, dtype=torch.long, device=self.device),
                         torch.zeros(n, dtype=torch.long, device=self.device),
                         torch.zeros(n, V, dtype=torch.float32, device=self.device))
            self._static[n] = st
        st.tokens[:B].copy_(tokens)
        if not isinstance(positions, torch.Tensor):
            positions = torch.tensor(positions, dtype=torch.long)
        st.positions[:B].copy_(positions.view(-1))
        if B < n:  # padding rows: token 0 at position 0 of the spare slots
            st.tokens[B:].zero_()
            st.positions[B:].zero_()
        graph = self._graphs.get((n, S))
        if graph is None:
            graph = self._capture(n, S, st, cache)
        graph.replay()
        return st.out[:B]

    def _capture(self, n: int, S: int, st: _Static, cache: KVCache) -> torch.cuda.CUDAGraph:
        t0 = time.perf_counter()
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):  # warm up: Triton compiles, cuBLAS/NCCL set up, gammas cached
            for _ in range(2):
                self.decoder(st.tokens, st.positions, cache, S, out=st.out)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self.decoder(st.tokens, st.positions, cache, S, out=st.out)
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[(n, S)] = graph
        self.captures += 1
        self.capture_s += time.perf_counter() - t0
        return graph
