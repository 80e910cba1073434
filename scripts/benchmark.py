#!/usr/bin/env python3
"""Decode/prefill speed of our engine against Hugging Face transformers and the card's own roofline, in one run.

Builds a model of a named shape with seeded random bf16 weights directly on the GPU (no checkpoint): every tensor
is drawn in fixed 4096-row chunks, each from its own seed, so every rank and every TP size sees the same global
weights and each rank draws only what its shard needs. Then, on the same card:

* roofline: device-to-device copy bandwidth (bytes read + written) and the bf16 8192^3 matmul rate;
* correctness: greedy tokens of graph replay vs the fused step without graphs vs the model's eager decode vs
  HF `NemotronForCausalLM.generate` (same weights), plus HF's tokens teacher-forced through our graph step;
* decode ms/step at each batch (prompt 128, 128 new tokens): our CUDA-graph step, our eager step, the engine's
  `generate` end to end, and HF `generate` (eager PyTorch, greedy); % of roofline = bytes a step must read
  (weights + the KV prefix) / copy bandwidth / measured time;
* prefill of 4096 tokens: tokens/s and % of the measured matmul rate;
* optionally `torch.compile` of the eager decode step (batch 1), captured in a CUDA graph, to compare.

    python scripts/benchmark.py --preset bench-8b --out out/bench.json --plot out/bench.png
    python scripts/benchmark.py --suite decode --preset bench-8b --batches 1     # TP1 baseline for scaling
    torchrun --nproc-per-node 4 scripts/benchmark.py --suite decode --tp 4 --preset bench-8b --batches 1
    torchrun --nproc-per-node 4 scripts/benchmark.py --suite decode --tp 4 --preset nemotron-4-340b \\
        --layers auto --slope-layers 4 --batches 1 --extrapolate
    python scripts/benchmark.py --fit tp1_340b.json tp4_340b.json   # the same 340B extrapolation, overheads fitted
    torchrun --nproc-per-node 4 scripts/benchmark.py --suite decode --tp 2 --pp 2 --preset bench-8b --batches 1
    python scripts/benchmark.py --suite kernels --preset bench-8b   # decode kernels alone vs cuBLAS / SDPA
    python scripts/benchmark.py --suite batching --preset bench-8b  # chunked prefill stall, batching throughput

Runs on CPU too (`--device cpu --preset tiny`), without graphs, to check the harness. Imports neither
megatron-core nor hydra nor flask.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import zlib
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on shared hosts

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nemotron.checkpoint.shards import shard_specs  # noqa: E402
from nemotron.config import PRESETS, ModelConfig, to_hf_config  # noqa: E402
from nemotron.engine import kernels as kernels_mod  # noqa: E402
from nemotron.engine.forward import forward_logits  # noqa: E402
from nemotron.engine.graphs import DecodeGraphs, batch_bucket  # noqa: E402
from nemotron.model import Batch, NemotronModel  # noqa: E402
from nemotron.parallel.peer_allreduce import (enable_peer_all_reduce, nccl_only, peer_all_reduce_for,  # noqa: E402
                                              peer_exchange_for, without_exchange)
from nemotron.parallel.state import ParallelState  # noqa: E402

TINY = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
                   kv_channels=32, padded_vocab_size=512, max_position_embeddings=1024)
CHUNK_ROWS = 4096
T0 = time.perf_counter()


# --- small utilities -----------------------------------------------------------------------------------------

class Ctx:
    def __init__(self, args, ps: ParallelState, dev: torch.device):
        self.args, self.ps, self.dev = args, ps, dev
        self.cuda = dev.type == "cuda"
        self.rank0 = ps.rank == (ps.last_stage_leader if ps.pp_size > 1 else 0)  # the reporting rank
        self.result: dict = {}

    def log(self, *msg):
        if self.rank0:
            print(f"[{time.perf_counter() - T0:7.1f}s]", *msg, flush=True)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - T0)

    def save(self):
        if self.rank0 and self.args.out:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            with open(self.args.out, "w") as f:
                json.dump(self.result, f, indent=1)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)


def guarded(ctx: Ctx, name: str, fn, *args, **kw):
    """Run one stage; on failure record the error and go on with the rest of the run."""
    try:
        return fn(*args, **kw)
    except Exception as exc:  # noqa: BLE001
        import traceback
        tb = traceback.format_exc()
        ctx.result.setdefault("errors", {})[name] = tb[-3000:]
        ctx.log(f"STAGE {name} FAILED: {exc!r}\n{tb[-3000:]}")
        ctx.save()
        if ctx.cuda:
            torch.cuda.synchronize()
        return None


def timed(ctx: Ctx, fn, warmup: int = 1, reps: int = 5) -> float:
    """Median milliseconds of fn() (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if ctx.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def wall_ms(ctx: Ctx, fn, reps: int = 1) -> float:
    """Wall-clock ms of fn() from an idle device to an idle device; the median of `reps` runs."""
    times = []
    for _ in range(reps):
        ctx.sync()
        t = time.perf_counter()
        fn()
        ctx.sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# --- model with seeded weights -------------------------------------------------------------------------------

def _std_for(name: str, std: float) -> float:
    if name.endswith("layer_norm_weight") or name == "decoder.final_layernorm.weight":
        return 0.05  # LayerNorm1p stores gamma - 1: near 0
    if name.endswith("layer_norm_bias") or name == "decoder.final_layernorm.bias":
        return 0.02
    return std


@torch.no_grad()
def fill_seeded(model: NemotronModel, seed: int, std: float) -> None:
    """Every global tensor is normal(0, std) drawn in CHUNK_ROWS-row chunks, chunk c of tensor `name` from seed
    hash(name, c, seed): the same values on every rank and TP size; a rank draws the chunks its shard touches."""
    params = dict(model.named_parameters())
    dev = next(model.parameters()).device
    for local, spec in shard_specs(model).items():
        p = params[local]
        sl = spec.slices()
        rows = spec.global_shape[0]
        lo, hi = (sl[0].start, sl[0].stop) if spec.tp_dim == 0 else (0, rows)
        s = _std_for(spec.name, std)
        base = zlib.crc32(spec.name.encode())
        for c in range(lo // CHUNK_ROWS, -(-hi // CHUNK_ROWS)):
            r0, r1 = c * CHUNK_ROWS, min(rows, (c + 1) * CHUNK_ROWS)
            g = torch.Generator(device=dev).manual_seed((base * 1_000_003 + c * 7_919 + seed) % (1 << 62))
            block = torch.randn((r1 - r0,) + tuple(spec.global_shape[1:]), generator=g, device=dev,
                                dtype=p.dtype).mul_(s)
            a, b = max(r0, lo), min(r1, hi)
            src = block[a - r0:b - r0]
            if spec.tp_dim == 1:
                src = src[:, sl[1]]
            dst = p[a - lo:b - lo] if spec.tp_dim == 0 else p[a:b]
            dst.copy_(src)
            del block


def per_layer_param_bytes(cfg: ModelConfig, tp: int) -> int:
    h = cfg.hidden_size
    n = cfg.qkv_rows * h + cfg.num_attention_heads * cfg.kv_channels * h + 2 * h * cfg.ffn_hidden_size
    return 2 * (n // tp + 4 * h)


def weight_bytes_read(model: NemotronModel, batch: int) -> int:
    """bf16 bytes a decode step reads from weights on this rank: all but the embedding, of which `batch` rows."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embedding."):
            total += batch * p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def kv_bytes_read(model: NemotronModel, batch: int, kv_lens) -> float:
    """Mean bytes of K and V a step must read (each row its own prefix), over the steps with these kv lengths."""
    cfg, ps = model.cfg, model.ps
    per_pos = 2 * len(model.decoder.layers) * (cfg.num_query_groups // ps.tp_size) * cfg.kv_channels * 2
    return per_pos * batch * statistics.mean(kv_lens)


class BenchTokenizer:
    """What the engine needs of a tokenizer, for token ids only (no text)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = vocab_size, 2, 3, 0

    def ids_to_text(self, ids):
        return " ".join(str(int(i)) for i in ids)

    def ids_to_tokens(self, ids):
        return [str(int(i)) for i in ids]

    def single_piece_id(self, text):
        return None

    def text_to_ids(self, text):  # a "sentence" is its ids written out: what the server path sends
        return [int(t) for t in text.split()]


# --- decode loops --------------------------------------------------------------------------------------------

class Stepper:
    """One decode step, several ways. Each returns float32 logits [n, V] for tokens [n] at positions [n]."""

    def __init__(self, model: NemotronModel, cache, num_layers=None):
        self.model, self.cache = model, cache
        # the fused step without graphs: the same `run` protocol (stage hops under PP), called directly
        self.fused = DecodeGraphs(model, num_layers=num_layers, capture=False)
        self.graphs = DecodeGraphs(model, num_layers=num_layers) if DecodeGraphs.supported(model)[0] else None

    def eager(self, tokens, positions, kv_len):
        n = tokens.shape[0]
        batch = Batch(positions.view(n, 1), slice(0, n), kv_len=kv_len, from_start=False)
        return forward_logits(self.model, tokens.view(n, 1), batch, self.cache, positions="last")

    def fused_step(self, tokens, positions, kv_len):
        return self.fused.run(tokens, positions, kv_len, self.cache)

    def graph(self, tokens, positions, kv_len):
        if self.graphs is None:  # CPU: the harness runs, the label says what ran
            return self.fused_step(tokens, positions, kv_len)
        return self.graphs.run(tokens, positions, kv_len, self.cache)


@torch.inference_mode()
def prefill(model, cache, prompts):
    """prompts [b, P] into slots 0..b-1; returns last-position logits [b, V]."""
    b, P = prompts.shape
    batch = Batch(torch.arange(P, device=prompts.device).expand(b, P), torch.arange(b, device=prompts.device),
                  kv_len=P, from_start=True)
    return forward_logits(model, prompts, batch, cache, positions="last")


def pick(model, logits, b: int, device) -> torch.Tensor:
    """Greedy tokens [b] on every rank. Under PP only the last stage has logits: its TP leader broadcasts the
    tokens to every rank (what the engine does each step)."""
    ps = model.ps
    if ps.pp_size == 1:
        return logits.argmax(-1)
    tok = logits.argmax(-1) if logits is not None else torch.empty(b, dtype=torch.long, device=device)
    dist.broadcast(tok, src=ps.last_stage_leader)
    return tok


@torch.inference_mode()
def greedy(step, model, cache, prompts, steps, forced=None):
    """Greedy tokens [b, steps] (and per-step logits; None on PP stages without logits) via `step`; `forced`
    [b, steps] feeds those tokens instead."""
    b, P = prompts.shape
    logits = prefill(model, cache, prompts)
    toks, all_logits = [], [logits.clone() if logits is not None else None]
    tok = pick(model, logits, b, prompts.device)
    for s in range(steps):
        toks.append(tok)
        if s == steps - 1:
            break
        feed = forced[:, s] if forced is not None else tok
        pos = torch.full((b,), P + s, dtype=torch.long, device=prompts.device)
        logits = step(feed, pos, P + s + 1)
        all_logits.append(logits.clone() if logits is not None else None)
        tok = pick(model, logits, b, prompts.device)
    stacked = torch.stack(all_logits, 1) if all_logits[0] is not None else None
    return torch.stack(toks, 1), stacked


@torch.inference_mode()
def decode_loop_ms(ctx, step, model, cache, prompts, steps) -> float:
    """ms per step of `steps` greedy decode steps (argmax included), timed as one region with no host sync."""
    b, P = prompts.shape
    logits = prefill(model, cache, prompts)
    tok = pick(model, logits, b, prompts.device)
    pos = [torch.full((b,), P + s, dtype=torch.long, device=prompts.device) for s in range(steps)]

    def run():
        nonlocal tok
        for s in range(steps):
            tok = pick(model, step(tok, pos[s], P + s + 1), b, prompts.device)

    run()  # warm-up (captures graphs on first use)
    return timed(ctx, run, warmup=0, reps=3 if steps > 40 else 2) / steps


# --- stages --------------------------------------------------------------------------------------------------

def measure_roofline(ctx: Ctx):
    if not ctx.cuda:
        ctx.result["roofline"] = {"copy_GBps": None, "matmul_TFLOPs": None}
        return
    n = 1 << 30  # 1 Gi bf16 elements: 2 GiB each way
    src = torch.randn(n, dtype=torch.bfloat16, device=ctx.dev)
    dst = torch.empty_like(src)
    ms = timed(ctx, lambda: dst.copy_(src), warmup=3, reps=20)
    copy = 2 * n * 2 / (ms * 1e-3) / 1e9
    src = dst = None  # frees 4 GiB (a del would leave the lambda above a dangling name)
    m = 8192
    a = [torch.randn(m, m, dtype=torch.bfloat16, device=ctx.dev) for _ in range(2)]
    b = [torch.randn(m, m, dtype=torch.bfloat16, device=ctx.dev) for _ in range(2)]
    i = [0]

    def mm():
        torch.mm(a[i[0] % 2], b[i[0] % 2])
        i[0] += 1
    ms_mm = timed(ctx, mm, warmup=5, reps=20)
    a = b = None
    torch.cuda.empty_cache()
    ctx.result["roofline"] = {"copy_GBps": copy, "copy_ms_per_4GiB": ms,
                              "matmul_TFLOPs": 2 * m ** 3 / (ms_mm * 1e-3) / 1e12, "matmul_shape": [m, m, m]}
    ctx.log(f"copy {copy:.0f} GB/s (read+write), bf16 matmul {ctx.result['roofline']['matmul_TFLOPs']:.0f} TFLOP/s")


@torch.inference_mode()
def check_kernels(ctx: Ctx, model: NemotronModel):
    """Triton kernels vs their plain-torch versions on the GPU at this model's shapes."""
    if not ctx.cuda or kernels_mod.triton is None:
        return
    cfg = model.cfg
    att = model.decoder.layers[0].self_attention
    n, ng, hpg, hn = 8, att.groups, att.heads_per_group, att.head_dim
    g = torch.Generator(device=ctx.dev).manual_seed(5)
    out = {}
    res = []
    for force in (False, True):
        kernels_mod.FORCE_TORCH = force
        qkv = torch.randn(n, ng * (hpg + 2) * hn, generator=g.manual_seed(1), device=ctx.dev, dtype=torch.bfloat16)
        pos = torch.arange(n, device=ctx.dev) * 7
        cos, sin = model.rotary(torch.arange(64, device=ctx.dev).view(1, 64), torch.bfloat16)  # tables [64, r]
        ck = torch.zeros(n, ng, 64, hn, dtype=torch.bfloat16, device=ctx.dev)
        cv = torch.zeros_like(ck)
        slots = torch.arange(n, device=ctx.dev).flip(0)  # rows in other slots than their index
        q = kernels_mod.rope_to_cache(qkv, cos.reshape(64, -1), sin.reshape(64, -1), pos, slots, ck, cv, ng, hpg, hn)
        x = torch.randn(n, cfg.hidden_size, generator=g.manual_seed(2), device=ctx.dev, dtype=torch.bfloat16)
        d = torch.randn(n, cfg.hidden_size, generator=g.manual_seed(3), device=ctx.dev, dtype=torch.bfloat16)
        w = model.decoder.layers[0].mlp.linear_fc1
        s, y = kernels_mod.add_layer_norm(x, d, w.layer_norm_weight + 1, w.layer_norm_bias, w.eps)
        r2 = kernels_mod.relu_squared(d)
        res.append((q, ck, cv, s, y, r2))
    kernels_mod.FORCE_TORCH = False
    for name, i in (("rope_q", 0), ("cache_k", 1), ("cache_v", 2), ("residual_add", 3), ("relu2", 5)):
        out[name + "_equal"] = bool(torch.equal(res[0][i], res[1][i]))
        if not out[name + "_equal"]:
            d = (res[0][i].float() - res[1][i].float()).abs()
            out[name + "_max_abs_diff"] = float(d.max())
            out[name + "_frac_differing"] = float((d > 0).float().mean())
    diff = (res[0][4].float() - res[1][4].float()).abs()
    out["layernorm_max_abs_diff"] = float(diff.max())
    out["layernorm_frac_differing"] = float((diff > 0).float().mean())
    # Decode attention (Triton, per-row lengths, split KV) vs SDPA with a mask, at this model's head shape.
    S = 320
    ck = torch.randn(n, ng, S, hn, generator=g.manual_seed(6), device=ctx.dev, dtype=torch.bfloat16)
    cv = torch.randn(n, ng, S, hn, generator=g.manual_seed(7), device=ctx.dev, dtype=torch.bfloat16)
    qa = torch.randn(n, ng, hpg, hn, generator=g.manual_seed(8), device=ctx.dev, dtype=torch.bfloat16)
    pos = torch.tensor([S - 1, 0, 5, 63, 64, 65, 200, 255][:n], device=ctx.dev)
    att_out = []
    for force in (False, True):
        kernels_mod.FORCE_TORCH = force
        att_out.append(kernels_mod.decode_attention(qa, ck, cv, pos, torch.arange(n, device=ctx.dev).flip(0),
                                                    S).float())
    kernels_mod.FORCE_TORCH = False
    d = (att_out[0] - att_out[1]).abs()
    out["decode_attention_max_abs_diff"] = float(d.max())
    out["decode_attention_max_rel_diff"] = float(d.max() / att_out[1].abs().max())
    # Skinny matmul (every config, forced) vs cuBLAS, bf16 out and fp32 out, at the fc1 shape.
    w = model.decoder.layers[0].mlp.linear_fc1.weight
    for m in (1, 8, 64):
        xm = torch.randn(m, w.shape[1], generator=g.manual_seed(9), device=ctx.dev, dtype=torch.bfloat16)
        ref = torch.mm(xm, w.t(), out_dtype=torch.float32)
        worst = 0.0
        for cfg_ in kernels_mod.skinny_configs(m):
            for od in (torch.bfloat16, torch.float32):
                y = torch.empty(m, w.shape[0], dtype=od, device=ctx.dev)
                kernels_mod._skinny_launch(xm, w, y, False, cfg_)
                worst = max(worst, float((y.float() - ref).abs().max() / ref.abs().max()))
        out[f"skinny_mm_m{m}_max_rel_diff_vs_fp32_cublas"] = worst
    # add + LayerNorm inside the matmul (every config, one row) vs the two kernels, at the qkv shape.
    lin = model.decoder.layers[0].self_attention.linear_qkv
    x1 = torch.randn(1, cfg.hidden_size, generator=g.manual_seed(10), device=ctx.dev, dtype=torch.bfloat16)
    d1 = torch.randn(1, cfg.hidden_size, generator=g.manual_seed(11), device=ctx.dev, dtype=torch.float32)
    gam = lin.layer_norm_weight + 1
    s_ref, h_ref = kernels_mod.add_layer_norm(x1, d1, gam, lin.layer_norm_bias, lin.eps)
    ref = torch.mm(h_ref, lin.weight.t(), out_dtype=torch.float32)
    worst, s_equal = 0.0, True
    for cfg_ in kernels_mod.SKINNY_CONFIGS:
        s1, y1 = torch.empty_like(x1), torch.empty(1, lin.weight.shape[0], dtype=torch.bfloat16, device=ctx.dev)
        kernels_mod._ln_launch(x1, d1, s1, gam, lin.layer_norm_bias, lin.eps, lin.weight, y1, False, cfg_)
        s_equal &= bool(torch.equal(s1, s_ref))
        worst = max(worst, float((y1.float() - ref).abs().max() / ref.abs().max()))
    out["ln_fused_mm_residual_equal"] = s_equal
    out["ln_fused_mm_max_rel_diff_vs_fp32_cublas"] = worst
    ctx.result["kernel_checks"] = out
    ctx.log("kernel checks (Triton vs torch):", out)


def build_hf(ctx: Ctx, model: NemotronModel):
    from transformers import NemotronConfig, NemotronForCausalLM

    from nemotron.checkpoint.hf_names import mcore_to_hf
    cfg = model.cfg
    hf_cfg = NemotronConfig(**{k: v for k, v in to_hf_config(cfg).items()
                               if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
    prev = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    try:
        with torch.device(ctx.dev):
            hf = NemotronForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(prev)
    hf.eval()
    state = mcore_to_hf(dict(model.state_dict()), cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    del state
    impl = getattr(hf.config, "_attn_implementation", None)
    return hf, impl


@torch.inference_mode()
def hf_generate(hf, prompts, steps, eos_id, logits=False):
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=steps,
                      min_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=eos_id,
                      return_dict_in_generate=True, output_logits=logits)
    return out


def agreement(ctx: Ctx, model, stepper, hf, prompts, steps):
    """Greedy tokens of each path on the same prompt; HF's tokens teacher-forced through our graph step."""
    cache = stepper.cache
    paths = {"graph": stepper.graph, "fused_no_graph": stepper.fused_step, "eager": stepper.eager}
    toks = {}
    for name, fn in paths.items():
        toks[name], lg = greedy(fn, model, cache, prompts, steps)
        if name == "graph":
            graph_logits = lg
    res = {"steps": steps, "prompt_len": prompts.shape[1], "batch": prompts.shape[0]}

    def match(a, b):
        same = (a == b)
        first = [int(torch.nonzero(~row)[0]) if (~row).any() else steps for row in same]
        return {"matching_tokens": int(same.sum()), "of": int(same.numel()), "first_divergence": first}

    res["graph_vs_fused_no_graph"] = match(toks["graph"], toks["fused_no_graph"])
    res["graph_vs_eager"] = match(toks["graph"], toks["eager"])
    # the same step replayed: the graph must reproduce the un-captured fused step bit for bit
    _, fused_logits = greedy(stepper.fused_step, model, cache, prompts, steps, forced=toks["graph"])
    res["graph_vs_fused_logits_max_abs_diff"] = float((fused_logits - graph_logits).abs().max())
    if hf is not None:
        out = hf_generate(hf, prompts, steps, BenchTokenizer(0).eos_id, logits=True)
        hf_toks = out.sequences[:, prompts.shape[1]:]
        hf_logits = torch.stack(list(out.logits), 1).float()
        res["graph_vs_hf"] = match(toks["graph"], hf_toks)
        res["eager_vs_hf"] = match(toks["eager"], hf_toks)
        tf_toks, tf_logits = greedy(stepper.graph, model, cache, prompts, steps, forced=hf_toks)
        res["hf_teacher_forced_top1_agreement"] = {"matching": int((tf_toks == hf_toks).sum()),
                                                    "of": int(hf_toks.numel())}
        rel = ((tf_logits - hf_logits).abs().amax(-1) / hf_logits.abs().amax(-1)).flatten()
        res["hf_teacher_forced_logits_rel_diff"] = {"max": float(rel.max()), "median": float(rel.median())}
        top2 = hf_logits.topk(2, dim=-1).values
        res["hf_top1_top2_gap_median"] = float((top2[..., 0] - top2[..., 1]).median())
        res["tokens_hf"] = hf_toks.tolist()
    res["tokens_graph"] = toks["graph"].tolist()
    ctx.result["agreement"] = res
    ctx.log("agreement:", {k: v for k, v in res.items() if not k.startswith("tokens")})


def decode_bench(ctx: Ctx, model, stepper, hf, batches, prompt_len, steps, variants):
    cfg = model.cfg
    rows = []
    roof = ctx.result.get("roofline", {}).get("copy_GBps")
    gen = torch.Generator().manual_seed(1234)
    for b in batches:
        if ctx.left() < 30:
            ctx.log(f"budget: skipping decode batch {b}")
            break
        prompts = torch.randint(10, cfg.padded_vocab_size, (b, prompt_len), generator=gen).to(ctx.dev)
        kv_lens = [prompt_len + s + 1 for s in range(steps)]
        wbytes = weight_bytes_read(model, b)
        kvb = kv_bytes_read(model, b, kv_lens)
        row = {"batch": b, "weight_bytes": wbytes, "kv_bytes_mean": kvb}
        if roof:
            row["roofline_ms"] = (wbytes + kvb) / (roof * 1e9) * 1e3
        def put(key, fn, *a):
            v = guarded(ctx, f"decode_b{b}_{key}", fn, *a)
            if v is not None:
                row[key] = v
        if "graph" in variants:
            put("graph_ms", decode_loop_ms, ctx, stepper.graph, model, stepper.cache, prompts, steps)
        if "eager" in variants:
            put("eager_ms", decode_loop_ms, ctx, stepper.eager, model, stepper.cache, prompts, min(steps, 32))
        if "fused" in variants:
            put("fused_no_graph_ms", decode_loop_ms, ctx, stepper.fused_step, model, stepper.cache, prompts,
                min(steps, 32))
        if "engine" in variants:
            put("engine_ms", engine_ms, ctx, model, stepper, prompts, steps)
        if "served" in variants:
            put("served_ms", served_ms, ctx, model, prompts, steps)
            if ctx.cuda:  # the same without overlap (the host's work between steps), same run
                put("served_sync_ms", served_ms, ctx, model, prompts, steps, False)
            for key in ("served_ms", "served_sync_ms"):  # timed on rank 0; under PP the last stage reports
                value = from_rank0(ctx, row.get(key))
                if value is not None:
                    row[key] = value
        if hf is not None and ctx.left() > 60:
            hs = 64 if b == 1 else 32

            def hf_ms():
                t1 = wall_ms(ctx, lambda: hf_generate(hf, prompts, 1, 3))
                tn = wall_ms(ctx, lambda: hf_generate(hf, prompts, hs, 3))
                return (tn - t1) / (hs - 1)
            put("hf_ms", hf_ms)
            row["hf_steps"] = hs
        for k in ("graph", "eager", "fused_no_graph", "engine", "served", "served_sync", "hf"):
            if k + "_ms" in row:
                row[k + "_tok_s"] = b / row[k + "_ms"] * 1e3
                if "roofline_ms" in row:
                    row[k + "_pct_roofline"] = 100 * row["roofline_ms"] / row[k + "_ms"]
        rows.append(row)
        ctx.result["decode"] = rows
        ctx.save()
        ctx.log("decode", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    return rows


@torch.inference_mode()
def engine_ms(ctx: Ctx, model, stepper, prompts, steps) -> float:
    """Engine.generate end to end (prefill, sampling, stop checks, host bookkeeping; overlap as by default):
    (t(N) - t(1)) / (N - 1)."""
    from nemotron.engine.engine import Engine
    from nemotron.engine.request import parse_request
    b = prompts.shape[0]
    eng = Engine(model, BenchTokenizer(model.cfg.padded_vocab_size), max_slots=max(128, b))  # its own cache, graphs
    rows = prompts.tolist()

    def req(n):
        return parse_request({"sentences": ["x"] * b, "tokens_to_generate": n, "min_tokens_to_generate": n,
                              "greedy": True, "end_strings": [], "add_BOS": False}, max_sentences=None)
    eng.generate(req(steps), prompts=rows)  # warm-up
    # medians of 3: one slow run of the short request alone once put this figure below the graph step
    t1 = wall_ms(ctx, lambda: eng.generate(req(1), prompts=rows), reps=3)
    tn = wall_ms(ctx, lambda: eng.generate(req(steps), prompts=rows), reps=3)
    eng = None
    return (tn - t1) / (steps - 1)


_control_group = None


@torch.inference_mode()
def served_ms(ctx: Ctx, model, prompts, steps, overlap: Optional[bool] = None) -> Optional[float]:
    """What the server runs: requests through rank 0's `Coordinator` (its engine loop thread, a header exchange per
    iteration) with the other ranks in `follow`; (t(N) - t(1)) / (N - 1) on rank 0, None elsewhere. overlap: the
    engine's (None: its default, on for CUDA)."""
    global _control_group
    from nemotron.engine.engine import Engine
    from nemotron.engine.lockstep import Coordinator, follow
    from nemotron.engine.request import parse_request
    b = prompts.shape[0]
    eng = Engine(model, BenchTokenizer(model.cfg.padded_vocab_size), max_slots=max(128, b), overlap=overlap)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if distributed and _control_group is None:
        _control_group = dist.new_group(backend="gloo")  # as init_runtime's control group
    if distributed and ctx.ps.rank != 0:
        follow(eng, _control_group)
        return None
    coord = Coordinator(eng, _control_group if distributed else None)
    sentences = [" ".join(map(str, r)) for r in prompts.tolist()]

    def req(n):
        return parse_request({"sentences": sentences, "tokens_to_generate": n, "min_tokens_to_generate": n,
                              "greedy": True, "end_strings": [], "add_BOS": False}, max_sentences=None)
    try:
        coord.generate(req(steps))  # warm-up: graphs captured
        t1 = wall_ms(ctx, lambda: coord.generate(req(1)), reps=3)
        if coord.control is not None:
            coord.control.busy_exchanges, coord.control.busy_seconds = 0, 0.0
        tn = wall_ms(ctx, lambda: coord.generate(req(steps)), reps=3)
        if coord.control is not None and coord.control.busy_exchanges:
            ctx.result.setdefault("served_header_ms" + ("_sync" if overlap is False else ""),
                                  {})[str(prompts.shape[0])] = \
                1e3 * coord.control.busy_seconds / coord.control.busy_exchanges
    finally:
        coord.shutdown()
    return (tn - t1) / (steps - 1)


def from_rank0(ctx: Ctx, value: Optional[float]) -> Optional[float]:
    """Rank 0's number (None: none) on every rank, e.g. for the reporting rank under PP."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([float("nan") if value is None else value], dtype=torch.float64, device=ctx.dev)
    dist.broadcast(t, src=0)
    return None if torch.isnan(t).item() else float(t)


def bench_request(rows: int, tokens: int):
    from nemotron.engine.request import parse_request
    return parse_request({"sentences": ["x"] * rows, "tokens_to_generate": tokens, "min_tokens_to_generate": tokens,
                          "greedy": True, "end_strings": [], "add_BOS": False}, max_sentences=None)


@torch.inference_mode()
def batching_suite(ctx: Ctx, model, long_prompt: int, chunks=(0, 2048, 512, 256), requests_n: int = 24):
    """Continuous batching on one engine, through `Engine.submit` / `step` (what the server's engine loop runs):

    * stall: 8 rows decode; a long prompt joins. Per prefill chunk size (0 = the whole prompt in one iteration):
      iteration ms before it joins and while it prefills (max and mean), and its time to first token;
    * throughput: `requests_n` one-row requests (prompt 128, 16..128 new tokens) submitted at once, run together vs
      one after another (NeMo's server order). Each scenario runs twice; the second (graphs captured) is timed."""
    from nemotron.engine.engine import Engine
    V = model.cfg.padded_vocab_size
    tok = BenchTokenizer(V)
    g = torch.Generator().manual_seed(11)

    def prompts(rows, n):
        return torch.randint(10, V, (rows, n), generator=g).tolist()

    def timed_step(eng):
        t = time.perf_counter()
        eng.step()
        ctx.sync()
        return (time.perf_counter() - t) * 1e3

    out = {"long_prompt": long_prompt, "stall": {}}
    for chunk in chunks:
        eng = Engine(model, tok, max_slots=128, prefill_chunk=chunk)
        eng.generate(bench_request(9, 2), prompts=prompts(9, long_prompt))  # size the cache once: no growth later
        for attempt in range(2):
            running = eng.submit(bench_request(8, 600), prompts(8, 128))
            while not running.started:
                eng.step()
            before = [timed_step(eng) for _ in range(30)][10:]
            joining = eng.submit(bench_request(1, 4), prompts(1, long_prompt))
            during, steps = [], running.steps
            while not joining.started:
                during.append(timed_step(eng))
            assert running.steps == steps + len(during), "a running row missed an iteration"
            eng.abort()
        out["stall"][str(chunk)] = {
            "decode_8_rows_ms": statistics.median(before), "iterations_while_prefilling": len(during),
            "max_iteration_ms": max(during), "mean_iteration_ms": statistics.mean(during),
            "time_to_first_token_ms": sum(during)}
        ctx.log(f"batching: chunk {chunk}:", {k: round(v, 2) for k, v in out["stall"][str(chunk)].items()})
        del eng
        ctx.save()
    lengths = [16 + (112 * i) // (requests_n - 1) for i in range(requests_n)]
    generated = sum(lengths)
    eng = Engine(model, tok, max_slots=128)
    rows = prompts(requests_n, 128)
    for mode in ("together", "one_at_a_time"):
        for attempt in range(2):
            t = time.perf_counter()
            if mode == "together":
                jobs = [eng.submit(bench_request(1, n), [r]) for n, r in zip(lengths, rows)]
                while not all(j.finished for j in jobs):
                    eng.step()
            else:
                for n, r in zip(lengths, rows):
                    eng.generate(bench_request(1, n), prompts=[r])
            ctx.sync()
            ms = (time.perf_counter() - t) * 1e3
        out[mode] = {"requests": requests_n, "generated_tokens": generated, "ms": ms, "tok_s": generated / ms * 1e3}
        ctx.log(f"batching: {requests_n} requests {mode}: {ms:.0f} ms, {generated / ms * 1e3:.0f} tok/s")
    out["together_speedup"] = out["one_at_a_time"]["ms"] / out["together"]["ms"]
    ctx.result["batching"] = out
    ctx.save()
    return out


@torch.inference_mode()
def prefill_bench(ctx: Ctx, model, hf, tokens_n):
    cfg = model.cfg
    cache = model.new_cache(1, tokens_n)
    toks = torch.randint(10, cfg.padded_vocab_size, (1, tokens_n), generator=torch.Generator().manual_seed(7))
    toks = toks.to(ctx.dev)
    ms = timed(ctx, lambda: prefill(model, cache, toks), warmup=1, reps=3)
    h, L, tp = cfg.hidden_size, len(model.decoder.layers), model.ps.tp_size
    lin = per_layer_param_bytes(cfg, tp) // 2 - 4 * h  # linear weights of a layer on this rank
    # matmuls 2 flop/weight/token; causal attention QK^T and PV over T^2/2 pairs; output layer for the last token
    flops = 2 * tokens_n * lin * L + 2 * 2 * (tokens_n * tokens_n / 2) * (cfg.num_attention_heads // tp) \
        * cfg.kv_channels * L + 2 * h * cfg.padded_vocab_size // tp
    res = {"tokens": tokens_n, "ms": ms, "tok_s": tokens_n / ms * 1e3, "TFLOPs": flops / (ms * 1e-3) / 1e12,
           "flops": flops}
    mm = ctx.result.get("roofline", {}).get("matmul_TFLOPs")
    if mm:
        res["pct_matmul_rate"] = 100 * res["TFLOPs"] / mm
    if hf is not None:
        try:
            ms_hf = timed(ctx, lambda: hf(toks, use_cache=False, logits_to_keep=1), warmup=1, reps=3)
            res["hf_ms"] = ms_hf
            res["hf_TFLOPs"] = flops / (ms_hf * 1e-3) / 1e12
        except Exception as exc:  # noqa: BLE001 - the peer's number is optional
            res["hf_error"] = repr(exc)
    cache = None
    ctx.result["prefill"] = res
    ctx.save()
    ctx.log("prefill", res)


def compile_bench(ctx: Ctx, model, stepper, prompts, steps, mode):
    """torch.compile of the eager decode step (static kv_len = cache length), captured in our own CUDA graph."""
    cache = stepper.cache
    b, P = prompts.shape
    S = cache.max_seq
    res = {"mode": mode, "batch": b, "status": "compiling (killed by the time limit if nothing follows)"}
    ctx.result["compile"] = res
    ctx.save()
    t = time.perf_counter()

    def step(tokens, positions):
        batch = Batch(positions.view(b, 1), slice(0, b), kv_len=S, from_start=False)
        hidden = model(tokens.view(b, 1), batch, cache)
        return F.linear(hidden[:, -1], model.output_layer.weight).float()

    try:
        cstep = torch.compile(step, mode=mode, dynamic=False)
        with torch.inference_mode():
            st_tok = torch.zeros(b, dtype=torch.long, device=ctx.dev)
            st_pos = torch.full((b,), P, dtype=torch.long, device=ctx.dev)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    out = cstep(st_tok, st_pos)
            torch.cuda.current_stream().wait_stream(side)
            res["compile_s"] = time.perf_counter() - t
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = cstep(st_tok, st_pos)

            def gstep(tokens, positions, kv_len):
                st_tok.copy_(tokens)
                st_pos.copy_(positions)
                graph.replay()
                return out
            res["ms"] = decode_loop_ms(ctx, gstep, model, cache, prompts, steps)
            res["status"] = "ok"
            toks, _ = greedy(gstep, model, cache, prompts, 64)
            ref = ctx.result.get("agreement", {}).get("tokens_graph")
            if ref is not None and b == 1:
                res["tokens_matching_graph"] = int((toks.cpu() == torch.tensor(ref)).sum())
    except Exception as exc:  # noqa: BLE001 - report, keep the rest of the run
        res["error"] = repr(exc)[:2000]
        res["status"] = "failed"
        res["elapsed_s"] = time.perf_counter() - t
    ctx.result["compile"] = res
    ctx.save()
    ctx.log("compile", res)


# --- TP / slope / all-reduce / extrapolation -----------------------------------------------------------------

def allreduce_latency(ctx: Ctx, hidden: int):
    """ms per all-reduce of [1, hidden] (fp32: the row-parallel partial sums; bf16: the embedding), 64 in a row,
    eager and captured in a graph, through NCCL and (where on) through the peers' memory."""
    ps = ctx.ps
    if ps.tp_group is None or not ctx.cuda:
        return None
    reps = 64
    res = {}
    peer = peer_all_reduce_for(ps.tp_group)
    paths = [("nccl", lambda x: dist.all_reduce(x, group=ps.tp_group))]
    if peer is not None:
        paths.append(("peer", lambda x: peer(x)))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, hidden, dtype=dtype, device=ctx.dev)
        for name, fn in paths:
            eager = timed(ctx, lambda: [fn(x) for _ in range(reps)], warmup=1, reps=3) / reps
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(x)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                for _ in range(reps):
                    fn(x)
            graph = timed(ctx, g.replay, warmup=2, reps=5) / reps
            res[f"{name}_{str(dtype)[6:]}"] = {"bytes": x.numel() * x.element_size(), "eager_ms": eager,
                                               "graph_ms": graph}
        if peer is not None:  # the two paths must agree exactly (same summation order on every rank)
            y = torch.randn(4, hidden, dtype=dtype, device=ctx.dev, generator=torch.Generator(
                device=ctx.dev).manual_seed(ps.rank))
            a, b = peer(y), y.clone()
            dist.all_reduce(b, group=ps.tp_group)
            res[f"peer_vs_nccl_{str(dtype)[6:]}_max_abs_diff"] = float((a.float() - b.float()).abs().max())
    used = "peer" if peer is not None else "nccl"
    res["used_graph_ms"] = res[f"{used}_float32"]["graph_ms"]  # what a decode layer pays per all-reduce
    ctx.result["allreduce_1xh"] = res
    ctx.log("all-reduce [1, h]:", res)
    return res


def extrapolate(ctx: Ctx):
    """340B (96 layers) on TP8 x PP2 over 16 GPUs from this run's TP per-layer cost. Prints the arithmetic."""
    r = ctx.result
    slope = r.get("slope")
    if not slope or not r.get("roofline", {}).get("copy_GBps"):
        ctx.log("extrapolate: needs --slope-layers and a GPU")
        return
    tp = ctx.ps.tp_size
    c = slope["per_layer_ms"]
    fixed = slope["fixed_ms"]
    a = (r.get("allreduce_1xh") or {}).get("used_graph_ms", 0.0)
    copy = r["roofline"]["copy_GBps"]
    full = PRESETS["nemotron-4-340b"]
    L = full.num_layers
    lb8 = per_layer_param_bytes(full, 8)
    ideal_layer8 = lb8 / (copy * 1e9) * 1e3
    out_bytes8 = 2 * full.padded_vocab_size * full.hidden_size / 8
    c8 = (c - 2 * a) * tp / 8 + 2 * a  # weight-read part scales with the shard, 2 all-reduces per layer stay
    fixed8 = fixed * tp / 8
    hop = 0.05  # assumed: one [1, 18432] bf16 send/recv between the two nodes per token
    lines = [
        f"measured at TP{tp} on this card: per-layer {c:.4f} ms, fixed (embedding, final norm, output layer, argmax) "
        f"{fixed:.4f} ms, all-reduce of [1, {full.hidden_size}] fp32 in a graph {a:.4f} ms, copy {copy:.0f} GB/s",
        f"TP8 per layer = (per-layer - 2 x all-reduce) x {tp}/8 + 2 x all-reduce = ({c:.4f} - {2 * a:.4f}) x {tp}/8 "
        f"+ {2 * a:.4f} = {c8:.4f} ms (all-reduce latency assumed unchanged from TP{tp} to TP8)",
        f"TP8 fixed = {fixed:.4f} x {tp}/8 = {fixed8:.4f} ms",
        f"PP2: 48 layers per stage run one stage after the other, so a token crosses all {L} layers in sequence "
        f"plus one stage hop (assumed {hop} ms)",
        f"per token = {L} x {c8:.4f} + {fixed8:.4f} + {hop} = {L * c8 + fixed8 + hop:.2f} ms -> "
        f"{1e3 / (L * c8 + fixed8 + hop):.1f} tok/s (batch 1, CUDA graph per stage)",
        f"bandwidth floor on this card: {L} x {lb8 / 1e9:.3f} GB / {copy:.0f} GB/s + output layer "
        f"{out_bytes8 / 1e9:.3f} GB = {L * ideal_layer8 + out_bytes8 / (copy * 1e9) * 1e3:.2f} ms -> "
        f"{1e3 / (L * ideal_layer8 + out_bytes8 / (copy * 1e9) * 1e3):.1f} tok/s at 100 % of copy bandwidth",
    ]
    eager = slope.get("eager_per_layer_ms")
    if eager:
        e8 = eager  # launch-bound: does not shrink with the shard
        lines.append(f"eager, for comparison (no graphs): per layer {eager:.4f} ms at TP{tp}, "
                     f"launch-bound so taken unchanged at TP8 -> {L} x {e8:.4f} + {slope.get('eager_fixed_ms', 0):.4f}"
                     f" + {hop} = {L * e8 + slope.get('eager_fixed_ms', 0) + hop:.1f} ms -> "
                     f"{1e3 / (L * e8 + slope.get('eager_fixed_ms', 0) + hop):.1f} tok/s")
    r["extrapolation_340b_tp8_pp2"] = {"lines": lines, "per_layer_tp8_ms": c8, "fixed_tp8_ms": fixed8, "hop_ms": hop,
                                       "per_token_ms": L * c8 + fixed8 + hop,
                                       "tok_s": 1e3 / (L * c8 + fixed8 + hop)}
    for line in lines:
        ctx.log("extrapolate:", line)


def fit_extrapolation(paths) -> list:
    """340B on TP8 x PP2 from two runs (`--slope-layers`) of the 340B-width slice at different TP degrees on the same
    card: fits each per-layer and fixed cost as bytes / tp + overhead, which `extrapolate` assumes is ~0 (it scales
    everything but the all-reduces). Returns the arithmetic as lines."""
    try:
        runs = [json.load(open(p)) for p in paths]
        (a, b) = sorted(runs, key=lambda r: r["tp"])
        same_card = a["env"]["gpu"] == b["env"]["gpu"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--fit: cannot read {paths} as two benchmark.py result JSONs: {type(exc).__name__}: {exc}")
    full = PRESETS["nemotron-4-340b"]
    if a["tp"] == b["tp"] or not same_card or not (a.get("slope") and b.get("slope")):
        raise SystemExit("--fit needs two --slope-layers runs at different TP degrees on the same card")
    lines = [f"measured on {a['env']['gpu']}: TP{a['tp']} and TP{b['tp']} ({a['date']}, {b['date']})"]
    at8 = {}
    for key, what in (("per_layer_ms", "per layer"), ("fixed_ms", "fixed (embedding, final norm, output, argmax)")):
        ca, cb = a["slope"][key], b["slope"][key]
        scaled = (ca - cb) / (1 / a["tp"] - 1 / b["tp"])  # the part that shrinks with the shard, at TP1
        overhead = ca - scaled / a["tp"]
        at8[key] = scaled / 8 + overhead
        lines.append(f"{what}: TP{a['tp']} {ca:.4f} ms, TP{b['tp']} {cb:.4f} ms = {scaled:.4f} / tp + {overhead:.4f}"
                     f" -> TP8 {scaled:.4f} / 8 + {overhead:.4f} = {at8[key]:.4f} ms")
    hop = 0.05  # as `extrapolate`: one [1, 18432] bf16 send/recv between the two nodes per token
    ms = full.num_layers * at8["per_layer_ms"] + at8["fixed_ms"] + hop
    lines.append(f"per token = {full.num_layers} x {at8['per_layer_ms']:.4f} + {at8['fixed_ms']:.4f} + {hop} (hop, "
                 f"assumed) = {ms:.2f} ms -> {1e3 / ms:.1f} tok/s (batch 1, CUDA graph per stage; overheads assumed "
                 f"the same at TP8)")
    return lines


def decode_suite(ctx: Ctx, model, cache):
    """TP-scaling mode: batch decode ms/step (graph and eager), greedy tokens, per-layer slope, all-reduce."""
    a = ctx.args
    cfg = model.cfg
    stepper = Stepper(model, cache)
    prompts1 = torch.randint(10, cfg.padded_vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(99))
    prompts1 = prompts1.to(ctx.dev)

    def tokens():
        toks, _ = greedy(stepper.graph, model, cache, prompts1, 32)
        ctx.result["tokens_graph_batch1"] = toks.tolist()
        toks_e, lg_e = greedy(stepper.eager, model, cache, prompts1, 32)
        ctx.result["tokens_eager_matching_graph"] = int((toks == toks_e).sum())
        # eager's own greedy tokens teacher-forced through the graph step: top-1 agreement without cascades
        tf, lg_g = greedy(stepper.graph, model, cache, prompts1, 32, forced=toks_e)
        forced = {"top1_matching": int((tf == toks_e).sum()), "of": int(toks_e.numel())}
        if lg_g is not None:  # this rank has logits (under PP: the last stage, which writes the JSON)
            rel = ((lg_g - lg_e).abs().amax(-1) / lg_e.abs().amax(-1)).flatten()
            forced.update(logits_rel_diff_max=float(rel.max()), logits_rel_diff_median=float(rel.median()))
        ctx.result["eager_tokens_teacher_forced_through_graph"] = forced
        ctx.log("greedy tokens (graph, batch 1):", toks.tolist()[0][:16], "... eager matching:",
                ctx.result["tokens_eager_matching_graph"], "/ 32; teacher-forced:",
                ctx.result["eager_tokens_teacher_forced_through_graph"])
    guarded(ctx, "tokens", tokens)
    decode_bench(ctx, model, stepper, None, a.batches, a.prompt, a.steps,
                 variants=("graph", "eager", "engine", "served"))
    if a.allreduce == "both" and ps_has_peer(ctx) and stepper.graphs is not None:
        if peer_exchange_for(ctx.ps.tp_group) is not None:
            guarded(ctx, "decode_one_shot", decode_with, ctx, model, stepper, prompts1, "one_shot_allreduce",
                    without_exchange)
        guarded(ctx, "decode_nccl", decode_with, ctx, model, stepper, prompts1, "nccl_allreduce", nccl_only)
    if a.profile:
        guarded(ctx, "profile", profile_stage, ctx, model, stepper, a.profile)
    if a.slope_layers:
        guarded(ctx, "slope", slope_stage, ctx, model, cache, stepper)
    guarded(ctx, "allreduce", allreduce_latency, ctx, cfg.hidden_size)
    if a.extrapolate:
        extrapolate(ctx)
    ctx.save()


@torch.inference_mode()
def kernels_suite(ctx: Ctx, cfg: ModelConfig):
    """The decode kernels alone at this shape (no model), each timed inside a CUDA graph as a decode step runs
    them: skinny matmul configs vs cuBLAS per weight matrix, decode attention vs masked SDPA; GB/s of bytes read."""
    dev, res = ctx.dev, {}
    h, f, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size
    hn = cfg.kv_channels or h // cfg.num_attention_heads
    ng, hpg = cfg.num_query_groups, cfg.num_attention_heads // cfg.num_query_groups
    shapes = {"qkv": (ng * (hpg + 2) * hn, h), "proj": (h, hpg * ng * hn), "fc1": (f, h), "fc2": (h, f),
              "output": (V, h)}
    for name, (N, K) in shapes.items():
        w = torch.randn(N, K, dtype=torch.bfloat16, device=dev) * 0.02
        for M in (1, 8, 16, 64):
            x = torch.randn(M, K, dtype=torch.bfloat16, device=dev)
            y = torch.empty(M, N, dtype=torch.bfloat16, device=dev)
            t = {"cublas": kernels_mod.graph_time_ms(lambda: F.linear(x, w))}
            for c in kernels_mod.skinny_configs(M):
                t[str(c)] = kernels_mod.graph_time_ms(lambda: kernels_mod._skinny_launch(x, w, y, False, c))
            best = min(t, key=t.get)
            res[f"mm_{name}_M{M}"] = {"N": N, "K": K, "ms": t, "best": best,
                                      "best_GBps": N * K * 2 / (t[best] * 1e-3) / 1e9,
                                      "cublas_GBps": N * K * 2 / (t["cublas"] * 1e-3) / 1e9}
            ctx.log(f"mm {name} M{M}: cublas {res[f'mm_{name}_M{M}']['cublas_GBps']:.0f} GB/s, best {best} "
                    f"{res[f'mm_{name}_M{M}']['best_GBps']:.0f} GB/s")
        w = None
    for n, kv in ((1, 256), (8, 256), (64, 256), (128, 256), (128, 1024), (1, 4096)):
        S = kv
        ck = torch.randn(n, ng, S, hn, dtype=torch.bfloat16, device=dev)
        cv = torch.randn_like(ck)
        q = torch.randn(n, ng, hpg, hn, dtype=torch.bfloat16, device=dev)
        pos = torch.full((n,), kv - 1, device=dev)
        slots = torch.arange(n, device=dev)
        t = {}
        for force in (True, False):
            kernels_mod.FORCE_TORCH = force
            t["sdpa" if force else "triton"] = kernels_mod.graph_time_ms(
                lambda: kernels_mod.decode_attention(q, ck, cv, pos, slots, kv))
        kernels_mod.FORCE_TORCH = False
        kv_bytes = 2 * n * ng * kv * hn * 2
        res[f"attn_b{n}_kv{kv}"] = {"ms": t, "kv_bytes": kv_bytes,
                                    **{f"{k}_GBps": kv_bytes / (v * 1e-3) / 1e9 for k, v in t.items()}}
        ctx.log(f"attention b{n} kv{kv}:", {k: round(v, 4) for k, v in t.items()},
                f"triton {res[f'attn_b{n}_kv{kv}']['triton_GBps']:.0f} GB/s")
    res["attention_config_timings_ms"] = kernels_mod.attn_timings
    ctx.result["kernels"] = res
    ctx.save()


def ps_has_peer(ctx: Ctx) -> bool:
    return ctx.ps.tp_group is not None and peer_all_reduce_for(ctx.ps.tp_group) is not None


def decode_with(ctx: Ctx, model, stepper, prompts1, name: str, paths):
    """The batch-1 graph step again (graphs recaptured) inside `paths(tp_group)`: without the peer exchange (an
    all-reduce kernel per sum, through the peers' memory) or with NCCL only; then the default path back on. The
    sum path's share of the step, measured in the same run; greedy tokens compared with the default path's."""
    stepper.graphs.reset()
    try:
        with paths(ctx.ps.tp_group):
            toks, _ = greedy(stepper.graph, model, stepper.cache, prompts1, 32)
            ms = decode_loop_ms(ctx, stepper.graph, model, stepper.cache, prompts1, ctx.args.steps)
    finally:
        stepper.graphs.reset()  # the graphs captured the other path
    same = int((toks == torch.tensor(ctx.result.get("tokens_graph_batch1", toks.tolist()), device=toks.device)).sum())
    ctx.result[f"decode_batch1_{name}"] = {"graph_ms": ms, "tokens_matching_default_path": same,
                                           "of": int(toks.numel())}
    ctx.log(f"batch 1 with {name}:", ctx.result[f"decode_batch1_{name}"])


@torch.inference_mode()
def profile_stage(ctx: Ctx, model, stepper, batches, steps: int = 5):
    """Where the captured decode step's time goes, per kernel. Graph replays are profiled (CUPTI reports the
    kernels inside a graph); under PDL a kernel starts early and waits, so its duration is not its cost. Its cost
    here is its *increment*: its end minus the previous kernel's end (kernels of one stream end in order), or its
    duration if it started on an idle GPU; the increments sum to the GPU's busy time. Reported per kernel name,
    and the last step's kernels in order (a layer's kernels repeat in it)."""
    if not ctx.cuda:
        return
    assert steps >= 2, "the first profiled step is left out"
    from torch.profiler import ProfilerActivity, profile
    cfg, res = model.cfg, {}
    for b in batches:
        prompts = torch.randint(10, cfg.padded_vocab_size, (b, ctx.args.prompt),
                                generator=torch.Generator().manual_seed(11)).to(ctx.dev)
        P = prompts.shape[1]
        tok = prefill(model, stepper.cache, prompts).argmax(-1)
        pos = torch.full((b,), P, dtype=torch.long, device=ctx.dev)

        def run():
            for _ in range(steps):
                stepper.graph(tok, pos, P + 1)
        run()
        ctx.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            ctx.sync()
        kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                          if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
                          and e.name and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                         key=lambda k: k[0])
        if not kernels:
            ctx.log(f"profile batch {b}: no kernels reported")
            continue
        per_step = len(kernels) // steps
        by_name: dict = {}
        seq = []  # the last step's kernels in order: (name, increment us, duration us)
        prev_end = kernels[0][0]
        for i, (start, end, name) in enumerate(kernels):
            # a kernel that starts on an idle GPU (a replay's first, after the host) counts its own duration only
            inc = end - max(start, prev_end) if end > prev_end else 0.0
            prev_end = max(prev_end, end)
            if i < per_step:
                # The first step is left out: under TP its first collective waits for the ranks that started
                # profiling later (ninth round: 25-110 ms, which swamped the per-step totals).
                continue
            short = name.removeprefix("void ").replace("(anonymous namespace)::", "").split("(")[0]
            short = short.split("<")[0][:60]
            slot = by_name.setdefault(short, [0, 0.0, 0.0])
            slot[0] += 1
            slot[1] += inc
            slot[2] += end - start
            if i >= len(kernels) - per_step:
                seq.append((short, round(inc, 2), round(end - start, 2)))
        counted = steps - 1
        rows = sorted(({"kernel": k, "calls_per_step": v[0] / counted, "increment_us_per_step": v[1] / counted,
                        "duration_us_per_step": v[2] / counted} for k, v in by_name.items()),
                      key=lambda r: -r["increment_us_per_step"])
        total = sum(r["increment_us_per_step"] for r in rows) / 1e3
        res[str(b)] = {"kernels_per_step": per_step, "increments_ms_per_step": total, "by_kernel": rows,
                       "last_step_sequence": seq}
        ctx.log(f"profile batch {b} (graph replay): {per_step} kernels, increments {total:.3f} ms/step")
        for r in rows[:16]:
            ctx.log(f"   {r['increment_us_per_step'] / 1e3:8.4f} ms  x{r['calls_per_step']:5.0f}  "
                    f"(duration {r['duration_us_per_step'] / 1e3:7.4f})  {r['kernel']}")
        mid = per_step // 2  # a layer in the middle of the step, for the per-position view
        ctx.log("   mid-step sequence (name, increment us, duration us):", seq[mid:mid + 24])
    ctx.result["profile"] = res
    ctx.save()


def slope_stage(ctx: Ctx, model, cache, stepper):
    """Per-layer cost: the step over all K layers minus the step over the first k2 layers, over K - k2."""
    a, cfg = ctx.args, model.cfg
    k2, K = a.slope_layers, len(model.decoder.layers)
    small = Stepper(model, cache, num_layers=k2)
    p = torch.randint(10, cfg.padded_vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(3))
    p = p.to(ctx.dev)
    tK = decode_loop_ms(ctx, stepper.graph, model, cache, p, a.steps)
    tk = decode_loop_ms(ctx, small.graph, model, cache, p, a.steps)
    eK = decode_loop_ms(ctx, stepper.eager, model, cache, p, 16)
    layers = model.decoder.layers  # eager over k2 layers: a view of the model with fewer layers
    try:
        model.decoder.layers = torch.nn.ModuleList(list(layers)[:k2])
        ek = decode_loop_ms(ctx, stepper.eager, model, cache, p, 16)
    finally:
        model.decoder.layers = layers
    c, ce = (tK - tk) / (K - k2), (eK - ek) / (K - k2)
    ctx.result["slope"] = {"layers": [K, k2], "graph_ms": [tK, tk], "per_layer_ms": c, "fixed_ms": tK - K * c,
                           "eager_ms": [eK, ek], "eager_per_layer_ms": ce, "eager_fixed_ms": eK - K * ce}
    ctx.log("slope:", ctx.result["slope"])


# --- output --------------------------------------------------------------------------------------------------

def plot(ctx: Ctx, path: str):
    rows = ctx.result.get("decode") or []
    if not rows or not path:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"graph": "ours: CUDA-graph decode step", "engine": "ours: Engine.generate end to end",
              "eager": "ours: eager decode step", "hf": "HF transformers generate (eager)"}
    for key, style in (("graph", "o-"), ("engine", "s--"), ("eager", "^:"), ("hf", "x-")):
        pts = [(r["batch"], r[key + "_tok_s"]) for r in rows if key + "_tok_s" in r]
        if pts:
            ax.plot(*zip(*pts), style, label=labels[key])
    roof = [(r["batch"], r["batch"] / r["roofline_ms"] * 1e3) for r in rows if "roofline_ms" in r]
    if roof:
        ax.plot(*zip(*roof), "k-", alpha=0.3, label="roofline (copy bandwidth, weights + KV)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (rows decoding together)")
    ax.set_ylabel("generated tokens / s")
    env = ctx.result.get("env", {})
    ax.set_title(f"{ctx.result.get('preset')} decode, {env.get('gpu', '')}, prompt {ctx.args.prompt}, "
                 f"{ctx.args.steps} new", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    ctx.log("plot written:", path)


def table(ctx: Ctx):
    r = ctx.result
    print("\n==== summary", r.get("preset"), "layers", r.get("num_layers"), "TP", ctx.ps.tp_size, "PP",
          ctx.ps.pp_size, "|", r.get("env", {}).get("gpu"), "====")
    if "roofline" in r and r["roofline"].get("copy_GBps"):
        print(f"copy {r['roofline']['copy_GBps']:.0f} GB/s  matmul {r['roofline']['matmul_TFLOPs']:.0f} TFLOP/s")
    if r.get("decode"):
        print(f"{'batch':>5} {'roof ms':>8} {'graph ms':>9} {'%roof':>6} {'engine ms':>9} {'served':>7} "
              f"{'sync':>7} {'eager ms':>9} "
              f"{'fused-ng':>8} {'HF ms':>8} {'graph tok/s':>11} {'HF tok/s':>9} {'x HF':>6}")
        for row in r["decode"]:
            def f(k, fmt="{:.2f}"):
                return fmt.format(row[k]) if k in row else "-"
            ratio = f"{row['graph_tok_s'] / row['hf_tok_s']:.1f}" if "hf_tok_s" in row and "graph_tok_s" in row else "-"
            print(f"{row['batch']:>5} {f('roofline_ms'):>8} {f('graph_ms'):>9} {f('graph_pct_roofline', '{:.0f}'):>6} "
                  f"{f('engine_ms'):>9} {f('served_ms'):>7} {f('served_sync_ms'):>7} {f('eager_ms'):>9} "
                  f"{f('fused_no_graph_ms'):>8} {f('hf_ms'):>8} "
                  f"{f('graph_tok_s', '{:.0f}'):>11} {f('hf_tok_s', '{:.0f}'):>9} {ratio:>6}")
    if "prefill" in r:
        p = r["prefill"]
        print(f"prefill {p['tokens']}: {p['ms']:.1f} ms, {p['tok_s']:.0f} tok/s, {p['TFLOPs']:.0f} TFLOP/s"
              + (f" = {p['pct_matmul_rate']:.0f}% of matmul" if "pct_matmul_rate" in p else "")
              + (f"; HF {p['hf_ms']:.1f} ms" if "hf_ms" in p else ""))
    if "agreement" in r:
        ag = r["agreement"]
        for k in ("graph_vs_fused_no_graph", "graph_vs_eager", "graph_vs_hf", "eager_vs_hf"):
            if k in ag:
                print(f"{k}: {ag[k]['matching_tokens']}/{ag[k]['of']} (first divergence {ag[k]['first_divergence']})")
        if "hf_teacher_forced_top1_agreement" in ag:
            t = ag["hf_teacher_forced_top1_agreement"]
            print(f"HF tokens teacher-forced through our graph: top-1 {t['matching']}/{t['of']}, logits rel diff "
                  f"{ag['hf_teacher_forced_logits_rel_diff']}")
    if "compile" in r:
        print("compile:", {k: v for k, v in r["compile"].items() if k != "error"}, r["compile"].get("error", "")[:200])
    if "slope" in r:
        print("slope:", r["slope"])
    if "extrapolation_340b_tp8_pp2" in r:
        for line in r["extrapolation_340b_tp8_pp2"]["lines"]:
            print("  ", line)


# --- main ----------------------------------------------------------------------------------------------------

def setup(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp * args.pp:
        raise SystemExit(f"--tp {args.tp} --pp {args.pp} needs {args.tp * args.pp} processes (torchrun "
                         f"--nproc-per-node {args.tp * args.pp}); WORLD_SIZE is {world}")
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    rank, tp_group, pp_group = 0, None, None
    if world > 1:
        kw = {"device_id": dev} if want_cuda else {}
        dist.init_process_group("nccl" if want_cuda else "gloo", **kw)
        rank = dist.get_rank()
        tp, pp = args.tp, args.pp
        for p in range(pp):  # as nemotron.parallel.runtime: TP groups are runs of consecutive ranks
            g = dist.new_group(list(range(p * tp, (p + 1) * tp)))
            if p == rank // tp:
                tp_group = g
        for t in range(tp):
            g = dist.new_group([p * tp + t for p in range(pp)])
            if t == rank % tp:
                pp_group = g
    ps = ParallelState(tp_size=args.tp, pp_size=args.pp, rank=rank, device=dev,
                       tp_group=tp_group if args.tp > 1 else None, pp_group=pp_group if args.pp > 1 else None)
    if args.allreduce != "nccl":
        ps_peer = enable_peer_all_reduce(ps.tp_group, dev)
        if args.tp > 1 and rank == 0:
            print("peer all-reduce:", "on" if ps_peer else "off (NCCL)", flush=True)
    return ps, dev


def auto_layers(cfg: ModelConfig, ps: ParallelState, dev, reserve_gb: float) -> int:
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 8e9
    fixed = 2 * 2 * cfg.padded_vocab_size * cfg.hidden_size / ps.tp_size
    k = int((free - reserve_gb * 1e9 - fixed) // per_layer_param_bytes(cfg, ps.tp_size))
    if ps.tp_group is not None:
        t = torch.tensor([k], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ps.tp_group)
        k = int(t)
    return max(1, min(k, cfg.num_layers))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-8b", help=f"one of {sorted(PRESETS)} or 'tiny'")
    ap.add_argument("--layers", default=None, help="override num_layers: an integer, or 'auto' (as many as fit)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (processes under torchrun = tp x pp)")
    ap.add_argument("--allreduce", choices=("peer", "nccl", "both"), default="both",
                    help="TP decode all-reduces: through the peers' memory, NCCL, or time both (decode suite)")
    ap.add_argument("--suite", choices=("full", "decode", "kernels", "batching"), default="full",
                    help="full: roofline, correctness, HF peer, decode, prefill (one GPU); decode: TP scaling; "
                         "batching: continuous batching and chunked prefill through the engine")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--batches", default="1,8,64,128")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128, help="new tokens per decode measurement")
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--agree-steps", type=int, default=64)
    ap.add_argument("--std", type=float, default=0.02, help="weight std of the seeded random model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--compile", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode for the batch-1 compiled variant ('off' to skip); runs last, if the "
                         "budget leaves --compile-min-s")
    ap.add_argument("--compile-min-s", type=float, default=200)
    ap.add_argument("--profile", default="",
                    help="decode suite: where the graph step's time goes, per kernel, at these batches")
    ap.add_argument("--slope-layers", type=int, default=0, help="also time the first K layers: per-layer cost")
    ap.add_argument("--extrapolate", action="store_true", help="340B on TP8xPP2 from this run's per-layer cost")
    ap.add_argument("--fit", nargs=2, metavar="JSON", help="no run: 340B on TP8xPP2 fitted from two --slope-layers "
                                                          "runs' JSON at different TP degrees on one card")
    ap.add_argument("--reserve-gb", type=float, default=8.0, help="--layers auto: GPU memory left for the rest")
    ap.add_argument("--budget-s", type=float, default=480, help="skip later stages past this many seconds")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--plot", default=None, help="PNG: tok/s vs batch")
    args = ap.parse_args()
    args.batches = [int(x) for x in args.batches.split(",") if x]
    args.profile = [int(x) for x in args.profile.split(",") if x]
    if args.fit:
        print("\n".join(fit_extrapolation(args.fit)))
        return

    ps, dev = setup(args)
    cfg = TINY if args.preset == "tiny" else PRESETS[args.preset]
    if args.layers == "auto":
        cfg = cfg.replace(num_layers=auto_layers(cfg, ps, dev, args.reserve_gb))
    elif args.layers:
        cfg = cfg.replace(num_layers=int(args.layers))
    ctx = Ctx(args, ps, dev)
    ctx.result.update({
        "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "preset": args.preset,
        "num_layers": cfg.num_layers, "tp": ps.tp_size, "pp": ps.pp_size, "config": cfg.__dict__,
        "peer_allreduce": ps.tp_group is not None and peer_all_reduce_for(ps.tp_group) is not None,
        "peer_exchange": peer_exchange_for(ps.tp_group) is not None,
        "env": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(dev) if ctx.cuda else "cpu",
                "cuda": torch.version.cuda, "triton": getattr(kernels_mod.triton, "__version__", None)},
    })
    dtype = torch.bfloat16
    measure_roofline(ctx)
    if args.suite == "kernels":
        kernels_suite(ctx, cfg)
        return
    t = time.perf_counter()
    model = NemotronModel(cfg, ps, dtype=dtype, device=dev).eval()
    fill_seeded(model, args.seed, args.std)
    ctx.sync()
    ctx.result["build_s"] = time.perf_counter() - t
    if ctx.cuda:
        ctx.result["memory_after_build_GB"] = torch.cuda.memory_allocated(dev) / 1e9
    ctx.log(f"built {args.preset} ({cfg.num_layers} layers, TP{ps.tp_size}) in {ctx.result['build_s']:.1f} s")
    max_b = max(args.batches)
    slots = batch_bucket(max_b) or max_b
    cache = model.new_cache(slots, -(-(args.prompt + args.steps) // 64) * 64)
    guarded(ctx, "check_kernels", check_kernels, ctx, model)

    if args.suite == "decode":
        decode_suite(ctx, model, cache)
    elif args.suite == "batching":
        del cache
        guarded(ctx, "batching", batching_suite, ctx, model, min(args.prefill, cfg.max_position_embeddings - 8))
    else:
        hf = None
        if not args.no_hf:
            hf, impl = build_hf(ctx, model)
            ctx.result["hf"] = {"attn_implementation": impl, "transformers": __import__("transformers").__version__}
            ctx.log("HF model built, attention:", impl)
        stepper = Stepper(model, cache)
        p = torch.randint(10, cfg.padded_vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(42))
        guarded(ctx, "agreement", agreement, ctx, model, stepper, hf, p.to(dev), args.agree_steps)
        ctx.save()
        decode_bench(ctx, model, stepper, hf, args.batches, args.prompt, args.steps,
                     variants=("graph", "eager", "fused", "engine", "served"))
        if stepper.graphs is not None:
            ctx.result["graph_captures"] = {"count": stepper.graphs.captures, "seconds": stepper.graphs.capture_s}
        if args.profile:
            guarded(ctx, "profile", profile_stage, ctx, model, stepper, args.profile)
        if ctx.left() > 20:
            guarded(ctx, "prefill", prefill_bench, ctx, model, hf, args.prefill)
        del hf
        if ctx.cuda:
            torch.cuda.empty_cache()
        guarded(ctx, "plot", plot, ctx, args.plot)
        ctx.save()
        table(ctx)
        if args.compile != "off" and ctx.cuda and ctx.left() > args.compile_min_s:
            compile_bench(ctx, model, stepper, p.to(dev), args.steps, args.compile)
    ctx.result["decode_matmul_choice"] = {  # per weight shape: cuBLAS or the skinny kernel, and the timings
        "choices": {kernels_mod.product_name(k): kernels_mod.choice_name(v)
                    for k, v in kernels_mod._skinny_choice.items()},
        "timings_ms": kernels_mod.skinny_timings, "errors": kernels_mod.skinny_errors,
        "step_tuning": kernels_mod.step_tuning}
    ctx.result["decode_attention_choice"] = {
        "choices": {str(k[:5]): str(v) for k, v in kernels_mod._attn_choice.items()},
                                             "timings_ms": kernels_mod.attn_timings}
    ctx.result["elapsed_s"] = time.perf_counter() - T0
    ctx.save()
    if ctx.rank0:
        table(ctx)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
