#!/usr/bin/env python3
"""What does a kernel boundary cost inside a batch-1 decode step? A probe for the persistent-kernel route.

The bench-8b TP speed-ups miss their targets by ~1 ms of fixed time a step, ~3 us a matmul (docs/benchmarks.md,
tenth round). A persistent kernel would replace the boundaries between matmuls with grid barriers, and could load
the next weight block before a barrier (weights never depend on the previous product). This probe measures that on
the MLP alone, x [1, h] -> relu^2(x @ fc1^T) [1, f] -> @ fc2^T [1, h], bf16, at f = ffn / tp:

* `product`: the decode step's own kernels (`decode_linear`, each shape's timed choice), launched with PDL;
* `split`:   this file's persistent GEMV, one launch per product (PDL), so only the boundary differs from...
* `fused`:   ...the same GEMV code in one launch, the products separated by a grid barrier that every thread polls;
* `fused1`:  the barrier polled by one thread a program, its two counters on separate 128-byte lines;
* `early1`:  `fused1`, with each program's first fc2 chunk loaded into registers before the barrier;
* `pf<n>`:   `fused1`, with each program's first n fc2 row blocks asked into L2 (bulk prefetch) before it.

Every variant is checked against torch, then timed as `graph_time_ms` times the step's kernel choices (a CUDA
graph of 20 calls, L2 evicted before each). The grid barrier needs every program resident at once: the grid is
(programs per SM) x SMs, and a config is run only if ptxas's register and shared-memory counts allow that many.

    python scripts/persistent_mlp_probe.py --out out/probe.json    # one GPU; bench-8b widths at TP 1, 2, 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nemotron.engine import kernels  # noqa: E402
from nemotron.engine.kernels import _pdl_enter  # noqa: E402


@triton.jit
def _lane0_load(P, NT: tl.constexpr):
    """*P read by one thread of the program (NT = its thread count), the value shared by all: when every thread
    of ~260 programs polls one address, the polls crowd out the arrivals (the first version's barrier)."""
    lane = tl.arange(0, NT)
    return tl.max(tl.load(P + lane * 0, mask=lane == 0, other=-2147483648, volatile=True), axis=0)


@triton.jit
def _grid_sync(BAR, nprog, NT: tl.constexpr, ONE_POLLER: tl.constexpr):
    """Every program waits here until all nprog have arrived. BAR[0] counts arrivals, BAR[32] (another 128-byte
    line) counts barriers passed: the last to arrive resets one and bumps the other, so the kernel can be
    replayed. ONE_POLLER: one thread a program polls, else all of them."""
    tl.debug_barrier()
    passed = tl.atomic_add(BAR + 32, 0, sem="acquire", scope="gpu")
    old = tl.atomic_add(BAR, 1, sem="acq_rel", scope="gpu")
    if old == nprog - 1:
        tl.atomic_xchg(BAR, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(BAR + 32, 1, sem="release", scope="gpu")
    else:
        polls = 0
        if ONE_POLLER:
            while (_lane0_load(BAR + 32, NT) == passed) & (polls < 16777216):  # ~seconds: never hang the GPU
                polls += 1
        else:
            while (tl.load(BAR + 32, volatile=True) == passed) & (polls < 16777216):
                polls += 1
        if polls >= 16777216:  # gave up waiting: not every program was resident (counted in BAR[63])
            tl.atomic_add(BAR + 63, 1, sem="relaxed", scope="gpu")
    tl.atomic_add(BAR + 32, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _prefetch_l2(W, row0, rows, K: tl.constexpr, NT: tl.constexpr):
    """Ask L2 for `rows` contiguous rows of W from row0 (one bulk prefetch, by one thread; sm90)."""
    lane = tl.arange(0, NT)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.eq.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
        "=r,l,r,r", [W + row0.to(tl.int64) * K + lane * 0, lane, rows * (K * 2) + lane * 0],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _w_chunk(W, N, K: tl.constexpr, b0, c, n_chunks, KCH: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Chunk c of this program's share of W: rows of block b0 + c // KCH, columns of K-chunk c % KCH (masked off
    past the program's last chunk)."""
    rn = (b0 + c // KCH) * BN + tl.arange(0, BN)
    rk = (c % KCH) * BK + tl.arange(0, BK)
    live = (rn[:, None] < N) & (c + rk[None, :] * 0 < n_chunks)  # (the interpreter rejects scalar masks)
    return tl.load(W + rn[:, None].to(tl.int64) * K + rk[None, :], mask=live, other=0.0)


@triton.jit
def _x_chunk(X, c, n_chunks, KCH: tl.constexpr, BK: tl.constexpr):
    rk = (c % KCH) * BK + tl.arange(0, BK)
    return tl.load(X + rk, mask=c + rk * 0 < n_chunks, other=0.0, cache_modifier=".cg").to(tl.float32)


@triton.jit
def _share(N, pid, nprog, BN: tl.constexpr, KCH: tl.constexpr):
    """This program's row blocks [b0, b0 + n_chunks / KCH) of an N-row weight."""
    nblk = tl.cdiv(N, BN)
    b0 = pid * nblk // nprog
    return b0, ((pid + 1) * nblk // nprog - b0) * KCH


@triton.jit
def _gemv(X, W, Y, N, K: tl.constexpr, b0, n_chunks, w_next, RELU2: tl.constexpr, BN: tl.constexpr,
          BK: tl.constexpr):
    """y[rows] = x @ W[rows]^T for this program's rows, one [BN, BK] chunk at a time, the next chunk's weights
    (w_next: chunk 0's on entry) loaded before this one's multiply-adds."""
    KCH: tl.constexpr = K // BK
    acc = tl.zeros([BN, BK], tl.float32)
    x_next = _x_chunk(X, 0, n_chunks, KCH, BK)
    for c in range(0, n_chunks):
        w, x = w_next, x_next
        w_next = _w_chunk(W, N, K, b0, c + 1, n_chunks, KCH, BN, BK)
        x_next = _x_chunk(X, c + 1, n_chunks, KCH, BK)
        acc += w.to(tl.float32) * x[None, :]
        if c % KCH == KCH - 1:
            rn = (b0 + c // KCH) * BN + tl.arange(0, BN)
            y = tl.sum(acc, axis=1).to(Y.dtype.element_ty)
            if RELU2:
                yf = tl.maximum(y.to(tl.float32), 0.0)
                y = (yf * yf).to(Y.dtype.element_ty)
            tl.store(Y + rn, y, mask=rn < N)
            acc = tl.zeros([BN, BK], tl.float32)


@triton.jit
def _mlp_kernel(X, W1, A, W2, Y, BAR, F, H, nprog, K1: tl.constexpr, K2: tl.constexpr, PHASES: tl.constexpr,
                EARLY: tl.constexpr, ONE_POLLER: tl.constexpr, PF_BLOCKS: tl.constexpr, NT: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """PHASES 1: a = relu^2(x @ W1^T); 2: y = a @ W2^T; 3: both, with a grid barrier between them. Before the
    barrier: EARLY loads the first fc2 chunk into registers, PF_BLOCKS > 0 asks L2 for that many fc2 row blocks."""
    if PDL:
        _pdl_enter()
    pid = tl.program_id(0)
    if PHASES != 2:
        b0, n = _share(F, pid, nprog, BN, K1 // BK)
        w0 = _w_chunk(W1, F, K1, b0, 0, n, K1 // BK, BN, BK)
        _gemv(X, W1, A, F, K1, b0, n, w0, True, BN, BK)
    if PHASES != 1:
        b0, n = _share(H, pid, nprog, BN, K2 // BK)
        if EARLY:
            w0 = _w_chunk(W2, H, K2, b0, 0, n, K2 // BK, BN, BK)
        if PF_BLOCKS > 0:
            _prefetch_l2(W2, b0 * BN, tl.minimum(PF_BLOCKS, n // (K2 // BK)) * BN, K2, NT)
        if PHASES == 3:
            _grid_sync(BAR, nprog, NT, ONE_POLLER)
        if not EARLY:
            w0 = _w_chunk(W2, H, K2, b0, 0, n, K2 // BK, BN, BK)
        _gemv(A, W2, Y, H, K2, b0, n, w0, False, BN, BK)


#: (BN rows, BK columns, warps) per chunk
CONFIGS = ((2, 2048, 4), (4, 2048, 8), (4, 4096, 8))
PER_SM = (1, 2, 4)
#: one launch, a grid barrier between the products: (PHASES, EARLY, ONE_POLLER, PF_BLOCKS)
FUSED = {"fused": (3, 0, 0, 0), "fused1": (3, 0, 1, 0), "early1": (3, 1, 1, 0), "pf2": (3, 0, 1, 2),
         "pf4": (3, 0, 1, 4), "pf8": (3, 0, 1, 8), "early_pf4": (3, 1, 1, 4)}


def resident_per_sm(kernel, warps: int, device) -> int:
    """How many programs of this compiled kernel an SM holds at once (registers, shared memory, 64 warps)."""
    props = torch.cuda.get_device_properties(device)
    regs = max(kernel.n_regs, 1)
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (((regs * 32 + 255) // 256) * 256 * warps)
    shared = kernel.metadata.shared
    by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // shared if shared else 64
    return min(by_regs, by_smem, 64 // warps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=16384)
    ap.add_argument("--tp", default="1,2,4", help="ffn shards to probe: f = ffn / tp")
    ap.add_argument("--configs", default=None, help="BN:BK:warps,... (default: CONFIGS)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    pdl = kernels._pdl(torch.empty(1, device=dev))
    results = {"device": torch.cuda.get_device_name(dev), "triton": triton.__version__, "torch": torch.__version__,
               "shapes": []}
    gen = torch.Generator(device=dev).manual_seed(0)
    for tp in (int(t) for t in args.tp.split(",")):
        h, f = args.hidden, args.ffn // tp
        x = torch.randn(1, h, device=dev, dtype=torch.bfloat16, generator=gen)
        w1 = (torch.randn(f, h, device=dev, generator=gen) * h ** -0.5).to(torch.bfloat16)
        w2 = (torch.randn(h, f, device=dev, generator=gen) * f ** -0.5).to(torch.bfloat16)
        act_ref = torch.square(torch.relu(x @ w1.t()))
        y_ref = act_ref @ w2.t()
        row = {"tp": tp, "hidden": h, "f": f, "weight_MB": 2 * 2 * h * f / 1e6, "times_us": {}, "errors": {}}

        def product():
            return kernels.decode_linear(kernels.decode_linear(x, w1, relu2=True), w2)
        row["max_err"] = {"product": (product().float() - y_ref.float()).abs().max().item()}
        row["times_us"]["product"] = 1000 * kernels.graph_time_ms(product)

        a = torch.empty(1, f, device=dev, dtype=torch.bfloat16)
        y = torch.empty(1, h, device=dev, dtype=torch.bfloat16)
        bar = torch.zeros(64, device=dev, dtype=torch.int32)
        configs = CONFIGS if not args.configs else [tuple(map(int, c.split(":"))) for c in args.configs.split(",")]
        for bn, bk, warps in configs:
            if h % bk or f % bk:
                continue

            def launch(nprog, phases, early=0, one_poller=0, pf=0):
                return _mlp_kernel[(nprog,)](x, w1, a, w2, y, bar, f, h, nprog, K1=h, K2=f, PHASES=phases,
                                             EARLY=early, ONE_POLLER=one_poller, PF_BLOCKS=pf, NT=32 * warps,
                                             BN=bn, BK=bk, num_warps=warps, num_stages=1, **pdl)
            compiled = {kind: launch(1, *v) for kind, v in FUSED.items()}  # compiles each
            compiled["split"] = launch(1, 2)
            fits = {kind: resident_per_sm(k, warps, dev) for kind, k in compiled.items()}
            row.setdefault("registers", {})[f"bn{bn} bk{bk} w{warps}"] = {k: v.n_regs for k, v in compiled.items()}
            row.setdefault("resident_per_sm", {})[f"bn{bn} bk{bk} w{warps}"] = fits
            for per_sm in PER_SM:
                nprog = per_sm * sms
                name = f"bn{bn} bk{bk} w{warps} x{per_sm}"
                variants = {"split": lambda: (launch(nprog, 1), launch(nprog, 2))}
                variants.update({kind: (lambda v=v: launch(nprog, *v)) for kind, v in FUSED.items()})
                for kind, fn in variants.items():
                    if kind != "split" and fits[kind] < per_sm:  # the barrier needs every program resident
                        row["errors"][f"{kind} {name}"] = f"only {fits[kind]} programs fit an SM"
                        continue
                    a.zero_()
                    y.zero_()
                    bar[63] = 0
                    fn()
                    torch.cuda.synchronize()
                    err = (y.float() - y_ref.float()).abs().max().item()
                    row["max_err"][f"{kind} {name}"] = err
                    if not err <= 4 * row["max_err"]["product"] + 1e-2:
                        row["errors"][f"{kind} {name}"] = (f"wrong result: max error {err:.3g}, "
                                                           f"{int(bar[63])} programs gave up at the barrier")
                        continue
                    row["times_us"][f"{kind} {name}"] = 1000 * kernels.graph_time_ms(fn)
        times = row["times_us"]
        for kind in ("split",) + tuple(FUSED):
            mine = {k: v for k, v in times.items() if k.startswith(kind + " ")}
            if mine:
                best = min(mine, key=mine.get)
                row[f"best_{kind}"] = [best, mine[best]]
        print(f"tp{tp} f={f}: product {times['product']:.2f} us; "
              + "; ".join(f"{k} {row[f'best_{k}'][1]:.2f} ({row[f'best_{k}'][0]})"
                          for k in ("split",) + tuple(FUSED) if f"best_{k}" in row), flush=True)
        results["shapes"].append(row)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
