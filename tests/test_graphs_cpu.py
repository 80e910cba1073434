"""The CUDA-graph decode path off CUDA: its fallbacks, its buckets, and the fused step's math against the model.

The graphs themselves need a GPU (scripts/benchmark.py checks graph replay against eager there). Here:
* the engine falls back to eager decode on CPU, with unchanged results;
* the fused decode step (torch fallbacks of the fused ops) equals `NemotronModel` decode within 1e-5, and so does
  `DecodeGraphs.run` with capture=False (static buffers, bucket padding); under pipeline parallelism see
  test_graphs_pp.py;
* where Triton is installed, its kernels run in the interpreter (TRITON_INTERPRET=1, subprocess) and equal the
  torch fallbacks.
"""
import os

import pytest
import torch

from conftest import run_in_triton_interpreter

from nemotron.engine.engine import Engine
from nemotron.engine.forward import forward_logits
from nemotron.engine.graphs import BATCH_BUCKETS, DecodeGraphs, FusedDecoder, batch_bucket, kv_bucket
from nemotron.engine.request import parse_request
from nemotron.model import Batch, NemotronModel
from nemotron.parallel.state import ParallelState

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64, 65, 128)] == [1, 2, 4, 8, 8, 16, 64, 128, 128]
    assert batch_bucket(129) is None
    assert BATCH_BUCKETS == (1, 2, 4, 8, 16, 32, 64, 128)
    assert [kv_bucket(k, 4096) for k in (1, 64, 65, 129, 193, 256, 513, 1000, 4000)] == \
        [64, 64, 128, 192, 256, 256, 640, 1024, 4096]
    assert kv_bucket(250, 200) == 200  # never beyond the cache
    for k in range(1, 4097, 7):  # covers, and wastes less than a quarter beyond 256
        s = kv_bucket(k, 4096)
        assert k <= s and (s - k < 64 or (s - k) * 4 < k)


def test_graphs_refuse_cpu_but_not_pipeline(tiny_model, tiny_cfg):
    ok, why = DecodeGraphs.supported(tiny_model)
    assert not ok and "cpu" in why
    with pytest.raises(ValueError):
        DecodeGraphs(tiny_model)
    assert DecodeGraphs(tiny_model, capture=False).capture is False  # uncaptured: no CUDA needed
    # A pipeline stage's step covers its own layers; only the last stage has a final LayerNorm.
    first = FusedDecoder(NemotronModel(tiny_cfg, ParallelState(pp_size=2, rank=0)))
    last = FusedDecoder(NemotronModel(tiny_cfg, ParallelState(pp_size=2, rank=1)))
    assert len(first.layers) == len(last.layers) == tiny_cfg.num_layers // 2
    assert (first.first, first.last, last.first, last.last) == (True, False, False, True)
    assert len(first._norm_weights) + 1 == len(last._norm_weights)


def test_engine_on_cpu_decodes_eagerly(tiny_model, tiny_tokenizer):
    req = parse_request({"sentences": ["def f(x):", "a"], "greedy": True, "tokens_to_generate": 6,
                         "min_tokens_to_generate": 6})
    default = Engine(tiny_model, tiny_tokenizer)
    asked = Engine(tiny_model, tiny_tokenizer, cuda_graphs=True)
    assert default.graphs is None and asked.graphs is None
    assert default.generate(req)["token_ids"] == asked.generate(req)["token_ids"]


