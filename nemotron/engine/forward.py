"""One forward pass through the whole (possibly pipelined, tensor-parallel) model, and moving its inputs and results.

Every rank calls `forward_logits` with the same token ids. The first stage embeds them, each stage runs its
layers and sends the hidden states [B, T, h] to the next stage, and the last stage returns full-vocabulary
logits (gathered over its TP group) for the requested positions. Other stages return None.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from nemotron.model import Batch, KVCache, NemotronModel
from nemotron.parallel.layers import all_gather_last_dim


@torch.inference_mode()
def forward_logits(model: NemotronModel, tokens: torch.Tensor, batch: Batch, cache: Optional[KVCache],
                   positions: str = "last") -> Optional[torch.Tensor]:
    """tokens [B, T] -> float32 logits [B, V] (positions="last") or [B, T, V] ("all") on the last stage."""
    ps = model.ps
    B, T = tokens.shape
    if ps.is_first_stage:
        x = tokens
    else:
        x = torch.empty(B, T, model.cfg.hidden_size, dtype=model.dtype, device=tokens.device)
        dist.recv(x, src=ps.stage_rank(ps.pp_rank - 1))
    hidden = model(x, batch, cache)
    if not ps.is_last_stage:
        dist.send(hidden.contiguous(), dst=ps.stage_rank(ps.pp_rank + 1))
        return None
    if positions == "last":
        hidden = hidden[:, -1]
    logits = all_gather_last_dim(model.logits(hidden), ps.tp_group)
    return logits.float()


def broadcast_from(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """In place on every rank (no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def to_device(values: Sequence, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """torch.tensor(values) on `device`, queued behind the device's work instead of waiting for it. A plain
    torch.tensor(values, device=cuda) copies from pageable memory, which synchronises the stream: the host would wait
    for every step queued before (what the engine's overlap avoids). From pinned memory the copy is queued, and the
    caching host allocator keeps the pinned block until the copy has run."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
