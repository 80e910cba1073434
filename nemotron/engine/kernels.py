"""Fused decode kernels (Triton on CUDA, plain torch elsewhere): the small ops between a decode step's matmuls.

Each op has a plain-torch version with eager's rounding; the Triton kernel must match it (the CPU tests run the
kernels in Triton's interpreter against the torch versions, the GPU benchmark compares them on the card).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from nemotron.model import apply_rotary

try:  # Triton is on the GPU machines, not on the CPU test machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

#: Set True to run the fused ops' plain-torch versions on CUDA too (the benchmark checks the kernels this way).
FORCE_TORCH = False


def _use_triton(x: torch.Tensor) -> bool:
    if triton is None or FORCE_TORCH:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# --- Triton kernels ------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _add_ln_kernel(X, D, R, Y, G, Bias, N, eps, HAS_D: tl.constexpr, BLOCK: tl.constexpr):
        """One row: s = x + d (rounded to the activation dtype, as eager does), y = LayerNorm(s) * g + b."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(X + row * N + offs, mask=m, other=0.0)
        if HAS_D:
            d = tl.load(D + row * N + offs, mask=m, other=0.0)
            s = (x.to(tl.float32) + d.to(tl.float32)).to(R.dtype.element_ty)
            tl.store(R + row * N + offs, s, mask=m)
            xf = s.to(tl.float32)
        else:
            xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=0) / N
        diff = tl.where(m, xf - mean, 0.0)
        var = tl.sum(diff * diff, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(Bias + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * N + offs, (diff * rstd * g + b).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_cache_kernel(QKV, COS, SIN, POS, Q, CK, CV, qkv_row_stride, slot_stride, group_stride,
                           HPG: tl.constexpr, HN: tl.constexpr, R: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (row, query group): rotate its HPG query heads and its key head (rotate-half on the first R
        channels, with eager's bf16 rounding after each op), write q to Q [n, ng, HPG, HN] and k, v into the
        cache at [row, group, position]. Launched with enable_fp_fusion=False: otherwise the compiler turns
        round(x*cos) + t2 into one bf16 FMA (one rounding instead of eager's two; seen on H100)."""
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
        c = tl.load(COS + b * R + d, mask=d < R, other=0.0).to(tl.float32)
        s = tl.load(SIN + b * R + d, mask=d < R, other=0.0).to(tl.float32)
        sign = tl.where(d < half, -1.0, 1.0)
        dt = Q.dtype.element_ty
        t1 = (x.to(tl.float32) * c).to(dt).to(tl.float32)
        t2 = (sign * xp * s).to(dt).to(tl.float32)
        rot = (t1 + t2).to(dt)
        out = tl.where((d < R) & (h <= HPG), rot, x.to(dt))  # the V head (h == HPG+1) is not rotated
        tl.store(Q + ((b * ng + grp) * HPG + h) * HN + d, out, mask=(h < HPG) & in_d)
        pos = tl.load(POS + b)
        at = b * slot_stride + grp * group_stride + pos * HN + d + h * 0
        tl.store(CK + at, out, mask=(h == HPG) & in_d)
        tl.store(CV + at, out, mask=(h == HPG + 1) & in_d)

    @triton.jit
    def _relu2_kernel(X, Y, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.maximum(x, 0.0)
        tl.store(Y + offs, (x * x).to(Y.dtype.element_ty), mask=m)


def _ln_warps(block: int) -> int:
    return 4 if block <= 4096 else (8 if block <= 8192 else 16)


# --- Fused ops (Triton on CUDA, plain torch elsewhere) -------------------------------------------------------

def add_layer_norm(x: torch.Tensor, delta: Optional[torch.Tensor], gamma: torch.Tensor, beta: torch.Tensor,
                   eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """x, delta [n, h] -> (x + delta, LayerNorm(x + delta) with gamma, beta). delta None: no add."""
    if not _use_triton(x):
        s = x if delta is None else x + delta
        return s, F.layer_norm(s, (s.shape[-1],), gamma, beta, eps)
    n, h = x.shape
    block = triton.next_power_of_2(h)
    s = x if delta is None else torch.empty_like(x)
    y = torch.empty_like(x)
    _add_ln_kernel[(n,)](x, delta if delta is not None else x, s, y, gamma, beta, h, eps,
                         HAS_D=delta is not None, BLOCK=block, num_warps=_ln_warps(block))
    return s, y


def rope_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  cache_k: torch.Tensor, cache_v: torch.Tensor, groups: int, heads_per_group: int,
                  head_dim: int) -> torch.Tensor:
    """qkv [n, ng*(hpg+2)*hn] (MCore's per-group [q.., k, v] rows), cos/sin [n, r], positions [n] ->
    rotated q [n, ng, hpg, hn]; rotated k and v are written to cache_k/v [slots, ng, S, hn] at (row, :, pos)."""
    n = qkv.shape[0]
    ng, hpg, hn = groups, heads_per_group, head_dim
    r = cos.shape[-1]
    if not _use_triton(qkv):
        grouped = qkv.view(n, ng, hpg + 2, hn)
        c, s = cos.view(n, 1, 1, r), sin.view(n, 1, 1, r)
        q = apply_rotary(grouped[:, :, :hpg], c, s)
        k = apply_rotary(grouped[:, :, hpg:hpg + 1], c, s).view(n, ng, hn)
        rows = torch.arange(n, device=qkv.device)
        cache_k[rows, :, positions] = k
        cache_v[rows, :, positions] = grouped[:, :, hpg + 1]
        return q.contiguous()
    assert qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous() and cache_k.is_contiguous()
    q = torch.empty(n, ng, hpg, hn, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(n, ng)](qkv, cos, sin, positions, q, cache_k, cache_v, qkv.stride(0),
                                cache_k.stride(0), cache_k.stride(1), HPG=hpg, HN=hn, R=r,
                                BLOCK_H=triton.next_power_of_2(hpg + 2), BLOCK_D=triton.next_power_of_2(hn),
                                num_warps=4, enable_fp_fusion=False)
    return q


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    if not _use_triton(x):
        return torch.square(F.relu(x))
    y = torch.empty_like(x)
    numel = x.numel()
    block = 2048
    _relu2_kernel[(triton.cdiv(numel, block),)](x, y, numel, BLOCK=block, num_warps=4)
    return y