def _decode_logits_both_ways(model, cfg, batch, steps, seed=0):
    """Prefill rows of different lengths (row b in slot batch-b: rows need not sit in their own index), then decode
    `steps` tokens through the model and the fused step."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3 + 5 * b for b in range(batch)]
    slots = torch.arange(batch, 0, -1)
    ref_cache, fused_cache = model.new_cache(batch + 1, 64), model.new_cache(batch + 1, 64)
    fused = FusedDecoder(model)
    last = []
    for b, n in enumerate(lengths):
        toks = torch.randint(0, cfg.padded_vocab_size, (1, n), generator=g)
        pos = torch.arange(n).view(1, n)
        for cache in (ref_cache, fused_cache):
            forward_logits(model, toks, Batch(pos, slots[b:b + 1], kv_len=n, from_start=True), cache)
        last.append(int(toks[0, -1]))
    tokens = torch.tensor(last)
    positions = torch.tensor(lengths) - 1
    worst = 0.0
    for _ in range(steps):
        positions = positions + 1
        tokens = torch.randint(0, cfg.padded_vocab_size, (batch,), generator=g)
        kv = int(positions.max()) + 1
        ref = forward_logits(model, tokens.view(-1, 1), Batch(positions.view(-1, 1), slots, kv_len=kv,
                                                                from_start=False), ref_cache)
        got = fused(tokens, positions, slots, fused_cache, kv_bucket(kv, 64))
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    torch.testing.assert_close(fused_cache.k, ref_cache.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_cache.v, ref_cache.v, rtol=1e-5, atol=1e-5)
    return worst


@torch.inference_mode()
def test_fused_decode_equals_model_decode(tiny_model, tiny_cfg):
    assert _decode_logits_both_ways(tiny_model, tiny_cfg, batch=3, steps=5) < 1e-5


@torch.inference_mode()
def test_uncaptured_graph_run_equals_model_decode(tiny_model, tiny_cfg):
    """`run`'s own path (static buffers, 3 rows in slots 2, 0, 1 padded to bucket 4, the padding row in the last
    slot) against forward_logits on another cache."""
    graphs = DecodeGraphs(tiny_model, capture=False)
    g = torch.Generator().manual_seed(1)
    lengths, slots = [4, 9, 2], [2, 0, 1]
    ref_cache, cache = tiny_model.new_cache(4, 64), tiny_model.new_cache(4, 64)
    for b, n in enumerate(lengths):
        toks = torch.randint(0, tiny_cfg.padded_vocab_size, (1, n), generator=g)
        for c in (ref_cache, cache):
            forward_logits(tiny_model, toks, Batch(torch.arange(n).view(1, n), torch.tensor([slots[b]]), kv_len=n), c)
    pos = list(lengths)
    for B in (3, 3, 2, 3):
        tokens = torch.randint(0, tiny_cfg.padded_vocab_size, (B,), generator=g)
        kv = max(pos[:B]) + 1
        ref = forward_logits(tiny_model, tokens.view(B, 1), Batch(torch.tensor(pos[:B]).view(B, 1),
                                                                  torch.tensor(slots[:B]), kv_len=kv,
                                                                  from_start=False), ref_cache)
        got = graphs.run(tokens, pos[:B], kv, cache, slots=slots[:B])
        assert got.shape == (B, tiny_cfg.padded_vocab_size)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        pos[:B] = [p + 1 for p in pos[:B]]
    torch.testing.assert_close(cache.k[:, :3], ref_cache.k[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.v[:, :3], ref_cache.v[:, :3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kept for padding rows"):  # a real row in the padding slot
        graphs.run(tokens[:3], pos[:3], kv + 2, cache, slots=[0, 1, 3])


def test_fused_gamma_cache_follows_weight_updates(tiny_cfg, tiny_state):
    model = NemotronModel(tiny_cfg).eval()
    model.load_state_dict(tiny_state)
    fused = FusedDecoder(model)
    w = model.decoder.layers[0].mlp.linear_fc1.layer_norm_weight
    v0 = fused.weights_version()
    g0 = fused.gamma(w, True)
    assert fused.gamma(w, True) is g0
    torch.testing.assert_close(g0, w + 1)
    with torch.no_grad():
        w.add_(0.5)
    assert fused.weights_version() != v0
    torch.testing.assert_close(fused.gamma(w, True), w + 1)
    torch.testing.assert_close(w, tiny_state["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"] + 0.5)


_INTERPRET = r"""
import torch
from nemotron.engine import graphs, kernels
assert kernels.triton is not None
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    n, ng, hpg, hn, r, S = 3, 2, 3, 24, 12, 16
    qkv = torch.randn(n, ng * (hpg + 2) * hn).to(dtype)
    ang = torch.rand(S, r // 2) * 50  # a table: row p is position p's angles
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    pos = torch.tensor([0, 7, 15])
    out = []
    for interpret in ("1", "0"):
        kernels.os.environ["TRITON_INTERPRET"] = interpret
        ck = torch.full((4, ng, S, hn), 9.0, dtype=dtype); cv = ck.clone()
        q = kernels.rope_to_cache(qkv, cos, sin, pos, torch.tensor([3, 0, 2]), ck, cv, ng, hpg, hn)
        x = torch.randn(n, 40).to(dtype) if not out else out[0][3]
        d = torch.randn(n, 40).to(dtype) if not out else out[0][4]
        g, b = torch.randn(40).to(dtype), torch.randn(40).to(dtype)
        if out:
            g, b = out[0][5], out[0][6]
        s, y = kernels.add_layer_norm(x, d, g, b, 1e-5)
        _, y0 = kernels.add_layer_norm(x, None, g, b, 1e-5)
        h = kernels.relu_squared(d)
        out.append((q, ck, cv, x, d, g, b, s, y, y0, h))
    tri, ref = out
    # The interpreter rounds float32 -> bfloat16 by truncation (the GPU rounds to nearest even), so bf16
    # results may differ by one unit in the last place here; float32 must agree exactly.
    exact = dtype == torch.float32
    for name, i in (("q", 0), ("cache_k", 1), ("cache_v", 2), ("resid", 7), ("relu2", 10),
                    ("ln", 8), ("ln_noadd", 9)):
        if exact and name not in ("ln", "ln_noadd"):
            assert torch.equal(tri[i], ref[i]), (dtype, name)
        else:
            tol = 1e-5 if exact else 2e-2
            torch.testing.assert_close(tri[i].float(), ref[i].float(), rtol=tol, atol=tol, msg=name)
# The whole fused step with interpreted kernels against the model (float32; hpg=3, hn=24: padded blocks).
from nemotron.config import ModelConfig
from nemotron.engine.forward import forward_logits
from nemotron.model import Batch, NemotronModel
kernels.os.environ["TRITON_INTERPRET"] = "1"
cfg = ModelConfig(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6, num_query_groups=2,
                  kv_channels=24, padded_vocab_size=256, max_position_embeddings=64)
model = NemotronModel(cfg).eval()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.2)
with torch.inference_mode():
    ref_cache, cache = model.new_cache(2, 64), model.new_cache(2, 64)
    toks = torch.randint(0, 256, (2, 5))
    for c in (ref_cache, cache):
        forward_logits(model, toks, Batch(torch.arange(5).expand(2, 5), torch.arange(2), 5, True), c)
    dec = graphs.FusedDecoder(model)
    for step in range(3):
        t = torch.randint(0, 256, (2,)); p = torch.tensor([5 + step, 5 + step])
        ref = forward_logits(model, t.view(2, 1), Batch(p.view(2, 1), slice(0, 2), 6 + step, False), ref_cache)
        got = dec(t, p, torch.arange(2), cache, 64)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-5, atol=1e-5)
print("TRITON-INTERPRET-OK")
"""


def test_triton_kernels_in_interpreter_equal_torch():
    run_in_triton_interpreter(_INTERPRET, "TRITON-INTERPRET-OK")
