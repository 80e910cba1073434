"""Decode attention and the skinny decode matmul (nemotron.engine.kernels) on CPU.

* Their plain-torch versions against independent references: attention against a per-row softmax written out
  here, the matmul against float64.
* Their Triton kernels (and add+LayerNorm fused into the matmul) in Triton's interpreter (TRITON_INTERPRET=1,
  a subprocess) against the torch versions, in float32 (the interpreter has no bfloat16 matrix product; the GPU
  benchmark checks bf16 on the card): several KV splits, empty splits, rows of different lengths, head sizes
  that are not powers of two, the relu^2 epilogue, float32 output and float32 residual deltas, and add+LayerNorm
  of wide rows by blocks (statistics, then normalisation).
"""
import os

import pytest
import torch

from conftest import run_in_triton_interpreter

from nemotron.engine import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference_attention(q, ck, cv, positions, slots):
    """Per row and query head: softmax over keys 0..pos of its group in the row's slot, in float64."""
    n, ng, hpg, hn = q.shape
    out = torch.zeros(n, ng, hpg, hn, dtype=torch.float64)
    for b in range(n):
        L = int(positions[b]) + 1
        for g in range(ng):
            k, v = ck[slots[b], g, :L].double(), cv[slots[b], g, :L].double()
            for j in range(hpg):
                w = torch.softmax(k @ q[b, g, j].double() / hn ** 0.5, dim=0)
                out[b, g, j] = w @ v
    return out


def test_decode_attention_torch_path_matches_reference():
    torch.manual_seed(0)
    n, ng, hpg, hn, S = 3, 2, 3, 24, 40
    q = torch.randn(n, ng, hpg, hn)
    ck, cv = torch.randn(n + 1, ng, S, hn), torch.randn(n + 1, ng, S, hn)
    positions, slots = torch.tensor([0, 17, 39]), torch.tensor([2, 0, 3])  # slot 1 unused
    got = kernels.decode_attention(q, ck, cv, positions, slots, S)
    torch.testing.assert_close(got.double(), _reference_attention(q, ck, cv, positions, slots), rtol=1e-5,
                               atol=1e-5)


def test_decode_linear_torch_path():
    torch.manual_seed(1)
    x, w = torch.randn(3, 50), torch.randn(70, 50)
    ref = x.double() @ w.double().t()
    torch.testing.assert_close(kernels.decode_linear(x, w).double(), ref, rtol=1e-5, atol=1e-5)
    r2 = kernels.decode_linear(x, w, relu2=True).double()
    torch.testing.assert_close(r2, ref.clamp(min=0) ** 2, rtol=1e-5, atol=1e-4)
    xb, wb = x.bfloat16(), w.bfloat16()
    y32 = kernels.decode_linear(xb, wb, out_dtype=torch.float32)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), xb.double() @ wb.double().t(), rtol=1e-5, atol=1e-4)


