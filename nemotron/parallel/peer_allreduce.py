"""Small all-reduces straight from the peers' memory (NVLink), for decode.

Two paths, both on PyTorch's symmetric memory:
* `PeerAllReduce`: an out-of-place all-reduce as one kernel (torch's `one_shot_all_reduce_copy_out`).
* `PeerExchange`: no all-reduce kernel at all. The row-parallel matmul that makes a partial sum writes it
  straight into every rank's exchange buffer (its epilogue) and raises a flag there; the next kernel (the
  add+LayerNorm that consumes the sum) waits for the flags and adds the parts itself. A decode step's fused
  kernels use it (nemotron.engine.kernels); this module only owns the memory.

A decode step all-reduces a [batch, hidden] activation twice per layer. At that size NCCL's ring is all latency
(13-17 us per call inside a CUDA graph on H100, ~1.1 ms of a 3.4 ms TP4 step). PyTorch's symmetric memory maps
each TP rank's buffer into every other rank's address space, so one kernel can copy the local input into the
shared buffer, wait at a barrier, and sum every rank's buffer directly (`one_shot_all_reduce_copy_out`). Every
rank adds the ranks in the same order (0, 1, ...), so all ranks get bit-identical sums, as with NCCL.

Only plain peer-to-peer loads are used: NVLink multicast (NVLS) stays off (`TORCH_SYMM_MEM_DISABLE_MULTICAST`),
as it must on the machines we run on. Anything larger than the buffer, off CUDA, or where symmetric memory is
unavailable goes through NCCL as before.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from nemotron.config import env_switch

log = logging.getLogger(__name__)

#: Messages up to this many bytes take the peer path (decode activations: [128, 4096] fp32 is 2 MiB).
DEFAULT_MAX_BYTES = 4 << 20

_registry: Dict[str, "PeerAllReduce"] = {}
_exchanges: Dict[str, "PeerExchange"] = {}


class PeerAllReduce:
    """Out-of-place sum over a process group through one shared (symmetric-memory) buffer per rank."""

    def __init__(self, group: dist.ProcessGroup, buffer: torch.Tensor):
        """Collective over `group`: maps every rank's `buffer` (bytes from `symm_mem.empty`) into the others."""
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.max_bytes = buffer.numel()
        self.buffer = buffer
        symm_mem.rendezvous(self.buffer, self.group_name)

    def fits(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and x.is_contiguous() and x.numel() * x.element_size() <= self.max_bytes
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        nbytes = x.numel() * x.element_size()
        shared = self.buffer[:nbytes].view(x.dtype).view(x.shape)
        out = torch.empty_like(x)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(shared, x, "sum", self.group_name, out)
        return out


class PeerExchange:
    """Per rank: `data` [2 regions, tp parts, slot] float32 and `flags` [2 regions, tp] int32, both readable and
    writable by every rank of the group (`data_ptrs` / `flag_ptrs`: each rank's addresses, on the device).

    A decode step numbers its row-parallel sums 0, 1, 2, ... (`target(call, ...)`); sum `call` uses region
    call % 2. Its producer, on every rank, writes its part into part[rank] of that region on every rank, then
    sets flags[region][rank] there to `flag value` = epoch * 1024 + call; a consumer waits until its local
    flags[region] all hold that value and adds the parts in rank order (so every rank gets the same bits).
    `epoch` counts decode steps on the device (`begin_step`, inside the graphs too), so a flag left from an
    earlier step never matches. Two regions suffice: a rank can only write a region again after every peer's
    flag for the call in between reached it, and a peer raises that flag only after it has consumed the region.
    A step must therefore make an even number of sums (two per layer), so consecutive steps alternate too.
    `ticket` counts the producer's finished programs; the last one raises the flags.
    """

    def __init__(self, rank: int, world: int, data: torch.Tensor, flags: torch.Tensor,
                 data_ptrs: Sequence[int], flag_ptrs: Sequence[int]):
        self.rank, self.world = rank, world
        self.data, self.flags = data, flags  # this rank's: [2, world, slot] float32, [2, world] int32
        self.slot = data.shape[2]
        device = data.device
        self.data_ptrs = torch.tensor(list(data_ptrs), dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor(list(flag_ptrs), dtype=torch.int64, device=device)
        self.ticket = torch.zeros(1, dtype=torch.int32, device=device)
        self.epoch = torch.zeros(1, dtype=torch.int32, device=device)

    @staticmethod
    def layout(world: int, slot_elems: int) -> Tuple[int, int]:
        """Bytes of the data regions, and of the whole buffer (flags after the data)."""
        data_bytes = 2 * world * slot_elems * 4
        return data_bytes, data_bytes + 2 * world * 4

    @classmethod
    def over_group(cls, group: dist.ProcessGroup, buffer: torch.Tensor, slot_bytes: int) -> "PeerExchange":
        """Collective over `group`: maps every rank's `buffer` (`layout(world, slot_bytes // 4)[1]` bytes from
        `symm_mem.empty`) into the others."""
        import torch.distributed._symmetric_memory as symm_mem

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        slot = slot_bytes // 4
        data_bytes, total = cls.layout(world, slot)
        assert buffer.numel() == total, (buffer.numel(), total)
        buffer.zero_()  # flags start below any flag value; every rank zeroes before the rendezvous' barrier
        handle = symm_mem.rendezvous(buffer, group.group_name)
        offset = buffer.data_ptr() - handle.buffer_ptrs[handle.rank]
        bases = [p + offset for p in handle.buffer_ptrs]
        data = buffer[:data_bytes].view(torch.float32).view(2, world, slot)
        flags = buffer[data_bytes:total].view(torch.int32).view(2, world)
        torch.cuda.synchronize(buffer.device)
        return cls(rank, world, data, flags, bases, [b + data_bytes for b in bases])

    def fits(self, rows: int, cols: int) -> bool:
        return rows * cols <= self.slot

    def begin_step(self) -> None:
        self.epoch.add_(1)

    def target(self, call: int, rows: int, cols: int) -> "PeerSum":
        if not 0 <= call < 1024:
            raise ValueError(f"peer sum number {call}: a step makes at most 1024")
        if not self.fits(rows, cols):
            raise ValueError(f"[{rows}, {cols}] does not fit the exchange's {self.slot}-element slots")
        return PeerSum(self, call, rows, cols)


@dataclass
class PeerSum:
    """The TP sum of a [rows, cols] float32 partial that every rank pushes into the exchange as sum `call`: what
    a producer kernel is told to write, and what a consumer kernel is told to wait for and add up."""
    xch: PeerExchange
    call: int
    rows: int
    cols: int

    @property
    def region(self) -> int:
        return self.call % 2

    @property
    def shape(self) -> Tuple[int, int]:
        return self.rows, self.cols

    def producer_args(self) -> dict:
        x, r = self.xch, self.region
        return dict(XPTRS=x.data_ptrs, XFLAGPTRS=x.flag_ptrs, XTICKET=x.ticket, XEPOCH=x.epoch,
                    x_call=self.call, x_data_off=(r * x.world + x.rank) * x.slot, x_flag_off=r * x.world + x.rank,
                    XTP=x.world, XTP2=_pow2(x.world))

    def consumer_args(self) -> dict:
        """D: part 0 of this rank's region (part s is `d_part_stride` elements further)."""
        x, r = self.xch, self.region
        return dict(D=x.data[r], DFLAGS=x.flags[r], DEPOCH=x.epoch, d_call=self.call, d_part_stride=x.slot,
                    DTP=x.world, DTP2=_pow2(x.world))


def _pow2(n: int) -> int:
    """The kernels handle the ranks as one vector, whose length must be a power of two."""
    return 1 << (n - 1).bit_length()


def peer_switches() -> Tuple[str, str]:
    """NEMOTRON_PEER_ALLREDUCE and NEMOTRON_PEER_EXCHANGE, each 1 (default) or 0."""
    return (env_switch("NEMOTRON_PEER_ALLREDUCE", ("0", "1"), "1"),
            env_switch("NEMOTRON_PEER_EXCHANGE", ("0", "1"), "1"))


def enable_peer_all_reduce(group: Optional[dist.ProcessGroup], device: torch.device,
                           max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Collective over `group` (every member calls it). Returns whether the peer path is on for this group.

    Off when NEMOTRON_PEER_ALLREDUCE=0, off CUDA, for a group of one, or when symmetric memory cannot be set up
    (then every member falls back together: a failure on one rank is shared through an all-reduce of the flag).
    With it comes a `PeerExchange` with slots of `max_bytes`, unless NEMOTRON_PEER_EXCHANGE=0.
    """
    switch, exchange_switch = peer_switches()
    if group is None or device.type != "cuda" or switch == "0":
        return False
    if dist.get_world_size(group) < 2:
        return False
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    want_exchange = exchange_switch == "1"
    buffers, peer, exchange, error = None, None, None, ""
    try:  # symmetric memory needs P2P access and a recent driver; NCCL always works
        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
            raise RuntimeError("this PyTorch has no symm_mem.one_shot_all_reduce_copy_out")
        import torch.distributed._symmetric_memory as symm_mem
        exchange_bytes = PeerExchange.layout(dist.get_world_size(group), max_bytes // 4)[1]
        buffers = (symm_mem.empty(max_bytes, dtype=torch.uint8, device=device),
                   symm_mem.empty(exchange_bytes, dtype=torch.uint8, device=device) if want_exchange else None)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    # Allocating is local, mapping is collective: a rank enters the rendezvous only once every rank has its buffers,
    # so one that failed never leaves the others waiting there.
    if _everyone(buffers is not None, group, device):
        try:
            peer = PeerAllReduce(group, buffers[0])
            if want_exchange:
                exchange = PeerExchange.over_group(group, buffers[1], max_bytes)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    # Every rank must take the same path in every decode step: on only if it is on everywhere.
    if not _everyone(peer is not None and (exchange is not None or not want_exchange), group, device):
        log.info("peer all-reduce off for group %s (%s); NCCL carries every all-reduce", group.group_name,
                 error or "another rank could not set it up")
        return False
    _registry[group.group_name] = peer
    if exchange is not None:
        _exchanges[group.group_name] = exchange
    return True


def _everyone(ok: bool, group: dist.ProcessGroup, device: torch.device) -> bool:
    """Collective: whether `ok` holds on every rank of the group."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


@contextlib.contextmanager
def nccl_only(group: Optional[dist.ProcessGroup]) -> Iterator[None]:
    """Inside the block every all-reduce of `group` goes through NCCL (the benchmark times both paths)."""
    peer = _registry.pop(group.group_name, None) if group is not None else None
    with without_exchange(group):
        try:
            yield
        finally:
            if peer is not None:
                _registry[group.group_name] = peer


@contextlib.contextmanager
def without_exchange(group: Optional[dist.ProcessGroup]) -> Iterator[None]:
    """Inside the block decode steps all-reduce with a kernel again (the benchmark times both)."""
    exchange = _exchanges.pop(group.group_name, None) if group is not None else None
    try:
        yield
    finally:
        if exchange is not None:
            _exchanges[group.group_name] = exchange


def peer_all_reduce_for(group: dist.ProcessGroup) -> Optional[PeerAllReduce]:
    return _registry.get(group.group_name)


def peer_exchange_for(group: Optional[dist.ProcessGroup]) -> Optional[PeerExchange]:
    return _exchanges.get(group.group_name) if group is not None else None
