"""Fused decode kernels (Triton on CUDA, plain torch elsewhere): the small ops between a decode step's matmuls.

Each op has a plain-torch version with eager's rounding; the Triton kernel must match it (the CPU tests run the
kernels in Triton's interpreter against the torch versions, the GPU benchmark compares them on the card).
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from nemotron.config import env_switch
from nemotron.model import apply_rotary
from nemotron.parallel.layers import shard_lookup
from nemotron.parallel.peer_allreduce import PeerSum

try:  # Triton is on the GPU machines, not on the CPU test machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
try:  # grid dependency control (programmatic dependent launch), Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the machine
    gdc_wait = gdc_launch_dependents = None

#: Set True to run the fused ops' plain-torch versions on CUDA too (the benchmark checks the kernels this way).
FORCE_TORCH = False

#: A residual delta: none, a tensor, or a TP sum still sitting in the peers' exchange (kernels add it up).
Delta = Union[None, torch.Tensor, PeerSum]


def _use_triton(x: torch.Tensor) -> bool:
    if triton is None or FORCE_TORCH:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def pdl_mode() -> str:
    """NEMOTRON_PDL: 1 (default) launches the decode kernels with programmatic dependent launch on Hopper and
    newer; 0 launches them plainly."""
    return env_switch("NEMOTRON_PDL", ("0", "1"), "1")


def _pdl(x: torch.Tensor) -> dict:
    """Launch options for a kernel reading x: with PDL, a kernel's programs are scheduled while the previous
    kernel's last ones still run, and wait (griddepcontrol.wait) before touching memory, which hides the
    launch-and-ramp gap between the ~200 small kernels of a decode step. Needs sm90+ and grid dependency
    control in Triton; the interpreter (CPU tests) runs without it."""
    on = (x.is_cuda and gdc_wait is not None and pdl_mode() == "1"
          and torch.cuda.get_device_capability(x.device)[0] >= 9)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def _launch(kernel, grid, compile_only: bool, **kwargs) -> None:
    """kernel[grid](**kwargs); with compile_only, only compile that variant (Triton's warmup: nothing runs)."""
    if compile_only:
        kernel.warmup(grid=grid, **kwargs)
    else:
        kernel[grid](**kwargs)


def compile_in_parallel(compiles, device: torch.device) -> None:
    """Run `compiles` (callables that compile candidate kernels, compile_only=True) on several threads, before
    the candidates are timed one by one. With an empty Triton cache, compiling is most of a batch size's first
    capture (~29 s of the 1-row graph's on an H200: docs/benchmarks.md, fifteenth round), and Triton's compiler
    releases the GIL for most of its work. The first runs alone (it sets up Triton's per-device state). A candidate
    that fails here is skipped: it fails again, and is reported, when timed."""
    compiles = list(compiles)
    workers = min(len(compiles) - 1, len(os.sched_getaffinity(0)), 16)  # the CPUs Slurm or taskset left us
    if workers < 2:
        return  # the timing compiles them one by one anyway

    def quietly(fn):
        if device.type == "cuda":
            torch.cuda.set_device(device)  # a new thread's current device is 0: never touch another rank's GPU
        try:
            fn()
        except Exception:
            pass
    quietly(compiles[0])
    with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool:
        list(pool.map(quietly, compiles[1:]))


# --- Triton kernels ------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _pdl_enter():
        """First thing in a kernel launched with PDL: wait until the previous kernel has finished and its writes
        are visible, then allow the next kernel to launch (it does once all our programs have started)."""
        gdc_wait()
        gdc_launch_dependents()

    # Partial sums through the peers' memory (nemotron.parallel.peer_allreduce.PeerExchange): a producer kernel
    # stores each float32 value of its part on every rank together with the sum's flag value, as one 8-byte word; a
    # consumer reads the words until each carries the flag, so no fence, ticket or separate flag is needed.
    # Producer arguments start with X, consumer arguments with D; XTP / DTP = 0 compiles the plain kernel.

    @triton.jit
    def _flag_value(EPOCH, call):
        return tl.load(EPOCH) * 1024 + call

    @triton.jit
    def _push(vals, offs, mask, XPTRS, XEPOCH, x_call, x_data_off, XTP: tl.constexpr):
        """Store this program's float32 values at element offsets `offs` of this rank's part on every rank, each
        as one 8-byte word: the flag value in the high half, the value's bits in the low half."""
        flag = _flag_value(XEPOCH, x_call).to(tl.int64) << 32
        words = vals.to(tl.float32).to(tl.uint32, bitcast=True).to(tl.int64) | flag
        for dst in tl.static_range(XTP):
            base = tl.load(XPTRS + dst).to(tl.pointer_type(tl.int64))
            tl.store(base + x_data_off + offs, words, mask=mask)

    @triton.jit
    def _load_delta(D, offs, mask, d_part_stride, DEPOCH, d_call, DTP: tl.constexpr, DTP2: tl.constexpr):
        """The float32 delta at `offs` (1-D): D itself (DTP = 0), or the sum of the DTP parts in rank order, once
        every live word of every part carries the sum's flag value. All parts are polled at once, as one
        [offs, DTP2] tile (the volatile loads see the peers' stores as they land). After ~2^26 polls (tens of
        seconds: a peer is gone) it gives up rather than hang the GPU, and the step computes garbage; the
        runtime's heartbeats (nemotron.parallel.runtime) stop every rank when a peer dies."""
        if DTP == 0:  # (an if/else: Triton compiles the code after a constexpr branch's return too)
            acc = tl.load(D + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            want = _flag_value(DEPOCH, d_call)
            src = tl.arange(0, DTP2)[None, :]
            live = mask[:, None] & (src < DTP)
            at = D + src * d_part_stride + offs[:, None]
            words = tl.load(at, mask=live, other=0, volatile=True)
            late = tl.sum(tl.sum((((words >> 32).to(tl.int32) != want) & live).to(tl.int32), 1), 0)
            polls = 0
            while (late > 0) & (polls < 67108864):
                words = tl.load(at, mask=live, other=0, volatile=True)
                late = tl.sum(tl.sum((((words >> 32).to(tl.int32) != want) & live).to(tl.int32), 1), 0)
                polls += 1
            vals = words.to(tl.int32).to(tl.float32, bitcast=True)
            acc = tl.sum(tl.where(src == 0, vals, 0.0), 1)  # exact: one live value a row
            for r in tl.static_range(1, DTP):
                acc += tl.sum(tl.where(src == r, vals, 0.0), 1)
        return acc

    @triton.jit
    def _push_kernel(Y, M, N, XPTRS, XEPOCH, x_call, x_data_off, XTP: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
        """Program (row m, block of columns): push y[m, cols] (float32, e.g. cuBLAS's product) to every rank."""
        if PDL:
            _pdl_enter()
        m = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = cols < N
        y = tl.load(Y + m * N + cols, mask=live, other=0.0)
        _push(y, m * N + cols, live, XPTRS, XEPOCH, x_call, x_data_off, XTP)

    @triton.jit
    def _sum_parts_kernel(OUT, N, D, DEPOCH, d_call, d_part_stride, DTP: tl.constexpr, DTP2: tl.constexpr,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Program (row m, block of columns): out[m, cols] = the parts' sum (float32), once they arrived."""
        if PDL:
            _pdl_enter()
        m = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = cols < N
        delta = _load_delta(D, m * N + cols, live, d_part_stride, DEPOCH, d_call, DTP, DTP2)
        tl.store(OUT + m * N + cols, delta, mask=live)

    @triton.jit
    def _add_rounded(x, d, ACT):
        """x + d in the activation dtype (ACT's), d rounded to it first: eager's add of a cast float32 TP sum."""
        act = ACT.dtype.element_ty
        return (x.to(tl.float32) + d.to(act).to(tl.float32)).to(act)

    @triton.jit
    def _ln_stats(xf, mask, n, eps):
        """LayerNorm statistics of a float32 row of n live elements -> (mean, xf - mean (0 off the mask), 1/std)."""
        mean = tl.sum(xf, axis=0) / n
        diff = tl.where(mask, xf - mean, 0.0)
        var = tl.sum(diff * diff, axis=0) / n
        return mean, diff, 1.0 / tl.sqrt(var + eps)

    @triton.jit
    def _relu2(y):
        """The MLP's activation as eager computes it: relu(y)^2 of y in its dtype, rounded to it again."""
        yf = tl.maximum(y.to(tl.float32), 0.0)
        return (yf * yf).to(y.dtype)

    @triton.jit
    def _load_sum(X, D, R, offs, m, DEPOCH, d_call, d_part_stride, HAS_D: tl.constexpr, DTP: tl.constexpr,
                  DTP2: tl.constexpr):
        """s = x + d at offs, as float32: d (a tensor, maybe the TP all-reduce's float32 sum, or DTP peer parts)
        rounded to the activation dtype and added as eager does, s stored to R. Without d, x itself."""
        x = tl.load(X + offs, mask=m, other=0.0)
        if HAS_D:
            s = _add_rounded(x, _load_delta(D, offs, m, d_part_stride, DEPOCH, d_call, DTP, DTP2), R)
            tl.store(R + offs, s, mask=m)
            xf = s.to(tl.float32)
        else:
            xf = x.to(tl.float32)
        return xf

    @triton.jit
    def _add_ln_kernel(X, D, R, Y, G, Bias, N, eps, DEPOCH, d_call, d_part_stride, HAS_D: tl.constexpr,
                       DTP: tl.constexpr, DTP2: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """One row: s = x + d (rounded to the activation dtype, as eager does), y = LayerNorm(s) * g + b.
        DTP > 0: d is the sum of the parts in the peer exchange."""
        if PDL:
            _pdl_enter()
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        xf = _load_sum(X, D, R, row * N + offs, m, DEPOCH, d_call, d_part_stride, HAS_D, DTP, DTP2)
        _, diff, rstd = _ln_stats(xf, m, N, eps)
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(Bias + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * N + offs, (diff * rstd * g + b).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _add_stats_kernel(X, D, R, STATS, N, DEPOCH, d_call, d_part_stride, HAS_D: tl.constexpr,
                          DTP: tl.constexpr, DTP2: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Program (row, block of columns) of a wide row: s = x + d as `_add_ln_kernel` makes it (stored to R),
        and the block's LayerNorm statistics (its sum, and the sum of squares about its own mean) to STATS."""
        if PDL:
            _pdl_enter()
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        m = cols < N
        xf = _load_sum(X, D, R, row * N + cols, m, DEPOCH, d_call, d_part_stride, HAS_D, DTP, DTP2)
        total = tl.sum(tl.where(m, xf, 0.0), axis=0)
        diff = tl.where(m, xf - total / tl.minimum(N - blk * BLOCK, BLOCK), 0.0)
        at = (row * tl.num_programs(1) + blk) * 2
        tl.store(STATS + at, total)
        tl.store(STATS + at + 1, tl.sum(diff * diff, axis=0))

    @triton.jit
    def _ln_apply_kernel(S, STATS, Y, G, Bias, N, eps, NBLK: tl.constexpr, NBLK2: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Program (row, block of columns): the row's mean and variance from its NBLK blocks' statistics (Chan's
        pairwise combination: no cancellation), then y = LayerNorm(s) * g + b on this block."""
        if PDL:
            _pdl_enter()
        row = tl.program_id(0).to(tl.int64)
        b = tl.arange(0, NBLK2)
        live = b < NBLK
        total = tl.load(STATS + (row * NBLK + b) * 2, mask=live, other=0.0)
        m2 = tl.load(STATS + (row * NBLK + b) * 2 + 1, mask=live, other=0.0)
        count = tl.where(live, tl.minimum(N - b * BLOCK, BLOCK), 1).to(tl.float32)
        mean = tl.sum(total, axis=0) / N
        dev = tl.where(live, total / count - mean, 0.0)
        var = (tl.sum(m2, axis=0) + tl.sum(count * dev * dev, axis=0)) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < N
        xf = tl.load(S + row * N + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + cols, mask=m, other=0.0).to(tl.float32)
        bias = tl.load(Bias + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * N + cols, ((xf - mean) * rstd * g + bias).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_cache_kernel(QKV, COS, SIN, POS, SLOTS, Q, CK, CV, qkv_row_stride, slot_stride, group_stride,
                           HPG: tl.constexpr, HN: tl.constexpr, R: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        """One (row, query group): rotate its HPG query heads and its key head (rotate-half on the first R
        channels, with eager's bf16 rounding after each op), write q to Q [n, ng, HPG, HN] and k, v into the
        cache at [slot of the row, group, position]. Launched with enable_fp_fusion=False: otherwise the compiler
        turns round(x*cos) + t2 into one bf16 FMA (one rounding instead of eager's two; seen on H100)."""
        if PDL:
            _pdl_enter()
        b = tl.program_id(0).to(tl.int64)
        grp = tl.program_id(1).to(tl.int64)
        ng = tl.num_programs(1)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        in_d = d < HN
        base = QKV + b * qkv_row_stride + grp * (HPG + 2) * HN
        x = tl.load(base + h * HN + d, mask=(h < HPG + 2) & in_d, other=0.0)
        half = R // 2
        partner = tl.where(d < half, d + half, d - half)
        xp = tl.load(base + h * HN + partner, mask=(h < HPG + 2) & (d < R), other=0.0).to(tl.float32)
        pos = tl.load(POS + b)
        c = tl.load(COS + pos * R + d, mask=d < R, other=0.0).to(tl.float32)  # tables [positions, R]
        s = tl.load(SIN + pos * R + d, mask=d < R, other=0.0).to(tl.float32)
        sign = tl.where(d < half, -1.0, 1.0)
        dt = Q.dtype.element_ty
        t1 = (x.to(tl.float32) * c).to(dt).to(tl.float32)
        t2 = (sign * xp * s).to(dt).to(tl.float32)
        rot = (t1 + t2).to(dt)
        out = tl.where((d < R) & (h <= HPG), rot, x.to(dt))  # the V head (h == HPG+1) is not rotated
        tl.store(Q + ((b * ng + grp) * HPG + h) * HN + d, out, mask=(h < HPG) & in_d)
        slot = tl.load(SLOTS + b).to(tl.int64)
        at = slot * slot_stride + grp * group_stride + pos * HN + d + h * 0
        tl.store(CK + at, out, mask=(h == HPG) & in_d)
        tl.store(CV + at, out, mask=(h == HPG + 1) & in_d)

    @triton.jit
    def _embed_kernel(IDS, W, OUT, start, rows, H, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Program (row b, block of columns): OUT[b] = W[ids[b] - start], or zeros if this rank's vocabulary
        shard [start, start + rows) lacks the id."""
        if PDL:
            _pdl_enter()
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = cols < H
        local = tl.load(IDS + b).to(tl.int64) - start + cols * 0  # a tensor (the interpreter rejects scalar masks)
        vals = tl.load(W + local * H + cols, mask=live & (local >= 0) & (local < rows), other=0.0)
        tl.store(OUT + b.to(tl.int64) * H + cols, vals, mask=live)

    @triton.jit
    def _relu2_kernel(X, Y, numel, BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            _pdl_enter()
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        tl.store(Y + offs, _relu2(tl.load(X + offs, mask=m, other=0.0)), mask=m)


def _ln_warps(block: int) -> int:
    return 4 if block <= 4096 else (8 if block <= 8192 else 16)


def _parts_warps(block: int, delta: Delta) -> int:
    """Warps for a row kernel whose BLOCK columns may come as every rank's 8-byte words at once (a PeerSum)."""
    return _ln_warps(block * 2 * delta.xch.world if isinstance(delta, PeerSum) else block)


# --- Fused ops (Triton on CUDA, plain torch elsewhere) -------------------------------------------------------

def _delta_args(delta: Delta, x: torch.Tensor) -> dict:
    """A consumer kernel's D arguments: a tensor, none (x stands in), or a pending peer sum."""
    if isinstance(delta, PeerSum):
        return delta.consumer_args()
    return dict(D=x if delta is None else delta, DEPOCH=x, d_call=0, d_part_stride=0, DTP=0, DTP2=1)


def _producer_args(target: Optional[PeerSum], y: torch.Tensor) -> dict:
    """A producer kernel's X arguments: a peer sum to push to, or none (y stands in)."""
    if target is not None:
        return target.producer_args()
    return dict(XPTRS=y, XEPOCH=y, x_call=0, x_data_off=0, XTP=0)


def can_exchange(x: torch.Tensor) -> bool:
    """Whether the kernels can push to / read from a PeerExchange (Triton on CUDA, or its interpreter)."""
    return _use_triton(x)


#: A pending peer sum is added up inside add+LayerNorm's one program per row when its parts hold at most this many
#: elements per row (4 x 4096 measured well on an H100); wider rows take a many-program `sum_parts` first (one
#: program reading 4 x 18432 float32 parts made the 340B slice's step slower than the all-reduce kernel).
PARTS_PER_ROW_PROGRAM = 16384
#: Rows up to this wide are added and normalised by one program each. Wider rows (the 340B's 18432) take two
#: kernels of many programs, LN_WIDE_BLOCK columns each: add (the parts too) + block statistics, then normalise.
#: At 18432 on four H200s one program took 5.1 us a row, plus 1.4 us of `sum_parts`; the two kernels take 3.7 us
#: less (docs/benchmarks.md, twelfth round).
LN_ONE_PROGRAM_MAX_WIDTH = 8192
LN_WIDE_BLOCK = 1024


def add_layer_norm(x: torch.Tensor, delta: Delta, gamma: torch.Tensor, beta: torch.Tensor,
                   eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """x, delta [n, h] -> (x + delta, LayerNorm(x + delta) with gamma, beta). delta None: no add; a float32
    delta (a TP all-reduce's sum, or a PeerSum still to be added up) is first rounded to x's dtype."""
    if not _use_triton(x):
        assert not isinstance(delta, PeerSum), "peer sums need the Triton kernels"
        s = x if delta is None else x + delta.to(x.dtype)
        return s, F.layer_norm(s, (s.shape[-1],), gamma, beta, eps)
    n, h = x.shape
    if h > LN_ONE_PROGRAM_MAX_WIDTH:
        return _add_layer_norm_wide(x, delta, gamma, beta, eps)
    if isinstance(delta, PeerSum) and delta.xch.world * h > PARTS_PER_ROW_PROGRAM:
        delta = sum_parts(delta)  # many parts: many programs add them up, then one per row normalises
    block = triton.next_power_of_2(h)
    s = x if delta is None else torch.empty_like(x)
    y = torch.empty_like(x)
    _add_ln_kernel[(n,)](
        X=x, R=s, Y=y, G=gamma, Bias=beta, N=h, eps=eps, HAS_D=delta is not None, BLOCK=block,
        num_warps=_parts_warps(block, delta), **_delta_args(delta, x), **_pdl(x))
    return s, y


def _add_layer_norm_wide(x: torch.Tensor, delta: Delta, gamma: torch.Tensor, beta: torch.Tensor,
                         eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """`add_layer_norm` for wide rows: [n, blocks] programs add (a pending peer sum's parts too) and write each
    block's statistics [n, blocks, 2], then [n, blocks] programs normalise."""
    n, h = x.shape
    block = min(LN_WIDE_BLOCK, triton.next_power_of_2(h))
    nblk = triton.cdiv(h, block)
    s = x if delta is None else torch.empty_like(x)
    stats = torch.empty(n, nblk, 2, dtype=torch.float32, device=x.device)
    _add_stats_kernel[(n, nblk)](X=x, R=s, STATS=stats, N=h, HAS_D=delta is not None, BLOCK=block,
                                 num_warps=_parts_warps(block, delta), **_delta_args(delta, x), **_pdl(x))
    y = torch.empty_like(x)
    _ln_apply_kernel[(n, nblk)](S=s, STATS=stats, Y=y, G=gamma, Bias=beta, N=h, eps=eps, NBLK=nblk,
                                NBLK2=triton.next_power_of_2(nblk), BLOCK=block, num_warps=4, **_pdl(x))
    return s, y


def sum_parts(pending: PeerSum) -> torch.Tensor:
    """A pending peer sum as a float32 tensor (for a consumer without the exchange built in)."""
    rows, cols = pending.shape
    out = torch.empty(rows, cols, dtype=torch.float32, device=pending.xch.data.device)
    block = min(1024, triton.next_power_of_2(cols))
    _sum_parts_kernel[(rows, triton.cdiv(cols, block))](OUT=out, N=cols, BLOCK=block,
                                                         num_warps=_parts_warps(block, pending),
                                                         **pending.consumer_args(), **_pdl(out))
    return out


def embed_rows(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    """ids [n] -> [n, h]: the rows of a vocabulary shard weight [rows, h] holding ids start..start+rows-1, zeros
    for ids outside it (VocabParallelEmbedding's lookup before its all-reduce, in one kernel, not ~7)."""
    if not _use_triton(weight):
        return shard_lookup(ids, weight, start)
    n, (rows, h) = ids.shape[0], weight.shape
    out = torch.empty(n, h, dtype=weight.dtype, device=weight.device)
    block = min(1024, triton.next_power_of_2(h))
    _embed_kernel[(n, triton.cdiv(h, block))](ids, weight, out, start, rows, h, BLOCK=block, num_warps=4,
                                              **_pdl(weight))
    return out


def rope_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, groups: int,
                  heads_per_group: int, head_dim: int) -> torch.Tensor:
    """qkv [n, ng*(hpg+2)*hn] (MCore's per-group [q.., k, v] rows), cos/sin tables [P, r] (row p for position p,
    P > every position), positions and slots [n] -> rotated q [n, ng, hpg, hn]; rotated k and v are written to
    cache_k/v [slots, ng, S, hn] at (slots[b], :, positions[b])."""
    n = qkv.shape[0]
    ng, hpg, hn = groups, heads_per_group, head_dim
    r = cos.shape[-1]
    if not _use_triton(qkv):
        grouped = qkv.view(n, ng, hpg + 2, hn)
        c, s = cos[positions].view(n, 1, 1, r), sin[positions].view(n, 1, 1, r)
        q = apply_rotary(grouped[:, :, :hpg], c, s)
        k = apply_rotary(grouped[:, :, hpg:hpg + 1], c, s).view(n, ng, hn)
        cache_k[slots, :, positions] = k
        cache_v[slots, :, positions] = grouped[:, :, hpg + 1]
        return q.contiguous()
    assert qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous() and cache_k.is_contiguous()
    q = torch.empty(n, ng, hpg, hn, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(n, ng)](qkv, cos, sin, positions, slots, q, cache_k, cache_v, qkv.stride(0),
                                cache_k.stride(0), cache_k.stride(1), HPG=hpg, HN=hn, R=r,
                                BLOCK_H=triton.next_power_of_2(hpg + 2), BLOCK_D=triton.next_power_of_2(hn),
                                num_warps=4, enable_fp_fusion=False, **_pdl(qkv))
    return q


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    if not _use_triton(x):
        return torch.square(F.relu(x))
    y = torch.empty_like(x)
    numel = x.numel()
    block = 2048
    _relu2_kernel[(triton.cdiv(numel, block),)](x, y, numel, BLOCK=block, num_warps=4, **_pdl(x))
    return y


# --- Decode attention: each row's query heads of one group against that group's cached keys ----------------

if triton is not None:
    @triton.jit
    def _decode_attn_kernel(Q, CK, CV, POS, SLOTS, O, PART, STATS, slot_stride, group_stride, scale, chunk,
                            HPG: tl.constexpr, HN: tl.constexpr, ONE_SPLIT: tl.constexpr, IEEE: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            PDL: tl.constexpr):
        """Program (row b, group g, split sp): keys [sp*chunk, min((sp+1)*chunk, pos[b]+1)) of row b's slot,
        group g.

        The group's HPG query heads are the rows of one [BLOCK_H, BLOCK_D] tile, so K/V are read once per group
        (GQA without repeats) and only up to the row's own length. Online softmax in float32; p is rounded to the
        value dtype before p @ v, as flash attention does. One split writes O; several write float32 partial
        sums and (max, sum) to PART/STATS for `_decode_attn_combine`. The number of splits is the grid's third
        dimension, not a compile-time constant: each KV bucket splits differently, and a constant would compile
        every config again for each (seconds the first time a batch size reaches a new KV bucket)."""
        if PDL:
            _pdl_enter()
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1).to(tl.int64)
        sp = tl.program_id(2)
        ng = tl.num_programs(1)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        hd_mask = (h < HPG) & (d < HN)
        q = tl.load(Q + ((b * ng + g) * HPG + h) * HN + d, mask=hd_mask, other=0.0)
        kv_len = tl.load(POS + b) + 1
        start = sp * chunk
        end = tl.minimum(start + chunk, kv_len)
        base = tl.load(SLOTS + b).to(tl.int64) * slot_stride + g * group_stride
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            keys = n0 + tl.arange(0, BLOCK_N)
            live = keys < end
            kv_at = base + keys[:, None] * HN + d
            k = tl.load(CK + kv_at, mask=live[:, None] & (d < HN), other=0.0)   # [BLOCK_N, BLOCK_D]
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(live[None, :], s * scale, float("-inf"))              # [BLOCK_H, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(CV + kv_at, mask=live[:, None] & (d < HN), other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        if ONE_SPLIT:
            tl.store(O + ((b * ng + g) * HPG + h) * HN + d, (acc / l_i[:, None]).to(O.dtype.element_ty),
                     mask=hd_mask)
        else:
            at = (b * ng + g) * tl.num_programs(2) + sp
            tl.store(PART + (at * BLOCK_H + h) * BLOCK_D + d, acc)
            hh = tl.arange(0, BLOCK_H)
            tl.store(STATS + (at * 2) * BLOCK_H + hh, m_i)
            tl.store(STATS + (at * 2 + 1) * BLOCK_H + hh, l_i)

    @triton.jit
    def _decode_attn_combine(PART, STATS, O, splits, HPG: tl.constexpr, HN: tl.constexpr, SPLITS_P2: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        """Program (row, group): merge the `splits` splits' partial softmax sums (every split but empty ones holds
        keys). SPLITS_P2, the next power of two, bounds the loops at compile time (a runtime bound cost ~0.8 us a
        call on an H200: the loads are no longer issued together), so only six variants ever compile."""
        if PDL:
            _pdl_enter()
        bg = tl.program_id(0).to(tl.int64)
        hh = tl.arange(0, BLOCK_H)
        h = hh[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        for sp in range(SPLITS_P2):
            live = sp + hh * 0 < splits
            m = tl.maximum(m, tl.load(STATS + ((bg * splits + sp) * 2) * BLOCK_H + hh, mask=live,
                                      other=float("-inf")))
        l_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for sp in range(SPLITS_P2):
            at = bg * splits + sp
            live = sp + hh * 0 < splits
            w = tl.exp(tl.load(STATS + (at * 2) * BLOCK_H + hh, mask=live, other=float("-inf")) - m)  # empty: 0
            l_sum += tl.load(STATS + (at * 2 + 1) * BLOCK_H + hh, mask=live, other=0.0) * w
            acc += tl.load(PART + (at * BLOCK_H + h) * BLOCK_D + d, mask=live[:, None], other=0.0) * w[:, None]
        tl.store(O + (bg * HPG + h) * HN + d, (acc / l_sum[:, None]).to(O.dtype.element_ty),
                 mask=(h < HPG) & (d < HN))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


#: (BLOCK_N keys per iteration, num_warps, num_stages) tried per (shape, KV bucket); the fastest is kept.
#: A 4th entry of 1 forbids splitting the keys (one kernel, no combine: can win when the keys are few).
ATTN_CONFIGS = ((64, 4, 2), (128, 4, 2), (128, 8, 2), (64, 4, 3), (32, 4, 2), (64, 4, 2, 1), (128, 4, 2, 1))
ATTN_CONFIGS_WIDE = ((32, 4, 2), (64, 4, 2), (64, 8, 2), (32, 4, 3), (32, 4, 2, 1), (64, 4, 2, 1))  # hn > 128
_attn_choice: Dict[Tuple, Tuple[int, ...]] = {}
attn_timings: Dict[str, Dict[str, float]] = {}


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor,
                     slots: torch.Tensor, kv_len: int) -> torch.Tensor:
    """q [n, ng, hpg, hn], cache_k/v [slots, ng, S, hn], positions and slots [n] (row b attends to keys
    0..positions[b] of cache slot slots[b]), kv_len >= every positions[b] + 1 -> attention output [n, ng, hpg, hn].

    kv_len only sizes the work split (it is the graph's KV bucket); each row reads its own keys."""
    n, ng, hpg, hn = q.shape
    if not _use_triton(q):
        keys = torch.arange(kv_len, device=q.device)
        mask = torch.zeros(n, 1, 1, kv_len, dtype=q.dtype, device=q.device)
        mask.masked_fill_(keys.view(1, 1, 1, -1) > positions.view(n, 1, 1, 1), float("-inf"))
        # GQA without repeats: a group's query heads are the "query length" of one attention over its keys.
        return F.scaled_dot_product_attention(q, cache_k[slots, :, :kv_len], cache_v[slots, :, :kv_len],
                                              attn_mask=mask)
    assert q.is_contiguous() and cache_k.is_contiguous() and cache_v.is_contiguous()
    configs = ATTN_CONFIGS if hn <= 128 else ATTN_CONFIGS_WIDE
    key = (n, ng, hpg, hn, kv_len, q.dtype, q.device)
    cfg = _attn_choice.get(key)
    if cfg is None:
        if not q.is_cuda or torch.cuda.is_current_stream_capturing():
            cfg = configs[0]  # the interpreter; or a capture without a warm-up (never time inside one)
        else:
            compile_in_parallel((functools.partial(_attn_launch, q, cache_k, cache_v, positions, slots, kv_len, c,
                                                   compile_only=True) for c in configs), q.device)
            times = {c: graph_time_ms(lambda: _attn_launch(q, cache_k, cache_v, positions, slots, kv_len, c))
                     for c in configs}
            cfg = min(times, key=times.get)
            attn_timings[f"n{n} ng{ng} hpg{hpg} hn{hn} kv{kv_len}"] = {str(c): t for c, t in times.items()}
        _attn_choice[key] = cfg
    return _attn_launch(q, cache_k, cache_v, positions, slots, kv_len, cfg)


def _attn_launch(q, cache_k, cache_v, positions, slots, kv_len, cfg, compile_only: bool = False):
    n, ng, hpg, hn = q.shape
    block_n, warps, stages = cfg[:3]
    max_splits = cfg[3] if len(cfg) > 3 else 1 << 30
    block_d = triton.next_power_of_2(hn)
    block_h = max(16, triton.next_power_of_2(hpg))  # tl.dot needs 16 rows
    # Enough programs to fill the GPU twice over, but no split shorter than one key block.
    splits = max(1, min(triton.cdiv(kv_len, block_n), triton.cdiv(2 * _sm_count(q.device), n * ng), max_splits))
    chunk = triton.cdiv(triton.cdiv(kv_len, splits), block_n) * block_n
    splits = triton.cdiv(kv_len, chunk)
    out = torch.empty_like(q)
    if splits > 1:
        part = torch.empty(n * ng * splits * block_h * block_d, dtype=torch.float32, device=q.device)
        stats = torch.empty(n * ng * splits * 2 * block_h, dtype=torch.float32, device=q.device)
    else:
        part = stats = out  # unused
    _launch(_decode_attn_kernel, (n, ng, splits), compile_only,
            Q=q, CK=cache_k, CV=cache_v, POS=positions, SLOTS=slots, O=out, PART=part, STATS=stats,
            slot_stride=cache_k.stride(0), group_stride=cache_k.stride(1), scale=hn ** -0.5, chunk=chunk, HPG=hpg,
            HN=hn, ONE_SPLIT=splits == 1, IEEE=q.dtype == torch.float32, BLOCK_H=block_h, BLOCK_N=block_n,
            BLOCK_D=block_d, num_warps=warps, num_stages=stages, **_pdl(q))
    if splits > 1:
        _launch(_decode_attn_combine, (n * ng,), compile_only, PART=part, STATS=stats, O=out, splits=splits,
                HPG=hpg, HN=hn, SPLITS_P2=triton.next_power_of_2(splits), BLOCK_H=block_h, BLOCK_D=block_d,
                num_warps=4, **_pdl(q))
    return out


# --- Skinny matmul: a decode step's few rows against a weight matrix, at the memory-bandwidth limit ----------

if triton is not None:
    @triton.jit
    def _skinny_mm_kernel(X, W, Y, PART, M, N, K, k_chunk, stride_x, stride_w, stride_y,
                          XPTRS, XEPOCH, x_call, x_data_off, RELU2: tl.constexpr,
                          IEEE: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, XTP: tl.constexpr, PDL: tl.constexpr):
        """y[:M, tile] = x[:M] @ W[tile]^T for one BLOCK_N tile of W's rows, streaming W once (the step's M <= 64
        rows ride along in one padded tensor-core tile). RELU2: y = relu(round(y))^2, the MLP's activation.
        SPLIT_K > 1: program (tile, s) sums only K range [s*k_chunk, (s+1)*k_chunk) into PART[s] (float32), and
        `_splitk_reduce` finishes; wide tiles then still make enough programs to fill the GPU.
        XTP > 0 (float32 y, no split): y goes to the peer exchange instead of Y."""
        if PDL:
            _pdl_enter()
        pid = tl.program_id(0)
        k_lo = tl.program_id(1) * k_chunk
        k_hi = tl.minimum(K, k_lo + k_chunk)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        x_ptr = X + rm[:, None] * stride_x + rk[None, :]
        w_ptr = W + rn[:, None].to(tl.int64) * stride_w + rk[None, :]
        x_mask = rm[:, None] < M
        w_mask = rn[:, None] < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            x = tl.load(x_ptr + k0, mask=x_mask & (k0 + rk[None, :] < k_hi), other=0.0)
            w = tl.load(w_ptr + k0, mask=w_mask & (k0 + rk[None, :] < k_hi), other=0.0)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        out_mask = x_mask & (rn[None, :] < N)
        if XTP > 0:
            _push(acc, rm[:, None] * N + rn[None, :], out_mask, XPTRS, XEPOCH, x_call, x_data_off, XTP)
        elif SPLIT_K == 1:
            y = acc.to(Y.dtype.element_ty)
            if RELU2:
                y = _relu2(y)
            tl.store(Y + rm[:, None] * stride_y + rn[None, :], y, mask=out_mask)
        else:
            part = PART + (tl.program_id(1) * M + rm[:, None]).to(tl.int64) * N + rn[None, :]
            tl.store(part, acc, mask=out_mask)

    @triton.jit
    def _splitk_reduce(PART, Y, M, N, stride_y, XPTRS, XEPOCH, x_call, x_data_off, RELU2: tl.constexpr,
                       SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, XTP: tl.constexpr, PDL: tl.constexpr):
        """Program (row m, block of columns): y = sum over s of PART[s, m] in order, then the epilogue (or, with
        XTP > 0, the push to the peer exchange)."""
        if PDL:
            _pdl_enter()
        m = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = cols < N
        total = tl.zeros([BLOCK], tl.float32)
        for sk in range(SPLIT_K):
            total += tl.load(PART + (sk * M + m).to(tl.int64) * N + cols, mask=live, other=0.0)
        if XTP > 0:
            _push(total, m * N + cols, live, XPTRS, XEPOCH, x_call, x_data_off, XTP)
        else:
            y = total.to(Y.dtype.element_ty)
            if RELU2:
                y = _relu2(y)
            tl.store(Y + m * stride_y + cols, y, mask=live)

    @triton.jit
    def _gemv_kernel(X, W, Y, N, K, stride_w, XPTRS, XEPOCH, x_call, x_data_off, RELU2: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, XTP: tl.constexpr, PDL: tl.constexpr):
        """y[0, tile] = x[0] @ W[tile]^T for one row on the CUDA cores. Without a tensor-core tile (16 rows of W at
        least) a program can own as few as 2-8 rows of W, so a weight spreads over several programs per SM, which
        keeps more loads in flight while the stream ramps up and drains. Each thread multiplies and adds along K;
        the rows are summed across threads once, at the end. XTP > 0: the float32 y goes to the peer exchange."""
        if PDL:
            _pdl_enter()
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        w_ptr = W + rn[:, None].to(tl.int64) * stride_w + rk[None, :]
        w_mask = rn[:, None] < N
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_live = k0 + rk < K
            x = tl.load(X + k0 + rk, mask=k_live, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + k0, mask=w_mask & k_live[None, :], other=0.0).to(tl.float32)
            acc += w * x[None, :]
        if XTP > 0:
            _push(tl.sum(acc, axis=1), rn, rn < N, XPTRS, XEPOCH, x_call, x_data_off, XTP)
        else:
            y = tl.sum(acc, axis=1).to(Y.dtype.element_ty)
            if RELU2:
                y = _relu2(y)
            tl.store(Y + rn, y, mask=rn < N)


#: (BLOCK_N, BLOCK_K, num_warps, num_stages) tried per weight shape; the fastest (or cuBLAS) is kept.
SKINNY_CONFIGS = ((16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 128, 4, 6), (64, 128, 4, 4),
                  (64, 256, 8, 3), (32, 512, 4, 3), (16, 1024, 8, 2))
#: for 16 < M <= 64 rows: x is re-read from L2 by every program, so wider weight tiles, and for weights with few
#: rows a 5th entry: split K that many ways (enough programs again; a second kernel sums the parts)
SKINNY_CONFIGS_WIDE = ((64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3),
                       (128, 128, 8, 3, 2), (128, 128, 8, 3, 4), (128, 64, 4, 4, 4), (256, 64, 8, 3, 4),
                       (64, 128, 4, 3, 4))
SKINNY_MAX_ROWS = 64
#: For one row also ("gemv", BLOCK_N, BLOCK_K, num_warps): the CUDA-core kernel, a few rows of W per program. A K
#: block's loads are all issued before its multiply-adds wait on them, so wide K blocks (up to a whole 4096-wide row)
#: keep more bytes in flight. On an H100 it made the bench-8b batch-1 step 6 % faster on one GPU, and the TP4 step 6 %
#: faster (docs/benchmarks.md, seventh and eighth rounds). It pushes to the peers too: with its pushes fc2 costs
#: what fc1 (the same bytes) costs at TP2; at TP4 it costs more, so there it stores and a push kernel follows
#: (IN_KERNEL_PUSH_MAX_RANKS).
GEMV_CONFIGS = (("gemv", 2, 2048, 4), ("gemv", 2, 4096, 8), ("gemv", 4, 1024, 4), ("gemv", 4, 2048, 8),
                ("gemv", 8, 512, 4), ("gemv", 8, 1024, 8), ("gemv", 16, 512, 8))


def skinny_configs(rows: int):
    if rows == 1:
        return SKINNY_CONFIGS + GEMV_CONFIGS
    return SKINNY_CONFIGS if rows <= 16 else SKINNY_CONFIGS_WIDE


def _block_m(rows: int) -> int:
    return max(16, triton.next_power_of_2(rows))  # tl.dot needs 16


_skinny_choice: Dict[Tuple, Optional[Tuple]] = {}
_skinny_fastest: Dict[Tuple, Optional[Tuple]] = {}  # the fastest config timed alone, whether or not cuBLAS won
skinny_timings: Dict[str, Dict[str, float]] = {}  # what the choice was made from (the benchmark records it)
step_tuning: Dict[str, dict] = {}  # per product: the whole-step times that kept or moved it (engine/graphs.py)
skinny_errors: Dict[str, str] = {}


def _skinny_launch(x, w, y, relu2, cfg, target: Optional[PeerSum] = None, compile_only: bool = False):
    """y = x @ w^T [relu^2] with config cfg; with a target, y (None then) goes to the peer exchange instead."""
    if cfg[0] == "gemv":
        return _gemv_launch(x, w, y, relu2, cfg, target, compile_only)
    bn, bk, warps, stages = cfg[:4]
    M, K = x.shape
    N = w.shape[0]
    k_chunk = triton.cdiv(triton.cdiv(K, cfg[4] if len(cfg) > 4 else 1), bk) * bk
    splits = triton.cdiv(K, k_chunk)
    part = torch.empty(splits * M * N, dtype=torch.float32, device=x.device) if splits > 1 else None
    y_or_part = y if y is not None else part if part is not None else x
    stride_y = y.stride(0) if y is not None else N
    _launch(_skinny_mm_kernel, (triton.cdiv(N, bn), splits), compile_only,
        X=x, W=w, Y=y_or_part, PART=part if part is not None else y_or_part, M=M, N=N, K=K, k_chunk=k_chunk,
        stride_x=x.stride(0), stride_w=w.stride(0), stride_y=stride_y, RELU2=relu2,
        IEEE=x.dtype == torch.float32, SPLIT_K=splits, BLOCK_M=_block_m(M), BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages, **_producer_args(target if splits == 1 else None, y_or_part),
        **_pdl(x))
    if splits > 1:
        block = min(1024, triton.next_power_of_2(N))
        _launch(_splitk_reduce, (M, triton.cdiv(N, block)), compile_only,
            PART=part, Y=y if y is not None else part, M=M, N=N, stride_y=stride_y, RELU2=relu2, SPLIT_K=splits,
            BLOCK=block, num_warps=4, **_producer_args(target, part), **_pdl(x))


def _gemv_launch(x, w, y, relu2, cfg, target: Optional[PeerSum], compile_only: bool = False):
    _, bn, bk, warps = cfg
    N, K = w.shape
    assert x.shape == (1, K) and (y is None or y.shape == (1, N) and y.is_contiguous())
    y = y if y is not None else x  # pushing: no y
    _launch(_gemv_kernel, (triton.cdiv(N, bn),), compile_only, X=x, W=w, Y=y, N=N, K=K, stride_w=w.stride(0),
            RELU2=relu2, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=1, **_producer_args(target, y), **_pdl(x))


#: Values per push-kernel program: few, so a [1, h] product is pushed from many SMs at once. With 1024 (4 programs
#: for h = 4096, 18 for 18432) the push after a 340B-width product took 8.7 us at TP4 on H200s; with 256, 6.0
#: (docs/benchmarks.md, twelfth round).
PUSH_BLOCK = 256


def _push_launch(y: torch.Tensor, target: PeerSum) -> None:
    M, N = y.shape
    block = min(PUSH_BLOCK, triton.next_power_of_2(N))
    _push_kernel[(M, triton.cdiv(N, block))](Y=y, M=M, N=N, BLOCK=block, num_warps=2, **target.producer_args(),
                                              **_pdl(y))


_l2_scratch: Dict[torch.device, torch.Tensor] = {}


def graph_time_ms(fn, reps: int = 20) -> float:
    """GPU ms per call of fn, replayed from a CUDA graph of `reps` calls: what a captured decode step pays, without
    the Python launch cost that dominates small kernels when they are timed eagerly. Before each call a 64 MiB
    write evicts the L2 cache (in a decode step each weight is read once, after ~13 GB of others), and the
    eviction's own time, measured the same way, is subtracted."""
    device = torch.device("cuda", torch.cuda.current_device())
    scratch = _l2_scratch.get(device)
    if scratch is None:
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode alike
            scratch = _l2_scratch[device] = torch.empty(64 << 20, dtype=torch.uint8, device=device)

    def replay_ms(body) -> float:
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            body()  # compile and warm up outside the capture
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(reps):
                body()
        graph.replay()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            graph.replay()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / (3 * reps)

    def flushed():
        scratch.zero_()
        fn()
    return max(replay_ms(flushed) - replay_ms(scratch.zero_), 0.0)


def matmul_mode() -> str:
    """NEMOTRON_DECODE_MATMUL: auto (time both on first use), cublas or triton (pinned)."""
    return env_switch("NEMOTRON_DECODE_MATMUL", ("auto", "cublas", "triton"), "auto")


def _pick_skinny(x, w, out_dtype, relu2, target: Optional[PeerSum]) -> Tuple[Optional[Tuple], Optional[Tuple]]:
    """Time cuBLAS and each config on these very tensors (outside any graph capture). Returns the choice (None
    means cuBLAS) and the fastest config (None if none ran). For a product that goes to the peers, cuBLAS is
    timed with the push kernel it needs (into a rehearsal of the target), but the configs without their pushes: in
    a step, a kernel's pushes overlap the kernels after it, while timed alone they are paid in full, which ranked
    the configs wrongly (docs/benchmarks.md, ninth round)."""
    mode = matmul_mode()
    if mode == "cublas":
        return None, None
    if not x.is_cuda:  # Triton's interpreter (CPU tests): always the kernel, first config
        return skinny_configs(x.shape[0])[0], skinny_configs(x.shape[0])[0]
    y = torch.empty(x.shape[0], w.shape[0], dtype=out_dtype, device=x.device)
    if target is None:
        times = {"cublas": graph_time_ms(lambda: _cublas(x, w, out_dtype, relu2))}
    else:
        rehearsal = target.rehearsal()
        times = {"cublas": graph_time_ms(lambda: _push_launch(_cublas(x, w, out_dtype, relu2), rehearsal))}
    configs = skinny_configs(x.shape[0])
    compile_in_parallel((functools.partial(_skinny_launch, x, w, y, relu2, cfg, compile_only=True) for cfg in configs),
                        x.device)
    for cfg in configs:
        try:
            times[str(cfg)] = graph_time_ms(lambda: _skinny_launch(x, w, y, relu2, cfg))
        except Exception as exc:  # a config this card or Triton cannot run: never chosen, and reported
            times[str(cfg)] = float("inf")
            skinny_errors[str(cfg)] = f"{type(exc).__name__}: {str(exc)[:300]}"
    name = product_name((x.shape[0], tuple(w.shape), w.dtype, out_dtype, relu2))
    skinny_timings[name + (" to peers" if target is not None else "")] = times
    best = min(configs, key=lambda c: times[str(c)])
    if times[str(best)] == float("inf"):
        return None, None
    return (best if mode == "triton" or times[str(best)] < times["cublas"] else None), best


def _cublas(x, w, out_dtype, relu2):
    if out_dtype != x.dtype:  # e.g. bf16 x bf16 -> fp32 sums (torch's mm has no out_dtype on CPU)
        y = torch.mm(x, w.t(), out_dtype=out_dtype) if x.is_cuda else F.linear(x.float(), w.float()).to(out_dtype)
    else:
        y = F.linear(x, w)
    return relu_squared(y) if relu2 else y


def decode_linear(x: torch.Tensor, w: torch.Tensor, out_dtype: Optional[torch.dtype] = None,
                  relu2: bool = False) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T -> [M, N] in out_dtype (default x's; float32 keeps TP partial sums unrounded), then
    relu^2 if asked. For M <= 64 on CUDA, whichever of cuBLAS and the skinny Triton kernel (per config) was
    faster on first use of this shape runs from then on (NEMOTRON_DECODE_MATMUL=cublas|triton pins it)."""
    out_dtype = out_dtype or x.dtype
    cfg = _matmul_choice(x, w, out_dtype, relu2)
    if cfg is None:
        return _cublas(x, w, out_dtype, relu2)
    y = torch.empty(x.shape[0], w.shape[0], dtype=out_dtype, device=x.device)
    _skinny_launch(x, w, y, relu2, cfg)
    return y


#: Up to this many ranks a pushed product is pushed by the matmul's own programs; beyond, the matmul stores it and
#: `_push_kernel` pushes it. In-kernel pushes save a launch at TP2 (bench-8b's step 2.353 against 2.428 ms), but on
#: four H200s they slowed the matmul itself: the 340B-width fc2 took 221 us against 152 us for the same product
#: stored locally (+ 9 us to push), and bench-8b's TP4 step was 1.761 against 1.703 ms (docs/benchmarks.md,
#: eleventh round). Why was not profiled further; the pushes land at each of ~4600 programs' ends, on 3 peers.
IN_KERNEL_PUSH_MAX_RANKS = 2


def decode_linear_to_peers(x: torch.Tensor, w: torch.Tensor, target: PeerSum) -> PeerSum:
    """This rank's part of a row-parallel product, x [M, K] @ w[N, K]^T in float32, pushed into the peer
    exchange as `target`: by the skinny kernel's epilogue (up to IN_KERNEL_PUSH_MAX_RANKS ranks), else by a
    small kernel after the product (always after cuBLAS)."""
    assert target.shape == (x.shape[0], w.shape[0]) and can_exchange(x)
    if target.xch.world > IN_KERNEL_PUSH_MAX_RANKS:
        _push_launch(decode_linear(x, w, torch.float32), target)
        return target
    cfg = _matmul_choice(x, w, torch.float32, False, target)
    if cfg is None:
        _push_launch(_cublas(x, w, torch.float32, False), target)
    else:
        _skinny_launch(x, w, None, False, cfg, target)
    return target


def _matmul_choice(x, w, out_dtype, relu2, target: Optional[PeerSum] = None) -> Optional[Tuple]:
    """The skinny kernel's config for this product, or None for cuBLAS (timed once per shape, and per whether it
    goes to the peers, outside captures)."""
    if not _use_triton(x) or x.shape[0] > SKINNY_MAX_ROWS or (relu2 and out_dtype != x.dtype):
        return None
    key = (x.shape[0], tuple(w.shape), w.dtype, out_dtype, relu2, x.device, target is not None)
    if key not in _skinny_choice:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return None  # never time inside a capture (warm-up runs first)
        _skinny_choice[key], _skinny_fastest[key] = _pick_skinny(x, w, out_dtype, relu2, target)
    assert x.stride(1) == 1 and w.stride(1) == 1
    return _skinny_choice[key]


def product_name(key: Tuple) -> str:
    """A product's name, e.g. "M8 N4096 K4096 bfloat16" (the key of a choice, without its device)."""
    rows, (n, k), _, out_dtype, relu2 = key[:5]
    return f"M{rows} N{n} K{k} {str(out_dtype)[6:]}{' relu2' if relu2 else ''}"


def choice_name(cfg: Optional[Tuple]) -> str:
    """How a product's choice is recorded and reported: "cublas", or the Triton config."""
    return "cublas" if cfg is None else str(cfg)


def _tunable_keys(rows: int, name: Optional[str] = None) -> List[Tuple]:
    """The choice keys of this process's products of `rows` rows not pushed to the peers (named `name`, if
    given): what the whole-step tuner may move."""
    return [k for k in _skinny_choice if k[0] == rows and not k[6] and name in (None, product_name(k))]


def step_tunable_products(rows: int) -> List[Tuple[str, Optional[Tuple]]]:
    """This process's tunable products of `rows` rows as (name, current choice), sorted by name: the same names in
    the same order on every rank of a TP group (the keys differ only in the device)."""
    return sorted({product_name(k): _skinny_choice[k] for k in _tunable_keys(rows)}.items())


def fastest_config(name: str, rows: int) -> Optional[Tuple]:
    """The Triton config that was fastest for the product `name` of `rows` rows timed alone (None if none ran):
    where cuBLAS won alone, the one the whole-step tuner tries instead."""
    keys = _tunable_keys(rows, name)
    return _skinny_fastest.get(keys[0]) if keys else None


def set_product_choice(name: str, rows: int, cfg: Optional[Tuple]) -> None:
    """Pin the product `name` of `rows` rows (not pushed) to `cfg` (None: cuBLAS) in this process."""
    keys = _tunable_keys(rows, name)
    assert keys, f"no product {name} at {rows} rows"
    for k in keys:
        _skinny_choice[k] = cfg


# --- add + LayerNorm fused into the skinny matmul's prologue (one or two rows) -------------------------------

if triton is not None:
    @triton.jit
    def _ln_skinny_mm_kernel(X, D, S, G, Bt, W, Y, M, N, K, eps, stride_w, stride_y,
                             HAS_D: tl.constexpr, RELU2: tl.constexpr, IEEE: tl.constexpr, ROWS: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_KF: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """y = LayerNorm(x + d) @ W[tile]^T for M <= ROWS rows: `_add_ln_kernel` then `_skinny_mm_kernel` in one
        launch. Every program recomputes the rows' statistics (the rows are a few KB, read from L2) exactly as
        `_add_ln_kernel` does; program 0 also stores s = x + d, the new residual."""
        if PDL:
            _pdl_enter()
        pid = tl.program_id(0)
        kf = tl.arange(0, BLOCK_KF)
        kf_mask = kf < K
        rm = tl.arange(0, BLOCK_M)
        mean_v = tl.zeros([BLOCK_M], tl.float32)
        rstd_v = tl.zeros([BLOCK_M], tl.float32)
        for r in tl.static_range(ROWS):  # names differ from the main loop's: Triton keeps one type per name
            if r < M:
                row = tl.load(X + r * K + kf, mask=kf_mask, other=0.0)
                if HAS_D:
                    row_s = _add_rounded(row, tl.load(D + r * K + kf, mask=kf_mask, other=0.0), S)
                    if pid == 0:
                        tl.store(S + r * K + kf, row_s, mask=kf_mask)
                    row_f = row_s.to(tl.float32)
                else:
                    row_f = row.to(tl.float32)
                row_mean, _, row_rstd = _ln_stats(row_f, kf_mask, K, eps)
                mean_v = tl.where(rm == r, row_mean, mean_v)
                rstd_v = tl.where(rm == r, row_rstd, rstd_v)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        w_ptr = W + rn[:, None].to(tl.int64) * stride_w + rk[None, :]
        w_mask = rn[:, None] < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            xm = (rm[:, None] < M) & (kk[None, :] < K)
            x = tl.load(X + rm[:, None] * K + kk[None, :], mask=xm, other=0.0)
            if HAS_D:
                xf = _add_rounded(x, tl.load(D + rm[:, None] * K + kk[None, :], mask=xm, other=0.0), S).to(tl.float32)
            else:
                xf = x.to(tl.float32)
            g = tl.load(G + kk, mask=kk < K, other=0.0).to(tl.float32)
            b = tl.load(Bt + kk, mask=kk < K, other=0.0).to(tl.float32)
            diff = xf - mean_v[:, None]
            h = tl.where(xm, diff * rstd_v[:, None] * g[None, :] + b[None, :], 0.0).to(W.dtype.element_ty)
            w = tl.load(w_ptr + k0, mask=w_mask & (kk[None, :] < K), other=0.0)
            if IEEE:
                acc += tl.dot(h, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(h, tl.trans(w))
        y = acc.to(Y.dtype.element_ty)
        if RELU2:
            y = _relu2(y)
        tl.store(Y + rm[:, None] * stride_y + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))


LN_FUSE_MAX_ROWS = 2      # every program reloads the rows: worth it for one or two
LN_FUSE_MAX_WIDTH = 8192  # the whole row sits in registers for the statistics
_ln_choice: Dict[Tuple, Optional[Tuple[int, int, int, int]]] = {}


def _ln_launch(x, delta, s, gamma, beta, eps, w, y, relu2, cfg, compile_only: bool = False):
    bn, bk, warps, stages = cfg
    M, K = x.shape
    N = w.shape[0]
    _launch(_ln_skinny_mm_kernel, (triton.cdiv(N, bn),), compile_only,
        X=x, D=delta if delta is not None else x, S=s, G=gamma, Bt=beta, W=w, Y=y, M=M, N=N, K=K, eps=eps,
        stride_w=w.stride(0), stride_y=y.stride(0), HAS_D=delta is not None, RELU2=relu2,
        IEEE=x.dtype == torch.float32, ROWS=LN_FUSE_MAX_ROWS, BLOCK_M=_block_m(LN_FUSE_MAX_ROWS),
        BLOCK_KF=triton.next_power_of_2(K), BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **_pdl(x))


def add_layer_norm_linear(x: torch.Tensor, delta: Delta, gamma: torch.Tensor,
                          beta: torch.Tensor, eps: float, w: torch.Tensor,
                          relu2: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """`add_layer_norm` then `decode_linear` (same results): (s = x + delta, LayerNorm(s) @ w^T [relu^2]).
    For one or two rows on CUDA the LayerNorm runs in the matmul's prologue (one launch instead of two) when
    that was faster for this weight on first use. Not for a pending peer sum: every program would reread all
    the parts (on an H100 that never won, and most configs ran out of shared memory)."""
    M, K = x.shape
    fusable = (_use_triton(x) and M <= LN_FUSE_MAX_ROWS and K <= LN_FUSE_MAX_WIDTH and x.is_contiguous()
               and not isinstance(delta, PeerSum) and (delta is None or delta.is_contiguous())
               and w.stride(1) == 1 and matmul_mode() != "cublas")

    def unfused():
        s, h = add_layer_norm(x, delta, gamma, beta, eps)
        return s, decode_linear(h, w, relu2=relu2)
    if not fusable:
        return unfused()
    key = (M, tuple(w.shape), w.dtype, relu2, delta is None, x.dtype, x.device)
    if key not in _ln_choice:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return unfused()
        if not x.is_cuda:  # Triton's interpreter (CPU tests): always the fused kernel, first config
            _ln_choice[key] = SKINNY_CONFIGS[0]
        else:
            unfused()  # settles decode_linear's own choice before the comparison
            s_buf = torch.empty_like(x)
            y_buf = torch.empty(M, w.shape[0], dtype=x.dtype, device=x.device)
            times = {"unfused": graph_time_ms(unfused)}
            compile_in_parallel((functools.partial(_ln_launch, x, delta, s_buf, gamma, beta, eps, w, y_buf, relu2,
                                                   cfg, compile_only=True) for cfg in SKINNY_CONFIGS), x.device)
            for cfg in SKINNY_CONFIGS:
                try:
                    times[str(cfg)] = graph_time_ms(
                        lambda: _ln_launch(x, delta, s_buf, gamma, beta, eps, w, y_buf, relu2, cfg))
                except Exception as exc:  # a config this card or Triton cannot run: never chosen, and reported
                    times[str(cfg)] = float("inf")
                    skinny_errors[f"LN+ {cfg}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            name = f"LN+ M{M} N{w.shape[0]} K{K}{' relu2' if relu2 else ''}{' no-delta' if delta is None else ''}"
            skinny_timings[name] = times
            best = min(SKINNY_CONFIGS, key=lambda c: times[str(c)])
            _ln_choice[key] = best if times[str(best)] < times["unfused"] else None
    cfg = _ln_choice[key]
    if cfg is None:
        return unfused()
    s = torch.empty_like(x) if delta is not None else x
    y = torch.empty(M, w.shape[0], dtype=x.dtype, device=x.device)
    _ln_launch(x, delta, s, gamma, beta, eps, w, y, relu2, cfg)
    return s, y
