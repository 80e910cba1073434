"""Small all-reduces straight from the peers' memory (NVLink), for decode.

Two paths, both on PyTorch's symmetric memory:
* `PeerAllReduce`: an out-of-place all-reduce as one kernel (torch's `one_shot_all_reduce_copy_out`).
* `PeerExchange`: no all-reduce kernel at all. The row-parallel matmul that makes a partial sum writes it
  straight into every rank's exchange buffer (its epilogue), each value in one word with the sum's flag; the next
  kernel (the add+LayerNorm that consumes the sum) reads the words until all carry the flag and adds the parts
  itself. A decode step's fused kernels use it (nemotron.engine.kernels); this module only owns the memory.

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
    """Per rank: `data` [2 regions, tp parts, slot] int64, readable and writable by every rank of the group
    (`data_ptrs`: each rank's address, on the device). Each word holds one float32 value of a part in its low half
    and the flag value of the sum it belongs to in its high half, written with one 8-byte store, so a reader that
    sees the flag sees the value: no fence, no separate flag and no counter of finished programs (NCCL's LL
    protocol works the same way). Against raising a flag after a system-scope fence, it made the bench-8b batch-1
    step 15 % faster at TP2 and 10 % faster at TP4 on H200s (docs/benchmarks.md, ninth round).

    A decode step numbers its row-parallel sums 0, 1, 2, ... (`target(call, ...)`); sum `call` uses region
    call % 2 and flag value epoch * 1024 + call. Its producer, on every rank, writes its part into part[rank] of
    that region on every rank; a consumer reads its local region until every word it needs carries the flag value
    and adds the parts in rank order (so every rank gets the same bits). `epoch` counts decode steps on the device
    (`begin_step`, inside the graphs too), so a word left from an earlier step never matches. Two regions suffice:
    a rank can only write a region again after it has read every peer's part of the call in between, and a peer
    writes that part only after it has consumed the region. A step must therefore make an even number of sums
    (two per layer), so consecutive steps alternate too.
    """

    def __init__(self, rank: int, world: int, data: torch.Tensor, data_ptrs: Sequence[int]):
        assert data.dtype == torch.int64 and data.shape[:2] == (2, world), (data.dtype, data.shape)
        self.rank, self.world = rank, world
        self.data = data  # this rank's [2, world, slot] words
        self.slot = data.shape[2]
        device = data.device
        self.data_ptrs = torch.tensor(list(data_ptrs), dtype=torch.int64, device=device)
        self.epoch = torch.zeros(1, dtype=torch.int32, device=device)
        self.rehearsal_epoch = torch.full((1,), -1, dtype=torch.int32, device=device)  # see PeerSum.rehearsal

    @staticmethod
    def layout_bytes(world: int, slot_elems: int) -> int:
        """Bytes of one rank's buffer: 2 regions x world parts x slot words of 8 bytes."""
        return 2 * world * slot_elems * 8

    @classmethod
    def over_group(cls, group: dist.ProcessGroup, buffer: torch.Tensor, slot_elems: int) -> "PeerExchange":
        """Collective over `group`: maps every rank's `buffer` (`layout_bytes(world, slot_elems)` bytes from
        `symm_mem.empty`) into the others."""
        import torch.distributed._symmetric_memory as symm_mem

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        total = cls.layout_bytes(world, slot_elems)
        assert buffer.numel() == total, (buffer.numel(), total)
        buffer.zero_()  # flag 0 is below any flag value; every rank zeroes before the rendezvous' barrier
        handle = symm_mem.rendezvous(buffer, group.group_name)
        offset = buffer.data_ptr() - handle.buffer_ptrs[handle.rank]
        data = buffer.view(torch.int64).view(2, world, slot_elems)
        torch.cuda.synchronize(buffer.device)
        return cls(rank, world, data, [p + offset for p in handle.buffer_ptrs])

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
    rehearsed: bool = False

    @property
    def region(self) -> int:
        return self.call % 2

    @property
    def shape(self) -> Tuple[int, int]:
        return self.rows, self.cols

    def rehearsal(self) -> "PeerSum":
        """The same sum for a producer to be timed on: its words land where the real ones will, but carry the flag
        of epoch -1, which no consumer waits for (epochs count from 1). Safe to push only where the real producer
        runs, just before it on the same stream: there every peer has consumed this region's previous sum, and
        the real push then overwrites every word the rehearsal wrote."""
        return PeerSum(self.xch, self.call, self.rows, self.cols, rehearsed=True)

    def producer_args(self) -> dict:
        """XPTRS: every rank's buffer; x_data_off: this rank's part of the region there, in words."""
        x, r = self.xch, self.region
        return dict(XPTRS=x.data_ptrs, XEPOCH=x.rehearsal_epoch if self.rehearsed else x.epoch, x_call=self.call,
                    x_data_off=(r * x.world + x.rank) * x.slot, XTP=x.world)

    def consumer_args(self) -> dict:
        """D: part 0 of this rank's region (part s is `d_part_stride` words further)."""
        x, r = self.xch, self.region
        return dict(D=x.data[r], DEPOCH=x.epoch, d_call=self.call, d_part_stride=x.slot, DTP=x.world,
                    DTP2=1 << (x.world - 1).bit_length())  # the parts as one tile: a power of two


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
        exchange_bytes = PeerExchange.layout_bytes(dist.get_world_size(group), max_bytes // 4)
        buffers = (symm_mem.empty(max_bytes, dtype=torch.uint8, device=device),
                   symm_mem.empty(exchange_bytes, dtype=torch.uint8, device=device) if want_exchange else None)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.warning("symmetric memory unavailable on this rank: %s", error)
    # Allocating is local, mapping is collective: a rank enters the rendezvous only once every rank has its buffers,
    # so one that failed never leaves the others waiting there.
    if _everyone(buffers is not None, group, device):
        try:
            peer = PeerAllReduce(group, buffers[0])
            if want_exchange:
                exchange = PeerExchange.over_group(group, buffers[1], max_bytes // 4)
        except Exception as exc:
            # Said now: if the peers are still inside the rendezvous, the agreement below waits for them, and
            # only init_runtime's deadline ends the wait.
            error = f"{type(exc).__name__}: {exc}"
            log.warning("symmetric-memory rendezvous failed on this rank: %s", error)
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
