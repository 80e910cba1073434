"""The peer exchange's kernels with three simulated ranks in one process (tests/test_kernels_cpu.py runs it in
Triton's interpreter, tests/test_gpu.py on a GPU).

Each rank's exchange words are an ordinary tensor; every rank's producer writes through the address table into
all of them, as it writes into its peers' memory over NVLink on a multi-GPU host. Producers push their parts, each
value with the sum's flag in one word. Consumers add the parts in rank order: the sum alone, add+LayerNorm (parts
added in its own program, by `sum_parts` first, or, for wide rows, by many programs that also make the LayerNorm's
block statistics), and add+LayerNorm before the next matmul. Each must match the same kernels given the summed
tensor: the sums bit for bit, the LayerNorm to rounding (on a GPU a consumer reading every rank's words runs more
warps, which sum its statistics in another order). Every producer path (skinny
kernel, split-K reduction, cuBLAS + push kernel, the one-row CUDA-core kernel, and `decode_linear_to_peers` on either
side of IN_KERNEL_PUSH_MAX_RANKS), both regions, two steps (epochs), and the rehearsals producers are timed on.
"""
import torch
import torch.nn.functional as F

from nemotron.engine import kernels
from nemotron.parallel.peer_allreduce import PeerExchange, PeerSum

TP, SLOT = 3, 4096


def check(device: torch.device, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    datas = [torch.zeros(2, TP, SLOT, dtype=torch.int64, device=device) for _ in range(TP)]
    xchs = [PeerExchange(r, TP, datas[r], [d.data_ptr() for d in datas]) for r in range(TP)]
    # (rows, columns, K, how): the skinny kernel pushes from its epilogue; split K, the reduction kernel pushes;
    # cuBLAS's product is pushed by its own kernel; for one row, the CUDA-core kernel pushes; `decode_linear_to_peers`
    # with more ranks than IN_KERNEL_PUSH_MAX_RANKS ("stored": the product, then the push kernel) or not ("in kernel")
    cases = [(4, 48, 40, (16, 32, 4, 2)), (2, 40, 96, (16, 32, 4, 2, 3)), (5, 40, 8, "cublas"),
             (2, 40, 24, (32, 16, 4, 2)), (1, 40, 300, ("gemv", 8, 64, 4)), (1, 40, 24, (16, 32, 4, 2)),
             (1, 40, 64, "stored"), (2, 40, 32, "in kernel")]
    push_limit = kernels.IN_KERNEL_PUSH_MAX_RANKS
    for _step in range(2):
        for xch in xchs:
            xch.begin_step()
        for call, (M, N, K, how) in enumerate(cases):
            xs, ws = [randn(M, K).to(dtype) for _ in range(TP)], [randn(N, K).to(dtype) for _ in range(TP)]
            # in the first step each producer is first timed as `_pick_skinny` does, on a rehearsal of its target:
            # its words land where the real ones will, carrying a flag that no consumer waits for
            for target in ([xch.target(call, M, N).rehearsal() for xch in xchs] if _step == 0 else []) + \
                    [xch.target(call, M, N) for xch in xchs]:
                r = target.xch.rank
                if how == "cublas":
                    kernels._push_launch(kernels._cublas(xs[r], ws[r], torch.float32, False), target)
                elif how in ("stored", "in kernel"):
                    kernels.IN_KERNEL_PUSH_MAX_RANKS = TP - 1 if how == "stored" else TP
                    try:
                        kernels.decode_linear_to_peers(xs[r], ws[r], target)
                    finally:
                        kernels.IN_KERNEL_PUSH_MAX_RANKS = push_limit
                else:
                    kernels._skinny_launch(xs[r], ws[r], None, False, how, target)
                if target.rehearsed and r == TP - 1:
                    for data in datas:
                        flags = data[call % 2, :, :M * N] >> 32
                        assert torch.equal(flags, torch.full_like(flags, call - 1024))
            pending = [PeerSum(xch, call, M, N) for xch in xchs]
            region = call % 2
            words = [datas[r][region, :, :M * N] for r in range(TP)]  # [TP parts, M * N] on rank r
            pushed = [(words[0][src] & 0xFFFFFFFF).to(torch.int32).view(torch.float32).view(M, N) for src in range(TP)]
            for r in range(TP):  # every rank holds the same parts, each the right product, each word flagged
                assert torch.equal(words[r] >> 32, torch.full_like(words[r], int(xchs[r].epoch) * 1024 + call))
                assert not (datas[r][region, :, M * N:] >> 32).eq(int(xchs[r].epoch) * 1024 + call).any()
                assert torch.equal(words[r], words[0])
                for src in range(TP):
                    ref = xs[src].double() @ ws[src].double().t()
                    torch.testing.assert_close(pushed[src].double(), ref, rtol=1e-4, atol=1e-3)
            total = pushed[0] + pushed[1] + pushed[2]  # rank order, float32, as the kernels add them
            x, g, b = randn(M, N).to(dtype), randn(N).to(dtype), randn(N).to(dtype)
            ref_s = (x.float() + total.to(dtype).float()).to(dtype)  # the sum rounded once, then added (eager)
            ref_y = F.layer_norm(ref_s.float(), (N,), g.float(), b.float(), 1e-5)
            w_next = randn(24, N).to(dtype)
            tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
            tol_mm = tol if dtype == torch.float32 else dict(rtol=5e-2, atol=1e-1)  # bf16 LayerNorm out, K = N
            # the same kernels given the summed tensor itself: the exchange must not change a bit
            plain_s, plain_y = kernels.add_layer_norm(x, total, g, b, 1e-5)
            torch.testing.assert_close(plain_s, ref_s, rtol=0, atol=0)
            torch.testing.assert_close(plain_y.float(), ref_y, **tol)
            plain_h = kernels.decode_linear(plain_y, w_next)  # a pending sum's LayerNorm is never fused
            torch.testing.assert_close(plain_h.float(), ref_y @ w_next.float().t(), **tol_mm)
            default, one_program_width, wide_block = (kernels.PARTS_PER_ROW_PROGRAM, kernels.LN_ONE_PROGRAM_MAX_WIDTH,
                                                      kernels.LN_WIDE_BLOCK)
            for r in range(TP):
                assert torch.equal(kernels.sum_parts(pending[r]), total)
                # parts added inside add+LayerNorm's one program, or by sum_parts first, or (a wide row) by the
                # add+statistics kernel's programs, 16 columns each
                for per_program, wide in ((default, False), (0, False), (default, True)):
                    kernels.PARTS_PER_ROW_PROGRAM = per_program
                    kernels.LN_ONE_PROGRAM_MAX_WIDTH, kernels.LN_WIDE_BLOCK = (0, 16) if wide else (
                        one_program_width, wide_block)
                    # The sum must match bit for bit. The LayerNorm only to rounding: a kernel reading every
                    # rank's words runs more warps, so on a GPU its statistics are summed in another order.
                    s, y = kernels.add_layer_norm(x, pending[r], g, b, 1e-5)
                    assert torch.equal(s, plain_s), (call, r, per_program)
                    torch.testing.assert_close(y.float(), plain_y.float(), **tol)
                    s2, h = kernels.add_layer_norm_linear(x, pending[r], g, b, 1e-5, w_next)
                    assert torch.equal(s2, plain_s), (call, r, per_program)
                    torch.testing.assert_close(h.float(), plain_h.float(), **tol_mm)
                kernels.PARTS_PER_ROW_PROGRAM = default
                kernels.LN_ONE_PROGRAM_MAX_WIDTH, kernels.LN_WIDE_BLOCK = one_program_width, wide_block