_INTERPRET = r"""
import os, torch
from nemotron.engine import kernels
assert kernels.triton is not None
torch.manual_seed(0)

def both(fn):
    os.environ["TRITON_INTERPRET"] = "1"
    a = fn()
    os.environ["TRITON_INTERPRET"] = "0"
    b = fn()
    os.environ["TRITON_INTERPRET"] = "1"
    return a, b

# (n, groups, heads per group, head dim, cache length, kv_len): one split, many splits with empty ones,
# a single key block, head dim 24 (padded to 32), 4 query heads (padded to 16 rows)
for n, ng, hpg, hn, S, kv in [(3, 2, 3, 24, 200, 150), (2, 2, 4, 32, 64, 64), (1, 1, 2, 16, 300, 300),
                              (4, 2, 1, 16, 130, 129)]:
    q = torch.randn(n, ng, hpg, hn)
    ck, cv = torch.randn(n + 1, ng, S, hn), torch.randn(n + 1, ng, S, hn)
    pos = torch.randint(0, kv, (n,))
    pos[0] = kv - 1
    slots = torch.randperm(n + 1)[:n]  # rows sit in any slots
    tri, ref = both(lambda: kernels.decode_attention(q, ck, cv, pos, slots, kv))
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-5)

# The vocabulary shard lookup: ids in and outside this shard [start, start + rows)
w = torch.randn(10, 40)
ids = torch.tensor([29, 20, 19, 30, 25])
tri, ref = both(lambda: kernels.embed_rows(ids, w, 20))
assert torch.equal(tri, ref) and not tri[2:4].any()
assert torch.equal(tri[[0, 1, 4]], w[[9, 0, 5]])

for M, N, K in [(1, 48, 40), (3, 100, 300), (16, 64, 512), (40, 70, 96)]:  # 40 rows: the wide configs
    x, w = torch.randn(M, K), torch.randn(N, K)
    for out_dtype, relu2 in ((None, False), (torch.float32, False), (None, True)):
        tri, ref = both(lambda: kernels.decode_linear(x, w, out_dtype, relu2))
        assert tri.dtype == ref.dtype and tri.shape == (M, N)
        torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-4)
assert kernels._skinny_choice, "the interpreter ran the skinny kernel"

# Whole-step tuning's view of the choices (engine/graphs.py): the products of a row count by name, sorted, and one
# can be moved to cuBLAS (None) and back; products pushed to the peers are not offered
tunable = kernels.step_tunable_products(3)
assert [name for name, _ in tunable] == ["M3 N100 K300 float32", "M3 N100 K300 float32 relu2"]
assert all(cfg is not None for _, cfg in tunable)  # the interpreter always runs the kernel
kernels.set_product_choice("M3 N100 K300 float32 relu2", 3, None)
assert dict(kernels.step_tunable_products(3))["M3 N100 K300 float32 relu2"] is None
x3, w3 = torch.randn(3, 300), torch.randn(100, 300)
torch.testing.assert_close(kernels.decode_linear(x3, w3, relu2=True), (x3 @ w3.t()).clamp(min=0) ** 2,
                           rtol=1e-5, atol=1e-4)  # the cuBLAS (torch) path now
kernels.set_product_choice("M3 N100 K300 float32 relu2", 3, tunable[1][1])
assert kernels.step_tunable_products(3) == tunable
# what the tuner tries for a product on cuBLAS: the fastest config timed alone (the interpreter's: the first)
assert kernels.fastest_config("M3 N100 K300 float32 relu2", 3) == tunable[1][1]
assert kernels.fastest_config("M3 N100 K301 float32 relu2", 3) is None

# Split-K (each program sums part of K, a second kernel adds the parts in order), K not a multiple of the chunk
for cfg in [(64, 32, 4, 2, 3), (32, 64, 4, 2, 2), (128, 16, 4, 2, 4)]:
    x, w = torch.randn(20, 200), torch.randn(90, 200)
    for relu2 in (False, True):
        y = torch.empty(20, 90)
        kernels._skinny_launch(x, w, y, relu2, cfg)
        ref = x @ w.t()
        torch.testing.assert_close(y, ref.clamp(min=0) ** 2 if relu2 else ref, rtol=1e-5, atol=1e-4)

# The one-row CUDA-core kernel: N and K not multiples of its blocks
assert set(kernels.GEMV_CONFIGS) <= set(kernels.skinny_configs(1))
assert not set(kernels.GEMV_CONFIGS) & set(kernels.skinny_configs(2))
for cfg in kernels.GEMV_CONFIGS[:2] + (("gemv", 8, 64, 4),):
    x, w = torch.randn(1, 300), torch.randn(90, 300)
    for out_dtype, relu2 in ((torch.float32, False), (torch.float32, True)):
        y = torch.empty(1, 90, dtype=out_dtype)
        kernels._skinny_launch(x, w, y, relu2, cfg)
        ref = x @ w.t()
        torch.testing.assert_close(y, ref.clamp(min=0) ** 2 if relu2 else ref, rtol=1e-5, atol=1e-4)

# add + LayerNorm in the matmul's prologue: one and two rows, with and without the residual delta (bf16-free:
# a float32 delta is the TP sum, rounded to x's dtype first), relu^2, K not a power of two.
for M, N, K in [(1, 48, 40), (2, 100, 96)]:
    x, w = torch.randn(M, K), torch.randn(N, K)
    g, b = torch.randn(K), torch.randn(K)
    for delta in (None, torch.randn(M, K)):
        for relu2 in (False, True):
            tri, ref = both(lambda: kernels.add_layer_norm_linear(x, delta, g, b, 1e-5, w, relu2))
            if delta is None:
                assert tri[0] is x
            torch.testing.assert_close(tri[0], ref[0], rtol=0, atol=0)
            torch.testing.assert_close(tri[1], ref[1], rtol=1e-5, atol=1e-4)
assert kernels._ln_choice and all(v is not None for v in kernels._ln_choice.values()), "the fused kernel ran"

# add + LayerNorm of wide rows: programs of LN_WIDE_BLOCK columns add and write block statistics, then others
# normalise; here 16-column blocks, the last one partial, with and without the delta
defaults = kernels.LN_ONE_PROGRAM_MAX_WIDTH, kernels.LN_WIDE_BLOCK
kernels.LN_ONE_PROGRAM_MAX_WIDTH, kernels.LN_WIDE_BLOCK = 0, 16
for n, h in [(3, 40), (1, 100)]:
    x, g, b = torch.randn(n, h) * 3 + 1, torch.randn(h), torch.randn(h)
    for delta in (None, torch.randn(n, h)):
        tri, ref = both(lambda: kernels.add_layer_norm(x, delta, g, b, 1e-5))
        torch.testing.assert_close(tri[0], ref[0], rtol=0, atol=0)
        torch.testing.assert_close(tri[1], ref[1], rtol=1e-5, atol=1e-5)
kernels.LN_ONE_PROGRAM_MAX_WIDTH, kernels.LN_WIDE_BLOCK = defaults
print("KERNELS-INTERPRET-OK")
"""


