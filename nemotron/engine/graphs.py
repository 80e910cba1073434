"""CUDA-graph decode: one captured, fused decode step per (batch bucket, KV-length bucket) and pipeline stage.

A decode step feeds each of n rows its newest token ([n] ids at [n] positions in [n] cache slots, any slots: rows
of different requests come and go) and returns float32 logits [n, V]. Eagerly that is ~25 kernels per layer, most
of them tiny (RoPE alone is a dozen), so on an H100 the launch gaps cost as much as reading the weights. Here the
step is

* fused: per layer `add+LayerNorm1p` (Triton; for one or two rows it runs in the next matmul's prologue) -> QKV
  matmul -> `RoPE + cache write + q layout` (Triton) -> decode attention (Triton: a group's query heads against its
  cached keys, each row only up to its own position, split over the keys when rows are few) -> proj matmul (+TP sum)
  -> `add+LayerNorm1p` -> fc1 with relu^2 -> fc2 (+TP sum). The matmuls (`decode_linear`) run cuBLAS or a skinny
  Triton kernel (for one row also a CUDA-core one), whichever was faster for that weight on first use. Under TP their
  partial sums stay float32 and the next add+LayerNorm rounds the total once. With a peer exchange (CUDA, TP group on
  symmetric memory) there is no all-reduce kernel: the matmul (at TP2; beyond, a small kernel after it) pushes its
  part into every rank's exchange buffer and the add+LayerNorm adds the parts up (`PeerSum`); otherwise an
  all-reduce kernel sums them (through the peers' memory for small messages, else NCCL). LayerNorm1p's
  `gamma = weight + 1` is computed once per weight version, not per step. Before the layers, the first stage looks
  its tokens up in one kernel (this rank's vocabulary shard, zeros for the others' ids, then the TP sum), and RoPE's
  cos/sin come from tables made once per cache length (the kernels before the first layer went 17 -> 3 at TP2,
  8 -> 1 at TP1);
* captured in a CUDA graph per batch bucket (1, 2, 4, ... 128) and KV bucket (the keys read are rounded up to a
  multiple of 64..512, never the whole cache), lazily on first use, all graphs sharing one memory pool; a replay
  only copies the step's token ids and positions into the graph's static inputs.

Rows beyond the real batch (up to the bucket) are padding: token 0 at position 0 of the cache's last slot, which
callers keep free for it (the engine never hands it to a request).

Tensor parallelism works (the all-reduces / all-gather are captured in the graph). Under pipeline parallelism
each stage captures its own layers: the first stage starts from token ids, the others from a static hidden-state
input [n, h]; the last stage ends in logits, the others in a static hidden-state output [n, h]. The stage-to-stage
hop is not captured: between replays, `run` receives the previous stage's hidden states into the input buffer
and sends the output buffer on to the next stage (eager p2p, one hop per stage per step, ordered with the
replays by the current stream). All stages use the same bucket, so padding rows travel along.
Off CUDA (or without Triton) the fused ops fall back to plain torch, which is how the CPU tests check the math;
`DecodeGraphs(capture=False)` runs the same `run` protocol with the step called directly, so the CPU tests also
cover the stage protocol under gloo.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from nemotron.config import env_switch
from nemotron.engine.forward import to_device
from nemotron.engine.kernels import (Delta, add_layer_norm_linear, can_exchange, choice_name, decode_attention,
                                     decode_linear, decode_linear_to_peers, embed_rows, fastest_config, matmul_mode,
                                     rope_to_cache, set_product_choice, step_tunable_products, step_tuning, sum_parts)
from nemotron.model import KVCache, NemotronModel
from nemotron.parallel.layers import all_gather_last_dim, all_reduce
from nemotron.parallel.peer_allreduce import PeerExchange, PeerSum, peer_exchange_for

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

log = logging.getLogger("nemotron")


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
    """Decode step of this pipeline stage for n rows, each in its own KV-cache slot.

    Input: token ids [n] on the first stage, the previous stage's hidden states [n, h] (model dtype) on the
    others; positions [n]; slots [n]. Output: float32 logits [n, V] on the last stage, hidden states [n, h] for the
    next stage on the others. Same parameters and same math as `NemotronModel.forward` + `forward_logits`, with fused
    kernels. `num_layers` runs only the stage's first layers (the benchmark's per-layer cost).
    """

    def __init__(self, model: NemotronModel, num_layers: Optional[int] = None):
        self.model = model
        self.first, self.last = model.ps.is_first_stage, model.ps.is_last_stage
        self.layers = list(model.decoder.layers)[:num_layers]  # this stage's layers only (model.py)
        self._gammas: Dict[int, Tuple[int, torch.Tensor, torch.Tensor]] = {}
        norms = []
        for layer in self.layers:
            norms += [layer.self_attention.linear_qkv.layer_norm_weight, layer.mlp.linear_fc1.layer_norm_weight]
        if self.last:
            norms.append(model.decoder.final_layernorm.weight)
        self._norm_weights = norms
        self._exchange: Optional[PeerExchange] = None  # this step's, if its TP sums go through the peers' memory
        self._sums = 0  # peer sums made so far in this step
        self._rope_key: Optional[Tuple] = None
        self._rope: Tuple[torch.Tensor, torch.Tensor] = ()

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

    def rope_tables(self, length: int, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and sin [length, r] for positions 0..length-1, as eager computes them for each position
        (made once: per step they were ~7 small kernels)."""
        key = (length, dtype, device)
        if self._rope_key != key:
            cos, sin = self.model.rotary(torch.arange(length, device=device).view(1, length), dtype)
            self._rope = (cos.reshape(length, -1), sin.reshape(length, -1))
            self._rope_key = key
        return self._rope

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache, kv_len: int,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: token ids [n] (first stage) or hidden states [n, h]; out: where to write the result (logits [n, V]
        float32 on the last stage, hidden [n, h] on the others), else a new tensor."""
        m = self.model
        n = positions.shape[0]
        self._exchange = self._peer_exchange(n, positions)
        self._sums = 0
        if self._exchange is not None:
            self._exchange.begin_step()
        if self.first:
            emb = m.embedding.word_embeddings
            x = all_reduce(embed_rows(x.view(n), emb.weight, emb.start), emb.group)
        cos, sin = self.rope_tables(cache.max_seq, x.dtype, x.device)
        # The residual stream is kept as (resid, delta): the next add+LayerNorm adds them.
        resid, delta = x, None
        for i, layer in enumerate(self.layers):
            resid, delta = self._layer(i, layer, resid, delta, cos, sin, positions, slots, cache, kv_len, n)
        assert self._sums % 2 == 0, "the peer exchange's regions must alternate across steps"
        if not self.last:
            # The hidden state eager sends on: x + mlp(x), one rounding in the activation dtype (what the
            # add+LayerNorm kernel stores as its sum; a TP delta arrives as a float32 sum, rounded first).
            if isinstance(delta, PeerSum):
                delta = sum_parts(delta)
            if out is None:
                return resid if delta is None else resid + delta.to(resid.dtype)
            return out.copy_(resid) if delta is None else torch.add(resid, delta.to(resid.dtype), out=out)
        fin = m.decoder.final_layernorm
        _, logits = add_layer_norm_linear(resid, delta, self.gamma(fin.weight, fin.zero_centered), fin.bias,
                                          fin.eps, m.output_layer.weight)
        if out is None:
            out = torch.empty(n, m.cfg.padded_vocab_size, dtype=torch.float32, device=logits.device)
        return all_gather_last_dim(logits, m.ps.tp_group, out=out)  # [n, V/tp] model dtype -> out [n, V] float32

    def _layer(self, i: int, layer, resid: torch.Tensor, delta: Delta, cos: torch.Tensor,
               sin: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache, kv_len: int,
               n: int) -> Tuple[torch.Tensor, Delta]:
        """Local layer i: resid, delta [n, h] (delta None before the first layer; a float32 sum, or a pending
        peer sum, under TP) -> the next (resid, delta); writes the rows' keys/values into the cache at (slots,
        positions)."""
        att, mlp = layer.self_attention, layer.mlp
        qkv_lin, fc1 = att.linear_qkv, mlp.linear_fc1
        resid, qkv = add_layer_norm_linear(                                     # qkv [n, ng*(hpg+2)*hn]
            resid, delta, self.gamma(qkv_lin.layer_norm_weight, qkv_lin.zero_centered_gamma),
            qkv_lin.layer_norm_bias, qkv_lin.eps, qkv_lin.weight)
        ck, cv = cache.k[i], cache.v[i]
        q = rope_to_cache(qkv, cos, sin, positions, slots, ck, cv, att.groups, att.heads_per_group, att.head_dim)
        o = decode_attention(q, ck, cv, positions, slots, kv_len)               # [n, ng, hpg, hn]
        delta = self._row_parallel(att.linear_proj, o.reshape(n, -1))
        resid, act = add_layer_norm_linear(                                     # relu^2(fc1) [n, ffn/tp]
            resid, delta, self.gamma(fc1.layer_norm_weight, fc1.zero_centered_gamma), fc1.layer_norm_bias,
            fc1.eps, fc1.weight, relu2=True)
        delta = self._row_parallel(mlp.linear_fc2, act)
        return resid, delta

    def _peer_exchange(self, n: int, x: torch.Tensor) -> Optional[PeerExchange]:
        """The TP group's peer exchange, if this step's [n, h] sums fit it and the kernels can use it."""
        xch = peer_exchange_for(self.model.ps.tp_group)
        if xch is None or not can_exchange(x) or not xch.fits(n, self.model.cfg.hidden_size):
            return None
        return xch

    def _row_parallel(self, lin, x: torch.Tensor) -> Union[torch.Tensor, PeerSum]:
        """RowParallelLinear's math, left unrounded under TP on CUDA: the float32 partial sums are summed over
        the group and the next add+LayerNorm rounds them once (the eager layer casts right after its all-reduce).
        With a peer exchange the sum is left pending: the matmul (or, beyond two ranks, a push kernel after it)
        pushes its part to every rank, and the next add+LayerNorm adds the parts up (no all-reduce kernel)."""
        if lin.group is None:
            return decode_linear(x, lin.weight)
        if self._exchange is not None:
            target = self._exchange.target(self._sums, x.shape[0], lin.weight.shape[0])
            self._sums += 1
            return decode_linear_to_peers(x, lin.weight, target)
        fp32_sum = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
        return all_reduce(decode_linear(x, lin.weight, out_dtype=torch.float32 if fp32_sum else None), lin.group)


# --- Graphs --------------------------------------------------------------------------------------------------

@dataclass
class _Static:
    positions: torch.Tensor  # [n] int64
    slots: torch.Tensor      # [n] int64
    slot_list: List[int]     # what `slots` holds
    inp: torch.Tensor        # first stage: token ids [n] int64; other stages: received hidden states [n, h]
    out: torch.Tensor        # last stage: logits [n, V] float32; other stages: hidden states to send [n, h];
                             # both shared by the bucket's KV-length graphs


class DecodeGraphs:
    """Lazily captured CUDA graphs of this stage's `FusedDecoder` per (batch bucket, KV bucket), replayed by `run`.

    capture=False runs the same protocol (static buffers, stage send/recv) with the step called directly instead
    of captured and replayed: no CUDA needed, so it is how the CPU tests check `run` under pipeline parallelism.
    """

    def __init__(self, model: NemotronModel, buckets: Sequence[int] = BATCH_BUCKETS,
                 num_layers: Optional[int] = None, capture: bool = True):
        if capture:
            ok, why = self.supported(model)
            if not ok:
                raise ValueError(f"CUDA-graph decode unavailable: {why}")
        matmul_mode(), step_tune_mode()  # a bad switch fails here, at start-up, not in the first request
        self.model, self.ps, self.capture = model, model.ps, capture
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
        return True, ""

    def bucket(self, n: int) -> Optional[int]:
        return batch_bucket(n, self.buckets)

    def handles(self, n: int) -> bool:
        return self.bucket(n) is not None

    def reset(self) -> None:
        """Drop every graph (after the cache was reallocated or weights changed)."""
        self._graphs.clear()
        self._static.clear()
        self._pool = None
        self._cache = None
        self.decoder._gammas.clear()

    def _new_static(self, n: int) -> _Static:
        cfg, dev, dtype = self.model.cfg, self.device, self.model.dtype
        if self.ps.is_first_stage:
            inp = torch.zeros(n, dtype=torch.long, device=dev)
        else:
            inp = torch.zeros(n, cfg.hidden_size, dtype=dtype, device=dev)
        if self.ps.is_last_stage:
            out = torch.zeros(n, cfg.padded_vocab_size, dtype=torch.float32, device=dev)
        else:
            out = torch.zeros(n, cfg.hidden_size, dtype=dtype, device=dev)
        zeros = torch.zeros(n, dtype=torch.long, device=dev)
        return _Static(zeros, zeros.clone(), [0] * n, inp, out)

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, positions: Union[torch.Tensor, List[int]], kv_len: int,
            cache: KVCache, slots: Optional[List[int]] = None) -> Optional[torch.Tensor]:
        """Every rank calls this with the same batch: tokens [B] (or [B, 1]) on the device (read on the first
        stage only), positions [B] (tensor on the device, or a list), every position < kv_len; slots [B], the rows'
        cache slots (default 0..B-1), never the cache's last slot when B is not a bucket size (padding rows write
        there). Returns float32 logits [B, V] on the last stage (a view of the graph's output, valid until the
        next run), None on the other stages (as `forward_logits`)."""
        tokens = tokens.view(-1)
        B = tokens.shape[0]
        n = self.bucket(B)
        if n is None:
            raise ValueError(f"batch {B} is larger than the largest graph bucket {self.buckets[-1]}")
        slots = list(range(B)) if slots is None else list(slots)
        pad_slot = cache.num_slots - 1
        if len(slots) != B or max(slots) > pad_slot or (B < n and pad_slot in slots):
            raise ValueError(f"slots {slots} for {B} rows: each must be a slot of the {cache.num_slots}-slot cache, "
                             f"and the last one is kept for padding rows")
        version = self.decoder.weights_version()
        if cache is not self._cache or version != self._version:
            self.reset()
            self._cache, self._version = cache, version
        S = kv_bucket(kv_len, cache.max_seq)
        st = self._static.get(n)
        if st is None:
            st = self._static[n] = self._new_static(n)
        if not isinstance(positions, torch.Tensor):
            positions = to_device(positions, self.device, torch.long)
        # Every stage pads the same way, so padding rows line up with the hidden states they receive.
        st.positions[:B].copy_(positions.view(-1))
        padded = slots + [pad_slot] * (n - B)
        if padded != st.slot_list:  # rows change only when requests join or leave: skip the copy otherwise
            st.slots.copy_(to_device(padded, self.device, torch.long))
            st.slot_list = padded
        if B < n:  # padding rows: token 0 at position 0 of the spare slot
            st.positions[B:].zero_()
        ps = self.ps
        if ps.is_first_stage:
            st.inp[:B].copy_(tokens)
            if B < n:
                st.inp[B:].zero_()
        else:  # the whole bucket [n, h], padding rows included: every stage runs the same shapes
            dist.recv(st.inp, src=ps.stage_rank(ps.pp_rank - 1))
        if not self.capture:
            self.decoder(st.inp, st.positions, st.slots, cache, S, out=st.out)
        else:
            graph = self._graphs.get((n, S))
            if graph is None:
                graph = self._capture(n, S, st, cache)
            graph.replay()
        if not ps.is_last_stage:
            dist.send(st.out, dst=ps.stage_rank(ps.pp_rank + 1))
            return None
        return st.out[:B]

    def _capture(self, n: int, S: int, st: _Static, cache: KVCache) -> torch.cuda.CUDAGraph:
        """Capture (n, S) on this stage (and tune the step's products not tuned yet in this process). No p2p
        inside: the step reads st.inp and writes st.out only, so the stages capture independently (the TP
        collectives in it are within the stage)."""
        t0 = time.perf_counter()
        tuned_before = len(step_tuning)
        graph = self._capture_step(n, S, st, cache)
        if matmul_mode() == "auto" and step_tune_mode() == "1":
            graph = self._tune_products(n, S, st, cache, graph)
        self._graphs[(n, S)] = graph
        self.captures += 1
        seconds = time.perf_counter() - t0
        self.capture_s += seconds
        tuned = len(step_tuning) - tuned_before
        if self.ps.rank == 0:  # what a request waited for (the server's warm-up moves the first ones before /health)
            log.info("decode graph for %d rows x %d keys captured in %.2f s%s", n, S, seconds,
                     f", {tuned} products step-tuned" if tuned else "")
        return graph

    def _capture_step(self, n: int, S: int, st: _Static, cache: KVCache) -> torch.cuda.CUDAGraph:
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):  # warm up: Triton compiles, cuBLAS/NCCL set up, gammas cached
            for _ in range(2):
                self.decoder(st.inp, st.positions, st.slots, cache, S, out=st.out)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self.decoder(st.inp, st.positions, st.slots, cache, S, out=st.out)
        if self._pool is None:
            self._pool = graph.pool()
        return graph

    def _tune_products(self, n: int, S: int, st: _Static, cache: KVCache,
                       graph: torch.cuda.CUDAGraph) -> torch.cuda.CUDAGraph:
        """Each product of n rows was given the kernel that was fastest timed alone, but inside the step a product
        can cost more or less than alone: at batch 8 on an H200, cuBLAS ran proj in 12.6 us in the step against
        15.9 for the Triton kernel that had won alone (docs/benchmarks.md, thirteenth round). So each product is
        tried once on the other side, by capturing and timing the whole step, and the faster step is kept: a
        product on a Triton kernel on cuBLAS, and one on cuBLAS on its fastest Triton config (the Triton kernels
        start under PDL, cuBLAS's do not). Replays repeat the step's cache writes with the same values, so they
        change nothing. Every rank of the stage's TP group tries the same products in the same order and keeps
        what the slowest rank measured, so all of them decide alike (their collectives stay in step); a product is
        tried on Triton only where every rank has a config that ran. A product is tuned once per process, as its
        choice is made once per process: later captures, and other engines on the same weights, reuse it."""
        group = self.ps.tp_group
        for name, cfg in step_tunable_products(n):
            if name in step_tuning:
                continue
            alone = choice_name(cfg)  # this rank's choice timed alone (ranks may differ)
            if _group_max(float(cfg is not None), group, self.device):
                trial_cfg = None  # some rank runs Triton: try cuBLAS everywhere
            else:
                trial_cfg = fastest_config(name, n)
                if _group_max(float(trial_cfg is None), group, self.device):
                    step_tuning[name] = {"alone": alone, "moved": False, "kept": alone,
                                         "why": "no Triton config ran on some rank"}
                    continue
            set_product_choice(name, n, trial_cfg)
            trial = self._capture_step(n, S, st, cache)
            base_ms = trial_ms = float("inf")
            for _ in range(2):  # alternated, best of two: a drift in clocks favours neither
                base_ms = min(base_ms, _step_ms(graph, group, self.device))
                trial_ms = min(trial_ms, _step_ms(trial, group, self.device))
            move = trial_ms < base_ms * (1 - STEP_TUNE_MIN_GAIN)  # the same on every rank: the group's times
            step_tuning[name] = {"alone": alone, "trial": choice_name(trial_cfg), "step_ms": base_ms,
                                 "trial_step_ms": trial_ms, "moved": move,
                                 "kept": choice_name(trial_cfg) if move else alone}
            if move:
                graph = trial
            else:
                set_product_choice(name, n, cfg)
        return graph


#: A product moves to its trial kernel only if the whole step gets at least this much faster (replays vary by ~0.1 %).
STEP_TUNE_MIN_GAIN = 0.003


def step_tune_mode() -> str:
    """NEMOTRON_STEP_TUNE: whether captures tune the step's products by timing the whole captured step
    (`DecodeGraphs._tune_products`). 1 (default): yes, with or without TP (the group's agreement is tested on two
    GPUs: tests/test_gpu.py). 0: never, each product keeps the choice made timing it alone."""
    return env_switch("NEMOTRON_STEP_TUNE", ("0", "1"), "1")


def _group_max(value: float, group, device) -> float:
    """The largest of every TP rank's value (this rank's own without a group)."""
    t = torch.tensor([value], dtype=torch.float32, device=device)
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _step_ms(graph: torch.cuda.CUDAGraph, group, device, reps: int = 10) -> float:
    """ms per replay of the captured step, the slowest over the TP group."""
    for _ in range(2):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return _group_max(start.elapsed_time(end) / reps, group, device)
