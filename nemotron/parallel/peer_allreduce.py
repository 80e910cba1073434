"""Small all-reduces straight from the peers' memory (NVLink), for decode.

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
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

#: Messages up to this many bytes take the peer path (decode activations: [128, 4096] fp32 is 2 MiB).
DEFAULT_MAX_BYTES = 4 << 20

_registry: Dict[str, "PeerAllReduce"] = {}


class PeerAllReduce:
    """Out-of-place sum over a process group through one shared (symmetric-memory) buffer per rank."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.max_bytes = max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)  # collective over the group: maps the peers' buffers

    def fits(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and x.is_contiguous() and x.numel() * x.element_size() <= self.max_bytes
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        nbytes = x.numel() * x.element_size()
        shared = self.buffer[:nbytes].view(x.dtype).view(x.shape)
        out = torch.empty_like(x)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(shared, x, "sum", self.group_name, out)
        return out


def enable_peer_all_reduce(group: Optional[dist.ProcessGroup], device: torch.device,
                           max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Collective over `group` (every member calls it). Returns whether the peer path is on for this group.

    Off when NEMOTRON_PEER_ALLREDUCE=0, off CUDA, for a group of one, or when symmetric memory cannot be set up
    (then every member falls back together: a failure on one rank is shared through an all-reduce of the flag).
    """
    switch = os.environ.get("NEMOTRON_PEER_ALLREDUCE", "1")
    if switch not in ("0", "1"):
        raise ValueError(f"NEMOTRON_PEER_ALLREDUCE={switch!r}: expected 0 or 1")
    if group is None or device.type != "cuda" or switch == "0":
        return False
    if dist.get_world_size(group) < 2:
        return False
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    peer, error = None, ""
    try:
        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
            raise RuntimeError("this PyTorch has no symm_mem.one_shot_all_reduce_copy_out")
        peer = PeerAllReduce(group, device, max_bytes)
    except Exception as exc:  # symmetric memory needs P2P access and a recent driver; NCCL still works
        error = f"{type(exc).__name__}: {exc}"
    ok = torch.tensor([1 if peer is not None else 0], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if int(ok.item()) == 0:
        log.info("peer all-reduce off for group %s (%s); NCCL carries every all-reduce", group.group_name,
                 error or "another rank could not set it up")
        return False
    _registry[group.group_name] = peer
    return True


@contextlib.contextmanager
def nccl_only(group: Optional[dist.ProcessGroup]) -> Iterator[None]:
    """Inside the block every all-reduce of `group` goes through NCCL (the benchmark times both paths)."""
    peer = _registry.pop(group.group_name, None) if group is not None else None
    try:
        yield
    finally:
        if peer is not None:
            _registry[group.group_name] = peer


def peer_all_reduce_for(group: dist.ProcessGroup) -> Optional[PeerAllReduce]:
    return _registry.get(group.group_name)