def test_triton_decode_kernels_in_interpreter():
    run_in_triton_interpreter(_INTERPRET, "KERNELS-INTERPRET-OK")


_EXCHANGE = r"""
import sys, torch
sys.path.insert(0, TESTS)
from exchange_check import check
check(torch.device("cpu"), torch.float32)  # the interpreter has no bfloat16 matrix product
print("EXCHANGE-INTERPRET-OK")
"""


def test_peer_exchange_kernels_in_interpreter():
    """Producers push their parts into every rank's exchange, each value flagged; consumers (the sum alone,
    add+LayerNorm, and add+LayerNorm fused into the next matmul) add the parts in rank order and match the
    plain-torch ops on the summed tensor: every producer path, both regions, two steps (epochs).
    tests/test_gpu.py runs the same check on a GPU."""
    tests = os.path.dirname(os.path.abspath(__file__))
    run_in_triton_interpreter(_EXCHANGE.replace("TESTS", repr(tests)), "EXCHANGE-INTERPRET-OK")


def test_a_bad_decode_matmul_switch_is_refused_at_start_up(tiny_model, monkeypatch):
    from nemotron.engine.graphs import DecodeGraphs
    monkeypatch.setenv("NEMOTRON_DECODE_MATMUL", "cuBLAS")
    with pytest.raises(ValueError, match="NEMOTRON_DECODE_MATMUL='cuBLAS': expected auto, cublas or triton"):
        DecodeGraphs(tiny_model, capture=False)
    monkeypatch.setenv("NEMOTRON_DECODE_MATMUL", "cublas")
    DecodeGraphs(tiny_model, capture=False)  # a valid value is accepted


def test_compile_in_parallel_runs_every_candidate_and_skips_failures(monkeypatch):
    """Candidates' compiles (engine/kernels.py, `compile_in_parallel`): the first in the calling thread, the rest on
    worker threads; one that raises is skipped (it is reported when timed), and the others still run."""
    import threading
    monkeypatch.setattr(kernels.os, "sched_getaffinity", lambda pid: set(range(4)))
    ran, lock = {}, threading.Lock()

    def compile_(i):
        def run():
            with lock:
                ran[i] = threading.current_thread().name
            if i == 2:
                raise RuntimeError("this config does not compile")
        return run
    kernels.compile_in_parallel([compile_(i) for i in range(6)], torch.device("cpu"))
    assert sorted(ran) == list(range(6))
    assert ran[0] == threading.current_thread().name
    assert all(ran[i].startswith("triton-compile") for i in range(1, 6))
    ran.clear()
    monkeypatch.setattr(kernels.os, "sched_getaffinity", lambda pid: {0})
    kernels.compile_in_parallel([compile_(i) for i in range(6)], torch.device("cpu"))
    assert ran == {}  # one CPU: nothing to gain, the timing compiles them one by one
